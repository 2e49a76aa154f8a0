"""Train VLMamba: ``python train.py experiment=demo`` (see conf/train.yaml and the README).

Thin on purpose: Hydra composes conf/, vlm_mamba.training.run builds and runs. Returns the metric named
by ``optimized_metric`` so ``python train.py -m hparams_search=optuna`` can optimise it.
"""

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
os.environ.setdefault("VLM_MAMBA_ROOT", str(ROOT))

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from vlm_mamba.training.run import TrainingError, run  # noqa: E402


@hydra.main(version_base="1.3", config_path=str(ROOT / "conf"), config_name="train")
def main(cfg: DictConfig) -> float | None:
    try:
        return run(cfg)
    except TrainingError as e:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise  # the sweeper records this job as failed and goes on
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()

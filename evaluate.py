"""Evaluate a VLMamba checkpoint on COCO captions / VQAv2, score a results file, or predict one image.

    python evaluate.py ckpt_path=CKPT task=coco_caption split=test
    python evaluate.py task=vqav2 results=R.json annotations=A.json questions=Q.json
    python evaluate.py mode=predict ckpt_path=CKPT image=photo.jpg question="what color is the circle?"

The logic lives in ``vlm_mamba.evaluation.run``; ``conf/eval.yaml`` lists every option.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

ROOT = Path(__file__).resolve().parent
os.environ.setdefault("VLM_MAMBA_ROOT", str(ROOT))


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from vlm_mamba.evaluation.run import run_eval, run_predict, run_score, user_errors

    out_dir = Path(HydraConfig.get().runtime.output_dir)
    c = OmegaConf.to_container(cfg, resolve=True)
    mode = "score" if c.get("results") and c["mode"] == "eval" else c["mode"]
    try:
        if mode == "score":
            run_score(c, out_dir)
        elif mode == "predict":
            run_predict(c)
        elif mode == "eval":
            run_eval(c, out_dir)
        else:
            raise ValueError(f"mode={mode!r}: expected eval, score or predict")
    except user_errors() as e:  # bad input only: CUDA errors and bugs keep their traceback
        print(f"evaluate.py: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()

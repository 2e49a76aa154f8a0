"""Training: the LightningModule, its optimiser and schedule, callbacks, the ``train.py`` run, export.

    module.py     VLMambaLitModule: loss, optimiser, schedule, validation decoding and scoring
    optim.py      AdamW parameter groups (what decays), warmup + cosine schedule
    callbacks.py  exact-resume RNG state, overfit replay, ThroughputMonitor's batch functions
    run.py        what ``train.py`` calls: Hydra config -> objects -> fit -> test
    fsdp.py       FSDP2 (``trainer=fsdp``): the strategy, sharding, decoding and even evaluation batches
    export.py     ``python -m vlm_mamba.export``: a .ckpt -> a ``save_pretrained`` folder

Imports run one way: ``training`` may import ``evaluation`` (validation decodes and scores),
``data`` and ``models``; nothing outside ``training`` imports it (``tests/test_layout.py``).
The names below are importable from here as well (lazily, so ``import vlm_mamba.training.optim``
does not pull in Hydra).
"""

from __future__ import annotations

import importlib
from typing import Any

_NAMES = {
    "VLMambaLitModule": "module",
    "NO_DECAY_NAMES": "optim",
    "WarmupCosine": "optim",
    "param_groups": "optim",
    "warmup_cosine": "optim",
    "RNGStateCheckpoint": "callbacks",
    "OverfitBatches": "callbacks",
    "batch_size_of": "callbacks",
    "tokens_of": "callbacks",
    "get_rng_state": "callbacks",
    "set_rng_state": "callbacks",
    "export": "export",
    "FSDP2Strategy": "fsdp",
    # the names of the former module vlm_mamba/training.py, now run.py (its `run` is run.run)
    "TrainingError": "run",
    "ConfigError": "run",
    "MissingDataError": "run",
    "NonFiniteLossError": "run",
    "train": "run",
    "model_config": "run",
    "fsdp_strategy": "run",
    "instantiate_list": "run",
    "sync_tokenizer": "run",
    "build_datamodule": "run",
    "register_resolvers": "run",
    "check_prepared": "run",
}

__all__ = sorted(_NAMES)


def __getattr__(name: str) -> Any:
    if name in _NAMES:
        return getattr(importlib.import_module(f"{__name__}.{_NAMES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

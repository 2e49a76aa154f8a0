"""Moved to ``vlm_mamba.training.module (optimiser groups: vlm_mamba.training.optim)``; this alias is kept for one release."""

import warnings

from .training.callbacks import batch_size_of, tokens_of
from .training.module import VLMambaLitModule
from .training.optim import NO_DECAY_NAMES, WarmupCosine, param_groups, warmup_cosine

__all__ = [
    "NO_DECAY_NAMES",
    "VLMambaLitModule",
    "WarmupCosine",
    "batch_size_of",
    "param_groups",
    "tokens_of",
    "warmup_cosine",
]

warnings.warn("vlm_mamba.lit_module moved to vlm_mamba.training.module", DeprecationWarning, stacklevel=2)

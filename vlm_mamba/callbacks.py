"""Moved to ``vlm_mamba.training.callbacks``; this alias is kept for one release."""

import warnings

from .training.callbacks import OverfitBatches, RNGStateCheckpoint, get_rng_state, set_rng_state

__all__ = ["OverfitBatches", "RNGStateCheckpoint", "get_rng_state", "set_rng_state"]

warnings.warn("vlm_mamba.callbacks moved to vlm_mamba.training.callbacks", DeprecationWarning, stacklevel=2)

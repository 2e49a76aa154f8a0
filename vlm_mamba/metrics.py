"""Moved to ``vlm_mamba.evaluation.metrics``; this alias is kept for one release."""

import warnings

from .evaluation.metrics import *  # noqa: F403
from .evaluation.metrics import __all__  # noqa: F401

warnings.warn("vlm_mamba.metrics moved to vlm_mamba.evaluation.metrics", DeprecationWarning, stacklevel=2)

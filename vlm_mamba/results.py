"""Moved to ``vlm_mamba.evaluation.formats``; this alias is kept for one release."""

import warnings

from .evaluation.formats import *  # noqa: F403
from .evaluation.formats import __all__  # noqa: F401

warnings.warn("vlm_mamba.results moved to vlm_mamba.evaluation.formats", DeprecationWarning, stacklevel=2)

"""vlm_mamba: an attention-free vision-language model built from Mamba state-space blocks.

Public API (the seed's names)::

    from vlm_mamba import VLMamba, VLMambaConfig, VisionConfig, LanguageConfig, BridgerConfig, LoRAConfig
"""

from __future__ import annotations

from typing import Any

from .config import BridgerConfig, LanguageConfig, LoRAConfig, VisionConfig, VLMambaConfig
from .registry import get_config, list_models

__version__ = "0.1.0"

__all__ = [
    "BridgerConfig",
    "LanguageConfig",
    "LoRAConfig",
    "VLMamba",
    "VLMambaConfig",
    "VisionConfig",
    "create_model",
    "get_config",
    "list_models",
]


def create_model(name: str, **overrides: Any):
    """Build a registered size (``tiny``, ``demo``, ``small``, ``base``) with config overrides."""
    from .models.vlm import VLMamba

    return VLMamba(get_config(name, **overrides))


def __getattr__(name: str):
    # The model imports torch and the kernels; configs stay importable without them (Hydra, CLIs).
    if name == "VLMamba":
        from .models.vlm import VLMamba

        return VLMamba
    raise AttributeError(f"module 'vlm_mamba' has no attribute {name!r}")

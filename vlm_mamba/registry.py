"""Named model sizes (timm's ``@register_model`` / litgpt's ``Config.from_name``).

``tiny``  every unit test and the debug presets: seconds on a CPU.
``demo``  learns the synthetic shapes data on 2 CPU cores in minutes (``make demo``).
``small`` a real but affordable model (224 px, 16 px patches).
``base``  the seed's standard configuration: 224 px, patch 16, width 768, 12 vision + 12 language
          layers, GPT-2 vocabulary (50257). Its measured size is in the README (the seed's ~37M
          claim is wrong: see ``VLMamba.num_parameters``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .config import BridgerConfig, LanguageConfig, VisionConfig, VLMambaConfig

_REGISTRY: dict[str, Callable[[], VLMambaConfig]] = {}


def register(name: str) -> Callable[[Callable[[], VLMambaConfig]], Callable[[], VLMambaConfig]]:
    def deco(fn: Callable[[], VLMambaConfig]) -> Callable[[], VLMambaConfig]:
        if name in _REGISTRY:
            raise ValueError(f"model size {name!r} is already registered")
        _REGISTRY[name] = fn
        return fn

    return deco


@register("tiny")
def _tiny() -> VLMambaConfig:
    return VLMambaConfig(
        vision=VisionConfig(img_size=32, patch_size=8, d_model=32, n_layers=2, d_state=8, max_img_size=64),
        language=LanguageConfig(vocab_size=512, d_model=64, n_layers=2, d_state=8, headdim=16, chunk_size=16),
        bridger=BridgerConfig(expansion_factor=2),
    )


@register("demo")
def _demo() -> VLMambaConfig:
    return VLMambaConfig(
        # 64 px shapes upsampled to 96 px, 32 px patches: one token per cell of the 3x3 scene grid
        # (9 image tokens); per-image centring, or the flat background drowns the objects.
        vision=VisionConfig(
            img_size=96, patch_size=32, d_model=96, n_layers=2, d_state=8, max_img_size=96, center_images=True
        ),
        language=LanguageConfig(
            vocab_size=1024, d_model=128, n_layers=3, d_state=8, headdim=32, chunk_size=32
        ),
        bridger=BridgerConfig(expansion_factor=2),
    )


@register("small")
def _small() -> VLMambaConfig:
    return VLMambaConfig(
        vision=VisionConfig(img_size=224, patch_size=16, d_model=384, n_layers=12),
        language=LanguageConfig(vocab_size=50257, d_model=512, n_layers=12),
        bridger=BridgerConfig(expansion_factor=4),
    )


@register("base")
def _base() -> VLMambaConfig:
    return VLMambaConfig(
        vision=VisionConfig(img_size=224, patch_size=16, d_model=768, n_layers=12),
        language=LanguageConfig(vocab_size=50257, d_model=768, n_layers=12),
        bridger=BridgerConfig(d_model=768, expansion_factor=4),
    )


def list_models() -> list[str]:
    """The registered size names, in registration order."""
    return list(_REGISTRY)


def get_config(name: str, **overrides: Any) -> VLMambaConfig:
    """The named size's config, with top-level or nested overrides (``language={"ssm": "mamba2"}``)."""
    if name not in _REGISTRY:
        raise KeyError(f"unknown model size {name!r}; registered: {', '.join(_REGISTRY)}")
    cfg = _REGISTRY[name]()
    if not overrides:
        return cfg
    data = cfg.model_dump()
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return VLMambaConfig.model_validate(data)

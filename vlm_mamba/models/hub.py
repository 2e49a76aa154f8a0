"""Reading a training checkpoint without Lightning: ``.ckpt`` -> :class:`VLMamba` (+ its tokenizer).

A ``VLMambaLitModule`` checkpoint holds only tensors and plain types (the module stores its model
config as a dict and the tokenizer as its JSON string), so it is read with
``torch.load(weights_only=True)``: no code from the file runs, and nothing the run read at start-up
(``module.pretrained_language``, the data folder) needs to exist any more. ``vlm_mamba.export`` and
``evaluate.py`` both load checkpoints through here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..config import VLMambaConfig
from .vlm import VLMamba

STATE_PREFIX = "model."  # VLMambaLitModule keeps the network at self.model


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """``torch.load(weights_only=True)`` with errors that say what the file is not."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # an unpickling error names the object weights_only refused
        raise ValueError(f"{path}: not loadable as a weights-only checkpoint ({err})") from err
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ValueError(f"{path}: not a Lightning checkpoint (no 'state_dict')")
    hp = ckpt.get("hyper_parameters") or {}
    if "model" not in hp:
        raise ValueError(f"{path}: no hyper_parameters['model']: not written by VLMambaLitModule")
    return ckpt


def model_from_checkpoint(ckpt: dict[str, Any] | str | Path) -> VLMamba:
    """The :class:`VLMamba` of a VLMambaLitModule checkpoint, weights loaded strictly, in eval mode.

    The model is built from the stored config alone: its pretrained-language weights are in the
    checkpoint's state dict, so the original pretrained directory is not read."""
    if not isinstance(ckpt, dict):
        ckpt = load_checkpoint(ckpt)
    config = VLMambaConfig.model_validate(ckpt["hyper_parameters"]["model"])
    model = VLMamba(config)
    n = len(STATE_PREFIX)
    state = {k[n:]: v for k, v in ckpt["state_dict"].items() if k.startswith(STATE_PREFIX)}
    model.load_state_dict(state, strict=True)
    return model.eval()


def tokenizer_from_checkpoint(ckpt: dict[str, Any]):
    """The checkpoint's ``TextTokenizer``, or None when the run stored none."""
    if not ckpt.get("tokenizer_json"):
        return None
    from ..data.tokenizer import TextTokenizer

    return TextTokenizer.from_json(ckpt["tokenizer_json"], ckpt.get("tokenizer_specials"))

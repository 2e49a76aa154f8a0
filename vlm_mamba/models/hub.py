"""Reading a training checkpoint without Lightning: ``.ckpt`` -> :class:`VLMamba` (+ its tokenizer).

A ``VLMambaLitModule`` checkpoint holds only tensors and plain types (the module stores its model
config as a dict and the tokenizer as its JSON string), so it is read with
``torch.load(weights_only=True)``: no code from the file runs, and nothing the run read at start-up
(``module.pretrained_language``, the data folder) needs to exist any more. ``vlm_mamba.export`` and
``evaluate.py`` both load checkpoints through here.

A sharded run (``trainer=fsdp``) writes a distributed checkpoint instead: a folder of per-rank
shard files with ``.metadata`` (torch.distributed.checkpoint) beside Lightning's ``meta.pt`` (the
rest of the checkpoint, also read with ``weights_only=True``). Its model weights are read with
``torch.distributed.checkpoint.load(..., no_dist=True)`` in one process, whatever the number of
ranks that wrote it; the optimiser shards are not read.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

from ..config import VLMambaConfig
from .vlm import VLMamba

STATE_PREFIX = "model."  # VLMambaLitModule keeps the network at self.model
DCP_METADATA = ".metadata"  # torch.distributed.checkpoint's index of a sharded checkpoint folder
DCP_META = "meta.pt"  # Lightning's non-tensor part of a distributed checkpoint


def is_sharded_checkpoint(path: str | Path) -> bool:
    """A distributed-checkpoint folder (``trainer=fsdp``'s ``last.ckpt/``), not a ``save_pretrained`` one."""
    path = Path(path)
    return path.is_dir() and (path / DCP_METADATA).is_file() and (path / DCP_META).is_file()


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """``torch.load(weights_only=True)`` with errors that say what the file is not; a sharded
    checkpoint folder is read into the same dict (``state_dict`` holds full tensors)."""
    path = Path(path)
    if is_sharded_checkpoint(path):
        ckpt = _load_sharded(path)
    elif not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    else:
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


def _load_sharded(path: Path) -> dict[str, Any]:
    """meta.pt + the model's tensors of a distributed checkpoint (every shard, assembled on the CPU)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    try:
        ckpt = torch.load(path / DCP_META, map_location="cpu", weights_only=True)
        reader = dcp.FileSystemReader(str(path))
        index = reader.read_metadata().state_dict_metadata
    except Exception as err:
        raise ValueError(f"{path}: not a readable distributed checkpoint ({err})") from err
    prefix = "state_dict."  # Lightning saves {"state_dict": model, "optimizer_0": ...}
    state = {
        key[len(prefix) :]: torch.empty(md.size, dtype=md.properties.dtype)
        for key, md in index.items()
        if key.startswith(prefix) and isinstance(md, TensorStorageMetadata)
    }
    if not isinstance(ckpt, dict) or not state:
        raise ValueError(f"{path}: a distributed checkpoint without model weights ('state_dict')")
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.load({"state_dict": state}, storage_reader=reader, no_dist=True)
    ckpt["state_dict"] = state
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

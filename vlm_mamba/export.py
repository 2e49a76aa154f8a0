"""Lightning checkpoint -> ``VLMamba.save_pretrained`` directory (config, weights, tokenizer).

    python -m vlm_mamba.export runs/train/<run>/checkpoints/last.ckpt exported/demo [--merge-lora]

The checkpoint is read with ``torch.load(weights_only=True)``: it holds only tensors and plain
types (the module stores its model config as a dict and the tokenizer as its JSON string), so no
code from the file is executed. The result loads without Lightning:
``VLMamba.from_pretrained(out_dir)``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import torch

from .config import VLMambaConfig
from .models.vlm import TOKENIZER_NAME, VLMamba

log = logging.getLogger(__name__)

_PREFIX = "model."  # VLMambaLitModule keeps the network at self.model


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """``torch.load(weights_only=True)`` with errors that say what the file is not."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ValueError(f"{path}: not a Lightning checkpoint (no 'state_dict')")
    hp = ckpt.get("hyper_parameters") or {}
    if "model" not in hp:
        raise ValueError(f"{path}: no hyper_parameters['model']: not written by VLMambaLitModule")
    return ckpt


def model_from_checkpoint(ckpt: dict[str, Any] | str | Path) -> VLMamba:
    """The :class:`VLMamba` of a VLMambaLitModule checkpoint (weights loaded strictly)."""
    if not isinstance(ckpt, dict):
        ckpt = load_checkpoint(ckpt)
    config = VLMambaConfig.model_validate(ckpt["hyper_parameters"]["model"])
    model = VLMamba(config)
    state = {k[len(_PREFIX) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(_PREFIX)}
    model.load_state_dict(state, strict=True)
    return model.eval()


def export(
    ckpt_path: str | Path, out_dir: str | Path, tokenizer: str | Path | None = None, merge_lora: bool = False
) -> Path:
    """Write ``out_dir`` (``config.json``, ``model.safetensors``, ``tokenizer.json``) from a checkpoint.

    Args:
        ckpt_path: a ``.ckpt`` written while training with :class:`VLMambaLitModule`.
        out_dir: the directory to (re)write.
        tokenizer: a ``tokenizer.json`` (or a folder holding one) overriding the checkpoint's own.
        merge_lora: fold LoRA adapters into the base weights and drop them (a plain model).
    """
    ckpt = load_checkpoint(ckpt_path)
    model = model_from_checkpoint(ckpt)
    if merge_lora and model.has_lora:
        model.merge_lora(unload=True)
    out = Path(out_dir)
    tok: Any = None
    if tokenizer is not None:
        tok = Path(tokenizer)
        tok = tok / TOKENIZER_NAME if tok.is_dir() else tok
        if not tok.is_file():
            raise FileNotFoundError(f"--tokenizer {tokenizer}: no tokenizer.json there")
    model.save_pretrained(out, tokenizer=tok)
    if tok is None:
        if ckpt.get("tokenizer_json"):
            (out / TOKENIZER_NAME).write_text(ckpt["tokenizer_json"])
            if ckpt.get("tokenizer_specials"):
                (out / "tokenizer_config.json").write_text(json.dumps(ckpt["tokenizer_specials"], indent=1))
        else:
            log.warning(
                "%s holds no tokenizer and none was given: %s has weights and config only", ckpt_path, out
            )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vlm_mamba.export", description=__doc__.split("\n\n")[0])
    p.add_argument("ckpt", help="Lightning checkpoint (.ckpt) written by train.py")
    p.add_argument("out_dir", help="directory for config.json, model.safetensors, tokenizer.json")
    p.add_argument(
        "--tokenizer", default=None, help="tokenizer.json (or its folder) instead of the checkpoint's"
    )
    p.add_argument("--merge-lora", action="store_true", help="fold LoRA adapters into the weights")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        out = export(args.ckpt, args.out_dir, tokenizer=args.tokenizer, merge_lora=args.merge_lora)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"exported {args.ckpt} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

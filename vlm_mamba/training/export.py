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

from ..models.hub import load_checkpoint, model_from_checkpoint
from ..models.vlm import TOKENIZER_CONFIG_NAME, TOKENIZER_NAME

log = logging.getLogger(__name__)

__all__ = ["export", "load_checkpoint", "main", "model_from_checkpoint"]


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
    out = Path(out_dir)
    if Path(ckpt_path).resolve().is_relative_to(out.resolve()):
        raise ValueError(f"{out} holds the checkpoint being exported ({ckpt_path}): choose another directory")
    model = model_from_checkpoint(ckpt)
    if merge_lora and model.has_lora:
        model.merge_lora(unload=True)
    tok, extra = None, {}
    if tokenizer is not None:
        tok = Path(tokenizer)
        tok = tok / TOKENIZER_NAME if tok.is_dir() else tok
        if not tok.is_file():
            raise FileNotFoundError(f"--tokenizer {tokenizer}: no tokenizer.json there")
    elif ckpt.get("tokenizer_json"):
        extra[TOKENIZER_NAME] = ckpt["tokenizer_json"]
        if ckpt.get("tokenizer_specials"):
            extra[TOKENIZER_CONFIG_NAME] = json.dumps(ckpt["tokenizer_specials"], indent=1)
    else:
        log.warning(
            "%s holds no tokenizer and none was given: %s has weights and config only", ckpt_path, out
        )
    model.save_pretrained(out, tokenizer=tok, extra_files=extra)
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
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"exported {args.ckpt} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``python -m vlm_mamba.export CKPT OUT_DIR [--merge-lora]``: the entry point; the code is in
:mod:`vlm_mamba.training.export`."""

import sys

from .training.export import export, main

__all__ = ["export", "main"]

if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""COCO Captions -> webdataset shards under <out>/<dataset>/<split>/ (logic: vlm_mamba.data.coco).

  python data/prepare_coco.py --annotations captions_val2014.json --images val2014 --out data
  python data/prepare_coco.py --karpathy dataset_coco.json --images coco_images --out data

Exit status 0 when every requested split was written; 1 on bad input (the message names the file,
record and field, or the image under --strict).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from vlm_mamba.data.coco import prepare_coco  # noqa: E402
from vlm_mamba.data.records import AnnotationError  # noqa: E402
from vlm_mamba.data.shards import PrepareError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--annotations", help="official captions_<split><year>.json (one split)")
    ap.add_argument("--karpathy", help="Karpathy dataset_coco.json (writes train=train+restval, val, test)")
    ap.add_argument(
        "--images", required=True, help="image folder (Karpathy: the folder holding train2014/ val2014/)"
    )
    ap.add_argument("--out", required=True, help="data_dir; shards go to <out>/<dataset>/<split>/")
    ap.add_argument("--dataset", default="coco", help="dataset folder name (default: coco)")
    ap.add_argument("--split", help="split name for --annotations (default: from the file name)")
    ap.add_argument(
        "--splits", default="train,val,test", help="Karpathy splits to write (default: train,val,test)"
    )
    ap.add_argument("--strict", action="store_true", help="a missing or undecodable image is an error")
    ap.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default: 1000)")
    ap.add_argument("--workers", type=int, default=0, help="processes verifying images (default: 0 = inline)")
    ap.add_argument(
        "--vocab-size", type=int, default=8192, help="BPE vocabulary when a train split is written"
    )
    ap.add_argument("--no-tokenizer", action="store_true", help="do not train a tokenizer")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if (args.annotations is None) == (args.karpathy is None):
        ap.error("give exactly one of --annotations or --karpathy")
    try:
        written = prepare_coco(
            images=args.images,
            out=args.out,
            annotations=args.annotations,
            karpathy=args.karpathy,
            dataset=args.dataset,
            split=args.split,
            splits=tuple(s for s in args.splits.split(",") if s),
            strict=args.strict,
            shard_size=args.shard_size,
            workers=args.workers,
            train_tokenizer=not args.no_tokenizer,
            vocab_size=args.vocab_size,
            progress=not args.quiet,
        )
    except (AnnotationError, PrepareError, ValueError, FileNotFoundError) as err:
        print(f"prepare_coco: error: {err}", file=sys.stderr)
        return 1
    for name, path in written.items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

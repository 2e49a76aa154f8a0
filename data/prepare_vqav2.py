#!/usr/bin/env python
"""VQAv2 -> webdataset shards under <out>/<dataset>/<split>/ (logic: vlm_mamba.data.vqav2).

  python data/prepare_vqav2.py --questions v2_OpenEnded_mscoco_val2014_questions.json \\
      --annotations v2_mscoco_val2014_annotations.json --images val2014 --out data
  python data/prepare_vqav2.py --questions v2_OpenEnded_mscoco_test-dev2015_questions.json \\
      --images test2015 --out data

Exit status 0 when the split was written; 1 on bad input (the message names the file, record and
field, or the image under --strict).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from vlm_mamba.data.records import AnnotationError  # noqa: E402
from vlm_mamba.data.shards import PrepareError  # noqa: E402
from vlm_mamba.data.vqav2 import prepare_vqav2  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--questions", required=True, help="v2_OpenEnded_mscoco_<subtype>_questions.json")
    ap.add_argument("--annotations", help="v2_mscoco_<subtype>_annotations.json (omit for test/test-dev)")
    ap.add_argument("--images", required=True, help="folder of the COCO images of that subtype")
    ap.add_argument("--out", required=True, help="data_dir; shards go to <out>/<dataset>/<split>/")
    ap.add_argument("--dataset", default="vqav2", help="dataset folder name (default: vqav2)")
    ap.add_argument("--split", help="split name (default: from data_subtype / the file name)")
    ap.add_argument("--image-pattern", help="image file name format, e.g. 'COCO_val2014_{image_id:012d}.jpg'")
    ap.add_argument("--strict", action="store_true", help="a missing or undecodable image is an error")
    ap.add_argument("--shard-size", type=int, default=1000, help="samples (images) per shard (default: 1000)")
    ap.add_argument("--workers", type=int, default=0, help="processes verifying images (default: 0 = inline)")
    ap.add_argument(
        "--vocab-size", type=int, default=8192, help="BPE vocabulary when a train split is written"
    )
    ap.add_argument("--no-tokenizer", action="store_true", help="do not train a tokenizer")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        written = prepare_vqav2(
            questions=args.questions,
            images=args.images,
            out=args.out,
            annotations=args.annotations,
            dataset=args.dataset,
            split=args.split,
            image_pattern=args.image_pattern,
            strict=args.strict,
            shard_size=args.shard_size,
            workers=args.workers,
            train_tokenizer=not args.no_tokenizer,
            vocab_size=args.vocab_size,
            progress=not args.quiet,
        )
    except (AnnotationError, PrepareError, ValueError, FileNotFoundError) as err:
        print(f"prepare_vqav2: error: {err}", file=sys.stderr)
        return 1
    for name, path in written.items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Generate the synthetic shapes dataset in the official COCO Captions / VQAv2 file formats
(logic: vlm_mamba.data.shapes).

  python data/generate_shapes.py --out data/raw/shapes --num-train 4000 --num-val 500 --num-test 500 --seed 0
  python data/generate_shapes.py --build data          # generate + prepare shards + tokenizer in one go

Without --build it writes only the raw files (images/, captions_*.json, v2_OpenEnded_shapes_*_questions.json,
v2_shapes_*_annotations.json, dataset_shapes.json) for data/prepare_coco.py and data/prepare_vqav2.py.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from vlm_mamba.data.shapes import build_shapes_dataset, generate_shapes  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", help="folder for the raw files")
    where.add_argument(
        "--build", metavar="DATA_DIR", help="generate under DATA_DIR/raw/shapes and prepare shards"
    )
    ap.add_argument("--num-train", type=int, default=4000)
    ap.add_argument("--num-val", type=int, default=500)
    ap.add_argument("--num-test", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--image-size", type=int, default=64, help="square image side in pixels (default: 64)")
    ap.add_argument(
        "--vocab-size", type=int, default=512, help="tokenizer vocabulary (--build; default: 512)"
    )
    ap.add_argument("--workers", type=int, default=0, help="generator processes (default: 0 = inline)")
    ap.add_argument("--force", action="store_true", help="--build: rebuild even if up to date")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.build:
            out = build_shapes_dataset(
                args.build,
                args.num_train,
                args.num_val,
                args.num_test,
                args.seed,
                args.image_size,
                vocab_size=args.vocab_size,
                workers=args.workers,
                force=args.force,
                progress=True,
            )
            print(
                f"shapes: {out['data_dir'] / 'shapes'}\nshapes_vqa: {out['data_dir'] / 'shapes_vqa'}\ntokenizer: {out['tokenizer']}"
            )
        else:
            out = generate_shapes(
                args.out,
                args.num_train,
                args.num_val,
                args.num_test,
                args.seed,
                args.image_size,
                args.workers,
            )
            print(f"wrote {out['root']}")
    except (ValueError, OSError) as err:
        print(f"generate_shapes: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Training-loader throughput on this CPU: decoded, transformed, tokenized, collated images per second.

Two datasets, built in a temporary folder with the package's own prepare code:
  shapes     the embedded 64x64 synthetic set (the demo's loader: encoder mode, img_size 64)
  coco-like  640x480 JPEGs of COCO's typical size and byte count (~100 KB), encoder 224 and fuyu 448
Each row streams ``--batches`` batches after one warm-up batch (worker start-up is left out) and
reports images/s. Prints a table; writes benchmarks/results/bench_loader.json.

  python benchmarks/bench_loader.py [--batches 30] [--batch-size 32] [--workers 0 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw, ImageFilter  # noqa: E402

from vlm_mamba.data.coco import prepare_coco  # noqa: E402
from vlm_mamba.data.datamodules import CaptionDataModule  # noqa: E402
from vlm_mamba.data.shapes import build_shapes_dataset  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "bench_loader.json"


def make_coco_like(root: Path, n: int, seed: int = 0) -> None:
    """n photo-like 640x480 JPEGs (smooth shapes + sensor noise, quality 90) and a captions file."""
    rng = random.Random(seed)
    nrng = np.random.default_rng(seed)
    img_dir = root / "images"
    img_dir.mkdir(parents=True)
    images, anns = [], []
    for i in range(n):
        w, h = (640, 480) if rng.random() < 0.7 else (480, 640)
        img = Image.new("RGB", (w, h), tuple(rng.randrange(256) for _ in range(3)))
        draw = ImageDraw.Draw(img)
        for _ in range(12):
            x, y = rng.randrange(w), rng.randrange(h)
            r = rng.randrange(20, 200)
            draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(rng.randrange(256) for _ in range(3)))
        img = img.filter(ImageFilter.GaussianBlur(3))
        noise = nrng.normal(0, 12, (h, w, 3))
        img = Image.fromarray(np.clip(np.asarray(img, dtype=np.float32) + noise, 0, 255).astype(np.uint8))
        name = f"{i + 1:012d}.jpg"
        img.save(img_dir / name, quality=90)
        images.append({"id": i + 1, "file_name": name, "width": w, "height": h})
        anns += [
            {"id": (i + 1) * 10 + k, "image_id": i + 1, "caption": f"a photo of thing {k} number {i}"}
            for k in range(5)
        ]
    (root / "captions_train.json").write_text(json.dumps({"images": images, "annotations": anns}))


def measure(dm: CaptionDataModule, batches: int) -> dict[str, float]:
    loader = dm.train_dataloader()
    it = iter(loader)
    next(it)  # warm-up: workers started, first shard opened
    n, t0 = 0, time.perf_counter()
    for _ in range(batches):
        n += next(it)["images"].shape[0]
    dt = time.perf_counter() - t0
    del it
    return {"images": n, "seconds": round(dt, 3), "images_per_s": round(n / dt, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--coco-images", type=int, default=256)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        build_shapes_dataset(tmp, n_train=2000, n_val=10, n_test=0, shard_size=500)
        make_coco_like(tmp / "raw_coco", args.coco_images)
        prepare_coco(
            images=tmp / "raw_coco" / "images",
            out=tmp,
            annotations=tmp / "raw_coco" / "captions_train.json",
            dataset="coco_like",
            shard_size=64,
            vocab_size=300,
            progress=False,
        )
        avg_kb = np.mean([p.stat().st_size for p in (tmp / "raw_coco" / "images").iterdir()]) / 1024
        setups = [
            ("shapes", "encoder 64", dict(dataset="shapes", img_size=64, patch_size=8)),
            ("coco-like", "encoder 224", dict(dataset="coco_like", img_size=224, patch_size=16)),
            (
                "coco-like",
                "fuyu <=448",
                dict(dataset="coco_like", vision_mode="fuyu", max_img_size=448, patch_size=16),
            ),
        ]
        for name, mode, kw in setups:
            for workers in args.workers:
                dm = CaptionDataModule(
                    data_dir=str(tmp),
                    batch_size=args.batch_size,
                    num_workers=workers,
                    shuffle_buffer=256,
                    batches_per_epoch=args.batches + 1,
                    max_text_len=32,
                    **kw,
                )
                r = measure(dm, args.batches)
                rows.append(
                    {
                        "dataset": name,
                        "mode": mode,
                        "num_workers": workers,
                        "batch_size": args.batch_size,
                        **r,
                    }
                )
                print(
                    f"  {name:10s} {mode:12s} workers={workers}: {r['images_per_s']:8.1f} images/s",
                    flush=True,
                )
    print()
    print(f"{'dataset':10s} {'mode':12s} {'workers':>7s} {'images/s':>9s}")
    for r in rows:
        print(f"{r['dataset']:10s} {r['mode']:12s} {r['num_workers']:7d} {r['images_per_s']:9.1f}")
    out = {
        "benchmark": "training loader throughput (decode + transform + tokenize + collate)",
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "pillow": Image.__version__,
        },
        "load_average_1_5_15min_at_end": [round(x, 2) for x in os.getloadavg()],
        "coco_like_avg_jpeg_kb": round(float(avg_kb), 1),
        "note": "2-core machine shared with other jobs: figures are noisy; workers compete with the main process",
        "rows": rows,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=1) + "\n")
    print(f"\nwrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``make demo``: the embedded default, end to end on a CPU.

1. generate the synthetic shapes dataset (official COCO captions / VQAv2 formats) and prepare
   its webdataset shards and tokenizer (``vlm_mamba.data.shapes.build_shapes_dataset``);
2. train the ``demo`` model on captions and VQA together (``python train.py experiment=demo``);
3. evaluate both tasks on the held-out test split (``vlm_mamba.evaluation.run_eval``: beam-search
   captions, greedy answers through the image-state cache, official metrics);
4. score the trivial baselines on the same split: for VQA the majority training answer of each
   question type, for captions the single most frequent training caption for every image;
5. print the table, check the model beats the baselines by the required margins (VQA +30
   points, CIDEr x3), and draw sample predictions over the images.

It says up front what the machine lacks for speed: without a C compiler the selective scan runs in
PyTorch (training ~1.5x slower); the timings and the machine go into ``demo_results.json``.

    python -m vlm_mamba.demo [--out runs/demo] [--skip-train] [train.py overrides, e.g. seed=2 trainer.max_steps=200]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
VQA_MARGIN = 30.0  # points above the per-question-type majority baseline
CIDER_FACTOR = 3.0  # times the most-frequent-caption baseline


def caption_baseline(train_annotations: dict, test_gt: dict) -> list[dict]:
    """The most frequent training caption, predicted for every test image."""
    counts = Counter(a["caption"].strip() for a in train_annotations["annotations"])
    best = counts.most_common(1)[0][0]
    return [{"image_id": img["id"], "caption": best} for img in test_gt["images"]]


def vqa_baseline(train_annotations: dict, test_annotations: dict) -> list[dict]:
    """Per question type, the most common training answer (``multiple_choice_answer``)."""
    by_type: dict[str, Counter] = {}
    for a in train_annotations["annotations"]:
        by_type.setdefault(a["question_type"], Counter())[a["multiple_choice_answer"]] += 1
    overall = Counter(a["multiple_choice_answer"] for a in train_annotations["annotations"]).most_common(1)[
        0
    ][0]
    return [
        {
            "question_id": a["question_id"],
            "answer": by_type[a["question_type"]].most_common(1)[0][0]
            if a["question_type"] in by_type
            else overall,
        }
        for a in test_annotations["annotations"]
    ]


def toolchain_notes() -> list[str]:
    """One line per missing piece that makes training slower (empty when nothing is missing). Building
    the compiled CPU scan here (under a second, cached) also takes it out of the training time."""
    from .training.callbacks import scan_unavailable_reason

    reason = scan_unavailable_reason()
    if reason is None:
        return []
    return [
        f"note: the compiled CPU scan is unavailable ({reason}); training runs the PyTorch scan, "
        "about 1.5x slower (install a C compiler, e.g. gcc, for the fast path)"
    ]


def machine() -> dict[str, Any]:
    """What the timings were measured on: CPU model, cores, torch, the scan's kernel family."""
    import platform

    import torch

    from .training.callbacks import scan_unavailable_reason

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "scan_kernel": "compiled C (cpu)" if scan_unavailable_reason() is None else "PyTorch (torch)",
    }


def _train(out: Path, data_dir: Path, overrides: list[str]) -> Path:
    """Run ``train.py experiment=demo`` in a subprocess; returns the last checkpoint."""
    run_dir = out / "train"
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        "experiment=demo",
        f"paths.data_dir={data_dir}",
        f"hydra.run.dir={run_dir}",
        "print_config=false",  # the tree is in <run dir>/config_tree.log, printed below
        *overrides,
    ]
    print("+", " ".join(cmd), flush=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    print(f"  config: {run_dir / 'config_tree.log'}", flush=True)
    subprocess.run(cmd, check=True, env=env, cwd=ROOT)
    ckpts = sorted((run_dir / "checkpoints").glob("last*.ckpt"), key=lambda p: p.stat().st_mtime)
    if not ckpts:
        raise FileNotFoundError(
            f"training finished without a last checkpoint under {run_dir / 'checkpoints'}"
        )
    return ckpts[-1]


def _loss_curve(run_dir: Path, out_png: Path) -> list[tuple[int, float]]:
    """Train loss per logged step from the CSV logger, plotted to ``out_png``."""
    import csv

    points = []
    for f in sorted(run_dir.rglob("metrics.csv")):
        with f.open() as fh:
            for row in csv.DictReader(fh):
                v = row.get("train/loss") or row.get("train/loss_step")
                if v:
                    points.append((int(row["step"]), float(v)))
    if points:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3), dpi=110)
        ax.plot(*zip(*points))
        ax.set_xlabel("step")
        ax.set_ylabel("train loss (log scale)")
        ax.set_yscale("log")
        ax.set_title("demo training (shapes, CPU)")
        fig.tight_layout()
        fig.savefig(out_png)
        plt.close(fig)
    return points


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/demo", help="output folder (data, training run, evaluation)")
    ap.add_argument("--data-dir", default=None, help="shapes data folder (default: <out>/data)")
    ap.add_argument("--skip-train", action="store_true", help="reuse <out>/train's last checkpoint")
    ap.add_argument("--split", default="test")
    ap.add_argument(
        "--device", default="auto", help="evaluation device: auto (cuda when available), cpu, cuda"
    )
    ap.add_argument("overrides", nargs="*", help="extra train.py overrides, e.g. trainer.max_steps=200")
    args = ap.parse_args(argv)

    from .data.shapes import build_shapes_dataset
    from .evaluation.formats import write_json_atomic
    from .evaluation.metrics import caption_metrics, vqa_accuracy
    from .evaluation.report import metrics_text
    from .evaluation.run import run_eval
    from .evaluation.tasks import summary

    out = Path(args.out).resolve()
    data_dir = Path(args.data_dir).resolve() if args.data_dir else out / "data"
    notes = toolchain_notes()
    for line in notes:
        print(line, flush=True)
    t0 = time.time()
    info = build_shapes_dataset(data_dir, progress=True)
    t_data = time.time() - t0
    print(f"shapes dataset ready in {t_data:.1f}s under {data_dir}", flush=True)

    t1 = time.time()
    if args.skip_train:
        ckpt = sorted((out / "train" / "checkpoints").glob("last*.ckpt"))[-1]
    else:
        ckpt = _train(out, data_dir, args.overrides)
    t_train = time.time() - t1
    curve = _loss_curve(out / "train", out / "loss_curve.png")

    t2 = time.time()
    ev: dict[str, Any] = {}
    for task in ("coco_caption", "vqav2"):
        cfg = {
            "task": task,
            "split": args.split,
            "ckpt_path": str(ckpt),
            "data_dir": str(data_dir),
            "dataset": None,
            "device": args.device,
            "batch_size": 64,
            "num_workers": 0,
            "max_samples": None,
            "prompt": None,
            "report_samples": 8,
            "generation": {
                "coco_caption": {"num_beams": 3, "max_new_tokens": 24},
                "vqav2": {"max_new_tokens": 6},
            },
            "caption_metrics": {"spice": False},
            "print_metrics": False,
        }
        ev[task] = run_eval(cfg, out / "eval" / task)
    t_eval = time.time() - t2

    raw = Path(info["raw"])
    split = args.split
    cap_gt = json.loads((out / "eval" / "coco_caption" / f"captions_{split}_gt.json").read_text())
    vqa_gt = json.loads((out / "eval" / "vqav2" / f"vqa_{split}_annotations.json").read_text())
    vqa_q = json.loads((out / "eval" / "vqav2" / f"vqa_{split}_questions.json").read_text())
    cap_train = json.loads(next(raw.glob("captions_train*.json")).read_text())
    vqa_train = json.loads(next(raw.glob("*_train*_annotations.json")).read_text())
    base = {
        "coco_caption": caption_metrics(caption_baseline(cap_train, cap_gt), cap_gt, spice=False),
        "vqav2": vqa_accuracy(vqa_baseline(vqa_train, vqa_gt), vqa_gt, vqa_q),
    }
    model_rows = {t: {split: summary(t, ev[t]["metrics"])} for t in ev}
    base_rows = {t: {split: summary(t, base[t])} for t in base}
    vqa_model, vqa_base = ev["vqav2"]["metrics"]["overall"], base["vqav2"]["overall"]
    cider_model, cider_base = ev["coco_caption"]["metrics"]["CIDEr"], base["coco_caption"]["CIDEr"]
    checks = {
        f"VQA accuracy >= baseline + {VQA_MARGIN:g}": vqa_model >= vqa_base + VQA_MARGIN,
        f"CIDEr >= {CIDER_FACTOR:g} x baseline": cider_model >= CIDER_FACTOR * cider_base,
    }
    report = {
        "split": split,
        "model": model_rows,
        "baselines": base_rows,
        "checks": checks,
        "seconds": {"data": round(t_data, 1), "train": round(t_train, 1), "eval": round(t_eval, 1)},
        "machine": machine(),
        "notes": notes,
        "checkpoint": str(ckpt),
        "loss_curve": curve[:: max(1, len(curve) // 50)],
    }
    write_json_atomic(report, out / "demo_results.json")
    print()
    print(
        metrics_text(
            model_rows,
            baselines=base_rows,
            title=f"make demo: shapes {split} split (model vs trivial baseline)",
        )
    )
    for name, ok in checks.items():
        print(f"  [{'PASS' if ok else 'FAIL'}] {name}")
    print(
        f"  time: data {t_data:.0f}s, train {t_train:.0f}s, eval {t_eval:.0f}s (train+eval {t_train + t_eval:.0f}s)"
    )
    for line in notes:
        print(f"  {line}")
    print(
        f"  pictures: {out / 'eval' / 'coco_caption'}/samples_*.png, {out / 'eval' / 'vqav2'}/samples_*.png, {out / 'loss_curve.png'}"
    )
    print(f"  results: {out / 'demo_results.json'}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

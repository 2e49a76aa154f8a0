"""Figures from a ``bench_gpu.py`` JSON: one small PNG per topic (each under 200 KB).

    python benchmarks/plot_gpu.py benchmarks/results/bench_gpu_nvidia_h200.json [--out benchmarks/results]

Writes ``<stem>_lm_vs_stock.png`` (training tokens/s, ours vs stock mamba_ssm), ``<stem>_lengths.png``
(VLM vs the transformer peer by total length), ``<stem>_decode.png`` (inter-token latency by
context, decode tokens/s by batch) and ``<stem>_vision.png`` (images/s by resolution). A figure
whose rows are missing from the JSON (a section not run, or skipped) is not drawn.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from records import latest_records  # noqa: E402  (this folder: run as a script)

COLORS = {"ours": "#1f77b4", "stock": "#ff7f0e", "peer": "#2ca02c", "llama": "#d62728"}


def ok(r: dict) -> bool:
    return "skipped" not in r and "error" not in r


def rows(data: dict, latest: bool = True, **kw) -> list[dict]:
    """Measured records matching ``kw``; ``latest``: one per measurement, the latest run's (a merged
    file holds older runs of the same case)."""
    recs = latest_records(data["records"]) if latest else data["records"]
    return [r for r in recs if ok(r) and all(r.get(k) == v for k, v in kw.items())]


def commit_of(data: dict, r: dict) -> str:
    """The commit a record measured: its run's (a merged file keeps one environment per run)."""
    envs = data.get("environments") or [data["environment"]]
    e = envs[r.get("run", 0)] if r.get("run", 0) < len(envs) else data["environment"]
    return ((e.get("git") or {}).get("commit") or "?")[:7]


def subtitle(data: dict) -> str:
    e = data["environment"]
    commits = sorted({commit_of(data, r) for r in data["records"]})
    last = ((data.get("environments") or [e])[-1].get("git") or {}).get("commit", "?")[:7]
    which = f"commit {commits[0]}" if len(commits) == 1 else f"{len(commits)} commits, latest run {last}"
    return (
        f"{e['device_name']}, torch {e['torch']}, mamba_ssm {e['mamba_ssm']}, "
        f"causal_conv1d {e['causal_conv1d']}, {which}"
    )


def save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    size = path.stat().st_size
    print(f"{path} ({size / 1024:.0f} KB)")
    if size > 200 * 1024:
        print(f"WARNING: {path} is over 200 KB")
    return path


def plot_lm_vs_stock(data: dict, out: Path) -> Path | None:
    recs = rows(data, section="lm_vs_stock")
    ssms = sorted({r["ssm"] for r in recs})
    if not ssms:
        return None
    series = [("stock", "unpadded", "stock"), ("ours", "unpadded", "ours"),
              ("stock", "padded_unmasked", "stock, padded (unmasked)"),
              ("ours", "right_padded", "ours, right-padded 1/8"), ("ours", "left_padded", "ours, left-padded 1/8")]  # fmt: skip
    fig, axes = plt.subplots(1, len(ssms), figsize=(5 * len(ssms), 3.4), squeeze=False)
    for ax, ssm in zip(axes[0], ssms):
        lengths = sorted({r["length"] for r in recs if r["ssm"] == ssm})
        w = 0.8 / len(series)
        for j, (who, variant, label) in enumerate(series):
            ys = []
            for L in lengths:
                m = [
                    r
                    for r in recs
                    if r["ssm"] == ssm and r["length"] == L and r["model"] == who and r["variant"] == variant
                ]
                ys.append(m[0]["tokens_per_s"] / 1e3 if m else 0)
            xs = [i + (j - len(series) / 2 + 0.5) * w for i in range(len(lengths))]
            hatch = None if variant == "unpadded" else "//"
            ax.bar(
                xs,
                ys,
                w,
                label=label,
                color=COLORS[who],
                alpha=0.55 if "left" in variant else 1.0,
                hatch=hatch,
            )
        ax.set_xticks(range(len(lengths)), [f"T={L // 1024}K" for L in lengths])
        ax.set_ylabel("train tokens/s (thousands)")
        ax.set_title(f"{ssm}: forward+backward, 32K tokens/step", fontsize=10)
        ax.legend(fontsize=6, loc="lower center", ncol=2, framealpha=0.9)
    fig.suptitle(subtitle(data), fontsize=8)
    return save(fig, out)


def plot_lengths(data: dict, out: Path) -> Path | None:
    recs = rows(data, section="lengths")
    if not recs:
        return None
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.4))
    for who in ("ours", "peer"):
        rs = sorted((r for r in recs if r["model"] == who), key=lambda r: r["length"])
        if not rs:
            continue
        xs = [r["length"] for r in rs]
        a1.plot(
            xs,
            [r["tokens_per_s"] / 1e3 for r in rs],
            "o-",
            color=COLORS[who],
            label=f"{who} ({rs[0]['variant']})",
        )
        a2.plot(xs, [r["median_ms"] / r["batch"] for r in rs], "o-", color=COLORS[who], label=who)
    sc = data.get("summary", {}).get("scaling", {})
    for ax in (a1, a2):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("total length (image + text tokens)")
        ax.legend(fontsize=8)
    a1.set_ylabel("train tokens/s (thousands)")
    a1.set_title("VLM training step, 64K tokens/step", fontsize=10)
    a2.set_yscale("log")
    a2.set_ylabel("ms per sequence")
    exps = sc.get("exponent_ms_per_sequence") or {}
    a2.set_title(
        "time per sequence; slope: " + ", ".join(f"{k} {v:.2f}" for k, v in exps.items() if v), fontsize=9
    )
    fig.suptitle(subtitle(data), fontsize=8)
    return save(fig, out)


def plot_decode(data: dict, out: Path) -> Path | None:
    recs = [r for r in rows(data, latest=False, section="decode") if r.get("itl_ms")]
    if not recs:
        return None
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9.5, 3.4))
    batches = sorted({r["batch"] for r in recs})
    styles = ["o-", "s--", "^:", "d-."]
    # a line joins records of one commit only (a merged file can hold our decoder before and after a
    # change); when ours spans several commits, its labels name them and older ones are drawn faint
    ours = [r for r in recs if r["model"] == "ours"]
    several = len({commit_of(data, r) for r in ours}) > 1
    latest = commit_of(data, max(ours, key=lambda r: r.get("run", 0))) if ours else None

    faint_labelled: set = set()

    def draw(ax, rs, x, y, style, who, label):
        for i, c in enumerate(sorted({commit_of(data, r) for r in rs})):
            part = sorted((r for r in rs if commit_of(data, r) == c), key=lambda r: r[x])
            faint = who == "ours" and several and c != latest
            if faint:  # older commits of ours: faint, one legend entry per axis
                lab = None if ax in faint_labelled else "ours, earlier commits"
                faint_labelled.add(ax)
            else:
                tag = f" @{c}" if who == "ours" and several else ""
                lab = label + tag if tag or i == 0 else None
            ax.plot([r[x] for r in part], [r[y] for r in part], style, color=COLORS[who],
                    alpha=0.25 if faint else 1.0, lw=0.8 if faint else 1.5, label=lab)  # fmt: skip

    for who in ("ours", "stock", "llama"):
        for bi, b in enumerate(batches[:: max(1, len(batches) // 2)] if len(batches) > 2 else batches):
            rs = [r for r in recs if r["model"] == who and r["batch"] == b and r["ssm"] in ("mamba1", "-")]
            if rs:
                draw(a1, rs, "context", "itl_ms", styles[bi % 4], who, f"{who} b={b}")
        ctx = sorted({r["context"] for r in recs})
        for ci, c in enumerate(ctx[:2]):
            rs = [r for r in recs if r["model"] == who and r["context"] == c and r["ssm"] in ("mamba1", "-")]
            if rs:
                draw(a2, rs, "batch", "decode_tokens_per_s", styles[ci], who, f"{who} ctx={c}")
    a1.set_xscale("log", base=2)
    a1.set_yscale("log")
    a1.set_xlabel("context (prompt tokens)")
    a1.set_ylabel("inter-token latency (ms)")
    a1.set_title("decode latency by context (Mamba-1, Llama)", fontsize=10)
    a2.set_xscale("log", base=2)
    a2.set_yscale("log")
    a2.set_xlabel("batch")
    a2.set_ylabel("decode-phase tokens/s")
    a2.set_title("decode throughput by batch", fontsize=10)
    for ax in (a1, a2):
        ax.legend(fontsize=6, ncol=2)
    fig.suptitle(subtitle(data), fontsize=8)
    return save(fig, out)


def plot_vision(data: dict, out: Path) -> Path | None:
    recs = rows(data, section="vision")
    if not recs:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for who in ("ours", "peer"):
        for mode, style in (("train", "o-"), ("inference", "s--")):
            rs = sorted(
                (r for r in recs if r["model"] == who and r["variant"] == mode), key=lambda r: r["resolution"]
            )
            if rs:
                ax.plot([r["resolution"] for r in rs], [r["images_per_s"] for r in rs], style, color=COLORS[who],
                        label=f"{'ours (Vim)' if who == 'ours' else 'peer ViT'} {mode}")  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("image side (px), 16 px patches")
    ax.set_ylabel("images/s")
    ax.set_title("vision encoders", fontsize=10)
    ax.legend(fontsize=7)
    fig.suptitle(subtitle(data), fontsize=7)
    return save(fig, out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("json", type=Path)
    ap.add_argument("--out", type=Path, help="folder for the PNGs (default: next to the JSON)")
    args = ap.parse_args(argv)
    data = json.loads(args.json.read_text())
    out = args.out or args.json.parent
    out.mkdir(parents=True, exist_ok=True)
    stem = args.json.stem
    made = [
        f(data, out / f"{stem}_{name}.png")
        for name, f in (
            ("lm_vs_stock", plot_lm_vs_stock),
            ("lengths", plot_lengths),
            ("decode", plot_decode),
            ("vision", plot_vision),
        )  # fmt: skip
    ]
    print(f"{sum(m is not None for m in made)} figures")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Evaluation reports: sample images with predictions beside references, and metrics tables.

``draw_predictions`` writes a PNG grid (matplotlib, Agg canvas, no pyplot state): each image with
its predicted caption and/or question + predicted answer under it, the references below in grey.
``write_html`` writes the same samples as one self-contained HTML page (images inlined).
``metrics_table`` / ``metrics_text`` lay out ``{task: {split: metrics}}`` with the task and split
on every row, so no number is printed without its split. Files are written atomically.

A sample is a dict:

- ``image``: a PIL image, a path, or an array ``(h, w)``, ``(h, w, c)`` or ``(c, h, w)`` (uint8, or
  float in [0, 1]; un-normalise model inputs first);
- ``title`` (optional; defaults to ``image <image_id>`` when ``image_id`` is given);
- captioning: ``caption`` (predicted) and ``references`` (list of reference captions);
- VQA: ``question``, ``answer`` (predicted) and ``answers`` (the human answers), or ``qa``: a list
  of such ``{"question", "answer", "answers"}`` dicts for several questions about one image.
  The official per-question accuracy is computed and shown beside each answer.
"""

from __future__ import annotations

import base64
import html
import io
import os
import textwrap
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from .formats import write_atomic
from .metrics.vqa import vqa_question_accuracy

__all__ = ["draw_predictions", "metrics_table", "metrics_text", "sample_lines", "write_html"]

# Colours of the report lines: prediction, reference, question, and answer by accuracy.
_COLOURS = {
    "pred": "#1f4e9e",
    "ref": "#6b6b6b",
    "q": "#000000",
    "good": "#1a7f37",
    "part": "#b26b00",
    "bad": "#c0392b",
}

# Metric keys reported on the official VQA 0-100 scale (two decimals); the rest use four.
_VQA_KEYS = {"overall", "perAnswerType", "perQuestionType", "perQuestion"}


# ---------------------------------------------------------------------------------------------
# Samples
# ---------------------------------------------------------------------------------------------


def _to_pil(image: Any, where: str) -> Image.Image:
    """A PIL RGB image from a PIL image, a path, or an array / tensor (see the module docstring)."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, str | os.PathLike):
        path = Path(image)
        if not path.is_file():
            raise FileNotFoundError(f"{where}: image file {str(path)!r} does not exist")
        with Image.open(path) as im:
            return im.convert("RGB")
    if hasattr(image, "detach"):  # a torch tensor
        image = image.detach().cpu().numpy()
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
        arr = arr.transpose(1, 2, 0)  # (c,h,w) -> (h,w,c)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] != 3):
        raise ValueError(f"{where}: 'image' array must be (h,w), (h,w,3) or (3,h,w); got shape {arr.shape}")
    if arr.dtype != np.uint8:
        arr = (np.clip(arr.astype(np.float64), 0.0, 1.0) * 255).round().astype(np.uint8)
    return Image.fromarray(arr).convert("RGB")


def _answer_summary(answers: Sequence[str]) -> str:
    """``"blue x7, red x3"``: the human answers with their counts, most frequent first."""
    return ", ".join(a if n == 1 else f"{a} x{n}" for a, n in Counter(answers).most_common())


def _qa_items(sample: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    items = list(sample.get("qa", []))
    if "question" in sample:
        items.insert(0, {k: sample[k] for k in ("question", "answer", "answers") if k in sample})
    return items


def sample_lines(sample: Mapping[str, Any], max_references: int = 3) -> list[tuple[str, str]]:
    """The text shown for one sample, as ``(kind, text)`` lines; kind picks the colour.

    Kinds: ``pred`` (predicted caption), ``ref`` (reference caption or human answers), ``q``
    (question), ``good`` / ``part`` / ``bad`` (predicted answer with official accuracy 1, in
    (0, 1), or 0).
    """
    lines: list[tuple[str, str]] = []
    if "caption" in sample:
        lines.append(("pred", f"pred: {sample['caption']}"))
    refs = list(sample.get("references", []))
    for ref in refs[:max_references]:
        lines.append(("ref", f"ref: {ref}"))
    if len(refs) > max_references:
        lines.append(("ref", f"(+{len(refs) - max_references} more references)"))
    for qa in _qa_items(sample):
        lines.append(("q", f"Q: {qa.get('question', '')}"))
        answer = qa.get("answer")
        humans = list(qa.get("answers", []))
        if answer is not None:
            if humans:
                acc = vqa_question_accuracy(str(answer), humans)
                kind = "good" if acc >= 1.0 else ("part" if acc > 0 else "bad")
                lines.append((kind, f"A: {answer}  (acc {100 * acc:.0f})"))
            else:
                lines.append(("pred", f"A: {answer}"))
        if humans:
            lines.append(("ref", f"humans: {_answer_summary(humans)}"))
    return lines


def _title(sample: Mapping[str, Any], i: int) -> str:
    if "title" in sample:
        return str(sample["title"])
    if "image_id" in sample:
        return f"image {sample['image_id']}"
    return f"sample {i}"


# ---------------------------------------------------------------------------------------------
# PNG grid
# ---------------------------------------------------------------------------------------------


def draw_predictions(
    samples: Sequence[Mapping[str, Any]],
    path: str | Path,
    columns: int = 4,
    cell_inches: float = 2.6,
    font_size: float = 7.0,
    max_references: int = 3,
    title: str | None = None,
    dpi: int = 110,
) -> Path:
    """Write a PNG grid of sample images with their predictions and references underneath.

    Args:
        samples: sample dicts (see the module docstring).
        path: the PNG to write (atomically; parent folders are created).
        columns: images per row.
        cell_inches: width of one cell and height of its image area.
        font_size: text size in points; lines wrap to the cell width.
        max_references: reference captions shown per image.
        title: a heading over the grid (e.g. the checkpoint and the split).
        dpi: output resolution.

    Returns:
        The path written.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not samples:
        raise ValueError("draw_predictions: no samples to draw")
    if columns < 1:
        raise ValueError(f"draw_predictions: columns must be >= 1, got {columns}")
    path = Path(path)
    images = [_to_pil(s.get("image"), f"samples[{i}]") for i, s in enumerate(samples)]
    # Characters per line: a cell's width over an average glyph width (~0.55 em).
    wrap_chars = max(10, int(cell_inches * 72 / (font_size * 0.55)))
    texts = []
    for s in samples:
        wrapped = []
        for kind, line in sample_lines(s, max_references=max_references):
            for part in textwrap.wrap(line, width=wrap_chars, subsequent_indent="  ") or [""]:
                wrapped.append((kind, part))
        texts.append(wrapped)

    line_h = font_size * 1.3 / 72  # inches per text line
    head_h = font_size * 1.6 / 72  # per-cell title
    pad = 0.15
    rows = [list(range(r, min(r + columns, len(samples)))) for r in range(0, len(samples), columns)]
    row_h = [head_h + cell_inches + pad + line_h * max(len(texts[i]) for i in row) + pad for row in rows]
    title_h = 0.4 if title else 0.0
    fig_w = columns * (cell_inches + pad) + pad
    fig_h = title_h + sum(row_h) + pad

    fig = Figure(figsize=(fig_w, fig_h), dpi=dpi, facecolor="white")
    FigureCanvasAgg(fig)
    if title:
        fig.text(0.5, 1 - 0.2 / fig_h, title, ha="center", va="center", fontsize=font_size + 3, weight="bold")
    top = fig_h - title_h  # inches from the bottom edge to the current row's top
    for row, h in zip(rows, row_h):
        for col, i in enumerate(row):
            left = pad + col * (cell_inches + pad)
            fig.text(
                (left + cell_inches / 2) / fig_w,
                (top - head_h / 2) / fig_h,
                _title(samples[i], i),
                ha="center",
                va="center",
                fontsize=font_size + 1,
                weight="bold",
            )
            ax = fig.add_axes(
                (left / fig_w, (top - head_h - cell_inches) / fig_h, cell_inches / fig_w, cell_inches / fig_h)
            )
            # Aspect kept, centred in the square cell; nearest keeps small synthetic images crisp.
            ax.imshow(np.asarray(images[i]), interpolation="nearest")
            ax.set_axis_off()
            y = top - head_h - cell_inches - pad
            for kind, part in texts[i]:
                fig.text(
                    left / fig_w,
                    y / fig_h,
                    part,
                    ha="left",
                    va="top",
                    fontsize=font_size,
                    color=_COLOURS[kind],
                )
                y -= line_h
        top -= h
    return write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi, facecolor="white"))


# ---------------------------------------------------------------------------------------------
# HTML page
# ---------------------------------------------------------------------------------------------


def write_html(
    samples: Sequence[Mapping[str, Any]],
    path: str | Path,
    title: str = "Predictions",
    max_side: int = 256,
    max_references: int = 5,
) -> Path:
    """Write one self-contained HTML page (images inlined as PNG data URIs) of the samples."""
    if not samples:
        raise ValueError("write_html: no samples to write")
    cards = []
    for i, s in enumerate(samples):
        im = _to_pil(s.get("image"), f"samples[{i}]")
        im.thumbnail((max_side, max_side))
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        data = base64.b64encode(buf.getvalue()).decode("ascii")
        lines = "".join(
            f'<div style="color:{_COLOURS[kind]}">{html.escape(text)}</div>'
            for kind, text in sample_lines(s, max_references=max_references)
        )
        cards.append(
            f'<figure><figcaption class="t">{html.escape(_title(s, i))}</figcaption>'
            f'<img src="data:image/png;base64,{data}" alt="{html.escape(_title(s, i))}">'
            f"<figcaption>{lines}</figcaption></figure>"
        )
    page = (
        "<!doctype html>\n<html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>"
        "body{font-family:sans-serif;margin:1em}"
        ".grid{display:flex;flex-wrap:wrap;gap:1em}"
        f"figure{{margin:0;width:{max_side}px;font-size:12px}}"
        "img{max-width:100%;image-rendering:pixelated}.t{font-weight:bold}"
        f"</style></head><body><h1>{html.escape(title)}</h1>"
        f'<div class="grid">{"".join(cards)}</div></body></html>\n'
    )

    def write(tmp: str) -> None:
        Path(tmp).write_text(page, encoding="utf-8")

    return write_atomic(path, write)


# ---------------------------------------------------------------------------------------------
# Metrics tables
# ---------------------------------------------------------------------------------------------


def _flatten(metrics: Mapping[str, Any], exclude: Sequence[str], prefix: str = "") -> list[tuple[str, Any]]:
    """``{"perAnswerType": {"yes/no": 80.0}}`` -> ``[("perAnswerType[yes/no]", 80.0)]``, in order.

    A ``skipped`` entry ``{"SPICE": reason}`` becomes the row ``("SPICE", "skipped: reason")``.
    """
    rows: list[tuple[str, Any]] = []
    for key, value in metrics.items():
        if key in exclude:
            continue
        if key == "skipped" and isinstance(value, Mapping) and not prefix:
            rows.extend((str(k), f"skipped: {v}") for k, v in value.items())
        elif isinstance(value, Mapping):
            name = f"{prefix}{key}"
            rows.extend(_flatten({f"{name}[{k}]": v for k, v in value.items()}, exclude))
        else:
            rows.append((f"{prefix}{key}", value))
    return rows


def _fmt(metric: str, value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool) or not isinstance(value, int | float | np.number):
        return str(value)
    if isinstance(value, int | np.integer):
        return str(value)
    return f"{value:.2f}" if metric.split("[")[0] in _VQA_KEYS else f"{value:.4f}"


def metrics_table(
    metrics_by_task_and_split: Mapping[str, Mapping[str, Mapping[str, Any]]],
    baselines: Mapping[str, Mapping[str, Mapping[str, Any]]] | None = None,
    title: str | None = "Evaluation",
    exclude: Sequence[str] = ("perQuestion", "perQuestionType"),
) -> Table:
    """A rich table with one row per (task, split, metric): the split stands beside every number.

    Args:
        metrics_by_task_and_split: ``{task: {split: metrics}}``, metrics as ``vqa_accuracy`` /
            ``caption_metrics`` return them (nested dicts become ``perAnswerType[yes/no]`` rows).
        baselines: same structure; adds a ``baseline`` column (blank where a baseline is absent).
        title: the table's title.
        exclude: top-level metric keys left out (the long per-question lists by default).
    """
    table = Table(title=title, box=box.SIMPLE_HEAVY)
    table.add_column("task", style="bold")
    table.add_column("split")
    table.add_column("metric")
    table.add_column("value", justify="right")
    if baselines is not None:
        table.add_column("baseline", justify="right", style="dim")
    for task, by_split in metrics_by_task_and_split.items():
        for split, metrics in by_split.items():
            base = dict(_flatten((baselines or {}).get(task, {}).get(split, {}), exclude))
            for metric, value in _flatten(metrics, exclude):
                cells = [str(task), str(split), metric, _fmt(metric, value)]
                if baselines is not None:
                    cells.append(_fmt(metric, base[metric]) if metric in base else "")
                table.add_row(*(Text(c) for c in cells))  # Text: "[yes/no]" is not rich markup
    return table


def metrics_text(
    metrics_by_task_and_split: Mapping[str, Mapping[str, Mapping[str, Any]]],
    baselines: Mapping[str, Mapping[str, Mapping[str, Any]]] | None = None,
    title: str | None = "Evaluation",
    exclude: Sequence[str] = ("perQuestion", "perQuestionType"),
    width: int = 120,
) -> str:
    """``metrics_table`` rendered as plain ASCII text (no colour codes), for logs and READMEs."""
    table = metrics_table(metrics_by_task_and_split, baselines=baselines, title=title, exclude=exclude)
    table.box = box.ASCII
    console = Console(
        file=io.StringIO(), width=width, color_system=None, force_terminal=False, legacy_windows=False
    )
    console.print(table)
    return console.file.getvalue()

"""Report outputs: the PNG grid and HTML page are written (atomically) and show what they should;
the metrics table puts the split beside every number."""

from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image

from vlm_mamba.evaluation.report import (
    draw_predictions,
    metrics_table,
    metrics_text,
    sample_lines,
    write_html,
)


def _samples(tmp_path):
    rng = np.random.default_rng(0)
    png = tmp_path / "shape.png"
    Image.fromarray((rng.random((40, 30, 3)) * 255).astype(np.uint8)).save(png)
    return [
        {
            "image": Image.new("RGB", (64, 48), (200, 30, 30)),
            "image_id": 11,
            "caption": "a red circle to the left of a blue square, with enough words to need wrapping",
            "references": ["a red circle", "red circle left of a blue square", "one", "two"],
        },
        {
            "image": png,
            "question": "What color is the square?",
            "answer": "Red",
            "answers": ["red"] * 3 + ["blue"] * 7,
        },
        {
            "image": rng.random((3, 32, 32)).astype(np.float32),  # (c,h,w) float in [0, 1]
            "title": "<b>escaped</b>",
            "qa": [
                {"question": "Is it red?", "answer": "Yes", "answers": ["yes"] * 10},
                {"question": "How many?", "answer": "2", "answers": ["2"] * 10},
            ],
        },
    ]


def test_sample_lines_show_predictions_references_and_official_accuracy(tmp_path):
    caption, vqa, multi = _samples(tmp_path)
    assert sample_lines(caption, max_references=2) == [
        ("pred", f"pred: {caption['caption']}"),
        ("ref", "ref: a red circle"),
        ("ref", "ref: red circle left of a blue square"),
        ("ref", "(+2 more references)"),
    ]
    assert sample_lines(vqa) == [
        ("q", "Q: What color is the square?"),
        ("part", "A: Red  (acc 90)"),
        ("ref", "humans: blue x7, red x3"),
    ]
    kinds = [kind for kind, _ in sample_lines(multi)]
    assert kinds == ["q", "bad", "ref", "q", "good", "ref"]  # unanimous "yes" vs "Yes" scores 0


def test_draw_predictions_writes_a_png_grid(tmp_path):
    out_dir = tmp_path / "report"
    path = draw_predictions(_samples(tmp_path), out_dir / "samples.png", columns=2, cell_inches=2.0, dpi=50)
    assert path == out_dir / "samples.png" and path.stat().st_size > 1000
    with Image.open(path) as im:
        assert im.format == "PNG"
        width, height = im.size
        pixels = np.asarray(im.convert("RGB"))
    assert width == round((2 * (2.0 + 0.15) + 0.15) * 50)  # two columns of cells
    assert height > 2 * 2.0 * 50  # two rows of images plus their text
    assert (pixels == [200, 30, 30]).all(axis=-1).sum() > 500  # the red sample image is drawn
    assert [p.name for p in out_dir.iterdir()] == ["samples.png"]  # no temp file left


def test_draw_predictions_errors_name_the_sample(tmp_path):
    with pytest.raises(ValueError, match="no samples"):
        draw_predictions([], tmp_path / "x.png")
    with pytest.raises(FileNotFoundError, match=r"samples\[0\]: image file .*missing\.png"):
        draw_predictions([{"image": tmp_path / "missing.png"}], tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"samples\[0\]: 'image' array must be .* got shape \(4, 5, 6, 7\)"):
        draw_predictions([{"image": np.zeros((4, 5, 6, 7))}], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_write_html_is_self_contained_and_escaped(tmp_path):
    path = write_html(_samples(tmp_path), tmp_path / "samples.html", title="val split")
    text = path.read_text()
    assert text.count('<img src="data:image/png;base64,') == 3
    assert "&lt;b&gt;escaped&lt;/b&gt;" in text and "<b>escaped</b>" not in text
    assert "A: Red  (acc 90)" in text and "<title>val split</title>" in text


METRICS = {
    "vqav2": {
        "val": {
            "overall": 72.2222,
            "perAnswerType": {"yes/no": 50.0, "number": 66.67},
            "perQuestion": {1: 0.0},
        }
    },
    "coco_caption": {
        "test": {"Bleu_4": 0.62364, "CIDEr": 3.0052, "skipped": {"SPICE": "jars [missing]"}},
        "val": {"CIDEr": 2.5},
    },
}


def test_metrics_text_puts_the_split_beside_every_number():
    text = metrics_text(
        METRICS, baselines={"vqav2": {"val": {"overall": 20.0}}, "coco_caption": {"test": {"CIDEr": 0.5}}}
    )
    rows = [
        [c.strip() for c in line.strip("|").split("|")] for line in text.splitlines() if line.startswith("| ")
    ]
    header, body = rows[0], rows[1:]
    assert header == ["task", "split", "metric", "value", "baseline"]
    assert [r[:3] for r in body] == [
        ["vqav2", "val", "overall"],
        ["vqav2", "val", "perAnswerType[yes/no]"],  # brackets survive (not taken as rich markup)
        ["vqav2", "val", "perAnswerType[number]"],
        ["coco_caption", "test", "Bleu_4"],
        ["coco_caption", "test", "CIDEr"],
        ["coco_caption", "test", "SPICE"],
        ["coco_caption", "val", "CIDEr"],
    ]
    for row in body:
        if re.fullmatch(r"[\d.]+", row[3]):
            assert row[1] in ("val", "test")
    assert body[0][3:] == ["72.22", "20.00"]  # VQA on its 0-100 scale, two decimals
    assert body[3][3:] == ["0.6236", ""]  # caption metrics on pycocoevalcap's scale
    assert body[4][3:] == ["3.0052", "0.5000"]
    assert body[5][3] == "skipped: jars [missing]"
    assert "perQuestion" not in text and "\x1b[" not in text  # excluded by default; no colour codes


def test_metrics_table_is_a_rich_table_without_baseline_column():
    table = metrics_table(METRICS, title="demo")
    assert [c.header for c in table.columns] == ["task", "split", "metric", "value"]
    assert table.row_count == 7 and table.title == "demo"

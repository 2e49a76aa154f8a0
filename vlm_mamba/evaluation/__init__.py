"""Evaluation: decode, write official results files, score with the official metrics, report.

    tasks.py      predict batches, official records, gather over ranks, ground truth, scoring
    metrics/      vqa.py (the official VQAv2 accuracy), captions.py (pycocoevalcap, METEOR's process)
    formats.py    official file formats: reading, validation with errors naming the record, atomic writes
    report.py     tables and pictures of predictions
    run.py        what ``evaluate.py`` calls: eval / score / predict modes

Imports run one way: ``evaluation`` may import ``data`` (it builds the DataModules) and ``models``,
never ``training`` (``tests/test_layout.py``). The names below are importable from here as well
(lazily).
"""

from __future__ import annotations

import importlib
from typing import Any

_NAMES = {
    "run_eval": "run",
    "run_score": "run",
    "run_predict": "run",
    "load_model": "run",
    "resolve_device": "run",
    "build_datamodule": "run",
    "user_errors": "run",
    "TASKS": "run",
    "collect_predictions": "tasks",
    "predict_batch": "tasks",
    "decode_rows": "tasks",
    "eval_records": "tasks",
    "gather": "tasks",
    "caption_ground_truth": "tasks",
    "vqa_ground_truth": "tasks",
    "score": "tasks",
    "summary": "tasks",
}

__all__ = sorted(_NAMES)


def __getattr__(name: str) -> Any:
    if name in _NAMES:
        return getattr(importlib.import_module(f"{__name__}.{_NAMES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

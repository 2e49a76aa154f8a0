"""The official VQAv2 accuracy.

VQAv2 accuracy mirrors the official evaluator, GT-Vision-Lab/VQA
``PythonEvaluationTools/vqaEvaluation/vqaEval.py`` at commit a013f00 (2021-03-11, "Fixed
processing answers bug"), with its lookup tables copied verbatim into
``vlm_mamba/resources/vqa_eval_tables.json``:

1. newlines and tabs become spaces and the ten human answers and the prediction are stripped;
2. only if the ten (stripped) human answers are not all identical are they and the prediction
   normalised: ``processPunctuation`` then ``processDigitArticle``;
3. each human answer scores ``min(1, #matches among the other nine / 3)``; the question scores the
   mean of the ten;
4. ``overall`` / ``perAnswerType`` / ``perQuestionType`` are means over questions, times 100,
   rounded to two decimals at the end.
"""

from __future__ import annotations

import functools
import json
import logging
import re
from collections.abc import Mapping, Sequence
from importlib.resources import files
from pathlib import Path
from typing import Any

from ..formats import (
    AnnotationError,
    ResultsError,
    _ids_text,
    load_results,
    load_vqa_annotations,
    load_vqa_questions,
    validate_vqa_results,
    vqa_annotation_index,
    vqa_question_ids,
)

__all__ = [
    "normalize_vqa_answer",
    "process_digit_article",
    "process_punctuation",
    "score_vqa_files",
    "vqa_accuracy",
    "vqa_question_accuracy",
]

log = logging.getLogger(__name__)

# =============================================================================================
# VQAv2 accuracy
# =============================================================================================


def _load_vqa_tables() -> dict[str, Any]:
    """The official evaluator's tables (contractions, manualMap, articles, punct), as shipped."""
    text = files("vlm_mamba").joinpath("resources/vqa_eval_tables.json").read_text(encoding="utf-8")
    return json.loads(text)


_TABLES = _load_vqa_tables()
CONTRACTIONS: dict[str, str] = _TABLES["contractions"]  # 120 entries; keys with capitals never match
MANUAL_MAP: dict[str, str] = _TABLES["manualMap"]  # number words -> digits ("none" -> "0")
ARTICLES: frozenset[str] = frozenset(_TABLES["articles"])  # a, an, the
PUNCT: tuple[str, ...] = tuple(_TABLES["punct"])  # 21 characters; no "." and no "'"

# The official regexes, verbatim. ``(?!<=\d)`` is a negative *lookahead* for the text "<=digit"
# (a typo for a lookbehind), so it never blocks a match at a ".": periodStrip deletes every "."
# that is not followed by a digit.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")
# vqaEval.py calls ``periodStrip.sub("", outText, re.UNICODE)``: the flag lands in the ``count``
# argument, so at most re.UNICODE == 32 periods are deleted.
_PERIOD_STRIP_COUNT = int(re.UNICODE)


def process_punctuation(text: str) -> str:
    """``VQAEval.processPunctuation``: drop or space out punctuation, then strip periods.

    For each listed character: delete it if it stands before or after a space in the *input*, or
    if the input contains digit-comma-digit anywhere; otherwise replace it with a space. Then delete
    each "." not followed by a digit (at most 32).
    """
    digit_comma = _COMMA_STRIP.search(text) is not None
    out = text
    for p in PUNCT:
        if (p + " " in text or " " + p in text) or digit_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, count=_PERIOD_STRIP_COUNT)


def process_digit_article(text: str) -> str:
    """``VQAEval.processDigitArticle``: lowercase, number words to digits, drop articles, contractions."""
    words = []
    for word in text.lower().split():
        word = MANUAL_MAP.get(word, word)
        if word not in ARTICLES:
            words.append(word)
    return " ".join(CONTRACTIONS.get(word, word) for word in words)


@functools.lru_cache(maxsize=1 << 16)  # answers repeat a lot; a pure function of the string
def normalize_vqa_answer(text: str) -> str:
    """Full normalisation applied to non-unanimous questions: punctuation, then digits/articles."""
    return process_digit_article(process_punctuation(text))


def _clean(text: str) -> str:
    """The step applied to every answer and prediction: newline/tab to space, strip."""
    return text.replace("\n", " ").replace("\t", " ").strip()


def vqa_question_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """Official accuracy of one prediction against the human answers, in [0, 1].

    Each human answer ``i`` scores ``min(1, #{j != i : answers[j] == prediction} / 3)``; the result is
    their mean (the average over all 10-choose-9 subsets of annotators). The official code excludes
    every answer *dict* equal to the current one; VQAv2 dicts carry distinct ``answer_id``s, so that
    is exactly "the other nine" used here.

    Args:
        prediction: the model's answer string.
        answers: the human answers (ten in VQAv2).
    """
    if not answers:
        raise ValueError("vqa_question_accuracy: no human answers to score against")
    gts = [_clean(a) for a in answers]
    pred = _clean(prediction)
    if len(set(gts)) > 1:  # the 2021 fix: unanimous answers are compared verbatim
        gts = [normalize_vqa_answer(a) for a in gts]
        pred = normalize_vqa_answer(pred)
    scores = []
    for i in range(len(gts)):
        matches = sum(1 for j, a in enumerate(gts) if j != i and a == pred)
        scores.append(min(1, float(matches) / 3))
    return float(sum(scores)) / len(scores)


def _percent(values: list[float], ndigits: int = 2) -> float:
    """The official ``round(100 * float(sum(acc)) / len(acc), n)``, summed in evaluation order."""
    return round(100 * float(sum(values)) / len(values), ndigits)


def vqa_accuracy(
    results: Sequence[Mapping[str, Any]],
    annotations: Mapping[str, Any],
    questions: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """VQAv2 accuracy of a results list, as the official evaluator computes it (0-100, two decimals).

    Args:
        results: ``[{"question_id": int, "answer": str}]``, every question of the split once.
        annotations: the official annotations dict (``{"annotations": [...]}``).
        questions: the official questions dict; if given, its question ids must be the annotations'.

    Returns:
        ``{"overall": float, "perAnswerType": {type: float}, "perQuestionType": {type: float},
        "perQuestion": {question_id: float}}`` (``perQuestion`` is the official ``evalQA``).

    Raises:
        AnnotationError: malformed annotations/questions, or questions that do not match them.
        ResultsError: unknown, duplicate or missing question ids, or non-string answers.
    """
    index = vqa_annotation_index(annotations)
    if questions is not None:
        qids = vqa_question_ids(questions)
        not_annotated = [q for q in qids if q not in index]
        qset = set(qids)
        not_asked = [q for q in index if q not in qset]
        if not_annotated or not_asked:
            parts = []
            if not_annotated:
                parts.append(f"question_ids without annotation: {_ids_text(not_annotated)}")
            if not_asked:
                parts.append(f"annotated question_ids missing from the questions: {_ids_text(not_asked)}")
            raise AnnotationError("VQA questions and annotations are not the same split: " + "; ".join(parts))
    predictions = validate_vqa_results(results, index.keys())

    overall: list[float] = []
    per_answer_type: dict[str, list[float]] = {}
    per_question_type: dict[str, list[float]] = {}
    per_question: dict[int, float] = {}
    for qid, ann in index.items():  # annotation order, like the official getQuesIds()
        acc = vqa_question_accuracy(predictions[qid], [a["answer"] for a in ann["answers"]])
        overall.append(acc)
        per_question_type.setdefault(ann["question_type"], []).append(acc)
        per_answer_type.setdefault(ann["answer_type"], []).append(acc)
        per_question[qid] = round(100 * acc, 2)
    return {
        "overall": _percent(overall),
        "perAnswerType": {k: _percent(v) for k, v in per_answer_type.items()},
        "perQuestionType": {k: _percent(v) for k, v in per_question_type.items()},
        "perQuestion": per_question,
    }


def score_vqa_files(
    results_path: str | Path, annotations_path: str | Path, questions_path: str | Path | None = None
) -> dict[str, Any]:
    """Score-only mode: VQAv2 accuracy of a results file against the official annotation files."""
    annotations = load_vqa_annotations(annotations_path)
    questions = load_vqa_questions(questions_path) if questions_path is not None else None
    results = load_results(results_path)
    try:
        return vqa_accuracy(results, annotations, questions)
    except ResultsError as e:
        raise ResultsError(f"results file {str(results_path)!r}: {e}") from e
    except AnnotationError as e:
        raise AnnotationError(f"{annotations_path} vs {questions_path}: {e}") from e

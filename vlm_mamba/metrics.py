"""Official evaluation metrics: VQAv2 accuracy and the COCO caption metrics.

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

Caption metrics call pycocoevalcap's PTB tokenizer and its Bleu(4), Meteor, Rouge and Cider
scorers directly, as ``COCOEvalCap.evaluate`` does, without constructing ``COCOEvalCap`` (which
builds SPICE, whose first use downloads Stanford CoreNLP). SPICE runs only when its CoreNLP jars
are already in pycocoevalcap's ``spice/lib``. The tokenizer and METEOR are Java programs (Java 17 on
this project's machines).
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import logging
import re
import shutil
import subprocess
import threading
from collections.abc import Mapping, Sequence
from importlib.resources import files
from pathlib import Path
from typing import Any

from vlm_mamba.results import (
    AnnotationError,
    ResultsError,
    _ids_text,
    caption_references,
    load_caption_annotations,
    load_results,
    load_vqa_annotations,
    load_vqa_questions,
    validate_caption_results,
    validate_vqa_results,
    vqa_annotation_index,
    vqa_question_ids,
)

__all__ = [
    "CAPTION_METRICS",
    "CaptionMetricError",
    "JavaNotFoundError",
    "caption_metrics",
    "normalize_vqa_answer",
    "process_digit_article",
    "process_punctuation",
    "score_caption_files",
    "score_captions",
    "score_vqa_files",
    "spice_unavailable_reason",
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


# =============================================================================================
# Caption metrics (pycocoevalcap)
# =============================================================================================

CAPTION_METRICS: tuple[str, ...] = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")

# Default wall-clock limit for METEOR's Java process; its real cost is ~5 s start-up (loading the
# paraphrase table) plus a few ms per image.
METEOR_TIMEOUT_S = 900.0

# Characters a Java line reader may treat as line breaks. pycocoevalcap only replaces "\n"; any of
# these left in a caption would shift every later tokenized line onto the wrong image.
_LINE_BREAKS = re.compile("[\r\n\v\f\x1c\x1d\x1e\x85\u2028\u2029]")


class JavaNotFoundError(RuntimeError):
    """No ``java`` executable: pycocoevalcap's PTB tokenizer and METEOR are Java programs."""


class CaptionMetricError(RuntimeError):
    """A pycocoevalcap Java scorer failed, hung or returned output that does not line up."""


def _require_java() -> None:
    if shutil.which("java") is None:
        raise JavaNotFoundError(
            "caption metrics need Java (Java 17 on this project's machines) on PATH: pycocoevalcap's PTB "
            "tokenizer (stanford-corenlp-3.4.1.jar) and METEOR (meteor-1.5.jar) run as Java programs. "
            "Install a JRE, e.g. `apt-get install openjdk-17-jre-headless`."
        )


def spice_unavailable_reason() -> str | None:
    """Why SPICE cannot run offline, or None when its Stanford CoreNLP jars are present."""
    from pycocoevalcap.spice import get_stanford_models as gsm

    lib = Path(gsm.SPICEDIR) / gsm.SPICELIB
    missing = [name for name in (f"{gsm.JAR}.jar", f"{gsm.JAR}-models.jar") if not (lib / name).is_file()]
    if missing:
        return (
            f"Stanford CoreNLP jars not found in {lib} ({', '.join(missing)}); pycocoevalcap downloads them "
            "on first use, which needs the internet (run "
            "`python -c 'from pycocoevalcap.spice.get_stanford_models import get_stanford_models as g; g()'` "
            "once online)"
        )
    return None


def _tokenize(captions: Mapping[int, Sequence[str]], what: str) -> dict[int, list[str]]:
    """pycocoevalcap's PTBTokenizer on ``{id: [caption, ...]}``, checked to line up one-to-one."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    payload = {k: [{"caption": _LINE_BREAKS.sub(" ", c)} for c in v] for k, v in captions.items()}
    tokenized = PTBTokenizer().tokenize(payload)
    bad = [k for k, v in captions.items() if len(tokenized.get(k, ())) != len(v)]
    if bad:
        raise CaptionMetricError(
            f"PTB tokenizer output does not line up with the {what} for image_ids {_ids_text(bad)} "
            "(did the java process fail? see its stderr above)"
        )
    return tokenized


def _close_meteor(scorer: Any) -> str:
    """Stop METEOR's Java process; return the tail of its stderr.

    A failed ``compute_score`` leaves ``scorer.lock`` held, and ``Meteor.__del__`` acquires that lock,
    which would hang the interpreter at garbage collection; release it here.
    """
    if scorer.lock.locked():
        scorer.lock.release()
    proc = scorer.meteor_p
    with contextlib.suppress(OSError, ValueError):
        proc.stdin.close()
    proc.kill()
    proc.wait()
    err = b""
    with contextlib.suppress(OSError, ValueError):
        err = proc.stderr.read()
    for stream in (proc.stdout, proc.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.close()
    return err.decode("utf-8", errors="replace")[-2000:]


def _meteor(
    gts: dict[int, list[str]], res: dict[int, list[str]], timeout_s: float | None
) -> tuple[float, list]:
    """pycocoevalcap ``Meteor().compute_score`` under a wall-clock limit, always cleaned up.

    The scorer talks to ``java -jar meteor-1.5.jar -stdio`` line by line; if the process dies or
    stalls, its ``readline`` blocks or fails. It runs in a worker thread here: on timeout the Java
    process is killed (which unblocks the reader) and a CaptionMetricError names the limit.
    """
    from pycocoevalcap.meteor.meteor import Meteor

    scorer = Meteor()
    outcome: dict[str, Any] = {}

    def work() -> None:
        try:
            outcome["value"] = scorer.compute_score(gts, res)
        except BaseException as e:  # reported in the calling thread
            outcome["error"] = e

    worker = threading.Thread(target=work, name="meteor", daemon=True)
    worker.start()
    worker.join(timeout_s)
    timed_out = worker.is_alive()
    if timed_out:
        scorer.meteor_p.kill()
        worker.join(30)
    stderr = _close_meteor(scorer)
    if timed_out:
        raise CaptionMetricError(
            f"METEOR (java -jar meteor-1.5.jar) gave no answer within {timeout_s} s for {len(res)} images; "
            f"killed. stderr tail: {stderr!r}"
        )
    if "error" in outcome:
        raise CaptionMetricError(
            f"METEOR failed: {outcome['error']!r}; java stderr tail: {stderr!r}"
        ) from outcome["error"]
    return outcome["value"]


def score_captions(
    references: Mapping[int, Sequence[str]],
    predictions: Mapping[int, str],
    metrics: Sequence[str] | None = None,
    spice: bool = True,
    meteor_timeout_s: float | None = METEOR_TIMEOUT_S,
) -> dict[str, Any]:
    """pycocoevalcap scores of ``predictions`` against ``references`` over the predictions' ids.

    The same calls as ``COCOEvalCap.evaluate``: PTB-tokenize the references and the predictions
    (two tokenizer runs, as there), then each scorer's ``compute_score(gts, res)``.

    Args:
        references: ``{image_id: [reference captions]}``; the order of its keys is the scoring order.
        predictions: ``{image_id: caption}``; every key must be in ``references``.
        metrics: a subset of ``CAPTION_METRICS`` (e.g. ``["CIDEr"]`` during validation); all if None.
            METEOR is the slow one (~5 s of Java start-up).
        spice: also compute SPICE when its CoreNLP jars are present.
        meteor_timeout_s: wall-clock limit for METEOR; None waits forever.

    Returns:
        ``{"Bleu_1": .., "Bleu_2": .., "Bleu_3": .., "Bleu_4": .., "METEOR": .., "ROUGE_L": ..,
        "CIDEr": .., ["SPICE": ..]}`` on pycocoevalcap's scale (not times 100), plus
        ``"skipped": {"SPICE": reason}`` when SPICE was not computed.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    wanted = list(CAPTION_METRICS if metrics is None else metrics)
    unknown = [m for m in wanted if m not in CAPTION_METRICS]
    if unknown:
        raise ValueError(f"score_captions: unknown metrics {unknown}; choose from {list(CAPTION_METRICS)}")
    ids = [k for k in references if k in predictions]
    stray = [k for k in predictions if k not in references]
    if stray:
        raise ResultsError(f"predictions for image_ids without references: {_ids_text(stray)}")
    if not ids:
        raise ResultsError("no predictions to score")
    _require_java()

    gts = _tokenize({k: list(references[k]) for k in ids}, "references")
    res = _tokenize({k: [predictions[k]] for k in ids}, "predictions")

    out: dict[str, Any] = {}
    if any(m.startswith("Bleu_") for m in wanted):
        with contextlib.redirect_stdout(io.StringIO()):  # Bleu prints its n-gram statistics
            bleu, _ = Bleu(4).compute_score(gts, res)
        out.update({f"Bleu_{n + 1}": float(b) for n, b in enumerate(bleu)})
    if "METEOR" in wanted:
        out["METEOR"] = float(_meteor(gts, res, meteor_timeout_s)[0])
    if "ROUGE_L" in wanted:
        out["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
    if "CIDEr" in wanted:
        out["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    out = {m: out[m] for m in wanted}  # official key order, only what was asked for

    reason = spice_unavailable_reason() if spice else "disabled (spice=False)"
    if reason is None:
        from pycocoevalcap.spice.spice import Spice

        try:
            out["SPICE"] = float(Spice().compute_score(gts, res)[0])
        except (subprocess.CalledProcessError, OSError, ValueError) as e:
            reason = f"SPICE failed: {e!r}"
            log.warning("SPICE skipped: %s", reason)
    if reason is not None:
        out["skipped"] = {"SPICE": reason}
    return out


def caption_metrics(
    results: Sequence[Mapping[str, Any]],
    annotations: Mapping[str, Any],
    allow_partial: bool = False,
    spice: bool = True,
    meteor_timeout_s: float | None = METEOR_TIMEOUT_S,
) -> dict[str, Any]:
    """COCO caption metrics of a results list, as ``COCOEvalCap`` reports them (without SPICE offline).

    Args:
        results: ``[{"image_id": int, "caption": str}]``, one caption per image.
        annotations: the COCO captions annotations dict (``{"images": [...], "annotations": [...]}``).
        allow_partial: score only the captioned images instead of requiring every image.
        spice, meteor_timeout_s: see ``score_captions``.

    Returns:
        ``{"Bleu_1".."Bleu_4", "METEOR", "ROUGE_L", "CIDEr", ["SPICE"], ["skipped"]}``.

    Raises:
        AnnotationError / ResultsError: malformed input; errors name the offending ids.
        JavaNotFoundError: no ``java`` on PATH.
        CaptionMetricError: a Java scorer failed or hung.
    """
    references = caption_references(annotations)
    predictions = validate_caption_results(results, references.keys(), allow_partial=allow_partial)
    return score_captions(references, predictions, spice=spice, meteor_timeout_s=meteor_timeout_s)


def score_caption_files(
    results_path: str | Path, annotations_path: str | Path, allow_partial: bool = False, spice: bool = True
) -> dict[str, Any]:
    """Score-only mode: caption metrics of a results file against a COCO captions annotations file."""
    annotations = load_caption_annotations(annotations_path)
    results = load_results(results_path)
    try:
        return caption_metrics(results, annotations, allow_partial=allow_partial, spice=spice)
    except ResultsError as e:
        raise ResultsError(f"results file {str(results_path)!r}: {e}") from e

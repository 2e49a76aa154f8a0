"""Caption metrics: pycocoevalcap's BLEU, METEOR, ROUGE-L, CIDEr (and SPICE when available).

Caption metrics call pycocoevalcap's PTB tokenizer and its Bleu(4), Meteor, Rouge and Cider
scorers directly, as ``COCOEvalCap.evaluate`` does, without constructing ``COCOEvalCap`` (which
builds SPICE, whose first use downloads Stanford CoreNLP). SPICE runs only when its CoreNLP jars
are already in pycocoevalcap's ``spice/lib``. The tokenizer and METEOR are Java programs (Java 17 on
this project's machines).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..formats import (
    ResultsError,
    _ids_text,
    caption_references,
    load_caption_annotations,
    load_results,
    validate_caption_results,
)

__all__ = [
    "CAPTION_METRICS",
    "CaptionMetricError",
    "JavaNotFoundError",
    "caption_metrics",
    "score_caption_files",
    "score_captions",
    "spice_unavailable_reason",
]

log = logging.getLogger(__name__)

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


# The one line the tokenizer's Java process writes to stderr on success, once per call (four per
# caption evaluation): not an error, and printed across the progress bar; dropped.
_PTB_SUMMARY = re.compile(r"PTBTokenizer tokenized \d+ tokens at [\d.]+ tokens per second\.")


@contextlib.contextmanager
def _tokenizer_stderr():
    """Capture file descriptor 2 (which pycocoevalcap's tokenizer subprocess inherits) while it runs.

    Yields a list that, on exit, holds the captured lines other than the success summary; those are
    written back to stderr, so a Java error is still seen. Without a usable fd 2, captures nothing.
    """
    kept: list[str] = []
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield kept
        return
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield kept
        finally:
            with contextlib.suppress(OSError, ValueError):
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            text = tmp.read().decode("utf-8", errors="replace")
            kept += [ln for ln in text.splitlines() if ln.strip() and not _PTB_SUMMARY.fullmatch(ln.strip())]
            if kept:
                sys.stderr.write("\n".join(kept) + "\n")
                sys.stderr.flush()


def _tokenize(captions: Mapping[int, Sequence[str]], what: str) -> dict[int, list[str]]:
    """pycocoevalcap's PTBTokenizer on ``{id: [caption, ...]}``, checked to line up one-to-one."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    payload = {k: [{"caption": _LINE_BREAKS.sub(" ", c)} for c in v] for k, v in captions.items()}
    with _tokenizer_stderr() as java_stderr:
        tokenized = PTBTokenizer().tokenize(payload)
    bad = [k for k, v in captions.items() if len(tokenized.get(k, ())) != len(v)]
    if bad:
        tail = "\n".join(java_stderr)[-2000:] or "(nothing)"
        raise CaptionMetricError(
            f"PTB tokenizer output does not line up with the {what} for image_ids {_ids_text(bad)}; "
            f"java stderr: {tail}"
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

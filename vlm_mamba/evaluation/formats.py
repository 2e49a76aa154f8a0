"""Official annotation / results files: loading, validation before scoring, atomic writing.

The formats are those of the public datasets and evaluators (``shared/reference/FORMATS.md``):

- COCO captions annotations ``{"images": [{"id"}], "annotations": [{"image_id", "caption"}]}``;
  results ``[{"image_id": int, "caption": str}]``, one caption per image (what pycocotools'
  ``COCO.loadRes`` reads).
- VQAv2 annotations ``{"annotations": [{"question_id", "question_type", "answer_type",
  "answers": [{"answer"}] * 10}]}``, questions ``{"questions": [{"question_id", "image_id",
  "question"}]}``; results ``[{"question_id": int, "answer": str}]``, every question of the split
  exactly once (the official ``VQA.loadRes`` asserts this).

Readers tolerate extra keys (``info``, ``licenses``, ``answer_confidence``, ...), as the official
tools do. Every error names the file (or the ``source`` label given for in-memory data), the record
and the field; errors about ids name the first few offending ids and how many there are.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "AnnotationError",
    "ResultsError",
    "caption_references",
    "load_caption_annotations",
    "load_results",
    "load_vqa_annotations",
    "load_vqa_questions",
    "read_json",
    "validate_caption_results",
    "validate_vqa_results",
    "vqa_annotation_index",
    "vqa_question_ids",
    "write_atomic",
    "write_json_atomic",
    "write_metrics",
    "write_results",
]

# How many offending ids an error message lists before "...".
_SHOW_IDS = 5


class ResultsError(ValueError):
    """A results file (or list) that the official scorers would refuse or mis-score."""


class AnnotationError(ValueError):
    """An annotation or question file lacking a field or record the scorers need."""


def _ids_text(ids: Iterable[Any], limit: int = _SHOW_IDS) -> str:
    """``"3 (1, 2, 3)"`` or ``"120 (first 5: 1, 2, 3, 4, 5, ...)"``: count, then the first ids."""
    ids = list(ids)
    shown = ", ".join(repr(i) for i in ids[:limit])
    if len(ids) <= limit:
        return f"{len(ids)} ({shown})"
    return f"{len(ids)} (first {limit}: {shown}, ...)"


def _is_id(value: Any) -> bool:
    """COCO / VQAv2 ids are JSON integers; bool is an int subclass in Python but not an id."""
    return isinstance(value, int) and not isinstance(value, bool)


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def read_json(path: str | Path, *, what: str, error: type[ValueError] = AnnotationError) -> Any:
    """Parse a JSON file; a missing file or bad JSON raises ``error`` naming ``what`` and the path."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} file {str(path)!r} does not exist (or is not a file)")
    try:
        with path.open("r", encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise error(f"{what} file {str(path)!r} is not valid JSON: {e}") from e
    except UnicodeDecodeError as e:
        raise error(f"{what} file {str(path)!r} is not UTF-8 text: {e}") from e


def _records(obj: Any, key: str, source: str) -> list[Any]:
    """``obj[key]`` checked to be a list (the top-level shape of every official annotation file)."""
    if not isinstance(obj, Mapping):
        raise AnnotationError(
            f"{source}: expected a JSON object with a {key!r} list, got {type(obj).__name__}"
        )
    if key not in obj:
        raise AnnotationError(f"{source}: missing top-level field {key!r} (keys present: {sorted(obj)})")
    records = obj[key]
    if not isinstance(records, list):
        raise AnnotationError(f"{source}: field {key!r} must be a list, got {type(records).__name__}")
    return records


def _field(record: Any, key: str, kind: type | tuple[type, ...], where: str, error=AnnotationError) -> Any:
    """``record[key]`` checked for presence and type; ids (int) reject bool."""
    if not isinstance(record, Mapping):
        raise error(f"{where}: expected a JSON object, got {type(record).__name__}: {record!r:.80}")
    if key not in record:
        raise error(f"{where}: missing field {key!r}")
    value = record[key]
    ok = _is_id(value) if kind is int else isinstance(value, kind)
    if not ok:
        name = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise error(f"{where}: field {key!r} must be {name}, got {type(value).__name__}: {value!r:.80}")
    return value


def vqa_annotation_index(annotations: Mapping[str, Any], source: str = "VQA annotations") -> dict[int, dict]:
    """Validate an official VQAv2 annotations dict; return ``{question_id: annotation}`` in file order.

    The order is the file's, like the official ``VQA.getQuesIds()``, so the float sums in the
    accuracy means run in the same order as the official evaluator's.
    """
    index: dict[int, dict] = {}
    duplicates: list[int] = []
    for i, ann in enumerate(_records(annotations, "annotations", source)):
        where = f"{source}: annotations[{i}]"
        qid = _field(ann, "question_id", int, where)
        where = f"{where} (question_id {qid})"
        _field(ann, "question_type", str, where)
        _field(ann, "answer_type", str, where)
        answers = _field(ann, "answers", list, where)
        if not answers:
            raise AnnotationError(f"{where}: field 'answers' is empty (VQAv2 has ten human answers)")
        for j, a in enumerate(answers):
            _field(a, "answer", str, f"{where}: answers[{j}]")
        if qid in index:
            duplicates.append(qid)
        index[qid] = ann
    if duplicates:
        raise AnnotationError(f"{source}: duplicate question_id in annotations: {_ids_text(duplicates)}")
    if not index:
        raise AnnotationError(f"{source}: 'annotations' is empty")
    return index


def vqa_question_ids(questions: Mapping[str, Any], source: str = "VQA questions") -> list[int]:
    """Validate an official VQAv2 questions dict; return its question ids in file order."""
    ids: list[int] = []
    seen: set[int] = set()
    duplicates: list[int] = []
    for i, q in enumerate(_records(questions, "questions", source)):
        where = f"{source}: questions[{i}]"
        qid = _field(q, "question_id", int, where)
        _field(q, "image_id", int, f"{where} (question_id {qid})")
        _field(q, "question", str, f"{where} (question_id {qid})")
        if qid in seen:
            duplicates.append(qid)
        seen.add(qid)
        ids.append(qid)
    if duplicates:
        raise AnnotationError(f"{source}: duplicate question_id in questions: {_ids_text(duplicates)}")
    if not ids:
        raise AnnotationError(f"{source}: 'questions' is empty")
    return ids


def caption_references(
    annotations: Mapping[str, Any], source: str = "caption annotations"
) -> dict[int, list[str]]:
    """Validate a COCO captions annotations dict; return ``{image_id: [reference captions]}``.

    Keys follow the order of ``images`` (``COCO.getImgIds()``, the order ``COCOEvalCap`` scores in);
    references follow the order of ``annotations``. Every listed image must have a caption (the
    official scorer would crash on one without), and every caption must belong to a listed image.
    """
    refs: dict[int, list[str]] = {}
    duplicates: list[int] = []
    for i, img in enumerate(_records(annotations, "images", source)):
        image_id = _field(img, "id", int, f"{source}: images[{i}]")
        if image_id in refs:
            duplicates.append(image_id)
        refs[image_id] = []
    if duplicates:
        raise AnnotationError(f"{source}: duplicate id in 'images': {_ids_text(duplicates)}")
    unknown: list[int] = []
    for i, ann in enumerate(_records(annotations, "annotations", source)):
        where = f"{source}: annotations[{i}]"
        image_id = _field(ann, "image_id", int, where)
        caption = _field(ann, "caption", str, f"{where} (image_id {image_id})")
        if image_id not in refs:
            unknown.append(image_id)
            continue
        refs[image_id].append(caption)
    if unknown:
        raise AnnotationError(
            f"{source}: captions whose image_id is not in 'images': {_ids_text(sorted(set(unknown)))}"
        )
    bare = [image_id for image_id, captions in refs.items() if not captions]
    if bare:
        raise AnnotationError(f"{source}: images without any reference caption: {_ids_text(bare)}")
    if not refs:
        raise AnnotationError(f"{source}: 'images' is empty")
    return refs


def load_vqa_annotations(path: str | Path) -> dict:
    """Read and validate an official VQAv2 annotations file (``v2_mscoco_val2014_annotations.json``)."""
    obj = read_json(path, what="VQA annotations")
    vqa_annotation_index(obj, source=str(path))
    return obj


def load_vqa_questions(path: str | Path) -> dict:
    """Read and validate an official VQAv2 questions file (``v2_OpenEnded_mscoco_*_questions.json``)."""
    obj = read_json(path, what="VQA questions")
    vqa_question_ids(obj, source=str(path))
    return obj


def load_caption_annotations(path: str | Path) -> dict:
    """Read and validate a COCO captions annotations file (``captions_val2014.json`` or a subset)."""
    obj = read_json(path, what="caption annotations")
    caption_references(obj, source=str(path))
    return obj


def load_results(path: str | Path) -> list[dict]:
    """Read a results file: a JSON list of records (fields are checked by the ``validate_*`` functions)."""
    obj = read_json(path, what="results", error=ResultsError)
    if not isinstance(obj, list):
        raise ResultsError(
            f"results file {str(path)!r}: expected a JSON list of records, got {type(obj).__name__}"
        )
    return obj


# ---------------------------------------------------------------------------------------------
# Results validation
# ---------------------------------------------------------------------------------------------


def _results_by_id(
    results: Sequence[Any], id_key: str, text_key: str, known: Iterable[int], source: str
) -> dict[int, str]:
    """Shared checks: record fields and types, no duplicate ids, no ids outside the split."""
    if not isinstance(results, Sequence) or isinstance(results, str | bytes):
        raise ResultsError(f"{source}: expected a list of {{{id_key!r}, {text_key!r}}} records")
    by_id: dict[int, str] = {}
    duplicates: list[int] = []
    for i, rec in enumerate(results):
        where = f"{source}: record [{i}]"
        rid = _field(rec, id_key, int, where, error=ResultsError)
        _field(rec, text_key, str, f"{where} ({id_key} {rid})", error=ResultsError)
        if rid in by_id:
            duplicates.append(rid)
        by_id[rid] = rec[text_key]
    if duplicates:
        raise ResultsError(f"{source}: duplicate {id_key}s: {_ids_text(list(dict.fromkeys(duplicates)))}")
    known = set(known)
    unknown = [rid for rid in by_id if rid not in known]
    if unknown:
        raise ResultsError(f"{source}: {id_key}s not in the annotations: {_ids_text(unknown)}")
    return by_id


def validate_vqa_results(
    results: Sequence[Mapping[str, Any]], question_ids: Iterable[int], source: str = "VQA results"
) -> dict[int, str]:
    """Check VQA results against the split's question ids; return ``{question_id: answer}``.

    As the official ``VQA.loadRes``: every question of the split must be answered, exactly once,
    and no other question may appear. Answers must be strings (an empty string is an answer).
    """
    question_ids = list(question_ids)
    answers = _results_by_id(results, "question_id", "answer", question_ids, source)
    missing = [qid for qid in question_ids if qid not in answers]
    if missing:
        raise ResultsError(
            f"{source}: no answer for question_ids {_ids_text(missing)}; the official evaluator needs "
            "every question of the split"
        )
    return answers


def validate_caption_results(
    results: Sequence[Mapping[str, Any]],
    image_ids: Iterable[int],
    allow_partial: bool = False,
    source: str = "caption results",
) -> dict[int, str]:
    """Check caption results against the split's image ids; return ``{image_id: caption}``.

    One caption per image, no unknown images; every image of the split unless ``allow_partial``
    (then only the captioned images are scored, as ``COCOEvalCap`` does with
    ``params['image_id'] = cocoRes.getImgIds()``).
    """
    image_ids = list(image_ids)
    captions = _results_by_id(results, "image_id", "caption", image_ids, source)
    if not captions:
        raise ResultsError(f"{source}: no captions to score")
    missing = [image_id for image_id in image_ids if image_id not in captions]
    if missing and not allow_partial:
        raise ResultsError(
            f"{source}: no caption for image_ids {_ids_text(missing)} (pass allow_partial=true to score "
            "only the captioned images)"
        )
    return captions


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def _jsonable(obj: Any) -> Any:
    """Plain JSON types: numpy scalars become Python numbers, NaN/inf become null (strict JSON)."""
    if isinstance(obj, Mapping):
        return {
            (k if isinstance(k, str | int | float | bool) or k is None else str(k)): _jsonable(v)
            for k, v in obj.items()
        }
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", 0) == 0:  # numpy / torch scalar
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path: str | Path, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)``, then rename the temporary file onto ``path``.

    The temporary file sits in the same folder, so the rename is atomic: a reader never sees a
    half-written file, and an interrupted run leaves the previous file intact. The result gets the
    usual permissions (0666 less the umask), not mkstemp's 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(obj: Any, path: str | Path, indent: int | None = 2) -> Path:
    """Write ``obj`` as strict JSON (UTF-8, NaN/inf as null) to ``path`` atomically."""
    data = _jsonable(obj)

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=indent, ensure_ascii=False, allow_nan=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())

    return write_atomic(path, write)


def write_metrics(metrics: Mapping[str, Any], path: str | Path) -> Path:
    """Write a metrics dict (``metrics.json``) atomically; non-finite numbers become ``null``."""
    if not isinstance(metrics, Mapping):
        raise TypeError(f"write_metrics: metrics must be a mapping, got {type(metrics).__name__}")
    return write_json_atomic(dict(metrics), path, indent=2)


def write_results(results: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Write a results list in the official format (compact, as the evaluation servers take it)."""
    return write_json_atomic([dict(r) for r in results], path, indent=None)

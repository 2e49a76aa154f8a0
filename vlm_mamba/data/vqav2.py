"""VQAv2 (official questions + optional annotations + COCO images) -> webdataset shards.

One sample per image, holding all its questions (training expands them to image-question pairs;
evaluation keeps them grouped so each image is encoded once):
``{"image_id", "file_name", "width", "height", "questions": [{"question_id", "question",
"question_type", "answer_type", "multiple_choice_answer", "answers": [{"answer", "answer_confidence",
"answer_id"}] x 10}]}`` (the answer fields are absent for test/test-dev, which have no annotations).
Each split folder also gets ``questions.json`` (+ ``annotations.json``) in the official format,
restricted to the written images, for the official-algorithm scorer.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from .coco import infer_split, train_tokenizer_for
from .prompts import VQA_PROMPT, normalize_text
from .records import AnnotationError, field, load_json, top_list, where
from .shards import ImageItem, SplitWriter, write_image_items

log = logging.getLogger(__name__)

ANSWER_TYPES = ("yes/no", "number", "other")


def parse_questions(path: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Returns (header fields other than ``questions``, [{"image_id", "question", "question_id"}])."""
    doc = load_json(path)
    rows = top_list(doc, "questions", path)
    out, seen = [], set()
    for i, rec in enumerate(rows):
        w = where(path, "questions", i, rec, "question_id")
        qid = field(rec, "question_id", int, w)
        if qid in seen:
            raise AnnotationError(f"{w}: duplicate question_id {qid}")
        seen.add(qid)
        out.append(
            {
                "image_id": field(rec, "image_id", int, w),
                "question": field(rec, "question", str, w),
                "question_id": qid,
            }
        )
    header = {k: v for k, v in doc.items() if k != "questions"}
    return header, out


def parse_annotations(path: str | Path) -> tuple[dict[str, Any], dict[int, dict[str, Any]]]:
    """Returns (header, question_id -> annotation), each with exactly ten answers."""
    doc = load_json(path)
    out: dict[int, dict[str, Any]] = {}
    for i, rec in enumerate(top_list(doc, "annotations", path)):
        w = where(path, "annotations", i, rec, "question_id")
        qid = field(rec, "question_id", int, w)
        atype = field(rec, "answer_type", str, w)
        if atype not in ANSWER_TYPES:
            raise AnnotationError(f"{w}: field 'answer_type'={atype!r} is not one of {ANSWER_TYPES}")
        answers = field(rec, "answers", list, w)
        if len(answers) != 10:
            raise AnnotationError(f"{w}: field 'answers' must hold 10 answers, got {len(answers)}")
        clean = []
        for j, a in enumerate(answers):
            wa = f"{w}.answers[{j}]"
            clean.append(
                {
                    "answer": field(a, "answer", str, wa),
                    "answer_confidence": field(a, "answer_confidence", str, wa, optional=True) or "yes",
                    "answer_id": field(a, "answer_id", int, wa, optional=True) or j + 1,
                }
            )
        out[qid] = {
            "image_id": field(rec, "image_id", int, w),
            "question_type": field(rec, "question_type", str, w),
            "answer_type": atype,
            "multiple_choice_answer": field(rec, "multiple_choice_answer", str, w),
            "answers": clean,
        }
    header = {k: v for k, v in doc.items() if k != "annotations"}
    return header, out


def image_file_candidates(image_id: int, subtype: str | None, pattern: str | None) -> list[str]:
    """File names to try for an image: the explicit pattern, else COCO 2014 then 2017 naming.

    VQAv2 test-dev questions use the test2015 images.
    """
    if pattern:
        return [pattern.format(image_id=image_id, subtype=subtype or "")]
    names = []
    if subtype:
        sub = "test2015" if subtype.startswith("test-dev") else subtype
        names.append(f"COCO_{sub}_{image_id:012d}.jpg")
    names.append(f"{image_id:012d}.jpg")
    return names


def prepare_vqav2(
    questions: str | Path,
    images: str | Path,
    out: str | Path,
    annotations: str | Path | None = None,
    dataset: str = "vqav2",
    split: str | None = None,
    image_pattern: str | None = None,
    strict: bool = False,
    shard_size: int = 1000,
    workers: int = 0,
    train_tokenizer: bool = True,
    vocab_size: int = 8192,
    extra_tokenizer_text: tuple[str, ...] = (),
    progress: bool = True,
) -> dict[str, Path]:
    """Prepare one VQAv2 split; returns ``{split: folder}`` (+ ``"tokenizer"`` when one was trained).

    Args:
        questions: ``v2_OpenEnded_mscoco_<subtype>_questions.json``.
        annotations: ``v2_mscoco_<subtype>_annotations.json`` (None for test / test-dev).
        images: folder of the COCO images of that subtype.
        split: output split name; default from ``data_subtype`` / the file name (train, val, test, test-dev).
        image_pattern: file name format with ``{image_id}`` and ``{subtype}``; default tries
            ``COCO_<subtype>_<id:012d>.jpg`` then ``<id:012d>.jpg``.
        train_tokenizer: for a train split, train a BPE on questions + answers + the prompt words.
    """
    qheader, qs = parse_questions(questions)
    subtype = qheader.get("data_subtype") if isinstance(qheader.get("data_subtype"), str) else None
    split = split or infer_split(questions, subtype)
    anns: dict[int, dict[str, Any]] | None = None
    aheader: dict[str, Any] = {}
    if annotations is not None:
        aheader, anns = parse_annotations(annotations)
        qids = {q["question_id"] for q in qs}
        missing = [q["question_id"] for q in qs if q["question_id"] not in anns]
        extra = [qid for qid in anns if qid not in qids]
        if missing or extra:
            raise AnnotationError(
                f"{Path(annotations).name} does not match {Path(questions).name}: "
                f"{len(missing)} questions without an annotation (first question_id={missing[:1]}), "
                f"{len(extra)} annotations of unknown questions (first question_id={extra[:1]})"
            )
        for q in qs:
            if anns[q["question_id"]]["image_id"] != q["image_id"]:
                raise AnnotationError(
                    f"{Path(annotations).name}: question_id={q['question_id']}: field 'image_id'="
                    f"{anns[q['question_id']]['image_id']} differs from the questions file ({q['image_id']})"
                )
    by_image: dict[int, list[dict[str, Any]]] = {}
    for q in qs:
        row = {"question_id": q["question_id"], "question": normalize_text(q["question"])}
        if anns is not None:
            a = anns[q["question_id"]]
            row.update(
                {k: a[k] for k in ("question_type", "answer_type", "multiple_choice_answer", "answers")}
            )
        by_image.setdefault(q["image_id"], []).append(row)

    images = Path(images)
    items = []
    for iid in sorted(by_image):
        names = image_file_candidates(iid, subtype, image_pattern)
        path = next((images / n for n in names if (images / n).exists()), images / names[0])
        items.append(
            ImageItem(iid, path, {"image_id": iid, "file_name": path.name, "questions": by_image[iid]})
        )

    src = {
        "questions": str(questions),
        "annotations": str(annotations) if annotations else None,
        "images": str(images),
    }
    with SplitWriter(out, dataset, split, "vqa", shard_size, strict=strict, source=src) as w:
        write_image_items(w, items, lambda m: len(m["questions"]), workers=workers, progress=progress)
        skipped = {s["image_id"] for s in w.skipped}
        kept = [it.meta for it in items if it.image_id not in skipped]
        w.add_json(
            "questions.json",
            {
                **{k: v for k, v in qheader.items()},
                "questions": [
                    {"image_id": m["image_id"], "question": q["question"], "question_id": q["question_id"]}
                    for m in kept
                    for q in m["questions"]
                ],
            },
        )
        if anns is not None:
            w.add_json(
                "annotations.json",
                {
                    **{k: v for k, v in aheader.items()},
                    "annotations": [
                        {
                            "question_id": q["question_id"],
                            "image_id": m["image_id"],
                            **{
                                k: anns[q["question_id"]][k]
                                for k in ("question_type", "answer_type", "multiple_choice_answer", "answers")
                            },
                        }
                        for m in kept
                        for q in m["questions"]
                    ],
                },
            )
    written = {split: w.final_dir}
    if train_tokenizer and split == "train":
        texts = [VQA_PROMPT.format(q=q["question"]) for q in qs]  # prompt words get merges too
        if anns is not None:
            texts += [a["answer"] for ann in anns.values() for a in ann["answers"]]
        texts += [VQA_PROMPT.format(q="")] + list(extra_tokenizer_text)
        written["tokenizer"] = train_tokenizer_for(texts, out, dataset, vocab_size)
    return written

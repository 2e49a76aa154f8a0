"""Evaluation tasks: decode batches, turn predictions into official records, gather over ranks,
write the ground truth in the official formats and score it (captions, VQAv2).

Used by evaluation runs (:mod:`.run`) and by training's validation (``vlm_mamba.training.module``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from ..data.collate import most_common
from .formats import write_json_atomic


def decode_rows(ids: torch.Tensor, tokenizer: Any, eos_id: int | None, pad_id: int) -> list[str]:
    """(b, n) generated ids -> the strings submitted to the scorers: cut at EOS, padding dropped,
    whitespace collapsed (``clean_generation``)."""
    from ..data.prompts import clean_generation

    texts = []
    for row in ids.tolist():
        if eos_id is not None and eos_id in row:
            row = row[: row.index(eos_id)]
        row = [t for t in row if t != pad_id]
        texts.append(
            clean_generation(tokenizer.decode(row)) if tokenizer is not None else " ".join(map(str, row))
        )
    return texts


@torch.no_grad()
def predict_batch(model, tokenizer, batch: Mapping[str, Any], gen: Mapping[str, Any], device) -> list[str]:
    """Decode one evaluation batch (left-padded prompts, ``docs/interfaces.md``) to strings;
    ``gen`` holds :class:`~vlm_mamba.generation.GenerationConfig` fields (unknown ones raise)."""

    def to(x):
        return None if x is None else x.to(device)

    out = model.generate(
        batch["images"].to(device),
        batch["prompt_ids"].to(device),
        prompt_mask=batch["prompt_mask"].to(device),
        image_sizes=to(batch.get("image_sizes")),
        image_index=to(batch.get("image_index")),
        **dict(gen),
    )  # (b, new)
    return decode_rows(out, tokenizer, model.config.eos_token_id, model.config.pad_token_id)


def collect_predictions(
    model,
    tokenizer,
    loader: Iterable[Mapping[str, Any]],
    task: str,
    gen: Mapping[str, Any],
    device,
    max_samples: int | None = None,
    keep_images: int = 0,
    progress: bool = False,
) -> tuple[list[dict], list[dict], list[dict]]:
    """Generate over ``loader``.

    Returns:
        results (official format), references (one record per image / question: captions, or
        question + ten answers + types), and up to ``keep_images`` report samples (with images).
    """
    from ..data.transforms import IMAGE_MEAN, IMAGE_STD

    results: list[dict] = []
    refs: list[dict] = []
    samples: list[dict] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(desc=f"generating ({task})", unit="q" if task == "vqav2" else "img")
    for batch in loader:
        preds = predict_batch(model, tokenizer, batch, gen, device)
        res, ref = eval_records(batch, preds)
        results += res
        refs += ref
        if task == "coco_caption":
            for i in range(min(len(ref), keep_images - len(samples))):
                samples.append(
                    {
                        "image": _picture(batch, i, IMAGE_MEAN, IMAGE_STD),
                        "caption": res[i]["caption"],
                        "references": ref[i]["references"],
                    }
                )
        else:
            index = batch["image_index"].tolist()
            for i, (r, rec) in enumerate(zip(res, ref)):
                if len(samples) < keep_images and (not samples or samples[-1]["image_id"] != rec["image_id"]):
                    samples.append(
                        {
                            "image": _picture(batch, index[i], IMAGE_MEAN, IMAGE_STD),
                            "image_id": rec["image_id"],
                            "qa": [],
                        }
                    )
                if samples and samples[-1].get("image_id") == rec["image_id"] and len(samples[-1]["qa"]) < 3:
                    samples[-1]["qa"].append(
                        {"question": rec["question"], "answer": r["answer"], "answers": rec["answers"]}
                    )
        if bar is not None:
            bar.update(len(preds))
        if max_samples is not None and len(refs) >= max_samples:
            break
    if bar is not None:
        bar.close()
    return results, refs, samples


def eval_records(batch: Mapping[str, Any], preds: list[str]) -> tuple[list[dict], list[dict]]:
    """One evaluation batch's predictions -> (results in the official format, the references that
    score them: captions per image, or question + ten answers + types per question). Every
    question is kept, also without answers (a test-dev split still needs its submission file)."""
    results: list[dict] = []
    refs: list[dict] = []
    if "references" in batch:  # captions
        for img_id, pred, ref in zip(batch["image_ids"], preds, batch["references"]):
            results.append({"image_id": int(img_id), "caption": pred})
            refs.append({"image_id": int(img_id), "references": list(ref)})
        return results, refs
    for i, pred in enumerate(preds):
        rec = {
            "question_id": int(batch["question_ids"][i]),
            "image_id": int(batch["image_ids"][i]),
            "question": batch["questions"][i],
            "answers": list(batch["answers"][i]),
            "question_type": batch["question_types"][i],
            "answer_type": batch["answer_types"][i],
        }
        results.append({"question_id": rec["question_id"], "answer": pred})
        refs.append(rec)
    return results, refs


def _picture(batch: Mapping[str, Any], i: int, mean, std):
    """The i-th image of a batch, un-normalised to uint8 HWC and cropped to its real size."""
    img = batch["images"][i].float().cpu()
    img = img * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)
    if batch.get("image_sizes") is not None:
        h, w = batch["image_sizes"][i].tolist()
        img = img[:, :h, :w]
    return (img.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()


def gather(items: list[dict]) -> list[dict]:
    """Every rank's list, concatenated on every rank (rank order); a no-op without torch.distributed."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return items
    parts: list[list[dict]] = [None] * dist.get_world_size()  # type: ignore[list-item]
    dist.all_gather_object(parts, items)
    return [x for part in parts for x in part]


# ---------------------------------------------------------------------- official-format ground truth
def caption_ground_truth(refs: list[dict], split: str) -> dict:
    """COCO captions annotation dict of the evaluated images (what pycocotools' COCO() reads)."""
    images, anns = [], []
    for r in sorted(refs, key=lambda r: r["image_id"]):
        images.append({"id": r["image_id"], "file_name": f"{r['image_id']:012d}.jpg"})
        for c in r["references"]:
            anns.append({"id": len(anns) + 1, "image_id": r["image_id"], "caption": c})
    return {"info": {"description": f"references of split {split}"}, "images": images, "annotations": anns}


def vqa_ground_truth(refs: list[dict], split: str) -> tuple[dict, dict]:
    """(annotations, questions) dicts of the evaluated questions in the official VQAv2 formats."""
    anns, qs = [], []
    for r in sorted(refs, key=lambda r: r["question_id"]):
        qs.append({"image_id": r["image_id"], "question": r["question"], "question_id": r["question_id"]})
        answers = r["answers"]
        anns.append(
            {
                "question_id": r["question_id"],
                "image_id": r["image_id"],
                "question_type": r["question_type"],
                "answer_type": r["answer_type"],
                "multiple_choice_answer": most_common(answers),
                "answers": [
                    {"answer": a, "answer_confidence": "yes", "answer_id": j + 1}
                    for j, a in enumerate(answers)
                ],
            }
        )
    return (
        {"data_subtype": split, "annotations": anns},
        {"data_subtype": split, "task_type": "Open-Ended", "questions": qs},
    )


def score(task: str, results: list[dict], refs: list[dict], split: str, out_dir: Path, caption_metrics=None):
    """Write ground truth in the official formats beside ``results`` and score them with the
    official algorithms. Returns ``(metrics, {name: path})``."""
    from . import metrics as M

    paths = {}
    if task == "coco_caption":
        gt = caption_ground_truth(refs, split)
        paths["annotations"] = write_json_atomic(gt, out_dir / f"captions_{split}_gt.json")
        metrics = M.caption_metrics(results, gt, **(caption_metrics or {}))
    else:
        ann, qs = vqa_ground_truth(refs, split)
        paths["annotations"] = write_json_atomic(ann, out_dir / f"vqa_{split}_annotations.json")
        paths["questions"] = write_json_atomic(qs, out_dir / f"vqa_{split}_questions.json")
        metrics = M.vqa_accuracy(results, ann, qs)
    return metrics, paths


def summary(task: str, metrics: Mapping[str, Any]) -> dict[str, float]:
    """The headline numbers of a task's metrics (for tables)."""
    if task == "coco_caption":
        keys = ("Bleu_1", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE")
        return {k: float(metrics[k]) for k in keys if k in metrics}
    out = {"overall": float(metrics["overall"])}
    out.update({f"perAnswerType[{k}]": float(v) for k, v in metrics.get("perAnswerType", {}).items()})
    return out


def batch_task(batch: Mapping[str, Any]) -> str:
    """``caption`` / ``vqa`` evaluation batch, or ``train`` (teacher-forcing layout)."""
    if "references" in batch:
        return "caption"
    if "question_ids" in batch:
        return "vqa"
    if "input_ids" in batch:
        return "train"
    raise ValueError(f"unrecognised batch with keys {sorted(batch)} (see docs/interfaces.md 'Batches')")


def score_task(task: str, results: list[dict], refs: list[dict], prefix: str) -> dict[str, float]:
    """``{prefix}/CIDEr`` and ``/Bleu_4`` (pycocoevalcap, PTB-tokenized) or ``{prefix}/vqa_acc`` (official, 0-100)."""
    from . import metrics as M

    if task == "caption":
        # CIDEr and BLEU-4 only: METEOR's Java start-up (~5 s) is too slow for every validation
        scores = M.score_captions(
            {r["image_id"]: r["references"] for r in refs},
            {r["image_id"]: r["caption"] for r in results},
            metrics=["Bleu_4", "CIDEr"],
            spice=False,
        )
        return {f"{prefix}/CIDEr": float(scores["CIDEr"]), f"{prefix}/Bleu_4": float(scores["Bleu_4"])}
    scores = M.vqa_accuracy(results, vqa_ground_truth(refs, prefix)[0])
    return {f"{prefix}/vqa_acc": float(scores["overall"])}


def sample_rows(task: str, results: list[dict], refs: list[dict], n: int) -> list[dict[str, Any]]:
    """The first ``n`` predictions beside their first reference, for the loggers."""
    rows = []
    for r, ref in list(zip(results, refs))[:n]:
        rows.append(
            {
                "task": task,
                "id": r.get("image_id", r.get("question_id")),
                "prompt": ref.get("question", ""),
                "prediction": r.get("caption", r.get("answer")),
                "reference": (ref.get("references") or ref.get("answers") or [""])[0],
            }
        )
    return rows

"""Decode + transform + tokenize + collate: raw shard items -> the batch dicts of docs/interfaces.md.

Training (teacher forcing, RIGHT padded)::

    images          float (b, 3, H, W) normalised   [fuyu: per-batch canvas + image_sizes long (b, 2)]
    input_ids       long  (b, t)  [bos] prompt target [eos] pad...
    attention_mask  long  (b, t)  1 real / 0 pad
    labels          long  (b, t)  input_ids with -100 on bos + prompt + pad (the model shifts)

Evaluation (LEFT padded prompts for generation): caption ``images, prompt_ids, prompt_mask, image_ids,
references``; VQA grouped by image ``images (n_img, ...), image_index (n_q,), prompt_ids (n_q, tp),
prompt_mask, question_ids, image_ids, questions, answers, question_types, answer_types``.

A sample whose image does not decode is dropped from its batch and counted in ``skipped`` (the batch
is one smaller; the positions of later batches do not move, which exact resume relies on).

With a :class:`MemoryBudget` (the DataModules' ``cache_mb``, training only) the processor keeps each
decoded, resized image (keyed by its bytes) and each tokenized (prompt, target) pair after their first
use, while the budget lasts: a dataset that fits in memory (the shapes demo) is decoded and tokenized
once per process instead of once per visit. The batches are the same, value for value.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .images import ImageDecodeError, load_image
from .prompts import caption_prompt, target_text, vqa_prompt
from .tokenizer import TextTokenizer
from .transforms import FuyuTransform, make_transform, normalize

log = logging.getLogger(__name__)

IGNORE_INDEX = -100


class MemoryBudget:
    """Bytes a process may spend on caches (decoded images, tokenized texts, shard samples); a cache
    that finds the budget spent stops adding entries (what it holds stays)."""

    def __init__(self, mb: float):
        if mb < 0:
            raise ValueError(f"cache budget {mb} MB must be >= 0")
        self.left = int(mb * 2**20)

    def take(self, nbytes: int) -> bool:
        """Reserve ``nbytes``; False (nothing reserved) when they do not fit."""
        if nbytes > self.left:
            return False
        self.left -= nbytes
        return True


@dataclass
class RawPair:
    """One training example before decoding: image bytes + prompt + target text."""

    key: str
    image: bytes
    prompt: str
    target: str


@dataclass
class RawImage:
    """One evaluation image before decoding, with its metadata (captions or questions)."""

    key: str
    image: bytes
    meta: dict[str, Any]


def pad_right(seqs: list[list[int]], pad_id: int, multiple: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """-> ids (b, t), mask (b, t) long; t = longest, rounded up to ``multiple``."""
    t = max(len(s) for s in seqs)
    t = -(-t // multiple) * multiple
    ids = torch.full((len(seqs), t), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), t), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


def pad_left(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """-> ids (b, t), mask (b, t) long with the padding on the left (prompts for generation)."""
    t = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), t), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), t), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, t - len(s) :] = torch.tensor(s, dtype=torch.long)
            mask[i, t - len(s) :] = 1
    return ids, mask


@dataclass
class Processor:
    """Everything a worker needs to turn raw items into batches (picklable; one copy per worker).

    Args:
        tokenizer: BOS/EOS/PAD-aware tokenizer.
        vision_mode: ``encoder`` (square ``img_size``) or ``fuyu`` (aspect kept, ``max_img_size``).
        max_text_len: tokens per training sequence, BOS and EOS included; also caps eval prompts.
        pad_to_multiple_of: round the padded text length up (1 = no rounding).
        cache: a :class:`MemoryBudget` for the image and text caches (None: no caching).
    """

    tokenizer: TextTokenizer
    vision_mode: str = "encoder"
    img_size: int = 224
    patch_size: int = 16
    max_img_size: int = 448
    max_text_len: int = 64
    caption_template: str = ""
    vqa_template: str = "Question: {q} Answer:"
    pad_to_multiple_of: int = 1
    cache: MemoryBudget | None = None
    skipped: int = field(default=0, init=False)  # images that failed to decode
    attempts: int = field(default=0, init=False)  # images decoded or tried

    def __post_init__(self) -> None:
        self.transform = make_transform(self.vision_mode, self.img_size, self.patch_size, self.max_img_size)
        if self.max_text_len < 3:
            raise ValueError(f"max_text_len={self.max_text_len} must be >= 3 (bos, one token, eos)")
        self._images: dict[bytes, torch.Tensor] = {}  # image bytes -> transformed uint8 (3, h, w)
        self._texts: dict[tuple[str, str], tuple[list[int], list[int]]] = {}

    # -- images --------------------------------------------------------------------------------------
    def decode(self, key: str, data: bytes) -> torch.Tensor | None:
        """uint8 (3, h, w), or None (counted, logged) when the bytes do not decode. Never modify the
        result in place: with a cache it is the cached tensor."""
        self.attempts += 1
        hit = self._images.get(data) if self.cache is not None else None
        if hit is not None:
            return hit
        try:
            img = self.transform(load_image(data, draft_size=self.transform.draft_size))
        except ImageDecodeError as err:
            self.skipped += 1
            log.warning("skipping sample %s: %s", key, err)
            return None
        if self.cache is not None and self.cache.take(img.nbytes + len(data) + 200):
            self._images[bytes(data)] = img
        return img

    def stack_images(self, imgs: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """-> {"images": (b, 3, H, W)} [+ fuyu: "image_sizes" (b, 2), canvas zero (= mean colour) padded]."""
        if not isinstance(self.transform, FuyuTransform):
            return {"images": normalize(torch.stack(imgs))}
        sizes = [self.transform.padded(im.shape[1], im.shape[2]) for im in imgs]
        hmax, wmax = max(h for h, _ in sizes), max(w for _, w in sizes)
        canvas = torch.zeros((len(imgs), 3, hmax, wmax), dtype=torch.float32)  # (b, 3, H, W)
        for i, im in enumerate(imgs):
            canvas[i, :, : im.shape[1], : im.shape[2]] = normalize(im)
        return {"images": canvas, "image_sizes": torch.tensor(sizes, dtype=torch.long)}

    # -- text ----------------------------------------------------------------------------------------
    def _prompt_ids(self, prompt: str) -> list[int]:
        """[bos] + prompt, the prompt cut from the left to leave room for one target token + eos."""
        p = self.tokenizer.encode(prompt) if prompt else []
        keep = self.max_text_len - 3
        if len(p) > keep:
            p = p[len(p) - keep :]
        return [self.tokenizer.bos_token_id, *p]

    def train_sequence(self, prompt: str, target: str) -> tuple[list[int], list[int]]:
        """-> (input_ids, labels) for ``[bos] prompt target [eos]``, truncated to ``max_text_len``
        (the target is cut and then carries no EOS). Never modify the lists: they may be cached."""
        hit = self._texts.get((prompt, target)) if self.cache is not None else None
        if hit is not None:
            return hit
        head = self._prompt_ids(prompt)
        tgt = self.tokenizer.encode(target_text(target, prompt)) + [self.tokenizer.eos_token_id]
        tgt = tgt[: self.max_text_len - len(head)]
        out = head + tgt, [IGNORE_INDEX] * len(head) + tgt
        if self.cache is not None and self.cache.take(2 * 8 * len(out[0]) + len(prompt) + len(target) + 300):
            self._texts[(prompt, target)] = out
        return out

    # -- batches -------------------------------------------------------------------------------------
    def train_batch(self, pairs: list[RawPair]) -> dict[str, Any] | None:
        imgs, seqs, labels = [], [], []
        for p in pairs:
            im = self.decode(p.key, p.image)
            if im is None:
                continue
            ids, lab = self.train_sequence(p.prompt, p.target)
            imgs.append(im)
            seqs.append(ids)
            labels.append(lab)
        if not imgs:
            return None
        input_ids, attention_mask = pad_right(seqs, self.tokenizer.pad_token_id, self.pad_to_multiple_of)
        lab, _ = pad_right(labels, IGNORE_INDEX, self.pad_to_multiple_of)
        return {
            **self.stack_images(imgs),
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": lab,
        }

    def caption_eval_batch(self, items: list[RawImage]) -> dict[str, Any] | None:
        imgs, metas = [], []
        for it in items:
            im = self.decode(it.key, it.image)
            if im is not None:
                imgs.append(im)
                metas.append(it.meta)
        if not imgs:
            return None
        prompt = self._prompt_ids(caption_prompt(self.caption_template))
        prompt_ids, prompt_mask = pad_left([prompt] * len(imgs), self.tokenizer.pad_token_id)
        return {
            **self.stack_images(imgs),
            "prompt_ids": prompt_ids,
            "prompt_mask": prompt_mask,
            "image_ids": [int(m["image_id"]) for m in metas],
            "references": [list(m["captions"]) for m in metas],
        }

    def vqa_eval_batch(self, items: list[RawImage]) -> dict[str, Any] | None:
        imgs, image_index, prompts = [], [], []
        out: dict[str, list] = {
            k: []
            for k in ("question_ids", "image_ids", "questions", "answers", "question_types", "answer_types")
        }
        for it in items:
            im = self.decode(it.key, it.image)
            if im is None:
                continue
            for q in it.meta["questions"]:
                image_index.append(len(imgs))
                prompts.append(self._prompt_ids(vqa_prompt(q["question"], self.vqa_template)))
                out["question_ids"].append(int(q["question_id"]))
                out["image_ids"].append(int(it.meta["image_id"]))
                out["questions"].append(q["question"])
                out["answers"].append([a["answer"] for a in q.get("answers", [])])
                out["question_types"].append(q.get("question_type", ""))
                out["answer_types"].append(q.get("answer_type", ""))
            imgs.append(im)
        if not imgs or not prompts:
            return None
        prompt_ids, prompt_mask = pad_left(prompts, self.tokenizer.pad_token_id)
        return {
            **self.stack_images(imgs),
            "image_index": torch.tensor(image_index, dtype=torch.long),
            "prompt_ids": prompt_ids,
            "prompt_mask": prompt_mask,
            **out,
        }


def most_common(answers: list[str]) -> str:
    """The plurality answer (first seen wins ties): VQAv2's ``multiple_choice_answer`` in spirit."""
    from collections import Counter

    return Counter(answers).most_common(1)[0][0] if answers else ""


def teacher_forcing_batch(
    batch: Mapping[str, Any], task: str, tokenizer: Any, max_text_len: int
) -> dict[str, Any] | None:
    """An evaluation batch -> the training layout, with its reference as the target.

    Captions: each image's first reference; VQA: each question's most common answer, the image
    repeated per question (``images[image_index]``). The sequence is the batch's own
    ``[bos] prompt`` ids (left padding removed) + the target encoded as the collate function does
    (``target_text``, EOS, cut at ``max_text_len``), so the loss measures exactly what training
    optimises. Rows without a reference (a test split without answers) are dropped; None if none is left.
    """
    if task == "caption":
        targets = [refs[0] if refs else "" for refs in batch["references"]]
        rows = torch.arange(len(targets))
    else:
        targets = [most_common(list(a)) for a in batch["answers"]]
        rows = batch["image_index"].cpu()
    keep = [i for i, t in enumerate(targets) if t]
    if not keep:
        return None
    seqs, labels = [], []
    for i in keep:
        p = batch["prompt_ids"][i][batch["prompt_mask"][i].bool()].tolist()  # [bos] prompt
        tgt = tokenizer.encode(target_text(targets[i], "x" if len(p) > 1 else "")) + [tokenizer.eos_token_id]
        tgt = tgt[: max(1, max_text_len - len(p))]
        seqs.append(p + tgt)
        labels.append([IGNORE_INDEX] * len(p) + tgt)
    dev = batch["prompt_ids"].device
    input_ids, attention_mask = pad_right(seqs, tokenizer.pad_token_id)
    lab, _ = pad_right(labels, IGNORE_INDEX)
    idx = rows[keep].to(batch["images"].device)
    out = {
        "images": batch["images"].index_select(0, idx),
        "input_ids": input_ids.to(dev),
        "attention_mask": attention_mask.to(dev),
        "labels": lab.to(dev),
    }
    if batch.get("image_sizes") is not None:
        out["image_sizes"] = batch["image_sizes"].index_select(0, idx.to(batch["image_sizes"].device))
    return out

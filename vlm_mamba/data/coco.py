"""COCO Captions (official ``captions_*.json`` or the Karpathy split) -> webdataset shards.

One sample per image: the original image bytes and a JSON
``{"image_id", "file_name", "width", "height", "captions": [str], "caption_ids": [int]}``.
Each split folder also gets ``captions.json``: the COCO-format ground truth of exactly the written
images (what ``vlm_mamba.metrics.caption_metrics`` scores against). Training the tokenizer happens here
when a train split is written (``<data_dir>/<dataset>/tokenizer.json``).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from .prompts import normalize_text
from .records import AnnotationError, field, load_json, top_list, where
from .shards import ImageItem, SplitWriter, write_image_items
from .tokenizer import train_bpe_tokenizer

log = logging.getLogger(__name__)

KARPATHY_SPLITS = {"train": ("train", "restval"), "val": ("val",), "test": ("test",)}
_SPLIT_RE = re.compile(r"(test-dev|train|val|test)")


def infer_split(path: str | Path, subtype: str | None = None) -> str:
    """``captions_val2014.json`` -> ``val``; ``v2_OpenEnded_mscoco_test-dev2015_questions.json`` -> ``test-dev``."""
    for text in (subtype, Path(path).name):
        if text and (m := _SPLIT_RE.search(text)):
            return m.group(1)
    raise AnnotationError(f"{path}: cannot tell the split from the file name; pass --split")


def parse_captions(path: str | Path) -> tuple[dict[int, dict[str, Any]], dict[int, list[tuple[int, str]]]]:
    """Read an official COCO captions file.

    Returns:
        images: image_id -> {"file_name", "width", "height"}
        captions: image_id -> [(annotation id, caption)] in file order
    """
    doc = load_json(path)
    images: dict[int, dict[str, Any]] = {}
    for i, rec in enumerate(top_list(doc, "images", path)):
        w = where(path, "images", i, rec)
        iid = field(rec, "id", int, w)
        if iid in images:
            raise AnnotationError(f"{w}: duplicate image id {iid}")
        images[iid] = {
            "file_name": field(rec, "file_name", str, w),
            "width": field(rec, "width", int, w, optional=True),
            "height": field(rec, "height", int, w, optional=True),
        }
    captions: dict[int, list[tuple[int, str]]] = {}
    for i, rec in enumerate(top_list(doc, "annotations", path)):
        w = where(path, "annotations", i, rec)
        iid = field(rec, "image_id", int, w)
        cap = field(rec, "caption", str, w)
        aid = field(rec, "id", int, w)
        if iid not in images:
            raise AnnotationError(f"{w}: field 'image_id'={iid} names no entry of 'images'")
        captions.setdefault(iid, []).append((aid, normalize_text(cap)))
    return images, captions


def parse_karpathy(path: str | Path) -> dict[str, list[dict[str, Any]]]:
    """Read ``dataset_coco.json``; returns split -> [{"image_id", "rel_path", "captions": [(sentid, raw)]}].

    Karpathy's ``restval`` joins ``train`` (the usual 113,287-image training set).
    """
    doc = load_json(path)
    out: dict[str, list[dict[str, Any]]] = {s: [] for s in KARPATHY_SPLITS}
    to_split = {k: s for s, ks in KARPATHY_SPLITS.items() for k in ks}
    for i, rec in enumerate(top_list(doc, "images", path)):
        w = where(path, "images", i, rec, "cocoid")
        split = field(rec, "split", str, w)
        if split not in to_split:
            raise AnnotationError(f"{w}: field 'split'={split!r} is not one of {sorted(to_split)}")
        iid = field(rec, "cocoid", int, w)
        fname = field(rec, "filename", str, w)
        fpath = field(rec, "filepath", str, w, optional=True) or ""
        sents = field(rec, "sentences", list, w)
        caps = []
        for j, s in enumerate(sents):
            ws = f"{w}.sentences[{j}]"
            caps.append((field(s, "sentid", int, ws), normalize_text(field(s, "raw", str, ws))))
        out[to_split[split]].append({"image_id": iid, "rel_path": str(Path(fpath) / fname), "captions": caps})
    return out


def _find_image(images_dir: Path, rel_path: str) -> Path:
    """``images_dir/rel_path``, else ``images_dir/<basename>`` (flat folders of Karpathy images)."""
    p = images_dir / rel_path
    if not p.exists() and (images_dir / Path(rel_path).name).exists():
        return images_dir / Path(rel_path).name
    return p


def write_caption_split(
    entries: list[dict[str, Any]],
    images_dir: str | Path,
    data_dir: str | Path,
    dataset: str,
    split: str,
    strict: bool = False,
    shard_size: int = 1000,
    workers: int = 0,
    progress: bool = True,
    source: dict[str, Any] | None = None,
) -> Path:
    """Write one caption split from ``[{"image_id", "rel_path", "captions": [(id, text)]}]``."""
    images_dir = Path(images_dir)
    entries = sorted(entries, key=lambda e: e["image_id"])
    items = [
        ImageItem(
            e["image_id"],
            _find_image(images_dir, e["rel_path"]),
            {
                "image_id": e["image_id"],
                "file_name": Path(e["rel_path"]).name,
                "captions": [c for _, c in e["captions"]],
                "caption_ids": [cid for cid, _ in e["captions"]],
            },
        )
        for e in entries
    ]
    with SplitWriter(
        data_dir, dataset, split, "captions", shard_size, strict=strict, source=source or {}
    ) as w:
        write_image_items(w, items, lambda m: len(m["captions"]), workers=workers, progress=progress)
        skipped = {s["image_id"] for s in w.skipped}
        kept = [it.meta for it in items if it.image_id not in skipped]
        w.add_json(
            "captions.json",
            {
                "info": {"description": f"{dataset} {split} ground truth written by vlm_mamba prepare"},
                "licenses": [],
                "type": "captions",
                "images": [
                    {
                        "id": m["image_id"],
                        "file_name": m["file_name"],
                        "width": m["width"],
                        "height": m["height"],
                    }
                    for m in kept
                ],
                "annotations": [
                    {"id": cid, "image_id": m["image_id"], "caption": c}
                    for m in kept
                    for cid, c in zip(m["caption_ids"], m["captions"])
                ],
            },
        )
    return w.final_dir


def train_tokenizer_for(texts: list[str], data_dir: str | Path, dataset: str, vocab_size: int) -> Path:
    """Train the byte-level BPE on ``texts`` and save it as ``<data_dir>/<dataset>/tokenizer.json``."""
    tok = train_bpe_tokenizer(texts, vocab_size=vocab_size)
    path = tok.save(Path(data_dir) / dataset / "tokenizer.json")
    log.info("trained tokenizer (%d ids) -> %s", tok.vocab_size, path)
    return path


def prepare_coco(
    images: str | Path,
    out: str | Path,
    annotations: str | Path | None = None,
    karpathy: str | Path | None = None,
    dataset: str = "coco",
    split: str | None = None,
    splits: tuple[str, ...] = ("train", "val", "test"),
    strict: bool = False,
    shard_size: int = 1000,
    workers: int = 0,
    train_tokenizer: bool = True,
    vocab_size: int = 8192,
    extra_tokenizer_text: tuple[str, ...] = (),
    progress: bool = True,
) -> dict[str, Path]:
    """Prepare COCO Captions shards; returns ``{split: split folder}`` (+ ``"tokenizer"`` when trained).

    Args:
        images: folder of the images; official files use ``images/<file_name>``, Karpathy
            ``images/<filepath>/<filename>`` (or ``images/<filename>``).
        out: ``paths.data_dir``; shards go to ``out/<dataset>/<split>/``.
        annotations: an official ``captions_*.json`` (one split, named by ``split`` or the file name).
        karpathy: ``dataset_coco.json``; writes the Karpathy ``splits`` (train = train + restval).
        strict: a missing or undecodable image is an error instead of a listed skip.
        train_tokenizer: train a byte-level BPE on the train captions when a train split is written.
        extra_tokenizer_text: more text for the tokenizer corpus (prompt words, VQA text).
    """
    if (annotations is None) == (karpathy is None):
        raise ValueError(
            "give exactly one of annotations= (official captions_*.json) or karpathy= (dataset_coco.json)"
        )
    src = {
        "annotations": str(annotations) if annotations else None,
        "karpathy": str(karpathy) if karpathy else None,
    }
    src["images"] = str(images)
    if karpathy is not None:
        by_split = parse_karpathy(karpathy)
        unknown = set(splits) - set(KARPATHY_SPLITS)
        if unknown:
            raise ValueError(f"splits={splits}: Karpathy splits are {tuple(KARPATHY_SPLITS)}")
        by_split = {s: by_split[s] for s in splits}
    else:
        split = split or infer_split(annotations)
        imgs, caps = parse_captions(annotations)
        by_split = {
            split: [
                {"image_id": iid, "rel_path": meta["file_name"], "captions": caps.get(iid, [])}
                for iid, meta in imgs.items()
            ]
        }
    written: dict[str, Path] = {}
    for name, entries in by_split.items():
        no_caps = [e for e in entries if not e["captions"]]
        if no_caps:
            log.warning("%s/%s: %d images have no captions and are left out", dataset, name, len(no_caps))
        entries = [e for e in entries if e["captions"]]
        written[name] = write_caption_split(
            entries, images, out, dataset, name, strict, shard_size, workers, progress, {**src, "split": name}
        )
    if train_tokenizer and "train" in by_split:
        texts = [c for e in by_split["train"] for _, c in e["captions"]] + list(extra_tokenizer_text)
        written["tokenizer"] = train_tokenizer_for(texts, out, dataset, vocab_size)
    return written

"""Writing and reading a split's webdataset shards.

On disk (``<data_dir>/<dataset>/<split>/``)::

    shard-000000.tar ...     one sample per image: ``<key>.<jpg|png|..>`` (original bytes) + ``<key>.json``
    manifest.json            counts, shard list with per-shard sample counts, skipped items with reasons
    captions.json            caption splits: COCO-format ground truth of exactly the written images
    questions.json           VQA splits: official-format questions (+ annotations.json when given)

A split is written into a hidden temporary folder beside it and renamed into place when complete, so a
crash leaves no half-written split and a rerun simply replaces it (stale temporary folders from a
crashed run are removed first).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import webdataset as wds
from tqdm import tqdm

from .images import ImageDecodeError, image_key, verify_image

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


class PrepareError(RuntimeError):
    """Preparation failed (strict mode hit a bad image, nothing was written, ...)."""


@dataclass
class ImageItem:
    """One image to write: its id, source file, and the JSON metadata stored beside it."""

    image_id: int
    path: Path
    meta: dict[str, Any]


@dataclass
class SplitWriter:
    """Write one split atomically: ``with SplitWriter(...) as w: w.write(...)``.

    Args:
        data_dir: root of all prepared datasets (``paths.data_dir``).
        dataset: dataset folder name (``coco``, ``vqav2``, ``shapes``, ``shapes_vqa``).
        split: split folder name (``train``, ``val``, ``test``, ``test-dev``).
        kind: ``captions`` or ``vqa`` (recorded in the manifest; the DataModules check it).
        shard_size: samples per shard (``wds.ShardWriter`` maxcount).
        shard_bytes: bytes per shard at most (``wds.ShardWriter`` maxsize).
        strict: a skipped image raises :class:`PrepareError` instead of being listed.
        source: provenance recorded in the manifest (input files, options).
    """

    data_dir: str | Path
    dataset: str
    split: str
    kind: str
    shard_size: int = 1000
    shard_bytes: float = 1e9
    strict: bool = False
    source: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in ("captions", "vqa"):
            raise ValueError(f"kind must be 'captions' or 'vqa', got {self.kind!r}")
        if self.shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {self.shard_size}")
        self.parent = Path(self.data_dir) / self.dataset
        self.final_dir = self.parent / self.split
        self.skipped: list[dict[str, Any]] = []
        self.num_samples = 0
        self.num_texts = 0
        self._counts: dict[str, int] = {}
        self._files: dict[str, Any] = {}

    # -- context -------------------------------------------------------------------------------------
    def __enter__(self) -> SplitWriter:
        self.parent.mkdir(parents=True, exist_ok=True)
        for stale in list(self.parent.glob(f".{self.split}.tmp-*")) + list(
            self.parent.glob(f".{self.split}.old-*")
        ):
            log.info("removing stale temporary folder %s from an earlier interrupted run", stale)
            shutil.rmtree(stale, ignore_errors=True)
        self.tmp_dir = self.parent / f".{self.split}.tmp-{os.getpid()}-{time.time_ns()}"
        self.tmp_dir.mkdir()
        self._writer = wds.ShardWriter(
            str(self.tmp_dir / "shard-%06d.tar"),
            maxcount=self.shard_size,
            maxsize=self.shard_bytes,
            verbose=0,
        )
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self._writer.close()
        finally:
            if exc_type is not None:
                shutil.rmtree(self.tmp_dir, ignore_errors=True)
        if exc_type is None:
            self._finalize()

    # -- writing -------------------------------------------------------------------------------------
    def write(
        self, key: str, image_ext: str, image_bytes: bytes, meta: dict[str, Any], num_texts: int
    ) -> None:
        """Add one sample (``key`` must be unique in the split and contain no dots)."""
        if "." in key:
            raise ValueError(f"sample key {key!r} must not contain '.' (webdataset splits keys at dots)")
        self._writer.write({"__key__": key, image_ext: image_bytes, "json": json.dumps(meta).encode()})
        self._counts[Path(self._writer.fname).name] = self._counts.get(Path(self._writer.fname).name, 0) + 1
        self.num_samples += 1
        self.num_texts += num_texts

    def skip(self, image_id: int, file: str, reason: str) -> None:
        """Record a skipped image (an error under ``strict``)."""
        if self.strict:
            raise PrepareError(
                f"image_id={image_id} file={file}: {reason} (strict mode; drop --strict to skip it)"
            )
        log.warning("skipping image_id=%s (%s): %s", image_id, file, reason)
        self.skipped.append({"image_id": image_id, "file": file, "reason": reason})

    def add_json(self, name: str, obj: Any) -> None:
        """A JSON file written beside the shards (ground truth in the official format)."""
        self._files[name] = obj

    def _finalize(self) -> None:
        tmp = self.tmp_dir
        try:
            if self.num_samples == 0:
                raise PrepareError(
                    f"{self.dataset}/{self.split}: no sample was written ({len(self.skipped)} skipped; "
                    f"first reasons: {[s['reason'] for s in self.skipped[:3]]})"
                )
            for path in tmp.glob("shard-*.tar"):  # ShardWriter opens a stream before the first write
                if path.name not in self._counts:
                    path.unlink()
            shards = [
                {"name": name, "count": count, "bytes": (tmp / name).stat().st_size}
                for name, count in sorted(self._counts.items())
            ]
            for name, obj in self._files.items():
                (tmp / name).write_text(json.dumps(obj))
            manifest = {
                "format_version": FORMAT_VERSION,
                "dataset": self.dataset,
                "split": self.split,
                "kind": self.kind,
                "num_samples": self.num_samples,
                "num_texts": self.num_texts,
                "num_skipped": len(self.skipped),
                "shards": shards,
                "files": sorted(self._files),
                "skipped": self.skipped,
                "source": self.source,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            }
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
            old = None
            if self.final_dir.exists():
                old = self.parent / f".{self.split}.old-{os.getpid()}-{time.time_ns()}"
                self.final_dir.rename(old)
            tmp.rename(self.final_dir)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info(
            "wrote %s: %d samples in %d shards, %d skipped",
            self.final_dir,
            self.num_samples,
            len(shards),
            len(self.skipped),
        )


def _read_verified(path: Path) -> tuple[bytes | None, tuple[int, int] | None, str | None]:
    """Read and fully decode one image file; returns (bytes, (w, h), None) or (None, None, reason)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None, None, "missing file"
    except OSError as err:
        return None, None, f"unreadable file: {err}"
    try:
        size = verify_image(data)
    except ImageDecodeError as err:
        return None, None, f"undecodable image: {err.__cause__ or err}"
    return data, size, None


def write_image_items(
    writer: SplitWriter,
    items: Iterable[ImageItem],
    num_texts: Any,
    workers: int = 0,
    progress: bool = True,
    total: int | None = None,
) -> None:
    """Read, verify and write each item (in order; ``workers`` > 0 decodes in a process pool).

    ``num_texts(meta) -> int`` counts the captions/questions of a sample for the manifest.
    """
    items = list(items)
    paths = [it.path for it in items]
    if workers > 0 and len(items) > 64:
        pool = ProcessPoolExecutor(max_workers=workers)
        results: Iterator = pool.map(_read_verified, paths, chunksize=32)
    else:
        pool = None
        results = map(_read_verified, paths)
    try:
        bar = tqdm(
            zip(items, results),
            total=total or len(items),
            desc=f"{writer.dataset}/{writer.split}",
            disable=not progress,
        )
        for item, (data, size, reason) in bar:
            if data is None:
                writer.skip(item.image_id, str(item.path), reason)
                continue
            item.meta["width"], item.meta["height"] = size  # upright size, as the loader will see it
            writer.write(f"{item.image_id:012d}", image_key(item.path), data, item.meta, num_texts(item.meta))
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)


# -- reading -------------------------------------------------------------------------------------------
def split_dir(data_dir: str | Path, dataset: str, split: str) -> Path:
    return Path(data_dir) / dataset / split


def read_manifest(path: str | Path, kind: str | None = None) -> dict[str, Any]:
    """The manifest of a prepared split (``path`` is the split folder); checks ``kind`` when given."""
    path = Path(path)
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise FileNotFoundError(
            f"{mpath} not found: split {path.name!r} of dataset {path.parent.name!r} is not prepared "
            f"(run data/prepare_coco.py, data/prepare_vqav2.py or data/generate_shapes.py with --out {path.parent.parent})"
        )
    manifest = json.loads(mpath.read_text())
    if kind is not None and manifest.get("kind") != kind:
        raise ValueError(f"{mpath}: split holds {manifest.get('kind')!r} samples, this loader needs {kind!r}")
    for shard in manifest["shards"]:
        if not (path / shard["name"]).is_file():
            raise FileNotFoundError(f"{path / shard['name']} listed in {mpath} is missing")
    return manifest


def shard_urls(path: str | Path, manifest: dict[str, Any]) -> list[str]:
    return [str(Path(path) / s["name"]) for s in manifest["shards"]]


def iter_tar_samples(urls: Iterable[str], handler) -> Iterator[dict[str, Any]]:
    """Raw samples (``__key__``, ``__url__``, undecoded bytes per extension) from a stream of shard paths."""
    return wds.tariterators.tarfile_samples(({"url": u} for u in urls), handler=handler)

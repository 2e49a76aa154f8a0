"""The streaming stage lists (IterableDatasets) behind the DataModules.

Training, per (rank, worker), for epoch ``e``::

    shard urls --resample (rng_e,r,w)--> tar samples --shuffle(buffer)--> parse json (skip corrupt)
      --> expand: caption = one random caption per image | vqa = one pair per question --shuffle pairs-->
      [mix sources by weight] --> group into raw batches --> skip the first k --> decode + collate

Everything before "decode" touches only tar bytes and JSON, so skipping what a resumed run already
consumed costs reading, not decoding. The stream is a pure function of (seed, epoch, rank, worker):
the DataLoader hands out batches round-robin over workers, so global batch ``i`` of a rank comes from
stream ``i % W`` as its ``i // W``-th batch. Resuming after ``n`` consumed batches, loader worker ``w``
plays stream ``(w + n) % W`` (the round robin restarts at worker 0) and skips that stream's first
``ceil((n - s) / W)`` batches.

Evaluation: the split's samples, numbered in shard order, are cut into ``R * W`` contiguous ranges
(sizes within one of each other); (rank r, worker w) reads range ``r * W + w``. Every sample is seen
exactly once over all ranks and workers, in a fixed order; ranks differ by at most one sample.

Corrupt data (an unreadable tar member, bad JSON, an undecodable image) is skipped, logged and counted;
the count travels with the next batch under ``_skipped`` (the loader pops it). More than
``max_skip_fraction`` of the samples seen (after the first 10 skips) raises: bulk corruption is a bug
to fix, not noise to ignore.

Caching (``cache_mb`` of the DataModules; the processor's :class:`~vlm_mamba.data.collate.MemoryBudget`):
a training shard read without error is kept in memory while the budget lasts (:class:`ShardCache`),
so a resampled shard is parsed from its tar once per process. The stream is the same sample for sample.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import random
from collections.abc import Iterator
from typing import Any

from torch.utils.data import IterableDataset, get_worker_info

from .collate import MemoryBudget, Processor, RawImage, RawPair
from .images import IMAGE_KEYS
from .prompts import caption_prompt, vqa_prompt
from .shards import iter_tar_samples

log = logging.getLogger(__name__)

SKIPPED_KEY = "_skipped"


def stream_seed(*parts: Any) -> int:
    """A 64-bit seed from any tuple of ints/strings (stable across processes and Python runs)."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little")


def worker_slot() -> tuple[int, int]:
    """(worker id, number of workers) of the current DataLoader worker; (0, 1) in the main process."""
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


def worker_batches(total: int, worker: int, num_workers: int) -> int:
    """How many of the global batch positions ``0 .. total-1`` fall to ``worker`` (round robin)."""
    return max(0, (total - worker + num_workers - 1) // num_workers)


def shuffled(items: Iterator, bufsize: int, rng: random.Random) -> Iterator:
    """Buffer shuffle (webdataset's ``shuffle`` stage, with our rng)."""
    if bufsize <= 1:
        yield from items
        return
    buf: list = []
    for x in items:
        if len(buf) < bufsize:
            buf.append(x)
            continue
        i = rng.randrange(bufsize)
        buf[i], x = x, buf[i]
        yield x
    rng.shuffle(buf)
    yield from buf


class ShardCache:
    """The raw samples of whole shards, kept after a first read that raised no error while ``budget``
    lasts; later reads of a kept shard come from memory (the samples as the tar gave them)."""

    def __init__(self, budget: MemoryBudget):
        self.budget = budget
        self.shards: dict[str, list[dict[str, Any]]] = {}

    def samples(self, urls: Iterator[str], handler) -> Iterator[dict[str, Any]]:
        """``iter_tar_samples(urls, handler)``, one shard at a time, kept shards from memory."""
        for url in urls:
            kept = self.shards.get(url)
            if kept is not None:
                yield from (dict(s) for s in kept)
                continue
            errors = 0

            def counted(exn: Exception) -> bool:
                nonlocal errors
                errors += 1
                return handler(exn)

            read = []
            for sample in iter_tar_samples([url], handler=counted):
                read.append(dict(sample))
                yield sample
            size = sum(len(v) + 100 for s in read for v in s.values() if isinstance(v, bytes | str))
            if not errors and self.budget.take(size):
                self.shards[url] = read


class _Stream(IterableDataset):
    """Shared bits: skip counting with a bulk-corruption guard, parsing a raw tar sample."""

    def __init__(self, processor: Processor, max_skip_fraction: float):
        super().__init__()
        self.processor = processor
        self.max_skip_fraction = max_skip_fraction
        self.skipped = 0  # raw-stage skips (tar members, json); decode skips live on the processor
        self.seen = 0
        self._reported = 0

    def _skip(self, what: str, err: Any) -> None:
        self.skipped += 1
        log.warning("skipping corrupt sample %s: %s", what, err)
        self._guard()

    def _guard(self) -> None:
        bad = self.skipped + self.processor.skipped
        seen = max(self.seen, self.processor.attempts, 1)  # VQA training decodes an image once per question
        if bad > 10 and bad > self.max_skip_fraction * seen:
            raise RuntimeError(
                f"{bad} of {seen} samples were corrupt (more than max_skip_fraction={self.max_skip_fraction}); "
                "the shards are damaged: re-run the prepare script"
            )

    def tar_error(self, exn: Exception) -> bool:
        """webdataset handler: an unreadable shard or member is skipped and counted."""
        self._skip("(tar read)", repr(exn))
        return True

    def parse(self, sample: dict[str, Any]) -> tuple[str, bytes, dict[str, Any]] | None:
        """(key, image bytes, meta) or None (counted) for a malformed sample."""
        self.seen += 1
        key = f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"
        image = next((sample[k] for k in IMAGE_KEYS if k in sample), None)
        if image is None or "json" not in sample:
            self._skip(
                key,
                f"missing image or json member (has {sorted(k for k in sample if not k.startswith('__'))})",
            )
            return None
        try:
            meta = json.loads(sample["json"])
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            self._skip(key, f"bad json: {err}")
            return None
        return key, image, meta

    def finish(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Attach the skips since the last batch (the loader pops them in the main process)."""
        self._guard()
        total = self.skipped + self.processor.skipped
        batch[SKIPPED_KEY] = total - self._reported
        self._reported = total
        return batch


class TrainStream(_Stream):
    """Resampled, shuffled, fixed-length training stream of image-text pairs (see the module docstring).

    Args:
        sources: ``[(kind, shard urls)]`` with kind ``captions`` or ``vqa``; several are mixed by ``weights``.
        batch_size: pairs per batch.
        batches_per_epoch: batches this rank yields per epoch (``len(self)``).
        rank, world_size: this process's place in data parallelism.
        shuffle_buffer: samples held by each shuffle stage.
    """

    def __init__(
        self,
        sources: list[tuple[str, list[str]]],
        processor: Processor,
        batch_size: int,
        batches_per_epoch: int,
        seed: int,
        rank: int,
        world_size: int,
        shuffle_buffer: int = 1000,
        weights: list[float] | None = None,
        max_skip_fraction: float = 0.05,
    ):
        super().__init__(processor, max_skip_fraction)
        for kind, urls in sources:
            if kind not in ("captions", "vqa") or not urls:
                raise ValueError(f"bad training source {kind!r} with {len(urls)} shards")
        self.sources = sources
        self.weights = weights or [1.0] * len(sources)
        if len(self.weights) != len(sources) or min(self.weights) < 0 or sum(self.weights) <= 0:
            raise ValueError(
                f"weights={self.weights} must be {len(sources)} non-negative numbers, not all zero"
            )
        self.batch_size = batch_size
        self.batches_per_epoch = batches_per_epoch
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.shuffle_buffer = shuffle_buffer
        self.epoch = 0
        self.skip_batches = 0  # batches of this epoch already consumed on this rank
        self.shard_cache = ShardCache(processor.cache) if processor.cache is not None else None

    def __len__(self) -> int:
        return self.batches_per_epoch

    # -- raw stages ----------------------------------------------------------------------------------
    def _resampled(self, urls: list[str], rng: random.Random) -> Iterator[str]:
        """Shards drawn with replacement forever; fails if many draws in a row give no sample."""
        dry = 0
        last_seen = self.seen
        while True:
            if self.seen == last_seen:
                dry += 1
                if dry > max(50, 5 * len(urls)):
                    raise RuntimeError(f"{dry} shards in a row gave no readable sample: {urls[:3]}...")
            else:
                dry, last_seen = 0, self.seen
            yield rng.choice(urls)

    def _pairs(self, kind: str, urls: list[str], tag: int, w: int) -> Iterator[RawPair]:
        parts = (self.seed, self.epoch, self.rank, w, tag)
        rng_shards, rng_shuf, rng_pick = (
            random.Random(stream_seed(*parts, s)) for s in ("shards", "shuffle", "pick")
        )
        shards = self._resampled(urls, rng_shards)
        if self.shard_cache is not None:
            samples = self.shard_cache.samples(shards, self.tar_error)
        else:
            samples = iter_tar_samples(shards, handler=self.tar_error)
        samples = shuffled(samples, self.shuffle_buffer, rng_shuf)
        proc = self.processor
        for sample in samples:
            parsed = self.parse(sample)
            if parsed is None:
                continue
            key, image, meta = parsed
            if kind == "captions":
                caps = meta.get("captions") or []
                if not caps:
                    self._skip(key, "no captions")
                    continue
                yield RawPair(key, image, caption_prompt(proc.caption_template), rng_pick.choice(caps))
            else:
                pairs = []
                for q in meta.get("questions", []):
                    if "multiple_choice_answer" not in q:
                        raise ValueError(
                            f"{key}: question {q.get('question_id')} has no answer; is this a test split?"
                        )
                    pairs.append(
                        RawPair(
                            key,
                            image,
                            vqa_prompt(q["question"], proc.vqa_template),
                            q["multiple_choice_answer"],
                        )
                    )
                yield from pairs

    def _mixed(self, w: int) -> Iterator[RawPair]:
        streams = []
        for tag, (kind, urls) in enumerate(self.sources):
            pairs = self._pairs(kind, urls, tag, w)
            if kind == "vqa":  # pairs of one image arrive together: spread them out
                rng = random.Random(stream_seed(self.seed, self.epoch, self.rank, w, tag, "pairs"))
                pairs = shuffled(pairs, self.shuffle_buffer, rng)
            streams.append(pairs)
        if len(streams) == 1:
            yield from streams[0]
            return
        rng = random.Random(stream_seed(self.seed, self.epoch, self.rank, w, "mix"))
        while True:
            yield next(rng.choices(streams, weights=self.weights)[0])

    def raw_batches(self, w: int) -> Iterator[list[RawPair]]:
        """This worker's raw batches of the epoch, none skipped yet (deterministic, no decoding)."""
        pairs = self._mixed(w)
        while True:
            yield list(itertools.islice(pairs, self.batch_size))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        w, nw = worker_slot()
        done = min(self.skip_batches, self.batches_per_epoch)
        # The DataLoader starts its round robin at worker 0 whatever the position, so after ``done``
        # batches loader worker w plays stream (w + done) % nw: the j-th batch it hands out is then
        # global batch done + j, as in an uninterrupted epoch.
        s = (w + done) % nw
        mine = worker_batches(self.batches_per_epoch, s, nw)
        skip = worker_batches(done, s, nw)
        raw = self.raw_batches(s)
        last = None
        for i in range(mine):
            raw_batch = next(raw)
            if i < skip:  # consumed before the resume: drawn (keeps the rngs in step), not decoded
                continue
            batch = self.processor.train_batch(raw_batch)
            self._guard()
            while batch is None and last is None:  # a wholly corrupt first batch: draw another
                batch = self.processor.train_batch(next(raw))
                self._guard()
            if batch is None:
                log.warning(
                    "a whole training batch was corrupt; repeating the previous batch to keep positions"
                )
                batch = last
            last = batch
            yield self.finish(dict(batch))


class EvalStream(_Stream):
    """Every sample of one split exactly once over all ranks and workers, in a fixed order.

    Args:
        kind: ``captions`` (caption eval batches) or ``vqa`` (grouped-by-image VQA batches).
        urls, counts: the split's shards in order and their sample counts (from the manifest).
        batch_size: images per batch.
        num_workers: the DataLoader's worker count (only for ``len``).
    """

    def __init__(
        self,
        kind: str,
        urls: list[str],
        counts: list[int],
        processor: Processor,
        batch_size: int,
        rank: int,
        world_size: int,
        num_workers: int,
        max_skip_fraction: float = 0.05,
    ):
        super().__init__(processor, max_skip_fraction)
        if kind not in ("captions", "vqa"):
            raise ValueError(f"kind must be 'captions' or 'vqa', got {kind!r}")
        self.kind, self.urls, self.counts = kind, urls, counts
        self.batch_size = batch_size
        self.rank, self.world_size, self.num_workers = rank, world_size, max(1, num_workers)

    def sample_range(self, rank: int, worker: int, num_workers: int) -> tuple[int, int]:
        """[start, end) of global sample indices read by (rank, worker)."""
        n, slots = sum(self.counts), self.world_size * num_workers
        slot = rank * num_workers + worker
        return n * slot // slots, n * (slot + 1) // slots

    def __len__(self) -> int:
        total = 0
        for w in range(self.num_workers):
            a, b = self.sample_range(self.rank, w, self.num_workers)
            total += math.ceil((b - a) / self.batch_size)
        return total

    def _samples(self, start: int, end: int) -> Iterator[RawImage]:
        offset = 0
        for url, count in zip(self.urls, self.counts):
            lo, hi = offset, offset + count
            offset = hi
            if hi <= start or lo >= end:
                continue
            for i, sample in enumerate(iter_tar_samples([url], handler=self.tar_error)):
                g = lo + i
                if g < start:
                    continue
                if g >= end:
                    break
                parsed = self.parse(sample)
                if parsed is not None:
                    yield RawImage(*parsed)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        w, nw = worker_slot()
        start, end = self.sample_range(self.rank, w, nw)
        items = self._samples(start, end)
        collate = (
            self.processor.caption_eval_batch if self.kind == "captions" else self.processor.vqa_eval_batch
        )
        while chunk := list(itertools.islice(items, self.batch_size)):
            batch = collate(chunk)
            self._guard()
            if batch is not None:
                yield self.finish(batch)

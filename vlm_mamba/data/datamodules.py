"""LightningDataModules streaming the prepared shards: captions, VQA, and a caption+VQA mix.

Constructor arguments are plain values so Hydra configs (``conf/data/*.yaml``) can target these
classes with ``_target_``. Paths: shards under ``<data_dir>/<dataset>/<split>/``; the tokenizer defaults
to ``<data_dir>/<dataset>/tokenizer.json``.

Exact resume. The training loader counts the batches it hands out in the current epoch; its
``state_dict()`` (also ``datamodule.state_dict()``) is ``{"epoch", "batches_consumed", ...}``.
Lightning saves it in checkpoints through both hooks (the loader is ``_Stateful`` and the datamodule
has ``state_dict``) and restores it on resume, after which the stream skips exactly the consumed
batches without decoding them. Lightning's per-epoch ``set_epoch`` reaches the loader through its
sampler; ``datamodule.set_epoch(e)`` does the same by hand. A loader iterated again after a full
epoch moves to the next epoch by itself. Exactness needs the same seed, batch size, world size and
num_workers; a mismatch is logged and the skip is then approximate.

Counting skips. Corrupt samples are skipped in the workers and counted; the count reaches
``datamodule.skipped_samples`` (and a logged warning) as the batches arrive.

Evaluation under DDP. Each rank reads a contiguous slice of the split (sizes within one sample), so
ranks may run one batch more or fewer: gather predictions at epoch end (``all_gather_object``)
rather than calling collectives per validation step.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Sampler

from .collate import MemoryBudget, Processor
from .pipeline import SKIPPED_KEY, EvalStream, TrainStream
from .prompts import CAPTION_PROMPT, VQA_PROMPT, check_template
from .shards import read_manifest, shard_urls
from .tokenizer import TextTokenizer

log = logging.getLogger(__name__)

SHAPES_DATASETS = ("shapes", "shapes_vqa")

# Lightning warns about every IterableDataset with a ``__len__`` that it "could be inaccurate" with
# several loader workers "if each worker is not configured independently". Ours are: each worker
# plays its own stream, and the lengths are exact by construction (``pipeline.worker_batches``,
# tested in tests/test_data_loaders.py), so the warning has nothing to say about these loaders.
warnings.filterwarnings(
    "ignore", message=r"Your `IterableDataset` has `__len__` defined", category=UserWarning
)


class _EpochSampler(Sampler):
    """The placeholder sampler of an iterable-dataset DataLoader (``None`` forever, as torch's own),
    plus ``set_epoch``: Lightning calls ``dataloader.sampler.set_epoch(epoch)`` every training epoch."""

    def __init__(self, loader: TrainLoader):
        self.loader = loader

    def __iter__(self):
        while True:
            yield None

    def set_epoch(self, epoch: int) -> None:
        self.loader.set_epoch(epoch)


class StreamLoader(DataLoader):
    """DataLoader over a stream that yields whole batches (``batch_size=None``); pops the skip count."""

    def __init__(
        self,
        dataset,
        num_workers: int,
        on_skipped,
        pin_memory: bool = False,
        prefetch_factor: int | None = 2,
        seed: int = 0,
    ):
        super().__init__(
            dataset,
            batch_size=None,
            num_workers=num_workers,
            pin_memory=pin_memory,
            prefetch_factor=prefetch_factor if num_workers > 0 else None,
            persistent_workers=False,  # workers must see each epoch's (epoch, skip) state
            # the loader's own generator for the base seed every iterator draws: without it each new
            # epoch's iterator took a number from the global generator, between a checkpoint written at
            # an epoch's last batch and the next batch, so a run resumed there drew other dropout
            # masks than the uninterrupted one (the streams' shuffles have seeds of their own)
            generator=torch.Generator().manual_seed(seed),
        )
        self._on_skipped = on_skipped

    def __iter__(self):  # a generator: workers start at the first next(), after Lightning's set_epoch
        for batch in super().__iter__():
            n = batch.pop(SKIPPED_KEY, 0)
            if n:
                self._on_skipped(int(n))
            yield batch


class TrainLoader(StreamLoader):
    """The training loader: epoch + position, ``set_epoch``, ``state_dict``/``load_state_dict``."""

    def __init__(self, dataset: TrainStream, num_workers: int, on_skipped, **kw):
        super().__init__(dataset, num_workers, on_skipped, **kw)
        object.__setattr__(self, "sampler", _EpochSampler(self))  # DataLoader forbids plain assignment
        self.epoch = 0
        self.batches_consumed = 0

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its first batch (no-op for the current epoch: keeps a restored position)."""
        if epoch != self.epoch:
            self.epoch, self.batches_consumed = int(epoch), 0

    def _config(self) -> dict[str, int]:
        ds = self.dataset
        return {
            "seed": ds.seed,
            "batch_size": ds.batch_size,
            "world_size": ds.world_size,
            "num_workers": self.num_workers,
            "batches_per_epoch": ds.batches_per_epoch,
        }

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batches_consumed": self.batches_consumed, **self._config()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        diff = {k: (state.get(k), v) for k, v in self._config().items() if k in state and state[k] != v}
        if diff:
            log.warning(
                "resuming the data stream with a different setup (saved, now): %s; the skip is approximate",
                diff,
            )
        self.epoch, self.batches_consumed = int(state["epoch"]), int(state["batches_consumed"])

    def __iter__(self):
        if self.batches_consumed >= len(self.dataset):  # iterated again after a full epoch
            self.epoch, self.batches_consumed = self.epoch + 1, 0
        self.dataset.epoch, self.dataset.skip_batches = self.epoch, self.batches_consumed
        for batch in super().__iter__():
            self.batches_consumed += 1
            yield batch


class _StreamingDataModule(L.LightningDataModule):
    """Shared constructor and plumbing; see :class:`CaptionDataModule` for the arguments."""

    def __init__(
        self,
        data_dir: str = "data",
        dataset: str = "shapes",
        train_split: str = "train",
        val_split: str | None = "val",
        test_split: str | None = "test",
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        shuffle_buffer: int = 1000,
        samples_per_epoch: int = 10000,
        batches_per_epoch: int | None = None,
        seed: int = 0,
        vision_mode: str = "encoder",
        img_size: int = 224,
        patch_size: int = 16,
        max_img_size: int = 448,
        tokenizer: str | None = None,
        max_text_len: int = 64,
        pad_to_multiple_of: int = 1,
        pin_memory: bool = False,
        prefetch_factor: int = 2,
        max_skip_fraction: float = 0.05,
        rank: int | None = None,
        world_size: int | None = None,
        build_shapes_if_missing: bool = True,
        cache_mb: float = 0,
    ):
        super().__init__()
        for name, v in (
            ("batch_size", batch_size),
            ("samples_per_epoch", samples_per_epoch),
            ("prefetch_factor", prefetch_factor),
        ):
            if int(v) < 1:
                raise ValueError(f"data.{name}={v} must be >= 1")
        if num_workers < 0:
            raise ValueError(f"data.num_workers={num_workers} must be >= 0")
        if cache_mb < 0:
            raise ValueError(f"data.cache_mb={cache_mb} must be >= 0")
        if batches_per_epoch is not None and batches_per_epoch < 1:
            raise ValueError(f"data.batches_per_epoch={batches_per_epoch} must be >= 1 (or null)")
        if vision_mode not in ("encoder", "fuyu"):
            raise ValueError(f"data.vision_mode={vision_mode!r} must be 'encoder' or 'fuyu'")
        if (rank is None) != (world_size is None) or (world_size is not None and not 0 <= rank < world_size):
            raise ValueError(
                f"data.rank={rank} / data.world_size={world_size}: give both (0 <= rank < world_size) or neither"
            )
        self.data_dir = Path(data_dir)
        self.dataset = dataset
        self.train_split, self.val_split, self.test_split = train_split, val_split, test_split
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size or batch_size)
        self.num_workers = int(num_workers)
        self.shuffle_buffer = int(shuffle_buffer)
        self.samples_per_epoch = int(samples_per_epoch)
        self.batches_per_epoch_override = batches_per_epoch
        self.seed = int(seed)
        self.vision_mode, self.img_size, self.patch_size, self.max_img_size = (
            vision_mode,
            img_size,
            patch_size,
            max_img_size,
        )
        self.tokenizer_path = Path(tokenizer) if tokenizer else self.data_dir / dataset / "tokenizer.json"
        self.max_text_len = int(max_text_len)
        self.pad_to_multiple_of = int(pad_to_multiple_of)
        self.pin_memory, self.prefetch_factor = pin_memory, prefetch_factor
        self.max_skip_fraction = max_skip_fraction
        self._rank, self._world_size = rank, world_size
        self.build_shapes_if_missing = build_shapes_if_missing
        self.cache_mb = float(cache_mb)
        self.skipped_samples = 0
        self._tokenizer: TextTokenizer | None = None
        self._train_loader: TrainLoader | None = None
        self._pending_state: dict[str, Any] | None = None
        self._caption_template, self._vqa_template = CAPTION_PROMPT, VQA_PROMPT

    # -- resources -----------------------------------------------------------------------------------
    def _datasets(self) -> list[str]:
        return [self.dataset]

    def prepare_data(self) -> None:
        """Builds the shapes dataset when it is the one asked for and is missing (local rank 0 only)."""
        missing = [
            d
            for d in self._datasets()
            if not (self.data_dir / d / self.train_split / "manifest.json").exists()
        ]
        if missing and self.build_shapes_if_missing and all(d in SHAPES_DATASETS for d in missing):
            from .shapes import build_shapes_dataset

            log.info(
                "shapes dataset missing under %s: building it (defaults of build_shapes_dataset)",
                self.data_dir,
            )
            build_shapes_dataset(self.data_dir)

    @property
    def tokenizer(self) -> TextTokenizer:
        """The tokenizer (loaded on first use; call ``prepare_data()`` first if the data may be missing)."""
        if self._tokenizer is None:
            self._tokenizer = TextTokenizer.load(self.tokenizer_path)
        return self._tokenizer

    @tokenizer.setter
    def tokenizer(self, tokenizer: TextTokenizer) -> None:
        """Use this tokenizer (e.g. the one saved with a checkpoint) instead of loading ``tokenizer_path``."""
        self._tokenizer = tokenizer

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def dist(self) -> tuple[int, int]:
        """(rank, world_size): explicit arguments, else torch.distributed, else the trainer, else (0, 1)."""
        if self._rank is not None:
            return self._rank, self._world_size
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        trainer = getattr(self, "_trainer", None)
        if trainer is not None:
            return trainer.global_rank, trainer.world_size
        return 0, 1

    def processor(self, cache_mb: float = 0) -> Processor:
        """The decode/tokenize/collate stage; ``cache_mb`` > 0 gives it (and its stream) a cache budget."""
        return Processor(
            tokenizer=self.tokenizer,
            vision_mode=self.vision_mode,
            img_size=self.img_size,
            patch_size=self.patch_size,
            max_img_size=self.max_img_size,
            max_text_len=self.max_text_len,
            caption_template=self._caption_template,
            vqa_template=self._vqa_template,
            pad_to_multiple_of=self.pad_to_multiple_of,
            cache=MemoryBudget(cache_mb) if cache_mb > 0 else None,
        )

    def split_shards(self, dataset: str, split: str, kind: str) -> tuple[list[str], list[int]]:
        path = self.data_dir / dataset / split
        manifest = read_manifest(path, kind)
        return shard_urls(path, manifest), [s["count"] for s in manifest["shards"]]

    def batches_per_epoch(self) -> int:
        """Training batches per epoch on each rank."""
        if self.batches_per_epoch_override:
            return int(self.batches_per_epoch_override)
        return max(1, self.samples_per_epoch // (self.batch_size * self.dist()[1]))

    def _on_skipped(self, n: int) -> None:
        self.skipped_samples += n
        log.warning("data: %d corrupt sample(s) skipped (%d in total so far)", n, self.skipped_samples)

    # -- loaders -------------------------------------------------------------------------------------
    def _train_sources(self) -> tuple[list[tuple[str, list[str]]], list[float]]:
        raise NotImplementedError

    def train_dataloader(self) -> TrainLoader:
        rank, world = self.dist()
        sources, weights = self._train_sources()
        stream = TrainStream(
            sources,
            self.processor(self.cache_mb),
            self.batch_size,
            self.batches_per_epoch(),
            self.seed,
            rank,
            world,
            self.shuffle_buffer,
            weights,
            self.max_skip_fraction,
        )
        loader = TrainLoader(
            stream,
            self.num_workers,
            self._on_skipped,
            pin_memory=self.pin_memory,
            prefetch_factor=self.prefetch_factor,
            seed=self.seed,
        )
        if self._pending_state is not None:
            loader.load_state_dict(self._pending_state)
            self._pending_state = None
        self._train_loader = loader
        return loader

    def _eval_loader(self, dataset: str, split: str, kind: str) -> StreamLoader:
        rank, world = self.dist()
        urls, counts = self.split_shards(dataset, split, kind)
        stream = EvalStream(
            kind,
            urls,
            counts,
            self.processor(),
            self.eval_batch_size,
            rank,
            world,
            self.num_workers,
            self.max_skip_fraction,
        )
        return StreamLoader(
            stream,
            self.num_workers,
            self._on_skipped,
            pin_memory=self.pin_memory,
            prefetch_factor=self.prefetch_factor,
        )

    # -- resume --------------------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        if self._train_loader is not None:
            self._train_loader.set_epoch(epoch)
        else:
            self._pending_state = {"epoch": epoch, "batches_consumed": 0}

    def state_dict(self) -> dict[str, Any]:
        """``{"epoch", "batches_consumed", "seed", "batch_size", "world_size", "num_workers", "batches_per_epoch"}``
        of the training stream on this rank (all ranks consume the same number of batches)."""
        if self._train_loader is not None:
            return self._train_loader.state_dict()
        return dict(self._pending_state or {})

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume at ``state_dict``'s position: the next training batch is the first not yet consumed."""
        if not state_dict:
            return
        if self._train_loader is not None:
            self._train_loader.load_state_dict(state_dict)
        else:
            self._pending_state = dict(state_dict)


class CaptionDataModule(_StreamingDataModule):
    """COCO-style captioning: one (image, random caption) pair per image visit in training; evaluation
    batches carry every reference caption.

    Args:
        data_dir: ``paths.data_dir``; shards in ``<data_dir>/<dataset>/<split>/``.
        dataset: ``shapes`` (synthetic, built on demand), ``coco``, or any folder written by prepare_coco.
        train_split, val_split, test_split: split folder names (``null`` val/test: no such loader).
        batch_size: training pairs per batch per rank; eval_batch_size: images per eval batch (default batch_size).
        num_workers: DataLoader workers per rank (0 = in the main process).
        shuffle_buffer: samples held by each shuffle stage (raw bytes; ~160 KB per COCO image).
        samples_per_epoch: training pairs per epoch over all ranks; batches_per_epoch: per rank, wins if set.
        seed: the stream of (rank, worker) in epoch e is a function of (seed, e, rank, worker).
        vision_mode: ``encoder`` (square img_size) or ``fuyu`` (aspect kept, longer side <= max_img_size,
            padded to patch_size; batches carry ``image_sizes``).
        img_size, patch_size, max_img_size: as ``model.vision``.
        tokenizer: tokenizer.json file or HF folder; default ``<data_dir>/<dataset>/tokenizer.json``.
        max_text_len: tokens per training sequence (BOS/EOS included); longer targets are cut.
        prompt: caption prompt template (default ``""``: BOS only).
        pad_to_multiple_of: round padded text lengths up to this multiple.
        pin_memory, prefetch_factor: DataLoader options.
        max_skip_fraction: more corrupt samples than this fraction (after 10) is an error.
        rank, world_size: override torch.distributed (tests, custom launchers).
        build_shapes_if_missing: ``prepare_data`` builds the shapes dataset when it is asked for and absent.
        cache_mb: memory (MB) the training stream may keep per process (each loader worker its own):
            shards after their first read, decoded and resized images, tokenized texts after their
            first use. A dataset that fits (the shapes demo, ~250 MB) is then read, decoded and
            tokenized once per process, not once per visit; the batches are the same. 0 (the
            default): no caching, for data that does not fit (COCO streams ~160 KB per image).
    """

    def __init__(self, *args: Any, prompt: str | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._caption_template = check_template(
            CAPTION_PROMPT if prompt is None else prompt, "captions", "data.prompt"
        )

    def _train_sources(self):
        return [("captions", self.split_shards(self.dataset, self.train_split, "captions")[0])], [1.0]

    def val_dataloader(self):
        return self._eval_loader(self.dataset, self.val_split, "captions") if self.val_split else []

    def test_dataloader(self):
        return self._eval_loader(self.dataset, self.test_split, "captions") if self.test_split else []


class VQADataModule(_StreamingDataModule):
    """VQAv2-style VQA: training on (image, question, most common answer) pairs; evaluation batches
    group all questions of an image (``image_index`` maps questions to images).

    Arguments as :class:`CaptionDataModule`, with ``dataset`` ``shapes_vqa`` or ``vqav2`` and
    ``prompt`` the VQA template (default ``"Question: {q} Answer:"``; must contain ``{q}``).
    ``samples_per_epoch`` counts image-question pairs; ``eval_batch_size`` counts images.
    """

    def __init__(self, *args: Any, dataset: str = "shapes_vqa", prompt: str | None = None, **kwargs: Any):
        super().__init__(*args, dataset=dataset, **kwargs)
        self._vqa_template = check_template(VQA_PROMPT if prompt is None else prompt, "vqa", "data.prompt")

    def _train_sources(self):
        return [("vqa", self.split_shards(self.dataset, self.train_split, "vqa")[0])], [1.0]

    def val_dataloader(self):
        return self._eval_loader(self.dataset, self.val_split, "vqa") if self.val_split else []

    def test_dataloader(self):
        return self._eval_loader(self.dataset, self.test_split, "vqa") if self.test_split else []


class MixDataModule(_StreamingDataModule):
    """Captioning and VQA together: training batches mix pairs of both (per-pair draw with
    ``caption_weight`` : ``1 - caption_weight``); validation/test return two loaders,
    ``[captions, vqa]`` (Lightning's ``dataloader_idx`` 0 and 1).

    Arguments as :class:`CaptionDataModule`, plus ``caption_dataset`` / ``vqa_dataset`` (folder names),
    ``caption_prompt`` / ``vqa_prompt`` and ``caption_weight``. The tokenizer defaults to the caption
    dataset's; both datasets must share it (the shapes build writes the same one to both).
    """

    def __init__(
        self,
        *args: Any,
        caption_dataset: str = "shapes",
        vqa_dataset: str = "shapes_vqa",
        caption_prompt: str | None = None,
        vqa_prompt: str | None = None,
        caption_weight: float = 0.5,
        **kwargs: Any,
    ):
        super().__init__(*args, dataset=caption_dataset, **kwargs)
        if not 0.0 <= caption_weight <= 1.0:
            raise ValueError(f"data.caption_weight={caption_weight} must be in [0, 1]")
        self.caption_dataset, self.vqa_dataset, self.caption_weight = (
            caption_dataset,
            vqa_dataset,
            caption_weight,
        )
        self._caption_template = check_template(
            CAPTION_PROMPT if caption_prompt is None else caption_prompt, "captions", "data.caption_prompt"
        )
        self._vqa_template = check_template(
            VQA_PROMPT if vqa_prompt is None else vqa_prompt, "vqa", "data.vqa_prompt"
        )

    def _datasets(self) -> list[str]:
        return [self.caption_dataset, self.vqa_dataset]

    def _train_sources(self):
        return (
            [
                ("captions", self.split_shards(self.caption_dataset, self.train_split, "captions")[0]),
                ("vqa", self.split_shards(self.vqa_dataset, self.train_split, "vqa")[0]),
            ],
            [self.caption_weight, 1.0 - self.caption_weight],
        )

    def _eval_pair(self, split: str | None):
        if not split:
            return []
        return [
            self._eval_loader(self.caption_dataset, split, "captions"),
            self._eval_loader(self.vqa_dataset, split, "vqa"),
        ]

    def val_dataloader(self):
        return self._eval_pair(self.val_split)

    def test_dataloader(self):
        return self._eval_pair(self.test_split)

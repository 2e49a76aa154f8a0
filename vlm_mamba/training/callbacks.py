"""Lightning callbacks that exact resume needs beyond what Lightning checkpoints by itself.

Lightning's checkpoint holds the model, optimiser, scheduler and loop progress (step, batch in
epoch). It does not hold the random number generators, so a resumed run would draw different
dropout masks and sampling noise than an uninterrupted one. :class:`RNGStateCheckpoint` adds them.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

import lightning as L
import numpy as np
import torch


def get_rng_state() -> dict[str, Any]:
    """Python, NumPy, torch CPU and CUDA generator states, in types ``torch.load(weights_only=True)``
    accepts (NumPy's key array is stored as a tensor)."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "kind": np_state[0],
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`get_rng_state`."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class RNGStateCheckpoint(L.Callback):
    """Saves the RNG states in every checkpoint and restores them where training resumes.

    Two rules make the random stream of a resumed run equal to the uninterrupted one's:

    - validation runs inside a fork of the generators (states saved at ``on_validation_start``,
      put back at ``on_validation_end``), so how often and where validation ran, or whether its
      dataloader iterator drew a seed, does not move the training stream;
    - the states from the checkpoint are applied at the first ``on_train_batch_start`` after
      loading, not at load time, because setting up the resumed run (dataloader iterators,
      sanity validation) draws from the global generators before training continues.

    With several ranks each rank saves and restores its own states (``state_key`` carries no rank:
    Lightning saves rank 0's callback state, so other ranks restore rank 0's generators, which is
    what ``seed_everything`` gave them at the start as well).
    """

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None
        self._val_fork: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        # called while the checkpoint is dumped; inside validation the saved training stream is the fork's
        return {"rng": self._val_fork if self._val_fork is not None else get_rng_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict.get("rng")

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ):
        if self._pending is not None:
            set_rng_state(self._pending)
            self._pending = None

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "fit":
            self._val_fork = get_rng_state()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._val_fork is not None:
            set_rng_state(self._val_fork)
            self._val_fork = None


class OverfitBatches(L.Callback):
    """Train on the first ``num_batches`` training batches over and over (``debug=overfit``).

    Lightning's ``overfit_batches`` rebuilds the dataloaders with a ``SequentialSampler``, which the
    streaming loaders (``vlm_mamba.data``: batches come whole from an IterableDataset) do not take.
    This replays cached batches instead: each batch dict is replaced in place at
    ``on_train_batch_start``, so ``training_step`` sees the cached tensors. The loader keeps
    streaming (and decoding) underneath; only its batches are discarded.
    """

    def __init__(self, num_batches: int = 1) -> None:
        if num_batches < 1:
            raise ValueError(f"callbacks.overfit.num_batches={num_batches} must be >= 1")
        self.num_batches = num_batches
        self._cache: list[dict[str, Any]] = []
        self._i = 0

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ):
        if not isinstance(batch, dict):
            raise TypeError(f"OverfitBatches needs dict batches, got {type(batch).__name__}")
        if len(self._cache) < self.num_batches:
            self._cache.append({k: v.clone() if torch.is_tensor(v) else v for k, v in batch.items()})
        cached = self._cache[self._i % len(self._cache)]
        self._i += 1
        batch.clear()
        batch.update(cached)


def batch_size_of(batch: Mapping[str, Any]) -> int:
    """Samples in a batch: training rows, or evaluation prompts (captions: images; VQA: questions).

    The ThroughputMonitor's ``batch_size_fn`` (it measures training and validation)."""
    return int((batch["input_ids"] if "input_ids" in batch else batch["prompt_ids"]).shape[0])


def tokens_of(batch: Mapping[str, Any]) -> int:
    """Real text tokens in a batch (training sequences, or evaluation prompts); the monitor's items."""
    return int((batch["attention_mask"] if "attention_mask" in batch else batch["prompt_mask"]).sum())

"""Lightning callbacks: what exact resume needs beyond Lightning's checkpoint, ``torch.compile`` of
the network for training, a step-based progress bar, and the console's known-harmless noise.

Lightning's checkpoint holds the model, optimiser, scheduler and loop progress (step, batch in
epoch). It does not hold the random number generators, so a resumed run would draw different
dropout masks and sampling noise than an uninterrupted one. :class:`RNGStateCheckpoint` adds them.
"""

from __future__ import annotations

import logging
import random
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import RichModelSummary, RichProgressBar

from ..ops import cpu_unavailable_reason
from ..ops.cpu_kernels import cxx_unavailable_reason

log = logging.getLogger(__name__)


def silence_known_noise() -> None:
    """Filter the console lines of every training run that no user can act on (idempotent).

    - torch 2.14 deprecated ``isinstance(spec, LeafSpec)``; Lightning 2.6's ``_pytree`` still calls it
      on every ``training_step`` output (a FutureWarning about Lightning's code, fixed upstream).
    - Lightning's "Tip: ... litlogger" advert, its note that our ``RichModelSummary`` callback
      replaces its default summary (the config chose it), and its "TPU/HPU available: False" lines.
    - torch's "No CUDA runtime is found, using CUDA_HOME=..." when inductor first looks for a
      toolchain on a CPU-only machine (it builds CPU kernels; CUDA is not wanted).

    The ``IterableDataset`` ``__len__`` warning is filtered next to its cause, in
    ``vlm_mamba.data.datamodules``.
    """
    warnings.filterwarnings(
        "ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning
    )
    for name, prefixes in (
        (
            "lightning.pytorch.utilities.rank_zero",
            (
                "💡 Tip: For seamless cloud logging",
                "Trainer already configured with model summary",
                # accelerators this project never runs on (the "GPU available" line stays)
                "TPU available: False",
                "HPU available: False",
            ),
        ),
        ("torch.utils.cpp_extension", ("No CUDA runtime is found",)),
    ):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages(prefixes))


def scan_unavailable_reason() -> str | None:
    """None when the compiled CPU scan builds and loads, else why not (``make demo``'s first lines;
    the demo reaches ``ops`` through training, as the layering says)."""
    return cpu_unavailable_reason()


class _DropMessages(logging.Filter):
    def __init__(self, prefixes: Sequence[str]) -> None:
        super().__init__()
        self.prefixes = tuple(prefixes)

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


silence_known_noise()  # imported by the LightningModule: every training process gets it


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


class StepProgressBar(RichProgressBar):
    """Rich progress bar of a step-based run: one training bar, optimiser steps against
    ``trainer.max_steps`` across epochs, with time elapsed and remaining.

    Lightning's bar counts the batches of each epoch, and a streamed epoch is only a resume unit
    here, so a 4000-step demo showed ``Epoch 6/-2 ... 250/625``. Without ``max_steps`` (an
    epoch-based run) this is Lightning's bar. ``refresh_rate`` is redraws per second (Rich's
    refresh thread; Lightning's default is 100 a second, far more than anyone reads, on a
    thread that competes with training for the cores).
    """

    def __init__(self, refresh_rate: int = 4, **kwargs: Any) -> None:
        super().__init__(refresh_rate=refresh_rate, **kwargs)
        self._rerouted: list[tuple[logging.StreamHandler, Any]] = []

    # While the bar is live on a terminal, Rich swaps sys.stdout/sys.stderr for proxies that print
    # above the bar; logging's console handlers (Hydra's, Lightning's) keep the streams they were
    # given at start-up and wrote across the bar's line. They write through the proxies meanwhile.
    def _init_progress(self, trainer: L.Trainer) -> None:
        before = (sys.stdout, sys.stderr)
        super()._init_progress(trainer)
        after = (sys.stdout, sys.stderr)
        if self._rerouted or after == before:
            return
        swap = {id(b): a for b, a in zip(before, after) if a is not b}
        loggers = [
            logging.getLogger(),
            logging.getLogger("lightning.pytorch"),
            logging.getLogger("lightning.fabric"),
        ]
        for handler in {h for lg in loggers for h in lg.handlers}:
            if type(handler) is logging.StreamHandler and id(handler.stream) in swap:
                self._rerouted.append((handler, handler.setStream(swap[id(handler.stream)])))

    def _stop_progress(self) -> None:
        for handler, stream in self._rerouted:
            handler.setStream(stream)
        self._rerouted = []
        super()._stop_progress()

    def _by_steps(self) -> bool:
        max_steps = self.trainer.max_steps
        return max_steps is not None and max_steps > 0

    @property
    def total_train_batches(self) -> int | float:
        return self.trainer.max_steps if self._by_steps() else super().total_train_batches

    def _get_train_description(self, current_epoch: int) -> str:
        if not self._by_steps():
            return super()._get_train_description(current_epoch)
        return f"{'Training':{len(self.validation_description)}}"

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._by_steps():
            return super().on_train_epoch_start(trainer, pl_module)
        if self.is_enabled and self.progress is not None and self.train_progress_bar_id is None:
            self._initialize_train_progress_bar_id()  # once per run: epochs do not reset it
            self._update(self.train_progress_bar_id, trainer.global_step)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._by_steps():
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self.is_enabled and self.train_progress_bar_id is None:
            self._initialize_train_progress_bar_id()
        self._update(self.train_progress_bar_id, trainer.global_step)
        self._update_metrics(trainer, pl_module)

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)  # the logger's version folder, not a metric
        return items


class ModelSummary(RichModelSummary):
    """Lightning's rich model summary without the FLOPs column and total when none were counted.

    Lightning counts FLOPs only by running ``example_input_array`` through the model, which this
    module does not define (a summary-time forward on one rank would hang a sharded run), so every
    entry read 0 and the total said ``Total FLOPs: 0``. With a counted total the table is Lightning's.
    """

    @staticmethod
    def summarize(
        summary_data: list[tuple[str, list[str]]],
        total_parameters: int,
        trainable_parameters: int,
        model_size: float,
        total_training_modes: dict[str, int],
        total_flops: int,
        **summarize_kwargs: Any,
    ) -> None:
        if total_flops:
            return RichModelSummary.summarize(
                summary_data,
                total_parameters,
                trainable_parameters,
                model_size,
                total_training_modes,
                total_flops,
                **summarize_kwargs,
            )
        from lightning.pytorch.utilities.model_summary.model_summary import (
            get_formatted_model_size,
            get_human_readable_count,
        )
        from rich import get_console
        from rich.table import Table

        columns = [(name, values) for name, values in summary_data if name != "FLOPs"]
        table = Table(header_style=summarize_kwargs.get("header_style", "bold magenta"))
        for name, _ in columns:
            justify = "right" if name in ("Params", "Params per Device", "In sizes", "Out sizes") else "left"
            table.add_column(
                name, justify=justify, style="dim" if name == " " else None, no_wrap=name == "Name"
            )
        for row in zip(*(values for _, values in columns)):
            table.add_row(*row)
        grid = Table.grid(expand=True)
        grid.add_column()
        for label, value in (
            ("Trainable params", get_human_readable_count(int(trainable_parameters))),
            ("Non-trainable params", get_human_readable_count(int(total_parameters - trainable_parameters))),
            ("Total params", get_human_readable_count(int(total_parameters))),
            ("Total estimated model params size (MB)", get_formatted_model_size(model_size)),
            ("Modules in train mode", total_training_modes["train"]),
            ("Modules in eval mode", total_training_modes["eval"]),
        ):
            grid.add_row(f"[bold]{label}[/]: {value}")
        console = get_console()
        console.print(table)
        console.print(grid)
        return None


def step_progress_bar(enabled: bool = True, refresh_rate: int = 4, **kwargs: Any) -> L.Callback:
    """A :class:`StepProgressBar`, or a callback that does nothing when the trainer runs without a
    progress bar (``trainer.enable_progress_bar=false``: Lightning refuses a bar callback then)."""
    return StepProgressBar(refresh_rate=refresh_rate, **kwargs) if enabled else L.Callback()


@torch.compiler.disable
def _smoke_test_compile() -> str | None:
    """Compile one tiny function with inductor: None if that works, else the error in one line."""
    try:
        torch._dynamo.reset()
        f = torch.compile(lambda x: torch.nn.functional.silu(x) * 2 + 1, dynamic=False)
        x = torch.linspace(-2, 2, 16)
        torch.testing.assert_close(f(x), torch.nn.functional.silu(x) * 2 + 1)
    except Exception as err:  # a missing compiler or header, a failed build, ...
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        return f"{type(err).__name__}: {first[:300]}"
    return None


class CompileModel(L.Callback):
    """``torch.compile`` (inductor) of parts of the network, used while training only.

    Each module named in ``modules`` (attribute paths under ``pl_module.model``) gets a forward that
    runs its compiled twin when the module is in training mode with gradients enabled, and its own
    eager forward otherwise: validation's teacher-forced loss, decoding and the state dict are those
    of the plain module, and no second graph is compiled for them. The compiled CPU scan is a torch
    custom op (``vlm_mamba::selective_scan_cpu``), so the graph does not break around it.

    Off, with the reason logged (and kept in :attr:`off_reason`), when inductor cannot build kernels
    here: no C++ compiler for CPU tensors (checked first), or a tiny test compile that fails.

    Args:
        modules: attribute paths of ``pl_module.model`` to compile, e.g. ``[vision, language]``.
        dynamic: attribute paths compiled with dynamic shapes (text lengths differ per batch: one
            graph for all of them instead of one compile per length); the others are static.
        mode: ``torch.compile`` mode (None: the default).
        enabled: False leaves the network eager (``callbacks.compile.enabled=false``).
    """

    def __init__(
        self,
        modules: Sequence[str] = ("vision", "language"),
        dynamic: Sequence[str] = ("language",),
        mode: str | None = None,
        enabled: bool = True,
    ) -> None:
        self.modules, self.dynamic, self.mode, self.enabled = list(modules), set(dynamic), mode, enabled
        self.off_reason: str | None = None
        self.compiled: list[str] = []

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or self.compiled or not self.enabled:
            return
        model = pl_module.model
        if pl_module.device.type == "cpu":
            self.off_reason = cxx_unavailable_reason()
        if self.off_reason is None:
            t0 = time.perf_counter()
            self.off_reason = _smoke_test_compile()
            log.debug("torch.compile smoke test: %.1f s", time.perf_counter() - t0)
        if self.off_reason is not None:
            log.warning("torch.compile is off (training runs eager, slower): %s", self.off_reason)
            return
        for path in self.modules:
            mod = model.get_submodule(path)
            _compile_for_training(mod, dynamic=path in self.dynamic, mode=self.mode)
            self.compiled.append(path)
        log.info(
            "torch.compile (inductor%s) for training: model.%s; the first steps compile them",
            f", mode={self.mode}" if self.mode else "",
            ", model.".join(self.compiled),
        )


def _compile_for_training(mod: torch.nn.Module, dynamic: bool, mode: str | None) -> None:
    """Give ``mod`` a forward that runs ``torch.compile(mod.forward)`` while training with grads."""
    eager = mod.forward
    compiled = torch.compile(eager, dynamic=dynamic, mode=mode)

    def forward(*args: Any, **kwargs: Any) -> Any:
        if mod.training and torch.is_grad_enabled():
            return compiled(*args, **kwargs)
        return eager(*args, **kwargs)

    forward.__wrapped__ = eager  # type: ignore[attr-defined]
    mod.forward = forward

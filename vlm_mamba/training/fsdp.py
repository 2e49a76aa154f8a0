"""FSDP2 for VLMamba: ``fully_shard`` through Lightning's ``ModelParallelStrategy`` (``trainer=fsdp``).

Why FSDP2 and not Lightning's ``FSDPStrategy`` (FSDP1): FSDP1 with ``use_orig_params=True`` hands
the optimiser flat 1-D views, so :func:`~vlm_mamba.training.optim.param_groups` (``p.ndim < 2`` ->
no decay) silently turned weight decay off; FSDP2 shards each parameter as a ``DTensor`` that keeps
its global shape and name, so the groups are the single-device ones (tested by name).

What this module adds to the stock strategy:

- :class:`FSDP2Strategy`: a 1-D data-parallel mesh over every rank; :meth:`~FSDP2Strategy.parallelize`
  (called from ``VLMambaLitModule.configure_model``) shards each residual ``Block`` of both towers
  (``layers/block.py``; the vision tower's blocks are ``Block`` around a ``BidirectionalMixer``),
  then the root (``VLMamba``: embeddings, head, bridge, patch embedding, final norms). bf16 mixed
  precision is ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``: all-gathers and
  compute in bf16, gradient reduce-scatter and the sharded fp32 master weights in fp32.
- The language model calls its blocks through ``Block.forward_carry`` (mamba_ssm's fused
  add+norm), and decoding through ``Block.step``: neither is ``forward``, which is all FSDP2 hooks.
  ``forward_carry`` is registered with ``register_fsdp_forward_method`` (all-gather before,
  reshard after, like ``forward``). Decoding runs inside :func:`unsharded`: every unit is
  all-gathered once per batch and stays so until the batch is decoded, so a rank whose rows hit EOS
  early runs no collective the others wait for.
- Activation checkpointing has one switch, the model config's per-block
  ``model.{vision,language}.gradient_checkpointing`` (``torch.utils.checkpoint``, non-reentrant,
  inside the FSDP unit, as torchtitan composes them); the strategy refuses its own.
- :class:`EvenBatches`: under sharding every forward is a collective, so every rank must run the
  same number of evaluation batches; ranks whose share of the split ran out get padding batches
  (a copy of an earlier batch flagged :data:`PAD_KEY`), which the module decodes and drops.
- Checkpoints are Lightning's distributed checkpoints (a folder: DCP shards of the model and
  optimiser, ``meta.pt`` with the loops, scheduler, callbacks (RNG), data position and tokenizer);
  ``ckpt_path=last`` resumes them and ``vlm_mamba.models.hub`` reads them without Lightning.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

log = logging.getLogger(__name__)

PAD_KEY = "_even_batches_padding"  # a batch that exists only to keep the ranks' collectives aligned
DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32}
# The strategy's precision -> the FSDP2 parameter (compute/all-gather) dtype when param_dtype="auto"
AUTO_PARAM_DTYPE = {"bf16-mixed": torch.bfloat16, "bf16-true": torch.bfloat16}


class FSDP2Strategy(ModelParallelStrategy):
    """``ModelParallelStrategy`` as pure FSDP2 (data-parallel mesh of every rank, no tensor parallelism).

    Args:
        param_dtype: the dtype parameters are all-gathered and computed in: ``auto`` (bf16 under
            ``precision=bf16-mixed``, else fp32), ``bf16`` or ``fp32``.
        reduce_dtype: gradients are reduce-scattered in this dtype (fp32: bf16 sums over many ranks
            lose the small gradients).
        reshard_after_forward: free each block's gathered weights after its forward (ZeRO-3,
            the least memory) or keep them until backward (ZeRO-2: no second all-gather).
        cpu_offload: keep the sharded parameters, gradients and optimiser states on the CPU.
        save_distributed_checkpoint: one folder of per-rank shards (default; no rank gathers the
            whole model) or one consolidated file written by rank 0.
        activation_checkpointing: not taken: set ``model.vision.gradient_checkpointing`` /
            ``model.language.gradient_checkpointing`` (see the module docstring).
        kwargs: ``ModelParallelStrategy``'s ``process_group_backend``, ``timeout``.
    """

    def __init__(
        self,
        param_dtype: str = "auto",
        reduce_dtype: str = "fp32",
        reshard_after_forward: bool = True,
        cpu_offload: bool = False,
        save_distributed_checkpoint: bool = True,
        activation_checkpointing: Any = None,
        **kwargs: Any,
    ) -> None:
        if activation_checkpointing:
            raise ValueError(
                "trainer.strategy.activation_checkpointing: FSDP2Strategy has no checkpointing of its own; "
                "set model.language.gradient_checkpointing=true and/or model.vision.gradient_checkpointing=true "
                "(one mechanism for every strategy)"
            )
        if param_dtype != "auto" and param_dtype not in DTYPES:
            raise ValueError(f"trainer.strategy.param_dtype={param_dtype!r}: expected auto, {sorted(DTYPES)}")
        if reduce_dtype not in DTYPES:
            raise ValueError(
                f"trainer.strategy.reduce_dtype={reduce_dtype!r}: expected one of {sorted(DTYPES)}"
            )
        for key in ("data_parallel_size", "tensor_parallel_size"):
            if key in kwargs:
                raise ValueError(f"trainer.strategy.{key}: FSDP2Strategy shards over every rank (pure FSDP)")
        super().__init__(save_distributed_checkpoint=save_distributed_checkpoint, **kwargs)
        self.param_dtype = param_dtype
        self.reduce_dtype = reduce_dtype
        self.reshard_after_forward = bool(reshard_after_forward)
        self.cpu_offload = bool(cpu_offload)

    def setup_environment(self) -> None:
        # one data-parallel dimension of every rank (the stock default is dp=nodes x tp=GPUs per node)
        self._data_parallel_size = self.world_size
        self._tensor_parallel_size = 1
        super().setup_environment()

    def setup(self, trainer) -> None:
        # evaluate under no_grad, as Lightning does for FSDP1 (pytorch#95957: inference tensors in
        # the gathered parameters). FSDP2 trained on after an inference_mode forward + decode on
        # the CPU here, but CUDA is unchecked, and no_grad costs evaluation nothing measurable
        for loop in (trainer.fit_loop.epoch_loop.val_loop, trainer.validate_loop, trainer.test_loop):
            loop.inference_mode = False
        trainer.predict_loop.inference_mode = False
        super().setup(trainer)

    # ------------------------------------------------------------------ sharding
    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the gathered parameters are used in (``MixedPrecisionPolicy.param_dtype``)."""
        return self.mixed_precision().param_dtype

    def mixed_precision(self) -> Any:
        from torch.distributed.fsdp import MixedPrecisionPolicy

        if self.param_dtype == "auto":
            precision = str(getattr(self.precision_plugin, "precision", "32-true"))
            param = AUTO_PARAM_DTYPE.get(precision, torch.float32)
        else:
            param = DTYPES[self.param_dtype]
        return MixedPrecisionPolicy(param_dtype=param, reduce_dtype=DTYPES[self.reduce_dtype])

    def parallelize(self, model: nn.Module) -> nn.Module:
        """Shard ``model`` (a ``VLMamba``) in place: every residual ``Block`` of both towers, then the
        root. Idempotent (``configure_model`` runs again for ``trainer.test``)."""
        from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule

        if isinstance(model, FSDPModule):
            return model
        return shard_model(
            model,
            self.device_mesh["data_parallel"],
            self.mixed_precision(),
            reshard_after_forward=self.reshard_after_forward,
            offload_policy=CPUOffloadPolicy() if self.cpu_offload else None,
        )

    # ------------------------------------------------------------------ evaluation data
    def process_dataloader(self, dataloader: Any) -> Any:
        dataloader = super().process_dataloader(dataloader)
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        if trainer is None or trainer.training or self.world_size == 1:
            return dataloader
        return EvenBatches(dataloader, self.root_device)


def shard_model(
    model: nn.Module,
    mesh: Any,
    mp_policy: Any,
    reshard_after_forward: bool = True,
    offload_policy: Any = None,
) -> nn.Module:
    """``fully_shard`` each ``Block`` (vision and language) of ``model``, then ``model`` itself.

    Parameter attributes set by the layers (``_no_weight_decay``, mamba_ssm's convention) would be
    lost with the parameters FSDP2 replaces by ``DTensor`` ones; they are copied over."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    from ..layers import Block

    flags = {n: dict(getattr(p, "__dict__", {})) for n, p in model.named_parameters()}
    kw = {"mesh": mesh, "mp_policy": mp_policy}
    if offload_policy is not None:
        kw["offload_policy"] = offload_policy
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    for block in blocks:
        fully_shard(block, reshard_after_forward=reshard_after_forward, **kw)
        register_fsdp_forward_method(block, "forward_carry")  # LanguageMamba's path through a block
    fully_shard(model, **kw)
    for name, p in model.named_parameters():
        for key, value in flags.get(name, {}).items():
            if not hasattr(p, key):
                setattr(p, key, value)
    log.info("FSDP2: %d blocks + the root sharded over %d ranks (%s)", len(blocks), mesh.size(), mp_policy)
    return model


def fsdp_units(model: nn.Module) -> list[nn.Module]:
    """The FSDP2 units in ``model`` (root first); empty when it is not sharded."""
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def unsharded(
    model: nn.Module, reshard_after_forward: bool = True, compute_dtype: torch.dtype | None = None
) -> Iterator[None]:
    """All-gather every FSDP2 unit of ``model`` for the body, then free the gathered weights again.

    Decoding calls ``Block.step``, which FSDP's hooks do not see, and stops when every row hit EOS,
    which differs between ranks: per-call all-gathers would run different collectives on
    different ranks. Inside this block the weights are plain tensors and nothing communicates;
    the prefill's forwards do not reshard (``set_reshard_after_forward(False)``). Collective:
    every rank enters it the same number of times (:class:`EvenBatches`). Needs the whole model in
    ``param_dtype`` on each device (the gathered weights, not the optimiser state). A no-op for an
    unsharded model.

    ``compute_dtype`` (the policy's ``param_dtype``): the body runs under autocast to it unless it
    is fp32. FSDP2 casts the inputs of a unit's ``forward`` (``cast_forward_inputs``), but
    ``generate`` is no forward: its fp32 images would meet bf16 weights."""
    units = fsdp_units(model)
    if not units:
        yield
        return
    autocast = contextlib.nullcontext()
    if compute_dtype is not None and compute_dtype != torch.float32:
        device = next(iter(model.parameters())).device
        autocast = torch.autocast(device.type, dtype=compute_dtype)
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
    for unit in units:
        unit.unshard()
    try:
        with autocast:
            yield
    finally:
        for unit in units:
            unit.reshard()
        root, blocks = units[0], units[1:]
        for unit in blocks:
            unit.set_reshard_after_forward(reshard_after_forward, recurse=False)
        root.set_reshard_after_forward(False, recurse=False)  # FSDP2's own choice for the root


# ---------------------------------------------------------------------- evaluation batches
class EvenBatches:
    """Wrap an evaluation loader so that every rank yields the same number of batches.

    At each step the ranks exchange whether they still have a batch (one small all-gather); a rank
    whose share ran out yields a padding batch, a copy of its previous one with ``batch[PAD_KEY] =
    True`` (a rank that had none at all receives one from a rank that has), and iteration ends when
    no rank has a batch left. Every sample is still yielded exactly once, unflagged; the module drops
    the padding. ``len`` is the longest rank's, so Lightning's ``limit_*_batches`` cuts every rank
    at the same step.
    """

    def __init__(self, loader: Any, device: torch.device | str) -> None:
        self.loader = loader
        self.device = torch.device(device)

    def __getattr__(self, name: str) -> Any:  # sampler, dataset, batch_size... for Lightning's checks
        if name == "loader":
            raise AttributeError(name)
        return getattr(self.loader, name)

    def __len__(self) -> int:
        import torch.distributed as dist

        n = torch.tensor([len(self.loader)], device=self.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(n, op=dist.ReduceOp.MAX)
        return int(n.item())

    def __iter__(self) -> Iterator[Any]:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            yield from self.loader
            return
        world = dist.get_world_size()
        it = iter(self.loader)
        last: Any = None
        while True:
            batch = next(it, None)
            # 2: a batch; 1: none left but a template to pad with; 0: none and no template
            code = 2 if batch is not None else (1 if last is not None else 0)
            codes = [torch.zeros(1, dtype=torch.long, device=self.device) for _ in range(world)]
            dist.all_gather(codes, torch.tensor([code], device=self.device))
            codes = [int(c.item()) for c in codes]
            if 2 not in codes:
                return
            if 0 in codes:  # someone has nothing to pad with: the first rank with a batch sends it
                src = codes.index(2)
                box = [batch if dist.get_rank() == src else None]
                dist.broadcast_object_list(box, src=src)
                if code == 0:
                    last = box[0]
            if batch is not None:
                last = batch
                yield batch
            else:
                pad = dict(last)
                pad[PAD_KEY] = True
                yield pad


def is_padding(batch: Any) -> bool:
    """True for the padding batches :class:`EvenBatches` adds."""
    return isinstance(batch, dict) and bool(batch.get(PAD_KEY, False))


def is_sharded(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)

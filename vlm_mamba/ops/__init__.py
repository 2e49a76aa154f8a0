"""Kernel dispatch: the only place in vlm_mamba that chooses between CUDA kernels and PyTorch code.

Four families, each with the same function signatures (mamba_ssm's names and layouts):

- ``cuda``: mamba_ssm ``selective_scan_fn`` / ``mamba_inner_fn`` / ``mamba_chunk_scan_combined`` /
  ``mamba_split_conv1d_scan_combined`` / ``selective_state_update``, its triton norms
  (``rms_norm_fn`` with the residual add fused, the gated ``rmsnorm_fn``) and causal_conv1d
  ``causal_conv1d_fn`` / ``causal_conv1d_update`` (``vlm_mamba.ops.cuda``), with our Triton kernels
  where those have a gap: the scan from a cached state (``triton_scan``), a short prompt's conv
  from its window (``triton_conv``), the fused decode step (``triton_step``) and the chunked
  loss (``triton_ce``);
- ``cpu``: the Mamba-1 selective scan as a C kernel fused over time, compiled on first use with the
  system C compiler (``vlm_mamba.ops.cpu_kernels``); every other op is the ``torch`` one;
- ``torch``: pure PyTorch with autograd, the fastest form measured on a 2-core CPU per length
  (``vlm_mamba.ops.torch_ops``);
- ``ref``: the sequential references the tests compare against (``vlm_mamba.ops.reference``).

Which one runs: a non-``"auto"`` ``kernel`` argument (the configs' ``kernel`` field) wins, else the
``VLM_MAMBA_KERNEL`` environment variable, else ``auto`` = ``cuda`` for CUDA tensors when the kernels
import, ``cpu`` for CPU tensors when the C kernel builds, ``torch`` otherwise. A forced ``cuda`` or
``cpu`` that cannot run raises, saying why. Each resolution is logged once (logger ``vlm_mamba.ops``).

Within the cuda family, calls the kernels cannot serve run the torch code instead: conv widths
other than 2-4 (causal_conv1d's limit), and the one-step ops when autograd needs their gradient
(the step kernels have no backward).
"""

from __future__ import annotations

import functools
import logging
import os

import torch
from torch import Tensor

from vlm_mamba.ops import reference as _ref
from vlm_mamba.ops import torch_ops as _torch
from vlm_mamba.ops.linear_ce import compute_dtype, linear_cross_entropy
from vlm_mamba.ops.padding import compact_by_mask, conv_window, expand_index, gather_time, previous_real
from vlm_mamba.ops.torch_ops import causal_conv1d_channels_last

__all__ = [
    "KERNEL_ENV",
    "kernel_family",
    "cuda_unavailable_reason",
    "cpu_unavailable_reason",
    "selective_scan",
    "ssd_chunk_scan",
    "causal_conv1d",
    "causal_conv1d_channels_last",
    "causal_conv1d_update",
    "selective_state_update",
    "causal_conv1d_update_",
    "selective_state_update_",
    "mamba_inner",
    "fused_mamba_inner_available",
    "mamba_split_conv1d_scan",
    "fused_mamba2_available",
    "add_rms_norm",
    "rms_norm_gated",
    "compact_by_mask",
    "conv_window",
    "expand_index",
    "gather_time",
    "previous_real",
    "compute_dtype",
    "linear_cross_entropy",
]

logger = logging.getLogger("vlm_mamba.ops")
KERNEL_ENV = "VLM_MAMBA_KERNEL"
FAMILIES = ("auto", "cuda", "cpu", "torch", "ref")
_CONV_WIDTHS = (2, 3, 4)  # causal_conv1d's kernels exist for these widths only


@functools.cache
def cuda_unavailable_reason() -> str | None:
    """None when the CUDA kernels import and a GPU is visible, else a sentence saying why not."""
    from vlm_mamba.ops import cuda as _cuda

    try:
        _cuda.load()
    except Exception as err:  # ImportError, missing GPU, a kernel built for another arch, ...
        return f"{type(err).__name__}: {err}"
    return None


@functools.cache
def _resolve(requested: str, env: str, device_type: str) -> str:
    if requested not in FAMILIES:
        raise ValueError(f"kernel={requested!r} is not one of {FAMILIES}")
    if env not in ("",) + FAMILIES:
        raise ValueError(f"{KERNEL_ENV}={env!r} is not one of {FAMILIES}")
    if requested != "auto":
        choice, source = requested, f"kernel={requested!r}"
    elif env not in ("", "auto"):
        choice, source = env, f"{KERNEL_ENV}={env}"
    else:
        choice, source = "auto", "auto"
    if choice == "cuda":
        reason = cuda_unavailable_reason()
        if reason is not None:
            raise RuntimeError(f"{source} forces the CUDA kernels, but they cannot be used: {reason}")
        if device_type != "cuda":
            raise RuntimeError(f"{source} forces the CUDA kernels, but the tensors are on {device_type!r}")
    if choice == "cpu":
        reason = cpu_unavailable_reason()
        if reason is not None:
            raise RuntimeError(f"{source} forces the compiled CPU kernel, but it cannot be used: {reason}")
        if device_type != "cpu":
            raise RuntimeError(
                f"{source} forces the compiled CPU kernel, but the tensors are on {device_type!r}"
            )
    if choice == "auto" and device_type == "cpu":
        reason = cpu_unavailable_reason()
        choice = "cpu" if reason is None else "torch"
        source = "auto" if reason is None else f"auto; compiled CPU kernel not used: {reason}"
    elif choice == "auto":
        reason = cuda_unavailable_reason() if device_type == "cuda" else f"tensors are on {device_type!r}"
        choice = "cuda" if reason is None else "torch"
        source = "auto" if reason is None else f"auto; CUDA kernels not used: {reason}"
    logger.info("vlm_mamba.ops: kernel family %r for %s tensors (%s)", choice, device_type, source)
    return choice


def cpu_unavailable_reason() -> str | None:
    """None when the compiled CPU scan builds and loads, else a sentence saying why not."""
    from vlm_mamba.ops import cpu_kernels as _cpu

    return _cpu.unavailable_reason()


@torch.compiler.assume_constant_result  # torch.compile: a constant of the trace, not traced (it stats files)
def kernel_family(requested: str | None = "auto", device: torch.device | str | None = None) -> str:
    """The family ("cuda" | "cpu" | "torch" | "ref") that ops on ``device`` run with (resolved and logged once).

    ``device`` None means the GPU when one is visible, else the CPU.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return _resolve(
        requested or "auto", os.environ.get(KERNEL_ENV, "").strip().lower(), torch.device(device).type
    )


def _impl(name: str, kernel: str | None, x: Tensor, cuda_ok: bool = True):
    """The function ``name`` of the family resolved for ``x``; torch's when ``cuda_ok`` is False."""
    fam = kernel_family(kernel, x.device)
    if fam == "cuda" and cuda_ok:
        from vlm_mamba.ops import cuda as _cuda

        return getattr(_cuda, name)
    if fam == "ref":
        return getattr(_ref, f"{name}_ref")
    if fam == "cpu":
        from vlm_mamba.ops import cpu_kernels as _cpu

        fn = getattr(_cpu, f"{name}_cpu", None)
        if fn is not None:
            return fn
    return getattr(_torch, f"{name}_torch")


def _needs_grad(*tensors: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    initial_state: Tensor | None = None,
    return_last_state: bool = False,
    *,
    kernel: str | None = "auto",
    channel_order: Tensor | None = None,
):
    """Mamba-1 selective scan (Mamba paper, Algorithm 2), mamba_ssm ``selective_scan_fn`` + initial state.

    Args: u, delta, z (b,e,l); A (e,n); B, C (b,n,l) or (b,g,n,l); D, delta_bias (e,);
    initial_state (b,e,n). Returns y (b,e,l) in u's dtype and, with ``return_last_state``, (y, h_l)
    with h_l (b,e,n) fp32. ``channel_order`` (e,) int32, a permutation of the channels
    (``triton_scan.decay_order``), only tells the CUDA h0 term which channels to group; the result
    does not depend on it.

    mamba_ssm's ``selective_scan_fn`` returns the last state without a gradient (its backward drops
    that output's gradient), so a call that returns the last state while autograd is recording
    (training through a returned state, e.g. over segments) runs the PyTorch scan instead: correct
    gradients for every output, at the PyTorch path's (b,e,l,n) memory. Forward-only and stateless
    training calls keep the kernel.
    """
    cuda_ok = not (return_last_state and _needs_grad(u, delta, A, B, C, D, z, delta_bias, initial_state))
    fn = _impl("selective_scan", kernel, u, cuda_ok=cuda_ok)
    args = (u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, return_last_state)
    if channel_order is not None and fn.__module__.endswith(".cuda"):
        return fn(*args, channel_order=channel_order)
    return fn(*args)


def ssd_chunk_scan(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    chunk_size: int,
    D: Tensor | None = None,
    z: Tensor | None = None,
    initial_states: Tensor | None = None,
    return_final_states: bool = False,
    dt_bias: Tensor | None = None,
    dt_softplus: bool = False,
    *,
    kernel: str | None = "auto",
):
    """Mamba-2 SSD scan (Mamba-2 paper, section 6), mamba_ssm ``mamba_chunk_scan_combined``.

    Args: x, z (b,l,h,p); dt (b,l,h); A (h,); B, C (b,l,g,n); D (h,) or (h,p); dt_bias (h,);
    initial_states (b,h,p,n). Returns y (b,l,h,p) and, if asked, (y, final state (b,h,p,n)).
    """
    fn = _impl("ssd_chunk_scan", kernel, x)
    return fn(x, dt, A, B, C, chunk_size, D, z, initial_states, return_final_states, dt_bias, dt_softplus)


def causal_conv1d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    initial_states: Tensor | None = None,
    return_final_states: bool = False,
    activation: str | None = "silu",
    *,
    kernel: str | None = "auto",
):
    """Causal depthwise conv1d, causal_conv1d ``causal_conv1d_fn``.

    Args: x (b,e,l); weight (e,k); bias (e,); initial_states (b,e,k-1), the inputs before x.
    Returns y (b,e,l) and, if asked, (y, final_states (b,e,k-1)).
    """
    fn = _impl("causal_conv1d", kernel, x, cuda_ok=weight.shape[-1] in _CONV_WIDTHS)
    return fn(x, weight, bias, initial_states, return_final_states, activation)


def causal_conv1d_update(
    x: Tensor,
    conv_state: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    activation: str | None = "silu",
    *,
    kernel: str | None = "auto",
):
    """One conv step: x (b,e), conv_state (b,e,k-1) -> (y (b,e), new_state (b,e,k-1)); no mutation."""
    ok = weight.shape[-1] in _CONV_WIDTHS and not _needs_grad(x, conv_state, weight, bias)
    fn = _impl("causal_conv1d_update", kernel, x, cuda_ok=ok)
    return fn(x, conv_state, weight, bias, activation)


def selective_state_update(
    state: Tensor,
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    dt_bias: Tensor | None = None,
    dt_softplus: bool = False,
    *,
    kernel: str | None = "auto",
):
    """One recurrent SSM step, mamba_ssm ``selective_state_update`` made functional.

    Mamba-1: state (b,e,n), x/dt/z (b,e), A (e,n), B/C (b,n), D/dt_bias (e,).
    Mamba-2: state (b,h,p,n), x/dt/z (b,h,p), A (h,p,n), B/C (b,g,n), D/dt_bias (h,p).
    Returns (y like x, new_state like state); ``state`` is never modified.
    """
    ok = not _needs_grad(state, x, dt, A, B, C, D, z, dt_bias)
    fn = _impl("selective_state_update", kernel, x, cuda_ok=ok)
    return fn(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)


def causal_conv1d_update_(
    x: Tensor,
    conv_state: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    activation: str | None = "silu",
    *,
    kernel: str | None = "auto",
) -> Tensor:
    """One conv step that updates ``conv_state`` (b,e,k-1) in place: x (b,e) -> y (b,e).

    The decoding cache's step (``vlm_mamba.models.decoding``): static buffers a CUDA graph can
    replay. causal_conv1d's kernel mutates the state itself; elsewhere the functional step's result
    is copied in. Inference only (no autograd through the state).
    """
    if kernel_family(kernel, x.device) == "cuda" and weight.shape[-1] in _CONV_WIDTHS:
        from vlm_mamba.ops import cuda as _cuda

        return _cuda.causal_conv1d_update_(x, conv_state, weight, bias, activation)
    y, new = causal_conv1d_update(x, conv_state, weight, bias, activation, kernel=kernel)
    conv_state.copy_(new)
    return y


FUSED_STEP_ENV = "VLM_MAMBA_FUSED_STEP"
# "auto" takes the fused step up to this batch. Measured on an H200 (Mamba-1, d 768, 24 layers, bf16,
# CUDA graphs, decode tokens/s against stock generate(cg=True), 128 new tokens, fastest of 5 calls;
# benchmarks/results/bench_gpu_nvidia_h200_run_decode_prefill_1a6c2f6.json), fused vs unfused:
# b=1 1.50x vs 1.20x (1K context); b=8 1.28x vs 1.20x (1K), 1.30x vs 1.21x (8K); b=64 1.29x vs
# 1.18x (1K), 1.23x vs 1.15x (8K). Above batch 1 the fused step is the dt_proj + state update kernel
# only (the add + norm + in_proj kernel serves b <= FUSED_NORM_LINEAR_MAX_BATCH, layers/mamba1.py).
# A beam-search GPU test at 12 rows that once failed with it was a near-tie, not an error: its logits
# against the unfused step are within 0.01 of their rms at every step until one beam keeps the other
# of two near-equal candidates (one row of 6 at step 10 in run 26e082a), so beams are now compared
# with the eager in-place step, which runs the same kernels (tests/test_gpu_decoding.py).
FUSED_STEP_MAX_BATCH = 64
_fused_step: bool | None = None


def set_fused_step(enabled: bool | None) -> None:
    """The fused in-place decode step on CUDA (``vlm_mamba.ops.triton_step``: Mamba-1's dt_proj in the
    state update; at batch 1 the block's add + norm + in_proj (+ the conv step) in one kernel, and
    Mamba-2's gated norm + out_proj in one): on, off, or None = the ``VLM_MAMBA_FUSED_STEP``
    environment variable ("1"/"on", "0"/"off", or unset/"auto": on up to ``FUSED_STEP_MAX_BATCH``
    rows). Read when a step runs (and so when a decode graph is captured: set it before the first
    ``generate``)."""
    global _fused_step
    _fused_step = enabled


def fused_step_switch() -> str:
    """The fused-step mode as set (``set_fused_step``, else the environment): "on", "off" or "auto"."""
    if _fused_step is not None:
        return "on" if _fused_step else "off"
    v = os.environ.get(FUSED_STEP_ENV, "").strip().lower()
    modes = {"": "auto", "auto": "auto", "1": "on", "on": "on", "0": "off", "off": "off"}
    if v not in modes:
        raise ValueError(f"{FUSED_STEP_ENV}={v!r}: expected 1/on, 0/off or auto")
    return modes[v]


def fused_step_enabled(x: Tensor, kernel: str | None = "auto") -> bool:
    """Whether the fused decode step serves ``x`` (b, ...): switched on (or "auto" and
    b <= ``FUSED_STEP_MAX_BATCH``), CUDA family, triton present."""
    mode = fused_step_switch()
    if mode == "off" or (mode == "auto" and x.shape[0] > FUSED_STEP_MAX_BATCH):
        return False
    if kernel_family(kernel, x.device) != "cuda":
        return False
    from vlm_mamba.ops import triton_step

    return triton_step.available()


FUSED_CONV_ENV = "VLM_MAMBA_FUSED_CONV"


def fused_conv_switch() -> bool:
    """Where the fused step folds add + norm into in_proj (Mamba-1, batch 1), the conv's one-token step
    runs in the same kernel's epilogue (``triton_step.add_rms_norm_linear`` with ``conv_weight``):
    one launch fewer a layer. On by default: on an H200 (base LM, d 768, 24 layers, b=1, 1K
    context) a decode step's kernels took 0.472 ms against 0.514 ms without it (graph replay,
    benchmarks/results/bench_gpu_nvidia_h200_run_decode_prefill_7880794.json).
    ``VLM_MAMBA_FUSED_CONV=0``/``off`` keeps causal_conv1d's update kernel (``1``/``on``/unset: on).
    Read when a step runs (set it before the first graph)."""
    v = os.environ.get(FUSED_CONV_ENV, "").strip().lower()
    if v not in ("", "1", "on", "0", "off"):
        raise ValueError(f"{FUSED_CONV_ENV}={v!r}: expected 1/on or 0/off (unset: on)")
    return v not in ("0", "off")


FUSED_XPROJ_ENV = "VLM_MAMBA_FUSED_XPROJ"


def fused_xproj_switch() -> bool:
    """Where the conv step runs in in_proj's kernel (Mamba-1, batch 1), x_proj's product too: that
    kernel writes its partial products over each block of conv channels and the fused state update
    sums them (``triton_step.add_rms_norm_linear`` with ``xproj_weight``), so x_proj (a 1536 -> 80
    matrix-vector product, 4.4 us a layer on an H200 at b=1) needs no launch. Opt-in, because
    measured slower: on an H200 (base LM, b=1, 1K context; run bfdba93) the state update summing
    192 partials of 80 values took 7.6 us a layer against 2.7, so a step's device time went from
    0.474 to 0.502 ms and decoding from 1.54x to 1.45x stock. Fewer, larger partials (or one atomic
    sum) would be the next try. ``VLM_MAMBA_FUSED_XPROJ=1``/``on`` (unset, ``0``/``off``: off). The
    kernels equal their twins under Triton's interpreter (tests/test_triton_step.py) and the graph
    with it equals the unfused step on an H200 (tests/test_gpu_decoding.py). Read when a step runs
    (set it before the first graph)."""
    v = os.environ.get(FUSED_XPROJ_ENV, "").strip().lower()
    if v not in ("", "1", "on", "0", "off"):
        raise ValueError(f"{FUSED_XPROJ_ENV}={v!r}: expected 1/on or 0/off (unset: off)")
    return v in ("1", "on")


def selective_state_update_(
    state: Tensor,
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    dt_bias: Tensor | None = None,
    dt_softplus: bool = False,
    *,
    kernel: str | None = "auto",
) -> Tensor:
    """:func:`selective_state_update` with ``state`` updated in place (mamba_ssm's own semantics) -> y."""
    if kernel_family(kernel, x.device) == "cuda":
        from vlm_mamba.ops import cuda as _cuda

        return _cuda.selective_state_update_(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)
    y, new = selective_state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, kernel=kernel)
    state.copy_(new)
    return y


def fused_mamba_inner_available(kernel: str | None, x: Tensor, d_conv: int) -> bool:
    """Whether ``mamba_inner`` (fused Mamba-1 conv+scan+projections) can run for ``x``."""
    return kernel_family(kernel, x.device) == "cuda" and d_conv in _CONV_WIDTHS


def mamba_inner(
    xz: Tensor,
    conv1d_weight: Tensor,
    conv1d_bias: Tensor | None,
    x_proj_weight: Tensor,
    delta_proj_weight: Tensor,
    out_proj_weight: Tensor,
    out_proj_bias: Tensor | None,
    A: Tensor,
    D: Tensor,
    delta_bias: Tensor,
) -> Tensor:
    """mamba_ssm ``mamba_inner_fn``: xz (b,2e,l) -> out (b,l,d). CUDA only (check the above first).

    The weights are passed as tensors read at call time, so wrapped layers (LoRA's merged
    ``.weight``) reach the kernel with their gradients.
    """
    from vlm_mamba.ops import cuda as _cuda

    return _cuda.mamba_inner(
        xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, out_proj_weight, out_proj_bias,
        A, D, delta_bias,
    )  # fmt: skip


def fused_mamba2_available(kernel: str | None, x: Tensor, d_conv: int) -> bool:
    """Whether ``mamba_split_conv1d_scan`` (fused Mamba-2 conv+scan+norm+out_proj) can run for ``x``."""
    return kernel_family(kernel, x.device) == "cuda" and d_conv in _CONV_WIDTHS


def mamba_split_conv1d_scan(
    zxbcdt: Tensor,
    conv1d_weight: Tensor,
    conv1d_bias: Tensor | None,
    dt_bias: Tensor,
    A: Tensor,
    D: Tensor,
    chunk_size: int,
    rmsnorm_weight: Tensor,
    rmsnorm_eps: float,
    outproj_weight: Tensor,
    outproj_bias: Tensor | None,
    headdim: int,
    ngroups: int,
    norm_before_gate: bool,
) -> Tensor:
    """mamba_ssm ``mamba_split_conv1d_scan_combined``: zxbcdt (b,l,2e+2gn+h) -> out (b,l,d). CUDA only
    (check ``fused_mamba2_available`` first); no state in or out. Its backward recomputes the conv
    and the scan from zxbcdt, which is all it keeps (mamba_ssm ``Mamba2``'s memory-efficient path)."""
    from vlm_mamba.ops import cuda as _cuda

    return _cuda.mamba_split_conv1d_scan(
        zxbcdt, conv1d_weight, conv1d_bias, dt_bias, A, D, chunk_size, rmsnorm_weight, rmsnorm_eps,
        outproj_weight, outproj_bias, headdim, ngroups, norm_before_gate,
    )  # fmt: skip


def add_rms_norm(
    x: Tensor,
    residual: Tensor | None,
    weight: Tensor,
    eps: float,
    residual_in_fp32: bool = False,
    prenorm: bool = True,
    *,
    kernel: str | None = "auto",
):
    """residual <- x + residual; out = RMSNorm(residual): mamba_ssm ``rms_norm_fn`` with the residual.

    Args: x (..., d) (a block's mixer output; the embedding for the first block), residual like x or
    None; weight (d,). Returns (out, residual) with ``prenorm`` (the residual fp32 with
    ``residual_in_fp32``), else out. The kernel writes out in x's dtype; the twin
    (``reference.add_rms_norm_ref``, the unfused form of mamba_ssm's ``Block``) in weight's dtype.
    """
    fn = _impl("add_rms_norm", kernel, x)
    return fn(x, residual, weight, eps, residual_in_fp32, prenorm)


def rms_norm_gated(
    x: Tensor,
    weight: Tensor,
    z: Tensor | None = None,
    eps: float = 1e-5,
    group_size: int | None = None,
    norm_before_gate: bool = False,
    *,
    kernel: str | None = "auto",
) -> Tensor:
    """Mamba-2's gated, grouped RMSNorm, mamba_ssm ``layernorm_gated.rmsnorm_fn``: x, z (..., e) ->
    (..., e) in x's dtype (see ``reference.rms_norm_gated_ref``)."""
    fn = _impl("rms_norm_gated", kernel, x)
    return fn(x, weight, z, eps, group_size, norm_before_gate)

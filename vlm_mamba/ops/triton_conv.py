"""The causal depthwise conv of a short prompt from a cached conv window (Triton, forward only).

A prompt prefilled from the image state (a VQA question: 8-16 tokens, 160 of them at once) ran
causal_conv1d's kernel, built for long sequences, plus a recomputation of the k-1 outputs that read
the window: on an H200 at e=1536, 16 tokens, in a graph, 20 / 31 / 254 us a layer at b = 1 / 8 /
160, against 1.8 / 2.1 / 9.5 us for this kernel (``benchmarks/bench_scan_forms.py``). Here one program per (row, block of channels) reads the
k-1 cached inputs and the prompt's and writes every output: y_t = act(bias + sum_j w_j x_{t-k+1+j}),
with x_{<0} the window's (``causal_conv1d_fn`` with ``initial_states``, its fp32 arithmetic).
``causal_conv1d_short_ref`` is the plain twin (tests on the CPU through ``TRITON_INTERPRET=1``).

Shapes: ``b`` batch, ``e`` channels, ``l`` length, ``k`` conv width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from vlm_mamba.ops._triton import available, tl, triton  # noqa: F401  (available: this module's API)

# ops.cuda.causal_conv1d takes this kernel for prompts from a state up to this many tokens
MAX_LENGTH = 64

if triton is not None:

    @triton.jit
    def _short_conv_kernel(
        x_ptr, s_ptr, w_ptr, b_ptr, y_ptr, E, L,
        s_x_b, s_x_e, s_x_l, s_s_b, s_s_e, s_s_k, s_w_e, s_w_k, s_y_b, s_y_e, s_y_l,
        K: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_L: tl.constexpr, HAS_BIAS: tl.constexpr,
        SILU: tl.constexpr,
    ):  # fmt: skip
        pid_b, pid_e = tl.program_id(0), tl.program_id(1)
        e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
        e_ok = e < E
        t = tl.arange(0, BLOCK_L)
        acc = tl.zeros((BLOCK_E, BLOCK_L), dtype=tl.float32)
        for j in tl.static_range(K):
            w = tl.load(w_ptr + e * s_w_e + j * s_w_k, mask=e_ok, other=0.0).to(tl.float32)  # (BE,)
            src = t - (K - 1) + j  # the input read by output t at tap j; < 0: the cached window
            xv = tl.load(
                x_ptr + pid_b * s_x_b + e[:, None] * s_x_e + src[None, :] * s_x_l,
                mask=e_ok[:, None] & (src[None, :] >= 0) & (t[None, :] < L),
                other=0.0,
            ).to(tl.float32)
            sv = tl.load(
                s_ptr + pid_b * s_s_b + e[:, None] * s_s_e + (src[None, :] + K - 1) * s_s_k,
                mask=e_ok[:, None] & (src[None, :] < 0) & (t[None, :] < L),
                other=0.0,
            ).to(tl.float32)
            acc += w[:, None] * (xv + sv)
        if HAS_BIAS:
            acc += tl.load(b_ptr + e, mask=e_ok, other=0.0).to(tl.float32)[:, None]
        if SILU:
            acc = acc * tl.sigmoid(acc)
        tl.store(
            y_ptr + pid_b * s_y_b + e[:, None] * s_y_e + t[None, :] * s_y_l,
            acc.to(y_ptr.dtype.element_ty),
            mask=e_ok[:, None] & (t[None, :] < L),
        )


def causal_conv1d_short(
    x: Tensor, weight: Tensor, bias: Tensor | None, initial_states: Tensor, activation: str | None = "silu",
    block_e: int = 64, out: Tensor | None = None,
) -> Tensor:  # fmt: skip
    """x (b,e,l) any strides, weight (e,k), bias (e,) or None, initial_states (b,e,k-1) -> y (b,e,l)
    in x's dtype (the window's values read as x's dtype, as ``ops.cuda.causal_conv1d`` casts them);
    written into ``out`` (b,e,l) of x's dtype, any strides, when given (e.g. the first k-1 columns
    of a longer prompt's output)."""
    if triton is None:
        raise RuntimeError("triton is not installed")
    b, e, L = x.shape
    k = weight.shape[-1]
    if initial_states.shape != (b, e, k - 1) or L > 1024:
        raise ValueError(f"shapes: x {tuple(x.shape)}, weight {tuple(weight.shape)}, "
                         f"initial_states {tuple(initial_states.shape)} (at most 1024 tokens)")  # fmt: skip
    init = initial_states.to(x.dtype)
    if out is not None and (out.shape != x.shape or out.dtype != x.dtype):
        raise ValueError(
            f"out {tuple(out.shape)} {out.dtype} must be x's shape and dtype ({tuple(x.shape)} {x.dtype})"
        )
    y = out if out is not None else torch.empty(b, e, L, device=x.device, dtype=x.dtype)
    be = min(block_e, triton.next_power_of_2(e))
    _short_conv_kernel[(b, triton.cdiv(e, be))](
        x, init, weight, bias if bias is not None else weight, y, e, L,
        *x.stride(), *init.stride(), *weight.stride(), *y.stride(),
        K=k, BLOCK_E=be, BLOCK_L=max(16, triton.next_power_of_2(L)), HAS_BIAS=bias is not None,
        SILU=activation in ("silu", "swish"),
    )  # fmt: skip
    return y


def causal_conv1d_short_ref(
    x: Tensor, weight: Tensor, bias: Tensor | None, initial_states: Tensor, activation: str | None = "silu"
) -> Tensor:
    """The plain twin: the window prepended, a depthwise conv1d in fp32."""
    full = torch.cat([initial_states.to(x.dtype), x], dim=-1).float()
    y = F.conv1d(
        full, weight.float()[:, None, :], None if bias is None else bias.float(), groups=weight.shape[0]
    )
    if activation in ("silu", "swish"):
        y = F.silu(y)
    return y.to(x.dtype)

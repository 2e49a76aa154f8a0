"""Mamba-1's selective scan from an initial state, without a (b, e, l, n) tensor (Triton, forward only).

mamba_ssm's ``selective_scan_fn`` starts from zero. The scan is linear in its state, so a run from
``h0`` is the run from zero plus the free evolution of ``h0``:

    h_t = exp(A * c_t) * h0 + (zero-state h_t),   c_t = sum_{s <= t} dt_s   (Mamba paper, eq. 2a)
    y_t = (y0_t + sum_n C_{n,t} * exp(A_{e,n} * c_{e,t}) * h0_{e,n}) * silu(z_t)

``vlm_mamba.ops.cuda`` used to build ``exp(A * c)`` as a (b, e, l, n) fp32 tensor (0.8 GB per layer at
b=8, e=1536, l=1K) and contract it with an einsum. Here one kernel walks each row's time axis in
blocks: dt = softplus(delta + bias) and its running sum ``c`` stay in registers (a block cumsum plus
the carry from the previous block), the n terms are summed in registers, the gate is applied, and
the output is written once; the last state gets ``exp(A * c_L) * h0``. Everything it touches is
(b, e, l) or smaller, read once.

Forward only: prefill from a cached image state runs without gradients. Where autograd needs the
gradient (training from a state), ``vlm_mamba.ops.cuda`` keeps the differentiable PyTorch form.
``add_initial_state_ref`` is the plain twin the tests compare against (on the CPU through
``TRITON_INTERPRET=1``).

Shapes: ``b`` batch, ``e`` channels, ``l`` length, ``n`` state size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from vlm_mamba.ops._triton import available, tl, triton  # noqa: F401  (available: this module's API)

if triton is not None:

    @triton.jit
    def _initial_state_kernel(
        y0_ptr, delta_ptr, bias_ptr, A_ptr, C_ptr, h0_ptr, z_ptr, out_ptr, last_ptr,
        E, L,
        s_y0_b, s_y0_e, s_y0_l,
        s_d_b, s_d_e, s_d_l,
        s_A_e, s_A_n,
        s_C_b, s_C_n, s_C_l,
        s_h_b, s_h_e, s_h_n,
        s_z_b, s_z_e, s_z_l,
        s_o_b, s_o_e, s_o_l,
        s_last_b, s_last_e, s_last_n,
        N: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_L: tl.constexpr,
        HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_Z: tl.constexpr, HAS_LAST: tl.constexpr,
    ):  # fmt: skip
        pid_b = tl.program_id(0)
        pid_e = tl.program_id(1)
        e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)  # (BE,)
        e_ok = e < E
        if HAS_BIAS:
            bias = tl.load(bias_ptr + e, mask=e_ok, other=0.0).to(tl.float32)  # (BE,)
        carry = tl.zeros((BLOCK_E,), dtype=tl.float32)  # sum of dt before this block
        for l0 in range(0, L, BLOCK_L):
            t = l0 + tl.arange(0, BLOCK_L)  # (BL,)
            ok = e_ok[:, None] & (t[None, :] < L)  # (BE, BL)
            dt = tl.load(
                delta_ptr + pid_b * s_d_b + e[:, None] * s_d_e + t[None, :] * s_d_l, mask=ok, other=0.0
            ).to(tl.float32)
            if HAS_BIAS:
                dt = dt + bias[:, None]
            if SOFTPLUS:  # torch's softplus: x above 20, else log(1 + exp(x)); -1e4 (a pad) gives 0
                dt = tl.where(dt > 20.0, dt, tl.log(1.0 + tl.exp(dt)))
            dt = tl.where(ok, dt, 0.0)
            c = tl.cumsum(dt, axis=1) + carry[:, None]  # (BE, BL) running sum of dt
            acc = tl.zeros((BLOCK_E, BLOCK_L), dtype=tl.float32)
            for k in tl.static_range(N):
                a_k = tl.load(A_ptr + e * s_A_e + k * s_A_n, mask=e_ok, other=0.0).to(tl.float32)  # (BE,)
                h_k = tl.load(h0_ptr + pid_b * s_h_b + e * s_h_e + k * s_h_n, mask=e_ok, other=0.0).to(
                    tl.float32
                )  # (BE,)
                c_k = tl.load(C_ptr + pid_b * s_C_b + k * s_C_n + t * s_C_l, mask=t < L, other=0.0).to(
                    tl.float32
                )  # (BL,)
                acc += tl.exp(a_k[:, None] * c) * (h_k[:, None] * c_k[None, :])
            y = (
                tl.load(
                    y0_ptr + pid_b * s_y0_b + e[:, None] * s_y0_e + t[None, :] * s_y0_l, mask=ok, other=0.0
                ).to(tl.float32)
                + acc
            )
            if HAS_Z:
                z = tl.load(
                    z_ptr + pid_b * s_z_b + e[:, None] * s_z_e + t[None, :] * s_z_l, mask=ok, other=0.0
                ).to(tl.float32)
                y = y * (z / (1.0 + tl.exp(-z)))
            tl.store(
                out_ptr + pid_b * s_o_b + e[:, None] * s_o_e + t[None, :] * s_o_l,
                y.to(out_ptr.dtype.element_ty),
                mask=ok,
            )
            carry += tl.sum(dt, axis=1)
        if HAS_LAST:  # last state += exp(A * c_L) * h0
            n = tl.arange(0, N)  # (N,)
            A = tl.load(A_ptr + e[:, None] * s_A_e + n[None, :] * s_A_n, mask=e_ok[:, None], other=0.0)
            h0 = tl.load(
                h0_ptr + pid_b * s_h_b + e[:, None] * s_h_e + n[None, :] * s_h_n,
                mask=e_ok[:, None],
                other=0.0,
            )  # (BE, N)
            ptrs = last_ptr + pid_b * s_last_b + e[:, None] * s_last_e + n[None, :] * s_last_n
            prev = tl.load(ptrs, mask=e_ok[:, None], other=0.0)
            tl.store(
                ptrs, prev + tl.exp(A.to(tl.float32) * carry[:, None]) * h0.to(tl.float32), mask=e_ok[:, None]
            )


def add_initial_state(
    y0: Tensor,
    delta: Tensor,
    delta_bias: Tensor | None,
    delta_softplus: bool,
    A: Tensor,
    C: Tensor,
    h0: Tensor,
    z: Tensor | None = None,
    last: Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    block_e: int = 32,
    block_l: int = 64,
) -> Tensor:
    """The run from ``h0`` given the zero-state run ``y0`` (b,e,l) (ungated): returns
    ``(y0 + C . exp(A c) h0) * silu(z)`` (b,e,l) in ``out_dtype`` (default y0's) and adds
    ``exp(A c_L) * h0`` to ``last`` (b,e,n) fp32 in place when given.

    delta (b,e,l) raw (bias and softplus applied here, as the scan does); A (e,n); C (b,n,l);
    h0 (b,e,n). The state size n must be a power of two (Triton block shapes).
    """
    if triton is None:
        raise RuntimeError("triton is not installed")
    b, E, L = y0.shape
    N = A.shape[1]
    if C.dim() != 3:
        raise ValueError(f"C must be (b, n, l) for this kernel, got shape {tuple(C.shape)}")
    if N & (N - 1):
        raise ValueError(f"d_state={N} is not a power of two")
    out = torch.empty_like(y0, dtype=out_dtype or y0.dtype)
    zz = z if z is not None else y0  # unused when HAS_Z is False
    bias = delta_bias if delta_bias is not None else A  # unused when HAS_BIAS is False
    lst = last if last is not None else h0  # unused when HAS_LAST is False
    if last is not None and last.dtype != torch.float32:
        raise ValueError("last state must be fp32")
    grid = (b, triton.cdiv(E, block_e))
    _initial_state_kernel[grid](
        y0, delta, bias, A, C, h0, zz, out, lst,
        E, L,
        *y0.stride(), *delta.stride(), *A.stride(), *C.stride(), *h0.stride(), *zz.stride(), *out.stride(),
        *lst.stride(),
        N=N, BLOCK_E=block_e, BLOCK_L=block_l,
        HAS_BIAS=delta_bias is not None, SOFTPLUS=bool(delta_softplus), HAS_Z=z is not None,
        HAS_LAST=last is not None,
    )  # fmt: skip
    return out


def add_initial_state_ref(
    y0: Tensor,
    delta: Tensor,
    delta_bias: Tensor | None,
    delta_softplus: bool,
    A: Tensor,
    C: Tensor,
    h0: Tensor,
    z: Tensor | None = None,
    last: Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """The plain twin: builds exp(A c) as a (b,e,l,n) tensor (what ops.cuda did before)."""
    dt = delta.float() + (delta_bias.float()[:, None] if delta_bias is not None else 0.0)
    dt = F.softplus(dt) if delta_softplus else dt
    c = torch.cumsum(dt, dim=-1)  # (b,e,l)
    decay = torch.exp(c[..., None] * A.float()[:, None, :])  # (b,e,l,n)
    y = y0.float() + torch.einsum("beln,ben,bnl->bel", decay, h0.float(), C.float())
    if z is not None:
        y = y * F.silu(z.float())
    if last is not None:
        last += decay[:, :, -1] * h0.float()
    return y.to(out_dtype or y0.dtype)

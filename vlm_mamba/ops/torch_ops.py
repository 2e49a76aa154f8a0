"""Pure-PyTorch ops with autograd: the CPU path (and any device without the CUDA kernels).

Two ways to run each scan, picked per length by ``selective_scan_torch`` / ``ssd_chunk_scan_torch``
from thresholds measured on the 2-core CPU this project develops on (see the constants below and
``benchmarks/bench_lm.py``):

- a time loop over precomputed decays and inputs (few large ops before and after, one fused
  multiply-add per step forward and one backward, in a hand-written autograd Function): cheapest
  at short lengths, where per-op overhead dominates;
- a chunked scan: Mamba-1 uses a Hillis-Steele doubling scan inside chunks plus a loop over chunk
  boundaries; Mamba-2 uses the SSD block decomposition (Mamba-2 paper, section 6; mamba_ssm's
  ``ssd_minimal_discrete``). Every decay factor stays <= 1, so both are stable for any dt.

Shapes: ``b`` batch, ``l`` length, ``e`` channels, ``n`` state size, ``k`` conv width, ``h`` heads,
``p`` head width, ``g`` groups, ``c`` chunks, ``t``/``s`` positions inside a chunk.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from vlm_mamba.ops.reference import (
    _act,
    _dt,
    add_rms_norm_ref,
    rms_norm_gated_ref,
    selective_state_update_ref,
)

# Lengths at or above which the chunked scans beat the time loop, forward+backward, measured on the
# 2-core CPU (see benchmarks/bench_lm.py, section "scan"). Chunk lengths measured alongside.
SELECTIVE_SCAN_CHUNKED_MIN_LEN = 1 << 30  # the doubling scan lost to the loop at every length tried (32..256)
SELECTIVE_SCAN_CHUNK = 16
SSD_CHUNKED_MIN_LEN = 1  # the SSD chunked form won at every length tried (8..256)
SSD_CPU_CHUNK = 64


# --------------------------------------------------------------------------------------------- conv
def causal_conv1d_torch(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    initial_states: Tensor | None = None,
    return_final_states: bool = False,
    activation: str | None = "silu",
):
    """Depthwise causal conv as k shifted multiply-adds over the input left-extended by the initial states.

    Args: x (b,e,l); weight (e,k); bias (e,); initial_states (b,e,k-1).
    Returns y (b,e,l) and, if asked, the final states (b,e,k-1) (the last k-1 inputs).
    """
    e, k = weight.shape
    L = x.shape[-1]
    if initial_states is not None:
        xp = torch.cat([initial_states.to(x.dtype), x], dim=-1)  # (b,e,k-1+l)
    else:
        xp = F.pad(x, (k - 1, 0))
    # k shifted multiply-adds, not F.conv1d: forward+backward on the 2-core CPU at the demo LM's width
    # (b=16, e=256): 1.0 vs 1.7 ms at L=32, 2.5 vs 3.0 ms at L=64 (bench_lm.py, section "conv")
    w = weight.to(x.dtype)[:, :, None]  # (e,k,1)
    y = (
        xp[..., :L] * w[:, 0]
        if bias is None
        else torch.addcmul(bias.to(x.dtype)[:, None], xp[..., :L], w[:, 0])
    )
    for i in range(1, k):
        y = torch.addcmul(y, xp[..., i : i + L], w[:, i])
    y = _act(y, activation)
    if return_final_states:
        return y, xp[..., xp.shape[-1] - (k - 1) :]
    return y


def causal_conv1d_channels_last(
    x: Tensor, weight: Tensor, bias: Tensor | None = None, initial_states: Tensor | None = None,
    activation: str | None = "silu",
) -> Tensor:  # fmt: skip
    """``causal_conv1d_torch`` with the channels last: x (b,l,e) -> y (b,l,e).

    For the compiled CPU scan, which reads (b,l,e): the Mamba-1 mixer then needs no transposes
    between in_proj, the conv, x_proj, the scan and out_proj. initial_states (b,e,k-1) as elsewhere.
    """
    b, L, e = x.shape
    k = weight.shape[-1]
    if initial_states is not None:
        xp = torch.cat([initial_states.to(x.dtype).transpose(1, 2), x], dim=1)  # (b,k-1+l,e)
    else:
        xp = F.pad(x, (0, 0, k - 1, 0))
    w = weight.to(x.dtype).t()  # (k,e)
    y = xp[:, :L] * w[0] if bias is None else torch.addcmul(bias.to(x.dtype), xp[:, :L], w[0])
    for i in range(1, k):
        y = torch.addcmul(y, xp[:, i : i + L], w[i])
    return _act(y, activation)


def causal_conv1d_update_torch(
    x: Tensor, conv_state: Tensor, weight: Tensor, bias: Tensor | None = None, activation: str | None = "silu"
):
    """One conv step: x (b,e), conv_state (b,e,k-1) -> (y (b,e), new_state (b,e,k-1))."""
    xp = torch.cat([conv_state.to(x.dtype), x[..., None]], dim=-1)  # (b,e,k)
    y = (xp * weight.to(x.dtype)).sum(-1)
    if bias is not None:
        y = y + bias.to(x.dtype)
    return _act(y, activation), xp[..., 1:]


selective_state_update_torch = selective_state_update_ref  # already one vectorised step
# the norms are a handful of elementwise ops and one reduction: their plain form is the torch one
add_rms_norm_torch = add_rms_norm_ref
rms_norm_gated_torch = rms_norm_gated_ref


# ---------------------------------------------------------------------------------- Mamba-1 scan
def _scan_inputs(u, delta, A, B, delta_bias, delta_softplus):
    """Time-major discretisation: dA = exp(delta A), dBu = delta B u, both (l,b,e,n) fp32."""
    b, e, L = u.shape
    delta = _dt(delta, None if delta_bias is None else delta_bias[:, None], delta_softplus)  # (b,e,l)
    delta_t = delta.permute(2, 0, 1)  # (l,b,e)
    dA = torch.exp(delta_t[..., None] * A.float())  # (l,b,e,n)
    Bt = B.float().permute(-1, 0, *range(1, B.dim() - 1))  # (l,b,n) | (l,b,g,n)
    if Bt.dim() == 3:
        Bt = Bt[:, :, None, :]  # (l,b,1,n)
    else:
        Bt = Bt.repeat_interleave(e // Bt.shape[2], dim=2)  # (l,b,e,n)
    dBu = (delta_t * u.float().permute(2, 0, 1))[..., None] * Bt  # (l,b,e,n)
    return delta, dA, dBu


def _scan_output(states, u, C, D, z, e):
    """y_t = C_t . h_t + D u_t, gated by silu(z). states (l,b,e,n) -> y (b,e,l) fp32."""
    Ct = C.float().permute(-1, 0, *range(1, C.dim() - 1))  # (l,b,n) | (l,b,g,n)
    if Ct.dim() == 3:
        y = torch.einsum("lben,lbn->bel", states, Ct)
    else:
        y = torch.einsum("lben,lben->bel", states, Ct.repeat_interleave(e // Ct.shape[2], dim=2))
    if D is not None:
        y = y + u.float() * D.float()[:, None]
    if z is not None:
        y = y * F.silu(z.float())
    return y


class _LinearRecurrence(torch.autograd.Function):
    """h_t = a_t * h_{t-1} + x_t over the leading (time) axis, with a hand-written backward.

    Forward and backward are each one fused multiply-add per step, written in place into
    preallocated (l, ...) buffers; autograd's version of the same loop records two multiplies, an
    add and a stack per step. On the 2-core CPU the recurrence alone ran ~3.5x faster at
    (l=30, b=16, e=256, n=8); the whole scan with its discretisation and output 16.6 vs 19.3 ms
    forward+backward at l=32 and level at l=64 (benchmarks/results/bench_lm_scan_demo.json), and a
    demo training step 7-13% faster together with the conv and patchify changes.
    Backward, for t = 0..l-1 and h_{-1} the initial state (zero when None): g_t = dL/dh_t +
    a_{t+1} g_{t+1}; dL/dx_t = g_t; dL/da_t = g_t h_{t-1}; dL/dh_{-1} = a_0 g_0.
    """

    @staticmethod
    def forward(ctx, a: Tensor, x: Tensor, h0: Tensor | None) -> Tensor:
        a, x = a.contiguous(), x.contiguous()
        states = torch.empty_like(x)
        h = h0
        for t in range(x.shape[0]):
            if h is None:
                states[t].copy_(x[t])
            else:
                torch.addcmul(x[t], a[t], h, out=states[t])
            h = states[t]
        ctx.save_for_backward(a, states, h0)
        return states

    @staticmethod
    def backward(ctx, grad: Tensor):
        a, states, h0 = ctx.saved_tensors
        g = grad.contiguous().clone()
        for t in range(g.shape[0] - 2, -1, -1):
            g[t].addcmul_(a[t + 1], g[t + 1])
        grad_a = grad_h0 = None
        if ctx.needs_input_grad[0]:
            grad_a = torch.empty_like(a)
            torch.mul(g[1:], states[:-1], out=grad_a[1:])
            if h0 is None:
                grad_a[0].zero_()
            else:
                torch.mul(g[0], h0, out=grad_a[0])
        if h0 is not None and ctx.needs_input_grad[2]:
            grad_h0 = g[0] * a[0]
        return grad_a, g, grad_h0


def selective_scan_loop(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, initial_state=None,
    return_last_state=False,
):  # fmt: skip
    """Mamba-1 scan as a loop of one fused multiply-add per step over precomputed dA, dBu."""
    b, e, L = u.shape
    _, dA, dBu = _scan_inputs(u, delta, A, B, delta_bias, delta_softplus)
    h0 = initial_state.float() if initial_state is not None else None
    if h0 is not None and h0.shape != dA.shape[1:]:
        raise ValueError(f"initial_state has shape {tuple(h0.shape)}, expected {tuple(dA.shape[1:])}")
    states = _LinearRecurrence.apply(dA, dBu, h0)  # (l,b,e,n)
    y = _scan_output(states, u, C, D, z, e).to(u.dtype)  # (b,e,l)
    if not return_last_state:
        return y
    return y, (states[-1] if L else h0 if h0 is not None else dA.new_zeros(dA.shape[1:]))


def selective_scan_chunked(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, initial_state=None,
    return_last_state=False, chunk: int = SELECTIVE_SCAN_CHUNK,
):  # fmt: skip
    """Mamba-1 scan: Hillis-Steele doubling scan within chunks, then a loop over chunk boundaries.

    The pair (a, x) composes as (a2 a1, a2 x1 + x2); after log2(chunk) doubling steps position t of
    a chunk holds the decay product since the chunk start and the state reached from a zero start.
    """
    b, e, L = u.shape
    _, dA, dBu = _scan_inputs(u, delta, A, B, delta_bias, delta_softplus)
    n = dA.shape[-1]
    T = min(chunk, L)
    pad = (-L) % T
    if pad:  # identity steps: decay 1, input 0
        dA = torch.cat([dA, dA.new_ones(pad, *dA.shape[1:])])
        dBu = torch.cat([dBu, dBu.new_zeros(pad, *dBu.shape[1:])])
    a = dA.reshape(-1, T, b, e, n)  # (c,t,b,e,n)
    x = dBu.reshape(-1, T, b, e, n).expand_as(a)
    k = 1
    while k < T:
        x = torch.cat([x[:, :k], torch.addcmul(x[:, k:], a[:, k:], x[:, :-k])], dim=1)
        a = torch.cat([a[:, :k], a[:, k:] * a[:, :-k]], dim=1)
        k *= 2
    h = initial_state.float() if initial_state is not None else a.new_zeros(b, e, n)
    starts = []
    for a_c, x_c in zip(a[:, -1].unbind(0), x[:, -1].unbind(0)):
        starts.append(h)
        h = torch.addcmul(x_c, a_c, h)
    states = torch.addcmul(x, a, torch.stack(starts)[:, None])  # (c,t,b,e,n)
    states = states.reshape(-1, b, e, n)[:L]  # (l,b,e,n)
    y = _scan_output(states, u, C, D, z, e).to(u.dtype)
    return (y, h) if return_last_state else y


def selective_scan_torch(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, initial_state=None,
    return_last_state=False,
):  # fmt: skip
    """Mamba-1 selective scan, mamba_ssm ``selective_scan_fn``'s signature plus ``initial_state``.

    Args: u, delta, z (b,e,l); A (e,n); B, C (b,n,l) or (b,g,n,l); D, delta_bias (e,);
    initial_state (b,e,n). Returns y (b,e,l) in u's dtype and, if asked, the last state (b,e,n) fp32.
    """
    # On a GPU (only when the kernels are missing) the doubling scan won: 5.2 vs 11.4 ms fwd+bwd at
    # b=8, e=512, n=16, L=128 on an H100 (benchmarks/results/bench_lm_cuda.json).
    chunked = u.device.type != "cpu" or u.shape[-1] >= SELECTIVE_SCAN_CHUNKED_MIN_LEN
    fn = selective_scan_chunked if chunked else selective_scan_loop
    return fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, return_last_state)


# ---------------------------------------------------------------------------------- Mamba-2 scan
def _ssd_inputs(x, dt, A, B, C, dt_bias, dt_softplus):
    b, L, h, p = x.shape
    dt = _dt(dt, dt_bias, dt_softplus)  # (b,l,h)
    Bh = B.float().repeat_interleave(h // B.shape[2], dim=2)  # (b,l,h,n)
    Ch = C.float().repeat_interleave(h // C.shape[2], dim=2)
    return dt, Bh, Ch


def _ssd_finish(y, x, D, z):
    if D is not None:
        Df = D.float()
        y = y + x.float() * (Df[:, None] if Df.dim() == 1 else Df)
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(x.dtype)


def ssd_loop(
    x, dt, A, B, C, chunk_size, D=None, z=None, initial_states=None, return_final_states=False,
    dt_bias=None, dt_softplus=False,
):  # fmt: skip
    """Mamba-2 scan as a time loop over precomputed decays and inputs."""
    b, L, h, p = x.shape
    dt, Bh, Ch = _ssd_inputs(x, dt, A, B, C, dt_bias, dt_softplus)
    dA = torch.exp(dt * A.float()).permute(1, 0, 2)[..., None, None]  # (l,b,h,1,1)
    dBx = torch.einsum("blh,blhp,blhn->lbhpn", dt, x.float(), Bh)  # (l,b,h,p,n)
    s = initial_states.float() if initial_states is not None else dBx.new_zeros(dBx.shape[1:])
    states = []
    for dA_t, dBx_t in zip(dA.unbind(0), dBx.unbind(0)):
        s = torch.addcmul(dBx_t, dA_t, s)
        states.append(s)
    y = torch.einsum("lbhpn,blhn->blhp", torch.stack(states), Ch)
    y = _ssd_finish(y, x, D, z)
    return (y, s) if return_final_states else y


def _segsum(a: Tensor) -> Tensor:
    """a (..., t) -> (..., t, s): sum of a over (s, t] below the diagonal, -inf above (stable form)."""
    T = a.shape[-1]
    a = a[..., None].expand(*a.shape, T)  # (...,t,s) holding a_t
    a = a.masked_fill(~torch.ones(T, T, dtype=torch.bool, device=a.device).tril(-1), 0)
    cs = torch.cumsum(a, dim=-2)
    return cs.masked_fill(~torch.ones(T, T, dtype=torch.bool, device=a.device).tril(0), float("-inf"))


def ssd_chunked(
    x, dt, A, B, C, chunk_size, D=None, z=None, initial_states=None, return_final_states=False,
    dt_bias=None, dt_softplus=False,
):  # fmt: skip
    """Mamba-2 SSD block decomposition (mamba_ssm ``ssd_minimal_discrete``), with initial states.

    ``chunk_size`` is mathematically irrelevant here (the result is the same for any chunking), so
    the CPU path uses its own measured ``SSD_CPU_CHUNK``, never longer than the sequence.
    """
    b, L, h, p = x.shape
    dt, Bh, Ch = _ssd_inputs(x, dt, A, B, C, dt_bias, dt_softplus)
    T = min(SSD_CPU_CHUNK, L)
    pad = (-L) % T
    xd = x.float() * dt[..., None]  # (b,l,h,p)
    Adt = dt * A.float()  # (b,l,h)
    if pad:  # dt = 0 steps: decay 1, input 0
        xd, Adt, Bh, Ch = (F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) for t in (xd, Adt, Bh, Ch))
    c = xd.shape[1] // T
    xd = xd.reshape(b, c, T, h, p)
    Bc = Bh.reshape(b, c, T, h, -1)
    Cc = Ch.reshape(b, c, T, h, -1)
    Ac = Adt.reshape(b, c, T, h).permute(0, 3, 1, 2)  # (b,h,c,t)
    A_cum = torch.cumsum(Ac, dim=-1)  # (b,h,c,t)
    # 1. within-chunk outputs (the diagonal blocks)
    Lmat = torch.exp(_segsum(Ac))  # (b,h,c,t,s)
    y_diag = torch.einsum("bctHn,bcsHn,bHcts,bcsHp->bctHp", Cc, Bc, Lmat, xd)
    # 2. each chunk's end state from a zero start
    decay_states = torch.exp(A_cum[..., -1:] - A_cum)  # (b,h,c,t)
    states = torch.einsum("bctHn,bHct,bctHp->bcHpn", Bc, decay_states, xd)
    # 3. states at chunk boundaries, from the initial state through every chunk
    init = initial_states.float() if initial_states is not None else states.new_zeros(b, h, p, Bh.shape[-1])
    states = torch.cat([init[:, None], states], dim=1)  # (b,c+1,h,p,n)
    decay_chunk = torch.exp(_segsum(F.pad(A_cum[..., -1], (1, 0))))  # (b,h,c+1,c+1)
    new_states = torch.einsum("bHzc,bcHpn->bzHpn", decay_chunk, states)
    states, final = new_states[:, :-1], new_states[:, -1]
    # 4. contribution of each chunk's start state to its outputs
    y_off = torch.einsum("bctHn,bcHpn,bHct->bctHp", Cc, states, torch.exp(A_cum))
    y = (y_diag + y_off).reshape(b, c * T, h, p)[:, :L]
    y = _ssd_finish(y, x, D, z)
    return (y, final) if return_final_states else y


def ssd_chunk_scan_torch(
    x, dt, A, B, C, chunk_size, D=None, z=None, initial_states=None, return_final_states=False,
    dt_bias=None, dt_softplus=False,
):  # fmt: skip
    """Mamba-2 scan, mamba_ssm ``mamba_chunk_scan_combined``'s signature (minus seq_idx, dt_limit).

    Args: x, z (b,l,h,p); dt (b,l,h); A (h,); B, C (b,l,g,n); D (h,) or (h,p); dt_bias (h,);
    initial_states (b,h,p,n). Returns y (b,l,h,p) in x's dtype and, if asked, the final state fp32.
    """
    fn = ssd_chunked if x.shape[1] >= SSD_CHUNKED_MIN_LEN else ssd_loop
    return fn(x, dt, A, B, C, chunk_size, D, z, initial_states, return_final_states, dt_bias, dt_softplus)

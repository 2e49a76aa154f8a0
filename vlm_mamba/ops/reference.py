"""Sequential references: the plainest correct form of every op, used by tests and by ``kernel="ref"``.

Each function has the signature of its dispatched twin in ``vlm_mamba.ops`` and computes one time
step after another in fp32, as mamba_ssm's ``selective_scan_ref`` / ``selective_state_update_ref``
and ``ssd_minimal``'s recurrence do. Nothing here is tuned: the point is to be obviously right.

Shapes: ``b`` batch, ``l`` length, ``e`` channels (Mamba-1 inner width, or the conv channels),
``n`` state size, ``k`` conv width, ``h`` heads, ``p`` head width, ``g`` groups.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _act(y: Tensor, activation: str | None) -> Tensor:
    if activation in (None, "identity"):
        return y
    if activation in ("silu", "swish"):
        return F.silu(y)
    raise ValueError(f"activation must be 'silu' or None, got {activation!r}")


def causal_conv1d_ref(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    initial_states: Tensor | None = None,
    return_final_states: bool = False,
    activation: str | None = "silu",
):
    """Depthwise causal conv as an explicit sum over taps (causal_conv1d's ``causal_conv1d_ref``).

    Args: x (b,e,l); weight (e,k); bias (e,); initial_states (b,e,k-1): the k-1 inputs before x[..., 0].
    Returns: y (b,e,l) in x's dtype, and with ``return_final_states`` the last k-1 inputs (b,e,k-1).
    """
    b, e, L = x.shape
    k = weight.shape[-1]
    init = initial_states if initial_states is not None else x.new_zeros(b, e, k - 1)
    xp = torch.cat([init.to(x.dtype), x], dim=-1).float()  # (b,e,k-1+l)
    y = torch.zeros(b, e, L, dtype=torch.float32, device=x.device)
    for j in range(k):  # tap j multiplies the input j steps before the last one
        y = y + xp[..., j : j + L] * weight[:, j, None].float()
    if bias is not None:
        y = y + bias.float()[:, None]
    y = _act(y, activation).to(x.dtype)
    if return_final_states:
        return y, xp[..., L:].to(x.dtype)
    return y


def causal_conv1d_update_ref(
    x: Tensor, conv_state: Tensor, weight: Tensor, bias: Tensor | None = None, activation: str | None = "silu"
):
    """One conv step: x (b,e), conv_state (b,e,k-1) -> (y (b,e), new_state (b,e,k-1))."""
    y, new_state = causal_conv1d_ref(
        x[..., None], weight, bias, initial_states=conv_state, return_final_states=True, activation=activation
    )
    return y[..., 0], new_state


def _dt(dt: Tensor, dt_bias: Tensor | None, dt_softplus: bool) -> Tensor:
    dt = dt.float()
    if dt_bias is not None:
        dt = dt + dt_bias.float()
    return F.softplus(dt) if dt_softplus else dt


def _groups_to_channels(BC: Tensor, e: int) -> Tensor:
    """B or C of mamba_ssm's selective_scan, (b,n,l) or (b,g,n,l), as (b,e,n,l)."""
    if BC.dim() == 3:
        return BC[:, None].expand(-1, e, -1, -1)
    g = BC.shape[1]
    return BC.repeat_interleave(e // g, dim=1)


def selective_scan_ref(
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
):
    """Mamba-1 selective scan, one step at a time (mamba_ssm ``selective_scan_ref`` + an initial state).

    h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t;  y_t = C_t . h_t + D u_t;  y *= silu(z).
    Args: u, delta, z (b,e,l); A (e,n); B, C (b,n,l) or (b,g,n,l); D, delta_bias (e,);
    initial_state (b,e,n). Returns y (b,e,l) in u's dtype and, if asked, the last state (b,e,n) fp32.
    """
    b, e, L = u.shape
    delta = _dt(delta, None if delta_bias is None else delta_bias[:, None], delta_softplus)  # (b,e,l)
    uf = u.float()
    Bf = _groups_to_channels(B.float(), e)  # (b,e,n,l)
    Cf = _groups_to_channels(C.float(), e)
    h = (
        initial_state.float()
        if initial_state is not None
        else u.new_zeros(b, e, A.shape[1], dtype=torch.float32)
    )
    ys = []
    for t in range(L):
        dA = torch.exp(delta[:, :, t, None] * A.float())  # (b,e,n)
        h = dA * h + (delta[:, :, t] * uf[:, :, t])[..., None] * Bf[..., t]
        ys.append((h * Cf[..., t]).sum(-1))  # (b,e)
    y = torch.stack(ys, dim=-1)  # (b,e,l)
    if D is not None:
        y = y + uf * D.float()[:, None]
    if z is not None:
        y = y * F.silu(z.float())
    y = y.to(u.dtype)
    return (y, h) if return_last_state else y


def selective_state_update_ref(
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
):
    """One recurrent step, mamba_ssm ``selective_state_update_ref`` made functional.

    Mamba-1: state (b,e,n), x/dt/z (b,e), A (e,n), B/C (b,n), D/dt_bias (e,).
    Mamba-2: state (b,h,p,n), x/dt/z (b,h,p), A (h,p,n), B/C (b,g,n), D/dt_bias (h,p).
    Returns (y like x, new_state fp32 like state); ``state`` is not modified.
    """
    dt = _dt(dt, dt_bias, dt_softplus)  # like x
    if state.dim() == 4 and B.dim() == 3:  # (b,g,n) -> (b,h,1,n)
        h = state.shape[1]
        B = B.repeat_interleave(h // B.shape[1], dim=1)[:, :, None]
        C = C.repeat_interleave(h // C.shape[1], dim=1)[:, :, None]
    else:  # (b,n) -> (b,1,n)
        B, C = B[:, None], C[:, None]
    dA = torch.exp(dt[..., None] * A.float())
    new_state = state.float() * dA + (dt * x.float())[..., None] * B.float()
    y = (new_state * C.float()).sum(-1)
    if D is not None:
        y = y + x.float() * D.float()
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(x.dtype), new_state.to(state.dtype)


def ssd_chunk_scan_ref(
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
):
    """Mamba-2 SSD as its recurrence, one step at a time (``chunk_size`` is accepted and unused).

    h_t = exp(dt_t A_h) h_{t-1} + dt_t x_t B_t^T;  y_t = h_t C_t + D x_t;  y *= silu(z)
    (Mamba-2 paper eq. (2) with scalar-times-identity A). Args: x, z (b,l,h,p); dt (b,l,h); A (h,);
    B, C (b,l,g,n); D (h,) or (h,p); dt_bias (h,); initial_states (b,h,p,n).
    Returns y (b,l,h,p) in x's dtype and, if asked, the final state (b,h,p,n) fp32.
    """
    b, L, h, p = x.shape
    n = B.shape[-1]
    dt = _dt(dt, dt_bias, dt_softplus)  # (b,l,h)
    Bh = B.float().repeat_interleave(h // B.shape[2], dim=2)  # (b,l,h,n)
    Ch = C.float().repeat_interleave(h // C.shape[2], dim=2)
    xf = x.float()
    s = initial_states.float() if initial_states is not None else x.new_zeros(b, h, p, n, dtype=torch.float32)
    ys = []
    for t in range(L):
        dA = torch.exp(dt[:, t] * A.float())  # (b,h)
        s = s * dA[..., None, None] + (dt[:, t, :, None] * xf[:, t])[..., None] * Bh[:, t, :, None, :]
        ys.append((s * Ch[:, t, :, None, :]).sum(-1))  # (b,h,p)
    y = torch.stack(ys, dim=1)  # (b,l,h,p)
    if D is not None:
        Df = D.float()
        y = y + xf * (Df[:, None] if Df.dim() == 1 else Df)
    if z is not None:
        y = y * F.silu(z.float())
    y = y.to(x.dtype)
    return (y, s) if return_final_states else y


# ------------------------------------------------------------------------------------------ norms
def rms_norm_ref(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm over the last dim (Zhang & Sennrich 2019) in fp32, returned in x's dtype."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.float()).to(x.dtype)


def add_rms_norm_ref(
    x: Tensor,
    residual: Tensor | None,
    weight: Tensor,
    eps: float,
    residual_in_fp32: bool = False,
    prenorm: bool = True,
):
    """Residual add then RMSNorm: mamba_ssm ``Block``'s unfused path, twin of ``rms_norm_fn``.

    residual <- x + residual (x alone when None); out = rmsnorm(residual in weight's dtype).
    Args: x, residual (..., d); weight (d,). Returns (out, residual) with ``prenorm``, the residual
    fp32 with ``residual_in_fp32``; else out alone.
    """
    res = x if residual is None else residual + x
    out = rms_norm_ref(res.to(weight.dtype), weight, eps)
    if residual_in_fp32:
        res = res.float()
    return (out, res) if prenorm else out


def rms_norm_gated_ref(
    x: Tensor,
    weight: Tensor,
    z: Tensor | None = None,
    eps: float = 1e-5,
    group_size: int | None = None,
    norm_before_gate: bool = False,
) -> Tensor:
    """Mamba-2's gated, grouped RMSNorm in fp32 (mamba_ssm ``layernorm_gated.rms_norm_ref``).

    ``norm_before_gate=False``: norm(x * silu(z)) * weight; True: norm(x) * weight * silu(z). Groups
    of ``group_size`` channels (default: all) are normalised separately. Returns x's dtype.
    """
    xf = x.float()
    group_size = group_size or x.shape[-1]
    if z is not None and not norm_before_gate:
        xf = xf * F.silu(z.float())
    xg = xf.unflatten(-1, (-1, group_size))  # (..., groups, group_size)
    y = (xg * torch.rsqrt(xg.pow(2).mean(-1, keepdim=True) + eps)).flatten(-2) * weight.float()
    if z is not None and norm_before_gate:
        y = y * F.silu(z.float())
    return y.to(x.dtype)

"""Thin wrappers over mamba_ssm / causal_conv1d CUDA kernels, with the ``vlm_mamba.ops`` signatures.

Only ``vlm_mamba.ops`` imports this module, and only after ``load()`` succeeded. What the kernels
lack is added here without leaving the GPU:

- ``selective_scan_fn`` takes no initial state. Forward-only calls take the project's CUDA scan that
  starts from it (``ops.cuda_scan_state``, mamba_ssm's algorithm with the carried prefix starting at
  h0, compiled on first use) or, where that is not built, a Triton form: the one-pass scan from h0
  for short prefills, else the zero-state kernel + the h0 term (``triton_scan.state_scan_form`` says
  which, and why). The scan is linear in its state, so a run from h0 equals the run from zero plus
  ``C_t . (exp(A * cumsum(delta)_t) * h0)`` at every step (and the same decay times h0 on the last
  state); where autograd must differentiate, that term is added with plain tensor ops.
  With ``VLM_MAMBA_STATE_SCAN=prefix`` Mamba-1's mixer does not come here with a state: it writes the
  state into the sequence as prefix tokens (``ops.state_prefix``) and calls the zero-state kernel.
- ``causal_conv1d_fn`` takes initial states only for channel-last inputs; only the first k-1
  outputs read them, so those are recomputed from a small window (exact for any layout, and the
  sequence is not copied).
- The one-step kernels (``causal_conv1d_update``, ``selective_state_update``) update their state in
  place; they get a clone, so the caller's state is never mutated.

Shapes: ``b`` batch, ``l`` length, ``e`` channels, ``n`` state size, ``k`` conv width, ``h`` heads,
``p`` head width, ``g`` groups.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from vlm_mamba.ops import cuda_scan_state, triton_conv, triton_scan
from vlm_mamba.ops.reference import _dt, _groups_to_channels


@functools.cache
def load() -> SimpleNamespace:
    """Import the kernels once. Raises ImportError/RuntimeError saying what is missing."""
    if not torch.cuda.is_available():
        raise RuntimeError("torch.cuda.is_available() is False (no GPU or a CPU-only torch build)")
    from causal_conv1d import causal_conv1d_fn, causal_conv1d_update
    from mamba_ssm.ops.selective_scan_interface import mamba_inner_fn, selective_scan_fn
    from mamba_ssm.ops.triton.layer_norm import rms_norm_fn
    from mamba_ssm.ops.triton.layernorm_gated import rmsnorm_fn as rms_norm_gated_fn
    from mamba_ssm.ops.triton.selective_state_update import selective_state_update
    from mamba_ssm.ops.triton.ssd_combined import (
        mamba_chunk_scan_combined,
        mamba_split_conv1d_scan_combined,
    )

    return SimpleNamespace(
        causal_conv1d_fn=causal_conv1d_fn,
        causal_conv1d_update=causal_conv1d_update,
        mamba_inner_fn=mamba_inner_fn,
        selective_scan_fn=selective_scan_fn,
        selective_state_update=selective_state_update,
        mamba_chunk_scan_combined=mamba_chunk_scan_combined,
        mamba_split_conv1d_scan_combined=mamba_split_conv1d_scan_combined,
        rms_norm_fn=rms_norm_fn,
        rms_norm_gated_fn=rms_norm_gated_fn,
    )


def causal_conv1d(x, weight, bias=None, initial_states=None, return_final_states=False, activation="silu"):
    """x (b,e,l), weight (e,k), initial_states (b,e,k-1) -> y (b,e,l) [, final states (b,e,k-1)]."""
    K = load()
    k = weight.shape[-1]
    if (
        initial_states is not None
        and x.shape[-1] <= triton_conv.MAX_LENGTH
        and triton_conv.available()
        and not _needs_grad(x, weight, bias, initial_states)
    ):  # a short prompt from a cached window: one Triton launch (see ops.triton_conv)
        y = triton_conv.causal_conv1d_short(x, weight, bias, initial_states, activation)
        if return_final_states:
            full = torch.cat([initial_states.to(x.dtype), x[..., max(x.shape[-1] - (k - 1), 0) :]], dim=-1)
            return y, full[..., full.shape[-1] - (k - 1) :]
        return y
    if x.stride(-1) != 1 and (x.stride(0) % 8 or x.stride(2) % 8):
        x = x.contiguous()  # the channel-last kernel needs strides that are multiples of 8
    y = K.causal_conv1d_fn(x, weight, bias, activation=activation)
    if (
        initial_states is not None
        and x.shape[-1] >= k - 1
        and y.dtype == x.dtype
        and triton_conv.available()
        and not _needs_grad(x, weight, bias, initial_states)
    ):  # the first k-1 outputs, the only ones that read the window, rewritten in one Triton launch
        triton_conv.causal_conv1d_short(
            x[..., : k - 1], weight, bias, initial_states, activation, out=y[..., : k - 1]
        )
    elif initial_states is not None:
        # only the first k-1 outputs read the initial states: they are recomputed from a
        # (b, e, 2k-2) window and written over the kernel's (which read zeros there), so the
        # sequence is never copied to prepend the states
        init = initial_states.to(x.dtype)
        window = torch.cat([init, x[..., : k - 1]], dim=-1).float()  # (b,e,k-1+min(l,k-1))
        head = F.conv1d(window, weight.float()[:, None, :], None if bias is None else bias.float(),
                        groups=weight.shape[0])  # fmt: skip
        if activation in ("silu", "swish"):
            head = F.silu(head)
        y[..., : head.shape[-1]] = head.to(y.dtype)
    if return_final_states:
        init = initial_states.to(x.dtype) if initial_states is not None else x.new_zeros(*x.shape[:2], k - 1)
        full = torch.cat([init, x[..., max(x.shape[-1] - (k - 1), 0) :]], dim=-1)
        return y, full[..., full.shape[-1] - (k - 1) :]
    return y


def causal_conv1d_update(x, conv_state, weight, bias=None, activation="silu"):
    """x (b,e), conv_state (b,e,k-1) -> (y (b,e), new_state); the kernel updates a clone in place."""
    state = conv_state.to(x.dtype).clone()
    y = load().causal_conv1d_update(x, state, weight, bias, activation)
    return y, state


def selective_scan(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, initial_state=None,
    return_last_state=False, channel_order=None,
):  # fmt: skip
    """mamba_ssm ``selective_scan_fn`` plus ``initial_state`` (b,e,n), added by linearity (see top);
    ``channel_order`` (optional) groups the h0 term's channels (``triton_scan.add_initial_state``)."""
    K = load()
    if (
        initial_state is None
        and triton_scan.short_scan_applies(u.shape[0], u.shape[-1])
        and B.dim() == 3
        and _initial_state_kernel_ok(A, C, u, delta, B, D, z, delta_bias)
    ):  # short forward-only scans of a large batch: the step-at-a-time Triton kernel from zero
        h0 = torch.zeros(u.shape[0], u.shape[1], A.shape[1], device=u.device, dtype=torch.float32)
        y, last = triton_scan.selective_scan_from_state(
            u, delta, A, B, C, D, z, delta_bias, delta_softplus, h0, sequential=True
        )
        return (y, last) if return_last_state else y
    if initial_state is None:
        return K.selective_scan_fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    cuda_ok = (
        triton_scan.state_scan_switch() in ("auto", "cuda")
        and cuda_scan_state.applies(u, delta, A, B, C, z)
        and not _needs_grad(u, delta, A, B, C, D, z, delta_bias, initial_state)
        and cuda_scan_state.load() is not None  # built on the first call outside a capture
    )
    form = triton_scan.state_scan_form(u.shape[0], u.shape[-1], cuda_kernel=cuda_ok)
    if form == "cuda":  # the CUDA scan that starts from h0 (ops.cuda_scan_state): one launch
        y, last = cuda_scan_state.selective_scan_from_state(
            u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state
        )
        return (y, last) if return_last_state else y
    if (
        form == "one_pass"
        and B.dim() == 3
        and _initial_state_kernel_ok(A, C, u, delta, B, D, z, delta_bias, initial_state)
    ):  # the one-pass Triton scan from h0 (short prefills, see triton_scan.state_scan_form)
        y, last = triton_scan.selective_scan_from_state(
            u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state
        )
        return (y, last) if return_last_state else y
    out = K.selective_scan_fn(u, delta, A, B, C, D, None, delta_bias, delta_softplus, return_last_state)
    y, last = out if return_last_state else (out, None)
    if _initial_state_kernel_ok(A, C, u, delta, B, D, z, delta_bias, initial_state):
        # prefill from a cached state: the h0 term in one Triton pass, no (b,e,l,n) tensor
        y = triton_scan.add_initial_state(
            y, delta, delta_bias, delta_softplus, A, C, initial_state, z, last, out_dtype=u.dtype,
            cutoff=triton_scan.DECAY_CUTOFF, order=channel_order,  # the cutoff read at each call
        )  # fmt: skip
        return (y, last) if return_last_state else y
    b, e, L = u.shape
    dlt = _dt(delta, None if delta_bias is None else delta_bias[:, None], delta_softplus)  # (b,e,l) fp32
    decay = torch.exp(torch.cumsum(dlt, dim=-1)[..., None] * A.float()[:, None, :])  # (b,e,l,n)
    Cf = _groups_to_channels(C.float(), e)  # (b,e,n,l)
    h0 = initial_state.float()
    y = y.float() + torch.einsum("beln,ben,benl->bel", decay, h0, Cf)
    if z is not None:
        y = y * F.silu(z.float())
    y = y.to(u.dtype)
    if return_last_state:
        return y, last.float() + decay[:, :, -1] * h0
    return y


def _initial_state_kernel_ok(A, C, *tensors) -> bool:
    """The Triton h0 term serves forward-only calls with (b,n,l) C and a power-of-two state size;
    a call autograd must differentiate keeps the PyTorch form below (the kernel has no backward)."""
    if not triton_scan.available() or C.dim() != 3 or A.shape[1] & (A.shape[1] - 1):
        return False
    return not _needs_grad(A, C, *tensors)


def _needs_grad(*tensors) -> bool:
    """Whether autograd will differentiate a call on ``tensors`` (None entries ignored): the Triton
    kernels here have no backward."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def causal_conv1d_update_(x, conv_state, weight, bias=None, activation="silu"):
    """x (b,e) -> y (b,e); ``conv_state`` (b,e,k-1), in x's dtype, updated in place (the kernel's own way)."""
    return load().causal_conv1d_update(x, conv_state, weight, bias, activation)


def selective_state_update_(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    """mamba_ssm's triton ``selective_state_update``, ``state`` updated in place -> y."""
    return load().selective_state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    """mamba_ssm's triton ``selective_state_update`` on a clone of ``state`` -> (y, new_state)."""
    new_state = state.clone()
    y = load().selective_state_update(new_state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)
    return y, new_state


def ssd_chunk_scan(
    x, dt, A, B, C, chunk_size, D=None, z=None, initial_states=None, return_final_states=False,
    dt_bias=None, dt_softplus=False,
):  # fmt: skip
    """mamba_ssm ``mamba_chunk_scan_combined``: x (b,l,h,p), dt (b,l,h), B/C (b,l,g,n)."""
    return load().mamba_chunk_scan_combined(
        x, dt, A, B, C, chunk_size, D=D, z=z, dt_bias=dt_bias, initial_states=initial_states,
        dt_softplus=dt_softplus, return_final_states=return_final_states,
    )  # fmt: skip


def mamba_inner(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, out_proj_weight,
                out_proj_bias, A, D, delta_bias):  # fmt: skip
    """mamba_ssm ``mamba_inner_fn`` (conv + x_proj + dt_proj + scan + out_proj fused, Mamba-1)."""
    return load().mamba_inner_fn(
        xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, out_proj_weight, out_proj_bias,
        A, None, None, D, delta_bias=delta_bias, delta_softplus=True,
    )  # fmt: skip


def mamba_split_conv1d_scan(
    zxbcdt, conv1d_weight, conv1d_bias, dt_bias, A, D, chunk_size, rmsnorm_weight, rmsnorm_eps,
    outproj_weight, outproj_bias, headdim, ngroups, norm_before_gate,
):  # fmt: skip
    """mamba_ssm ``mamba_split_conv1d_scan_combined`` (Mamba-2: split, conv, SSD, gated norm, out_proj)."""
    return load().mamba_split_conv1d_scan_combined(
        zxbcdt, conv1d_weight, conv1d_bias, dt_bias, A, D, chunk_size, activation="silu",
        rmsnorm_weight=rmsnorm_weight, rmsnorm_eps=rmsnorm_eps, outproj_weight=outproj_weight,
        outproj_bias=outproj_bias, headdim=headdim, ngroups=ngroups, norm_before_gate=norm_before_gate,
    )  # fmt: skip


def add_rms_norm(x, residual, weight, eps, residual_in_fp32=False, prenorm=True):
    """mamba_ssm triton ``rms_norm_fn`` with the residual carried, as its ``Block`` calls it.

    One pass reads x and the residual and writes the normed output (in x's dtype) and the new
    residual (fp32 with ``residual_in_fp32``; x itself, no copy, when there is nothing to add or cast).
    """
    return load().rms_norm_fn(
        x, weight, None, residual=residual, eps=eps, prenorm=prenorm, residual_in_fp32=residual_in_fp32
    )


def rms_norm_gated(x, weight, z=None, eps=1e-5, group_size=None, norm_before_gate=False):
    """mamba_ssm triton ``layernorm_gated.rmsnorm_fn`` (Mamba-2's gated, grouped RMSNorm)."""
    return load().rms_norm_gated_fn(
        x, weight, None, z=z, eps=eps, group_size=group_size, norm_before_gate=norm_before_gate
    )

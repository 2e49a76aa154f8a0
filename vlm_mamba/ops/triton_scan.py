"""Mamba-1's selective scan from an initial state, without a (b, e, l, n) tensor (Triton, forward only).

mamba_ssm's ``selective_scan_fn`` starts from zero. The scan is linear in its state, so a run from
``h0`` is the run from zero plus the free evolution of ``h0``:

    h_t = exp(A * c_t) * h0 + (zero-state h_t),   c_t = sum_{s <= t} dt_s   (Mamba paper, eq. 2a)
    y_t = (y0_t + sum_n C_{n,t} * exp(A_{e,n} * c_{e,t}) * h0_{e,n}) * silu(z_t)

``vlm_mamba.ops.cuda`` used to build ``exp(A * c)`` as a (b, e, l, n) fp32 tensor (0.8 GB per layer at
b=8, e=1536, l=1K) and contract it with an einsum. Here a first pass sums dt = softplus(delta +
bias) up to the end of each time block (a (b, e, l / block) tensor: each block's carry), and a
second pass, one program per (row, channel block, time block), forms ``c`` in registers (a block
cumsum plus the carry), sums the n terms, applies the gate and writes the output once; the last
block's program adds ``exp(A * c_L) * h0`` to the last state: two launches in all. Everything it
touches is (b, e, l) or smaller.

Forward only: prefill from a cached image state runs without gradients. Where autograd needs the
gradient (training from a state), ``vlm_mamba.ops.cuda`` keeps the differentiable PyTorch form.
``add_initial_state_ref`` is the plain twin the tests compare against (on the CPU through
``TRITON_INTERPRET=1``).

Shapes: ``b`` batch, ``e`` channels, ``l`` length, ``n`` state size.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor

from vlm_mamba.ops._triton import available, tl, triton  # noqa: F401  (available: this module's API)

# How ``vlm_mamba.ops.cuda.selective_scan`` runs a forward from a state (the image-state cache),
# read at every call: "cuda" the CUDA scan that starts from the state itself
# (``vlm_mamba.ops.cuda_scan_state``, compiled on first use; where it cannot be, "auto");
# "one_pass" (or "triton") :func:`selective_scan_from_state`; "two_pass"
# mamba_ssm's scan from zero + :func:`add_initial_state`; "prefix" the state written as 2n prefix
# tokens before the prompt and mamba_ssm's scan from zero over both (``vlm_mamba.ops.state_prefix``,
# taken by ``layers.mamba1``; where it cannot be, two passes; opt-in: measured slower, see
# below); "auto" (unset) one pass for prompts up to SEQUENTIAL_MAX_LENGTH tokens (one step at a
# time), the CUDA kernel above that where it builds, else one pass up to ONE_PASS_MAX_TOKENS tokens
# (batch x length), two passes above and, for longer prompts, whenever a CUDA graph is being captured.
#
# Measured on an H200 (base LM, d 768, 24 layers; prefill tokens/s from the state / from zero;
# benchmarks/results/bench_gpu_nvidia_h200_run_prefill_bd07cec.json): one pass 0.85 / 0.77 / 0.97x
# at b=1, 256 / 1K / 4K tokens, and 1.10 / 0.91x at b=8, 256 / 1K, against two passes' 0.50 / 0.70 /
# 0.85x and 0.97 / 0.73x; at b=8, 4K (32K tokens) one pass fell to 0.43x, two passes held 0.71x
# (the one-pass grid has no parallelism over time: each program walks the whole length). Those
# eager prefills are host-bound at these sizes (fewer launches win); in device time alone two passes
# always won (kernels timed alone: b=1, 4K: 0.31 against 0.51 ms a layer; b=8, 1K: 0.38 against
# 0.94), so a call captured in a CUDA graph (the VLM's prefill graphs) takes two passes.
# The h0 term's pass costs 0.67 ms a layer against the scan's 0.82 at b=8, e=1536, 4K (run
# 1a6c2f6), so two passes stay ~1.5x the zero-state prefill in device time. The prefix form avoids
# that pass, but at b=8 x 4096 tokens mamba_ssm's scan over 4096 + 32 tokens took 2.1 ms a layer
# against 0.87 over 4096 (it works in 2048-token chunks and specialises even lengths: 32 more tokens
# cost a third, ragged chunk), and its in-place writes cost ~8 small launches a layer (b=8: 19.8
# against 15.6 ms for two passes at 1K; run eec371b).
# At 7c2936d (the h0 term's skip, the Triton conv for the window's outputs; run
# bench_gpu_nvidia_h200_run_prefill_7c2936d.json) eager, fastest of 7: one pass 0.98 / 0.92 / 0.88x
# at b=1, 256 / 1K / 4K and 0.92 / 0.76x at b=8, 256 / 1K, two passes 0.77 / 0.75 / 0.78x and
# 0.80 / 0.80x; the one-pass kernel took 0.95 ms a layer of device time at b=8, 1K against
# mamba_ssm's 0.22 from zero (profile), about the host's ~1 ms a layer, so from 8192 tokens (b=8,
# 1K) the one-pass form no longer saves host time but costs twice the device time of two passes:
# ONE_PASS_MAX_TOKENS is 4096 (it was 8192). The next run (901cfcc) timed b=8, 1K one pass 0.88x
# and two passes 0.75x, the reverse: eager calls of this size vary by +-15% on that host (b=8, 4K,
# the same two-pass work forced and by default: 23.9 and 27.2 ms), so the device time decides.
# At d2f79d7 the CUDA scan from the state (ops.cuda_scan_state) took over above SEQUENTIAL_MAX_LENGTH
# tokens: in graphs 0.95 / 1.00 / 1.01x the zero-state prefill at b=1, 256 / 1K / 4K and 0.97 /
# 1.01 / 1.02x at b=8, where two passes forced gave 0.79 / 0.76 / 0.70x and 0.73 / 0.73 / 0.77x
# (run bench_gpu_nvidia_h200_run_prefill_d2f79d7.json); these forms stay for where it cannot be built.
STATE_SCAN_ENV = "VLM_MAMBA_STATE_SCAN"
STATE_SCAN_FORMS = ("auto", "cuda", "one_pass", "two_pass", "triton", "prefix")
ONE_PASS_MAX_TOKENS = 4096
# Prompts up to this many tokens take the one-pass form's step-at-a-time kernel, graphs included.
# mamba_ssm's scan is latency-bound on short sequences (a block per row and channel): on an H200
# (e 1536, n 16, one layer, in a graph; benchmarks/bench_scan_forms.py, results/scan_forms_nvidia_h200.json)
# at 16 tokens it took 11 / 58 / 215 / 1069 us from zero at b = 1 / 8 / 32 / 160, two passes from a
# state 20 / 69 / 249 / 1223 us, the step-at-a-time kernel 10 / 11 / 29 / 105 us. At b=8 it costs
# ~0.7 us a step, so two passes win again from ~100 tokens (62 us at 128); 32 is the measured side.
SEQUENTIAL_MAX_LENGTH = 32

# The same step-at-a-time kernel (from a zero state) for short forward-only scans without a state,
# where mamba_ssm's scan is latency-bound too (its <32 threads, 8 items> traits below 256 tokens): a
# VQA batch's images (32 x 196 patches) through the vision encoder and the image's LM prefill. In the
# model on an H200 (base, bf16, 32 images x 5 questions; profile of generate at 3b4866e) the 36 such
# scans took 0.27 ms a call against mamba_ssm's 0.39, and VQA with the image-state cache and graphs
# went from 28.8 to 24.6 ms (2.07x recomputing, 1.79x without). Alone on random inputs
# (benchmarks/bench_scan_forms.py) the kernel lost at b = 8 (172 against 101 us at 196 tokens) and
# drew level from b = 128: its programs walk the whole length one step at a time, so a small batch
# leaves the GPU idle. So "auto" takes it from SHORT_SCAN_MIN_BATCH rows; ``VLM_MAMBA_SHORT_SCAN=1``
# /``on`` at any batch, ``0``/``off`` never; read at every call; a graph captured with one setting is
# not replayed with another (``models.graphs.GraphCache.signature``).
SHORT_SCAN_ENV = "VLM_MAMBA_SHORT_SCAN"
SHORT_SCAN_MAX_LENGTH = 256
SHORT_SCAN_MIN_BATCH = 32

# add_initial_state skips the h0 term of state n in a (channel block, time block) once
# exp(A_n c) < exp(-DECAY_CUTOFF) (3.8e-11, ~2^-35) for every channel of the block from its first
# token on (c, the running sum of dt >= 0, only grows): what it leaves out is below 2^-35 of the
# term's size at the prompt's start, 2^-11 of fp32's resolution of it. How much it saves depends on
# the model's decays: for a random-init one (dt 0.001 to 0.1 log-uniform, A_n = -n) about a fifth of
# the terms are left at 4K tokens (an estimate; prefill_state in benchmarks/bench_gpu.py measures).
DECAY_CUTOFF = 24.0


def short_scan_switch() -> str:
    """``VLM_MAMBA_SHORT_SCAN`` read: "auto" (unset), "on" or "off"."""
    v = os.environ.get(SHORT_SCAN_ENV, "").strip().lower()
    if v not in ("", "auto", "1", "on", "0", "off"):
        raise ValueError(f"{SHORT_SCAN_ENV}={v!r}: expected auto, 1/on or 0/off (unset: auto)")
    return {"": "auto", "1": "on", "0": "off"}.get(v, v)


def short_scan_applies(batch: int, length: int) -> bool:
    """A forward-only scan of ``batch`` x ``length`` tokens without a state takes the step-at-a-time
    kernel (see ``SHORT_SCAN_ENV``)."""
    if length > SHORT_SCAN_MAX_LENGTH:
        return False
    v = short_scan_switch()
    return v == "on" or (v == "auto" and batch >= SHORT_SCAN_MIN_BATCH)


def state_scan_form(batch: int, length: int, cuda_kernel: bool = False) -> str:
    """ "cuda", "one_pass", "two_pass" or "prefix": the form a scan from a state of ``batch`` x
    ``length`` tokens takes; ``cuda_kernel``: whether the CUDA scan from a state
    (``ops.cuda_scan_state``) can serve the call (a forced "cuda" without it falls back to "auto")."""
    v = state_scan_switch()
    if v == "cuda" and not cuda_kernel:
        v = "auto"
    if v == "auto":
        if length <= SEQUENTIAL_MAX_LENGTH:
            return "one_pass"  # the step-at-a-time kernel: mamba_ssm's scan is latency-bound there
        if cuda_kernel:
            return "cuda"  # the scan itself starts from the state: no second pass
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            return "two_pass"  # a graph replays launches for free: the form with less device time
        return "one_pass" if batch * length <= ONE_PASS_MAX_TOKENS else "two_pass"
    return "one_pass" if v in ("one_pass", "triton") else v


def state_scan_switch() -> str:
    """``VLM_MAMBA_STATE_SCAN`` read (unset: "auto"); an unknown value is an error naming the choices."""
    v = os.environ.get(STATE_SCAN_ENV, "").strip().lower() or "auto"
    if v not in STATE_SCAN_FORMS:
        raise ValueError(f"{STATE_SCAN_ENV}={v!r}: expected one of {', '.join(STATE_SCAN_FORMS)}")
    return v


if triton is not None:

    @triton.jit
    def _dt(delta_ptr, bias_ptr, pid_b, e, t, e_ok, L, s_d_b, s_d_e, s_d_l,
            HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):  # fmt: skip
        """dt = softplus(delta + bias) of one (BE, BL) block, fp32, 0 outside the tensor."""
        ok = e_ok[:, None] & (t[None, :] < L)  # (BE, BL)
        dt = tl.load(
            delta_ptr + pid_b * s_d_b + e[:, None] * s_d_e + t[None, :] * s_d_l, mask=ok, other=0.0
        ).to(tl.float32)
        if HAS_BIAS:
            dt = dt + tl.load(bias_ptr + e, mask=e_ok, other=0.0).to(tl.float32)[:, None]
        if SOFTPLUS:  # torch's softplus: x above 20, else log(1 + exp(x)); -1e4 (a pad) gives 0
            dt = tl.where(dt > 20.0, dt, tl.log(1.0 + tl.exp(dt)))
        return tl.where(ok, dt, 0.0)

    @triton.jit
    def _dt_running_sums_kernel(
        delta_ptr, bias_ptr, csum_ptr, E, L,
        s_d_b, s_d_e, s_d_l, s_s_b, s_s_e, s_s_c,
        BLOCK_E: tl.constexpr, BLOCK_L: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    ):  # fmt: skip
        """Pass 1, one program per (row, channel block) walking the time blocks: csum (b, e, blocks)
        = the sum of dt up to the end of each time block (inclusive)."""
        pid_b, pid_e = tl.program_id(0), tl.program_id(1)
        e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
        e_ok = e < E
        acc = tl.zeros((BLOCK_E,), dtype=tl.float32)
        for j in range(0, tl.cdiv(L, BLOCK_L)):
            t = j * BLOCK_L + tl.arange(0, BLOCK_L)
            dt = _dt(delta_ptr, bias_ptr, pid_b, e, t, e_ok, L, s_d_b, s_d_e, s_d_l, HAS_BIAS, SOFTPLUS)
            acc += tl.sum(dt, axis=1)
            tl.store(csum_ptr + pid_b * s_s_b + e * s_s_e + j * s_s_c, acc, mask=e_ok)

    @triton.jit
    def _initial_state_kernel(
        y0_ptr, delta_ptr, bias_ptr, A_ptr, C_ptr, h0_ptr, z_ptr, out_ptr, csum_ptr, last_ptr, perm_ptr,
        E, L, cutoff,
        s_y0_b, s_y0_e, s_y0_l,
        s_d_b, s_d_e, s_d_l,
        s_A_e, s_A_n,
        s_C_b, s_C_n, s_C_l,
        s_h_b, s_h_e, s_h_n,
        s_z_b, s_z_e, s_z_l,
        s_o_b, s_o_e, s_o_l,
        s_c_b, s_c_e, s_c_c,
        s_l_b, s_l_e, s_l_n,
        N: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_L: tl.constexpr,
        HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_Z: tl.constexpr, HAS_LAST: tl.constexpr,
        HAS_PERM: tl.constexpr, SKIP: tl.constexpr,
    ):  # fmt: skip
        """Pass 2, one (BE, BL) block per program: c = the carry (pass 1's sum of dt before the
        block) + the block's running sum; out = (y0 + sum_n C_n exp(A_n c) h0_n) * silu(z). The
        last time block's program also adds exp(A c_L) * h0 to the last state. With HAS_PERM the
        block's channels are perm[block] (channels of like decay side by side); with SKIP (dt >= 0,
        so c only grows) a term n whose exp(A_n c) is below exp(-cutoff) for every channel of the
        block from its first token on is not computed."""
        pid_b, pid_e, pid_l = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)  # (BE,)
        e_ok = e < E
        if HAS_PERM:
            e = tl.load(perm_ptr + e, mask=e_ok, other=0)
        t = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)  # (BL,)
        ok = e_ok[:, None] & (t[None, :] < L)  # (BE, BL)
        dt = _dt(delta_ptr, bias_ptr, pid_b, e, t, e_ok, L, s_d_b, s_d_e, s_d_l, HAS_BIAS, SOFTPLUS)
        carry = tl.load(
            csum_ptr + pid_b * s_c_b + e * s_c_e + (pid_l - 1) * s_c_c, mask=e_ok & (pid_l > 0), other=0.0
        )  # (BE,)
        c = tl.cumsum(dt, axis=1) + carry[:, None]  # (BE, BL) running sum of dt
        acc = tl.zeros((BLOCK_E, BLOCK_L), dtype=tl.float32)
        for k in tl.static_range(N):
            a_k = tl.load(A_ptr + e * s_A_e + k * s_A_n, mask=e_ok, other=0.0).to(tl.float32)  # (BE,)
            live = True
            if SKIP:  # the block's slowest channel at its first token: exp(a c) only shrinks after it
                live = tl.max(tl.where(e_ok, a_k * carry, -3.0e38), axis=0) > -cutoff
            if live:
                h_k = tl.load(h0_ptr + pid_b * s_h_b + e * s_h_e + k * s_h_n, mask=e_ok, other=0.0).to(
                    tl.float32
                )
                c_k = tl.load(C_ptr + pid_b * s_C_b + k * s_C_n + t * s_C_l, mask=t < L, other=0.0).to(
                    tl.float32
                )
                acc += tl.exp(a_k[:, None] * c) * (h_k[:, None] * c_k[None, :])
        y = tl.load(
            y0_ptr + pid_b * s_y0_b + e[:, None] * s_y0_e + t[None, :] * s_y0_l, mask=ok, other=0.0
        ).to(tl.float32)
        y = y + acc
        if HAS_Z:
            z = tl.load(
                z_ptr + pid_b * s_z_b + e[:, None] * s_z_e + t[None, :] * s_z_l, mask=ok, other=0.0
            ).to(tl.float32)
            y = y * (z / (1.0 + tl.exp(-z)))
        tl.store(out_ptr + pid_b * s_o_b + e[:, None] * s_o_e + t[None, :] * s_o_l, y.to(out_ptr.dtype.element_ty),
                 mask=ok)  # fmt: skip
        if HAS_LAST:
            if pid_l == tl.num_programs(2) - 1:  # last state += exp(A c_L) * h0, c_L the row's sum of dt
                c_end = carry + tl.sum(dt, axis=1)  # (BE,)
                n = tl.arange(0, N)
                en = e_ok[:, None] & (n[None, :] < N)  # (BE, N)
                a = tl.load(A_ptr + e[:, None] * s_A_e + n[None, :] * s_A_n, mask=en, other=0.0).to(
                    tl.float32
                )
                h = tl.load(h0_ptr + pid_b * s_h_b + e[:, None] * s_h_e + n[None, :] * s_h_n, mask=en,
                            other=0.0).to(tl.float32)  # fmt: skip
                lp = last_ptr + pid_b * s_l_b + e[:, None] * s_l_e + n[None, :] * s_l_n
                tl.store(lp, tl.load(lp, mask=en, other=0.0) + tl.exp(a * c_end[:, None]) * h, mask=en)


if triton is not None:

    @triton.jit
    def _combine(a1, b1, a2, b2):
        """(decay, input) pairs of h -> a h + b, composed in time order."""
        return a1 * a2, b1 * a2 + b2

    @triton.jit
    def _scan_from_state_kernel(
        u_ptr, delta_ptr, bias_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, h0_ptr, out_ptr, last_ptr,
        E, L,
        s_u_b, s_u_e, s_u_l,
        s_d_b, s_d_e, s_d_l,
        s_A_e, s_A_n,
        s_B_b, s_B_n, s_B_l,
        s_C_b, s_C_n, s_C_l,
        s_z_b, s_z_e, s_z_l,
        s_h_b, s_h_e, s_h_n,
        s_o_b, s_o_e, s_o_l,
        s_last_b, s_last_e, s_last_n,
        N: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_L: tl.constexpr,
        HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr,
    ):  # fmt: skip
        """One program per (row, channel block): the state (BE, N) in registers, walked over time
        blocks; inside a block the recurrence is an associative scan over the block's steps."""
        pid_b, pid_e = tl.program_id(0), tl.program_id(1)
        e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)  # (BE,)
        e_ok = e < E
        n = tl.arange(0, N)
        A = tl.load(A_ptr + e[:, None] * s_A_e + n[None, :] * s_A_n, mask=e_ok[:, None], other=0.0).to(
            tl.float32
        )
        h = tl.load(h0_ptr + pid_b * s_h_b + e[:, None] * s_h_e + n[None, :] * s_h_n, mask=e_ok[:, None],
                    other=0.0).to(tl.float32)  # (BE, N)  # fmt: skip
        if HAS_D:
            Dv = tl.load(D_ptr + e, mask=e_ok, other=0.0).to(tl.float32)
        for l0 in range(0, L, BLOCK_L):
            t = l0 + tl.arange(0, BLOCK_L)  # (BL,)
            t_ok = t < L
            ok = e_ok[:, None] & t_ok[None, :]
            dt = _dt(
                delta_ptr, bias_ptr, pid_b, e, t, e_ok, L, s_d_b, s_d_e, s_d_l, HAS_BIAS, SOFTPLUS
            )  # (BE, BL)
            x = tl.load(
                u_ptr + pid_b * s_u_b + e[:, None] * s_u_e + t[None, :] * s_u_l, mask=ok, other=0.0
            ).to(tl.float32)
            Bt = tl.load(B_ptr + pid_b * s_B_b + n[:, None] * s_B_n + t[None, :] * s_B_l, mask=t_ok[None, :],
                         other=0.0).to(tl.float32)  # (N, BL)  # fmt: skip
            Ct = tl.load(C_ptr + pid_b * s_C_b + n[:, None] * s_C_n + t[None, :] * s_C_l, mask=t_ok[None, :],
                         other=0.0).to(tl.float32)  # fmt: skip
            decay = tl.exp(A[:, :, None] * dt[:, None, :])  # (BE, N, BL); 1 outside the tensor (dt = 0)
            inp = Bt[None, :, :] * (dt * x)[:, None, :]  # (BE, N, BL)
            a, bb = tl.associative_scan((decay, inp), axis=2, combine_fn=_combine)
            hs = a * h[:, :, None] + bb  # (BE, N, BL): the state after each step
            y = tl.sum(hs * Ct[None, :, :], axis=1)  # (BE, BL)
            if HAS_D:
                y = y + x * Dv[:, None]
            if HAS_Z:
                zz = tl.load(
                    z_ptr + pid_b * s_z_b + e[:, None] * s_z_e + t[None, :] * s_z_l, mask=ok, other=0.0
                ).to(tl.float32)
                y = y * (zz / (1.0 + tl.exp(-zz)))
            tl.store(out_ptr + pid_b * s_o_b + e[:, None] * s_o_e + t[None, :] * s_o_l,
                     y.to(out_ptr.dtype.element_ty), mask=ok)  # fmt: skip
            # the state after the block's last step (steps past L are identities: dt = 0)
            h = tl.sum(tl.where((tl.arange(0, BLOCK_L) == BLOCK_L - 1)[None, None, :], hs, 0.0), axis=2)
        tl.store(last_ptr + pid_b * s_last_b + e[:, None] * s_last_e + n[None, :] * s_last_n, h,
                 mask=e_ok[:, None])  # fmt: skip


if triton is not None:

    @triton.jit
    def _scan_from_state_seq_kernel(
        u_ptr, delta_ptr, bias_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, h0_ptr, out_ptr, last_ptr,
        E, L,
        s_u_b, s_u_e, s_u_l,
        s_d_b, s_d_e, s_d_l,
        s_A_e, s_A_n,
        s_B_b, s_B_n, s_B_l,
        s_C_b, s_C_n, s_C_l,
        s_z_b, s_z_e, s_z_l,
        s_h_b, s_h_e, s_h_n,
        s_o_b, s_o_e, s_o_l,
        s_last_b, s_last_e, s_last_n,
        N: tl.constexpr, BLOCK_E: tl.constexpr,
        HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr,
    ):  # fmt: skip
        """One program per (row, channel block), the state (BE, N) in registers, one step at a time
        (eq. 2a-2b of the Mamba paper, as the decode step): for short prompts, where a block scan
        would mostly compute padding."""
        pid_b, pid_e = tl.program_id(0), tl.program_id(1)
        e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)  # (BE,)
        e_ok = e < E
        n = tl.arange(0, N)
        A = tl.load(A_ptr + e[:, None] * s_A_e + n[None, :] * s_A_n, mask=e_ok[:, None], other=0.0).to(
            tl.float32
        )
        h = tl.load(h0_ptr + pid_b * s_h_b + e[:, None] * s_h_e + n[None, :] * s_h_n, mask=e_ok[:, None],
                    other=0.0).to(tl.float32)  # (BE, N)  # fmt: skip
        if HAS_BIAS:
            bias = tl.load(bias_ptr + e, mask=e_ok, other=0.0).to(tl.float32)
        if HAS_D:
            Dv = tl.load(D_ptr + e, mask=e_ok, other=0.0).to(tl.float32)
        for t in range(0, L):
            dt = tl.load(delta_ptr + pid_b * s_d_b + e * s_d_e + t * s_d_l, mask=e_ok, other=0.0).to(
                tl.float32
            )
            if HAS_BIAS:
                dt = dt + bias
            if SOFTPLUS:  # torch's softplus (threshold 20); -1e4 (a pad) gives 0: an identity step
                dt = tl.where(dt > 20.0, dt, tl.log(1.0 + tl.exp(dt)))
            x = tl.load(u_ptr + pid_b * s_u_b + e * s_u_e + t * s_u_l, mask=e_ok, other=0.0).to(tl.float32)
            Bt = tl.load(B_ptr + pid_b * s_B_b + n * s_B_n + t * s_B_l).to(tl.float32)  # (N,)
            Ct = tl.load(C_ptr + pid_b * s_C_b + n * s_C_n + t * s_C_l).to(tl.float32)
            h = h * tl.exp(A * dt[:, None]) + Bt[None, :] * (dt * x)[:, None]
            y = tl.sum(h * Ct[None, :], axis=1)  # (BE,)
            if HAS_D:
                y = y + x * Dv
            if HAS_Z:
                zz = tl.load(z_ptr + pid_b * s_z_b + e * s_z_e + t * s_z_l, mask=e_ok, other=0.0).to(
                    tl.float32
                )
                y = y * (zz / (1.0 + tl.exp(-zz)))
            tl.store(
                out_ptr + pid_b * s_o_b + e * s_o_e + t * s_o_l, y.to(out_ptr.dtype.element_ty), mask=e_ok
            )
        tl.store(last_ptr + pid_b * s_last_b + e[:, None] * s_last_e + n[None, :] * s_last_n, h,
                 mask=e_ok[:, None])  # fmt: skip


def selective_scan_from_state(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    delta_bias: Tensor | None,
    delta_softplus: bool,
    h0: Tensor,
    block_e: int | None = None,
    block_l: int = 64,
    sequential: bool | None = None,
) -> tuple[Tensor, Tensor]:
    """The selective scan started from ``h0`` in one Triton pass (forward only): the alternative to
    ``selective_scan_fn`` from zero + :func:`add_initial_state`, which computes every decay twice
    (the zero-state scan's exponentials, then the h0 term's). Same arguments as
    ``vlm_mamba.ops.selective_scan`` with (b,n,l) B and C; returns (y (b,e,l) in u's dtype,
    last state (b,e,n) fp32). ``ops.cuda.selective_scan`` calls with an initial state come here up
    to ``ONE_PASS_MAX_TOKENS`` (see :func:`state_scan_form`).

    ``sequential`` (None: prompts up to ``SEQUENTIAL_MAX_LENGTH`` tokens) walks the steps one at a
    time with ``block_e`` channels a program (default 32), instead of an associative scan over
    ``block_l``-step blocks with ``block_e`` channels (default 4): a VQA question of 12 tokens would
    otherwise fill a 64-step block mostly with identity steps.
    """
    if triton is None:
        raise RuntimeError("triton is not installed")
    b, E, L = u.shape
    if sequential is None:
        sequential = L <= SEQUENTIAL_MAX_LENGTH
    N = A.shape[1]
    if B.dim() != 3 or C.dim() != 3:
        raise ValueError(f"B and C must be (b, n, l) for this kernel, got {tuple(B.shape)}, {tuple(C.shape)}")
    if N & (N - 1):
        raise ValueError(f"d_state={N} is not a power of two")
    out = torch.empty_like(u)
    last = torch.empty(b, E, N, device=u.device, dtype=torch.float32)
    dummy = u  # never read when its flag is off
    zz = z if z is not None else dummy
    args = (
        u, delta, delta_bias if delta_bias is not None else A, A, B, C, D if D is not None else A, zz, h0, out,
        last, E, L,
        *u.stride(), *delta.stride(), *A.stride(), *B.stride(), *C.stride(), *zz.stride(), *h0.stride(),
        *out.stride(), *last.stride(),
    )  # fmt: skip
    flags = dict(
        HAS_BIAS=delta_bias is not None,
        SOFTPLUS=bool(delta_softplus),
        HAS_D=D is not None,
        HAS_Z=z is not None,
    )
    if sequential:
        be = block_e or 32
        _scan_from_state_seq_kernel[(b, triton.cdiv(E, be))](*args, N=N, BLOCK_E=be, **flags)
    else:
        be = block_e or 4
        _scan_from_state_kernel[(b, triton.cdiv(E, be))](*args, N=N, BLOCK_E=be, BLOCK_L=block_l, **flags)
    return out, last


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
    num_warps: int = 4,
    sums_block_e: int = 16,
    cutoff: float | None = DECAY_CUTOFF,
    order: Tensor | None = None,
) -> Tensor:
    """The run from ``h0`` given the zero-state run ``y0`` (b,e,l) (ungated): returns
    ``(y0 + C . exp(A c) h0) * silu(z)`` (b,e,l) in ``out_dtype`` (default y0's) and adds
    ``exp(A c_L) * h0`` to ``last`` (b,e,n) fp32 in place when given.

    delta (b,e,l) raw (bias and softplus applied here, as the scan does); A (e,n); C (b,n,l);
    h0 (b,e,n). The state size n must be a power of two (Triton block shapes).

    With softplus (dt >= 0) and ``cutoff`` set, a block's term n is skipped once exp(A_n c) has
    fallen below exp(-cutoff) in all its channels (see ``DECAY_CUTOFF``); the channels are taken in
    the order of their slowest decay (softplus(bias) x min_n |A_n|), so that a block holds channels
    that fall below it together: ``order`` (e,) int32 if given (:func:`decay_order`, cached per
    layer), else sorted here (an argsort of e values a call). Any permutation gives the same
    result; ``cutoff=None``: every term computed.

    Two launches: the running sums of dt at the end of every time block (one program per row and
    channel block walks the blocks: it reads dt once and keeps one number per channel), then every
    (row, channel block, time block) in parallel forms its term from its carry; the last time
    block's program updates ``last``. (A single pass walking the time axis for the whole term
    kept ~3 programs per SM busy on an H200: 1.1 ms a layer at b=8, e=1536, l=4096.)
    """
    if triton is None:
        raise RuntimeError("triton is not installed")
    b, E, L = y0.shape
    N = A.shape[1]
    if C.dim() != 3:
        raise ValueError(f"C must be (b, n, l) for this kernel, got shape {tuple(C.shape)}")
    if N & (N - 1):
        raise ValueError(f"d_state={N} is not a power of two")
    if last is not None and last.dtype != torch.float32:
        raise ValueError("last state must be fp32")
    out = torch.empty_like(y0, dtype=out_dtype or y0.dtype)
    zz = z if z is not None else y0  # unused when HAS_Z is False
    bias = delta_bias if delta_bias is not None else A  # unused when HAS_BIAS is False
    ll = last if last is not None else h0  # unused when HAS_LAST is False
    blocks = triton.cdiv(L, block_l)
    csum = torch.empty(b, E, blocks, device=y0.device, dtype=torch.float32)
    flags = dict(HAS_BIAS=delta_bias is not None, SOFTPLUS=bool(delta_softplus))
    skip = bool(delta_softplus) and cutoff is not None
    perm = h0  # unused when HAS_PERM is False
    if skip:
        perm = order if order is not None else _slowest_decay_order(A, delta_bias)
        if perm.shape != (E,) or perm.dtype != torch.int32 or perm.device != y0.device:
            raise ValueError(
                f"order must be an int32 ({E},) tensor on {y0.device}, got {perm.dtype} {tuple(perm.shape)}"
            )
    _dt_running_sums_kernel[(b, triton.cdiv(E, sums_block_e))](
        delta, bias, csum, E, L, *delta.stride(), *csum.stride(), BLOCK_E=sums_block_e, BLOCK_L=block_l, **flags
    )  # fmt: skip
    _initial_state_kernel[(b, triton.cdiv(E, block_e), blocks)](
        y0, delta, bias, A, C, h0, zz, out, csum, ll, perm,
        E, L, float(cutoff) if skip else 0.0,
        *y0.stride(), *delta.stride(), *A.stride(), *C.stride(), *h0.stride(), *zz.stride(), *out.stride(),
        *csum.stride(), *ll.stride(),
        N=N, BLOCK_E=block_e, BLOCK_L=block_l, HAS_Z=z is not None, HAS_LAST=last is not None,
        HAS_PERM=skip, SKIP=skip, num_warps=num_warps, **flags,
    )  # fmt: skip
    return out


def decay_order(A_log: Tensor, dt_bias: Tensor | None) -> Tensor:
    """The channel order :func:`add_initial_state` groups by, for a layer's ``A_log`` (e,n) and
    dt bias (e,): computed once and kept on the ``A_log`` parameter, recomputed in place when either
    tensor changes (their version counters), never inside a CUDA graph capture (a captured graph
    keeps reading the same tensor; a stale order is still a permutation, so only speed depends on
    it)."""
    try:
        key = (
            A_log.data_ptr(),
            A_log._version,
            None if dt_bias is None else (dt_bias.data_ptr(), dt_bias._version),
        )
    except (RuntimeError, NotImplementedError):  # a tensor without storage of its own (a DTensor): not kept
        return _slowest_decay_order(-torch.exp(A_log.detach().float()), dt_bias)
    held = getattr(A_log, "_vlm_decay_order", None)
    capturing = A_log.is_cuda and torch.cuda.is_current_stream_capturing()
    if held is not None and (held[0] == key or capturing):
        return held[1]
    order = _slowest_decay_order(-torch.exp(A_log.detach().float()), dt_bias)
    if capturing:
        return order  # in the graph; not kept (its memory is the graph's)
    if held is not None and held[1].shape == order.shape and held[1].device == order.device:
        held[1].copy_(order)  # the same tensor: graphs captured with it read the new order
        order = held[1]
    A_log._vlm_decay_order = (key, order)
    return order


def _slowest_decay_order(A: Tensor, delta_bias: Tensor | None) -> Tensor:
    """Channels (int32, (e,)) by their slowest decay rate at the bias, min_n |A_n| x softplus(bias):
    three small launches, no host sync (graph-capturable)."""
    rate = A.detach().float().abs().amin(dim=1)
    if delta_bias is not None:
        rate = rate * F.softplus(delta_bias.detach().float())
    return torch.argsort(rate).to(torch.int32)


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

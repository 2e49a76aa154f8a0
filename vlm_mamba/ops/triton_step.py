"""The fused decode step: Mamba-1's dt_proj folded into the state update, norms folded into the
projections next to them (Triton, inference only).

The one-token step of a Mamba-1 layer launches in_proj, the conv update, x_proj, dt_proj, the state
update and out_proj (plus the fused add + norm): on an H200 at batch 1 the captured graph is
launch-bound, 0.67 ms per token for 24 layers against an HBM bound of 0.06 ms. dt_proj is a
(e x r) matrix-vector product per row (r = dt_rank, 48 at d 768) whose only reader is the state
update, so here one kernel does both: each program takes a block of channels of one row, computes
their dt from the low-rank dt (fp32 accumulation over r), adds the bias, applies softplus, updates
the (e, n) state in place and writes y = C h + D x gated by silu(z), as mamba_ssm's
``selective_state_update`` does (Mamba paper, eq. 2a-2b, one step). One launch fewer per layer.

dt is accumulated in fp32 here, where the unfused path rounds dt_proj's output to the activation
dtype first: the two agree to bf16 rounding, not bit for bit. ``selective_state_update_dtproj_ref``
is the plain twin the tests compare against (on the CPU through ``TRITON_INTERPRET=1``).
The residual add and RMSNorm that open each block are a second pair: their only reader is
in_proj, so :func:`add_rms_norm_linear` has each program (a row and a block of in_proj's outputs)
recompute the add and the norm of its row (d values: cheap) before its block of the matrix-vector
product; the program of the first block writes the new residual. For small batches only (the
decoding graph of one batch size): at large batches cuBLAS' GEMM reads the weights once.
Together: five launches per Mamba-1 layer and token (add + norm + in_proj, conv update, x_proj,
dt_proj + state update, out_proj) instead of seven; four with the conv update in in_proj's
epilogue (``ops.fused_conv_switch``, on by default).
Mamba-2 has no dt_proj; at batch 1 its step is three launches instead of six: add + norm + in_proj
with the conv step on x, B, C (``conv_offset``), mamba_ssm's state update, and
:func:`rms_norm_gated_linear` (the gated RMSNorm and out_proj).
On up to ``vlm_mamba.ops.FUSED_STEP_MAX_BATCH`` rows by default (the norm + linear kernels at batch
1 only, ``layers.mamba1.FUSED_NORM_LINEAR_MAX_BATCH``); ``vlm_mamba.ops.set_fused_step(True /
False)`` (or ``VLM_MAMBA_FUSED_STEP=1 / 0``) forces it.

Shapes: ``b`` batch, ``e`` channels, ``n`` state size, ``r`` dt rank.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from vlm_mamba.ops._triton import available, tl, triton  # noqa: F401  (available: this module's API)

if triton is not None:

    @triton.jit
    def _step_kernel(
        state_ptr, x_ptr, dtl_ptr, w_ptr, bias_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, out_ptr, part_ptr,
        E, R, NP,
        s_st_b, s_st_e, s_st_n,
        s_x_b, s_x_e,
        s_dtl_b, s_dtl_r,
        s_w_e, s_w_r,
        s_A_e, s_A_n,
        s_B_b, s_B_n,
        s_C_b, s_C_n,
        s_z_b, s_z_e,
        s_o_b, s_o_e,
        s_p_b, s_p_p, s_p_j,
        N: tl.constexpr, R_PAD: tl.constexpr, BLOCK_E: tl.constexpr,
        HAS_BIAS: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_PART: tl.constexpr,
        BLOCK_P: tl.constexpr,
    ):  # fmt: skip
        pid_b = tl.program_id(0)
        pid_e = tl.program_id(1)
        e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)  # (BE,)
        e_ok = e < E
        r = tl.arange(0, R_PAD)
        r_ok = r < R
        n = tl.arange(0, N)
        if HAS_PART:  # x_proj's output as the sum of its NP partial products (add_rms_norm_linear)
            dtl = tl.zeros((R_PAD,), dtype=tl.float32)
            Bv = tl.zeros((N,), dtype=tl.float32)
            Cv = tl.zeros((N,), dtype=tl.float32)
            for p0 in range(0, NP, BLOCK_P):
                pp = p0 + tl.arange(0, BLOCK_P)
                p_ok = pp < NP
                row = part_ptr + pid_b * s_p_b + pp[:, None] * s_p_p
                dtl += tl.sum(
                    tl.load(row + r[None, :] * s_p_j, mask=p_ok[:, None] & r_ok[None, :], other=0.0), axis=0
                )
                Bv += tl.sum(tl.load(row + (R + n[None, :]) * s_p_j, mask=p_ok[:, None], other=0.0), axis=0)
                Cv += tl.sum(
                    tl.load(row + (R + N + n[None, :]) * s_p_j, mask=p_ok[:, None], other=0.0), axis=0
                )
        else:
            dtl = tl.load(dtl_ptr + pid_b * s_dtl_b + r * s_dtl_r, mask=r_ok, other=0.0).to(
                tl.float32
            )  # (R,)
            Bv = tl.load(B_ptr + pid_b * s_B_b + n * s_B_n).to(tl.float32)  # (N,)
            Cv = tl.load(C_ptr + pid_b * s_C_b + n * s_C_n).to(tl.float32)
        # dt = softplus(W_dt @ dt_low + bias) for this block of channels, fp32
        w = tl.load(
            w_ptr + e[:, None] * s_w_e + r[None, :] * s_w_r, mask=e_ok[:, None] & r_ok[None, :], other=0.0
        ).to(tl.float32)  # (BE, R)
        dt = tl.sum(w * dtl[None, :], axis=1)  # (BE,)
        if HAS_BIAS:
            dt = dt + tl.load(bias_ptr + e, mask=e_ok, other=0.0).to(tl.float32)
        dt = tl.where(dt > 20.0, dt, tl.log(1.0 + tl.exp(dt)))  # torch's softplus (threshold 20)
        x = tl.load(x_ptr + pid_b * s_x_b + e * s_x_e, mask=e_ok, other=0.0).to(tl.float32)  # (BE,)
        A = tl.load(A_ptr + e[:, None] * s_A_e + n[None, :] * s_A_n, mask=e_ok[:, None], other=0.0).to(
            tl.float32
        )  # (BE, N)
        st_ptrs = state_ptr + pid_b * s_st_b + e[:, None] * s_st_e + n[None, :] * s_st_n
        h = tl.load(st_ptrs, mask=e_ok[:, None], other=0.0).to(tl.float32)  # (BE, N)
        h = h * tl.exp(A * dt[:, None]) + Bv[None, :] * (dt * x)[:, None]
        tl.store(st_ptrs, h.to(state_ptr.dtype.element_ty), mask=e_ok[:, None])
        y = tl.sum(h * Cv[None, :], axis=1)  # (BE,)
        if HAS_D:
            y = y + x * tl.load(D_ptr + e, mask=e_ok, other=0.0).to(tl.float32)
        if HAS_Z:
            z = tl.load(z_ptr + pid_b * s_z_b + e * s_z_e, mask=e_ok, other=0.0).to(tl.float32)
            y = y * z * tl.sigmoid(z)
        tl.store(out_ptr + pid_b * s_o_b + e * s_o_e, y.to(out_ptr.dtype.element_ty), mask=e_ok)


if triton is not None:

    @triton.jit
    def _add_norm_linear_kernel(
        h_ptr, r_ptr, nw_ptr, w_ptr, out_ptr, res_out_ptr, cs_ptr, cw_ptr, cb_ptr, xw_ptr, part_ptr,
        D, NOUT, eps, E_CONV, CONV_LO, J,
        s_h_b, s_h_d, s_r_b, s_r_d, s_w_o, s_w_d, s_o_b, s_o_o, s_ro_b, s_ro_d,
        s_cs_b, s_cs_e, s_cs_k, s_cw_e, s_cw_k, s_xw_j, s_xw_e, s_p_b, s_p_p, s_p_j,
        BLOCK_D: tl.constexpr, BLOCK_O: tl.constexpr, HAS_RES: tl.constexpr, NORM_DTYPE: tl.constexpr,
        HAS_CONV: tl.constexpr, HAS_CB: tl.constexpr, KW: tl.constexpr, KPAD: tl.constexpr,
        HAS_XPROJ: tl.constexpr, J_PAD: tl.constexpr,
    ):  # fmt: skip
        pid_b = tl.program_id(0)
        pid_o = tl.program_id(1)
        # pass 1: the row's sum of squares (and, in the first block's program, the new residual)
        sq = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            d_ok = d < D
            r = tl.load(h_ptr + pid_b * s_h_b + d * s_h_d, mask=d_ok, other=0.0).to(tl.float32)
            if HAS_RES:
                r += tl.load(r_ptr + pid_b * s_r_b + d * s_r_d, mask=d_ok, other=0.0).to(tl.float32)
            sq += r * r
            if pid_o == 0:
                tl.store(
                    res_out_ptr + pid_b * s_ro_b + d * s_ro_d, r.to(res_out_ptr.dtype.element_ty), mask=d_ok
                )
        rstd = 1.0 / tl.sqrt(tl.sum(sq, axis=0) / D + eps)
        # pass 2: the normed row, rounded as the unfused norm writes it, against this block of rows of W
        o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
        o_ok = o < NOUT
        acc = tl.zeros((BLOCK_O,), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            d_ok = d < D
            r = tl.load(h_ptr + pid_b * s_h_b + d * s_h_d, mask=d_ok, other=0.0).to(tl.float32)
            if HAS_RES:
                r += tl.load(r_ptr + pid_b * s_r_b + d * s_r_d, mask=d_ok, other=0.0).to(tl.float32)
            nw = tl.load(nw_ptr + d, mask=d_ok, other=0.0).to(tl.float32)
            x = (r * rstd * nw).to(NORM_DTYPE).to(tl.float32)
            w = tl.load(
                w_ptr + o[:, None] * s_w_o + d[None, :] * s_w_d, mask=o_ok[:, None] & d_ok[None, :], other=0.0
            ).to(tl.float32)  # (BO, BD)
            acc += tl.sum(w * x[None, :], axis=1)
        if HAS_CONV:  # outputs CONV_LO .. CONV_LO + E_CONV (the conv's channels) take its step, in place
            xo = acc.to(out_ptr.dtype.element_ty).to(tl.float32)  # as in_proj writes x
            oc = o - CONV_LO  # the conv channel
            is_x = o_ok & (oc >= 0) & (oc < E_CONV)
            j = tl.arange(0, KPAD)
            cs = cs_ptr + pid_b * s_cs_b + oc[:, None] * s_cs_e
            st = tl.load(cs + j[None, :] * s_cs_k, mask=is_x[:, None] & (j[None, :] < KW - 1), other=0.0)
            win = tl.where(j[None, :] == KW - 1, xo[:, None], st.to(tl.float32))  # the k inputs
            cw = tl.load(
                cw_ptr + oc[:, None] * s_cw_e + j[None, :] * s_cw_k,
                mask=is_x[:, None] & (j[None, :] < KW),
                other=0.0,
            ).to(tl.float32)
            c = tl.sum(win * cw, axis=1)
            if HAS_CB:
                c += tl.load(cb_ptr + oc, mask=is_x, other=0.0).to(tl.float32)
            c = c * tl.sigmoid(c)  # silu
            # the state shifts left by one and takes the new input last (causal_conv1d_update's way)
            nxt = tl.load(
                cs + (j[None, :] + 1) * s_cs_k, mask=is_x[:, None] & (j[None, :] + 1 < KW - 1), other=0.0
            )
            new = tl.where(j[None, :] + 1 == KW - 1, xo[:, None], nxt.to(tl.float32))
            tl.store(
                cs + j[None, :] * s_cs_k,
                new.to(cs_ptr.dtype.element_ty),
                mask=is_x[:, None] & (j[None, :] < KW - 1),
            )
            acc = tl.where(is_x, c, acc)
            if HAS_XPROJ:  # x_proj's partial product over this program's channels (conv outputs)
                jj = tl.arange(0, J_PAD)
                xr = tl.where(is_x, c.to(out_ptr.dtype.element_ty).to(tl.float32), 0.0)  # as x_proj reads it
                wx = tl.load(
                    xw_ptr + jj[:, None] * s_xw_j + oc[None, :] * s_xw_e,
                    mask=(jj[:, None] < J) & is_x[None, :],
                    other=0.0,
                ).to(tl.float32)  # (J_PAD, BO)
                part = tl.sum(wx * xr[None, :], axis=1)
                if pid_o * BLOCK_O < CONV_LO + E_CONV:  # programs holding conv channels (CONV_LO = 0)
                    tl.store(part_ptr + pid_b * s_p_b + pid_o * s_p_p + jj * s_p_j, part, mask=jj < J)
        tl.store(out_ptr + pid_b * s_o_b + o * s_o_o, acc.to(out_ptr.dtype.element_ty), mask=o_ok)


_TL_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def add_rms_norm_linear(
    hidden: Tensor,
    residual: Tensor | None,
    norm_weight: Tensor,
    eps: float,
    weight: Tensor,
    residual_in_fp32: bool = True,
    out_dtype: torch.dtype | None = None,
    block_o: int = 8,
    num_warps: int = 8,
    conv_state: Tensor | None = None,
    conv_weight: Tensor | None = None,
    conv_bias: Tensor | None = None,
    conv_offset: int = 0,
    xproj_weight: Tensor | None = None,
) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, Tensor]:
    """(hidden + residual) -> (RMSNorm(it) @ weight^T, it): a block's add + norm and in_proj in one
    kernel. hidden (b,d), residual (b,d) or None, norm_weight (d,), weight (o,d). Returns (out (b,o)
    in ``out_dtype`` (default hidden's), the new residual (b,d), fp32 with ``residual_in_fp32``).
    The normed row is rounded to ``out_dtype`` before the product, as the unfused norm's output is.

    With ``conv_weight`` (e,k) (and ``conv_state`` (b,e,k-1), ``conv_bias`` (e,) or None), the e
    outputs from ``conv_offset`` on (Mamba-1's x half of in_proj at 0, Mamba-2's x, B, C after z at
    d_inner) also take the causal conv's one-token step with SiLU, ``causal_conv1d_update``'s
    arithmetic (fp32, x rounded to ``out_dtype`` first): out[:, offset:offset + e] is the conv's
    output and ``conv_state`` is updated in place, one launch fewer per layer and token.

    With ``xproj_weight`` (j,e) as well (Mamba-1's x_proj, conv_offset 0), each program holding conv
    channels also multiplies its block of the conv's output (rounded to ``out_dtype``, as x_proj
    reads it) by those columns of x_proj, and a third output is returned: the partial products
    (b, cdiv(e, block_o), j) fp32, whose sum over blocks is x_proj's output. The state update sums
    them itself (:func:`selective_state_update_dtproj_` with ``partials``), so x_proj needs no
    launch of its own (opt-in, ``ops.fused_xproj_switch``: measured slower, the summing costs the
    state update more than x_proj's launch).

    ``block_o`` output rows per program: the product is a matrix-vector one, bound by reading W,
    so it needs programs on every SM (64 rows a program, 48 programs at o=3072, took 16 us a layer
    on an H200 at b=1 against cuBLAS's 5.6 us; ``benchmarks/bench_step_kernels.py`` sweeps it: 8 rows
    and 8 warps, 3.9 us, were the best at b=1)."""
    if triton is None:
        raise RuntimeError("the fused decode step needs triton")
    b, d = hidden.shape
    o = weight.shape[0]
    out_dtype = out_dtype or hidden.dtype
    if (
        weight.shape[1] != d
        or norm_weight.shape != (d,)
        or (residual is not None and residual.shape != (b, d))
    ):
        raise ValueError(
            f"shapes: hidden {tuple(hidden.shape)}, residual {None if residual is None else tuple(residual.shape)}, "
            f"norm_weight {tuple(norm_weight.shape)}, weight {tuple(weight.shape)}"
        )
    out = torch.empty(b, o, dtype=out_dtype, device=hidden.device)
    res_out = torch.empty(
        b, d, dtype=torch.float32 if residual_in_fp32 else (residual.dtype if residual is not None else hidden.dtype),
        device=hidden.device,
    )  # fmt: skip
    rr = residual if residual is not None else hidden
    has_conv = conv_weight is not None
    if has_conv:
        e, k = conv_weight.shape
        if (
            conv_state is None
            or conv_state.shape != (b, e, k - 1)
            or conv_offset < 0
            or conv_offset + e > o
            or k < 2
        ):
            raise ValueError(
                f"conv: weight {tuple(conv_weight.shape)}, state "
                f"{None if conv_state is None else tuple(conv_state.shape)}, offset {conv_offset}, "
                f"in_proj outputs {o}, batch {b}"
            )
    has_xp = xproj_weight is not None
    if has_xp and (not has_conv or conv_offset != 0 or xproj_weight.shape[1] != conv_weight.shape[0]):
        raise ValueError(
            f"x_proj's partial products need the conv step at offset 0 over its e inputs: x_proj "
            f"{tuple(xproj_weight.shape)}, conv {None if conv_weight is None else tuple(conv_weight.shape)}, "
            f"offset {conv_offset}"
        )
    n_part = triton.cdiv(conv_weight.shape[0], block_o) if has_xp else 1
    part = torch.empty(
        b, n_part, xproj_weight.shape[0] if has_xp else 1, device=hidden.device, dtype=torch.float32
    )
    xw = xproj_weight if has_xp else weight
    cs, cw = (conv_state, conv_weight) if has_conv else (out, weight)  # never read without the conv
    _add_norm_linear_kernel[(b, triton.cdiv(o, block_o))](
        hidden, rr, norm_weight, weight, out, res_out, cs, cw, conv_bias if conv_bias is not None else cw, xw, part,
        d, o, eps, conv_weight.shape[0] if has_conv else 0, conv_offset, xw.shape[0],
        *hidden.stride(), *rr.stride(), *weight.stride(), *out.stride(), *res_out.stride(),
        *(cs.stride() if has_conv else (0, 0, 0)), *cw.stride(), *xw.stride(), *part.stride(),
        BLOCK_D=min(256, triton.next_power_of_2(d)), BLOCK_O=block_o, HAS_RES=residual is not None,
        NORM_DTYPE=getattr(tl, _TL_DTYPES[out_dtype]), HAS_CONV=has_conv, HAS_CB=conv_bias is not None,
        KW=conv_weight.shape[1] if has_conv else 2, KPAD=triton.next_power_of_2(conv_weight.shape[1]) if has_conv else 2,
        HAS_XPROJ=has_xp, J_PAD=triton.next_power_of_2(xw.shape[0]) if has_xp else 2, num_warps=num_warps,
    )  # fmt: skip
    return (out, res_out, part) if has_xp else (out, res_out)


def add_rms_norm_linear_ref(
    hidden: Tensor,
    residual: Tensor | None,
    norm_weight: Tensor,
    eps: float,
    weight: Tensor,
    residual_in_fp32: bool = True,
    out_dtype: torch.dtype | None = None,
    conv_state: Tensor | None = None,
    conv_weight: Tensor | None = None,
    conv_bias: Tensor | None = None,
    conv_offset: int = 0,
    xproj_weight: Tensor | None = None,
    block_o: int = 8,
) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, Tensor]:
    """The plain twin of :func:`add_rms_norm_linear` (``conv_state`` updated in place; with
    ``xproj_weight`` the partial products per block of ``block_o`` conv channels too)."""
    out_dtype = out_dtype or hidden.dtype
    r = hidden.float() if residual is None else hidden.float() + residual.float()
    x = (r * torch.rsqrt(r.pow(2).mean(-1, keepdim=True) + eps) * norm_weight.float()).to(out_dtype)
    out = (x.float() @ weight.float().t()).to(out_dtype)
    if conv_weight is not None:
        e, lo = conv_weight.shape[0], conv_offset
        win = torch.cat([conv_state.float(), out[:, lo : lo + e].float()[..., None]], dim=-1)  # (b,e,k)
        c = (win * conv_weight.float()).sum(-1) + (conv_bias.float() if conv_bias is not None else 0.0)
        conv_state.copy_(win[..., 1:])
        out = torch.cat([out[:, :lo], F.silu(c).to(out_dtype), out[:, lo + e :]], dim=-1)
    res = r if residual_in_fp32 else r.to(residual.dtype if residual is not None else hidden.dtype)
    if xproj_weight is None:
        return out, res
    e = conv_weight.shape[0]
    xc = out[:, :e].float()
    nb = -(-e // block_o)
    pad = nb * block_o - e
    xb = F.pad(xc, (0, pad)).view(-1, nb, block_o)  # (b, blocks, bo)
    wb = F.pad(xproj_weight.float(), (0, pad)).view(xproj_weight.shape[0], nb, block_o)  # (j, blocks, bo)
    return out, res, torch.einsum("bpk,jpk->bpj", xb, wb)


if triton is not None:

    @triton.jit
    def _gated_norm_linear_kernel(
        y_ptr, z_ptr, nw_ptr, w_ptr, out_ptr,
        E, NOUT, eps,
        s_y_b, s_y_e, s_z_b, s_z_e, s_w_o, s_w_e, s_o_b, s_o_o,
        BLOCK_E: tl.constexpr, BLOCK_O: tl.constexpr, HAS_Z: tl.constexpr, NORM_BEFORE_GATE: tl.constexpr,
    ):  # fmt: skip
        # one pass: the row's statistic is a scalar, so W @ (g * rstd * nw) = rstd * (W @ (g * nw)),
        # with g = y * silu(z) (or y, the gate applied after the norm); the sum of squares of g and
        # the product accumulate together, rstd scales the result
        pid_b = tl.program_id(0)
        pid_o = tl.program_id(1)
        o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
        o_ok = o < NOUT
        sq = tl.zeros((BLOCK_E,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_O,), dtype=tl.float32)
        for e0 in range(0, E, BLOCK_E):
            e = e0 + tl.arange(0, BLOCK_E)
            e_ok = e < E
            g = tl.load(y_ptr + pid_b * s_y_b + e * s_y_e, mask=e_ok, other=0.0).to(tl.float32)
            v = g
            if HAS_Z:
                z = tl.load(z_ptr + pid_b * s_z_b + e * s_z_e, mask=e_ok, other=0.0).to(tl.float32)
                if NORM_BEFORE_GATE:
                    v = g * z * tl.sigmoid(z)
                else:
                    g = g * z * tl.sigmoid(z)
                    v = g
            sq += g * g
            v = v * tl.load(nw_ptr + e, mask=e_ok, other=0.0).to(tl.float32)
            w = tl.load(
                w_ptr + o[:, None] * s_w_o + e[None, :] * s_w_e, mask=o_ok[:, None] & e_ok[None, :], other=0.0
            ).to(tl.float32)  # (BO, BE)
            acc += tl.sum(w * v[None, :], axis=1)
        rstd = 1.0 / tl.sqrt(tl.sum(sq, axis=0) / E + eps)
        tl.store(out_ptr + pid_b * s_o_b + o * s_o_o, (acc * rstd).to(out_ptr.dtype.element_ty), mask=o_ok)


def rms_norm_gated_linear(
    y: Tensor,
    z: Tensor | None,
    norm_weight: Tensor,
    eps: float,
    weight: Tensor,
    norm_before_gate: bool = False,
    out_dtype: torch.dtype | None = None,
    block_o: int = 8,
    num_warps: int = 4,
    block_e: int = 512,
) -> Tensor:
    """Mamba-2's gated RMSNorm (one group) and out_proj in one kernel: y, z (b,e), norm_weight (e,),
    weight (o,e) -> (b,o) in ``out_dtype`` (default y's). Each program (a row and ``block_o``
    outputs) reads the row once: the statistic is a scalar per row, so it accumulates the sum of
    squares beside W @ (gated row * norm weight) and scales by rstd at the end. The normed row is
    not rounded to bf16 before the product as the unfused norm's output is: the two agree to one
    bf16 rounding. One launch instead of two, for small batches (a matrix-vector product). Tiles:
    on an H200 at b=1 (e 1536, o 768; ``benchmarks/bench_step_kernels.py``) 8 outputs a program with
    4 warps took 3.2 us against 7.8 us for mamba_ssm's gated norm + cuBLAS."""
    if triton is None:
        raise RuntimeError("the fused decode step needs triton")
    b, e = y.shape
    o = weight.shape[0]
    out_dtype = out_dtype or y.dtype
    if weight.shape[1] != e or norm_weight.shape != (e,) or (z is not None and z.shape != (b, e)):
        raise ValueError(
            f"shapes: y {tuple(y.shape)}, z {None if z is None else tuple(z.shape)}, "
            f"norm_weight {tuple(norm_weight.shape)}, weight {tuple(weight.shape)}"
        )
    out = torch.empty(b, o, dtype=out_dtype, device=y.device)
    zz = z if z is not None else y
    _gated_norm_linear_kernel[(b, triton.cdiv(o, block_o))](
        y, zz, norm_weight, weight, out, e, o, eps,
        *y.stride(), *zz.stride(), *weight.stride(), *out.stride(),
        BLOCK_E=min(block_e, triton.next_power_of_2(e)), BLOCK_O=block_o, HAS_Z=z is not None,
        NORM_BEFORE_GATE=norm_before_gate, num_warps=num_warps,
    )  # fmt: skip
    return out


def rms_norm_gated_linear_ref(
    y: Tensor,
    z: Tensor | None,
    norm_weight: Tensor,
    eps: float,
    weight: Tensor,
    norm_before_gate: bool = False,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """The plain twin of :func:`rms_norm_gated_linear`: the gated norm and the product in fp32, the
    normed row not rounded (as the kernel)."""
    yf = y.float()
    zs = F.silu(z.float()) if z is not None else None
    g = yf * zs if zs is not None and not norm_before_gate else yf
    x = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + eps) * norm_weight.float()
    if zs is not None and norm_before_gate:
        x = x * zs
    return (x @ weight.float().t()).to(out_dtype or y.dtype)


def selective_state_update_dtproj_(
    state: Tensor,
    x: Tensor,
    dt_low: Tensor,
    dt_weight: Tensor,
    dt_bias: Tensor | None,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    block_e: int = 32,
    num_warps: int | None = None,
    partials: Tensor | None = None,
) -> Tensor:
    """One step with dt = softplus(dt_low @ dt_weight^T + dt_bias); ``state`` (b,e,n) updated in place.

    Args: x, z (b,e); dt_low (b,r); dt_weight (e,r); dt_bias, D (e,); A (e,n); B, C (b,n); any
    strides (views of x_proj's and in_proj's outputs). Returns y (b,e) in x's dtype. ``block_e``
    channels per program (64 gave 24 programs at b=1, e=1536: 2.9 us a layer on an H200);
    ``num_warps`` None = 4 up to b=8, 1 above (the sweep of ``benchmarks/bench_step_kernels.py``:
    2.0 / 2.3 / 5.0 us at b=1 / 8 / 64 against 3.9 / 4.2 / 7.4 for cuBLAS's dt_proj + mamba_ssm's
    update).

    ``partials`` (b, p, r + 2n) fp32 instead of dt_low, B and C (pass None for them): x_proj's partial
    products from :func:`add_rms_norm_linear` with ``xproj_weight``, summed here by every program
    (p x (r + 2n) values from L2) in place of reading x_proj's output.
    """
    if triton is None:
        raise RuntimeError("the fused decode step needs triton")
    b, e = x.shape
    n, r = A.shape[1], dt_weight.shape[1]
    if n & (n - 1):
        raise ValueError(f"the fused decode step needs a power-of-two state size, got d_state={n}")
    if partials is not None:
        if partials.dim() != 3 or partials.shape[0] != b or partials.shape[2] != r + 2 * n:
            raise ValueError(
                f"partials {tuple(partials.shape)}: expected (b={b}, blocks, r + 2n = {r + 2 * n})"
            )
        dt_low = B = C = partials[:, 0]  # never read: the kernel sums the partials
    elif state.shape != (b, e, n) or dt_low.shape != (b, r) or B.shape != (b, n) or C.shape != (b, n):
        raise ValueError(
            f"shapes: state {tuple(state.shape)}, x {tuple(x.shape)}, dt_low {tuple(dt_low.shape)}, "
            f"dt_weight {tuple(dt_weight.shape)}, B {tuple(B.shape)}, C {tuple(C.shape)}"
        )
    if state.shape != (b, e, n):
        raise ValueError(f"shapes: state {tuple(state.shape)}, x {tuple(x.shape)}, A {tuple(A.shape)}")
    part = partials if partials is not None else x.new_empty(1, 1, 1)
    out = torch.empty_like(x)
    block_e = min(block_e, triton.next_power_of_2(e))
    dummy = x  # never read when the flag is off
    zz = z if z is not None else dummy
    _step_kernel[(b, triton.cdiv(e, block_e))](
        state, x, dt_low, dt_weight, dt_bias if dt_bias is not None else dummy, A, B, C,
        D if D is not None else dummy, zz, out, part,
        e, r, part.shape[1],
        *state.stride(), *x.stride(), *dt_low.stride(), *dt_weight.stride(), *A.stride(),
        *B.stride(), *C.stride(), *zz.stride(), *out.stride(), *part.stride(),
        N=n, R_PAD=max(16, triton.next_power_of_2(r)), BLOCK_E=block_e,
        HAS_BIAS=dt_bias is not None, HAS_D=D is not None, HAS_Z=z is not None, HAS_PART=partials is not None,
        BLOCK_P=64,
        num_warps=num_warps or (4 if b <= 8 else 1),
    )  # fmt: skip
    return out


def selective_state_update_dtproj_ref(
    state: Tensor,
    x: Tensor,
    dt_low: Tensor,
    dt_weight: Tensor,
    dt_bias: Tensor | None,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
) -> Tensor:
    """The plain twin of :func:`selective_state_update_dtproj_` (fp32 throughout, ``state`` in place)."""
    dt = dt_low.float() @ dt_weight.float().t()  # (b,e)
    if dt_bias is not None:
        dt = dt + dt_bias.float()
    dt = F.softplus(dt)
    xf = x.float()
    h = state.float() * torch.exp(A.float() * dt[..., None]) + B.float()[:, None, :] * (dt * xf)[..., None]
    state.copy_(h)
    y = (h * C.float()[:, None, :]).sum(-1)
    if D is not None:
        y = y + xf * D.float()
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(x.dtype)

"""Cases for tests/test_triton_step.py, run in a child process with TRITON_INTERPRET=1 (the
interpreter must be chosen before triton is imported). Prints one JSON line of errors."""

import json

import torch
import torch.nn.functional as F

from vlm_mamba import ops
from vlm_mamba.ops import triton_step as T


def case(b=3, e=100, n=16, r=12, seed=0, dtype=torch.float32):
    """Inputs laid out as the mixer's step makes them: dt_low, B, C views of x_proj's output and z a
    view of in_proj's (strided), e not a multiple of the channel block."""
    g = torch.Generator().manual_seed(seed)
    rn = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    xz = rn(b, 2 * e).to(dtype)
    dbc = rn(b, r + 2 * n).to(dtype)
    dt_low, B, C = dbc.split([r, n, n], dim=-1)
    return dict(
        state=rn(b, e, n), x=rn(b, e).to(dtype), dt_low=dt_low, dt_weight=rn(e, r) * 0.3, dt_bias=rn(e) * 0.5,
        A=-torch.exp(rn(e, n) * 0.5), B=B, C=C, D=rn(e), z=xz[:, e:],
    )  # fmt: skip


def err(a, b):
    return float((a.float() - b.float()).abs().max()), float(b.float().abs().max())


out = {}
for gate in (True, False):
    for d in (True, False):
        c = case()
        if not gate:
            c["z"] = None
        if not d:
            c["D"] = None
        s_k, s_r = c["state"].clone(), c["state"].clone()
        y = T.selective_state_update_dtproj_(**{**c, "state": s_k})
        ref = T.selective_state_update_dtproj_ref(**{**c, "state": s_r})
        (ye, ys), (se, ss) = err(y, ref), err(s_k, s_r)
        out[f"twin gate={gate} D={d}"] = {"y_err": ye, "y_scale": ys, "state_err": se, "state_scale": ss}

# the twin against the unfused step: dt_proj as a matmul, then the reference state update
c = case(seed=1)
s_r, s_u = c["state"].clone(), c["state"].clone()
y_r = T.selective_state_update_dtproj_ref(**{**c, "state": s_r})
dt = F.linear(c["dt_low"], c["dt_weight"])
y_u, new = ops.selective_state_update(
    s_u, c["x"], dt, c["A"], c["B"], c["C"], c["D"], z=c["z"], dt_bias=c["dt_bias"], dt_softplus=True,
    kernel="torch",
)  # fmt: skip
out["twin_vs_unfused"] = {
    "y_err": err(y_r, y_u)[0],
    "y_scale": err(y_r, y_u)[1],
    "state_err": err(s_r, new)[0],
}

c = case(seed=2, dtype=torch.bfloat16)
s_k, s_r = c["state"].clone(), c["state"].clone()
y = T.selective_state_update_dtproj_(**{**c, "state": s_k})
ref = T.selective_state_update_dtproj_ref(**{**c, "state": s_r})
out["bf16"] = {
    "dtype": str(y.dtype),
    "y_err": err(y, ref)[0],
    "y_scale": err(y, ref)[1],
    "state_err": err(s_k, s_r)[0],
}

# add + RMSNorm + in_proj: with and without a residual, fp32 and bf16 activations, d not a power of 2
for res in (True, False):
    for dtype in (torch.float32, torch.bfloat16):
        g = torch.Generator().manual_seed(3)
        b, d, o = 3, 200, 130
        h = torch.randn(b, d, generator=g).to(dtype)
        r = torch.randn(b, d, generator=g) if res else None
        nw = torch.rand(d, generator=g) + 0.5
        w = (torch.randn(o, d, generator=g) * 0.1).to(dtype)
        y, ro = T.add_rms_norm_linear(h, r, nw, 1e-5, w)
        yr, ror = T.add_rms_norm_linear_ref(h, r, nw, 1e-5, w)
        # the unfused path: ops.add_rms_norm's twin, then the matmul
        normed, res_u = ops.add_rms_norm(h, r, nw.to(dtype), 1e-5, True, kernel="torch")
        yu = F.linear(normed, w)
        out[f"norm_linear res={res} {dtype}"] = {
            "y_err": err(y, yr)[0], "y_scale": err(y, yr)[1], "res_err": err(ro, ror)[0],
            "unfused_err": err(yr, yu)[0], "res_unfused_err": err(ror, res_u)[0], "dtype": str(y.dtype),
        }  # fmt: skip

# the same with the conv step folded in: e=60 x-half outputs (a program's block of 8 straddles the x/z
# boundary), widths 4 and 2, with and without a conv bias; the conv state is updated in place
for dtype in (torch.float32, torch.bfloat16):
    for k, bias in ((4, True), (2, False)):
        g = torch.Generator().manual_seed(4)
        b, d, o, e = 3, 200, 130, 60
        h = torch.randn(b, d, generator=g).to(dtype)
        r = torch.randn(b, d, generator=g)
        nw = torch.rand(d, generator=g) + 0.5
        w = (torch.randn(o, d, generator=g) * 0.1).to(dtype)
        cw, cb = torch.randn(e, k, generator=g) * 0.5, (torch.randn(e, generator=g) if bias else None)
        cs = torch.randn(b, e, k - 1, generator=g).to(dtype)
        cs_k, cs_r, cs_u = cs.clone(), cs.clone(), cs.clone()
        conv = dict(conv_weight=cw, conv_bias=cb)
        y, ro = T.add_rms_norm_linear(h, r, nw, 1e-5, w, conv_state=cs_k, **conv)
        yr, ror = T.add_rms_norm_linear_ref(h, r, nw, 1e-5, w, conv_state=cs_r, **conv)
        # the unfused path: add + norm, in_proj, then the conv step on the x half
        normed, _ = ops.add_rms_norm(h, r, nw.to(dtype), 1e-5, True, kernel="torch")
        xz = F.linear(normed, w)
        xc = ops.causal_conv1d_update_(xz[:, :e].contiguous(), cs_u, cw, cb, kernel="torch")
        yu = torch.cat([xc, xz[:, e:]], dim=-1)
        out[f"norm_linear_conv k={k} bias={bias} {dtype}"] = {
            "y_err": err(y, yr)[0], "y_scale": err(y, yr)[1], "state_err": err(cs_k, cs_r)[0],
            "unfused_err": err(yr, yu)[0], "state_unfused_err": err(cs_r, cs_u)[0],
            "state_moved": err(cs_k, cs)[0], "dtype": str(y.dtype),
        }  # fmt: skip

# Mamba-2's layout: in_proj's outputs are z (e), x B C (c, the conv's channels), dt (h); the conv step
# on the middle ones (conv_offset = e), blocks of 8 straddling both edges (e=21, c=37, h=5)
for dtype in (torch.float32, torch.bfloat16):
    g = torch.Generator().manual_seed(5)
    b, d, e, c, nh = 2, 96, 21, 37, 5
    o = e + c + nh
    h = torch.randn(b, d, generator=g).to(dtype)
    r = torch.randn(b, d, generator=g)
    nw = torch.rand(d, generator=g) + 0.5
    w = (torch.randn(o, d, generator=g) * 0.1).to(dtype)
    cw, cb = torch.randn(c, 4, generator=g) * 0.5, torch.randn(c, generator=g)
    cs = torch.randn(b, c, 3, generator=g).to(dtype)
    cs_k, cs_r, cs_u = cs.clone(), cs.clone(), cs.clone()
    conv = dict(conv_weight=cw, conv_bias=cb, conv_offset=e)
    y, _ = T.add_rms_norm_linear(h, r, nw, 1e-5, w, conv_state=cs_k, **conv)
    yr, _ = T.add_rms_norm_linear_ref(h, r, nw, 1e-5, w, conv_state=cs_r, **conv)
    normed, _ = ops.add_rms_norm(h, r, nw.to(dtype), 1e-5, True, kernel="torch")
    zxbcdt = F.linear(normed, w)
    xc = ops.causal_conv1d_update_(zxbcdt[:, e : e + c].contiguous(), cs_u, cw, cb, kernel="torch")
    yu = torch.cat([zxbcdt[:, :e], xc, zxbcdt[:, e + c :]], dim=-1)
    out[f"norm_linear_conv offset {dtype}"] = {
        "y_err": err(y, yr)[0], "y_scale": err(y, yr)[1], "state_err": err(cs_k, cs_r)[0],
        "unfused_err": err(yr, yu)[0], "state_unfused_err": err(cs_r, cs_u)[0],
        "z_dt_err": max(err(y[:, :e], yu[:, :e])[0], err(y[:, e + c :], yu[:, e + c :])[0]),
        "state_moved": err(cs_k, cs)[0], "dtype": str(y.dtype),
    }  # fmt: skip
try:
    T.add_rms_norm_linear(h, r, nw, 1e-5, w, conv_state=cs.clone(), conv_weight=cw, conv_offset=o - c + 1)
    out["conv_offset_past_end"] = "no error"
except ValueError as ex:
    out["conv_offset_past_end"] = str(ex)

# Mamba-2's gated RMSNorm + out_proj: with and without z, the norm before or after the gate, fp32,
# bf16, and fp32 activations into a bf16 product (autocast); e=300 spans two 256-wide blocks
for gate, before, (ydt, odt) in [
    (True, False, (torch.float32, torch.float32)),
    (True, True, (torch.float32, torch.float32)),
    (False, False, (torch.float32, torch.float32)),
    (True, False, (torch.bfloat16, torch.bfloat16)),
    (True, False, (torch.float32, torch.bfloat16)),
]:
    g = torch.Generator().manual_seed(6)
    b, e, o = 3, 300, 70
    zy = torch.randn(b, 2 * e, generator=g).to(ydt)  # z a strided view, as _split makes it
    y, z = zy[:, e:], (zy[:, :e] if gate else None)
    nw = torch.rand(e, generator=g) + 0.5
    w = (torch.randn(o, e, generator=g) * 0.1).to(odt)
    k = T.rms_norm_gated_linear(y, z, nw, 1e-5, w, before, odt)
    ref = T.rms_norm_gated_linear_ref(y, z, nw, 1e-5, w, before, odt)
    # the unfused path: ops.rms_norm_gated's torch twin, then out_proj
    u = F.linear(ops.rms_norm_gated(y, nw.to(ydt), z, 1e-5, None, before, kernel="torch").to(odt), w)
    out[f"gated_norm_linear z={gate} before={before} {ydt}->{odt}"] = {
        "err": err(k, ref)[0], "scale": err(k, ref)[1], "unfused_err": err(ref, u)[0], "dtype": str(k.dtype),
    }  # fmt: skip

# x_proj folded away (Mamba-1 at b=1): its partial products in the in_proj kernel's epilogue, summed by
# the state update; against in_proj + conv, x_proj as a matmul and the state update's twin
for dtype in (torch.float32, torch.bfloat16):
    g = torch.Generator().manual_seed(8)
    b, d, e, r, n = 2, 200, 60, 6, 4
    h = torch.randn(b, d, generator=g).to(dtype)
    res = torch.randn(b, d, generator=g)
    nw = torch.rand(d, generator=g) + 0.5
    w = (torch.randn(2 * e, d, generator=g) * 0.1).to(dtype)
    cw, cb = torch.randn(e, 4, generator=g) * 0.5, torch.randn(e, generator=g)
    cs = torch.randn(b, e, 3, generator=g).to(dtype)
    wx = (torch.randn(r + 2 * n, e, generator=g) * 0.2).to(dtype)
    wdt, bdt = torch.randn(e, r, generator=g) * 0.3, torch.randn(e, generator=g) * 0.5
    A, D = -torch.exp(torch.randn(e, n, generator=g) * 0.5), torch.randn(e, generator=g)
    st = torch.randn(b, e, n, generator=g)
    conv = dict(conv_weight=cw, conv_bias=cb)
    cs_k, cs_r, st_k, st_r = cs.clone(), cs.clone(), st.clone(), st.clone()
    xz, _, part = T.add_rms_norm_linear(h, res, nw, 1e-5, w, conv_state=cs_k, xproj_weight=wx, **conv)
    _, _, part_ref = T.add_rms_norm_linear_ref(
        h, res, nw, 1e-5, w, conv_state=cs.clone(), xproj_weight=wx, **conv
    )
    y = T.selective_state_update_dtproj_(
        st_k, xz[:, :e], None, wdt, bdt, A, None, None, D, xz[:, e:], partials=part
    )
    # unfused: in_proj + conv, x_proj as a matmul, the state update's twin
    xz2, _ = T.add_rms_norm_linear_ref(h, res, nw, 1e-5, w, conv_state=cs_r, **conv)
    x_dbl = F.linear(xz2[:, :e].float(), wx.float())
    dtl, Bm, Cm = x_dbl.split([r, n, n], dim=-1)
    y2 = T.selective_state_update_dtproj_ref(st_r, xz2[:, :e], dtl, wdt, bdt, A, Bm, Cm, D, xz2[:, e:])
    # the same unfused ops from the kernel's own in_proj + conv outputs: what the fold itself changes
    x_dbl3 = F.linear(xz[:, :e].float(), wx.float())
    st3 = st.clone()
    y3 = T.selective_state_update_dtproj_ref(st3, xz[:, :e], *x_dbl3.split([r, n, n], dim=-1)[:1], wdt, bdt, A,
                                              *x_dbl3.split([r, n, n], dim=-1)[1:], D, xz[:, e:])  # fmt: skip
    out[f"xproj fold {dtype}"] = {
        "own_y_err": err(y, y3)[0], "own_state_err": err(st_k, st3)[0],
        "parts": list(part.shape), "part_err": err(part, part_ref)[0], "part_scale": err(part_ref, part_ref)[1],
        "sum_err": err(part.sum(1), x_dbl)[0], "sum_scale": err(x_dbl, x_dbl)[1],
        "y_err": err(y, y2)[0], "y_scale": err(y2, y2)[1], "state_err": err(st_k, st_r)[0],
        "state_scale": err(st_r, st_r)[1],
    }  # fmt: skip
try:
    T.add_rms_norm_linear(h, res, nw, 1e-5, w, conv_state=cs.clone(), xproj_weight=wx)
    out["xproj without conv"] = "no error"
except ValueError as ex:
    out["xproj without conv"] = str(ex)

try:
    T.selective_state_update_dtproj_(**case(n=12))
    out["n12"] = "no error"
except ValueError as e:
    out["n12"] = str(e)
print(json.dumps(out))

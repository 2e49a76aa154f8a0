"""Cases for tests/test_triton_scan.py, run in a child process with TRITON_INTERPRET=1 (the
interpreter must be chosen before triton is imported). Prints one JSON line of errors."""

import json

import torch

from vlm_mamba.ops import triton_scan as T


def case(b=2, e=40, length=70, n=8, seed=0, pads=True):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    delta = r(b, e, length)
    if pads:
        delta[0, :, 50:] = -1e4  # trailing pads: dt = 0, the state must pass unchanged
    return dict(
        y0=r(b, e, length), delta=delta, delta_bias=r(e) * 0.5, A=-torch.rand(e, n, generator=g) * 2,
        C=r(b, n, length), h0=r(b, e, n),
    ), r(b, e, length)  # fmt: skip


def err(a, b):
    return float((a.float() - b.float()).abs().max()), float(b.float().abs().max())


out = {}
for gate in (True, False):
    for softplus in (True, False):
        c, z = case(pads=softplus)
        if not softplus:  # raw dt + bias must be >= 0 without softplus
            c["delta"], c["delta_bias"] = c["delta"].abs() * 0.1, c["delta_bias"].abs()
        z = z if gate else None
        # a strided view, as selective_scan_fn's last state is (its (b, e, chunks, 2n) buffer's
        # [:, :, -1, 1::2]): updated in place through its strides
        last_k = torch.randn(2, 40, 3, 16)[:, :, -1, 1::2]
        last_r = last_k.clone()
        y = T.add_initial_state(**c, delta_softplus=softplus, z=z, last=last_k, block_e=16, block_l=32)
        ref = T.add_initial_state_ref(**c, delta_softplus=softplus, z=z, last=last_r)
        (ye, ys), (le, ls) = err(y, ref), err(last_k, last_r)
        out[f"twin gate={gate} softplus={softplus}"] = {
            "y_err": ye,
            "y_scale": ys,
            "last_err": le,
            "last_scale": ls,
        }

c, _ = case()
last = torch.zeros(2, 40, 8)
T.add_initial_state(**c, delta_softplus=True, last=last)
cut = {k: (v[:1, ..., :50] if k in ("y0", "delta", "C") else v[:1] if k == "h0" else v) for k, v in c.items()}
last_cut = torch.zeros(1, 40, 8)
T.add_initial_state(**cut, delta_softplus=True, last=last_cut)
out["pads"] = {"last_err": err(last[:1], last_cut)[0]}

c, z = case(pads=False)
c = {k: (v.bfloat16() if k in ("y0", "delta", "C") else v) for k, v in c.items()}
y = T.add_initial_state(**c, delta_softplus=True, z=z.bfloat16(), block_e=32, block_l=16)
ref = T.add_initial_state_ref(**c, delta_softplus=True, z=z.bfloat16())
ye, ys = err(y, ref)
out["bf16"] = {"dtype": str(y.dtype), "y_err": ye, "y_scale": ys}

# the h0 term's skip of decayed terms: A in [-40, -1], dt ~ 0.05 (softplus(-3 + noise)) over 256
# tokens in 32-token blocks (c reaches ~1.6 a block), so many (channel block, time block, n) terms
# fall below the default cutoff while others stay live; none; and a cutoff of 1 (a visible error)
c, z = case(length=256, pads=False, seed=5)
g5 = torch.Generator().manual_seed(5)
c["A"] = -torch.exp(torch.rand(40, 8, generator=g5) * 3.7)
c["delta"] = -3.0 + 0.3 * torch.randn(2, 40, 256, generator=g5)
c["delta_bias"] = 0.1 * torch.randn(40, generator=g5)
for name, cut in (("default", T.DECAY_CUTOFF), ("none", None), ("1", 1.0)):
    last_k, last_r = torch.zeros(2, 40, 8), torch.zeros(2, 40, 8)
    y = T.add_initial_state(**c, delta_softplus=True, z=z, last=last_k, block_e=8, block_l=32, cutoff=cut)
    ref = T.add_initial_state_ref(**c, delta_softplus=True, z=z, last=last_r)
    (ye, ys), (le, ls) = err(y, ref), err(last_k, last_r)
    h0_term = err(ref, T.add_initial_state_ref(**{**c, "h0": c["h0"] * 0}, delta_softplus=True, z=z))[0]
    out[f"cutoff {name}"] = {"y_err": ye, "y_scale": ys, "last_err": le, "last_scale": ls, "h0_term": h0_term}

# the one-pass scan from a state against the sequential reference scan (pads, gate, D, bf16)
from vlm_mamba.ops.reference import selective_scan_ref  # noqa: E402

g = torch.Generator().manual_seed(3)
u, dl, zg = (torch.randn(2, 10, 70, generator=g) for _ in range(3))
dl[0, :, 50:] = -1e4  # trailing pads: identity steps
A, bias = -torch.rand(10, 8, generator=g) * 2, torch.randn(10, generator=g) * 0.5
Bm, Cm, D, h0 = (
    torch.randn(2, 8, 70, generator=g),
    torch.randn(2, 8, 70, generator=g),
    torch.randn(10),
    torch.randn(2, 10, 8),
)


def one_pass(args, block_l, sequential=False, block_e=4):
    """The one-pass kernel and the reference scan on the same (u, delta, A, B, C, D, z, bias,
    softplus) from h0: their errors, y and the last state, and the output dtype."""
    y, last = T.selective_scan_from_state(*args, h0, block_e=block_e, block_l=block_l, sequential=sequential)
    ry, rl = selective_scan_ref(*args, initial_state=h0, return_last_state=True)
    (ye, ys), (le, ls) = err(y, ry), err(last, rl)
    return {"dtype": str(y.dtype), "y_err": ye, "y_scale": ys, "last_err": le, "last_scale": ls}


for gate, with_d in ((True, True), (False, False)):
    args = (u, dl, A, Bm, Cm, D if with_d else None, zg if gate else None, bias, True)
    out[f"one pass gate={gate} D={with_d}"] = one_pass(args, block_l=32)
low = (u.bfloat16(), dl.bfloat16(), A, Bm.bfloat16(), Cm.bfloat16(), D, zg.bfloat16(), bias, True)
out["one pass bf16"] = one_pass(low, block_l=16)
# the step-at-a-time kernel (short prompts): the same cases, 32 channels a program over 10 (masked)
for gate, with_d in ((True, True), (False, False)):
    args = (u, dl, A, Bm, Cm, D if with_d else None, zg if gate else None, bias, True)
    out[f"sequential gate={gate} D={with_d}"] = one_pass(args, 0, sequential=True, block_e=32)
out["sequential bf16"] = one_pass(low, 0, sequential=True, block_e=8)
short = tuple(a[..., :12] if torch.is_tensor(a) and a.dim() == 3 else a for a in low)
y_auto, _ = T.selective_scan_from_state(*short, h0)  # 12 tokens: sequential by default
y_blk, _ = T.selective_scan_from_state(*short, h0, sequential=False)
out["sequential default for 12 tokens"] = {
    "auto_vs_block_err": err(y_auto, y_blk)[0],
    "scale": err(y_blk, y_blk)[1],
}

# the short-prompt conv from a cached window (ops.triton_conv): x a (b,l,e) buffer's transposed view as
# in_proj writes it, widths 4 and 2, 12 tokens and 2 (fewer than the window), fp32 and bf16
from vlm_mamba import ops  # noqa: E402
from vlm_mamba.ops import triton_conv as TC  # noqa: E402

for k, L, bias_on, dtype in (
    (4, 12, True, torch.float32),
    (4, 2, False, torch.float32),
    (2, 12, True, torch.bfloat16),
):
    g = torch.Generator().manual_seed(7)
    b, e = 3, 70
    x = torch.randn(b, L, e, generator=g).to(dtype).transpose(1, 2)  # (b,e,l), channel stride 1
    w, bias = torch.randn(e, k, generator=g) * 0.5, (torch.randn(e, generator=g) if bias_on else None)
    init = torch.randn(b, e, k - 1, generator=g).to(dtype)
    y = TC.causal_conv1d_short(x, w, bias, init, "silu")
    ref = TC.causal_conv1d_short_ref(x, w, bias, init, "silu")
    twin = ops.causal_conv1d(x, w, bias, initial_states=init, kernel="torch")
    out[f"short conv k={k} L={L} {dtype}"] = {
        "err": err(y, ref)[0],
        "scale": err(ref, ref)[1],
        "twin_err": err(ref, twin)[0],
        "dtype": str(y.dtype),
    }

# out=: the first k-1 outputs of a longer prompt written into its output's columns (a strided view)
g = torch.Generator().manual_seed(8)
x = torch.randn(2, 20, 40, generator=g).transpose(1, 2)  # (b,e,l) = (2, 40, 20), channel stride 1
w, bias, init = (
    torch.randn(40, 4, generator=g),
    torch.randn(40, generator=g),
    torch.randn(2, 40, 3, generator=g),
)
y_full = torch.full((2, 40, 20), 7.0)
TC.causal_conv1d_short(x[..., :3], w, bias, init, "silu", out=y_full[..., :3])
out["short conv out="] = {
    "err": err(y_full[..., :3], TC.causal_conv1d_short_ref(x[..., :3], w, bias, init, "silu"))[0],
    "untouched": bool((y_full[..., 3:] == 7.0).all()),
}

errors = {}
c, _ = case()
for name, bad in (
    ("n=6", {**c, "A": c["A"][:, :6], "h0": c["h0"][..., :6], "C": c["C"][:, :6]}),
    ("grouped C", {**c, "C": c["C"][:, None]}),
):
    try:
        T.add_initial_state(**bad, delta_softplus=True)
        errors[name] = "no error"
    except ValueError as e:
        errors[name] = str(e)
out["errors"] = errors
print(json.dumps(out))

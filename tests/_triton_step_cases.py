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

try:
    T.selective_state_update_dtproj_(**case(n=12))
    out["n12"] = "no error"
except ValueError as e:
    out["n12"] = str(e)
print(json.dumps(out))

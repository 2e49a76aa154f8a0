"""Cases for tests/test_linear_ce.py's kernel tests, run in a child process with TRITON_INTERPRET=1
(the interpreter must be chosen before triton is imported). Prints one JSON line of errors."""

import json

import torch

from vlm_mamba.ops import linear_ce, triton_ce


def err(a, b):
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max()), float(b.abs().max())


out = {"kernel_used": linear_ce._use_kernel(torch.zeros(1))}
g = torch.Generator().manual_seed(0)
for dtype in (torch.float32, torch.bfloat16):
    for grad in (False, True):
        x = (torch.randn(7, 101, generator=g) * 3).to(dtype)  # 101: the last block is partly masked
        t = torch.randint(0, 101, (7,), generator=g)
        t[0] = 100  # the last column, in the masked block
        w = torch.rand(7, generator=g)
        xk, xr = x.clone(), x.clone()
        lk, tk = triton_ce.ce_rows_(xk, t, w, grad, block_v=32)
        lr, tr = triton_ce.ce_rows_ref(xr, t, w, grad)
        (le, ls), (te, ts), (ge, gs) = err(lk, lr), err(tk, tr), err(xk, xr)
        out[f"rows {dtype} grad={grad}"] = {
            "lse_err": le,
            "lse_scale": ls,
            "xt_err": te,
            "g_err": ge,
            "g_scale": gs,
        }

# the whole chunked loss with the kernel in it, against the plain head + CE: values and gradients
m, d, V = 37, 24, 101
h = torch.randn(m, d, generator=g).requires_grad_()
wt = (torch.randn(V, d, generator=g) * 0.3).requires_grad_()
y = torch.randint(0, V, (m,), generator=g)
rw = torch.rand(m, generator=g)
for chunk in (5, 1000):
    loss = linear_ce.linear_cross_entropy(h, wt, y, rw, chunk_rows=chunk)
    gh, gw = torch.autograd.grad(loss * 1.7, (h, wt))
    ref = linear_ce.linear_cross_entropy_ref(h, wt, y, rw)
    rh, rwg = torch.autograd.grad(ref * 1.7, (h, wt))
    out[f"loss chunk={chunk}"] = {"loss": err(loss, ref), "h": err(gh, rh), "w": err(gw, rwg)}
print(json.dumps(out))

"""The fused decode-step kernels (``vlm_mamba.ops.triton_step``) against the unfused ops they
replace, per call inside a CUDA graph (as the decoder replays them), over their tile sizes.

    python benchmarks/bench_step_kernels.py --out benchmarks/results/step_kernels_<device>.json

Rows, at the decode section's shape (d 768, e 1536, n 16, dt_rank 48, bf16) and batches 1, 8, 64:
- ``add_rms_norm_linear`` (add + RMSNorm + in_proj in one kernel) for each (block_o, num_warps)
  against mamba_ssm's fused add + RMSNorm followed by cuBLAS's in_proj (``F.linear``);
- ``selective_state_update_dtproj_`` (dt_proj inside the state update) for each (block_e,
  num_warps) against ``F.linear`` (dt_proj) + mamba_ssm's ``selective_state_update``;
- Mamba-2 (n 128, 24 heads): ``rms_norm_gated_linear`` (gated RMSNorm + out_proj) against mamba_ssm's
  gated ``rmsnorm_fn`` + cuBLAS, and ``add_rms_norm_linear`` with the conv step on x B C against
  add + norm, cuBLAS and ``causal_conv1d_update``.

Each variant is captured as one graph of ``--calls`` launches; the time is a replay's median over
``--reps`` divided by ``--calls``. Prints a table, writes JSON. CUDA only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def per_call_us(fn, calls: int, reps: int) -> float:
    """Median time of one call of ``fn`` inside a graph of ``calls`` calls."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / calls)
    return statistics.median(times)


def write_results(stem: str, out_arg: str | None, payload: dict) -> Path:
    """``payload`` with the environment (device, torch, triton, mamba_ssm) as
    ``benchmarks/results/<stem>_<device>.json`` (or ``out_arg``), written to a temporary file first."""
    env = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    for name in ("triton", "mamba_ssm"):
        try:
            env[name] = __import__(name).__version__
        except ImportError:
            pass
    out = Path(out_arg or f"benchmarks/results/{stem}_{env['device'].lower().replace(' ', '_')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"env": env, **payload}, indent=1))
    os.replace(tmp, out)
    print(f"results in {out}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--calls", type=int, default=50)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_step_kernels needs CUDA")
    from mamba_ssm.ops.triton.layer_norm import rms_norm_fn
    from mamba_ssm.ops.triton.selective_state_update import selective_state_update

    from vlm_mamba.ops import triton_step as T

    dev, bf = torch.device("cuda"), torch.bfloat16
    d, e, n, r = 768, 1536, 16, 48
    torch.manual_seed(0)
    W_in = torch.randn(2 * e, d, device=dev, dtype=bf) * d**-0.5
    nw = torch.ones(d, device=dev, dtype=bf)
    W_dt = torch.randn(e, r, device=dev, dtype=bf) * r**-0.5
    dt_bias = torch.randn(e, device=dev) * 0.1
    A = -torch.rand(e, n, device=dev) - 0.5
    D = torch.ones(e, device=dev)

    def sweep(kernel: str, b: int, ref: float, blocks, warps, call) -> list[dict]:
        """``call(block, num_warps)`` timed for every tile, against the unfused ops' ``ref`` us."""
        out = []
        for blk in blocks:
            for nwarps in warps:
                us = per_call_us(lambda blk=blk, nwarps=nwarps: call(blk, nwarps), args.calls, args.reps)
                out.append({"kernel": kernel, "batch": b, "block": blk, "num_warps": nwarps, "us": us,
                            "vs_unfused": ref / us})  # fmt: skip
        return out

    def ssu_rows(b: int) -> list[dict]:
        state = torch.randn(b, e, n, device=dev)  # fp32, as the decoding cache holds it
        x, z = torch.randn(b, e, device=dev, dtype=bf), torch.randn(b, e, device=dev, dtype=bf)
        dtl = torch.randn(b, r, device=dev, dtype=bf)
        Bm, Cm = torch.randn(b, n, device=dev, dtype=bf), torch.randn(b, n, device=dev, dtype=bf)
        ref = per_call_us(
            lambda: selective_state_update(
                state, x, F.linear(dtl, W_dt), A, Bm, Cm, D, z=z, dt_bias=dt_bias, dt_softplus=True
            ),
            args.calls,
            args.reps,
        )
        unfused = {"kernel": "dt_proj + state update (cuBLAS + mamba_ssm)", "batch": b, "us": ref}
        return [unfused] + sweep(
            "selective_state_update_dtproj_", b, ref, (8, 16, 32, 64), (1, 2, 4),
            lambda be, nwarps: T.selective_state_update_dtproj_(
                state, x, dtl, W_dt, dt_bias, A, Bm, Cm, D, z, block_e=be, num_warps=nwarps
            ),
        )  # fmt: skip

    def mamba2_rows(b: int) -> list[dict]:
        """Mamba-2 (d 768, e 1536, n 128, 24 heads): the gated RMSNorm + out_proj kernel against
        mamba_ssm's gated rmsnorm_fn + cuBLAS, and add + norm + in_proj with the conv step on x B C
        against mamba_ssm's add + norm, cuBLAS and causal_conv1d_update."""
        from causal_conv1d import causal_conv1d_update
        from mamba_ssm.ops.triton.layernorm_gated import rmsnorm_fn as gated_fn

        n2, nh = 128, 24
        c = e + 2 * n2
        y, z = torch.randn(b, e, device=dev, dtype=bf), torch.randn(b, e, device=dev, dtype=bf)
        nw_e = torch.ones(e, device=dev, dtype=bf)
        W_out = torch.randn(d, e, device=dev, dtype=bf) * e**-0.5
        ref = per_call_us(
            lambda: F.linear(gated_fn(y, nw_e, None, z=z, eps=1e-5, norm_before_gate=False), W_out),
            args.calls, args.reps,
        )  # fmt: skip
        out = [{"kernel": "mamba2 gated norm + out_proj (mamba_ssm + cuBLAS)", "batch": b, "us": ref}]
        out += sweep(
            "rms_norm_gated_linear", b, ref, (2, 4, 8, 16), (1, 2, 4, 8),
            lambda bo, nwarps: T.rms_norm_gated_linear(y, z, nw_e, 1e-5, W_out, block_o=bo, num_warps=nwarps),
        )  # fmt: skip
        W_in2 = torch.randn(e + c + nh, d, device=dev, dtype=bf) * d**-0.5
        h = torch.randn(b, d, device=dev, dtype=bf)
        res = torch.randn(b, d, device=dev)
        cw, cb = torch.randn(c, 4, device=dev, dtype=bf), torch.randn(c, device=dev, dtype=bf)
        cs = torch.randn(b, c, 3, device=dev, dtype=bf)
        cs4 = torch.randn(b, c, 4, device=dev, dtype=bf)  # causal_conv1d_update's own state layout

        def unfused():
            zx = F.linear(
                rms_norm_fn(h, nw, None, residual=res, prenorm=True, residual_in_fp32=True, eps=1e-5)[0],
                W_in2,
            )
            return causal_conv1d_update(zx[:, e : e + c], cs4, cw, cb, "silu")

        ref = per_call_us(unfused, args.calls, args.reps)
        out.append({"kernel": "mamba2 add_norm + in_proj + conv (mamba_ssm + cuBLAS + causal_conv1d)", "batch": b,
                    "us": ref})  # fmt: skip
        out += sweep(
            "add_rms_norm_linear mamba2 + conv", b, ref, (4, 8, 16), (2, 4, 8),
            lambda bo, nwarps: T.add_rms_norm_linear(
                h, res, nw, 1e-5, W_in2, block_o=bo, num_warps=nwarps, conv_state=cs, conv_weight=cw,
                conv_bias=cb, conv_offset=e,
            ),
        )  # fmt: skip
        return out

    rows = []
    for b in args.batches:
        h = torch.randn(b, d, device=dev, dtype=bf)
        res = torch.randn(b, d, device=dev)
        ref = per_call_us(
            lambda h=h, res=res: F.linear(
                rms_norm_fn(h, nw, None, residual=res, prenorm=True, residual_in_fp32=True, eps=1e-5)[0], W_in
            ),
            args.calls,
            args.reps,
        )
        rows.append({"kernel": "add_norm + in_proj (mamba_ssm rms_norm_fn + cuBLAS)", "batch": b, "us": ref})
        rows += sweep(
            "add_rms_norm_linear", b, ref, (8, 16, 32, 64), (2, 4, 8),
            lambda bo, nwarps, h=h, res=res: T.add_rms_norm_linear(h, res, nw, 1e-5, W_in, block_o=bo,
                                                                  num_warps=nwarps),
        )  # fmt: skip
        rows += ssu_rows(b)
        rows += mamba2_rows(b)
    print(f"{'kernel':<52} {'b':>3} {'block':>5} {'warps':>5} {'us/call':>8} {'unfused/this':>12}")
    for x in rows:
        print(f"{x['kernel']:<52} {x['batch']:>3} {x.get('block', '-'):>5} {x.get('num_warps', '-'):>5} "
              f"{x['us']:>8.2f} {x.get('vs_unfused', float('nan')):>12.2f}")  # fmt: skip
    write_results("step_kernels", args.out, {"rows": rows})


if __name__ == "__main__":
    main()

"""Mamba-1's scan from a cached state, its forms against each other and against the scan from zero,
per call of one layer's shapes (e 1536, n 16, bf16 inputs, fp32 state), over batch x length.

    python benchmarks/bench_scan_forms.py --out benchmarks/results/scan_forms_<device>.json

Forms (``vlm_mamba.ops.triton_scan.state_scan_form``): ``cuda`` (the CUDA scan from h0,
``ops.cuda_scan_state``: mamba_ssm's algorithm starting from the state), ``one_pass`` (the Triton scan from h0,
``selective_scan_from_state``: one step at a time up to ``SEQUENTIAL_MAX_LENGTH`` tokens, else
an associative scan per block; ``one_pass_blocks`` the latter always) and ``two_pass`` (mamba_ssm's ``selective_scan_fn`` from zero, then
the h0 term, ``add_initial_state``); ``from_zero`` is ``selective_scan_fn`` alone (what a prompt
without a state costs). Beside them the conv from a cached window: ``conv_triton`` (the
short-prompt kernel, ``ops.triton_conv``, up to its ``MAX_LENGTH``) and ``conv_causal_conv1d``
(``causal_conv1d_fn`` and the window's head recomputed). Each is timed as the median replay of a CUDA graph of ``--calls`` calls
(device time, launch gaps included: how the VLM's prefill graphs run it) and eagerly (CUDA events
around ``--calls`` calls: a host-bound call shows here). Prints a table, writes JSON. CUDA only.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_step_kernels import per_call_us, write_results  # noqa: E402

CASES = [
    (1, 16),
    (1, 256),
    (8, 16),
    (32, 16),
    (160, 16),
    (8, 64),
    (160, 64),
    (8, 128),
    (8, 256),
    (1, 1024),
    (8, 1024),
    (1, 4096),
    (8, 4096),
]


def eager_times_us(fn, calls: int, reps: int) -> list[float]:
    """Per-call us of ``fn`` called eagerly: CUDA events around ``calls`` calls, ``reps`` times,
    after 3 warm-up calls."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(calls):
            fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / calls)
    return times


def eager_us(fn, calls: int, reps: int) -> float:
    return statistics.median(eager_times_us(fn, calls, reps))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--out", default=None)
    ap.add_argument("--cases", nargs="+", help="BxL cases (default: the list above), e.g. 32x196 128x196")
    args = ap.parse_args()
    cases = [tuple(int(v) for v in c.lower().split("x")) for c in args.cases] if args.cases else CASES
    if not torch.cuda.is_available():
        sys.exit("bench_scan_forms needs CUDA")
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

    from vlm_mamba.ops import cuda as cuda_ops
    from vlm_mamba.ops import cuda_scan_state
    from vlm_mamba.ops import triton_conv as TC
    from vlm_mamba.ops import triton_scan as TS

    dev, bf = torch.device("cuda"), torch.bfloat16
    e, n = 1536, 16
    torch.manual_seed(0)
    A = -torch.rand(e, n, device=dev) - 0.5
    D = torch.ones(e, device=dev)
    bias = torch.randn(e, device=dev) * 0.1
    conv_w, conv_b = torch.randn(e, 4, device=dev, dtype=bf), torch.randn(e, device=dev, dtype=bf)
    conv_init = torch.randn(max(b for b, _ in cases), e, 3, device=dev, dtype=bf)

    def forms(b: int, L: int) -> dict:
        """The three calls over one set of inputs (freed with the closures)."""
        u, delta, z = (torch.randn(b, e, L, device=dev, dtype=bf) for _ in range(3))
        B, C = torch.randn(b, n, L, device=dev, dtype=bf), torch.randn(b, n, L, device=dev, dtype=bf)
        h0 = torch.randn(b, e, n, device=dev)

        def two_pass():
            y, last = selective_scan_fn(u, delta, A, B, C, D, None, bias, True, True)
            return TS.add_initial_state(y, delta, bias, True, A, C, h0, z, last, out_dtype=bf), last

        return {
            "from_zero": lambda: selective_scan_fn(u, delta, A, B, C, D, z, bias, True, True),
            "cuda": lambda: cuda_scan_state.selective_scan_from_state(
                u, delta, A, B, C, D, z, bias, True, h0
            ),
            "one_pass": lambda: TS.selective_scan_from_state(u, delta, A, B, C, D, z, bias, True, h0),
            "seq_from_zero": lambda: TS.selective_scan_from_state(
                u, delta, A, B, C, D, z, bias, True, torch.zeros_like(h0), sequential=True
            ),  # VLM_MAMBA_SHORT_SCAN=1: the step-at-a-time kernel for a scan without a state
            "one_pass_blocks": lambda: TS.selective_scan_from_state(
                u, delta, A, B, C, D, z, bias, True, h0, sequential=False
            ),
            "two_pass": two_pass,
            "conv_triton": lambda: conv(u, MAX_LENGTH=TC.MAX_LENGTH),
            "conv_causal_conv1d": lambda: conv(u, MAX_LENGTH=0),
        }

    def conv(x, MAX_LENGTH):
        """ops.cuda.causal_conv1d from a window: the Triton short-prompt kernel up to MAX_LENGTH
        tokens, else causal_conv1d_fn and the window's head recomputed."""
        saved, TC.MAX_LENGTH = TC.MAX_LENGTH, MAX_LENGTH
        try:
            return cuda_ops.causal_conv1d(x, conv_w, conv_b, initial_states=conv_init[: x.shape[0]])
        finally:
            TC.MAX_LENGTH = saved

    rows = []
    for b, L in cases:
        row = {"batch": b, "length": L}
        for name, fn in forms(b, L).items():
            row[f"{name}_graph_us"] = per_call_us(fn, args.calls, args.reps)
            row[f"{name}_eager_us"] = eager_us(fn, args.calls, args.reps)
        rows.append(row)
        print(f"b={b:>4} L={L:>5} | " + " ".join(f"{k[:-3]} {v:.1f}" for k, v in row.items() if k.endswith("_us")),
              flush=True)  # fmt: skip
        torch.cuda.empty_cache()
    write_results("scan_forms", args.out, {"shape": {"e": e, "n": n}, "rows": rows})


if __name__ == "__main__":
    main()

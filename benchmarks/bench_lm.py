"""Language-model speed: ms per forward+backward for a tiny and a small LanguageMamba, and the scans
behind it (the compiled CPU kernel and the pure-PyTorch forms vs the sequential reference), with
transformers' Mamba/Mamba2 (slow path, i.e. its own PyTorch code) as a peer. Not a test: prints a
table and writes JSON.

    python benchmarks/bench_lm.py                 # CPU, results in benchmarks/results/bench_lm.json
    python benchmarks/bench_lm.py --device cuda   # on a GPU: kernels vs the torch path

Each row gives the min (headline) and median over ``--reps`` timed runs after one warm-up run. On a
shared CPU other jobs inflate times by up to 10x; the JSON records the load average; compare rows
measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vlm_mamba import ops  # noqa: E402
from vlm_mamba.config import LanguageConfig  # noqa: E402
from vlm_mamba.models.language import LanguageMamba  # noqa: E402
from vlm_mamba.ops import cpu_kernels as K  # noqa: E402
from vlm_mamba.ops import reference as R  # noqa: E402
from vlm_mamba.ops import torch_ops as T  # noqa: E402

SIZES = {  # defined here, not in the registry: benchmark shapes only
    "tiny": dict(d_model=64, n_layers=2, vocab_size=512, d_state=16, headdim=32),
    "small": dict(d_model=256, n_layers=4, vocab_size=8192, d_state=16, headdim=64),
}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, reps: int, device: str) -> dict:
    """Min and median ms of fn() over ``reps`` runs after one warm-up. On a shared CPU the min is
    the robust figure (other jobs only ever add time)."""
    fn()
    times = []
    for _ in range(reps):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t) * 1e3)
    return {"ms": min(times), "ms_median": statistics.median(times)}


def lm_step_fn(model, ids, autocast: bool):
    def run():
        model.zero_grad(set_to_none=True)
        with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=autocast):
            logits = model(ids).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))
        loss.backward()

    return run


def hf_step_fn(model, ids):
    def run():
        model.zero_grad(set_to_none=True)
        model(ids, labels=ids).loss.backward()

    return run


def hf_peer(ssm: str, size: dict, device: str):
    """transformers' model of the same size (None if transformers is missing)."""
    try:
        import transformers
    except ImportError:
        return None
    logging.getLogger("transformers").setLevel(logging.ERROR)
    common = dict(
        vocab_size=size["vocab_size"], hidden_size=size["d_model"], num_hidden_layers=size["n_layers"],
        state_size=size["d_state"],
    )  # fmt: skip
    if ssm == "mamba1":
        return transformers.MambaForCausalLM(transformers.MambaConfig(**common)).to(device)
    heads = 2 * size["d_model"] // size["headdim"]
    cfg = transformers.Mamba2Config(
        **common, num_heads=heads, head_dim=size["headdim"], n_groups=1, chunk_size=256
    )
    return transformers.Mamba2ForCausalLM(cfg).to(device)


def bench_lms(device: str, batch: int, lengths: list[int], reps: int, peer_lengths: list[int]) -> list[dict]:
    rows = []
    if device == "cuda":
        kernels = ["auto", "torch"]
    else:
        kernels = ["cpu", "torch"] if ops.cpu_unavailable_reason() is None else ["torch"]
    for name, size in SIZES.items():
        for ssm in ("mamba1", "mamba2"):
            for L in lengths:
                ids = torch.randint(0, size["vocab_size"], (batch, L), device=device)
                for kernel in kernels:
                    cfg = LanguageConfig(**size, ssm=ssm, kernel=kernel, chunk_size=256)
                    torch.manual_seed(0)
                    model = LanguageMamba(cfg).to(device).train()
                    precisions = ["fp32", "bf16-autocast"] if device == "cuda" else ["fp32"]
                    for prec in precisions:
                        t = timed(lm_step_fn(model, ids, prec != "fp32"), reps, device)
                        rows.append(dict(section="lm", size=name, ssm=ssm, L=L, batch=batch, impl=f"vlm_mamba[{kernel}]",
                                         precision=prec, **t))  # fmt: skip
                peer = L in peer_lengths
                if peer:
                    hf = hf_peer(ssm, size, device)
                    if hf is not None:
                        t = timed(hf_step_fn(hf.train(), ids), reps, device)
                        rows.append(dict(section="lm", size=name, ssm=ssm, L=L, batch=batch,
                                         impl="transformers (own PyTorch path)", precision="fp32", **t))  # fmt: skip
                print_rows(rows[-(len(kernels) * (2 if device == "cuda" else 1) + (1 if peer else 0)) :])
    return rows


def autograd_loop_scan(u, delta, A, B, C, D):
    """The time loop before the hand-written backward (the peer of ``T.selective_scan_loop``):
    the same one fused multiply-add per step, with autograd recording every step."""
    _, dA, dBu = T._scan_inputs(u, delta, A, B, None, False)
    h, states = dA.new_zeros(dA.shape[1:]), []
    for a_t, x_t in zip(dA.unbind(0), dBu.unbind(0)):
        h = torch.addcmul(x_t, a_t, h)
        states.append(h)
    return T._scan_output(torch.stack(states), u, C, D, None, u.shape[1])


def conv1d_depthwise(x, w, bias):
    """The conv before the shifted multiply-adds (the peer of ``T.causal_conv1d_torch``)."""
    return F.silu(F.conv1d(F.pad(x, (w.shape[1] - 1, 0)), w[:, None, :], bias, groups=w.shape[0]))


def bench_scans(
    device: str, batch: int, lengths: list[int], reps: int, ref_max_len: int, e: int = 512, n: int = 16
) -> list[dict]:
    """Scan shapes, by default the small LM's: Mamba-1 (b, e=512, n=16), Mamba-2 (b, h=8, p=64, n=16);
    the Mamba-1 rows and the conv rows take ``e`` channels and ``n`` states (the demo LM: 256, 8)."""
    rows = []
    b, h, p = batch, 8, 64
    for L in lengths:
        g = torch.Generator(device=device).manual_seed(0)
        r = lambda *s, g=g: torch.randn(*s, device=device, generator=g)
        m1 = [
            r(b, e, L),
            r(b, e, L) * 0.1,
            -torch.rand(e, n, device=device, generator=g),
            r(b, n, L),
            r(b, n, L),
            r(e),
        ]
        m2 = [
            r(b, L, h, p),
            r(b, L, h) * 0.1,
            -torch.rand(h, device=device, generator=g),
            r(b, L, 1, n),
            r(b, L, 1, n),
        ]
        compiled = {}
        if device == "cpu" and ops.cpu_unavailable_reason() is None:
            compiled["compiled CPU kernel (chosen)"] = lambda u, d, A, B, C, D: K.selective_scan_cpu(
                u, d, A, B, C, D
            )
        impls = {
            "mamba1": {
                **compiled,
                "torch loop (PyTorch path)": lambda u, d, A, B, C, D: T.selective_scan_loop(u, d, A, B, C, D),
                "torch loop, autograd backward": autograd_loop_scan,
                "torch chunked doubling scan": lambda u, d, A, B, C, D: T.selective_scan_chunked(
                    u, d, A, B, C, D
                ),
                "sequential reference": lambda u, d, A, B, C, D: R.selective_scan_ref(u, d, A, B, C, D),
            },
            "mamba2": {
                "torch SSD chunked (chosen)": lambda x, dt, A, B, C: T.ssd_chunked(x, dt, A, B, C, 256),
                "torch loop": lambda x, dt, A, B, C: T.ssd_loop(x, dt, A, B, C, 256),
                "sequential reference": lambda x, dt, A, B, C: R.ssd_chunk_scan_ref(x, dt, A, B, C, 256),
            },
        }
        for ssm, inputs in (("mamba1", m1), ("mamba2", m2)):
            for impl, fn in impls[ssm].items():
                if impl == "sequential reference" and L > ref_max_len:
                    continue

                def run(fn=fn, inputs=inputs):
                    leaves = [t.detach().requires_grad_(True) for t in inputs]
                    fn(*leaves).sum().backward()

                t = timed(run, reps, device)
                rows.append(
                    dict(section="scan", ssm=ssm, L=L, batch=b, impl=impl, precision="fp32", **t)
                    | ({"e": e, "n": n} if ssm == "mamba1" else {})
                )
            print_rows([r for r in rows if r["L"] == L and r["ssm"] == ssm])
        conv_in = [r(b, e, L), r(e, 4), r(e)]
        for impl, fn in (
            ("shifted multiply-adds (chosen)", lambda x, w, bias: T.causal_conv1d_torch(x, w, bias)),
            ("F.conv1d depthwise", conv1d_depthwise),
        ):

            def run(fn=fn, conv_in=conv_in):
                leaves = [t.detach().requires_grad_(True) for t in conv_in]
                fn(*leaves).sum().backward()

            rows.append(
                dict(
                    section="conv",
                    ssm="-",
                    L=L,
                    batch=b,
                    e=e,
                    impl=impl,
                    precision="fp32",
                    **timed(run, reps, device),
                )
            )
        print_rows(rows[-2:])
    return rows


def print_rows(rows: list[dict]) -> None:
    for r in rows:
        what = f"{r.get('size', 'scan'):>5} {r['ssm']:<6} b={r['batch']} L={r['L']:<4}"
        print(
            f"{r['section']:<4} {what} {r['impl']:<34} {r['precision']:<13} {r['ms']:9.1f} ms "
            f"(median {r['ms_median']:.1f})",
            flush=True,
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lengths", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--scan-lengths", type=int, nargs="+", default=[64, 128, 256])
    ap.add_argument("--scan-channels", type=int, default=512, help="Mamba-1 scan/conv channels e")
    ap.add_argument("--scan-state", type=int, default=16, help="Mamba-1 scan state size n")
    ap.add_argument("--no-lm", action="store_true", help="only the scan and conv sections")
    ap.add_argument("--ref-max-len", type=int, default=64, help="skip the slow reference above this length")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument(
        "--threads", type=int, default=None,
        help="torch CPU threads (default: torch's). 1 is steadier when other jobs share the cores: with 2 "
        "threads under contention OpenMP barriers stalled a 40 ms step to 1.5 s",
    )  # fmt: skip
    ap.add_argument("--no-peer", action="store_true", help="skip transformers' models")
    ap.add_argument("--peer-lengths", type=int, nargs="+", default=[64], help="lengths to run the peer at")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/bench_lm[_cuda].json)")
    args = ap.parse_args()
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {args.device}", flush=True)
    load_start = os.getloadavg()
    rows = (
        []
        if args.no_lm
        else bench_lms(
            args.device, args.batch, args.lengths, args.reps, [] if args.no_peer else args.peer_lengths
        )
    )
    rows += bench_scans(
        args.device,
        args.batch,
        args.scan_lengths,
        args.reps,
        args.ref_max_len,
        args.scan_channels,
        args.scan_state,
    )
    meta = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name()
        if args.device == "cuda"
        else platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "load_average_start_end": [load_start, os.getloadavg()],  # other jobs on a shared CPU inflate ms
        "reps": args.reps,
        "sizes": SIZES,
        "note": "ms = min (ms_median = median) wall time of one forward+backward (LMs: loss.backward; scans: sum().backward)",
    }
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / (
        "bench_lm.json" if args.device == "cpu" else "bench_lm_cuda.json"
    )  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""Speed and memory of VLMamba against a parameter-matched attention VLM (``peer_transformer.py``).

The project's original description claimed "40% memory reduction" and "2.3x faster on long
sequences" against an equivalent Transformer VLM without measuring either; this script measures.

    python benchmarks/bench_vlm.py --quick                        # CPU, tiny + demo, < 2 minutes
    python benchmarks/bench_vlm.py --size base --device cuda      # GPU (~2-4 minutes on an H100, est.)

For each size it builds VLMamba (``create_model``) and the peer (ViT + BridgerFFN + causal
Transformer decoder, same widths and vocabulary, layer counts chosen so parameter counts match
within ~5%), then measures, for each batch size:

1. training step: forward (with labels) + backward, at each text length; median time, peak memory,
   tokens/s over the whole [image][text] sequence;
2. prefill: ``generate(..., max_new_tokens=1)`` with a prompt of each text length (image encoding +
   prompt prefill + the first token); median time and peak memory;
3. decoding: ``generate`` of each number of new tokens after each prompt length, greedy, no EOS:
   total time, tokens/s, peak memory, the size of the decoding state (the peer's KV cache grows
   with the length, Mamba's state does not) and the per-token latency, from per-step timestamps
   of the longest run.

Timing: warm-up runs, then the median of ``--repeat`` runs; CUDA runs are timed with CUDA events
and bf16 autocast. Memory is the model's weights plus the peak allocated during the call above
what was allocated before it (``torch.cuda.max_memory_allocated``); on CPU it is the peak of live
tensor bytes traced by :class:`LiveTensorPeak` in a separate untimed run. Both models run eager
(no ``torch.compile``, no CUDA graphs). A case that runs out of memory is recorded as ``OOM``; a
time budget (``--time-budget``) skips what is left rather than overrun.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.metadata
import json
import os
import platform
import re
import statistics
import sys
import time
import traceback
import weakref
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from peer_transformer import KVCache, build_peer, match_peer_config  # noqa: E402

from vlm_mamba import create_model, get_config, list_models  # noqa: E402
from vlm_mamba.ops import cuda_unavailable_reason, kernel_family  # noqa: E402

MiB = 2**20
RESULTS = Path(__file__).resolve().parent / "results"


# ----------------------------------------------------------------------------------- the plan
@dataclass
class Plan:
    """What to measure. ``gpu()`` fits one H100 run of the base size in ~2-4 minutes."""

    sizes: list[str]
    lengths: list[int]
    batches: list[int]
    decode_lengths: list[int]
    prompt_lens: list[int]
    warmup: int
    repeat: int
    gen_repeat: int
    time_budget_s: float
    threads: int | None = None  # CPU threads for torch (None: torch's default)
    sections: list[str] = field(default_factory=lambda: ["train", "prefill", "decode"])

    @classmethod
    def gpu(cls) -> Plan:
        return cls(["base"], [64, 256, 1024, 2048], [1, 8], [32, 128, 512], [32, 1024], 2, 5, 2, 220.0)

    @classmethod
    def cpu(cls) -> Plan:
        return cls(["demo"], [32, 128, 512], [1, 4], [16, 64, 256], [8, 512], 1, 3, 2, 600.0)

    @classmethod
    def quick(cls) -> Plan:
        # one thread: on a shared 2-core machine two threads spin against other processes
        return cls(["tiny", "demo"], [32, 128], [1, 4], [16, 64], [8, 128], 1, 3, 2, 110.0, threads=1)


# ----------------------------------------------------------------------------------- measuring
class Probe:
    """Timing and peak memory on one device (CUDA: events and the caching allocator's counters)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def mark(self) -> Any:
        """A timestamp: a recorded CUDA event, or perf_counter seconds on CPU."""
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def ms(self, a: Any, b: Any) -> float:
        """Milliseconds between two marks (call after ``sync``)."""
        return a.elapsed_time(b) if self.cuda else (b - a) * 1e3

    def time_ms(self, fn: Callable[[], Any], warmup: int, repeat: int) -> list[float]:
        for _ in range(warmup):
            fn()
        out = []
        for _ in range(repeat):
            self.sync()
            a = self.mark()
            fn()
            b = self.mark()
            self.sync()
            out.append(self.ms(a, b))
        return out

    def peak_bytes(self, fn: Callable[[], Any], model: nn.Module) -> int | None:
        """Weights of ``model`` + the peak allocated by one call of ``fn`` above what was live before it."""
        weights = model_bytes(model)
        if self.cuda:
            self.sync()
            before = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            fn()
            self.sync()
            return weights + torch.cuda.max_memory_allocated(self.device) - before
        tracer = LiveTensorPeak()
        with tracer:
            fn()
        return weights + tracer.peak


class LiveTensorPeak(TorchDispatchMode):
    """CPU stand-in for ``torch.cuda.max_memory_allocated``: the peak of live bytes allocated by ops.

    Every op's output whose storage is new (not one of the op's inputs' storages, so views and
    in-place results do not count) is added when it appears and removed when its storage is freed
    (a weakref callback; torch keeps one Python object per live storage). Storages allocated
    before entering (weights, inputs) are not counted. torch's own ``MemTracker`` does the same
    but refuses modules called more than once per pass, which VLMamba's generation does.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._refs: dict[int, weakref.ref] = {}

    def _free(self, key: int, nbytes: int) -> None:
        self._refs.pop(key, None)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {
            id(t.untyped_storage()) for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)
        }
        for t in pytree.tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            st = t.untyped_storage()
            key, nbytes = id(st), st.nbytes()
            if key in inputs or key in self._refs or nbytes == 0:
                continue
            self._refs[key] = weakref.ref(st, lambda _, k=key, n=nbytes: self._free(k, n))
            self.live += nbytes
            self.peak = max(self.peak, self.live)
        return out


def model_bytes(model: nn.Module) -> int:
    tensors = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def median(xs: list[float]) -> float:
    return statistics.median(xs)


class StepClock:
    """Timestamps around each ``step`` call of ``owner`` (an instance attribute shadows the method).

    The decoding loop reads ``owner.step`` at every token (VLMamba's through ``model.language``, the
    peer's through itself), so the marks bracket every decoded token, the argmax and the loop's
    bookkeeping between steps included.
    """

    def __init__(self, owner: nn.Module, probe: Probe) -> None:
        self.owner, self.probe = owner, probe
        self.before: list[Any] = []
        self.after: list[Any] = []
        self.state_bytes: int | None = None  # the decoding state after the last step

    def __enter__(self) -> StepClock:
        inner = self.owner.step

        def timed_step(*args, **kwargs):
            self.before.append(self.probe.mark())
            out = inner(*args, **kwargs)
            self.after.append(self.probe.mark())
            self.state_bytes = state_nbytes(out)
            return out

        self.owner.step = timed_step
        return self

    def __exit__(self, *exc) -> None:
        del self.owner.step  # the class method shows through again

    def latencies_ms(self) -> list[float]:
        """Per decoded token after the first: previous step end (or this step's start) -> step end."""
        out = []
        for i, end in enumerate(self.after):
            out.append(self.probe.ms(self.after[i - 1] if i else self.before[0], end))
        return out


def state_nbytes(step_out: Any) -> int:
    """Bytes of the state a ``step`` returned: the peer's KV cache (allocated capacity) or VLMamba's
    per-layer conv windows + SSM states."""
    state = step_out[1] if isinstance(step_out, tuple) else step_out.state
    if isinstance(state, KVCache):
        return state.nbytes()
    return sum(t.numel() * t.element_size() for layer in state for t in (layer.conv, layer.ssm))


# ----------------------------------------------------------------------------------- subjects
@dataclass
class Subject:
    """One model under test and how to drive it."""

    name: str
    model: nn.Module
    step_owner: nn.Module  # the module whose ``.step`` decodes one token
    counts: dict[str, int]

    def train_step(self, images, ids, labels, amp) -> None:
        self.model.zero_grad(set_to_none=True)
        with amp():
            loss = self.model(images, ids, labels=labels).loss
        loss.backward()

    def generate(self, images, prompt, n_new, amp) -> torch.Tensor:
        with amp():
            return self.model.generate(images, prompt, max_new_tokens=n_new, eos_token_id=None)


def build_subjects(size: str, device: torch.device, seed: int = 0) -> tuple[list[Subject], dict]:
    cfg = get_config(size)
    torch.manual_seed(seed)
    with torch.device(device):  # built in place (fast on a GPU); .to() catches anything made elsewhere
        mamba = create_model(size).to(device)
    m_counts = mamba.num_parameters()
    n_vis, n_lang = match_peer_config(cfg, m_counts)
    torch.manual_seed(seed)
    peer = build_peer(cfg, n_vis, n_lang, device=device).to(device)
    p_counts = peer.num_parameters()
    subjects = [
        Subject("vlmamba", mamba, mamba.language, m_counts),
        Subject("transformer", peer, peer, p_counts),
    ]
    info = {
        "vlmamba_config": cfg.to_dict(),
        "transformer_config": peer.cfg.to_dict(),
        "parameters": {"vlmamba": m_counts, "transformer": p_counts},
        "parameter_ratio_transformer_over_vlmamba": p_counts["total"] / m_counts["total"],
        "image_tokens": cfg.vision.num_patches,
        "vlmamba_layers": {"vision": cfg.vision.n_layers, "language": cfg.language.n_layers},
        "transformer_layers": {"vision": n_vis, "language": n_lang},
    }
    return subjects, info


def peer_self_check(device: torch.device) -> float:
    """The peer's decoding is right (tiny config, fp32, on ``device``): cached steps equal the full
    forward under teacher forcing, and ``generate`` returns the forward's greedy tokens. Returns the
    largest logit gap (NaN when only the greedy tokens differ)."""
    cfg = get_config("tiny")
    torch.manual_seed(0)
    peer = build_peer(cfg, 2, 2, device=device).eval()
    img = torch.randn(2, 3, cfg.vision.img_size, cfg.vision.img_size, device=device)
    ids = torch.randint(0, cfg.language.vocab_size, (2, 9), device=device)
    with torch.no_grad():
        full = peer(img, ids).logits  # (2, 9, V)
        x = torch.cat([peer.encode_images(img), peer.embedding(ids[:, :4])], 1)  # (2, p+4, d)
        cache = KVCache(len(peer.layers), x.shape[1] + 5)
        h = peer._decode(x, cache, 0)
        cache.pos = x.shape[1]
        steps = [peer._logits(h[:, -1])]
        for i in range(4, 8):
            logits, cache = peer.step(ids[:, i], cache)
            steps.append(logits)
        gen = peer.generate(img, ids[:, :4], max_new_tokens=5)  # (2, 5)
        greedy = peer(img, torch.cat([ids[:, :4], gen], 1)).logits.argmax(-1)[:, 3:8]  # (2, 5)
    gap = float((torch.stack(steps, 1) - full[:, 3:8]).abs().max())
    if gap > 1e-3:
        raise RuntimeError(f"peer self-check failed: cached decoding differs from the forward by {gap:.3g}")
    if not torch.equal(gen, greedy):  # a near-tie of random logits could flip: warn, do not abort the run
        print("WARNING: peer self-check: generate() differs from the forward's greedy tokens", flush=True)
        return float("nan")
    return gap


# ----------------------------------------------------------------------------------- the runs
class Runner:
    def __init__(self, plan: Plan, device: torch.device, precision: str) -> None:
        self.plan, self.device = plan, device
        self.probe = Probe(device)
        self.amp_dtype = torch.bfloat16 if precision == "bf16" else None
        self.records: list[dict] = []
        self.t0 = time.perf_counter()
        self.deadline = float("inf")
        self.errors = 0

    def amp(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def set_deadline(self, units_left: int) -> None:
        """Give the next (size, section) unit an equal share of the budget left (unused time rolls on)."""
        if self.plan.time_budget_s <= 0:
            self.deadline = float("inf")
            return
        left = self.t0 + self.plan.time_budget_s - time.perf_counter()
        self.deadline = time.perf_counter() + max(left, 0.0) / max(units_left, 1)

    def over_budget(self) -> bool:
        return time.perf_counter() > self.deadline

    def clean(self, subjects: list[Subject]) -> None:
        for s in subjects:
            s.model.zero_grad(set_to_none=True)
        gc.collect()
        if self.probe.cuda:
            torch.cuda.empty_cache()

    def guarded(self, rec: dict, fn: Callable[[], dict], subjects: list[Subject]) -> None:
        """Run one measurement into ``rec``: OOM and other errors are recorded, not raised."""
        if self.over_budget():
            rec["skipped"] = (
                f"this section's share of the {self.plan.time_budget_s:.0f} s time budget was used up"
            )
        else:
            try:
                rec.update(fn())
            except torch.OutOfMemoryError:
                rec["error"] = "OOM"
            except Exception as err:  # recorded and counted: the run exits non-zero at the end
                rec["error"] = f"{type(err).__name__}: {err}"
                self.errors += 1
                traceback.print_exc()
        self.clean(subjects)
        self.records.append(rec)
        status = rec.get("error") or rec.get("skipped") or f"{rec.get('median_ms', float('nan')):.2f} ms"
        print(
            f"  {rec['section']:<8} {rec['model']:<12} b={rec['batch']:<3} "
            f"{'length' if rec['section'] != 'decode' else 'prompt+new'}={case_label(rec)}: {status}",
            flush=True,
        )

    def inputs(self, cfg: dict, b: int, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator(device="cpu").manual_seed(1000 * b + t)
        s = cfg["vision"]["img_size"]
        images = torch.randn(b, 3, s, s, generator=g).to(self.device)
        ids = torch.randint(0, cfg["language"]["vocab_size"], (b, t), generator=g).to(self.device)
        return images, ids

    def cases(self) -> list[tuple[int, int]]:
        """(batch, length) pairs, fewest tokens first: a budget cut drops the largest cases."""
        return sorted(
            ((b, t) for b in self.plan.batches for t in self.plan.lengths), key=lambda c: (c[0] * c[1], c)
        )

    # ------------------------------------------------------------------ 1. training step
    def train(self, size: str, subjects: list[Subject], info: dict) -> None:
        p = info["image_tokens"]
        for b, t in self.cases():
            images, ids = self.inputs(info["vlmamba_config"], b, t)
            for s in subjects:
                s.model.train()

                def measure(s=s, images=images, ids=ids, b=b, t=t):
                    step = lambda: s.train_step(images, ids, ids, self.amp)
                    times = self.probe.time_ms(step, self.plan.warmup, self.plan.repeat)
                    s.model.zero_grad(set_to_none=True)
                    peak = self.probe.peak_bytes(step, s.model)
                    med = median(times)
                    return {"times_ms": times, "median_ms": med, "peak_bytes": peak,
                            "tokens_per_s": b * (p + t) / (med / 1e3)}  # fmt: skip

                rec = {"section": "train", "size": size, "model": s.name, "batch": b, "length": t}
                self.guarded(rec, measure, subjects)

    # ------------------------------------------------------------------ 2. prefill
    def prefill(self, size: str, subjects: list[Subject], info: dict) -> None:
        for b, t in self.cases():
            images, ids = self.inputs(info["vlmamba_config"], b, t)
            for s in subjects:
                s.model.eval()

                def measure(s=s, images=images, ids=ids, b=b, t=t):
                    run = lambda: s.generate(images, ids, 1, self.amp)
                    times = self.probe.time_ms(run, self.plan.warmup, self.plan.repeat)
                    med = median(times)
                    return {"times_ms": times, "median_ms": med,
                            "peak_bytes": self.probe.peak_bytes(run, s.model),
                            "tokens_per_s": b * (info["image_tokens"] + t) / (med / 1e3)}  # fmt: skip

                rec = {"section": "prefill", "size": size, "model": s.name, "batch": b, "length": t}
                self.guarded(rec, measure, subjects)

    # ------------------------------------------------------------------ 3. decoding
    def decode(self, size: str, subjects: list[Subject], info: dict) -> None:
        ns = sorted(self.plan.decode_lengths)
        for b, plen in sorted(
            ((b, q) for b in self.plan.batches for q in self.plan.prompt_lens), key=lambda c: (c[0] * c[1], c)
        ):
            images, prompt = self.inputs(info["vlmamba_config"], b, plen)
            for s in subjects:
                s.model.eval()
                curves: list[list[float]] = []
                for n in ns:

                    def measure(s=s, images=images, prompt=prompt, b=b, n=n, curves=curves):
                        s.generate(images, prompt, min(n, 8), self.amp)  # warm-up (kernels, autotune)
                        if self.probe.cuda:  # peak over the timed runs: nothing outlives a generate call
                            self.probe.sync()
                            before = torch.cuda.memory_allocated(self.device)
                            torch.cuda.reset_peak_memory_stats(self.device)
                        totals, state_bytes = [], None
                        for _ in range(self.plan.gen_repeat):
                            with StepClock(s.step_owner, self.probe) as clock:
                                self.probe.sync()
                                a = self.probe.mark()
                                out = s.generate(images, prompt, n, self.amp)
                                z = self.probe.mark()
                                self.probe.sync()
                            if out.shape != (b, n):
                                raise RuntimeError(f"generate returned {tuple(out.shape)}, expected {(b, n)}")
                            totals.append(self.probe.ms(a, z))
                            state_bytes = clock.state_bytes
                            if n == ns[-1]:
                                curves.append(clock.latencies_ms())
                        if self.probe.cuda:
                            peak = (
                                model_bytes(s.model) + torch.cuda.max_memory_allocated(self.device) - before
                            )
                        else:  # traced in a separate, untimed run
                            peak = self.probe.peak_bytes(
                                lambda: s.generate(images, prompt, n, self.amp), s.model
                            )
                        med = median(totals)
                        return {"times_ms": totals, "median_ms": med, "peak_bytes": peak,
                                "state_bytes": state_bytes, "tokens_per_s": b * n / (med / 1e3)}  # fmt: skip

                    rec = {"section": "decode", "size": size, "model": s.name, "batch": b,
                           "prompt_len": plen, "new_tokens": n}  # fmt: skip
                    self.guarded(rec, measure, subjects)
                if curves:  # per-token latency along the longest run: element-wise median over repeats
                    curve = [median(xs) for xs in zip(*curves)]
                    self.records.append({"section": "decode_curve", "size": size, "model": s.name,
                                         "batch": b, "prompt_len": plen,
                                         "latency_ms_per_step": curve,
                                         "window_median_ms": window_medians(curve, ns)})  # fmt: skip


def window_medians(curve: list[float], ns: list[int]) -> dict[str, float]:
    """Median per-token latency over the tokens (n/2, n] for each n in ``ns`` (step i makes token i+2)."""
    out = {}
    for n in ns:
        lo, hi = max(n // 2 - 1, 0), min(n - 1, len(curve))
        if hi > lo:
            out[str(n)] = median(curve[lo:hi])
    return out


# ----------------------------------------------------------------------------------- reporting
def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def environment(device: torch.device, precision: str) -> dict:
    def version(pkg: str) -> str | None:
        try:
            return importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            return None

    env = {
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "cpu_count": os.cpu_count(),
        "load_average_1_5_15min": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "mamba_ssm": version("mamba-ssm") or version("mamba_ssm"),
        "causal_conv1d": version("causal-conv1d") or version("causal_conv1d"),
        "kernel_family": kernel_family(device=device),
        "cuda_kernels_unavailable_reason": cuda_unavailable_reason() if device.type == "cuda" else None,
        "precision": "bf16 autocast" if precision == "bf16" else "fp32",
        "vlm_mamba_kernel_env": os.environ.get("VLM_MAMBA_KERNEL"),
    }
    if device.type == "cuda":
        env["sdpa_flash_enabled"] = torch.backends.cuda.flash_sdp_enabled()
        env["gpu_memory_bytes"] = torch.cuda.get_device_properties(device).total_memory
    return env


def case_key(rec: dict) -> tuple[int, ...]:
    """Train/prefill: (text length,); decode: (prompt length, new tokens)."""
    return (rec["length"],) if "length" in rec else (rec["prompt_len"], rec["new_tokens"])


def case_label(rec: dict) -> str:
    return "+".join(str(v) for v in case_key(rec))


def paired_rows(records: list[dict]) -> list[dict]:
    """One row per (section, size, batch, length) and metric, with both models and the ratio."""
    by_key: dict[tuple, dict[str, dict]] = {}
    for r in records:
        if r["section"] == "decode_curve":
            continue
        key = (r["section"], r["size"], r["batch"], case_label(r))
        by_key.setdefault(key, {})[r["model"]] = r
    rows = []
    metrics = {
        "median_ms": "ms",
        "peak_bytes": "peak MiB",
        "state_bytes": "state MiB",
        "tokens_per_s": "tokens/s",
    }
    for (section, size, b, n), pair in by_key.items():
        for metric, label in metrics.items():
            m, p = pair.get("vlmamba", {}), pair.get("transformer", {})
            mv, pv = m.get(metric), p.get(metric)
            if metric == "state_bytes" and section != "decode":
                continue
            rows.append({
                "section": section, "size": size, "batch": b, "length": n, "metric": label,
                "vlmamba": _show(m, metric), "transformer": _show(p, metric),
                "ratio": mv / pv if isinstance(mv, (int, float)) and isinstance(pv, (int, float)) and pv else None,
            })  # fmt: skip
    return rows


def _show(rec: dict, metric: str) -> str:
    if "error" in rec or "skipped" in rec:
        return rec.get("error") or "skipped"
    v = rec.get(metric)
    if v is None:
        return "n/a"
    if metric == "peak_bytes":
        return f"{v / MiB:.1f}"
    if metric == "state_bytes":
        return f"{v / MiB:.3f}"
    if metric == "tokens_per_s":
        return f"{v:,.0f}"
    return f"{v:.2f}"


def print_tables(records: list[dict], env: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=140)
    titles = {
        "train": "training step (forward + backward), length = text tokens after the image",
        "prefill": "prefill (generate 1 token), length = prompt tokens after the image",
        "decode": "decoding (generate), length = prompt + new tokens; ms = the whole call, prefill included",
    }
    rows = paired_rows(records)
    for section, title in titles.items():
        sec = [r for r in rows if r["section"] == section]
        if not sec:
            continue
        table = Table(title=f"{title} [{env['device_name']}, {env['precision']}]", title_justify="left")
        for col in ("size", "batch", "length", "metric", "VLMamba", "Transformer", "Mamba/peer"):
            table.add_column(col, justify="right")
        for r in sec:
            ratio = f"{r['ratio']:.2f}" if r["ratio"] is not None else "-"
            table.add_row(r["size"], str(r["batch"]), str(r["length"]), r["metric"], r["vlmamba"],
                          r["transformer"], ratio)  # fmt: skip
        console.print(table)
    curves = [r for r in records if r["section"] == "decode_curve"]
    if curves:
        table = Table(
            title="per-token decode latency (ms), median over new tokens (n/2, n] of the longest run",
            title_justify="left",
        )
        for col in ("size", "batch", "prompt", "new tokens n", "VLMamba", "Transformer", "Mamba/peer"):
            table.add_column(col, justify="right")
        pairs: dict[tuple, dict] = {}
        for c in curves:
            pairs.setdefault((c["size"], c["batch"], c["prompt_len"]), {})[c["model"]] = c["window_median_ms"]
        for (size, b, plen), pair in pairs.items():
            m, p = pair.get("vlmamba", {}), pair.get("transformer", {})
            for n in sorted(set(m) | set(p), key=int):
                ratio = f"{m[n] / p[n]:.2f}" if n in m and n in p and p[n] else "-"
                table.add_row(size, str(b), str(plen), n, _fmt(m.get(n)), _fmt(p.get(n)), ratio)
        console.print(table)
    console.print(
        "Mamba/peer < 1: VLMamba is faster (ms) or smaller (MiB); > 1 for tokens/s: VLMamba is faster."
    )


def claims(records: list[dict]) -> list[dict]:
    """The seed's two claims, checked at the largest batch and longest length measured per size:
    "40% memory reduction" (1 - VLMamba peak / Transformer peak) and "2.3x faster on long
    sequences" (Transformer ms / VLMamba ms), for training, prefill and the whole decode call."""
    out = []
    for section in ("train", "prefill", "decode"):
        recs = [r for r in records if r["section"] == section and "median_ms" in r]
        for size in dict.fromkeys(r["size"] for r in recs):
            mine = [r for r in recs if r["size"] == size]
            b = max(r["batch"] for r in mine)
            n = max(case_key(r) for r in mine if r["batch"] == b)
            pair = {r["model"]: r for r in mine if r["batch"] == b and case_key(r) == n}
            if set(pair) != {"vlmamba", "transformer"}:
                continue
            m, p = pair["vlmamba"], pair["transformer"]
            row = {"section": section, "size": size, "batch": b, "length": "+".join(map(str, n)),
                   "speedup_transformer_ms_over_vlmamba_ms": p["median_ms"] / m["median_ms"]}  # fmt: skip
            if m.get("peak_bytes") and p.get("peak_bytes"):
                row["memory_reduction_1_minus_vlmamba_over_transformer"] = (
                    1 - m["peak_bytes"] / p["peak_bytes"]
                )
            out.append(row)
    return out


def print_claims(rows: list[dict]) -> None:
    for r in rows:
        mem = r.get("memory_reduction_1_minus_vlmamba_over_transformer")
        mem_s = f"memory reduction {mem:+.0%}" if mem is not None else "memory n/a"
        print(f"claims check [{r['size']} {r['section']} b={r['batch']} length={r['length']}]: "
              f"VLMamba speedup {r['speedup_transformer_ms_over_vlmamba_ms']:.2f}x "
              f"(claimed 2.3x), {mem_s} (claimed 40%)")  # fmt: skip


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def default_out(env: dict) -> Path:
    slug = (
        "cpu" if env["device"] == "cpu" else re.sub(r"[^a-z0-9]+", "_", env["device_name"].lower()).strip("_")
    )
    return RESULTS / f"bench_vlm_{slug}.json"


# ----------------------------------------------------------------------------------- CLI
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    ap.add_argument("--size", nargs="+", help="registry sizes (default: base on CUDA, demo on CPU)")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    ap.add_argument("--lengths", nargs="+", type=int, help="text lengths for training and prefill")
    ap.add_argument("--batch", nargs="+", type=int, help="batch sizes")
    ap.add_argument("--decode-lengths", nargs="+", type=int, help="numbers of new tokens to generate")
    ap.add_argument("--prompt-lens", nargs="+", type=int, help="prompt tokens before decoding (one run each)")
    ap.add_argument("--warmup", type=int)
    ap.add_argument("--repeat", type=int, help="timed runs per training/prefill case (median reported)")
    ap.add_argument("--gen-repeat", type=int, help="timed runs per decoding case")
    ap.add_argument("--sections", nargs="+", choices=["train", "prefill", "decode"])
    ap.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                    help="auto: bf16 autocast on CUDA, fp32 on CPU")  # fmt: skip
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's; --quick: 1)")
    ap.add_argument("--time-budget", type=float, help="seconds; cases after it are skipped (0 = none)")
    ap.add_argument(
        "--quick", action="store_true", help="tiny + demo, short lengths: a CPU run in < 2 minutes"
    )
    ap.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/bench_vlm_<device>.json)")
    return ap.parse_args(argv)


def make_plan(args: argparse.Namespace, device: torch.device) -> Plan:
    plan = Plan.quick() if args.quick else Plan.gpu() if device.type == "cuda" else Plan.cpu()
    for arg, attr in (("size", "sizes"), ("lengths", "lengths"), ("batch", "batches"),
                      ("decode_lengths", "decode_lengths"), ("prompt_lens", "prompt_lens"), ("warmup", "warmup"),
                      ("repeat", "repeat"), ("gen_repeat", "gen_repeat"), ("sections", "sections"),
                      ("time_budget", "time_budget_s"), ("threads", "threads")):  # fmt: skip
        if getattr(args, arg) is not None:
            setattr(plan, attr, getattr(args, arg))
    checks = {"--lengths": plan.lengths, "--batch": plan.batches, "--decode-lengths": plan.decode_lengths,
              "--prompt-lens": plan.prompt_lens, "--repeat": [plan.repeat], "--gen-repeat": [plan.gen_repeat]}  # fmt: skip
    for flag, values in checks.items():
        if any(v < 1 for v in values):
            raise SystemExit(f"{flag}: values must be >= 1, got {values}")
    unknown = [z for z in plan.sizes if z not in list_models()]
    if unknown:
        raise SystemExit(f"--size: unknown {unknown}; registered sizes: {list_models()}")
    if plan.warmup < 0:
        raise SystemExit(f"--warmup must be >= 0, got {plan.warmup}")
    return plan


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    dev = args.device
    if dev == "auto":
        dev = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(dev)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: CUDA is not available here")
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    precision = args.precision if args.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    plan = make_plan(args, device)
    if plan.threads is not None:
        torch.set_num_threads(plan.threads)
    env = environment(device, precision)
    print(f"bench_vlm: {env['device_name']} | torch {env['torch']} | kernels {env['kernel_family']} "
          f"(mamba_ssm {env['mamba_ssm']}) | {env['precision']}", flush=True)  # fmt: skip
    check_gap = peer_self_check(device)
    runner = Runner(plan, device, precision)
    models: dict[str, dict] = {}
    units_left = len(plan.sizes) * len(plan.sections)
    for size in plan.sizes:
        subjects, info = build_subjects(size, device)
        models[size] = info
        pm, pp = info["parameters"]["vlmamba"]["total"], info["parameters"]["transformer"]["total"]
        print(f"[{size}] parameters: VLMamba {pm:,} | Transformer {pp:,} ({pp / pm - 1:+.1%}); layers "
              f"vision {info['vlmamba_layers']['vision']} Mamba vs {info['transformer_layers']['vision']} ViT, "
              f"language {info['vlmamba_layers']['language']} Mamba vs {info['transformer_layers']['language']} "
              f"Transformer; {info['image_tokens']} image tokens", flush=True)  # fmt: skip
        for section in plan.sections:
            runner.set_deadline(units_left)
            units_left -= 1
            getattr(runner, section)(size, subjects, info)
        del subjects
        runner.clean([])
    result = {
        "benchmark": "bench_vlm",
        "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "wall_s": time.perf_counter() - runner.t0,
        "environment": env,
        "plan": asdict(plan),
        "peer_self_check_max_abs_diff": check_gap,
        "models": models,
        "records": runner.records,
        "table": paired_rows(runner.records),
        "claims": claims(runner.records),
    }
    out = args.out or default_out(env)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(out)
    print_tables(runner.records, env)
    print_claims(result["claims"])
    print(f"wall time {result['wall_s']:.0f} s; results in {out}")
    if runner.errors:
        print(f"{runner.errors} case(s) failed with errors other than OOM (see 'error' in the JSON)")
    return 1 if runner.errors else 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The GPU benchmark suite: our paths against the reference a user would pick instead, in one process.

    python benchmarks/bench_gpu.py --quick                                   # CPU smoke, tiny sizes, ~2 min
    python benchmarks/bench_gpu.py --sections lm_vs_stock decode --time-budget 400 --out $OUT/a.json

Sections (``--sections``, run in this order; each case is recorded, skipped (budget, memory, a
missing package; the reason is written down) or failed (the error is written down)):

``lm_vs_stock``  ``LanguageMamba`` against mamba_ssm's ``MambaLMHeadModel`` with the same config
                 (Mamba-1 ``d_state=16``; Mamba-2 ``d_state=128, headdim=64``), equal parameter
                 counts: forward + backward at 32K tokens per step and T = 1K, 4K, 16K, bf16 autocast,
                 fp32 weights, loss ``logits.float().logsumexp(-1).mean()`` for both; unpadded, 1/8 of
                 each row right-padded (``attention_mask``; stock runs the same tensor unmasked), left-
                 padded, and ours with per-block activation checkpointing; prefill (one forward with the
                 state returned, head on the last position).
``arch``         the VLM against the ViT + transformer peer (``peer_transformer.py``: SDPA attention,
                 FlashAttention under bf16) on the same caption-like and VQA-like batches, full
                 training step with fused AdamW, each eager and ``torch.compile``d. Step breakdown
                 (vision / bridge / LM / head + loss / optimizer) from CUDA events at module hooks, top
                 kernels from ``torch.profiler``.
``arch_lm``      the language model alone against ``transformers``' ``LlamaForCausalLM`` (SDPA,
                 compiled), fused AdamW, T = 1K, 4K, 16K: ours with the plain head + fp32 cross-entropy
                 and with ``labels=`` (the fused chunked loss), Llama's plain head + CE (records under
                 section ``arch``, cases ``lm T=...``).
``lengths``      VLM vs peer training at total lengths 1K..64K (64K tokens per step, one image of p
                 tokens + L - p text tokens, every text token labelled, no padding): the crossover
                 length and the scaling exponent of the time per sequence.
``decode``       time to first token (prefill + first token) and inter-token latency, separately, for
                 ours, stock ``generate(cg=True)`` and Llama with a static KV cache decoded by a
                 hand-written CUDA-graph-captured step (checked against the HF forward), at batch
                 1/8/64/256 and context 1K/8K/32K within the memory budget; state vs KV-cache bytes;
                 the HBM bound (weights + state or KV bytes per token over the measured copy bandwidth).
``vision``       the vision encoders alone: images/s and peak memory at 224/448/896/1248 px,
                 forward + backward and forward only, ours vs the peer's ViT (position tables resized).
``vqa``          VQA-style generation at ``base``: the image-state cache against recomputing
                 [image][question] per question (and the peer, which always recomputes).

Counting: tokens/s counts every position a kernel processes (pads included); MFU is model FLOPs only,
6 x parameters x tokens/s for training and 2 x parameters x tokens/s for a forward, over 989 TFLOP/s
(the H100/H200 SXM bf16 dense datasheet figure; attention's FLOPs are not counted). Peak memory is
``torch.cuda.max_memory_allocated`` during the timed calls above what was live before them, plus the
model's weights (and optimizer state where there is one). Times: CUDA events, warm-up first, median.

One JSON per run goes to ``--out`` (default ``benchmarks/results/bench_gpu_<device>.json``), rewritten
after every section so a run cut short still leaves its rows; ``plot_gpu.py`` draws figures from it.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.metadata
import inspect
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_vlm import Probe, cpu_name, model_bytes, peer_self_check  # noqa: E402
from peer_transformer import PeerTransformerVLM, build_peer, match_peer_config  # noqa: E402
from records import latest_records  # noqa: E402

from vlm_mamba import create_model, get_config  # noqa: E402
from vlm_mamba.config import LanguageConfig  # noqa: E402
from vlm_mamba.generation import GenerationConfig, decode  # noqa: E402
from vlm_mamba.layers.patch_embed import interpolate_pos_embed  # noqa: E402
from vlm_mamba.models.language import LanguageMamba  # noqa: E402
from vlm_mamba.ops import cuda_unavailable_reason, kernel_family  # noqa: E402
from vlm_mamba.ops.triton_scan import STATE_SCAN_ENV  # noqa: E402

T_START = time.perf_counter()  # --time-budget counts from here: imports and set-up are in it
GiB = 2**30
SAMPLING = {
    "top_k": 50,
    "top_p": 0.9,
    "temperature": 0.7,
}  # the decode section's sampling rows (--decode-sampling)
PEAK_FLOPS = 989e12  # H100/H200 SXM bf16 dense, datasheet
RESULTS = Path(__file__).resolve().parent / "results"
SECTIONS = ("lm_vs_stock", "arch", "arch_lm", "lengths", "decode", "prefill", "vision", "vqa")
BATCH_KINDS = {
    "caption": "image + 20-40 text tokens (uniform), right padded to 40, every real token labelled",
    "vqa": "image + 8-16 prompt tokens + 1-3 answer tokens, right padded to 19, the answer labelled",
}
SECTION_WEIGHT = {
    "lm_vs_stock": 2.2,
    "arch": 1.6,
    "arch_lm": 0.8,
    "lengths": 1.0,
    "decode": 2.2,
    "prefill": 0.6,
    "vision": 0.6,
    "vqa": 0.3,
}


# ----------------------------------------------------------------------------------- the plan
@dataclass
class Plan:
    """Sizes per section. ``gpu()`` is the H100/H200 plan; ``quick()`` a CPU smoke of every path."""

    lm: dict  # LanguageMamba / MambaConfig shape: d_model, n_layers, vocab_size
    vlm_size: str
    lm_lengths: list[int]
    lm_tokens: int  # tokens per training step (lm_vs_stock, the Llama row)
    arch_batch: int
    lengths: list[int]
    lengths_tokens: int
    decode_batches: list[int]
    decode_contexts: list[int]
    decode_new: int
    decode_mamba2: list[tuple[int, int]]  # (batch, context) cases for Mamba-2
    vision_sizes: list[int]
    vision_patches: int  # patches per step (batch = this / patches per image)
    vqa_images: int
    vqa_questions: int
    prefill_batches: list[int] = field(default_factory=lambda: [1, 8])
    prefill_state_lengths: list[int] = field(default_factory=lambda: [256, 1024, 4096])
    prefill_vlm_lengths: list[int] = field(default_factory=lambda: [256, 1024, 4096, 16384])
    warmup: int = 2
    repeat: int = 3
    memory_budget_gib: float = 100.0  # decoding state / KV cache
    prefill_token_budget: int = 2**21  # b x context of one decoding case
    ssms: list[str] = field(default_factory=lambda: ["mamba1", "mamba2"])

    @classmethod
    def gpu(cls) -> Plan:
        return cls(
            lm={"d_model": 768, "n_layers": 24, "vocab_size": 50280},
            vlm_size="base",
            lm_lengths=[1024, 4096, 16384],
            lm_tokens=32768,
            arch_batch=128,
            lengths=[1024, 4096, 16384, 65536],
            lengths_tokens=65536,
            decode_batches=[1, 8, 64, 256],
            decode_contexts=[1024, 8192, 32768],
            decode_new=128,
            decode_mamba2=[(1, 1024), (64, 1024)],
            vision_sizes=[224, 448, 896, 1248],
            vision_patches=50176,
            vqa_images=32,
            vqa_questions=5,
        )

    @classmethod
    def quick(cls) -> Plan:
        return cls(
            lm={"d_model": 64, "n_layers": 2, "vocab_size": 512},
            vlm_size="tiny",
            lm_lengths=[64, 256],
            lm_tokens=512,
            arch_batch=4,
            lengths=[64, 256],
            lengths_tokens=512,
            decode_batches=[1, 4],
            decode_contexts=[32, 128],
            decode_new=6,
            decode_mamba2=[(1, 32)],
            vision_sizes=[32, 64],
            vision_patches=128,
            vqa_images=2,
            vqa_questions=3,
            warmup=1,
            repeat=2,
            prefill_token_budget=4096,
            prefill_batches=[1, 2],
            prefill_state_lengths=[16, 64],
            prefill_vlm_lengths=[16, 64],
        )


# ----------------------------------------------------------------------------------- helpers
def version(pkg: str) -> str | None:
    for name in (pkg, pkg.replace("-", "_")):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            return importlib.metadata.version(name)
    return None


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def optimizer_bytes(opt: torch.optim.Optimizer | None) -> int:
    if opt is None:
        return 0
    return sum(
        t.numel() * t.element_size() for st in opt.state.values() for t in st.values() if torch.is_tensor(t)
    )


def first_tensor(out: Any) -> torch.Tensor | None:
    """The tensor a module returned (a tensor, the first of a tuple, or an output's hidden states/logits)."""
    if torch.is_tensor(out):
        return out
    if isinstance(out, (tuple, list)):
        return next((t for t in out if torch.is_tensor(t)), None)
    for name in ("hidden_states", "last_hidden_state", "logits"):
        t = getattr(out, name, None)
        if torch.is_tensor(t):
            return t
    return None


def fit_exponent(xs: list[float], ys: list[float]) -> float | None:
    """Least-squares slope of log y over log x."""
    if len(xs) < 2:
        return None
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = statistics.fmean(lx), statistics.fmean(ly)
    den = sum((a - mx) ** 2 for a in lx)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / den if den else None


def crossover(xs: list[float], ratio: list[float]) -> float | None:
    """The x where ``ratio`` (ours/peer tokens/s) first crosses 1 upwards, log-linear interpolation."""
    for (x0, r0), (x1, r1) in zip(zip(xs, ratio), zip(xs[1:], ratio[1:])):
        if r0 < 1 <= r1:
            t = (0 - math.log(r0)) / (math.log(r1) - math.log(r0))
            return math.exp(math.log(x0) + t * (math.log(x1) - math.log(x0)))
    return None


class SkipCase(Exception):
    """A case that cannot run here (memory budget, missing package): recorded as skipped."""


# ----------------------------------------------------------------------------------- step breakdown
class StepBreakdown:
    """CUDA events at module boundaries of one training step: forward and backward per segment.

    ``segments``: (name, first module, last module) in forward order. Forward: pre-hook of the first
    to the post-hook of the last. Backward: a hook on the last module's output marks when its
    gradient arrives (the segment's backward starts); the segment ends where the previous one
    starts (the glue between segments is charged to the later one), the first at the end of
    ``backward``. What the forward does after the last segment (head, loss) and the backward
    before the last segment's gradient arrives are ``head+loss``.
    """

    def __init__(self, probe: Probe, segments: list[tuple], rest: str = "head+loss") -> None:
        self.probe, self.segments, self.rest = probe, segments, rest
        self.handles: list[Any] = []
        self.marks: dict[str, Any] = {}

    def _mark(self, key: str, overwrite: bool = False) -> None:
        if overwrite or key not in self.marks:
            self.marks[key] = self.probe.mark()

    def __enter__(self) -> StepBreakdown:
        for seg in self.segments:
            name, first, last = seg[:3]
            at_input = len(seg) > 3 and seg[3]  # the segment ends where ``last`` starts (its input)
            self.handles.append(first.register_forward_pre_hook(lambda m, a, n=name: self._mark(f"f0:{n}")))

            def end(m, args, out=None, n=None):
                self._mark(f"f1:{n}", overwrite=True)
                t = first_tensor(args if out is None else out)
                if t is not None and t.requires_grad:
                    t.register_hook(lambda g, n=n: self._mark(f"b0:{n}"))

            if at_input:
                self.handles.append(last.register_forward_pre_hook(lambda m, a, n=name: end(m, a, None, n)))
            else:
                self.handles.append(last.register_forward_hook(lambda m, a, o, n=name: end(m, a, o, n)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()

    def run(self, forward_loss: Callable[[], torch.Tensor], opt: torch.optim.Optimizer | None) -> dict:
        p = self.probe
        self.marks = {}
        p.sync()
        t0 = p.mark()
        loss = forward_loss()
        tf = p.mark()
        loss.backward()
        tb = p.mark()
        if opt is not None:
            opt.step()
        to = p.mark()
        p.sync()
        mk, names = self.marks, [s[0] for s in self.segments]
        out: dict[str, float | None] = {}
        seg_fwd = 0.0
        for n in names:
            f = p.ms(mk[f"f0:{n}"], mk[f"f1:{n}"]) if f"f0:{n}" in mk and f"f1:{n}" in mk else None
            out[f"{n}_forward_ms"] = f
            seg_fwd += f or 0.0
        last = names[-1]
        rest = self.rest
        out[f"{rest}_forward_ms"] = p.ms(mk[f"f1:{last}"], tf) if f"f1:{last}" in mk else None
        out["glue_forward_ms"] = p.ms(t0, tf) - seg_fwd - (out[f"{rest}_forward_ms"] or 0.0)
        out[f"{rest}_backward_ms"] = p.ms(tf, mk[f"b0:{last}"]) if f"b0:{last}" in mk else None
        for i, n in enumerate(names):
            end = mk.get(f"b0:{names[i - 1]}") if i else tb
            start = mk.get(f"b0:{n}")
            out[f"{n}_backward_ms"] = p.ms(start, end) if start is not None and end is not None else None
        out["forward_ms"], out["backward_ms"] = p.ms(t0, tf), p.ms(tf, tb)
        out["optimizer_ms"] = p.ms(tb, to) if opt is not None else None
        out["step_ms"] = p.ms(t0, to)
        for n in names + [rest]:
            f, b = out.get(f"{n}_forward_ms"), out.get(f"{n}_backward_ms")
            out[f"{n}_ms"] = None if f is None or b is None else f + b
        return out


def _conv_env(fused_conv: bool | None) -> str | None:
    """VLM_MAMBA_FUSED_CONV for a decoder: "1" / "0" forced, None left unset (the default, on)."""
    return None if fused_conv is None else "1" if fused_conv else "0"


@contextlib.contextmanager
def _env(name: str, value: str | None):
    """Environment variable ``name`` set to ``value`` (None: unset) inside the block."""
    old = os.environ.get(name)
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def top_kernels(fn: Callable[[], Any], device: torch.device, k: int = 12) -> dict:
    """One call of ``fn`` under torch.profiler: the ``k`` kernels (CPU: ops) with most self time."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    events = prof.key_averages()
    if device.type == "cuda":
        rows = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        key = (
            "self_device_time_total" if hasattr(rows[0] if rows else None, "self_device_time_total") else None
        )
        key = key or "self_cuda_time_total"
    else:
        rows, key = list(events), "self_cpu_time_total"
    total = sum(getattr(e, key) for e in rows) or 1.0
    rows.sort(key=lambda e: getattr(e, key), reverse=True)
    return {
        "what": "CUDA kernels by self device time" if device.type == "cuda" else "CPU ops by self CPU time",
        "total_ms": total / 1e3,
        "top": [
            {
                "name": e.key[:140],
                "ms": getattr(e, key) / 1e3,
                "share": getattr(e, key) / total,
                "calls": e.count,
            }
            for e in rows[:k]
        ],
    }


# ----------------------------------------------------------------------------------- the suite
class Suite:
    def __init__(self, args: argparse.Namespace, plan: Plan, device: torch.device) -> None:
        self.args, self.plan, self.device = args, plan, device
        self.probe = Probe(device)
        self.cuda = device.type == "cuda"
        self.records: list[dict] = []
        self.info: dict[str, Any] = {}
        self.t0 = T_START
        self.deadline = float("inf")
        self.errors = 0
        self.compile = set(args.compile)
        self.out_paths: list[Path] = []

    # ------------------------------------------------------------------ budget and recording
    def left_s(self) -> float:
        b = self.args.time_budget
        return float("inf") if not b else self.t0 + b - time.perf_counter()

    def set_section_deadline(self, section: str, remaining: list[str]) -> None:
        """The section gets its weight's share of the budget left (unused time rolls on)."""
        left = self.left_s()
        if math.isinf(left):
            self.deadline = float("inf")
            return
        w = SECTION_WEIGHT[section] / sum(SECTION_WEIGHT[s] for s in remaining)
        self.deadline = time.perf_counter() + max(left, 0.0) * w

    def amp(self):
        return (
            torch.autocast(self.device.type, dtype=torch.bfloat16)
            if self.args.bf16
            else contextlib.nullcontext()
        )

    def clean(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()

    def case(self, rec: dict, fn: Callable[[], dict]) -> dict:
        """Run one measurement into ``rec``: budget, OOM and SkipCase are 'skipped', other errors 'error'."""
        t_case = time.perf_counter()
        if time.perf_counter() > self.deadline or self.left_s() <= 0:
            rec["skipped"] = (
                f"time budget: this section's share of --time-budget {self.args.time_budget:.0f} s was used"
            )
        else:
            try:
                rec.update(fn())
            except torch.OutOfMemoryError as err:
                rec["skipped"] = f"OOM: {str(err).splitlines()[0][:200]}"
            except SkipCase as err:
                rec["skipped"] = str(err)
            except Exception as err:  # recorded and counted: the run exits non-zero at the end
                rec["error"] = f"{type(err).__name__}: {str(err)[:400]}"
                self.errors += 1
                traceback.print_exc()
        self.clean()
        rec["case_wall_s"] = round(time.perf_counter() - t_case, 2)
        self.records.append(rec)
        if self.out_paths:
            self.write()  # after every case: a call killed at its time limit keeps what it measured
        print(f"  {self._line(rec)} [{rec['case_wall_s']:.1f} s]", flush=True)
        return rec

    @staticmethod
    def _line(rec: dict) -> str:
        head = " ".join(
            f"{k}={rec[k]}" for k in ("section", "case", "model", "variant", "batch", "length") if k in rec
        )
        if "skipped" in rec or "error" in rec:
            return f"{head}: {rec.get('skipped') or rec.get('error')}"
        bits = []
        for k, fmt in (("median_ms", "{:.2f} ms"), ("tokens_per_s", "{:,.0f} tok/s"), ("images_per_s", "{:,.1f} img/s"),
                       ("peak_gib", "{:.2f} GiB"), ("ttft_ms", "TTFT {:.1f} ms"), ("itl_ms", "ITL {:.3f} ms"),
                       ("mfu", "MFU {:.1%}")):  # fmt: skip
            if rec.get(k) is not None:
                bits.append(fmt.format(rec[k]))
        return f"{head}: " + ", ".join(bits)

    def timed(
        self,
        fn: Callable[[], Any],
        resident: int,
        warmup: int | None = None,
        repeat: int | None = None,
        reset: Callable[[], Any] | None = None,
    ) -> dict:
        """Median of ``repeat`` timed calls after ``warmup``; peak over the timed calls (see module doc).
        ``reset`` (e.g. ``zero_grad``) runs before the memory baseline, so gradients left by the warm-up
        are not counted as live before the timed calls."""
        warmup = self.plan.warmup if warmup is None else warmup
        repeat = self.plan.repeat if repeat is None else repeat
        for _ in range(warmup):
            fn()
        if reset is not None:
            reset()
        p = self.probe
        p.sync()
        if self.cuda:
            before = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        times = []
        for _ in range(repeat):
            a = p.mark()
            fn()
            b = p.mark()
            p.sync()
            times.append(p.ms(a, b))
        out = {"times_ms": times, "median_ms": statistics.median(times), "min_ms": min(times)}
        if self.cuda:
            peak = torch.cuda.max_memory_allocated(self.device) - before + resident
            out["peak_gib"] = peak / GiB
        return out

    def write(self, final: bool = False) -> None:
        result = {
            "benchmark": "bench_gpu",
            "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "complete": final,
            "wall_s": time.perf_counter() - self.t0,
            "environment": self.env,
            "plan": asdict(self.plan),
            "conventions": {
                "tokens_per_s": "all positions the kernels process, pads included (b x T / step time)",
                "mfu": "model FLOPs: 6 x parameters x tokens/s (training) or 2 x parameters x tokens/s "
                "(forward), over 989e12 (H100/H200 SXM bf16 dense datasheet); attention FLOPs not counted",
                "peak_gib": "torch.cuda.max_memory_allocated during the timed calls above what was live "
                "before them, plus the model's weights and optimizer state",
                "timing": "CUDA events; warm-up first; median of the timed calls",
                "ratio": "ours / reference for tokens/s, images/s and latencies' inverse (>1: ours faster); "
                "for memory ours / reference (<1: ours smaller)",
            },
            "info": self.info,
            "records": self.records,
            "summary": summarize(self.records),
        }
        for out in self.out_paths:
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_suffix(".tmp")
            tmp.write_text(json.dumps(result, indent=1, default=str) + "\n")
            tmp.replace(out)

    # ------------------------------------------------------------------ building models
    def lm_config(self, ssm: str) -> LanguageConfig:
        extra = (
            {"d_state": 128, "headdim": 64, "chunk_size": 256, "ngroups": 1}
            if ssm == "mamba2"
            else {"d_state": 16}
        )
        if not self.cuda and ssm == "mamba2":
            extra.update(d_state=16, headdim=16, chunk_size=32)
        return LanguageConfig(ssm=ssm, **self.plan.lm, **extra)

    def build_ours(self, ssm: str, **overrides) -> LanguageMamba:
        torch.manual_seed(0)
        cfg = self.lm_config(ssm).model_copy(update=overrides)
        with torch.device(self.device):
            return LanguageMamba(cfg).to(self.device)

    def build_stock(self, ssm: str) -> nn.Module:
        try:
            from mamba_ssm.models.config_mamba import MambaConfig
            from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel
        except Exception as err:
            raise SkipCase(
                f"mamba_ssm not importable here ({type(err).__name__}: {str(err)[:120]})"
            ) from None
        if not self.cuda:
            raise SkipCase("stock mamba_ssm runs on CUDA only")
        cfg = self.lm_config(ssm)
        ssm_cfg = {"layer": "Mamba1" if ssm == "mamba1" else "Mamba2", "d_state": cfg.d_state}
        if ssm == "mamba2":
            ssm_cfg.update(headdim=cfg.headdim, chunk_size=cfg.chunk_size, ngroups=cfg.ngroups)
        mc = MambaConfig(d_model=cfg.d_model, n_layer=cfg.n_layers, vocab_size=cfg.vocab_size, ssm_cfg=ssm_cfg,
                         rms_norm=True, fused_add_norm=True, residual_in_fp32=True,
                         pad_vocab_size_multiple=cfg.pad_vocab_size_multiple, tie_embeddings=True)  # fmt: skip
        torch.manual_seed(0)
        return MambaLMHeadModel(mc, device=self.device, dtype=torch.float32)

    def llama_config(self, target_params: int):
        """A LlamaConfig of our LM's width and vocabulary whose depth matches ``target_params`` (within 5%)."""
        from transformers import LlamaConfig, LlamaForCausalLM

        d = self.plan.lm["d_model"]
        heads = max(1, d // 64)
        inter = int(math.ceil(8 * d / 3 / 256) * 256) if d >= 256 else 4 * d

        def cfg(n):
            return LlamaConfig(vocab_size=self.plan.lm["vocab_size"], hidden_size=d, intermediate_size=inter,
                               num_hidden_layers=n, num_attention_heads=heads, num_key_value_heads=heads,
                               max_position_embeddings=max(self.plan.lengths + self.plan.lm_lengths) * 2 + 4096,
                               tie_word_embeddings=True, attn_implementation="sdpa", rope_theta=10000.0)  # fmt: skip

        with torch.device("meta"):
            p1, p2 = n_params(LlamaForCausalLM(cfg(1))), n_params(LlamaForCausalLM(cfg(2)))
        per, base = p2 - p1, p1 - (p2 - p1)
        n = max(1, round((target_params - base) / per))
        return cfg(n), base + n * per

    def build_llama(self, target_params: int) -> nn.Module:
        from transformers import LlamaForCausalLM

        cfg, _ = self.llama_config(target_params)
        torch.manual_seed(0)
        with torch.device(self.device):
            return LlamaForCausalLM(cfg).to(self.device)

    def compiled(self, fn: Callable, who: str, dynamic: bool | None = None) -> Callable:
        if who not in self.compile:
            return fn
        return torch.compile(fn, dynamic=dynamic)

    def inference_weights(
        self, model: nn.Module, probe: Callable[[nn.Module], Any]
    ) -> tuple[nn.Module, bool, str]:
        """bf16 weights where the model runs on them (``probe`` passes), else fp32 weights under bf16
        autocast. Returns (model, use autocast, what was used)."""
        if not self.cuda:
            return model.eval(), False, "fp32"
        m = model.to(torch.bfloat16).eval()
        try:
            with torch.no_grad():
                probe(m)
            return m, False, "bf16 weights"
        except Exception as err:
            print(
                f"  bf16 weights failed ({type(err).__name__}: {str(err)[:120]}); fp32 weights + autocast",
                flush=True,
            )
            return (
                model.float().eval(),
                True,
                f"fp32 weights + bf16 autocast (bf16 weights failed: {type(err).__name__}: {str(err)[:160]})",
            )

    def lm_probe(self, m: nn.Module) -> None:
        ids = torch.randint(1, 100, (2, 8), device=self.device)
        o = m(ids, return_state=True, logits="last")
        m.step(input_ids=ids[:, 0], state=o.state)

    def vlm_probe(self, m: nn.Module) -> None:
        s = m.config.vision.img_size
        m.generate(torch.randn(1, 3, s, s, device=self.device, dtype=next(m.parameters()).dtype),
                   torch.randint(1, 100, (1, 4), device=self.device), max_new_tokens=2)  # fmt: skip

    def mfu(self, params: int, tok_s: float, train: bool = True) -> float:
        return (6 if train else 2) * params * tok_s / PEAK_FLOPS

    # ------------------------------------------------------------------ 1. ours vs stock mamba_ssm
    def lm_vs_stock(self) -> None:
        P = self.plan
        for ssm in P.ssms:
            ours, stock = self.build_ours(ssm), None
            ours_ckpt = None
            try:
                stock = self.build_stock(ssm)
            except SkipCase as err:
                stock_reason = str(err)
            else:
                stock_reason = None
            counts = {"ours": n_params(ours), "stock": n_params(stock) if stock is not None else None}
            self.info[f"lm_{ssm}"] = {"config": ours.config.to_dict(), "parameters": counts,
                                      "stock_config": "MambaConfig(rms_norm=True, fused_add_norm=True, "
                                      "residual_in_fp32=True, same d_model/n_layer/vocab/ssm_cfg)"}  # fmt: skip
            print(f"[lm_vs_stock {ssm}] parameters: ours {counts['ours']:,} | stock {counts['stock'] or 0:,}"
                  f"{'' if stock is not None else ' (' + stock_reason + ')'}", flush=True)  # fmt: skip
            for T in P.lm_lengths:
                b = max(1, P.lm_tokens // T)
                g = torch.Generator().manual_seed(T)
                ids = torch.randint(1, P.lm["vocab_size"], (b, T), generator=g).to(self.device)
                npad = T // 8
                right = torch.ones(b, T, dtype=torch.bool, device=self.device)
                right[:, T - npad :] = False
                left = right.flip(1)
                ids_right = ids.masked_fill(~right, 0)
                ids_left = ids.masked_fill(~left, 0)
                # stock has no attention_mask: it runs the padded tensor unmasked, the same work whichever
                # side the pads are on, so one padded stock row serves both padded rows of ours
                variants = [("stock", "unpadded", ids, None), ("ours", "unpadded", ids, None),
                            ("stock", "padded_unmasked", ids_right, None),
                            ("ours", "right_padded", ids_right, right),
                            ("ours", "left_padded", ids_left, left)]  # fmt: skip
                if T == P.lm_lengths[len(P.lm_lengths) // 2]:
                    variants.append(("ours", "unpadded_checkpointed", ids, None))
                for who, variant, x, mask in variants:
                    rec = {"section": "lm_vs_stock", "case": f"{ssm} T={T}", "ssm": ssm, "model": who,
                           "variant": variant, "batch": b, "length": T, "tokens_per_step": b * T,
                           "step": "forward + backward (no optimizer)",
                           "loss": "logits.float().logsumexp(-1).mean()"}  # fmt: skip
                    if who == "stock" and stock is None:
                        rec["skipped"] = stock_reason
                        self.records.append(rec)
                        continue
                    if variant == "unpadded_checkpointed" and ours_ckpt is None:
                        ours_ckpt = self.build_ours(ssm, gradient_checkpointing=True)
                    model = (
                        {"stock": stock, "ours": ours}[who]
                        if variant != "unpadded_checkpointed"
                        else ours_ckpt
                    )

                    def measure(model=model, x=x, mask=mask, who=who, b=b, T=T):
                        model.train()

                        def step():
                            model.zero_grad(set_to_none=True)
                            with self.amp():
                                out = model(x, attention_mask=mask) if who == "ours" else model(x)
                                loss = out.logits.float().logsumexp(-1).mean()
                            loss.backward()

                        r = self.timed(
                            step, model_bytes(model), reset=lambda: model.zero_grad(set_to_none=True)
                        )
                        model.zero_grad(set_to_none=True)
                        r["tokens_per_s"] = b * T / (r["median_ms"] / 1e3)
                        # the fastest call: host and clock noise only add time (the H200's steps of
                        # identical work varied by 10-40% between calls)
                        r["tokens_per_s_best"] = b * T / (r["min_ms"] / 1e3)
                        r["mfu"] = self.mfu(n_params(model), r["tokens_per_s"])
                        return r

                    self.case(rec, measure)
                # the profile at the middle length: top kernels and the LM / head+loss split
                if T == P.lm_lengths[len(P.lm_lengths) // 2]:
                    for who, model in (("ours", ours), ("stock", stock)):
                        if model is None:
                            continue
                        rec = {"section": "lm_vs_stock_profile", "case": f"{ssm} T={T}", "ssm": ssm, "model": who,
                               "batch": b, "length": T}  # fmt: skip
                        self.case(
                            rec, lambda model=model, who=who, ids=ids: self._lm_profile(model, who, ids)
                        )
            # prefill: one forward with the state returned (ours) / inference_params (stock), last logits
            for T in P.lm_lengths:
                b = max(1, P.lm_tokens // T)
                ids = torch.randint(1, P.lm["vocab_size"], (b, T)).to(self.device)
                for who, model in (("stock", stock), ("ours", ours)):
                    rec = {"section": "lm_prefill", "case": f"{ssm} T={T}", "ssm": ssm, "model": who,
                           "batch": b, "length": T, "tokens_per_step": b * T,
                           "what": "forward of the prompt, recurrent state returned, head on the last position"}  # fmt: skip
                    if model is None:
                        rec["skipped"] = stock_reason
                        self.records.append(rec)
                        continue
                    self.case(
                        rec, lambda model=model, who=who, ids=ids, b=b, T=T: self._prefill(model, who, ids)
                    )
            del ours, stock, ours_ckpt
            self.clean()

    def _lm_profile(self, model: nn.Module, who: str, ids: torch.Tensor) -> dict:
        model.train()

        def fl():
            with self.amp():
                return model(ids).logits.float().logsumexp(-1).mean()

        if who == "ours":
            segs = [("LM", model.embedding, model.lm_head, True), ("head", model.lm_head, model.lm_head)]
        else:
            segs = [("LM", model.backbone, model.backbone), ("head", model.lm_head, model.lm_head)]
        with StepBreakdown(self.probe, segs, rest="loss") as bd:
            for _ in range(2):
                model.zero_grad(set_to_none=True)
                br = bd.run(fl, None)
        model.zero_grad(set_to_none=True)

        def step():
            model.zero_grad(set_to_none=True)
            fl().backward()

        kern = top_kernels(step, self.device)
        model.zero_grad(set_to_none=True)
        return {"breakdown_ms": br, "profile": kern}

    @torch.no_grad()
    def _prefill(self, model: nn.Module, who: str, ids: torch.Tensor) -> dict:
        model.eval()
        b, T = ids.shape
        if who == "ours":

            def run():
                with self.amp():
                    return model(ids, return_state=True, logits="last").logits
        else:
            from mamba_ssm.utils.generation import InferenceParams

            def run():
                ip = InferenceParams(max_seqlen=T + 1, max_batch_size=b)
                with self.amp():
                    return model(ids, inference_params=ip, num_last_tokens=1).logits

        r = self.timed(run, model_bytes(model))
        r["tokens_per_s"] = b * T / (r["median_ms"] / 1e3)
        r["mfu"] = self.mfu(n_params(model), r["tokens_per_s"], train=False)
        return r

    # ------------------------------------------------------------------ 2. architecture vs transformers
    def vlm_pair(self) -> tuple[nn.Module, nn.Module, dict]:
        size = self.plan.vlm_size
        cfg = get_config(size)
        torch.manual_seed(0)
        with torch.device(self.device):
            ours = create_model(size).to(self.device)
        counts = ours.num_parameters()
        nv, nl = match_peer_config(cfg, counts)
        torch.manual_seed(0)
        peer = build_peer(cfg, nv, nl, device=self.device).to(self.device)
        pc = peer.num_parameters()
        info = {"size": size, "parameters": {"ours": counts, "peer": pc},
                "peer_over_ours": pc["total"] / counts["total"],
                "layers": {"ours": {"vision": cfg.vision.n_layers, "language": cfg.language.n_layers},
                           "peer": {"vision": nv, "language": nl}},
                "image_tokens": cfg.vision.num_patches, "peer_config": peer.cfg.to_dict()}  # fmt: skip
        self.info["vlm"] = info
        print(f"[vlm {size}] parameters: ours {counts['total']:,} | peer {pc['total']:,} "
              f"({pc['total'] / counts['total'] - 1:+.1%}); peer layers vision {nv}, language {nl}", flush=True)  # fmt: skip
        return ours, peer, info

    def vlm_batch(self, kind: str, b: int, cfg, text_len: int | None = None) -> dict:
        """Synthetic batches, the same tensors for both models. caption: 20-40 text tokens (uniform),
        right padded to 40, every real token labelled; vqa: 8-16 prompt tokens + 1-3 answer tokens,
        right padded, the answer labelled; long: ``text_len`` tokens, no padding, all labelled."""
        g = torch.Generator().manual_seed(b * 7 + len(kind))
        V = cfg.language.vocab_size
        s = cfg.vision.img_size
        images = torch.randn(b, 3, s, s, generator=g)
        if kind == "long":
            ids = torch.randint(1, V, (b, text_len), generator=g)
            mask, labels = torch.ones_like(ids, dtype=torch.bool), ids.clone()
        else:
            if kind == "caption":
                t, n = 40, torch.randint(20, 41, (b,), generator=g)
                first_target = torch.zeros(b, dtype=torch.long)
            else:
                q, a = torch.randint(8, 17, (b,), generator=g), torch.randint(1, 4, (b,), generator=g)
                t, n, first_target = 19, q + a, q
            ids = torch.randint(1, V, (b, t), generator=g)
            pos = torch.arange(t)[None]
            mask = pos < n[:, None]
            ids = ids.masked_fill(~mask, 0)
            labels = ids.masked_fill(~mask | (pos < first_target[:, None]), -100)
        dev = self.device
        return {"images": images.to(dev), "ids": ids.to(dev), "mask": mask.to(dev), "labels": labels.to(dev)}

    def _vlm_trainer(
        self, model: nn.Module, batch: dict, compile_key: str | None, dynamic: bool | None = None
    ):
        """The loss of one batch. The peer gets no attention_mask: it only checks that the padding is
        on the right (a host sync and a graph break) and never reads it otherwise; ours uses it."""
        peer = isinstance(model, PeerTransformerVLM)
        mask = None if peer or bool(batch["mask"].all()) else batch["mask"]
        # ours as the training module calls it: only the loss is read, so no (b, t, V) logits
        kw = (
            {"return_logits": False} if "return_logits" in inspect.signature(model.forward).parameters else {}
        )

        def fl(images, ids, mask, labels):
            with self.amp():
                return model(images, ids, attention_mask=mask, labels=labels, **kw).loss

        f = self.compiled(fl, compile_key, dynamic) if compile_key else fl
        return lambda: f(batch["images"], batch["ids"], mask, batch["labels"])

    def _train_case(self, model: nn.Module, forward_loss: Callable, tokens: int, params: int) -> dict:
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=True)
        model.train()

        def step():
            model.zero_grad(set_to_none=True)
            forward_loss().backward()
            opt.step()

        t = time.perf_counter()
        step()  # first call: compilation, optimizer state
        self.probe.sync()
        first_s = time.perf_counter() - t
        r = self.timed(
            step,
            model_bytes(model) + optimizer_bytes(opt),
            warmup=max(self.plan.warmup - 1, 1),
            reset=lambda: model.zero_grad(set_to_none=True),
        )
        r["first_call_s"] = first_s
        r["tokens_per_s"] = tokens / (r["median_ms"] / 1e3)
        r["mfu"] = self.mfu(params, r["tokens_per_s"])
        model.zero_grad(set_to_none=True)
        return r

    def arch(self) -> None:
        P = self.plan
        ours, peer, info = self.vlm_pair()
        cfg = get_config(P.vlm_size)
        p_img = info["image_tokens"]
        params = {"ours": info["parameters"]["ours"]["total"], "peer": info["parameters"]["peer"]["total"]}
        for kind in ("caption", "vqa"):
            batch = self.vlm_batch(kind, P.arch_batch, cfg)
            b, t = batch["ids"].shape
            tokens = b * (p_img + t)
            for who, model in (("peer", peer), ("ours", ours)):
                for compiled in (False, True):
                    key = "peer" if who == "peer" else "ours"
                    if who == "peer" and kind != "caption" and not compiled and "peer" in self.compile:
                        continue  # the eager peer once (caption batch) shows what compiling it buys
                    rec = {
                        "section": "arch",
                        "case": f"vlm {kind} b={b}",
                        "model": who,
                        "variant": "compiled" if compiled else "eager",
                        "batch": b,
                        "length": p_img + t,
                        "tokens_per_step": tokens,
                        "step": "forward + backward + fused AdamW step",
                        "batch_kind": BATCH_KINDS[kind],
                    }
                    if compiled and key not in self.compile:
                        rec["skipped"] = (
                            f"not measured: --compile did not list {key!r} in this run (device time)"
                        )
                        self.records.append(rec)
                        continue
                    fl = self._vlm_trainer(model, batch, key if compiled else None)
                    self.case(
                        rec,
                        lambda model=model, fl=fl, who=who, n=tokens: self._train_case(
                            model, fl, n, params[who]
                        ),
                    )
                    torch._dynamo.reset()
            # breakdown and kernels, eager, on the caption batch
            if kind == "caption":
                for who, model in (("peer", peer), ("ours", ours)):
                    rec = {"section": "arch_profile", "case": f"vlm {kind} b={b}", "model": who, "batch": b}
                    self.case(
                        rec, lambda model=model, who=who, batch=batch: self._vlm_profile(model, who, batch)
                    )
        self.clean()

    def arch_lm(self) -> None:
        self._lm_vs_llama()

    def _vlm_profile(self, model: nn.Module, who: str, batch: dict) -> dict:
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=True)
        model.train()
        fl = self._vlm_trainer(model, batch, None)
        if who == "ours":
            segs = [("vision", model.vision, model.vision), ("bridge", model.bridger, model.bridger),
                    ("LM", model.language, model.language)]  # fmt: skip
        else:
            segs = [("vision", model.patch_embed, model.vision_norm), ("bridge", model.bridger, model.bridger),
                    ("LM", model.layers[0], model.norm_f)]  # fmt: skip
        with StepBreakdown(self.probe, segs) as bd:
            for _ in range(3):
                model.zero_grad(set_to_none=True)
                br = bd.run(fl, opt)

        def step():
            model.zero_grad(set_to_none=True)
            fl().backward()
            opt.step()

        kern = top_kernels(step, self.device)
        model.zero_grad(set_to_none=True)
        return {"breakdown_ms": br, "profile": kern,
                "breakdown_method": "CUDA events at module hooks, eager model, third step"}  # fmt: skip

    def _lm_vs_llama(self) -> None:
        P = self.plan
        ours = self.build_ours("mamba1")
        try:
            llama = self.build_llama(n_params(ours))
        except Exception as err:  # transformers missing or incompatible: recorded
            llama, reason = None, f"LlamaForCausalLM unavailable: {type(err).__name__}: {str(err)[:160]}"
        counts = {"ours": n_params(ours), "llama": n_params(llama) if llama is not None else None}
        self.info["lm_vs_llama"] = {"parameters": counts,
                                    "llama_config": llama.config.to_diff_dict() if llama is not None else None}  # fmt: skip
        if llama is not None:
            print(f"[lm vs llama] parameters: ours {counts['ours']:,} | llama {counts['llama']:,} "
                  f"({counts['llama'] / counts['ours'] - 1:+.1%}), {llama.config.num_hidden_layers} layers", flush=True)  # fmt: skip
        for T in P.lm_lengths:
            b = max(1, P.lm_tokens // T)
            ids = torch.randint(1, P.lm["vocab_size"], (b, T)).to(self.device)
            own_loss = "labels" in inspect.signature(ours.forward).parameters
            for who, model in (("llama", llama), ("ours", ours)):
                for compiled in (False, True) + (("own_loss",) if who == "ours" and own_loss else ()):
                    if compiled == "own_loss":  # a fused head + loss (issue 15) reached through labels=
                        rec = {"section": "arch", "case": f"lm T={T}", "model": who, "variant": "eager, labels= (model's loss)",
                               "batch": b, "length": T, "tokens_per_step": b * T, "step": "forward + backward + fused AdamW step",
                               "loss": "the model's own loss from labels=ids"}  # fmt: skip

                        def own(x, model=model):
                            with self.amp():
                                return model(x, labels=x).loss

                        self.case(rec, lambda model=model, ids=ids, b=b, T=T, own=own: self._train_case(
                            model, lambda: own(ids), b * T, n_params(model)))  # fmt: skip
                        continue
                    rec = {"section": "arch", "case": f"lm T={T}", "model": who,
                           "variant": "compiled" if compiled else "eager", "batch": b, "length": T,
                           "tokens_per_step": b * T, "step": "forward + backward + fused AdamW step",
                           "loss": "next-token cross-entropy, fp32 logits"}  # fmt: skip
                    key = "llama" if who == "llama" else "ours"
                    if model is None:
                        rec["skipped"] = reason
                        self.records.append(rec)
                        continue
                    if compiled and key not in self.compile:
                        rec["skipped"] = (
                            f"not measured: --compile did not list {key!r} in this run (device time)"
                        )
                        self.records.append(rec)
                        continue

                    def fl_raw(x, model=model, who=who):
                        with self.amp():
                            logits = (
                                model(x).logits
                                if who == "ours"
                                else model(input_ids=x, use_cache=False).logits
                            )
                            return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), x[:, 1:].flatten())

                    f = self.compiled(fl_raw, key, dynamic=True) if compiled else fl_raw
                    self.case(rec, lambda model=model, f=f, ids=ids, b=b, T=T: self._train_case(
                        model, lambda: f(ids), b * T, n_params(model)))  # fmt: skip
        torch._dynamo.reset()
        self.clean()

    # ------------------------------------------------------------------ 3. lengths
    def lengths(self) -> None:
        P = self.plan
        ours, peer, info = self.vlm_pair()
        cfg = get_config(P.vlm_size)
        p_img = info["image_tokens"]
        params = {"ours": info["parameters"]["ours"]["total"], "peer": info["parameters"]["peer"]["total"]}
        variant = {w: "compiled (dynamic shapes)" if w in self.compile else "eager" for w in ("ours", "peer")}
        for L in P.lengths:
            b = max(1, P.lengths_tokens // L)
            batch = self.vlm_batch("long", b, cfg, text_len=max(L - p_img, 1))
            for who, model in (("peer", peer), ("ours", ours)):
                rec = {"section": "lengths", "case": f"L={L}", "model": who, "variant": variant[who], "batch": b,
                       "length": L, "tokens_per_step": b * L, "step": "forward + backward + fused AdamW step",
                       "batch_kind": f"1 image ({p_img} tokens) + {L - p_img} text tokens, all labelled, unpadded"}  # fmt: skip
                fl = self._vlm_trainer(model, batch, who if who in self.compile else None, dynamic=True)
                self.case(
                    rec,
                    lambda model=model, fl=fl, b=b, L=L, who=who: self._train_case(
                        model, fl, b * L, params[who]
                    ),
                )
        torch._dynamo.reset()
        self.clean()

    # ------------------------------------------------------------------ 4. decoding
    def decode(self) -> None:
        P = self.plan
        self.info["hbm"] = self.hbm_bandwidth()
        bw = self.info["hbm"]["copy_bytes_per_s"]
        # Mamba-1: the whole grid for ours, stock and Llama; Mamba-2: the target cases for ours and stock
        cases = [(b, c) for c in P.decode_contexts for b in P.decode_batches]
        cases.sort(key=lambda bc: (bc[0], bc[1]))  # stock's graph cache grows with the batch
        ours, ours_amp, ours_w = self.inference_weights(self.build_ours("mamba1"), self.lm_probe)
        target = n_params(ours)
        weights = {("ours", "mamba1"): (ours_amp, ours_w)}

        def ours2():
            m, a, w = self.inference_weights(self.build_ours("mamba2"), self.lm_probe)
            weights[("ours", "mamba2")] = (a, w)
            return m

        subjects: list[tuple[str, str, Callable[[], Any]]] = [
            ("ours", "mamba1", lambda: ours),
            *(
                [
                    ("ours_fused", "mamba1", lambda: ours),
                    ("ours_unfused", "mamba1", lambda: ours),
                    ("ours_fused_conv", "mamba1", lambda: ours),
                ]  # fmt: skip
                if getattr(self.args, "fused_step", False)
                else []
            ),
            *(
                [("ours_fused_xproj", "mamba1", lambda: ours)]
                if getattr(self.args, "fused_xproj", False)
                else []
            ),
            ("stock", "mamba1", lambda: self.build_stock("mamba1").to(torch.bfloat16).eval()),
            *(
                [
                    ("ours_sample", "mamba1", lambda: ours),
                    ("stock_sample", "mamba1", lambda: self.build_stock("mamba1").to(torch.bfloat16).eval()),
                ]  # fmt: skip
                if getattr(self.args, "decode_sampling", False)
                else []
            ),
            ("llama", "-", lambda: self.build_llama(target).to(torch.bfloat16).eval()),
            ("ours", "mamba2", ours2),
            ("stock", "mamba2", lambda: self.build_stock("mamba2").to(torch.bfloat16).eval()),
        ]
        try:
            self.info["llama_decode_check"] = self.llama_decode_check()
        except Exception as err:  # the Llama rows still run; the check's failure is on record
            self.info["llama_decode_check"] = f"FAILED: {type(err).__name__}: {str(err)[:300]}"
            self.errors += 1
        # every model is built first and each case runs for all of them in turn, smallest first: a
        # budget cut then drops the largest cases of every model, and the pairs that ran are complete
        decoders: dict[tuple[str, str], Decoder | str] = {}
        for who, ssm, build in subjects:
            try:
                model = build()
            except SkipCase as e:
                decoders[who, ssm] = str(e)
                continue
            except Exception as e:
                decoders[who, ssm] = f"{type(e).__name__}: {str(e)[:200]}"
                continue
            dec = {
                "ours": OursDecoder,
                "ours_fused": OursDecoder,
                "ours_unfused": OursDecoder,
                "ours_fused_conv": OursDecoder,
                "ours_fused_xproj": OursDecoder,
                "ours_sample": OursDecoder,
                "stock": StockDecoder,
                "stock_sample": StockDecoder,
                "llama": LlamaDecoder,
            }[who](model, self)
            if who.startswith("ours"):  # ours: the default (fused at b <= ops.FUSED_STEP_MAX_BATCH)
                dec.fused = {"ours_fused": True, "ours_unfused": False, "ours_fused_conv": True}.get(who)
                dec.fused_conv = {"ours_fused": False, "ours_fused_conv": True}.get(who)
                dec.path += {True: " [fused dt_proj step forced]", False: " [unfused step forced]"}.get(
                    dec.fused, ""
                )
                dec.path += {True: " [+ conv step in in_proj's kernel, VLM_MAMBA_FUSED_CONV=1]",
                             False: " [conv step as its own kernel, VLM_MAMBA_FUSED_CONV=0]"}.get(dec.fused_conv, "")  # fmt: skip
                if who == "ours_sample":
                    dec.sample_kw = dict(SAMPLING, do_sample=True, seed=0)
                    dec.path += f" [sampling {SAMPLING}, the sampler inside the decode graph]"
            if who == "stock_sample":
                dec.sample_kw = dict(SAMPLING)
                dec.path = f"mamba_ssm MambaLMHeadModel.generate(cg=True, {SAMPLING}) [its sampler outside the graph]"
            if who.startswith("ours"):
                if who == "ours_fused_xproj":
                    dec.xproj = True
                    dec.path += " [x_proj's partials in in_proj's kernel, VLM_MAMBA_FUSED_XPROJ=1]"
            base = "ours" if who.startswith("ours") else "stock" if who.startswith("stock") else who
            dec.amp = weights.get((base, ssm), (False, ""))[0]
            decoders[who, ssm] = dec
        m2 = set(P.decode_mamba2)
        for i, (b, ctx) in enumerate(sorted(cases, key=lambda bc: (bc[0] * bc[1], bc))):
            for (who, ssm), dec in decoders.items():
                if ssm == "mamba2" and (b, ctx) not in m2:
                    continue
                base = "ours" if who.startswith("ours") else "stock" if who.startswith("stock") else who
                wdesc = weights.get((base, ssm), (False, "bf16 weights"))[1]
                rec = {"section": "decode", "case": f"b={b} ctx={ctx}", "model": who, "ssm": ssm, "batch": b,
                       "context": ctx, "new_tokens": P.decode_new, "weights": wdesc,
                       "path": dec.path if isinstance(dec, Decoder) else None}  # fmt: skip
                if not isinstance(dec, Decoder):
                    rec["skipped"] = dec
                    self.records.append(rec)
                    continue
                self.case(rec, lambda dec=dec, b=b, ctx=ctx: self._decode_case(dec, b, ctx, bw))
                dec.release()
            if i == 0:
                self._vlm_decode()
                for (who, ssm), dec in decoders.items():  # where a step's time goes, by kernel
                    if who.startswith("ours") and isinstance(dec, Decoder):
                        rec = {"section": "decode_profile", "case": f"b={b} ctx={ctx}", "model": who, "ssm": ssm,
                               "batch": b}  # fmt: skip
                        self.case(rec, lambda dec=dec, b=b: self._step_profile(dec, b))
        decoders.clear()
        self.clean()

    def _step_profile(self, dec: Decoder, b: int, steps: int = 16) -> dict:
        """``steps`` in-place decode steps of ``dec``'s model (eager, and as graph replays), by kernel."""
        from vlm_mamba import ops
        from vlm_mamba.models.decoding import cache_for

        lm, out = dec.model, {}
        before = ops._fused_step
        ops.set_fused_step(getattr(dec, "fused", None) if getattr(dec, "fused", None) is not None else before)
        conv = _conv_env(getattr(dec, "fused_conv", None))
        xproj = "1" if getattr(dec, "xproj", False) else None
        try:
            with torch.no_grad(), dec.ctx(), _env(ops.FUSED_CONV_ENV, conv), _env(ops.FUSED_XPROJ_ENV, xproj):
                ids = torch.randint(1, self.plan.lm["vocab_size"], (b, 64), device=self.device)
                o = lm(ids, return_state=True, logits="last")
                for mode, graph in (("eager_in_place", False), ("graph_replay", True)):
                    cache = cache_for(lm, o.state)
                    tok = o.logits[:, -1].argmax(-1)
                    cache.step(tok, cuda_graph=graph)  # capture (graph) / warm-up outside the profile

                    def run(cache=cache, tok=tok, graph=graph):
                        for _ in range(steps):
                            cache.step(tok, cuda_graph=graph)

                    r = top_kernels(run, self.device, k=16)
                    r["steps"] = steps
                    r["per_step_device_ms"] = r["total_ms"] / steps
                    out[mode] = r
        finally:
            ops.set_fused_step(before)
        return out

    def _decode_case(self, dec: Decoder, b: int, ctx: int, bw: float) -> dict:
        P = self.plan
        n = P.decode_new
        state_b = dec.state_bytes(b, ctx + n)
        if state_b > P.memory_budget_gib * GiB:
            raise SkipCase(
                f"decoding state/KV cache {state_b / GiB:.1f} GiB > the {P.memory_budget_gib:.0f} GiB budget"
            )
        if b * ctx > P.prefill_token_budget:
            raise SkipCase(f"prefill of b x context = {b * ctx:,} tokens > the {P.prefill_token_budget:,}-token "
                           "budget per case (time)")  # fmt: skip
        big = b * ctx >= P.prefill_token_budget // 4
        g = torch.Generator().manual_seed(b + ctx)
        ids = torch.randint(1, P.lm["vocab_size"], (b, ctx), generator=g).to(self.device)
        p = self.probe
        dec.release()  # the previous case's cache and graphs: the peak below includes this case's
        self.clean()
        if self.cuda:
            p.sync()
            before = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        dec.prepare(ids, n)  # allocations, graph capture, one full run
        reps = 2 if big else 5
        t1, tn = [], []
        for _ in range(reps):
            for k, acc in ((1, t1), (n, tn)):
                p.sync()
                a = p.mark()
                out = dec.run(ids, k)
                z = p.mark()
                p.sync()
                if tuple(out.shape) != (b, k):
                    raise RuntimeError(f"{dec.path} returned {tuple(out.shape)}, expected {(b, k)}")
                acc.append(p.ms(a, z))
        # each call includes the prompt's eager prefill, whose host time varies by milliseconds from
        # call to call on a busy host; the noise only adds, so the fastest of each is the estimate
        ttft, total = min(t1), min(tn)
        itl = (total - ttft) / (n - 1)
        note = None if itl > 0 else "T(n) <= T(1): the timing noise exceeds the decode time"
        r = {"ttft_ms": ttft, "total_ms": total, "itl_ms": itl, "times_1_ms": t1, "times_n_ms": tn,
             "decode_tokens_per_s": b / (itl / 1e3) if itl > 0 else None, "state_bytes": state_b,
             "weight_bytes": model_bytes(dec.model),
             "itl_method": "(fastest time of n new tokens - fastest time of 1 new token) / (n - 1), each call "
             "from the prompt",
             "ttft_median_ms": statistics.median(t1), "total_median_ms": statistics.median(tn),
             "itl_note": note}  # fmt: skip
        if itl > 0:  # decode phase: 2 x parameters x new tokens/s (forward only)
            r["mfu"] = self.mfu(n_params(dec.model), r["decode_tokens_per_s"], train=False)
        if self.cuda:
            r["peak_gib"] = (
                torch.cuda.max_memory_allocated(self.device) - before + model_bytes(dec.model)
            ) / GiB
            bytes_per_step = model_bytes(dec.model) + dec.step_bytes(b, ctx + n // 2)
            r["hbm_bound_ms"] = bytes_per_step / bw * 1e3
            r["hbm_fraction"] = r["hbm_bound_ms"] / itl if itl > 0 else None
        return r

    def _vlm_decode(self) -> None:
        """VLMamba.generate at the VLM size (batch 1) against its language model alone, same prompt."""
        P = self.plan
        size = P.vlm_size
        cfg = get_config(size)
        torch.manual_seed(0)
        with torch.device(self.device):
            vlm = create_model(size).to(self.device)
        vlm, amp, wdesc = self.inference_weights(vlm, self.vlm_probe)
        lm = vlm.language
        lm_dec = OursDecoder(lm, self)
        lm_dec.amp = amp
        dt = next(vlm.parameters()).dtype
        n = P.decode_new
        prompt = torch.randint(1, cfg.language.vocab_size, (1, 32)).to(self.device)
        images = torch.randn(1, 3, cfg.vision.img_size, cfg.vision.img_size, device=self.device, dtype=dt)
        ids = torch.randint(1, cfg.language.vocab_size, (1, cfg.vision.num_patches + 32)).to(self.device)
        for who, run in (("vlm_generate", lambda k: vlm.generate(images, prompt, max_new_tokens=k, eos_token_id=None)),
                         ("lm_alone", lambda k: lm_dec.run(ids, k))):  # fmt: skip

            def measure(run=run):
                with torch.no_grad(), self.amp() if amp else contextlib.nullcontext():
                    run(n)
                    t1 = min(self.timed(lambda: run(1), 0, warmup=0)["times_ms"])  # fastest: see _decode_case
                    tn = min(self.timed(lambda: run(n), 0, warmup=0)["times_ms"])
                itl = (tn - t1) / (n - 1)
                return {"ttft_ms": t1, "total_ms": tn, "itl_ms": itl, "decode_tokens_per_s": 1e3 / itl}

            rec = {"section": "decode_vlm", "case": f"{size} b=1 prompt={cfg.vision.num_patches}+32", "model": who,
                   "batch": 1, "new_tokens": n, "path": lm_dec.path, "weights": wdesc}  # fmt: skip
            self.case(rec, measure)
        self.clean()

    def hbm_bandwidth(self) -> dict:
        if not self.cuda:
            return {"copy_bytes_per_s": 20e9, "what": "CPU: a nominal 20 GB/s, not measured"}
        x = torch.empty(2 * GiB // 2, dtype=torch.bfloat16, device=self.device)
        x.normal_()
        y = torch.empty_like(x)
        ms = self.timed(lambda: y.copy_(x), 0, warmup=2, repeat=10)["median_ms"]
        bw = 2 * x.numel() * 2 / (ms / 1e3)
        return {"copy_bytes_per_s": bw, "what": "device-to-device copy of 2 GiB, bytes read + written / time"}

    def llama_decode_check(self) -> dict:
        """The hand-written Llama decoder equals the HF forward under teacher forcing (small config)."""
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True,
                          attn_implementation="sdpa", max_position_embeddings=256)  # fmt: skip
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg).to(self.device).eval()
        ids = torch.randint(0, 512, (2, 24), device=self.device)
        with torch.no_grad():
            full = model(input_ids=ids).logits.float()  # (2, 24, V)
            dec = LlamaDecoder(model, self)
            steps = dec.teacher_forced(ids[:, :16], ids[:, 16:])  # (2, 8, V): predictions at 15..22
        ref = full[:, 15:23]
        rel = float((steps - ref).norm() / ref.norm())
        if rel > 1e-3:
            raise RuntimeError(f"Llama decoder check failed: relative error {rel:.3g}")
        print(
            f"[decode] Llama hand-written decoder vs HF forward (fp32, teacher forced): rel err {rel:.2e}",
            flush=True,
        )
        return {"relative_error_fp32": rel, "graph": dec.graph_ok}

    # ------------------------------------------------------------------ 4b. prefill
    def prefill(self) -> None:
        """A prompt prefilled from a cached image state against the same tokens from a zero state (the
        language model alone, state returned, head on the last position), and the VLM's prefill
        (``generate(max_new_tokens=1)``: image, prompt, first token) against the peer's."""
        P = self.plan
        ours, peer, _ = self.vlm_pair()
        cfg = get_config(P.vlm_size)
        ours, amp, wdesc = self.inference_weights(ours, self.vlm_probe)
        peer = peer.to(torch.bfloat16).eval() if self.cuda else peer.eval()
        lm, dt, s = ours.language, next(ours.parameters()).dtype, cfg.vision.img_size
        V = cfg.language.vocab_size

        def ctx():
            return self.amp() if amp else contextlib.nullcontext()

        for b in P.prefill_batches:
            images = torch.randn(b, 3, s, s, device=self.device, dtype=dt)
            with torch.no_grad(), ctx():
                state = ours.prefill_images(images)
            for t in P.prefill_state_lengths:
                ids = torch.randint(1, V, (b, t), device=self.device)
                for variant in ("from_image_state", "from_image_state_one_pass", "from_image_state_two_pass",
                                "from_image_state_prefix", "from_zero_state", "from_image_state_graph",
                                "from_image_state_graph_two_pass", "from_zero_state_graph"):  # fmt: skip
                    graph = "_graph" in variant
                    if graph and not self.cuda:
                        continue
                    rec = {"section": "prefill_state", "case": f"b={b} t={t}", "model": "ours", "variant": variant,
                           "batch": b, "length": t, "weights": wdesc,
                           "what": "LanguageMamba(inputs_embeds=prompt, state=image state or None, return_state=True, "
                           "logits='last'); the image's own prefill is not timed"
                           + ("; captured in a CUDA graph and replayed (as generate's prefill graphs run it: "
                              "the default form in a capture, or two passes forced)" if graph else ""),
                           "state_scan_default": _state_scan_default()}  # fmt: skip

                    def run(ids=ids, st=None if variant.startswith("from_zero") else state, variant=variant):
                        # the default form (triton_scan.state_scan_form: the CUDA scan from h0 where
                        # it builds), or one forced: the one-pass Triton scan from h0, the zero-state
                        # kernel + h0 term, the state as prefix tokens
                        form = ("_".join(variant.rsplit("_", 2)[-2:]) if variant.endswith("_pass")
                                else "prefix" if variant.endswith("_prefix") else None)  # fmt: skip
                        with _env(STATE_SCAN_ENV, form):
                            with torch.no_grad(), ctx():
                                return lm(
                                    inputs_embeds=lm.embed(ids), state=st, return_state=True, logits="last"
                                )

                    def measure(run=run, b=b, t=t, graph=graph):
                        fn = _graphed(run) if graph else run
                        # eager prefills at these sizes are host-bound and the host's time varies
                        # by ms from call to call (additive noise): the fastest of 7 calls
                        r = self.timed(fn, model_bytes(lm), repeat=7)
                        r["min_ms"] = min(r["times_ms"])
                        r["tokens_per_s"] = b * t / (r["min_ms"] / 1e3)
                        r["tokens_per_s_method"] = "b x t / the fastest of 7 calls"
                        return r

                    self.case(rec, measure)
                    if b == max(P.prefill_batches) and t == max(P.prefill_state_lengths) and not graph:
                        prof = {k: rec[k] for k in ("case", "model", "variant", "batch", "length")}
                        self.case({"section": "prefill_state_profile", **prof},
                                  lambda run=run: top_kernels(run, self.device, k=16))  # fmt: skip
            del state
            for t in P.prefill_vlm_lengths:
                ids = torch.randint(1, V, (b, t), device=self.device)
                for who, model, graphs in (
                    ("peer", peer, False),
                    ("ours", ours, False),
                    ("ours", ours, True),
                ):
                    rec = {"section": "prefill_vlm", "case": f"b={b} t={t}", "model": who, "batch": b, "length": t,
                           "variant": "prefill_graph=True (image and prompt prefill as CUDA graphs)" if graphs
                           else "eager" if who == "ours" else "eager, SDPA",
                           "weights": wdesc if who == "ours" else "bf16 weights", "tokens_per_step": b * (t + cfg.vision.num_patches),
                           "what": "generate(images, prompt, max_new_tokens=1): image encoding, prefill, first token "
                           "(the peer eager, SDPA)"}  # fmt: skip

                    def measure(model=model, who=who, ids=ids, images=images, b=b, t=t, graphs=graphs):
                        x = images.to(next(model.parameters()).dtype)

                        def run():
                            with torch.no_grad(), ctx() if who == "ours" else contextlib.nullcontext():
                                if who == "ours":
                                    return model.generate(
                                        x, ids, max_new_tokens=1, eos_token_id=None, prefill_graph=graphs
                                    )
                                return model.generate(x, ids, max_new_tokens=1)

                        r = self.timed(run, model_bytes(model))
                        r["tokens_per_s"] = b * (t + cfg.vision.num_patches) / (r["median_ms"] / 1e3)
                        return r

                    self.case(rec, measure)

    # ------------------------------------------------------------------ 5. vision encoders
    def vision(self) -> None:
        P = self.plan
        cfg = get_config(P.vlm_size)
        torch.manual_seed(0)
        with torch.device(self.device):
            full = create_model(P.vlm_size).to(self.device)
        ours = full.vision
        counts = n_params(ours)
        nv, _ = match_peer_config(cfg, full.num_parameters())
        del full
        peer = PeerViT(build_peer(cfg, nv, 1, device=self.device).to(self.device), cfg.vision.grid_size)
        self.info["vision"] = {"parameters": {"ours": counts, "peer": n_params(peer)}, "peer_layers": nv}
        s = cfg.vision.patch_size
        for R in P.vision_sizes:
            patches = (R // s) ** 2
            b = max(1, P.vision_patches // patches)
            images = torch.randn(b, 3, R, R, device=self.device)
            for who, model in (("peer", peer), ("ours", ours)):
                key = "vit" if who == "peer" else "ours"
                for mode in ("train", "inference"):
                    rec = {"section": "vision", "case": f"{R}px", "model": who, "variant": mode, "batch": b,
                           "length": patches, "resolution": R,
                           "compiled": key in self.compile}  # fmt: skip

                    def measure(model=model, mode=mode, key=key, images=images, b=b, patches=patches):
                        def fwd(x):
                            with self.amp():
                                return model(x)

                        f = self.compiled(fwd, key)
                        if mode == "train":
                            model.train()

                            def run():
                                model.zero_grad(set_to_none=True)
                                f(images).float().square().mean().backward()
                        else:
                            model.eval()

                            def run():
                                with torch.no_grad():
                                    f(images)

                        t = time.perf_counter()
                        run()
                        self.probe.sync()
                        first = time.perf_counter() - t
                        r = self.timed(
                            run,
                            model_bytes(model),
                            warmup=max(self.plan.warmup - 1, 0),
                            reset=lambda: model.zero_grad(set_to_none=True),
                        )
                        model.zero_grad(set_to_none=True)
                        r["first_call_s"] = first
                        r["images_per_s"] = b / (r["median_ms"] / 1e3)
                        r["tokens_per_s"] = b * patches / (r["median_ms"] / 1e3)
                        r["mfu"] = self.mfu(n_params(model), r["tokens_per_s"], train=mode == "train")
                        return r

                    self.case(rec, measure)
            torch._dynamo.reset()
        self.clean()

    # ------------------------------------------------------------------ 6. VQA evaluation
    def vqa(self) -> None:
        P = self.plan
        ours, peer, info = self.vlm_pair()
        cfg = get_config(P.vlm_size)
        ours, amp, wdesc = self.inference_weights(ours, self.vlm_probe)
        peer = peer.to(torch.bfloat16).eval() if self.cuda else peer.eval()
        n_img, q = P.vqa_images, P.vqa_questions
        s = cfg.vision.img_size
        images = torch.randn(n_img, 3, s, s, device=self.device, dtype=next(ours.parameters()).dtype)
        prompts = torch.randint(1, cfg.language.vocab_size, (n_img * q, 12), device=self.device)
        index = torch.arange(n_img, device=self.device).repeat_interleave(q)
        new = 3
        runs = {
            ("ours", "image_state_cache"): lambda: ours.generate(images, prompts, image_index=index, max_new_tokens=new,
                                                                 eos_token_id=None, use_image_cache=True,
                                                                 prefill_graph=False),
            ("ours", "image_state_cache_graphs"): lambda: ours.generate(images, prompts, image_index=index,
                max_new_tokens=new, eos_token_id=None, use_image_cache=True, prefill_graph=True),
            ("ours", "recompute"): lambda: ours.generate(images, prompts, image_index=index, max_new_tokens=new,
                                                         eos_token_id=None, use_image_cache=False),
            ("peer", "recompute"): lambda: peer.generate(images[index].to(next(peer.parameters()).dtype), prompts,
                                                         max_new_tokens=new),
        }  # fmt: skip
        if getattr(self.args, "short_scan", False):  # the same two of ours with VLM_MAMBA_SHORT_SCAN=0
            from vlm_mamba.ops import triton_scan

            def without(fn):
                def run():
                    with _env(triton_scan.SHORT_SCAN_ENV, "0"):
                        return fn()

                return run

            for v in ("image_state_cache_graphs", "recompute"):
                runs[("ours", f"{v}_short_scan_off")] = without(runs[("ours", v)])
        for (who, variant), run in runs.items():
            rec = {"section": "vqa", "case": f"{n_img} images x {q} questions", "model": who, "variant": variant,
                   "batch": n_img * q, "prompt_len": 12, "new_tokens": new,
                   "weights": wdesc if who == "ours" else "bf16 weights",
                   "what": "generate over all questions in one batch: images encoded once per image either way "
                   "(recompute forks the encoded image per question and prefills [image][question])"}  # fmt: skip

            def measure(run=run, who=who):
                with torch.no_grad(), self.amp() if amp and who == "ours" else contextlib.nullcontext():
                    r = self.timed(run, 0)
                r["questions_per_s"] = n_img * q / (r["median_ms"] / 1e3)
                return r

            self.case(rec, measure)
        with torch.no_grad(), self.amp() if amp else contextlib.nullcontext():
            same = torch.equal(runs[("ours", "image_state_cache")](), runs[("ours", "recompute")]())
        self.info["vqa_cache_equals_recompute_tokens"] = same
        self.clean()

    # ------------------------------------------------------------------ environment
    def environment(self) -> dict:
        d = self.device
        env = {
            "device": d.type,
            "device_name": torch.cuda.get_device_name(d) if self.cuda else cpu_name(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "python": sys.version.split()[0],
            "triton": version("triton"),
            "mamba_ssm": version("mamba-ssm"),
            "causal_conv1d": version("causal-conv1d"),
            "transformers": version("transformers"),
            "kernel_family": kernel_family(device=d),
            "cuda_kernels_unavailable_reason": cuda_unavailable_reason() if self.cuda else None,
            "dtype": "bf16 autocast over fp32 weights (training, prefill); bf16 weights (decoding, VQA)"
            if self.args.bf16
            else "fp32",
            "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
            "compile": sorted(self.compile),
            "fused_decode_step": bool(getattr(self.args, "fused_step", False)),
            "git": git_info(self.args.git_info),
        }
        if self.cuda:
            env["gpu_memory_bytes"] = torch.cuda.get_device_properties(d).total_memory
            with contextlib.suppress(Exception):
                q = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,power.limit",
                                    "--format=csv,noheader"], capture_output=True, text=True, timeout=20)  # fmt: skip
                env["driver_clock_power"] = q.stdout.strip()
        return env


class PeerViT(nn.Module):
    """The peer's ViT alone (patch embed, position table resized as VisionMamba's is, blocks, norm)."""

    def __init__(self, peer: nn.Module, grid: int) -> None:
        super().__init__()
        self.patch_embed, self.pos_embed = peer.patch_embed, peer.pos_embed
        self.blocks, self.norm, self.grid = peer.vision_layers, peer.vision_norm, grid

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x, grid = self.patch_embed(images)  # (b, p, d)
        x = x + interpolate_pos_embed(self.pos_embed, self.grid, grid).to(x.dtype)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)


# ----------------------------------------------------------------------------------- decoders
class Decoder:
    """Greedy decoding of ``k`` new tokens after a prompt, each call from the prompt (prefill included)."""

    path = ""
    amp = False  # run under bf16 autocast (fp32 weights)

    def __init__(self, model: nn.Module, suite: Suite) -> None:
        self.model, self.suite = model, suite

    def ctx(self):
        return self.suite.amp() if self.amp else contextlib.nullcontext()

    def prepare(self, ids: torch.Tensor, n: int) -> None:
        self.run(ids, n)

    def release(self) -> None:
        """Drop caches and graphs held between calls."""

    def run(self, ids: torch.Tensor, k: int) -> torch.Tensor:
        raise NotImplementedError

    def state_bytes(self, b: int, length: int) -> int:
        raise NotImplementedError

    def step_bytes(self, b: int, length: int) -> int:
        """Bytes a decode step must read and write beyond the weights (state in and out, or the KV read)."""
        return 2 * self.state_bytes(b, length)


class OursDecoder(Decoder):
    """Our LanguageMamba: prefill with the state returned, then the step loop of ``vlm_mamba.generation``.

    A graph-captured decode path (issue 16) plugs in here: if ``LanguageMamba`` grows a ``generate``
    method, it is used (with the keyword arguments it accepts) and ``path`` says so.
    """

    def __init__(self, model: nn.Module, suite: Suite) -> None:
        super().__init__(model, suite)
        self.native = getattr(model, "generate", None)
        if self.native is not None:
            self.path = f"LanguageMamba.generate{inspect.signature(self.native)}"
        else:
            self.path = (
                "eager: LanguageMamba(return_state=True) prefill + vlm_mamba.generation.decode step loop"
            )

    fused: bool | None = None  # ops.set_fused_step for this decoder's calls (None: as set globally)
    fused_conv: bool | None = None  # VLM_MAMBA_FUSED_CONV=1/0 for this decoder's calls (None: unset)
    xproj: bool = False  # VLM_MAMBA_FUSED_XPROJ=1 for this decoder's calls (False: unset)
    sample_kw: dict = {}  # generate's sampling arguments (empty: greedy)

    @torch.no_grad()
    def run(self, ids: torch.Tensor, k: int) -> torch.Tensor:
        from vlm_mamba import ops

        before = ops._fused_step
        if self.fused is not None:
            ops.set_fused_step(self.fused)
        try:
            with (
                self.ctx(),
                _env(ops.FUSED_CONV_ENV, _conv_env(self.fused_conv)),
                _env(ops.FUSED_XPROJ_ENV, "1" if self.xproj else None),
            ):
                return self._run(ids, k)
        finally:
            ops.set_fused_step(before)

    def _run(self, ids: torch.Tensor, k: int) -> torch.Tensor:
        m = self.model
        if self.native is not None:
            params = inspect.signature(self.native).parameters
            kw = {"max_new_tokens": k, **self.sample_kw}
            if "eos_token_id" in params:
                kw["eos_token_id"] = None
            out = self.native(ids, **kw)
            return out[:, -k:] if out.shape[1] != k else out
        o = m(ids, return_state=True, logits="last")

        def step_fn(tok, st):
            r = m.step(input_ids=tok, state=st)
            return r.logits, r.state

        return decode(step_fn, o.state, o.logits[:, -1], GenerationConfig(max_new_tokens=k))

    def state_bytes(self, b: int, length: int) -> int:
        st = self.model.allocate_inference_cache(1, dtype=torch.bfloat16, device="meta")
        return b * sum(t.numel() * t.element_size() for layer in st for t in (layer.conv, layer.ssm))


class StockDecoder(Decoder):
    """mamba_ssm's ``generate(cg=True)``: its graph cache is captured in ``prepare`` (the largest length)."""

    path = "mamba_ssm MambaLMHeadModel.generate(cg=True, top_k=1)"
    sample_kw: dict = {}  # generate's sampling arguments (empty: greedy, top_k=1)

    @torch.no_grad()
    def run(self, ids: torch.Tensor, k: int) -> torch.Tensor:
        kw = self.sample_kw or {"top_k": 1}
        out = self.model.generate(ids, max_length=ids.shape[1] + k, cg=True, **kw)
        return out[:, ids.shape[1] :]

    def release(self) -> None:
        self.model._decoding_cache = None

    def state_bytes(self, b: int, length: int) -> int:
        cache = self.model.allocate_inference_cache(1, length, dtype=torch.bfloat16)
        n = sum(t.numel() * t.element_size() for conv_ssm in cache.values() for t in conv_ssm)
        return b * n


class LlamaDecoder(Decoder):
    """transformers' LlamaForCausalLM decoded with a static KV cache by a hand-written loop.

    Prefill: the model's own modules over the prompt, SDPA ``is_causal`` (FlashAttention in bf16),
    keys/values written into preallocated (b, h, L, k) buffers; decoding: one step (embedding, the
    layers' norms, projections and MLPs, RoPE at a position held in a device tensor, SDPA over the
    buffers with a length mask) captured once per (batch, capacity) as a CUDA graph and replayed;
    greedy argmax outside the graph. ``teacher_forced`` checks it against the HF forward.
    """

    path = (
        "transformers LlamaForCausalLM modules, static KV cache, hand-written CUDA-graph step (eager kernels)"
    )

    def __init__(self, model: nn.Module, suite: Suite) -> None:
        super().__init__(model, suite)
        c = model.config
        self.L, self.h = c.num_hidden_layers, c.num_attention_heads
        self.kv_h = getattr(c, "num_key_value_heads", None) or self.h
        self.hd = getattr(c, "head_dim", None) or c.hidden_size // self.h
        rope = getattr(c, "rope_parameters", None) or {}
        self.theta = float(rope.get("rope_theta", getattr(c, "rope_theta", 10000.0)) or 10000.0)
        self.key: tuple | None = None
        self.graph_ok: bool | None = None

    def state_bytes(self, b: int, length: int) -> int:
        return 2 * self.L * b * self.kv_h * length * self.hd * 2  # bf16 keys + values

    def step_bytes(self, b: int, length: int) -> int:
        return self.state_bytes(b, length) // 1  # the step reads the filled keys and values once

    def _rope(self, pos: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (l, hd) for positions ``pos`` (l,), HF's rotate-half layout, fp32 angles."""
        inv = 1.0 / self.theta ** (
            torch.arange(0, self.hd, 2, device=pos.device, dtype=torch.float32) / self.hd
        )
        ang = pos.float()[:, None] * inv[None]
        ang = torch.cat([ang, ang], -1)
        return ang.cos().to(dtype), ang.sin().to(dtype)

    @staticmethod
    def _rot(x, cos, sin):
        x1, x2 = x.chunk(2, -1)
        return x * cos + torch.cat([-x2, x1], -1) * sin

    def _layers(self, x: torch.Tensor, pos: torch.Tensor, cos, sin, prefill: bool) -> torch.Tensor:
        """x (b, s, d) at positions ``pos`` (s,) -> hidden (b, s, d); writes K/V at ``pos``."""
        b, s, _ = x.shape
        core = self.model.model
        for i, layer in enumerate(core.layers):
            at = layer.self_attn
            hn = layer.input_layernorm(x)
            q = at.q_proj(hn).view(b, s, self.h, self.hd).transpose(1, 2)  # (b, h, s, k)
            k = at.k_proj(hn).view(b, s, self.kv_h, self.hd).transpose(1, 2)
            v = at.v_proj(hn).view(b, s, self.kv_h, self.hd).transpose(1, 2)
            q, k = self._rot(q, cos, sin), self._rot(k, cos, sin)
            self.k[i].index_copy_(2, pos, k)
            self.v[i].index_copy_(2, pos, v)
            if prefill:
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.kv_h != self.h)
            else:
                valid = (torch.arange(self.cap, device=x.device) <= pos[0])[None, None, None]  # (1,1,1,L)
                y = F.scaled_dot_product_attention(q, self.k[i], self.v[i], attn_mask=valid,
                                                   enable_gqa=self.kv_h != self.h)  # fmt: skip
            x = x + at.o_proj(y.transpose(1, 2).reshape(b, s, -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return core.norm(x)

    def release(self) -> None:
        self.k = self.v = self.graph = self.logits = None
        self.key = None

    def _alloc(self, b: int, cap: int, dtype, device) -> None:
        if self.key == (b, cap):
            return
        self.k = self.v = None
        self.graph = None
        gc.collect()
        self.k = [torch.zeros(b, self.kv_h, cap, self.hd, dtype=dtype, device=device) for _ in range(self.L)]
        self.v = [torch.zeros_like(t) for t in self.k]
        self.cap, self.key = cap, (b, cap)
        self.tok = torch.zeros(b, dtype=torch.long, device=device)
        self.pos = torch.zeros(1, dtype=torch.long, device=device)

    def _step(self) -> torch.Tensor:
        x = self.model.model.embed_tokens(self.tok)[:, None]  # (b, 1, d)
        cos, sin = self._rope(self.pos, x.dtype)
        h = self._layers(x, self.pos, cos, sin, prefill=False)
        return self.model.lm_head(h[:, 0])  # (b, V)

    def _capture(self) -> None:
        self.graph = None
        if not self.suite.cuda:
            return
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                self._step()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            self.logits = self._step()
        self.graph = g
        self.graph_ok = True

    def _prefill(self, ids: torch.Tensor) -> torch.Tensor:
        s = ids.shape[1]
        pos = torch.arange(s, device=ids.device)
        x = self.model.model.embed_tokens(ids)
        cos, sin = self._rope(pos, x.dtype)
        h = self._layers(x, pos, cos, sin, prefill=True)
        self.pos.fill_(s)
        return self.model.lm_head(h[:, -1])  # (b, V)

    def _advance(self, tok: torch.Tensor) -> torch.Tensor:
        self.tok.copy_(tok)
        if self.graph is not None:
            self.graph.replay()
            logits = self.logits
        else:
            logits = self._step()
        self.pos.add_(1)
        return logits

    @torch.no_grad()
    def prepare(self, ids: torch.Tensor, n: int) -> None:
        dtype = next(self.model.parameters()).dtype
        self._alloc(ids.shape[0], ids.shape[1] + n, dtype, ids.device)
        self._capture()
        self.run(ids, n)

    @torch.no_grad()
    def run(self, ids: torch.Tensor, k: int) -> torch.Tensor:
        logits = self._prefill(ids)
        out = [logits.argmax(-1)]
        for _ in range(k - 1):
            out.append(self._advance(out[-1]).argmax(-1))
        return torch.stack(out, 1)

    @torch.no_grad()
    def teacher_forced(self, prompt: torch.Tensor, nxt: torch.Tensor) -> torch.Tensor:
        """Logits at the last prompt position and after each of ``nxt`` (b, m) but the last: (b, m, V)."""
        self.prepare(prompt, nxt.shape[1] + 1)
        out = [self._prefill(prompt).float()]
        for i in range(nxt.shape[1] - 1):
            out.append(self._advance(nxt[:, i]).float().clone())
        return torch.stack(out, 1)


# ----------------------------------------------------------------------------------- summary
def _get(records: list[dict], **kw) -> dict | None:
    """The measured record matching ``kw``; in a merged file, the one of the latest run."""
    found = [
        r
        for r in records
        if all(r.get(k) == v for k, v in kw.items()) and "skipped" not in r and "error" not in r
    ]
    return max(found, key=lambda r: r.get("run", 0)) if found else None


def _best(records: list[dict], **kw) -> dict | None:
    """The fastest variant matching ``kw``: each variant's latest measurement, then the best of them
    (a later run that measured only some variants does not hide the others)."""
    rs = [r for r in records if all(r.get(k) == v for k, v in kw.items()) and "tokens_per_s" in r]
    latest: dict = {}
    for r in rs:
        v = r.get("variant")
        if v not in latest or r.get("run", 0) >= latest[v].get("run", 0):
            latest[v] = r
    return max(latest.values(), key=lambda r: r["tokens_per_s"]) if latest else None


def summarize(records: list[dict]) -> dict:
    """The headline rows: ratios ours / reference, the crossover and the scaling exponents (of the
    latest run's record of each measurement, in a merged file)."""
    records = latest_records(records)
    rows: list[dict] = []

    def add(topic, case, ours, ref, metric, ref_name, higher_better=True, extra=None):
        if ours is None or ref is None or ours.get(metric) is None or ref.get(metric) is None:
            return
        o, f = ours[metric], ref[metric]
        rows.append({"topic": topic, "case": case, "metric": metric, "ours": o, "reference": f, "ref": ref_name,
                     "ratio": (o / f if higher_better else f / o) if o and f else None,
                     "ours_peak_gib": ours.get("peak_gib"), "ref_peak_gib": ref.get("peak_gib"),
                     **(extra or {})})  # fmt: skip

    for r in records:
        if r["section"] == "lm_vs_stock" and r["model"] == "ours" and "tokens_per_s" in r:
            ref_variant = {"unpadded": "unpadded", "right_padded": "padded_unmasked",
                           "left_padded": "padded_unmasked", "unpadded_checkpointed": "unpadded"}[r["variant"]]  # fmt: skip
            ref = _get(records, section="lm_vs_stock", case=r["case"], model="stock", variant=ref_variant)
            add(
                "train vs stock mamba_ssm",
                f"{r['case']} {r['variant']}",
                r,
                ref,
                "tokens_per_s",
                "stock",
                extra={"ours_mfu": r.get("mfu"), "ref_mfu": (ref or {}).get("mfu")},
            )
            if "tokens_per_s_best" in r and ref and "tokens_per_s_best" in ref:
                add("train vs stock mamba_ssm (fastest call)", f"{r['case']} {r['variant']}", r, ref,
                    "tokens_per_s_best", "stock")  # fmt: skip
        if r["section"] == "lm_prefill" and r["model"] == "ours":
            ref = _get(records, section="lm_prefill", case=r["case"], model="stock")
            add("prefill vs stock mamba_ssm", r["case"], r, ref, "tokens_per_s", "stock")
    for case in dict.fromkeys(r["case"] for r in records if r["section"] == "arch"):
        ref_name = "llama" if case.startswith("lm") else "peer"
        add("train vs transformer (best variant of each)", case, _best(records, section="arch", case=case, model="ours"),
            _best(records, section="arch", case=case, model=ref_name), "tokens_per_s", ref_name)  # fmt: skip
        if case.startswith("lm"):  # issue 15: the fused chunked loss against the plain head + fp32 CE
            own = _get(
                records, section="arch", case=case, model="ours", variant="eager, labels= (model's loss)"
            )
            plain = _get(records, section="arch", case=case, model="ours", variant="eager")
            add("LM train: labels= (fused chunked loss) vs plain head + fp32 CE", case, own, plain, "tokens_per_s",
                "plain head")  # fmt: skip
    lens = sorted({r["length"] for r in records if r["section"] == "lengths"})
    xs, ratio, per_seq = [], [], {"ours": [], "peer": []}
    for L in lens:
        o, p = (
            _get(records, section="lengths", length=L, model="ours"),
            _get(records, section="lengths", length=L, model="peer"),
        )
        add("train vs peer by length", f"L={L}", o, p, "tokens_per_s", "peer")
        if o and p:
            xs.append(L)
            ratio.append(o["tokens_per_s"] / p["tokens_per_s"])
            per_seq["ours"].append(o["median_ms"] / o["batch"])
            per_seq["peer"].append(p["median_ms"] / p["batch"])
    scaling = {
        "lengths": xs,
        "ours_over_peer_tokens_per_s": ratio,
        "crossover_length": crossover(xs, ratio),
        "crossover_note": "total length where ours/peer tokens/s first crosses 1 (log-linear); None: no crossing "
        "in the measured range (see the ratios)",
        "exponent_ms_per_sequence": {k: fit_exponent(xs, v) for k, v in per_seq.items()},
        "exponent_note": "slope of log(step ms / batch) over log(length): 1 = linear, 2 = quadratic",
    }
    for r in records:
        if r["section"] == "decode" and r["model"].startswith("ours") and "itl_ms" in r:
            fused = {"ours_fused": ", fused step forced, conv separate", "ours_unfused": ", unfused step forced",
                     "ours_fused_conv": ", fused step + conv in in_proj",
                     "ours_fused_xproj": ", + x_proj's partials in in_proj (opt-in)",
                     "ours_sample": ", sampling"}.get(r["model"], "")  # fmt: skip
            refs = ("stock", "llama") if r["ssm"] == "mamba1" else ("stock",)
            for ref_name in ("stock_sample",) if r["model"] == "ours_sample" else refs:
                ssm = "-" if ref_name == "llama" else r["ssm"]
                ref = _get(records, section="decode", case=r["case"], model=ref_name, ssm=ssm)
                add(f"decode vs {ref_name} ({r['ssm']}{fused})", r["case"], r, ref, "decode_tokens_per_s", ref_name,
                    extra={"ours_itl_ms": r["itl_ms"], "ref_itl_ms": (ref or {}).get("itl_ms"),
                           "ours_ttft_ms": r["ttft_ms"], "ref_ttft_ms": (ref or {}).get("ttft_ms"),
                           "ours_state_bytes": r["state_bytes"], "ref_state_bytes": (ref or {}).get("state_bytes"),
                           "ours_hbm_fraction": r.get("hbm_fraction"), "ref_hbm_fraction": (ref or {}).get("hbm_fraction")})  # fmt: skip
    for r in records:
        if r["section"] == "prefill_state" and not r["variant"].startswith("from_zero_state"):
            zero = "from_zero_state_graph" if "_graph" in r["variant"] else "from_zero_state"
            ref = _get(records, section="prefill_state", case=r["case"], variant=zero)
            form = {"from_image_state_one_pass": ", one-pass Triton scan forced",
                    "from_image_state_two_pass": ", two passes forced (zero-state kernel + h0 term)",
                    "from_image_state_prefix": ", state as 2n prefix tokens forced",
                    "from_image_state_graph": ", both in CUDA graphs",
                    "from_image_state_graph_two_pass": ", both in CUDA graphs, two passes forced"}  # fmt: skip
            add(f"prompt prefill: from the image state vs from zero{form.get(r['variant'], '')}", r["case"], r, ref,
                "tokens_per_s", "zero state")  # fmt: skip
        if r["section"] == "prefill_vlm" and r["model"] == "ours":
            ref = _get(records, section="prefill_vlm", case=r["case"], model="peer")
            graphed = str(r.get("variant", "")).startswith("prefill_graph")
            add("VLM prefill (generate 1 token) vs peer" + (", ours with prefill graphs" if graphed else ""),
                r["case"], r, ref, "tokens_per_s", "peer")  # fmt: skip
    o, p = (
        _get(records, section="decode_vlm", model="vlm_generate"),
        _get(records, section="decode_vlm", model="lm_alone"),
    )
    add("VLM generate vs its LM alone (ITL)", "b=1", o, p, "decode_tokens_per_s", "lm_alone")
    for r in records:
        if r["section"] == "vision" and r["model"] == "ours" and "images_per_s" in r:
            ref = _get(records, section="vision", case=r["case"], model="peer", variant=r["variant"])
            add(f"vision encoder {r['variant']} vs ViT", r["case"], r, ref, "images_per_s", "peer ViT")
    c = _get(records, section="vqa", model="ours", variant="image_state_cache")
    add("VQA: image-state cache vs recompute", "ours", c, _get(records, section="vqa", model="ours", variant="recompute"),
        "questions_per_s", "ours recompute")  # fmt: skip
    add("VQA: ours cache vs peer", "peer recomputes", c, _get(records, section="vqa", model="peer"),
        "questions_per_s", "peer")  # fmt: skip
    cg = _get(records, section="vqa", model="ours", variant="image_state_cache_graphs")
    add("VQA: image-state cache + prefill graphs vs recompute", "ours", cg,
        _get(records, section="vqa", model="ours", variant="recompute"), "questions_per_s", "ours recompute")  # fmt: skip
    add("VQA: ours cache + prefill graphs vs peer", "peer recomputes", cg, _get(records, section="vqa", model="peer"),
        "questions_per_s", "peer")  # fmt: skip
    cs = _get(records, section="vqa", model="ours", variant="image_state_cache_graphs_short_scan_off")
    rs = _get(records, section="vqa", model="ours", variant="recompute_short_scan_off")
    add(
        "VQA, short scan off: cache + prefill graphs vs recompute",
        "ours",
        cs,
        rs,
        "questions_per_s",
        "ours recompute",
    )
    add("VQA: cache + prefill graphs, default vs short scan off", "ours", cg, cs, "questions_per_s",
        "ours short scan off")  # fmt: skip
    lead = [
        {"batch": r["batch"], "context": r["context"], "ours_over_llama_decode_tokens_per_s": x["ratio"]}
        for x in rows
        if x["topic"] == "decode vs llama (mamba1)"
        for r in [_get(records, section="decode", case=x["case"], model="ours", ssm="mamba1")]
        if r is not None and x["ratio"] is not None
    ]
    decode_lead = {
        "cases": lead,
        "ours_leads_at": [
            (c["batch"], c["context"]) for c in lead if c["ours_over_llama_decode_tokens_per_s"] > 1
        ],
        "note": "decode-phase tokens/s of ours (Mamba-1) over Llama (static KV cache, CUDA graph) per (batch, context)",
    }
    return {"rows": rows, "scaling": scaling, "decode_lead_vs_llama": decode_lead}


def summarize_runs(records: list[dict]) -> dict:
    """The summary of a merged file: each run summarized on its own records, then each row (topic,
    case, metric, reference) taken from the latest run that has it, so a ratio always pairs two
    records of one run (tagged ``run``); the scaling fits from the latest run that has them, the
    decode lead over Llama per (batch, context) from the latest run that measured it."""
    runs = sorted({r.get("run", 0) for r in records})
    rows: dict[tuple, dict] = {}
    scaling: dict = {}
    lead = summarize([])["decode_lead_vs_llama"]
    cases: dict[tuple, dict] = {}
    for i in runs:
        part = summarize([r for r in records if r.get("run", 0) == i])
        for row in part["rows"]:
            rows[(row["topic"], row["case"], row["metric"], row["ref"])] = {**row, "run": i}
        if part["scaling"]["lengths"]:
            scaling = {**part["scaling"], "run": i}
        for c in part["decode_lead_vs_llama"]["cases"]:  # each (batch, context) from its latest run
            cases[(c["batch"], c["context"])] = {**c, "run": i}
    lead["cases"] = list(cases.values())
    lead["ours_leads_at"] = [k for k, c in cases.items() if c["ours_over_llama_decode_tokens_per_s"] > 1]
    return {"rows": list(rows.values()), "scaling": scaling or summarize([])["scaling"],
            "decode_lead_vs_llama": lead}  # fmt: skip


def print_summary(summary: dict, env: dict) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # plain text
        for r in summary["rows"]:
            print(r)
        print(summary["scaling"])
        return
    t = Table(title=f"bench_gpu headline [{env['device_name']}, torch {env['torch']}, mamba_ssm {env['mamba_ssm']}, "
              f"{env['dtype']}]", title_justify="left")  # fmt: skip
    for col in ("topic", "case", "metric", "ours", "reference", "ratio", "peak GiB ours/ref"):
        t.add_column(col, justify="right" if col not in ("topic", "case") else "left")
    for r in summary["rows"]:
        peaks = "-"
        if r.get("ours_peak_gib") is not None and r.get("ref_peak_gib") is not None:
            peaks = f"{r['ours_peak_gib']:.1f}/{r['ref_peak_gib']:.1f}"
        t.add_row(r["topic"], r["case"], r["metric"], f"{r['ours']:,.1f}", f"{r['reference']:,.1f} ({r['ref']})",
                  f"{r['ratio']:.2f}x" if r["ratio"] else "-", peaks)  # fmt: skip
    Console(width=170).print(t)
    sc = summary["scaling"]
    if sc["lengths"]:
        print(f"lengths: ours/peer tokens/s {dict(zip(sc['lengths'], [round(x, 2) for x in sc['ours_over_peer_tokens_per_s']]))}, "
              f"crossover {sc['crossover_length']}, exponents {sc['exponent_ms_per_sequence']}")  # fmt: skip


def _state_scan_default() -> str:
    """What a prefill from a state runs by default here: "cuda" (the CUDA scan from h0 is built) or
    the reason it is not, and the Triton forms serve."""
    if not torch.cuda.is_available():
        return "no CUDA"
    from vlm_mamba.ops import cuda_scan_state

    return (
        "cuda" if cuda_scan_state.load() is not None else f"triton ({cuda_scan_state.unavailable_reason()})"
    )


def _graphed(fn: Callable[[], Any]) -> Callable[[], Any]:
    """``fn`` (fixed inputs) captured once in a CUDA graph after two warm-up calls on a side stream;
    the returned callable replays it and returns the captured outputs."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn()

    def replay():
        g.replay()
        return out

    return replay


def git_info(path: str | None) -> dict:
    """The commit measured: from ``--git-info`` (a JSON written before the run, as the GPU copy has no .git)."""
    if path and Path(path).is_file():
        return json.loads(Path(path).read_text())
    with contextlib.suppress(Exception):
        root = Path(__file__).resolve().parents[1]
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True).stdout.split("\n")  # fmt: skip
        return {"commit": head, "modified_tracked_files": [d.strip() for d in dirty if d.strip()]}
    return {"commit": None}


# ----------------------------------------------------------------------------------- CLI
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    ap.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS),
                    help="run in the order given (the time budget's cut falls on the last)")  # fmt: skip
    ap.add_argument("--quick", action="store_true", help="tiny sizes on the CPU (a smoke run of every path)")
    ap.add_argument("--smoke", action="store_true", help="the GPU plan's smallest case of each section only")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    ap.add_argument(
        "--time-budget",
        type=float,
        default=0,
        help="seconds from the start of the process; cases past it are skipped",
    )
    ap.add_argument("--compile", nargs="*", default=None, choices=["ours", "peer", "llama", "vit"],
                    help="what gets torch.compile (default on CUDA: peer llama; none on CPU)")  # fmt: skip
    ap.add_argument("--ssm", nargs="+", choices=["mamba1", "mamba2"], help="lm_vs_stock families")
    ap.add_argument("--repeat", type=int)
    ap.add_argument(
        "--decode-batches", type=int, nargs="+", help="decode section: batch sizes (default: the plan's)"
    )
    ap.add_argument("--decode-contexts", type=int, nargs="+", help="decode section: prompt lengths")
    ap.add_argument("--fused-step", action="store_true",
                    help="decode section: also Mamba-1 rows 'ours_fused' and 'ours_unfused' (the fused step "
                         "forced on / off, ops.set_fused_step) beside the default's (fused at batch 1), same run")  # fmt: skip
    ap.add_argument("--fused-xproj", action="store_true",
                    help="decode section: also a Mamba-1 row 'ours_fused_xproj' (VLM_MAMBA_FUSED_XPROJ=1: x_proj's "
                    "partial products in in_proj's kernel, summed by the state update), same run")  # fmt: skip
    ap.add_argument("--decode-sampling", action="store_true",
                    help=f"decode section: also Mamba-1 rows 'ours_sample' / 'stock_sample' (generate with {SAMPLING}; "
                    "ours samples inside the decode graph, stock outside its graph), same run")  # fmt: skip
    ap.add_argument("--short-scan", action="store_true",
                    help="vqa section: also ours with VLM_MAMBA_SHORT_SCAN=0 (mamba_ssm's scan where the default takes the "
                    "step-at-a-time Triton scan: forward-only scans up to 256 tokens from 32 rows), same run")  # fmt: skip
    ap.add_argument("--warmup", type=int)
    ap.add_argument("--git-info", help="JSON with the commit measured (written before a GPU call)")
    ap.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/bench_gpu_<device>.json)")
    ap.add_argument("--isolate", action="store_true",
                    help="each section in its own process (a crash, e.g. a segfault in a compile, loses that "
                    "section's remaining cases only), the runs merged into --out")  # fmt: skip
    ap.add_argument("--merge", nargs="+", type=Path, metavar="JSON",
                    help="no run: merge the records of these runs (e.g. two GPU calls) into --out, summary recomputed")  # fmt: skip
    return ap.parse_args(argv)


def smoke(plan: Plan) -> Plan:
    """The smallest case of every section (one call to shake out API errors)."""
    plan.lm_lengths, plan.lengths = plan.lm_lengths[:1], plan.lengths[:1]
    plan.decode_batches, plan.decode_contexts, plan.decode_new = (
        plan.decode_batches[:1],
        plan.decode_contexts[:1],
        8,
    )
    plan.decode_mamba2 = plan.decode_mamba2[:1]
    plan.vision_sizes = plan.vision_sizes[:1]
    plan.arch_batch, plan.vqa_images = min(plan.arch_batch, 16), min(plan.vqa_images, 4)
    plan.warmup, plan.repeat = 1, 2
    return plan


def merge(paths: list[Path], out: Path) -> int:
    """One JSON from several runs of the suite (sections split over calls): records concatenated,
    each tagged with its run; environments and infos kept per run; the summary recomputed run by run
    (:func:`summarize_runs`: every ratio pairs two records of one run). Runs are taken in the order of
    their dates, whatever the order given, so "the latest run's record" means the latest measured
    (``--merge results/bench_gpu_<device>_run_*.json`` rebuilds a merged file from its runs)."""

    def date(run: dict) -> str:  # a run, or a merged file (--isolate's output: one call's sections)
        return run["date"] if "command" in run else run["merged_from"][-1]["date"]

    loaded = sorted(((p, json.loads(p.read_text())) for p in paths), key=lambda pr: date(pr[1]))
    paths, runs = [p for p, _ in loaded], [r for _, r in loaded]
    records = []
    for i, run in enumerate(runs):
        records += [{**r, "run": i} for r in run["records"]]
    info: dict[str, Any] = {}
    for run in runs:
        info.update(run["info"])

    def meta(r: dict) -> dict:  # a run, or a merged file (--isolate's output: one call's sections)
        if "command" in r:
            return {k: r[k] for k in ("command", "date", "wall_s", "complete")}
        parts = r["merged_from"]
        return {"command": "; ".join(m["command"] for m in parts), "date": date(r),
                "wall_s": sum(m["wall_s"] for m in parts), "complete": all(m["complete"] for m in parts)}  # fmt: skip

    result = {
        "benchmark": "bench_gpu",
        "merged_from": [
            {"file": p.name, **meta(r), "sections": sorted({x["section"] for x in r["records"]})}
            for p, r in zip(paths, runs)
        ],
        "environment": runs[0]["environment"],
        "environments": [r["environment"] for r in runs],
        "plan": runs[0]["plan"],
        "conventions": runs[0]["conventions"],
        "info": info,
        "records": records,
        "summary": summarize_runs(records),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str) + "\n")
    print_summary(result["summary"], result["environment"])
    print(f"merged {len(paths)} runs, {len(records)} records -> {out}")
    return 0


def _without(argv: list[str], flags: dict[str, int]) -> list[str]:
    """argv without the given options (flag -> how many values it takes; -1: until the next option)."""
    out, i = [], 0
    while i < len(argv):
        a = argv[i]
        if a in flags:
            n = flags[a]
            i += 1
            if n < 0:
                while i < len(argv) and not argv[i].startswith("--"):
                    i += 1
            else:
                i += n
            continue
        out.append(a)
        i += 1
    return out


def isolated(args: argparse.Namespace, argv: list[str]) -> int:
    """--isolate: one child process per section, each with its share of the time budget (by weight,
    unused time rolling on, as in one process); a child that dies (a signal, a crash in a compiler)
    leaves its partial JSON and an error record; the runs merged into --out."""
    base = _without(argv, {"--isolate": 0, "--sections": -1, "--out": 1, "--time-budget": 1})
    order = list(dict.fromkeys(args.sections))
    out = args.out or RESULTS / "bench_gpu_isolated.json"
    parts_dir = out.parent / f".{out.stem}_parts"
    parts_dir.mkdir(parents=True, exist_ok=True)
    t0, parts, crashed = time.perf_counter(), [], []
    for i, section in enumerate(order):
        cmd = [sys.executable, str(Path(__file__).resolve()), *base, "--sections", section]
        if args.time_budget:
            left = args.time_budget - (time.perf_counter() - t0)
            share = max(left, 0.0) * SECTION_WEIGHT[section] / sum(SECTION_WEIGHT[x] for x in order[i:])
            if share < 5:
                crashed.append({"section": section, "case": "setup", "model": "-",
                                "skipped": f"time budget: {share:.0f} s left for this section"})  # fmt: skip
                continue
            cmd += ["--time-budget", f"{share:.0f}"]
        part = parts_dir / f"{section}.json"
        cmd += ["--out", str(part)]
        print(f"== {section} in its own process: {' '.join(cmd[1:])}", flush=True)
        rc = subprocess.run(cmd, env={**os.environ, "OUT": ""}).returncode
        if part.exists():
            parts.append(part)
        if rc < 0 or (rc != 0 and not part.exists()):
            what = f"signal {-rc}" if rc < 0 else f"exit status {rc}"
            crashed.append({"section": section, "case": "process", "model": "-",
                            "error": f"the section's process ended with {what}; its records up to then are kept"})  # fmt: skip
    if not parts:
        print("no section wrote a result", file=sys.stderr)
        return 1
    merge(parts, out)
    result = json.loads(out.read_text())
    result["records"] += crashed
    result["summary"] = summarize(result["records"])
    result["isolated"] = {"sections": order, "wall_s": time.perf_counter() - t0}
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1, default=str) + "\n")
    tmp.replace(out)
    if os.environ.get("OUT"):
        shutil.copy(out, Path(os.environ["OUT"]) / out.name)  # only $OUT comes back from a GPU machine
    return 1 if crashed and any("error" in c for c in crashed) else 0


def main(argv: list[str] | None = None) -> int:
    raw = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.merge:
        return merge(args.merge, args.out or RESULTS / "bench_gpu_merged.json")
    if args.isolate and len(set(args.sections)) > 1:
        return isolated(args, raw)
    dev = (
        args.device
        if args.device != "auto"
        else ("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    )
    device = torch.device(dev)
    if device.type == "cuda":
        if device.index is not None:
            torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    args.bf16 = device.type == "cuda"
    if args.compile is None:
        args.compile = ["peer", "llama"] if device.type == "cuda" else []
    plan = Plan.quick() if args.quick or device.type == "cpu" else Plan.gpu()
    if args.smoke:
        plan = smoke(plan)
    if args.ssm:
        plan.ssms = args.ssm
    if args.repeat:
        plan.repeat = args.repeat
    if args.decode_batches:
        plan.decode_batches = args.decode_batches
    if args.decode_contexts:
        plan.decode_contexts = args.decode_contexts
    if args.warmup is not None:
        plan.warmup = args.warmup
    suite = Suite(args, plan, device)
    suite.env = suite.environment()
    slug = (
        "cpu"
        if device.type == "cpu"
        else re.sub(r"[^a-z0-9]+", "_", suite.env["device_name"].lower()).strip("_")
    )
    out = args.out or RESULTS / f"bench_gpu_{slug}.json"
    suite.out_paths = [out]
    if os.environ.get("OUT") and Path(os.environ["OUT"]).resolve() not in out.resolve().parents:
        suite.out_paths.append(Path(os.environ["OUT"]) / out.name)  # only $OUT comes back from a GPU machine
    env = suite.env
    print(f"bench_gpu: {env['device_name']} | torch {env['torch']} | triton {env['triton']} | mamba_ssm "
          f"{env['mamba_ssm']} | causal_conv1d {env['causal_conv1d']} | transformers {env['transformers']} | "
          f"kernels {env['kernel_family']} | compile {env['compile']} | git {env['git'].get('commit')}", flush=True)  # fmt: skip
    try:
        suite.info["peer_self_check_max_abs_diff"] = peer_self_check(device)
    except Exception as err:
        suite.info["peer_self_check_max_abs_diff"] = f"FAILED: {err}"
        suite.errors += 1
    order = list(dict.fromkeys(args.sections))  # in the order given: a budget cut falls on the last
    for i, section in enumerate(order):
        suite.set_section_deadline(section, order[i:])
        print(f"== {section} (budget left {suite.left_s():.0f} s)", flush=True)
        try:
            getattr(suite, section)()
        except Exception as err:  # a section that cannot even start is recorded, the rest still runs
            suite.records.append({"section": section, "case": "setup", "model": "-",
                                  "error": f"{type(err).__name__}: {str(err)[:400]}"})  # fmt: skip
            suite.errors += 1
            traceback.print_exc()
        suite.clean()
        suite.write()
    suite.write(final=True)
    print_summary(summarize(suite.records), env)
    skipped = [r for r in suite.records if "skipped" in r]
    print(f"wall {time.perf_counter() - suite.t0:.0f} s; {len(suite.records)} records, {len(skipped)} skipped, "
          f"{suite.errors} errors; results in {', '.join(map(str, suite.out_paths))}")  # fmt: skip
    return 1 if suite.errors else 0


if __name__ == "__main__":
    raise SystemExit(main())

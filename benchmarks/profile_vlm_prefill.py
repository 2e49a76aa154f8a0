"""Where the VLM's prefill time goes on CUDA (``base``, bf16 weights): the image-state prefill (its
CUDA graph), the prompt's prefill from that state as ``generate`` captures it (masked: a graph
serves every prompt length of its bucket) and unmasked, the same prompt from a zero state, and
``generate(max_new_tokens=1)``, by (batch, prompt length); then the kernels of the masked prompt
prefill, the image prefill and the unmasked prompt prefill at b=8, 4K (torch.profiler, eager).
Times are CUDA-event ms, (fastest, median) of 10 calls after 3 warm-ups.

    python benchmarks/profile_vlm_prefill.py --out benchmarks/results/vlm_prefill_profile_<commit>.json

Needs CUDA and the kernels (mamba_ssm, causal_conv1d).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_gpu import _graphed, top_kernels  # noqa: E402
from benchmarks.bench_scan_forms import eager_times_us  # noqa: E402
from vlm_mamba import create_model  # noqa: E402
from vlm_mamba.models.vlm import _flatten_state, _unflatten_state  # noqa: E402

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--out", default="vlm_prefill_profile.json")
args = ap.parse_args()
if not torch.cuda.is_available():
    sys.exit("profile_vlm_prefill needs CUDA")


def t_ms(fn, n=10):
    """(fastest, median) ms of ``n`` eager calls after 3 warm-ups (CUDA events)."""
    ts = [t / 1e3 for t in eager_times_us(fn, 1, n)]
    return min(ts), statistics.median(ts)


def case(vlm, b: int, t: int) -> dict:
    """The timings of one (batch, prompt length), and at b=8, 4K the three kernel profiles."""
    lm = vlm.language
    images = torch.randn(b, 3, 224, 224, device="cuda", dtype=torch.bfloat16)
    ids = torch.randint(1, 1000, (b, t), device="cuda")
    flat = _flatten_state(vlm.prefill_images(images))
    txt = lm.embed(ids)
    mask = torch.ones(b, t, dtype=torch.bool, device="cuda")

    def prompt(state, masked: bool):
        if masked:
            return vlm._prompt_prefill_flat(txt, mask, *flat)
        return lm(inputs_embeds=txt, state=state, return_state=True, logits="last")

    runs = {
        "image_prefill_graph": lambda: vlm.prefill_images(images, cuda_graph=True),
        "prompt_masked_graph": _graphed(lambda: prompt(None, True)),
        "prompt_nomask_graph": _graphed(lambda: prompt(_unflatten_state(flat), False)),
        "prompt_zero_nomask_graph": _graphed(lambda: prompt(None, False)),
        "generate_1": lambda: vlm.generate(images, ids, max_new_tokens=1, eos_token_id=None),
        "encode_images_eager": lambda: vlm.encode_images(images),
    }
    out = {"times_ms_fastest_median": {k: t_ms(fn) for k, fn in runs.items()}}
    print(f"b={b} t={t}: " + "  ".join(f"{k} {v[0]:.2f}/{v[1]:.2f}" for k, v in out["times_ms_fastest_median"].items()),
          flush=True)  # fmt: skip
    if (b, t) == (8, 4096):
        for name, fn in (
            ("prompt_masked_eager", lambda: prompt(None, True)),
            ("image_prefill_eager", lambda: vlm.prefill_images(images)),
            ("prompt_nomask_eager", lambda: prompt(_unflatten_state(flat), False)),
        ):
            p = out[name] = top_kernels(fn, torch.device("cuda"), k=25)
            print(f"== {name}: total {p['total_ms']:.2f} ms", flush=True)
            for k in p["top"]:
                print(f"   {k['ms']:7.3f} ms x{k['calls']:4d}  {k['name'][:100]}", flush=True)
    return out


torch.manual_seed(0)
model = create_model("base").cuda().to(torch.bfloat16).eval()
results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
with torch.no_grad():
    for b, t in ((1, 4096), (8, 256), (8, 4096), (8, 16384)):
        results[f"b={b} t={t}"] = case(model, b, t)
        torch.cuda.empty_cache()
Path(args.out).parent.mkdir(parents=True, exist_ok=True)
tmp = Path(str(args.out) + ".tmp")
tmp.write_text(json.dumps(results, indent=1))
tmp.replace(args.out)
print(f"results in {args.out}")

"""Where VLMamba's time goes on a GPU: component timings and a torch.profiler table (base size, bf16).

python benchmarks/profile_gpu.py [--size base] [--batch 1] [--text 64]
"""

from __future__ import annotations

import argparse
import time

import torch

from vlm_mamba import create_model


def timed(fn, n=10):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="base")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--text", type=int, default=64)
    args = ap.parse_args()
    model = create_model(args.size).cuda().eval()
    b = args.batch
    images = torch.randn(b, 3, 224, 224, device="cuda")
    ids = torch.randint(3, 50000, (b, args.text), device="cuda")
    lm = model.language
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        img, _ = model.encode_images(images)
        rows = {
            "vision encoder": timed(lambda: model.vision(images)),
            "encode_images (vision+bridge)": timed(lambda: model.encode_images(images)),
            "LM forward over image tokens (no state)": timed(lambda: lm(inputs_embeds=img, logits="none")),
            "LM prefill over image tokens (return_state)": timed(
                lambda: lm(inputs_embeds=img, return_state=True, logits="none")
            ),
            "one vision mixer": timed(
                lambda: model.vision.layers[0].mixer.fwd(img.new_zeros(b, 196, 768)), 50
            ),
            "generate 1 token": timed(lambda: model.generate(images, ids, max_new_tokens=1)),
            "generate 32 tokens": timed(lambda: model.generate(images, ids, max_new_tokens=32), 3),
        }
        st = model.prefill_images(images)
        tok = torch.zeros(b, dtype=torch.long, device="cuda")
        rows["one decode step"] = timed(lambda: lm.step(input_ids=tok, state=st), 50)
    for k, v in rows.items():
        print(f"{k:48s} {v:8.2f} ms")
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            model.generate(images, ids, max_new_tokens=1)
            torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=22, max_name_column_width=60))


if __name__ == "__main__":
    main()

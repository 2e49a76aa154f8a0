"""Demo-tuning probe: train the ``demo`` model in a plain loop and track per-question-type accuracy.

The Lightning run logs one validation loss; this probe shows *which* skill the model has learned
at each point (the answer of every VQA question type right token for token, and the caption
tokens), which is what found the demo's learning-rate plateau (docs/demo_tuning.md). It reads the
same Hydra config as ``train.py experiment=demo`` (overrides go at the end), builds the same data
module, model and AdamW groups with the same warmup-cosine schedule, and holds out the first
``--held`` training batches as its evaluation set (the stream reshuffles, so these can come round
again later: the figures are for comparing runs, not for reporting).

    python benchmarks/demo_probe.py --lr 1e-3 --steps 1800 --data /tmp/shapes
    python benchmarks/demo_probe.py --oracle --const --steps 6000 model.language.d_state=16

``--oracle`` replaces the vision encoder and bridge by per-cell mean and std of the centred image
(3x3 cells, through a small MLP): colour handed to the language model on a plate, to tell a vision
problem from a language-model one. ``--out DIR`` writes ``DIR/<name>.json`` after every evaluation.
Runs on CUDA when available; ``benchmarks/demo_sweep.sh`` runs many probes side by side on one GPU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections import defaultdict
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from torch import nn

from vlm_mamba import VLMamba
from vlm_mamba.training.optim import param_groups, warmup_cosine
from vlm_mamba.training.run import build_datamodule, model_config, register_resolvers, sync_tokenizer

ROOT = Path(__file__).resolve().parents[1]
QUESTION_TYPES = ("what color", "what shape", "how many", "where is", "is there")


class CellOracle(nn.Module):
    """Per-cell mean and std of the centred image (3x3 grid) -> MLP -> language width."""

    def __init__(self, d_out: int, grid: int = 3) -> None:
        super().__init__()
        self.grid = grid
        self.mlp = nn.Sequential(nn.Linear(6, 256), nn.GELU(), nn.Linear(256, d_out))
        self.pos = nn.Parameter(torch.randn(1, grid * grid, d_out) * 0.02)
        self.norm = nn.RMSNorm(d_out)

    def forward(self, images: torch.Tensor, image_sizes=None) -> tuple[torch.Tensor, torch.Tensor]:
        x = images - images.mean((2, 3), keepdim=True)
        s = x.shape[-1] // self.grid
        cells = x.unfold(2, s, s).unfold(3, s, s).flatten(-2)  # (b, 3, g, g, s*s)
        feats = torch.cat([cells.mean(-1), cells.std(-1)], 1).flatten(2).transpose(1, 2)  # (b, g*g, 6)
        out = self.norm(self.mlp(feats) + self.pos)
        return out, torch.ones(out.shape[:2], dtype=torch.bool, device=out.device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", default="probe")
    ap.add_argument("--seed", type=int, default=0, help="torch seed (model initialisation)")
    ap.add_argument("--data-seed", type=int, default=1234, help="the config's seed (data order)")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--wd", type=float, default=0.05)
    ap.add_argument("--steps", type=int, default=1800)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--min-lr-ratio", type=float, default=0.05)
    ap.add_argument("--const", action="store_true", help="constant lr after the warmup")
    ap.add_argument("--oracle", action="store_true", help="replace vision+bridge by CellOracle")
    ap.add_argument(
        "--loss-reduction", default=None, choices=["token", "sample"], help="default: the config's"
    )
    ap.add_argument("--data", default="/tmp/shapes", help="shapes data folder (built when missing)")
    ap.add_argument("--every", type=int, default=300, help="evaluate every N steps")
    ap.add_argument("--held", type=int, default=30, help="held-out batches")
    ap.add_argument("--out", default=None, help="folder for <name>.json")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model.language.ssm=mamba2")
    a = ap.parse_args()

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(a.seed)
    register_resolvers()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=["experiment=demo", f"paths.data_dir={a.data}", f"seed={a.data_seed}", *a.overrides],
        )
    dm = build_datamodule(cfg)
    dm.prepare_data()
    dm.setup("fit")
    tok = dm.tokenizer
    it = iter(dm.train_dataloader())
    held = [next(it) for _ in range(a.held)]

    model = VLMamba(sync_tokenizer(model_config(cfg.model), tok))
    if a.oracle:
        model.oracle = CellOracle(model.config.language.d_model)
        object.__setattr__(model, "encode_images", model.oracle.forward)  # instance attribute wins
    model.to(dev)

    def qtype(ids: list[int]) -> str:
        text = tok.decode([i for i in ids if i != tok.pad_token_id])
        return next((q for q in QUESTION_TYPES if q in text), "caption")

    text_first = model.config.prompt_order == "text_first"

    def evaluate() -> tuple[float, dict[str, float]]:
        model.eval()
        hits: dict[str, list[float]] = defaultdict(list)
        loss = 0.0
        with torch.no_grad():
            for b in held:
                b = {k: v.to(dev) for k, v in b.items()}
                out = model(
                    b["images"], b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]
                )
                loss += out.loss.item()
                if text_first:  # the first answer token is predicted at the last image position,
                    continue  # which out.logits (text positions only) does not hold: loss only
                pred = out.logits.argmax(-1).cpu()
                labels = b["labels"].cpu()
                for r in range(pred.shape[0]):
                    js = (labels[r] != -100).nonzero().flatten().tolist()
                    ok = [bool(pred[r, j - 1] == labels[r, j]) for j in js]
                    t = qtype(b["input_ids"][r].tolist())
                    # captions: share of tokens right; questions: the whole answer right
                    hits[t].append(sum(ok) / len(ok) if t == "caption" else float(all(ok)))
        model.train()
        return loss / len(held), {k: round(sum(v) / len(v), 3) for k, v in sorted(hits.items())}

    reduction = a.loss_reduction or cfg.module.get("loss_reduction", "token")
    groups = param_groups(model, a.wd)
    for g in groups:
        g.pop("param_names", None)
    opt = torch.optim.AdamW(groups, lr=a.lr, betas=(0.9, 0.95))
    log: list[dict] = []
    t0 = time.time()
    for step in range(1, a.steps + 1):
        # the training module's schedule; --const is its warmup with a flat tail (min ratio 1)
        f = warmup_cosine(step - 1, a.warmup, a.steps, 1.0 if a.const else a.min_lr_ratio)
        for g in opt.param_groups:
            g["lr"] = a.lr * f
        try:
            b = next(it)
        except StopIteration:  # one epoch of the stream is over
            it = iter(dm.train_dataloader())
            b = next(it)
        b = {k: v.to(dev) for k, v in b.items()}
        loss = model(
            b["images"],
            b["input_ids"],
            attention_mask=b["attention_mask"],
            labels=b["labels"],
            loss_reduction=reduction,
        ).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % a.every == 0 or step == a.steps:
            held_loss, acc = evaluate()
            log.append(
                {"step": step, "train": loss.item(), "held": held_loss, "acc": acc, "t": time.time() - t0}
            )
            print(f"[{a.name}] step {step} train {loss.item():.3f} held {held_loss:.4f} {acc}", flush=True)
            if a.out:
                os.makedirs(a.out, exist_ok=True)
                with open(Path(a.out) / f"{a.name}.json", "w") as fh:
                    json.dump({"name": a.name, "args": vars(a), "log": log}, fh)
    if not math.isfinite(log[-1]["held"]):
        raise SystemExit(f"{a.name}: non-finite held-out loss")


if __name__ == "__main__":
    main()

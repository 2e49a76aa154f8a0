"""The LightningModule: VLMamba's training loop (loss, optimiser, schedule, logging); no architecture.

Glossary: ``b`` batch, ``t`` text tokens, ``n`` images, ``q`` questions.

The network is :class:`vlm_mamba.models.vlm.VLMamba`, built from a validated
:class:`~vlm_mamba.config.VLMambaConfig`; the training stage (bridge only, full, LoRA) is that
config's ``freeze_vision`` / ``freeze_language`` / ``lora`` fields, so nothing here decides what
trains: the optimiser takes every parameter with ``requires_grad``.

What this module adds to the network (lightning-hydra-template's split, STYLE.md rule 9):

- AdamW with two parameter groups: no weight decay on norms, biases, the SSM parameters
  ``A_log``, ``D``, ``dt_bias`` (mamba_ssm marks them ``_no_weight_decay``), position embeddings,
  and (unless ``decay_embeddings``) token embeddings;
- linear warmup then cosine decay to ``min_lr_ratio * lr``, driven by ``trainer.max_steps``;
- ``train/loss``, ``train/lr``, ``val/loss`` (and ``test/loss``) logged per target token mean;
- validation task metrics: greedy generation on a fixed validation subset scored with
  :mod:`vlm_mamba.metrics` (``val/CIDEr``, ``val/Bleu_4`` for captions, ``val/vqa_acc`` for VQA),
  so ModelCheckpoint and sweeps can monitor them, plus a few sample predictions for the logger;
- a non-finite loss skips the update, saves ``nonfinite-step=N.ckpt`` and stops the run
  (:attr:`nonfinite`, read by :func:`vlm_mamba.training.train` to fail with a message).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn

from .config import VLMambaConfig
from .models.vlm import VLMamba

log = logging.getLogger(__name__)

# Parameter names (last dotted component) that never take weight decay: mamba_ssm's
# ``_no_weight_decay`` set for Mamba-1/2 (A_log, D, dt_bias) and timm's for ViT/Vim (pos_embed, cls_token).
NO_DECAY_NAMES = frozenset({"A_log", "D", "dt_bias", "pos_embed", "cls_token"})
_NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d)


def param_groups(
    model: nn.Module, weight_decay: float, decay_embeddings: bool = False
) -> list[dict[str, Any]]:
    """Split the trainable parameters of ``model`` into a decayed and a non-decayed AdamW group.

    Not decayed: every parameter with fewer than 2 dimensions (biases, norm weights, ``D``,
    ``dt_bias``), names in :data:`NO_DECAY_NAMES` (``A_log`` is 2-D yet must not decay: decay
    would pull the SSM's decay rates towards 1), parameters flagged ``_no_weight_decay``
    (mamba_ssm's convention), weights of norm modules (any class named ``*Norm*``) and, unless
    ``decay_embeddings``, ``nn.Embedding`` weights. A weight shared by two modules (tied
    embedding/head) is listed once, under its first name.

    Returns:
        ``[{"params", "weight_decay", "name": "decay"}, {..., "name": "no_decay"}]`` (empty
        groups dropped); each group also carries ``param_names`` for inspection.
    """
    no_decay_ids: set[int] = set()
    for mod in model.modules():
        is_norm = isinstance(mod, _NORM_TYPES) or "norm" in type(mod).__name__.lower()
        is_emb = isinstance(mod, nn.Embedding) and not decay_embeddings
        if is_norm or is_emb:
            no_decay_ids.update(id(p) for p in mod.parameters(recurse=False))
    decay, no_decay, decay_names, no_decay_names = [], [], [], []
    for name, p in model.named_parameters():  # shared parameters are yielded once
        if not p.requires_grad:
            continue
        leaf = name.rsplit(".", 1)[-1]
        if (
            p.ndim < 2
            or leaf in NO_DECAY_NAMES
            or getattr(p, "_no_weight_decay", False)
            or id(p) in no_decay_ids
        ):
            no_decay.append(p)
            no_decay_names.append(name)
        else:
            decay.append(p)
            decay_names.append(name)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "name": "decay", "param_names": decay_names},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay", "param_names": no_decay_names},
    ]
    return [g for g in groups if g["params"]]


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """LR multiplier: linear from ``1/(warmup+1)`` to 1 over ``warmup_steps``, then cosine to ``min_lr_ratio``.

    The warmup starts above zero so the first update is not wasted (as in nanoGPT's ``get_lr``).
    Past ``total_steps`` it stays at ``min_lr_ratio``.
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if total_steps <= warmup_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class WarmupCosine:
    """Picklable-free LambdaLR multiplier (a plain object: LambdaLR stores its ``__dict__``, which
    holds only numbers, so checkpoints stay loadable with ``weights_only=True``)."""

    def __init__(self, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> None:
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.min_lr_ratio = min_lr_ratio

    def __call__(self, step: int) -> float:
        return warmup_cosine(step, self.warmup_steps, self.total_steps, self.min_lr_ratio)


def batch_size_of(batch: Mapping[str, Any]) -> int:
    """Samples in a training batch (rows of ``input_ids``); used by the ThroughputMonitor."""
    return int(batch["input_ids"].shape[0])


def tokens_of(batch: Mapping[str, Any]) -> int:
    """Real text tokens in a training batch (``attention_mask`` sum); the ThroughputMonitor's items."""
    return int(batch["attention_mask"].sum())


class VLMambaLitModule(L.LightningModule):
    """Trains a :class:`VLMamba` on caption / VQA batches (``docs/interfaces.md``).

    Args:
        model: the validated model config (or its dict, as stored in checkpoints).
        lr: peak learning rate.
        weight_decay: AdamW decay of the ``decay`` group (see :func:`param_groups`).
        betas, eps: AdamW.
        warmup_steps: linear warmup length in optimiser steps.
        min_lr_ratio: final LR of the cosine as a fraction of ``lr``.
        total_steps: cosine length; ``None`` = ``trainer.max_steps`` (or the estimated stepping
            batches when ``max_steps`` is -1).
        decay_embeddings: put ``nn.Embedding`` weights in the decayed group.
        pretrained_language: a local Mamba checkpoint directory (transformers or mamba_ssm
            layout) whose weights initialise the language model (``LanguageMamba.from_pretrained``).
        val_generation: greedy decoding on the validation subset after each validation epoch:
            ``enabled``, ``max_samples`` (captions: images; VQA: questions), ``batch_size``,
            ``max_new_tokens``, ``num_beams``.
        num_sample_predictions: predictions sent to the logger after each validation.
        tokenizer_json: a tokenizer JSON string to decode with when no datamodule provides one
            (normally restored from the checkpoint, see :meth:`on_save_checkpoint`).
    """

    def __init__(
        self,
        model: VLMambaConfig | Mapping[str, Any],
        lr: float = 3e-4,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        warmup_steps: int = 100,
        min_lr_ratio: float = 0.1,
        total_steps: int | None = None,
        decay_embeddings: bool = False,
        pretrained_language: str | None = None,
        val_generation: Mapping[str, Any] | None = None,
        num_sample_predictions: int = 4,
        tokenizer_json: str | None = None,
    ) -> None:
        super().__init__()
        config = model if isinstance(model, VLMambaConfig) else VLMambaConfig.model_validate(dict(model))
        gen = {"enabled": True, "max_samples": 64, "batch_size": 32, "max_new_tokens": 16, "num_beams": 1}
        unknown = set(val_generation or {}) - set(gen)
        if unknown:
            raise ValueError(f"module.val_generation: unknown keys {sorted(unknown)}; known: {sorted(gen)}")
        gen.update(val_generation or {})
        # plain types only: checkpoints must load with torch.load(weights_only=True)
        self.save_hyperparameters(
            {
                "model": config.to_dict(),
                "lr": float(lr),
                "weight_decay": float(weight_decay),
                "betas": [float(b) for b in betas],
                "eps": float(eps),
                "warmup_steps": int(warmup_steps),
                "min_lr_ratio": float(min_lr_ratio),
                "total_steps": None if total_steps is None else int(total_steps),
                "decay_embeddings": bool(decay_embeddings),
                "pretrained_language": pretrained_language,
                "val_generation": gen,
                "num_sample_predictions": int(num_sample_predictions),
            }
        )
        self.config = config
        self.model = VLMamba(config)
        if pretrained_language:
            self._load_pretrained_language(pretrained_language)
        self.tokenizer_json = tokenizer_json
        self.tokenizer_specials: dict[str, str] | None = None
        self._tokenizer = None
        self.nonfinite: dict[str, Any] | None = None  # set when a non-finite loss stopped training
        self.flops_per_batch: int | None = None  # read by ThroughputMonitor (None: not measured)

    # ------------------------------------------------------------------ set-up
    def _load_pretrained_language(self, path: str) -> None:
        """Copy a local pretrained Mamba LM into ``self.model.language`` (shapes must match the config)."""
        from .models.language import LanguageMamba

        src = LanguageMamba.from_pretrained(path)
        theirs, ours = src.state_dict(), self.model.language.state_dict()
        bad = [k for k in ours if k in theirs and theirs[k].shape != ours[k].shape]
        missing = [k for k in ours if k not in theirs]
        if bad or missing:
            raise ValueError(
                f"module.pretrained_language={path}: does not fit model.language "
                f"(shape mismatch: {bad[:5]}, missing: {missing[:5]}); set model.language to its config"
            )
        self.model.language.load_state_dict(theirs, strict=False)
        log.info("language model initialised from %s", path)

    @property
    def tokenizer(self):
        """The data's ``TextTokenizer`` (from the datamodule, else rebuilt from the checkpoint); or None."""
        if self._tokenizer is None:
            dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
            tok = getattr(dm, "tokenizer", None)
            if tok is not None:
                self._tokenizer = tok
            elif self.tokenizer_json:
                from tokenizers import Tokenizer

                from .data.tokenizer import TextTokenizer

                specials = self.tokenizer_specials or {}
                self._tokenizer = TextTokenizer(
                    Tokenizer.from_str(self.tokenizer_json),
                    bos_token=specials.get("bos_token", "<|bos|>"),
                    eos_token=specials.get("eos_token", "<|eos|>"),
                    pad_token=specials.get("pad_token"),
                )
        return self._tokenizer

    def configure_optimizers(self):
        hp = self.hparams
        groups = param_groups(self.model, hp.weight_decay, hp.decay_embeddings)
        if not groups:
            raise ValueError("no trainable parameters: check model.freeze_vision / freeze_language / lora")
        for g in groups:
            g.pop("param_names")
        fused = self.device.type == "cuda"
        opt = torch.optim.AdamW(groups, lr=hp.lr, betas=tuple(hp.betas), eps=hp.eps, fused=fused)
        total = hp.total_steps or self._total_steps()
        sched = torch.optim.lr_scheduler.LambdaLR(opt, WarmupCosine(hp.warmup_steps, total, hp.min_lr_ratio))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}

    def _total_steps(self) -> int:
        trainer = self.trainer
        if trainer.max_steps and trainer.max_steps > 0:
            return int(trainer.max_steps)
        est = trainer.estimated_stepping_batches
        if not math.isfinite(est):
            raise ValueError(
                "the cosine schedule needs a length: set trainer.max_steps (the data stream has no length)"
            )
        return int(est)

    # ------------------------------------------------------------------ training
    def forward(self, batch: Mapping[str, Any]):
        return self.model(
            images=batch["images"],
            input_ids=batch["input_ids"],
            attention_mask=batch.get("attention_mask"),
            labels=batch.get("labels"),
            image_sizes=batch.get("image_sizes"),
        )

    def training_step(self, batch: Mapping[str, Any], batch_idx: int):
        loss = self(batch).loss
        b = batch_size_of(batch)
        bad = not bool(torch.isfinite(loss.detach()))
        if self.trainer.world_size > 1:  # every rank must take the same branch
            bad = self.trainer.strategy.reduce_boolean_decision(bad, all=False)
        if bad:
            self.nonfinite = {"step": int(self.global_step), "loss": float(loss.detach()), "ckpt": None}
            return None  # no backward: the weights stay as they were before this batch
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True, batch_size=b)
        sched = self.lr_schedulers()
        if sched is not None:
            self.log("train/lr", sched.get_last_lr()[0], on_step=True, on_epoch=False, batch_size=b)
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.nonfinite is None or self.nonfinite["ckpt"] is not None:
            return
        path = Path(self._ckpt_dir()) / f"nonfinite-step={self.nonfinite['step']}.ckpt"
        self.trainer.save_checkpoint(path)  # collective: every rank calls it
        self.nonfinite["ckpt"] = str(path)
        self.trainer.should_stop = True
        log.error(
            "non-finite loss (%s) at step %d: training stopped; the weights before this batch are in %s",
            self.nonfinite["loss"],
            self.nonfinite["step"],
            path,
        )

    def _ckpt_dir(self) -> str:
        from lightning.pytorch.callbacks import ModelCheckpoint

        for cb in self.trainer.callbacks:
            if isinstance(cb, ModelCheckpoint) and cb.dirpath:
                return cb.dirpath
        return self.trainer.default_root_dir

    # ------------------------------------------------------------------ validation / test
    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self(batch).loss
        self.log(
            "val/loss", loss, on_epoch=True, prog_bar=True, sync_dist=True, batch_size=batch_size_of(batch)
        )
        return loss

    def test_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self(batch).loss
        self.log("test/loss", loss, on_epoch=True, sync_dist=True, batch_size=batch_size_of(batch))
        return loss

    def on_validation_epoch_end(self) -> None:
        gen = self.hparams.val_generation
        if self.trainer.sanity_checking or not gen["enabled"] or gen["max_samples"] <= 0:
            return
        loaders = self._eval_loaders(gen["max_samples"], gen["batch_size"])
        if not loaders:
            return
        samples: list[dict[str, Any]] = []
        for task, loader in loaders.items():
            metrics, rows = self._score_task(task, loader, gen)
            for key, value in metrics.items():
                self.log(key, value, sync_dist=False, rank_zero_only=False)
            samples += rows[: self.hparams.num_sample_predictions]
        if samples:
            self._log_samples(samples)

    # ------------------------------------------------------------------ task metrics
    def _eval_loaders(self, max_samples: int, batch_size: int) -> dict[str, Iterable]:
        """{"caption" | "vqa": evaluation loader over the validation subset} from the datamodule."""
        dm = getattr(self.trainer, "datamodule", None)
        fn = getattr(dm, "eval_dataloaders", None)
        if fn is None:
            return {}
        return fn(split="val", max_samples=max_samples, batch_size=batch_size)

    @torch.no_grad()
    def predict_batch(self, task: str, batch: Mapping[str, Any], gen: Mapping[str, Any]) -> list[str]:
        """Decode one evaluation batch (left-padded prompts, ``docs/interfaces.md``) to strings."""
        out = self.model.generate(
            batch["images"].to(self.device),
            batch["prompt_ids"].to(self.device),
            prompt_mask=batch["prompt_mask"].to(self.device),
            image_sizes=_to(batch.get("image_sizes"), self.device),
            image_index=_to(batch.get("image_index"), self.device),
            max_new_tokens=int(gen["max_new_tokens"]),
            num_beams=int(gen["num_beams"]),
        )  # (b, new)
        return self._decode(out)

    def _decode(self, ids: torch.Tensor) -> list[str]:
        eos, pad = self.config.eos_token_id, self.config.pad_token_id
        tok = self.tokenizer
        texts = []
        for row in ids.tolist():
            if eos is not None and eos in row:
                row = row[: row.index(eos)]
            row = [t for t in row if t != pad]
            texts.append(tok.decode(row).strip() if tok is not None else " ".join(map(str, row)))
        return texts

    def _score_task(
        self, task: str, loader: Iterable, gen: Mapping[str, Any]
    ) -> tuple[dict[str, float], list[dict[str, Any]]]:
        """Generate over ``loader`` (this rank's share), gather every rank's results, score on rank 0."""
        from . import metrics as M

        was_training = self.model.training
        self.model.eval()
        results, refs = [], []
        for batch in loader:
            preds = self.predict_batch(task, batch, gen)
            if task == "caption":
                for img, pred, ref in zip(batch["image_ids"], preds, batch["references"]):
                    results.append({"image_id": int(img), "caption": pred})
                    refs.append({"image_id": int(img), "references": list(ref)})
            else:
                for i, pred in enumerate(preds):
                    results.append({"question_id": int(batch["question_ids"][i]), "answer": pred})
                    refs.append(
                        {
                            "question_id": int(batch["question_ids"][i]),
                            "image_id": int(batch["image_ids"][i]),
                            "question": batch["questions"][i],
                            "answers": list(batch["answers"][i]),
                            "question_type": batch["question_types"][i],
                            "answer_type": batch["answer_types"][i],
                        }
                    )
        self.model.train(was_training)
        results, refs = _gather_lists(results), _gather_lists(refs)
        values: dict[str, float] = {}
        if self.trainer.is_global_zero and results:
            if task == "caption":
                # CIDEr and BLEU-4 only: METEOR's Java start-up (~5 s) is too slow for every validation
                scores = M.score_captions(
                    {r["image_id"]: r["references"] for r in refs},
                    {r["image_id"]: r["caption"] for r in results},
                    metrics=["Bleu_4", "CIDEr"],
                    spice=False,
                )
                values = {"val/CIDEr": float(scores["CIDEr"]), "val/Bleu_4": float(scores["Bleu_4"])}
            else:
                scores = M.vqa_accuracy(results, vqa_annotations(refs))
                values = {"val/vqa_acc": float(scores["overall"])}
        values = self.trainer.strategy.broadcast(values, src=0)
        rows = []
        by_id = {r.get("image_id", r.get("question_id")): r for r in refs}
        for r in results[: self.hparams.num_sample_predictions]:
            key = r.get("image_id") if task == "caption" else r["question_id"]
            ref = by_id.get(key, {})
            rows.append(
                {
                    "task": task,
                    "id": key,
                    "prompt": ref.get("question", ""),
                    "prediction": r.get("caption", r.get("answer")),
                    "reference": (ref.get("references") or ref.get("answers") or [""])[0],
                }
            )
        return values, rows

    def _log_samples(self, rows: list[dict[str, Any]]) -> None:
        """Sample predictions to every logger that can show text; CSV-only runs get a JSON file."""
        if not self.trainer.is_global_zero:
            return
        from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

        step = int(self.global_step)
        cols = ["task", "id", "prompt", "prediction", "reference"]
        for logger in self.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_text(
                    "val/samples", columns=cols, data=[[r[c] for c in cols] for r in rows], step=step
                )
            elif isinstance(logger, TensorBoardLogger):
                md = "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n"
                md += "".join("| " + " | ".join(str(r[c]) for c in cols) + " |\n" for r in rows)
                logger.experiment.add_text("val/samples", md, global_step=step)
            else:
                out = Path(logger.log_dir or self.trainer.default_root_dir) / "samples"
                out.mkdir(parents=True, exist_ok=True)
                (out / f"step={step}.json").write_text(json.dumps(rows, indent=1) + "\n")
        for r in rows[:2]:
            log.info("sample [%s] %s -> %r (ref %r)", r["task"], r["prompt"], r["prediction"], r["reference"])

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep the tokenizer in the checkpoint (JSON string + special token names): export and
        evaluation then need nothing but the ``.ckpt``."""
        tok = self.tokenizer
        if tok is not None and hasattr(tok, "tokenizer"):
            checkpoint["tokenizer_json"] = tok.tokenizer.to_str()
            checkpoint["tokenizer_specials"] = {
                "bos_token": tok.bos_token,
                "eos_token": tok.eos_token,
                "pad_token": tok.pad_token,
            }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.tokenizer_json = checkpoint.get("tokenizer_json", self.tokenizer_json)
        self.tokenizer_specials = checkpoint.get("tokenizer_specials", self.tokenizer_specials)


# ---------------------------------------------------------------------- helpers
def _to(x: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return None if x is None else x.to(device)


def _gather_lists(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Concatenate a list from every rank (rank order), dropping duplicates by id."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return items
    parts: list[list[dict[str, Any]]] = [None] * dist.get_world_size()  # type: ignore[list-item]
    dist.all_gather_object(parts, items)
    seen, out = set(), []
    for part in parts:
        for item in part:
            key = (item.get("image_id"), item.get("question_id"))
            if key not in seen:
                seen.add(key)
                out.append(item)
    return out


def vqa_annotations(refs: list[dict[str, Any]]) -> dict[str, Any]:
    """The official VQAv2 annotations dict (``{"annotations": [...]}``) of the scored subset."""
    anns = []
    for r in refs:
        anns.append(
            {
                "question_id": r["question_id"],
                "image_id": r["image_id"],
                "question_type": r["question_type"],
                "answer_type": r["answer_type"],
                "answers": [{"answer": a, "answer_id": i + 1} for i, a in enumerate(r["answers"])],
                "multiple_choice_answer": r["answers"][0] if r["answers"] else "",
            }
        )
    return {"annotations": anns}

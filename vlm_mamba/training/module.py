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
- ``train/loss``, ``train/lr``; on the validation (and test) batches a teacher-forced ``val/loss``
  on each reference target (``val/caption_loss`` / ``val/vqa_loss`` too for a mix);
- validation task metrics: greedy generation on the validation subset (``limit_val_batches``)
  scored with :mod:`vlm_mamba.metrics` (``val/CIDEr``, ``val/Bleu_4`` for captions,
  ``val/vqa_acc`` for VQA), so ModelCheckpoint and sweeps can monitor them, plus a few sample
  predictions for the logger;
- a non-finite loss skips the update, saves ``nonfinite-step=N.ckpt`` and stops the run
  (:attr:`nonfinite`, read by :func:`vlm_mamba.training.train` to fail with a message);
- non-finite gradients (a finite loss, an inf/NaN gradient under bf16) skip that update on every
  rank without a host sync, counted in ``train/skipped_steps`` and warned about at the logging
  interval (:meth:`configure_gradient_clipping`).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch

from ..config import VLMambaConfig
from ..data.collate import teacher_forcing_batch
from ..evaluation.tasks import batch_task, eval_records, gather, predict_batch, sample_rows, score_task
from ..models.vlm import LOSS_REDUCTIONS, VLMamba
from .callbacks import batch_size_of
from .fsdp import is_padding, is_sharded, unsharded
from .optim import WarmupCosine, param_groups

log = logging.getLogger(__name__)


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
        loss_reduction: the training loss: ``"token"`` (mean over every target token of the batch)
            or ``"sample"`` (mean per sequence, then over sequences: a one-word VQA answer weighs as
            much as a 15-token caption in a mix). Validation losses are always per token.
        pretrained_language: a local Mamba checkpoint directory (transformers or mamba_ssm
            layout) whose weights initialise the language model (``LanguageMamba.from_pretrained``).
        val_generation: decoding of every validation (and test) batch, scored at epoch end:
            ``enabled``, ``max_new_tokens``, ``num_beams`` (1 = greedy). The subset is
            ``trainer.limit_val_batches`` batches of ``data.eval_batch_size`` images per task.
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
        loss_reduction: str = "token",
        pretrained_language: str | None = None,
        val_generation: Mapping[str, Any] | None = None,
        num_sample_predictions: int = 4,
        tokenizer_json: str | None = None,
    ) -> None:
        super().__init__()
        config = model if isinstance(model, VLMambaConfig) else VLMambaConfig.model_validate(dict(model))
        gen = {"enabled": True, "max_new_tokens": 16, "num_beams": 1}
        unknown = set(val_generation or {}) - set(gen)
        if unknown:
            raise ValueError(f"module.val_generation: unknown keys {sorted(unknown)}; known: {sorted(gen)}")
        gen.update(val_generation or {})
        if loss_reduction not in LOSS_REDUCTIONS:
            raise ValueError(f"module.loss_reduction={loss_reduction!r}: expected one of {LOSS_REDUCTIONS}")
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
                "loss_reduction": loss_reduction,
                "pretrained_language": pretrained_language,
                "val_generation": gen,
                "num_sample_predictions": int(num_sample_predictions),
            }
        )
        self.config = config
        # pretrained weights go into the plain modules, then LoRA wraps them (VLMamba's constructor)
        self.model = VLMamba(config, pretrained_language=pretrained_language or None)
        if pretrained_language:
            log.info("language model initialised from %s", pretrained_language)
        self.tokenizer_json = tokenizer_json
        self.tokenizer_specials: dict[str, str] | None = None
        self._tokenizer = None
        self.nonfinite: dict[str, Any] | None = None  # set when a non-finite loss stopped training
        self._skipped_steps = torch.zeros(())  # updates skipped for non-finite gradients (a device tensor)
        self._skipped_reported = 0
        self.flops_per_batch: int | None = None  # read by ThroughputMonitor (None: not measured)

    # ------------------------------------------------------------------ set-up
    @property
    def tokenizer(self):
        """The data's ``TextTokenizer`` (from the datamodule, else rebuilt from the checkpoint); or None."""
        if self._tokenizer is None:
            dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
            tok = getattr(dm, "tokenizer", None)
            if tok is not None:
                self._tokenizer = tok
            elif self.tokenizer_json:
                from ..data.tokenizer import TextTokenizer

                self._tokenizer = TextTokenizer.from_json(self.tokenizer_json, self.tokenizer_specials)
        return self._tokenizer

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        """Clip (if configured), then skip the update when the gradients are not finite.

        The total gradient norm is what norm clipping computes anyway (computed alone when no norm
        clipping is set); a non-finite norm becomes the fused AdamW's ``found_inf`` flag, a device
        tensor the kernel reads itself (GradScaler's mechanism), so the check costs no host sync.
        The skip is decided on the global norm, hence the same on every rank; the skipped steps
        are counted (``train/skipped_steps``) and reported every ``log_every_n_steps``.
        Under FSDP2 the gradients are ``DTensor`` shards: their norm is reduced over the shards
        (``full_tensor``) before clipping, as torchtitan does."""
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if not params:
            return
        by_norm = gradient_clip_val and gradient_clip_algorithm in (None, "norm")
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        if hasattr(norm, "full_tensor"):  # a DTensor (FSDP2 shards): the norm over all of them
            norm = norm.full_tensor()
        if by_norm:
            torch.nn.utils.clip_grads_with_norm_(params, float(gradient_clip_val), norm)
        else:
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        self._skip_if_nonfinite(optimizer, norm)

    def _skip_if_nonfinite(self, optimizer, norm: torch.Tensor) -> None:
        if getattr(self.trainer.precision_plugin, "scaler", None) is not None:
            return  # fp16 with a GradScaler: the scaler skips non-finite steps itself
        bad = (~torch.isfinite(norm.detach())).float()  # 0-dim, on the gradients' device
        if self.trainer.world_size > 1:  # the same decision on every rank, whatever the norm's origin
            bad = self.trainer.strategy.reduce(bad, reduce_op="max")
        if optimizer.defaults.get("fused"):
            optimizer.found_inf = bad  # the fused kernel leaves weights, moments and step count alone
        elif bool(bad):  # other optimisers: no gradient, no update (a host sync, off the fast path)
            optimizer.zero_grad(set_to_none=True)
        self._skipped_steps = self._skipped_steps.to(bad.device) + bad
        self.log("train/grad_norm", norm.detach().float(), on_step=True, on_epoch=False)
        self.log("train/skipped_steps", self._skipped_steps, on_step=True, on_epoch=False)

    def configure_model(self) -> None:
        """Shard the network when the strategy shards (``trainer=fsdp``: FSDP2, see
        ``vlm_mamba.training.fsdp``); a no-op for every other strategy."""
        if self._trainer is None:
            return
        parallelize = getattr(self.trainer.strategy, "parallelize", None)
        if parallelize is not None:
            parallelize(self.model)

    def configure_optimizers(self):
        from lightning.pytorch.strategies import FSDPStrategy

        if self._trainer is not None and isinstance(self.trainer.strategy, FSDPStrategy):
            raise ValueError(
                "Lightning's FSDPStrategy (FSDP1) hands the optimiser flat 1-D views, so weight decay would "
                "silently be off for every parameter: use trainer=fsdp (FSDP2, vlm_mamba.training.fsdp)"
            )
        hp = self.hparams
        groups = param_groups(self.model, hp.weight_decay, hp.decay_embeddings)
        if not groups:
            raise ValueError("no trainable parameters: check model.freeze_vision / freeze_language / lora")
        for g in groups:
            g.pop("param_names")
        # the fused kernel exists on CUDA and (torch >= 2.4) on the CPU: 0.8 vs 3.6 ms per step for the
        # demo model on the 2-core CPU (the default foreach implementation)
        fused = self.device.type in ("cuda", "cpu")
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
    def forward(self, batch: Mapping[str, Any], loss_reduction: str = "token"):
        return self.model(
            images=batch["images"],
            input_ids=batch["input_ids"],
            attention_mask=batch.get("attention_mask"),
            labels=batch.get("labels"),
            image_sizes=batch.get("image_sizes"),
            loss_reduction=loss_reduction,
            return_logits=False,  # only the loss is read: the head runs on target positions alone
        )

    def training_step(self, batch: Mapping[str, Any], batch_idx: int):
        loss = self(batch, self.hparams.loss_reduction).loss
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
        if (self.global_step % max(1, self.trainer.log_every_n_steps)) == 0:
            self._report_skipped_steps()
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

    def on_train_end(self) -> None:
        self._report_skipped_steps()

    def _report_skipped_steps(self) -> None:
        skipped = int(self._skipped_steps)  # a host sync, at the logging interval only
        if skipped > self._skipped_reported:
            log.warning(
                "non-finite gradients: %d optimiser step(s) skipped (total %d by step %d)",
                skipped - self._skipped_reported,
                skipped,
                self.global_step,
            )
            self._skipped_reported = skipped

    @property
    def skipped_steps(self) -> int:
        """Optimiser steps skipped so far because the gradients were not finite."""
        return int(self._skipped_steps)

    def _ckpt_dir(self) -> str:
        from lightning.pytorch.callbacks import ModelCheckpoint

        for cb in self.trainer.callbacks:
            if isinstance(cb, ModelCheckpoint) and cb.dirpath:
                return cb.dirpath
        return self.trainer.default_root_dir

    # ------------------------------------------------------------------ validation / test
    # The DataModules' val/test loaders yield evaluation batches (left-padded prompts, references;
    # docs/interfaces.md), one loader per task (a mix has two). Each batch gives a teacher-forced loss
    # on its reference target and, outside the sanity check, greedy generations scored at epoch end.
    def validation_step(self, batch: Mapping[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, generate=not self.trainer.sanity_checking)

    def test_step(self, batch: Mapping[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, generate=True)

    def on_validation_epoch_start(self) -> None:
        self._eval_state = {}

    def on_test_epoch_start(self) -> None:
        self._eval_state = {}

    def on_validation_epoch_end(self) -> None:
        self._finish_eval("val", score=not self.trainer.sanity_checking)

    def on_test_epoch_end(self) -> None:
        self._finish_eval("test", score=True)

    def _eval_step(self, batch: Mapping[str, Any], generate: bool) -> None:
        pad = is_padding(batch)  # FSDP2's EvenBatches: decoded with the others, then dropped
        task = batch_task(batch)
        st = self._eval_state.setdefault(task, {"loss_sum": 0.0, "tokens": 0, "results": [], "refs": []})
        if task == "train":  # a teacher-forcing batch (custom loaders)
            tf = batch
        else:
            tf = teacher_forcing_batch(batch, task, self.tokenizer, self._max_text_len())
        if is_sharded(self.model) and self.trainer.world_size > 1:  # a forward is a collective
            tf = tf if self.trainer.strategy.reduce_boolean_decision(tf is not None, all=True) else None
        if tf is not None:
            out = self(tf)
            n = int((tf["labels"][:, 1:] != -100).sum()) or 1
            if not pad:
                st["loss_sum"] += float(out.loss.detach()) * n
                st["tokens"] += n
        gen = self.hparams.val_generation
        if generate and gen["enabled"] and task != "train":
            # under FSDP2 every unit is gathered once for the batch (Block.step is no forward)
            strategy = self.trainer.strategy
            reshard, dtype = (
                getattr(strategy, "reshard_after_forward", True),
                getattr(strategy, "compute_dtype", None),
            )
            if is_sharded(self.model):
                # the functional step: a captured CUDA graph (decoder="auto" on CUDA) keeps the
                # addresses of the gathered weights, which FSDP2 frees at reshard and allocates anew
                gen = {**gen, "decoder": "functional"}
            with unsharded(self.model, reshard, dtype):
                preds = self.predict_batch(batch, gen)
            if pad:
                return
            for res, ref in zip(*eval_records(batch, preds)):
                if ref.get("references") or ref.get("answers"):  # unanswered test questions: nothing to score
                    st["results"].append(res)
                    st["refs"].append(ref)

    def _max_text_len(self) -> int:
        dm = getattr(self.trainer, "datamodule", None)
        return int(getattr(dm, "max_text_len", 64))

    def _finish_eval(self, stage: str, score: bool) -> None:
        """Reduce the losses over ranks, gather the generations, score on rank 0, log everywhere."""
        state, self._eval_state = getattr(self, "_eval_state", {}), {}
        tasks = sorted(set(state) | set(self._all_ranks_tasks(state)))
        values: dict[str, float] = {}
        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        for task in tasks:
            st = state.get(task, {"loss_sum": 0.0, "tokens": 0, "results": [], "refs": []})
            sums = torch.tensor([st["loss_sum"], st["tokens"]], dtype=torch.float64, device=self.device)
            sums = self.trainer.strategy.reduce(sums, reduce_op="sum")
            total += sums
            if len(tasks) > 1 and sums[1] > 0:
                values[f"{stage}/{task}_loss"] = float(sums[0] / sums[1])
        if total[1] > 0:
            values[f"{stage}/loss"] = float(total[0] / total[1])
        samples: list[dict[str, Any]] = []
        if score:
            for task in tasks:
                if task == "train":
                    continue
                st = state.get(task, {"results": [], "refs": []})
                results, refs = gather(st["results"]), gather(st["refs"])
                scores: dict[str, float] = {}
                if self.trainer.is_global_zero and results:
                    scores = score_task(task, results, refs, prefix=stage)
                values.update(self.trainer.strategy.broadcast(scores, src=0))
                samples += sample_rows(task, results, refs, self.hparams.num_sample_predictions)
        for key, value in values.items():
            # identical on every rank already; sync_dist only silences the distributed-logging warning
            self.log(key, value, prog_bar=key.endswith(("/loss", "CIDEr", "vqa_acc")), sync_dist=True)
        if samples and stage == "val":
            self._log_samples(samples)

    def _all_ranks_tasks(self, state: Mapping[str, Any]) -> list[str]:
        """Task names seen on any rank (a rank with no batch of a task must still join its reductions)."""
        return list(dict.fromkeys(d["task"] for d in gather([{"task": t} for t in state])))

    def predict_batch(self, batch: Mapping[str, Any], gen: Mapping[str, Any]) -> list[str]:
        """Decode one evaluation batch (left-padded prompts) to cleaned strings, as ``evaluate.py`` does."""
        options = {k: v for k, v in gen.items() if k != "enabled"}  # the rest are GenerationConfig fields
        return predict_batch(self.model, self.tokenizer, batch, options, self.device)

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
            checkpoint["tokenizer_specials"] = tok.specials()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.tokenizer_json = checkpoint.get("tokenizer_json", self.tokenizer_json)
        self.tokenizer_specials = checkpoint.get("tokenizer_specials", self.tokenizer_specials)

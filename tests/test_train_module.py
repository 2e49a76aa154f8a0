"""VLMambaLitModule without the data pipeline: optimiser groups, schedule, non-finite loss, RNG state.

Batches here are random tensors in the training layout of docs/interfaces.md (the data pipeline's
own tests cover real batches; tests/test_train.py runs the two together).
"""

from __future__ import annotations

import math
import random

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from vlm_mamba.callbacks import RNGStateCheckpoint, get_rng_state, set_rng_state
from vlm_mamba.lit_module import VLMambaLitModule, param_groups, warmup_cosine
from vlm_mamba.registry import get_config


def _batch(gen: torch.Generator, b: int = 2, t: int = 6, img: int = 32, vocab: int = 512) -> dict:
    ids = torch.randint(3, vocab, (b, t), generator=gen)
    labels = ids.clone()
    labels[:, :2] = -100  # bos + one prompt token
    return {
        "images": torch.randn(b, 3, img, img, generator=gen),
        "input_ids": ids,
        "attention_mask": torch.ones(b, t, dtype=torch.long),
        "labels": labels,
    }


def _loader(n: int, seed: int = 0) -> DataLoader:
    gen = torch.Generator().manual_seed(seed)
    return DataLoader([_batch(gen) for _ in range(n)], batch_size=None)


def _trainer(tmp_path, **kw) -> L.Trainer:
    args = dict(
        accelerator="cpu",
        devices=1,
        default_root_dir=str(tmp_path),
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
    )
    args.update(kw)
    return L.Trainer(**args)


def test_param_groups_exclude_ssm_norm_bias_and_embedding_from_decay():
    cfg = get_config("tiny", freeze_vision=True)
    module = VLMambaLitModule(cfg)
    groups = {g["name"]: g for g in param_groups(module.model, weight_decay=0.1)}
    decay, no_decay = groups["decay"]["param_names"], groups["no_decay"]["param_names"]
    assert groups["decay"]["weight_decay"] == 0.1 and groups["no_decay"]["weight_decay"] == 0.0
    # A_log is 2-D: only the name rule keeps it out of decay
    assert any(n.endswith("mixer.A_log") for n in no_decay)
    assert not any(n.rsplit(".", 1)[-1] in {"A_log", "D", "bias"} for n in decay)
    assert "language.embedding.weight" in no_decay and "language.norm_f.weight" in no_decay
    assert any(n.endswith("in_proj.weight") for n in decay)
    # frozen vision parameters are in no group; every trainable one is in exactly one
    assert not any(n.startswith("vision.") for n in decay + no_decay)
    trainable = {n for n, p in module.model.named_parameters() if p.requires_grad}
    assert sorted(decay + no_decay) == sorted(trainable)
    with_emb = {g["name"]: g for g in param_groups(module.model, 0.1, decay_embeddings=True)}
    assert "language.embedding.weight" in with_emb["decay"]["param_names"]


def test_warmup_cosine_shape():
    f = [warmup_cosine(s, warmup_steps=10, total_steps=110, min_lr_ratio=0.1) for s in range(130)]
    assert 0 < f[0] < f[5] < f[9] < 1.0  # linear warmup, never zero
    assert f[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[10:110], f[11:111]))  # monotone cosine decay
    assert f[60] == pytest.approx(0.1 + 0.9 * 0.5)  # half way: mid point of the cosine
    assert f[110] == pytest.approx(0.1) and f[129] == pytest.approx(0.1)


def test_schedule_follows_max_steps_and_lr_is_logged(tmp_path):
    module = VLMambaLitModule(get_config("tiny"), lr=1e-3, warmup_steps=2, min_lr_ratio=0.0)
    module.hparams.val_generation["enabled"] = False
    lrs = []

    class Spy(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, *_):
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    trainer = _trainer(tmp_path, max_steps=6, callbacks=[Spy()], limit_val_batches=0)
    trainer.fit(module, train_dataloaders=_loader(6))
    expected = [1e-3 * warmup_cosine(s, 2, 6, 0.0) for s in range(1, 7)]
    assert lrs == pytest.approx(expected)
    assert lrs[-1] == pytest.approx(0.0)
    assert "train/lr" in trainer.callback_metrics and "train/loss" in trainer.callback_metrics


def test_nonfinite_loss_saves_checkpoint_skips_update_and_stops(tmp_path):
    module = VLMambaLitModule(get_config("tiny"), lr=1e-3, warmup_steps=0)
    real_forward = module.model.forward
    calls = {"n": 0}

    def forward(*args, **kwargs):
        out = real_forward(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:  # the third training batch diverges
            out.loss = out.loss * float("nan")
        return out

    module.model.forward = forward
    before = {}

    class Snap(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 2:
                before.update({k: v.detach().clone() for k, v in pl_module.state_dict().items()})

    trainer = _trainer(tmp_path, max_steps=10, callbacks=[Snap()], limit_val_batches=0)
    trainer.fit(module, train_dataloaders=_loader(10))
    nf = module.nonfinite
    assert nf is not None and math.isnan(nf["loss"]) and nf["step"] == 2
    assert calls["n"] == 3  # stopped right after the bad batch
    ckpt = torch.load(nf["ckpt"], map_location="cpu", weights_only=True)
    for k, v in ckpt["state_dict"].items():  # the bad batch changed no weight
        assert torch.equal(v, before[k]), k
        assert torch.isfinite(v).all(), k


def test_rng_state_roundtrip_is_weights_only_loadable(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    state = get_rng_state()
    path = tmp_path / "rng.pt"
    torch.save(state, path)
    expect = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    set_rng_state(torch.load(path, weights_only=True))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expect


def test_rng_callback_isolates_validation_and_applies_state_at_first_batch():
    cb = RNGStateCheckpoint()

    class _State:
        fn = "fit"

    class _Trainer:
        state = _State()

    torch.manual_seed(0)
    cb.on_validation_start(_Trainer(), None)
    saved_during_val = cb.state_dict()["rng"]
    torch.rand(100)  # validation draws
    cb.on_validation_end(_Trainer(), None)
    after = torch.rand(1)
    torch.manual_seed(0)
    assert torch.equal(after, torch.rand(1))  # training stream unmoved by validation
    torch.manual_seed(0)
    assert torch.equal(saved_during_val["torch"], torch.get_rng_state())

    cb2 = RNGStateCheckpoint()
    cb2.load_state_dict({"rng": saved_during_val})
    torch.manual_seed(123)  # set-up of the resumed run draws
    cb2.on_train_batch_start(None, None, None, 0)
    torch.manual_seed(0)
    ref = torch.rand(1)
    cb2.load_state_dict({"rng": saved_during_val})
    cb2.on_train_batch_start(None, None, None, 0)
    assert torch.equal(torch.rand(1), ref)


def test_training_step_uses_the_configured_loss_reduction():
    gen = torch.Generator().manual_seed(0)
    batch = _batch(gen, b=2, t=8)
    batch["labels"][1, :6] = -100  # row 0: 6 target tokens, row 1: 2
    losses = {}
    for reduction in ("token", "sample"):
        torch.manual_seed(0)
        module = VLMambaLitModule(get_config("tiny"), loss_reduction=reduction)
        module.log = lambda *a, **k: None  # no trainer attached
        module.lr_schedulers = lambda: None
        module._trainer = type("T", (), {"world_size": 1, "global_step": 0})()
        losses[reduction] = module.training_step(batch, 0)
        expected = module.model(
            batch["images"],
            batch["input_ids"],
            batch["attention_mask"],
            batch["labels"],
            loss_reduction=reduction,
        ).loss
        torch.testing.assert_close(losses[reduction], expected)
    assert not torch.allclose(losses["token"], losses["sample"])
    with pytest.raises(ValueError, match="module.loss_reduction"):
        VLMambaLitModule(get_config("tiny"), loss_reduction="batch")

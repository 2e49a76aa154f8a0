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

from vlm_mamba.registry import get_config
from vlm_mamba.training.callbacks import RNGStateCheckpoint, get_rng_state, set_rng_state
from vlm_mamba.training.module import VLMambaLitModule
from vlm_mamba.training.optim import param_groups, warmup_cosine


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


def _hf_language_dir(tmp_path):
    """A small MambaForCausalLM saved by transformers, shaped like the tiny model's language tower."""
    transformers = pytest.importorskip("transformers")
    lang = get_config("tiny").language
    torch.manual_seed(0)
    hf = transformers.MambaForCausalLM(
        transformers.MambaConfig(
            vocab_size=lang.vocab_size,
            hidden_size=lang.d_model,
            num_hidden_layers=lang.n_layers,
            state_size=lang.d_state,
            conv_kernel=lang.d_conv,
            expand=lang.expand,
        )
    )
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    path = tmp_path / "hf_mamba"
    hf.save_pretrained(path)
    return hf.eval(), path


def test_lora_on_a_pretrained_language_model_wraps_the_pretrained_weights(tmp_path):
    """module.pretrained_language with LoRA: the weights load into the plain modules, then the
    adapters wrap them (this raised before: every base.weight / lora_A / lora_B counted as missing)."""
    hf, path = _hf_language_dir(tmp_path)
    cfg = get_config("tiny", lora={"rank": 4, "targets": ["in_proj", "out_proj", "x_proj", "dt_proj"]})
    module = VLMambaLitModule(cfg, pretrained_language=str(path))
    lang = module.model.language
    assert module.model.has_lora
    ids = torch.randint(3, 500, (2, 7))
    with torch.no_grad():
        ref = hf(ids).logits
        torch.testing.assert_close(lang.eval()(ids).logits, ref, atol=1e-4, rtol=1e-4)  # lora_B = 0
    mixer = lang.layers[0].mixer
    torch.testing.assert_close(mixer.in_proj.base.weight, hf.backbone.layers[0].mixer.in_proj.weight)
    trainable = {n for n, p in module.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("bridger.") for n in trainable)
    with pytest.raises(ValueError, match="already injected"):
        module.model.load_pretrained_language(path)


def test_a_checkpoint_evaluates_without_the_pretrained_directory(tmp_path):
    """The .ckpt loader (evaluate.py and export) reads weights_only and builds the model from the
    checkpoint alone: the pretrained directory it was initialised from may be gone."""
    import shutil

    from vlm_mamba.evaluation.run import load_model

    _, path = _hf_language_dir(tmp_path)
    module = VLMambaLitModule(get_config("tiny", lora={"rank": 2}), pretrained_language=str(path))
    trainer = _trainer(tmp_path, max_steps=2, limit_val_batches=0)
    trainer.fit(module, train_dataloaders=_loader(2))
    ckpt = tmp_path / "run.ckpt"
    trainer.save_checkpoint(ckpt)
    shutil.rmtree(path)
    model, tok = load_model(ckpt)
    batch = _batch(torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = module.model.eval()(batch["images"], batch["input_ids"]).logits
        torch.testing.assert_close(model(batch["images"], batch["input_ids"]).logits, ref, atol=0, rtol=0)
    assert tok is None  # no datamodule gave one; the checkpoint says so instead of failing
    torch.save({"state_dict": {}, "hyper_parameters": {"model": {}}, "evil": _Pickled()}, tmp_path / "x.ckpt")
    with pytest.raises(ValueError, match="weights-only"):
        load_model(tmp_path / "x.ckpt")


class _Pickled:
    """An object weights_only=True refuses to unpickle."""


@pytest.mark.parametrize("clip", [None, 1.0])
def test_nonfinite_gradients_skip_the_update_and_are_counted(tmp_path, clip):
    """A finite loss with an inf gradient: that step changes no weight and no optimiser state,
    training goes on, and the skip is counted."""
    module = VLMambaLitModule(get_config("tiny"), lr=1e-3, warmup_steps=0)
    target = module.model.bridger.fc1.weight
    seen = {}

    class Poison(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if trainer.global_step == 2:
                target.grad[0, 0] = float("inf")
                seen["before"] = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == 2:
                seen["after"] = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
                seen["adam_step"] = float(trainer.optimizers[0].state[target]["step"])

    trainer = _trainer(
        tmp_path, max_steps=5, callbacks=[Poison()], limit_val_batches=0, gradient_clip_val=clip
    )
    trainer.fit(module, train_dataloaders=_loader(5))
    for k, v in seen["after"].items():
        assert torch.equal(v, seen["before"][k]), k
    assert seen["adam_step"] == 2.0  # steps 0 and 1 counted, the skipped one not
    assert module.skipped_steps == 1 and module.nonfinite is None
    assert trainer.global_step == 5  # training went on
    assert all(torch.isfinite(p).all() for p in module.model.parameters())

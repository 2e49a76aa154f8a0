"""VLMamba: the seed's API, vision modes, loss, trainability, LoRA, save/load."""

import pytest
import torch

from vlm_mamba import (
    BridgerConfig,
    LanguageConfig,
    LoRAConfig,
    VisionConfig,
    VLMamba,
    VLMambaConfig,
    create_model,
    get_config,
)
from vlm_mamba.layers.lora import LoRALinear


def _tiny(**kw) -> VLMamba:
    torch.manual_seed(0)
    return create_model("tiny", **kw).eval()


@pytest.mark.parametrize("mode", ["encoder", "fuyu"])
def test_seed_snippet_small(mode):
    vision_cfg = VisionConfig(img_size=64, patch_size=16, d_model=48, n_layers=2)
    language_cfg = LanguageConfig(vocab_size=50257, d_model=64, n_layers=2)
    bridger_cfg = BridgerConfig(d_model=64, expansion_factor=4)
    config = VLMambaConfig(vision=vision_cfg, language=language_cfg, bridger=bridger_cfg, vision_mode=mode)
    model = VLMamba(config)
    output = model(torch.randn(1, 3, 64, 64), torch.randint(0, 50257, (1, 12)))
    assert output.logits.shape == (1, 12, 50257)
    assert torch.isfinite(output.logits).all()
    config.lora = LoRAConfig(rank=8, alpha=16)
    model = VLMamba(config)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("bridger.") or mode == "fuyu" for n in trainable)
    assert any("lora_A" in n for n in trainable)


@pytest.mark.slow  # a full-size (~150M parameter) build and forward
def test_seed_snippet_exact_sizes():
    """The seed's code as written, at its sizes (224 px, patch 16, width 768, 12 + 12 layers)."""
    vision_cfg = VisionConfig(img_size=224, patch_size=16, d_model=768, n_layers=12)
    language_cfg = LanguageConfig(vocab_size=50257, d_model=768, n_layers=12)
    bridger_cfg = BridgerConfig(d_model=768, expansion_factor=4)
    config = VLMambaConfig(
        vision=vision_cfg, language=language_cfg, bridger=bridger_cfg, vision_mode="encoder"
    )
    model = VLMamba(config)
    with torch.no_grad():
        output = model(torch.randn(1, 3, 224, 224), torch.randint(0, 50257, (1, 64)))
    assert output.logits.shape == (1, 64, 50257)
    counts = model.num_parameters()
    assert counts["total"] == sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    assert counts["total"] == counts["vision"] + counts["bridger"] + counts["language"]
    assert counts["total"] > 37_000_000 * 2  # the seed's "~37M" is wrong; README has the measured figure


def test_loss_counts_target_tokens_only():
    model = _tiny()
    images = torch.randn(2, 3, 32, 32)
    ids = torch.randint(1, 500, (2, 9))
    labels = ids.clone()
    labels[:, :4] = -100
    out = model(images, ids, labels=labels)
    # reference: the text logits predict the next token; targets are labels[:, 1:]
    ref = torch.nn.functional.cross_entropy(
        out.logits[:, :-1].reshape(-1, out.logits.shape[-1]), labels[:, 1:].reshape(-1)
    )
    torch.testing.assert_close(out.loss, ref, atol=1e-5, rtol=1e-5)
    # a change to a prompt-only label does not move the loss; a target one does
    labels2 = labels.clone()
    labels2[:, 5] = (labels2[:, 5] + 1) % 500
    assert not torch.allclose(model(images, ids, labels=labels2).loss, out.loss)


def test_right_padding_does_not_change_real_positions():
    model = _tiny()
    images = torch.randn(2, 3, 32, 32)
    ids = torch.randint(1, 500, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, 6:] = 0
    out = model(images, ids, attention_mask=mask).logits
    alone = model(images[1:], ids[1:, :6]).logits
    torch.testing.assert_close(out[1, :6], alone[0], atol=1e-5, rtol=1e-5)


def test_fuyu_rows_independent_of_canvas_neighbours():
    model = _tiny(vision_mode="fuyu")
    small = torch.randn(1, 3, 16, 24)
    big = torch.randn(1, 3, 40, 32)
    canvas = torch.zeros(2, 3, 40, 32)
    canvas[0, :, :16, :24] = small[0]
    canvas[1] = big[0]
    sizes = torch.tensor([[16, 24], [40, 32]])
    ids = torch.randint(1, 500, (2, 7))
    batched = model(canvas, ids, image_sizes=sizes).logits
    alone = model(small, ids[:1]).logits
    torch.testing.assert_close(batched[0], alone[0], atol=1e-5, rtol=1e-5)
    # garbage in the padded canvas area changes nothing
    canvas2 = canvas.clone()
    canvas2[0, :, 16:, :] = 5.0
    torch.testing.assert_close(model(canvas2, ids, image_sizes=sizes).logits, batched, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("vision_mode", ["encoder", "fuyu"])
def test_center_images_removes_each_images_colour_offset(vision_mode):
    """``vision.center_images``: an image and the same image with a per-channel offset give the
    same logits (and differ without the option); in fuyu mode the mean is over the real pixels
    only, so a padded image equals the same image alone."""
    cfg = get_config("tiny").model_copy(update={"vision_mode": vision_mode})
    cfg.vision = cfg.vision.model_copy(update={"center_images": True})
    torch.manual_seed(0)
    model = VLMamba(cfg).eval()
    img = torch.randn(1, 3, 32, 32)
    shifted = img + torch.tensor([0.7, -1.3, 2.0]).view(1, 3, 1, 1)
    ids = torch.randint(1, 500, (1, 6))
    base = model(img, ids).logits
    torch.testing.assert_close(model(shifted, ids).logits, base, atol=1e-5, rtol=1e-5)
    plain = VLMamba(get_config("tiny").model_copy(update={"vision_mode": vision_mode})).eval()
    plain.load_state_dict(model.state_dict())
    assert not torch.allclose(plain(shifted, ids).logits, plain(img, ids).logits, atol=1e-3)
    if vision_mode == "fuyu":
        canvas = torch.full((2, 3, 32, 48), 9.0)
        canvas[0, :, :32, :32] = shifted[0]
        sizes = torch.tensor([[32, 32], [32, 48]])
        batched = model(canvas, ids.expand(2, -1), image_sizes=sizes).logits
        torch.testing.assert_close(batched[0], base[0], atol=1e-5, rtol=1e-5)


def test_plain_patch_embed_matmul_equals_the_conv():
    """Without a stem the patchify runs as one matmul over flattened patches (the CPU-fast path);
    it must equal the Conv2d it stands for, weights and gradients alike, on a non-square image."""
    from einops import rearrange

    from vlm_mamba.layers.patch_embed import PatchEmbed

    torch.manual_seed(0)
    pe = PatchEmbed(8, 3, 16)
    img = torch.randn(2, 3, 32, 24)
    out, grid = pe(img)
    conv = rearrange(pe.proj(img), "b d r q -> b (r q) d")
    assert grid == (4, 3)
    torch.testing.assert_close(out, conv, atol=1e-5, rtol=1e-5)
    w = torch.randn_like(out)
    (g_mat,) = torch.autograd.grad((out * w).sum(), [pe.proj.weight])
    (g_conv,) = torch.autograd.grad((conv * w).sum(), [pe.proj.weight])
    torch.testing.assert_close(g_mat, g_conv, atol=1e-4, rtol=1e-4)


def test_conv_stem_keeps_the_token_grid_and_trains():
    """``vision.conv_stem``: two stride-2 convolutions before a patch/4 patchify give the same
    token grid as the plain patchify, every stem weight gets a gradient, and the stem is used."""
    from vlm_mamba.layers.patch_embed import PatchEmbed

    torch.manual_seed(0)
    plain, stem = PatchEmbed(8, 3, 16), PatchEmbed(8, 3, 16, stem_channels=[4, 6])
    img = torch.randn(2, 3, 32, 24)
    (a, grid_a), (b, grid_b) = plain(img), stem(img)
    assert grid_a == grid_b == (4, 3) and a.shape == b.shape == (2, 12, 16)
    assert stem.proj.kernel_size == (2, 2) and len(stem.stem) == 4
    cfg = get_config("tiny")
    cfg.vision = cfg.vision.model_copy(update={"conv_stem": [4, 8]})
    model = VLMamba(cfg)
    ids = torch.randint(1, 500, (2, 5))
    model(torch.randn(2, 3, 32, 32), ids, labels=ids).loss.backward()
    stem_params = dict(model.vision.patch_embed.stem.named_parameters())
    assert len(stem_params) == 4 and all(
        p.grad is not None and p.grad.abs().sum() > 0 for p in stem_params.values()
    )


def test_encoder_other_image_size_interpolates_positions():
    model = _tiny()
    out = model(torch.randn(1, 3, 48, 40), torch.randint(1, 500, (1, 5)))
    assert out.logits.shape == (1, 5, 512) and torch.isfinite(out.logits).all()


def test_text_first_order_places_image_after_prompt():
    model = _tiny(prompt_order="text_first")
    images = torch.randn(1, 3, 32, 32)
    ids = torch.randint(1, 500, (1, 8))
    labels = ids.clone()
    labels[:, :3] = -100
    out = model(images, ids, labels=labels)
    assert torch.isfinite(out.loss)
    # the prompt positions do not see the image; the targets do
    other = model(torch.randn(1, 3, 32, 32), ids, labels=labels)
    torch.testing.assert_close(out.logits[:, :3], other.logits[:, :3])
    assert not torch.allclose(out.logits[:, 3:], other.logits[:, 3:])


MODES = {
    "full": {},
    "freeze_vision": {"freeze_vision": True},
    "freeze_language": {"freeze_language": True},
    "bridge_only": {"freeze_vision": True, "freeze_language": True},
    "lora_language": {"lora": {"rank": 4, "targets": ["in_proj", "out_proj", "x_proj", "dt_proj"]}},
    "lora_both": {"lora": {"rank": 4, "apply_to": "both"}},
    "lora_no_bridge": {"lora": {"rank": 4, "train_bridge": False}},
}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("vision_mode", ["encoder", "fuyu"])
def test_trainability(mode, vision_mode):
    model = _tiny(vision_mode=vision_mode, **MODES[mode]).train()
    if "lora" in mode:  # non-zero B so gradients reach A as well
        for m in model.modules():
            if isinstance(m, LoRALinear):
                torch.nn.init.normal_(m.lora_B, std=0.02)
    images = torch.randn(2, 3, 32, 32)
    ids = torch.randint(1, 500, (2, 6))
    model(images, ids, labels=ids).loss.backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable, "nothing trainable"
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), f"{n} has no gradient"
        else:
            assert p.grad is None, f"frozen {n} got a gradient"
    cfg = model.config
    if cfg.freeze_vision:
        assert not any(n.startswith("vision.") for n in trainable)
    if cfg.freeze_language:
        assert not any(n.startswith("language.") for n in trainable)
    if cfg.lora is not None:
        assert all("lora_" in n or n.startswith(("bridger.", "vision.")) for n in trainable)
        assert any(n.startswith("bridger.") for n in trainable) == cfg.lora.train_bridge


def test_lora_zero_init_unchanged_then_merge_unmerge_and_plain_checkpoint(tmp_path):
    torch.manual_seed(0)
    base = create_model("tiny").eval()
    cfg = get_config("tiny", lora={"rank": 4, "targets": ["in_proj", "out_proj", "x_proj", "dt_proj"]})
    lora = VLMamba(cfg).eval()
    missing, unexpected = lora.load_state_dict(_to_lora_keys(base.state_dict(), lora), strict=False)
    assert all("lora_" in k for k in missing) and not unexpected
    images, ids = torch.randn(2, 3, 32, 32), torch.randint(1, 500, (2, 7))
    ref = base(images, ids).logits
    torch.testing.assert_close(lora(images, ids).logits, ref)  # B = 0 at init
    for m in lora.modules():
        if isinstance(m, LoRALinear):
            torch.nn.init.normal_(m.lora_B, std=0.05)
    adapted = lora(images, ids).logits
    assert not torch.allclose(adapted, ref, atol=1e-4)
    lora.merge_lora()
    torch.testing.assert_close(lora(images, ids).logits, adapted, atol=1e-5, rtol=1e-5)
    lora.unmerge_lora()
    torch.testing.assert_close(lora(images, ids).logits, adapted, atol=1e-5, rtol=1e-5)
    lora.merge_lora(unload=True)
    assert lora.config.lora is None and not lora.has_lora
    lora.save_pretrained(tmp_path / "merged")
    plain = VLMamba.from_pretrained(tmp_path / "merged").eval()
    assert not plain.has_lora
    torch.testing.assert_close(plain(images, ids).logits, adapted, atol=1e-5, rtol=1e-5)


def _to_lora_keys(sd, lora_model):
    names = set(lora_model.state_dict())
    out = {}
    for k, v in sd.items():
        if k in names:
            out[k] = v
        else:
            stem, leaf = k.rsplit(".", 1)
            out[f"{stem}.base.{leaf}"] = v
    return out


@pytest.mark.parametrize(
    "overrides", [{}, {"vision_mode": "fuyu", "language": {"ssm": "mamba2"}}, {"lora": {"rank": 2}}]
)
def test_save_pretrained_round_trip(tmp_path, overrides):
    model = _tiny(**overrides)
    tok = tmp_path / "tokenizer.json"
    tok.write_text('{"dummy": true}')
    model.save_pretrained(tmp_path / "m", tokenizer=tok)
    assert {p.name for p in (tmp_path / "m").iterdir()} == {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
    }
    loaded = VLMamba.from_pretrained(tmp_path / "m").eval()
    assert loaded.config == model.config
    images, ids = torch.randn(2, 3, 32, 32), torch.randint(1, 500, (2, 5))
    torch.testing.assert_close(loaded(images, ids).logits, model(images, ids).logits, atol=0, rtol=0)
    # a rerun over an existing directory is safe
    model.save_pretrained(tmp_path / "m")
    assert not (tmp_path / "m.tmp").exists()


def test_from_pretrained_reports_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        VLMamba.from_pretrained(tmp_path / "nope")


@pytest.mark.parametrize("order", ["image_first", "text_first"])
def test_loss_equals_manual_sequence(order):
    """The loss equals cross-entropy computed by hand on the assembled [prompt][image][target]
    (or [image][text]) sequence, each target predicted at the position just before it."""
    model = _tiny(prompt_order=order)
    images = torch.randn(2, 3, 32, 32)
    ids = torch.randint(1, 500, (2, 9))
    labels = ids.clone()
    labels[0, :3] = -100
    labels[1, :5] = -100
    if order == "image_first":
        labels[0, 0] = ids[0, 0]  # a labelled first token is predicted by the last image token
    loss = model(images, ids, labels=labels).loss
    per_sample = model(images, ids, labels=labels, loss_reduction="sample").loss
    img, _ = model.encode_images(images)
    p = img.shape[1]
    total, n, row_means = 0.0, 0, []
    for i in range(2):
        row_total, row_n = 0.0, 0
        split = 0 if order == "image_first" else int((labels[i] == -100).sum())
        txt = model.language.embed(ids[i : i + 1])
        seq = torch.cat([txt[:, :split], img[i : i + 1], txt[:, split:]], 1)
        logits = model.language(inputs_embeds=seq).logits[0]  # (l, V)
        pos = [k if k < split else k + p for k in range(ids.shape[1])]
        for k in range(ids.shape[1]):
            if labels[i, k] != -100 and pos[k] > 0:
                ce = torch.nn.functional.cross_entropy(logits[pos[k] - 1], labels[i, k], reduction="sum")
                row_total, row_n = row_total + ce, row_n + 1
        total, n = total + row_total, n + row_n
        row_means.append(row_total / row_n)
    torch.testing.assert_close(loss, total / n, atol=1e-5, rtol=1e-5)
    # "sample": each sequence's mean, then the mean over sequences (rows have 6-7 and 4 targets here)
    torch.testing.assert_close(per_sample, sum(row_means) / 2, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(per_sample, loss)


def test_sample_loss_skips_rows_without_targets_and_rejects_unknown_reductions():
    model = _tiny()
    images = torch.randn(3, 3, 32, 32)
    ids = torch.randint(1, 500, (3, 8))
    labels = ids.clone()
    labels[0, :2] = -100
    labels[1, :6] = -100
    labels[2] = -100  # no target at all: must not count as a zero-loss sequence
    both = model(images, ids, labels=labels, loss_reduction="sample").loss
    alone = [model(images[i : i + 1], ids[i : i + 1], labels=labels[i : i + 1]).loss for i in range(2)]
    torch.testing.assert_close(both, (alone[0] + alone[1]) / 2, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="loss_reduction='mean'"):
        model(images, ids, labels=labels, loss_reduction="mean")


def _perturb(model: VLMamba, std: float = 0.05, seed: int = 1) -> VLMamba:
    """Move every weight away from its init (at init several effects below are exactly zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return model


def _fuyu_canvas(b: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """A canvas batch whose first image is smaller than the grid: its last slots are padding."""
    canvas = torch.randn(b, 3, 32, 32)
    canvas[0, :, 16:, :] = 0.0
    canvas[0, :, :, 16:] = 0.0
    return canvas, torch.tensor([[16, 16]] + [[32, 32]] * (b - 1))


@pytest.mark.parametrize("order", ["image_first", "text_first"])
@pytest.mark.parametrize("vision_mode", ["encoder", "fuyu"])
def test_no_target_is_predicted_from_a_position_that_read_later_targets(vision_mode, order):
    """Per-position cross-entropy at each target is unchanged when a later target token changes.

    With fuyu + text_first the first target used to be predicted by the last canvas slot, a pad;
    pads run after the real tokens, so that slot had read the targets (a label leak)."""
    model = _perturb(_tiny(vision_mode=vision_mode, prompt_order=order))
    images, sizes = _fuyu_canvas() if vision_mode == "fuyu" else (torch.randn(2, 3, 32, 32), None)
    ids = torch.randint(3, 500, (2, 9))
    labels = ids.clone()
    labels[:, :4] = -100  # prompt: 4 tokens, then 5 targets
    ce = model(images, ids, labels=labels, image_sizes=sizes, loss_reduction="none").loss  # (b, t)
    assert ce.shape == ids.shape and (ce[:, 4:] > 0).all() and (ce[:, :4] == 0).all()
    for k in range(4, 9):
        later = ids.clone()
        later[:, k:] = (later[:, k:] + 7) % 497 + 3  # targets k.. change, the labels stay as they were
        ce2 = model(images, later, labels=labels, image_sizes=sizes, loss_reduction="none").loss
        torch.testing.assert_close(ce2[:, : k + 1], ce[:, : k + 1], atol=1e-6, rtol=1e-6)


def test_text_first_fuyu_generation_reads_the_last_real_image_token(monkeypatch):
    """The first new token's logits come from the last real slot: a smaller image padded on a
    canvas gives, per element, the logits of the same image alone on a canvas of its own size."""
    import vlm_mamba.models.vlm as vlm_module

    first = []
    real_decode = vlm_module.decode
    monkeypatch.setattr(
        vlm_module,
        "decode",
        lambda f, st, logits, cfg: first.append(logits) or real_decode(f, st, logits, cfg),
    )
    model = _perturb(_tiny(vision_mode="fuyu", prompt_order="text_first"))
    canvas, sizes = _fuyu_canvas()
    ids = torch.randint(3, 500, (2, 5))
    model.generate(canvas, ids, image_sizes=sizes, max_new_tokens=1)
    model.generate(canvas[:1, :, :16, :16], ids[:1], image_sizes=sizes[:1], max_new_tokens=1)
    torch.testing.assert_close(first[0][:1], first[1], atol=1e-5, rtol=1e-5)
    canvas[0, :, 16:, :] = 3.0  # the padded area's pixels are no input either
    model.generate(canvas, ids, image_sizes=sizes, max_new_tokens=1)
    torch.testing.assert_close(first[2], first[0], atol=1e-6, rtol=1e-6)


def _train_adapters(model: VLMamba, std: float = 0.5) -> VLMamba:
    for m in model.modules():
        if isinstance(m, LoRALinear):
            torch.nn.init.normal_(m.lora_B, std=std)
    return model


@pytest.mark.parametrize("state", ["unmerged", "merged", "unloaded"])
def test_lora_save_reload_gives_identical_logits(tmp_path, state):
    """A trained adapter saved unmerged, merged or unloaded reloads to the same logits (merged
    adapters used to be applied twice on reload), and a merged reload can still be unmerged."""
    model = _train_adapters(_perturb(_tiny(lora={"rank": 4, "targets": ["in_proj", "out_proj", "x_proj"]})))
    images, ids = torch.randn(2, 3, 32, 32), torch.randint(1, 500, (2, 7))
    ref = model(images, ids).logits
    if state != "unmerged":
        model.merge_lora(unload=state == "unloaded")
    torch.testing.assert_close(model(images, ids).logits, ref, atol=1e-5, rtol=1e-5)
    model.save_pretrained(tmp_path / "m")
    loaded = VLMamba.from_pretrained(tmp_path / "m").eval()
    assert loaded.has_lora == (state != "unloaded")
    torch.testing.assert_close(loaded(images, ids).logits, model(images, ids).logits, atol=0, rtol=0)
    if state == "merged":
        assert all(m.merged for m in loaded.modules() if isinstance(m, LoRALinear))
        loaded.unmerge_lora()
        torch.testing.assert_close(loaded(images, ids).logits, ref, atol=1e-5, rtol=1e-5)


def test_save_pretrained_refuses_a_directory_it_did_not_write(tmp_path):
    model = _tiny()
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"precious")
    (run / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a VLMamba.save_pretrained output"):
        model.save_pretrained(run)
    assert (run / "checkpoints" / "last.ckpt").read_bytes() == b"precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no temporary folder left behind
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not a directory"):
        model.save_pretrained(tmp_path / "file")


def test_save_pretrained_replaces_its_own_output_and_keeps_it_when_writing_fails(tmp_path, monkeypatch):
    first, second = _tiny(), _perturb(_tiny())
    images, ids = torch.randn(1, 3, 32, 32), torch.randint(1, 500, (1, 5))
    first.save_pretrained(tmp_path / "m")
    import safetensors.torch

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_model", boom)
    with pytest.raises(OSError, match="disk full"):
        second.save_pretrained(tmp_path / "m")
    monkeypatch.undo()
    kept = VLMamba.from_pretrained(tmp_path / "m").eval()
    torch.testing.assert_close(kept(images, ids).logits, first(images, ids).logits, atol=0, rtol=0)
    second.save_pretrained(tmp_path / "m")  # a rerun replaces the earlier output
    new = VLMamba.from_pretrained(tmp_path / "m").eval()
    torch.testing.assert_close(new(images, ids).logits, second(images, ids).logits, atol=0, rtol=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


@pytest.mark.parametrize("vision_mode", ["encoder", "fuyu"])
def test_bf16_model_takes_fp32_images(vision_mode):
    """A loader's fp32 pixels into a model cast to bf16 (used to fail in the patch projection):
    the same logits as bf16 pixels, in training forward and generation."""
    model = _tiny(vision_mode=vision_mode).to(torch.bfloat16)
    images, ids = torch.randn(2, 3, 32, 32), torch.randint(3, 500, (2, 6))
    with torch.no_grad():
        a = model(images, ids).logits
        b = model(images.bfloat16(), ids).logits
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a, b, atol=0, rtol=0)
        g = model.generate(images, ids, max_new_tokens=3, eos_token_id=None)
        assert torch.equal(g, model.generate(images.bfloat16(), ids, max_new_tokens=3, eos_token_id=None))

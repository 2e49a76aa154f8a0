"""LanguageMamba: logits equal transformers' Mamba/Mamba2 after from_pretrained (and a mamba_ssm
checkpoint layout), vocabulary padding, loading errors, prefill + step == forward, padded batches
== rows alone, tied head, gradient checkpointing and trainability."""

import importlib.util
import json
import logging
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

from vlm_mamba.config import LanguageConfig
from vlm_mamba.models.language import LanguageMamba

transformers = pytest.importorskip("transformers")
logging.getLogger("transformers").setLevel(logging.ERROR)
# With causal_conv1d/mamba_ssm importable, transformers calls their CUDA kernels even for CPU tensors
# (seen on the GPU machine: "Expected x.is_cuda() to be true"), so its CPU reference is unavailable.
needs_hf_cpu_path = pytest.mark.skipif(
    importlib.util.find_spec("causal_conv1d") is not None
    or importlib.util.find_spec("mamba_ssm") is not None,
    reason="transformers uses the CUDA kernels when they are installed; its CPU path is the reference",
)


def _perturb(model, names=("A_log", ".D", "norm", "dt_bias", "dt_proj.bias")):
    """Random init leaves A, D and norms at tidy values; move them so a wrong formula shows."""
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if any(k in n for k in names):
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def _hf_mamba(**kw):
    torch.manual_seed(0)
    cfg = transformers.MambaConfig(**{"vocab_size": 99, "num_hidden_layers": 2, **kw})
    return _perturb(transformers.MambaForCausalLM(cfg)).eval()


def _hf_mamba2(**kw):
    torch.manual_seed(0)
    cfg = transformers.Mamba2Config(**{"vocab_size": 99, "num_hidden_layers": 2, **kw})
    return _perturb(transformers.Mamba2ForCausalLM(cfg)).eval()


def _ids(b, L, V=99, seed=0):
    return torch.randint(0, V, (b, L), generator=torch.Generator().manual_seed(seed))


MAMBA1_CASES = [  # (config, batch, length)
    (dict(hidden_size=32, state_size=7, conv_kernel=3, time_step_rank=5, use_bias=True), 3, 13),
    (dict(hidden_size=24, state_size=16, expand=1, use_conv_bias=False), 2, 1),
    (dict(hidden_size=16, state_size=4, conv_kernel=2, num_hidden_layers=3), 1, 33),
]
MAMBA2_CASES = [
    (dict(hidden_size=32, state_size=12, num_heads=8, head_dim=8, n_groups=2, chunk_size=8), 3, 13),
    (dict(hidden_size=16, state_size=16, num_heads=2, head_dim=16, n_groups=1, conv_kernel=2, tie_word_embeddings=True), 2, 7),
    (dict(hidden_size=16, state_size=5, num_heads=4, head_dim=8, n_groups=4, chunk_size=4, use_bias=True), 2, 21),
]  # fmt: skip


@needs_hf_cpu_path
@pytest.mark.parametrize("case", range(len(MAMBA1_CASES)))
def test_logits_match_transformers_mamba(case, tmp_path):
    kw, b, L = MAMBA1_CASES[case]
    hf, ids = _hf_mamba(**kw), _ids(b, L)
    hf.save_pretrained(tmp_path)
    ours = LanguageMamba.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf(ids).logits, atol=1e-4, rtol=1e-4)
    assert ours.config.ssm == "mamba1" and ours.config.d_state == kw["state_size"]


@needs_hf_cpu_path
@pytest.mark.parametrize("case", range(len(MAMBA2_CASES)))
def test_logits_match_transformers_mamba2(case, tmp_path):
    kw, b, L = MAMBA2_CASES[case]
    hf, ids = _hf_mamba2(**kw), _ids(b, L)
    if kw["n_groups"] > 1 and not hasattr(hf.backbone.layers[0].mixer.norm, "group_size"):
        # transformers up to at least 5.17 normalised the gated norm over the whole width (mamba_ssm: per group)
        pytest.skip(f"transformers {transformers.__version__} ignores n_groups in Mamba-2's gated norm")
    hf.save_pretrained(tmp_path)
    ours = LanguageMamba.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf(ids).logits, atol=1e-4, rtol=1e-4)
    assert (ours.config.ssm, ours.config.ngroups) == ("mamba2", kw["n_groups"])
    assert ours.config.tie_embeddings == kw.get("tie_word_embeddings", False)


def _to_mamba_ssm_dir(hf, path, ssm_cfg):
    """Write ``hf``'s weights in mamba_ssm MambaLMHeadModel's layout: config.json (d_model, n_layer,
    ssm_cfg, ...) and pytorch_model.bin with backbone.embedding / vocabulary padded to 8 rows."""
    c = hf.config
    sd = {k.replace("backbone.embeddings.", "backbone.embedding."): v for k, v in hf.state_dict().items()}
    pad = (-c.vocab_size) % 8
    for k in ("backbone.embedding.weight", "lm_head.weight"):
        sd[k] = torch.cat([sd[k], torch.zeros(pad, sd[k].shape[1])])
    path.mkdir(exist_ok=True)
    torch.save(sd, path / "pytorch_model.bin")
    cfg = dict(
        d_model=c.hidden_size, d_intermediate=0, n_layer=c.num_hidden_layers, vocab_size=c.vocab_size,
        ssm_cfg=ssm_cfg, attn_layer_idx=[], attn_cfg={}, rms_norm=True, residual_in_fp32=True,
        fused_add_norm=True, pad_vocab_size_multiple=8, tie_embeddings=True,
    )  # fmt: skip
    (path / "config.json").write_text(json.dumps(cfg))


@needs_hf_cpu_path
def test_mamba_ssm_checkpoint_layout_mamba1(tmp_path):
    hf = _hf_mamba(hidden_size=32, state_size=7, conv_kernel=3, time_step_rank=5)
    _to_mamba_ssm_dir(hf, tmp_path, {"d_state": 7, "d_conv": 3, "expand": 2, "dt_rank": 5})
    ours = LanguageMamba.from_pretrained(tmp_path).eval()
    assert ours.embedding.weight.shape[0] == 104 and ours.lm_head.weight is ours.embedding.weight
    ids = _ids(2, 9)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf(ids).logits, atol=1e-4, rtol=1e-4)


@needs_hf_cpu_path
def test_mamba_ssm_checkpoint_layout_mamba2(tmp_path):
    hf = _hf_mamba2(
        hidden_size=32, state_size=12, num_heads=8, head_dim=8, n_groups=2, tie_word_embeddings=True
    )
    ssm_cfg = {"layer": "Mamba2", "d_state": 12, "d_conv": 4, "expand": 2, "headdim": 8, "ngroups": 2}
    _to_mamba_ssm_dir(hf, tmp_path, ssm_cfg)
    ours = LanguageMamba.from_pretrained(tmp_path).eval()
    ids = _ids(2, 11)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf(ids).logits, atol=1e-4, rtol=1e-4)


def test_vocab_padding_on_load_never_predicts_pad_rows(tmp_path):
    hf = _hf_mamba(hidden_size=16, state_size=4)
    hf.save_pretrained(tmp_path)
    ours = LanguageMamba.from_pretrained(tmp_path, pad_vocab_size_multiple=16).eval()
    assert ours.embedding.weight.shape[0] == 112
    with torch.no_grad():
        ours.embedding.weight[99:] = 100.0  # padded rows: huge, but never in the logits
        out = ours(_ids(2, 5))
    assert out.logits.shape[-1] == 99 and out.logits.max() < 100


def _rewrite(tmp_path, hf, edit):
    hf.save_pretrained(tmp_path)
    sd = load_file(str(tmp_path / "model.safetensors"))
    edit(sd)
    save_file(sd, str(tmp_path / "model.safetensors"))


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    hf = _hf_mamba(hidden_size=16, state_size=4)

    def edit(sd):
        sd.pop("backbone.layers.1.mixer.D")
        sd["backbone.layers.0.mixer.extra"] = torch.zeros(1)

    _rewrite(tmp_path, hf, edit)
    with pytest.raises(ValueError) as err:
        LanguageMamba.from_pretrained(tmp_path)
    msg = str(err.value)
    assert "missing keys: ['layers.1.mixer.D']" in msg and "unexpected keys: ['layers.0.mixer.extra']" in msg


def test_shape_mismatch_and_short_vocab_are_errors(tmp_path):
    _hf_mamba(hidden_size=16, state_size=4).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"shape mismatches: \['layers.0.mixer.A_log"):
        LanguageMamba.from_pretrained(tmp_path, d_state=5)
    with pytest.raises(ValueError, match="embedding.weight has shape"):
        LanguageMamba.from_pretrained(tmp_path, vocab_size=200)


class _NotATensor:
    pass


def test_bin_is_loaded_weights_only(tmp_path):
    _hf_mamba(hidden_size=16, state_size=4).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    torch.save({"backbone.norm_f.weight": _NotATensor()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(pickle.UnpicklingError):
        LanguageMamba.from_pretrained(tmp_path)


def test_unknown_or_unsupported_configs_are_errors(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    with pytest.raises(ValueError, match="neither a transformers Mamba"):
        LanguageMamba.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(
        json.dumps({"d_model": 8, "n_layer": 1, "vocab_size": 9, "attn_layer_idx": [0]})
    )
    with pytest.raises(ValueError, match="attn_layer_idx"):
        LanguageMamba.from_pretrained(tmp_path)


# ------------------------------------------------------------------------- model behaviour
def _lm(ssm, **kw):
    torch.manual_seed(0)
    cfg = LanguageConfig(
        d_model=32, n_layers=2, d_state=8, vocab_size=50, ssm=ssm, headdim=16, ngroups=2, chunk_size=8, **kw
    )
    return LanguageMamba(cfg).eval()


SSMS = ["mamba1", "mamba2"]


@pytest.mark.parametrize("ssm", SSMS)
def test_prefill_embeds_then_step_equals_forward(ssm):
    """Image-like embeddings then text: prefill a prefix, teacher-force the rest with step."""
    lm = _lm(ssm)
    img = torch.randn(2, 4, 32, generator=torch.Generator().manual_seed(0))
    ids = _ids(2, 7, V=50)
    with torch.no_grad():
        full = lm(inputs_embeds=torch.cat([img, lm.embed(ids)], 1), return_state=True)
        pre = lm(inputs_embeds=torch.cat([img, lm.embed(ids[:, :2])], 1), return_state=True)
        st, logits = pre.state, [pre.logits]
        for t in range(2, 7):
            o = lm.step(ids[:, t], st)
            st, logits = o.state, logits + [o.logits[:, None]]
    torch.testing.assert_close(torch.cat(logits, 1), full.logits, atol=1e-4, rtol=1e-4)
    for a, b in zip(st, full.state):
        torch.testing.assert_close(a.ssm, b.ssm, atol=1e-4, rtol=1e-4)
    with torch.no_grad():  # step from embeddings equals step from ids
        e = lm.step(inputs_embeds=lm.embed(ids[:, 0]), state=pre.state).logits
        torch.testing.assert_close(e, lm.step(ids[:, 0], pre.state).logits)


@pytest.mark.parametrize("ssm", SSMS)
def test_left_padded_prompts_after_cached_prefix_equal_rows_alone(ssm):
    lm = _lm(ssm)
    prefix = torch.randn(1, 5, 32, generator=torch.Generator().manual_seed(1))
    prompts = [[3, 4, 5, 6], [7], [8, 9, 10, 11, 12, 13]]
    Lp = max(map(len, prompts))
    ids = torch.zeros(3, Lp, dtype=torch.long)
    mask = torch.zeros(3, Lp, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, Lp - len(p) :], mask[i, Lp - len(p) :] = torch.tensor(p), 1
    with torch.no_grad():
        st = lm(inputs_embeds=prefix, return_state=True).state.repeat_interleave(3)
        batched = lm(ids, attention_mask=mask, state=st, return_state=True)
        nxt = lm.step(torch.tensor([1, 2, 3]), batched.state).logits
        for i, p in enumerate(prompts):
            alone = lm(torch.tensor([p]), state=st.index_select(torch.tensor([i])), return_state=True)
            torch.testing.assert_close(batched.logits[i, -1], alone.logits[0, -1], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(
                nxt[i], lm.step(torch.tensor([i + 1]), alone.state).logits[0], atol=1e-4, rtol=1e-4
            )


@pytest.mark.parametrize("ssm", SSMS)
def test_allocated_zero_state_equals_no_state(ssm):
    lm, ids = _lm(ssm), _ids(2, 4, V=50)
    with torch.no_grad():
        a = lm(ids, state=lm.allocate_inference_cache(2)).logits
        torch.testing.assert_close(a, lm(ids).logits)


def test_tied_head_and_padded_vocab():
    lm = _lm("mamba1", pad_vocab_size_multiple=16)
    assert lm.embedding.weight.shape[0] == 64 and lm.lm_head.weight is lm.embedding.weight
    out = lm(_ids(2, 3, V=50))
    assert out.logits.shape == (2, 3, 50) and out.hidden_states.shape == (2, 3, 32)
    untied = _lm("mamba1", tie_embeddings=False)
    assert untied.lm_head.weight is not untied.embedding.weight


@pytest.mark.parametrize("ssm", SSMS)
def test_every_parameter_trains_and_checkpointing_keeps_grads(ssm):
    ids = _ids(2, 6, V=50)
    grads = []
    for ckpt in (False, True):
        lm = _lm(ssm, gradient_checkpointing=ckpt).train()
        lm(ids, attention_mask=torch.tensor([[0, 1, 1, 1, 1, 1], [1] * 6])).logits.logsumexp(
            -1
        ).sum().backward()
        grads.append({n: p.grad for n, p in lm.named_parameters()})
    for n, g in grads[0].items():
        assert g is not None and g.abs().sum() > 0, f"{n} got no gradient"
        torch.testing.assert_close(grads[1][n], g, atol=1e-5, rtol=1e-4)


def test_inputs_are_validated():
    lm = _lm("mamba1")
    with pytest.raises(ValueError, match="exactly one"):
        lm()
    with pytest.raises(ValueError, match="needs a state"):
        lm.step(torch.tensor([1]))


def _masks():
    """(b=3, l=8) masks with pads on the right, on the left and in the middle (a fuyu canvas)."""
    m = torch.ones(3, 8, dtype=torch.bool)
    m[0, 6:], m[1, :3], m[2, 2:5] = False, False, False
    return m


@pytest.mark.parametrize("ckpt", [False, True])
@pytest.mark.parametrize("ssm", SSMS)
def test_padded_training_batch_equals_rows_alone(ssm, ckpt):
    """Pads anywhere, training (no state): the compacted rows run unmasked, and the logits at real
    positions and every parameter's gradient equal the rows run one by one."""
    mask, ids = _masks(), _ids(3, 8, V=50)
    lm = _perturb(_lm(ssm, gradient_checkpointing=ckpt)).train()
    out = lm(ids, attention_mask=mask.long())
    out.logits[mask].logsumexp(-1).sum().backward()
    grads = {n: p.grad.clone() for n, p in lm.named_parameters()}
    lm.zero_grad()
    for r in range(3):
        alone = lm(ids[r : r + 1, mask[r]]).logits
        torch.testing.assert_close(out.logits[r, mask[r]], alone[0], atol=1e-4, rtol=1e-4)
        alone.logsumexp(-1).sum().backward()
    for n, p in lm.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, atol=1e-4, rtol=1e-3, msg=n)


@pytest.mark.parametrize("ssm", SSMS)
def test_forward_reads_nothing_back_to_the_host(ssm, monkeypatch):
    """No host syncs in the forward (issue 14): the padding decisions stay on the device. On the CPU
    the explicit reads (bool(tensor), .item(), .tolist()) are what a CUDA run would wait on."""
    lm, ids, mask = _lm(ssm).train(), _ids(3, 8, V=50), _masks()

    def refuse(*a, **k):
        raise AssertionError("the forward read a tensor back to the host")

    for name in ("__bool__", "item", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    lm(ids, attention_mask=mask)
    lm(ids, attention_mask=mask, return_state=True, logits="last")
    monkeypatch.undo()


def test_initializer_range_sets_the_embedding_init():
    """Issue 12, item 7: the embedding's init std is initializer_range (0.02 where none is given)."""
    cfg = LanguageConfig(d_model=64, n_layers=1, vocab_size=4000, tie_embeddings=False)
    torch.manual_seed(0)
    assert abs(LanguageMamba(cfg).embedding.weight.std().item() - 0.02) < 1e-3
    torch.manual_seed(0)
    wide = LanguageMamba(cfg, initializer_range=0.1)
    assert abs(wide.embedding.weight.std().item() - 0.1) < 5e-3 and wide.initializer_range == 0.1

    class WithRange(LanguageConfig):  # a config that carries the field (VLMambaConfig's, say)
        initializer_range: float = 0.05

    torch.manual_seed(0)
    assert abs(LanguageMamba(WithRange(**cfg.model_dump())).embedding.weight.std().item() - 0.05) < 3e-3
    with pytest.raises(ValueError, match="initializer_range"):
        LanguageMamba(cfg, initializer_range=-1.0)

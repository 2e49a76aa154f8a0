"""Decoding in place (vlm_mamba.models.decoding) against the functional step, per element.

The CUDA graph that replays the in-place step is tested on the GPU (tests/test_gpu_decoding.py);
here the same step runs eagerly: logits of every step, tokens, beams, cache reuse across calls."""

import logging

import pytest
import torch

from vlm_mamba import create_model
from vlm_mamba.config import LanguageConfig
from vlm_mamba.generation import GenerationConfig, decode
from vlm_mamba.models import decoding
from vlm_mamba.models.language import LanguageMamba


def _lm(ssm: str) -> LanguageMamba:
    torch.manual_seed(0)
    lm = LanguageMamba(LanguageConfig(vocab_size=97, d_model=32, n_layers=2, d_state=8, headdim=16, ssm=ssm))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in lm.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return lm.eval()


def _recording(step):
    seen = []

    def fn(tok, st):
        logits, st = step(tok, st)
        seen.append(logits.clone())
        return logits, st

    return fn, seen


def _run(lm, ids, mask, decoder, **kw):
    cfg = GenerationConfig(decoder=decoder, **kw)
    with torch.no_grad():
        out = lm(ids, attention_mask=mask, return_state=True, logits="last")
        fn, seen = _recording(decoding.make_step_fn(lm, decoder, ids.device))
        return decode(fn, out.state, out.logits[:, -1], cfg), seen


def _prompts():
    ids = torch.randint(3, 97, (3, 7), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[1, :3] = False  # left padding
    return ids, mask


@pytest.mark.parametrize("ssm", ["mamba1", "mamba2"])
@pytest.mark.parametrize("mode", [{}, {"num_beams": 3}, {"do_sample": True, "top_k": 20, "seed": 5}])
def test_inplace_decoding_equals_the_functional_step(ssm, mode):
    lm = _lm(ssm)
    ids, mask = _prompts()
    kw = dict(max_new_tokens=6, eos_token_id=None, **mode)
    ref, ref_logits = _run(lm, ids, mask, "functional", **kw)
    out, logits = _run(lm, ids, mask, "inplace", **kw)
    assert torch.equal(out, ref)
    assert len(logits) == len(ref_logits) == 5
    for a, b in zip(logits, ref_logits):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_cache_is_reused_across_calls_and_follows_new_weights():
    """One cache per model and batch shape; a second call loads its own prompt's state, and A is
    refreshed from the current weights (a captured graph reads it by address)."""
    lm = _lm("mamba1")
    ids, mask = _prompts()
    kw = dict(max_new_tokens=5, eos_token_id=None)
    _run(lm, ids, mask, "inplace", **kw)
    cache = next(iter(decoding._CACHES[lm].values()))
    with torch.no_grad():
        lm.layers[0].mixer.A_log.add_(0.3)
    other = ids.flip(0)
    out, logits = _run(lm, other, mask, "inplace", **kw)
    ref, ref_logits = _run(lm, other, mask, "functional", **kw)
    assert torch.equal(out, ref) and next(iter(decoding._CACHES[lm].values())) is cache
    for a, b in zip(logits, ref_logits):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("ssm", ["mamba1", "mamba2"])
def test_cache_made_under_inference_mode_serves_later_no_grad_calls(ssm):
    """Lightning validates under torch.inference_mode: the reused cache must not be made of
    inference tensors, which a later no_grad call could not update in place (it raised)."""
    lm = _lm(ssm)
    ids, mask = _prompts()
    kw = dict(max_new_tokens=5, eos_token_id=None, num_beams=2)
    ref, ref_logits = _run(lm, ids, mask, "functional", **kw)
    with torch.inference_mode():
        first = lm.generate(ids, attention_mask=mask, decoder="inplace", **kw)
    caches = list(decoding._CACHES[lm].values())  # the beams' (b x 2 rows)
    assert caches
    assert not any(t.is_inference() for c in caches for s in c.state for t in (s.conv, s.ssm, *c.A))
    out, logits = _run(lm, ids, mask, "inplace", **kw)  # no_grad, the same cache
    with torch.inference_mode():
        again = lm.generate(ids, attention_mask=mask, decoder="inplace", **kw)
    assert torch.equal(first, ref) and torch.equal(out, ref) and torch.equal(again, ref)
    for a, b in zip(logits, ref_logits):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_fused_step_modes_auto_takes_it_up_to_its_batch(monkeypatch):
    """VLM_MAMBA_FUSED_STEP / set_fused_step: auto (the default) = the fused step up to
    FUSED_STEP_MAX_BATCH rows, on / off whatever the batch, a bad value named; never off CUDA."""
    from vlm_mamba import ops
    from vlm_mamba.ops import triton_step

    monkeypatch.setattr(ops, "_fused_step", None)
    monkeypatch.delenv(ops.FUSED_STEP_ENV, raising=False)
    one, many = torch.zeros(ops.FUSED_STEP_MAX_BATCH, 8), torch.zeros(ops.FUSED_STEP_MAX_BATCH + 1, 8)
    assert ops.fused_step_switch() == "auto" and not ops.fused_step_enabled(one)  # CPU tensors: never
    monkeypatch.setattr(ops, "kernel_family", lambda kernel, device: "cuda")
    monkeypatch.setattr(triton_step, "available", lambda: True)
    assert ops.fused_step_enabled(one) and not ops.fused_step_enabled(many)
    for value, mode in (("1", "on"), ("OFF", "off"), ("auto", "auto")):
        monkeypatch.setenv(ops.FUSED_STEP_ENV, value)
        assert ops.fused_step_switch() == mode
    monkeypatch.setenv(ops.FUSED_STEP_ENV, "0")
    assert not ops.fused_step_enabled(one)
    ops.set_fused_step(True)  # the call wins over the environment
    assert ops.fused_step_enabled(many)
    ops.set_fused_step(None)
    monkeypatch.setenv(ops.FUSED_STEP_ENV, "yes")
    with pytest.raises(ValueError, match="VLM_MAMBA_FUSED_STEP='yes'"):
        ops.fused_step_enabled(one)


@pytest.mark.parametrize(
    "env, switch, default",
    [("FUSED_CONV_ENV", "fused_conv_switch", True), ("FUSED_XPROJ_ENV", "fused_xproj_switch", False)],
)
def test_the_conv_and_x_proj_folds_read_their_variable(monkeypatch, env, switch, default):
    """VLM_MAMBA_FUSED_CONV (on unless 0/off) and VLM_MAMBA_FUSED_XPROJ (opt-in: off unless 1/on); a bad
    value is named."""
    from vlm_mamba import ops

    name, read = getattr(ops, env), getattr(ops, switch)
    monkeypatch.delenv(name, raising=False)
    assert read() is default
    for value, on in (("1", True), ("ON", True), ("0", False), ("off", False)):
        monkeypatch.setenv(name, value)
        assert read() is on
    monkeypatch.setenv(name, "maybe")
    with pytest.raises(ValueError, match=f"{name}='maybe'"):
        read()


def test_the_fused_step_switch_keys_its_own_cache(monkeypatch):
    """A graph captured with one set of kernels must not be replayed after ops.set_fused_step
    changes: the switch is part of the cache key, so each setting gets its own cache."""
    from vlm_mamba import ops

    lm = _lm("mamba1")
    ids, mask = _prompts()
    kw = dict(max_new_tokens=4, eos_token_id=None)
    monkeypatch.setattr(ops, "_fused_step", None)
    ref, _ = _run(lm, ids, mask, "inplace", **kw)
    ops.set_fused_step(True)  # no effect on the CPU's kernels, but a new key
    on, _ = _run(lm, ids, mask, "inplace", **kw)
    ops.set_fused_step(None)
    again, _ = _run(lm, ids, mask, "inplace", **kw)
    keys = list(decoding._CACHES[lm])
    assert len(keys) == 2 and {k[0] for k in keys} == {"auto", "on"}
    assert torch.equal(ref, on) and torch.equal(ref, again)


def test_beam_reorder_is_a_gather_into_the_same_buffers():
    lm = _lm("mamba2")
    with torch.no_grad():
        st = lm(torch.randint(3, 97, (4, 5)), return_state=True).state
    cache = decoding.DecodeCache(lm, st)
    buffers = [(s.conv.data_ptr(), s.ssm.data_ptr()) for s in cache.state]
    idx = torch.tensor([2, 2, 0, 3])  # rows repeated and dropped, as beams are
    ref = st.index_select(idx)
    assert cache.index_select(idx) is cache
    assert [(s.conv.data_ptr(), s.ssm.data_ptr()) for s in cache.state] == buffers
    for a, b in zip(cache.state, ref):
        assert torch.equal(a.conv, b.conv) and torch.equal(a.ssm, b.ssm)


def test_exit_checked_every_few_tokens_gives_the_same_tokens():
    """The loop reads 'all done?' back every sync_every tokens; extra steps after the last EOS are
    trimmed, so the output equals checking after every token."""
    lm = _lm("mamba1")
    ids, mask = _prompts()
    ref, _ = _run(lm, ids, mask, "functional", max_new_tokens=12, eos_token_id=None)
    eos = int(ref[0, 2])  # a token every row is likely to emit early: the first row's third
    outs = [
        _run(lm, ids, mask, "inplace", max_new_tokens=12, eos_token_id=eos, sync_every=k)[0]
        for k in (1, 4, 8)
    ]
    assert all(torch.equal(o, outs[0]) for o in outs)
    first = [(r == eos).nonzero()[0, 0].item() if (r == eos).any() else 11 for r in outs[0]]
    assert outs[0].shape[1] == max(first) + 1


def test_graph_off_the_gpu_runs_in_place_and_says_so(caplog):
    lm = _lm("mamba1")
    ids, mask = _prompts()
    ref, _ = _run(lm, ids, mask, "functional", max_new_tokens=4, eos_token_id=None)
    decoding._LOGGED.clear()
    with caplog.at_level(logging.INFO, logger="vlm_mamba.models.decoding"):
        out, _ = _run(lm, ids, mask, "graph", max_new_tokens=4, eos_token_id=None)
    assert torch.equal(out, ref)
    assert any("without a CUDA graph" in r.message for r in caplog.records)
    assert decoding.make_step_fn(lm, "auto", "cpu").__name__ == "functional"


def test_language_model_generate_and_vlm_generate_in_place():
    lm = _lm("mamba2")
    ids, mask = _prompts()
    ref, _ = _run(lm, ids, mask, "functional", max_new_tokens=5, eos_token_id=None)
    assert torch.equal(lm.generate(ids, mask, max_new_tokens=5, eos_token_id=None, decoder="inplace"), ref)
    torch.manual_seed(0)
    vlm = create_model("tiny", lora={"rank": 2}).eval()
    images, prompt = torch.randn(2, 3, 32, 32), torch.randint(3, 500, (2, 4))
    a = vlm.generate(images, prompt, max_new_tokens=5, eos_token_id=None, decoder="functional")
    b = vlm.generate(images, prompt, max_new_tokens=5, eos_token_id=None, decoder="inplace", num_beams=1)
    assert torch.equal(a, b)


def _run_fused(lm, ids, mask, decoder, **kw):
    """decode through the step function's select_step (step + token selection in one call), the
    logits of every step recorded."""
    cfg = GenerationConfig(decoder=decoder, **kw)
    step = decoding.make_step_fn(lm, decoder, ids.device)
    seen, inner = [], step.select_step

    def select_step(tok, done, state, selector):
        tok, done, logits, state = inner(tok, done, state, selector)
        seen.append(logits.clone())
        return tok, done, logits, state

    step.select_step = select_step
    with torch.no_grad():
        out = lm(ids, attention_mask=mask, return_state=True, logits="last")
        return decode(step, out.state, out.logits[:, -1], cfg), seen


@pytest.mark.parametrize("ssm", ["mamba1", "mamba2"])
@pytest.mark.parametrize(
    "mode", [{}, {"do_sample": True, "top_k": 20, "seed": 5}, {"do_sample": True, "top_p": 0.8, "seed": 9}]
)
def test_step_and_selection_in_one_call_equal_the_functional_step(ssm, mode):
    """The in-place decoders step and select in one call (what one graph replays on CUDA): the same
    tokens, the same draws from the seed, and logits per element as the functional step."""
    lm = _lm(ssm)
    ids, mask = _prompts()
    kw = dict(max_new_tokens=6, eos_token_id=None, **mode)
    ref, ref_logits = _run(lm, ids, mask, "functional", **kw)
    out, logits = _run_fused(lm, ids, mask, "inplace", **kw)
    assert torch.equal(out, ref)
    assert len(logits) == len(ref_logits) == 5
    for a, b in zip(logits, ref_logits):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    eos = int(ref[0, 1])  # rows stop at their EOS and pad after it, in the fused loop too
    a, _ = _run(lm, ids, mask, "functional", max_new_tokens=8, eos_token_id=eos, sync_every=2, **mode)
    b, _ = _run_fused(lm, ids, mask, "inplace", max_new_tokens=8, eos_token_id=eos, sync_every=2, **mode)
    assert torch.equal(a, b)
    first = int((a[0] == eos).nonzero()[0, 0])
    assert first <= 1 and (a[0, first + 1 :] == 0).all()  # padding after the first row's EOS

"""The graph-captured in-place decoder on CUDA against the eager functional step: same tokens and
logits per element, Mamba-1 and Mamba-2, greedy, beams and sampling, the LM and VLMamba.generate,
and a captured graph reused by a later call with new weights. ``pytest -m gpu tests/test_gpu_decoding.py``."""

import pytest
import torch

from tests.gpu_util import DEV, DRY, close, kernels_missing
from vlm_mamba import create_model
from vlm_mamba.config import LanguageConfig
from vlm_mamba.generation import GenerationConfig, decode
from vlm_mamba.models import decoding
from vlm_mamba.models.language import LanguageMamba

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(kernels_missing(), reason="needs CUDA and the mamba_ssm / causal_conv1d kernels"),
]


def _lm(ssm, dtype=torch.bfloat16):
    torch.manual_seed(0)
    cfg = LanguageConfig(
        vocab_size=1000, d_model=256, n_layers=4, ssm=ssm, d_state=16 if ssm == "mamba1" else 64
    )
    lm = LanguageMamba(cfg).to(DEV)
    with torch.no_grad():
        for p in lm.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return lm.to(dtype).eval()


def _decode(lm, ids, decoder, **kw):
    seen = []
    step = decoding.make_step_fn(lm, decoder, ids.device)

    def fn(tok, st):
        logits, st = step(tok, st)
        seen.append(logits.float().clone())
        return logits, st

    with torch.no_grad():
        out = lm(ids, return_state=True, logits="last")
        toks = decode(fn, out.state, out.logits[:, -1], GenerationConfig(decoder=decoder, **kw))
    return toks, seen


@pytest.mark.parametrize("ssm", ["mamba1", "mamba2"])
@pytest.mark.parametrize("mode", [{}, {"num_beams": 3}, {"do_sample": True, "top_k": 50, "seed": 3}])
@pytest.mark.parametrize("batch", [1, 2, 4])
def test_graph_decoding_equals_the_eager_step(ssm, mode, batch):
    """The captured graph against an eager step, tokens and logits per element. Greedy and sampling:
    against the functional step (the reference; where the fused decode step serves the batch it
    rounds dt and the normed rows differently, to bf16 rounding). Beam search: against the in-place
    eager step, the same kernels: a beam keeps one of near-tied candidates, so two paths whose logits
    differ by rounding may keep different hypotheses (seen with the fused step: one row of 6 from
    step 10, with every earlier logit within 0.01 of its rms), which is not an error of either; the
    fused kernels' numbers against the functional step are the greedy cases' and the kernel tests'.
    Sampling where the fused step serves the batch: against the in-place eager step too, for the
    same reason (the race argmax(p / E) among 50 near-equal candidates of a random model flips on a
    rounding-level change of p: seen at b=1, Mamba-1, token 6 of 12, at adaabd0)."""
    from vlm_mamba import ops

    lm = _lm(ssm)
    ids = torch.randint(3, 1000, (batch, 64), device=DEV)
    kw = dict(max_new_tokens=12, eos_token_id=None, **mode)
    fused_serves = not DRY and ops.fused_step_enabled(ids[:, 0])
    same_kernels = "num_beams" in mode or (mode.get("do_sample") and fused_serves)
    eager = "inplace" if same_kernels else "functional"
    ref, ref_logits = _decode(lm, ids, eager, **kw)
    out, logits = _decode(lm, ids, "graph", **kw)
    assert torch.equal(out, ref)
    # bf16: the in-place kernels vs clones; the fused step against the unfused one as in
    # _fused_graph_matches_the_functional_step (one rounding of dt and of the normed rows apart)
    fused = eager == "functional" and fused_serves
    rtol, atol = (2e-2, 5e-2) if fused else (1e-2, 2e-2)
    for i, (a, b) in enumerate(zip(logits, ref_logits)):
        close(a, b, rtol, atol, what=f"{ssm} {mode} step {i}")


def test_graph_is_captured_once_and_follows_new_state_and_weights():
    lm = _lm("mamba1")
    ids = torch.randint(3, 1000, (2, 32), device=DEV)
    _decode(lm, ids, "graph", max_new_tokens=4, eos_token_id=None)
    cache = next(iter(decoding._CACHES[lm].values()))
    graph = cache.graph
    assert DRY or graph is not None, "the graph was not captured"
    with torch.no_grad():
        for layer in lm.layers:
            layer.mixer.A_log.add_(0.1)
            layer.mixer.out_proj.weight.mul_(1.1)
    other = ids.flip(0)
    out, logits = _decode(lm, other, "graph", max_new_tokens=6, eos_token_id=None)
    ref, ref_logits = _decode(lm, other, "functional", max_new_tokens=6, eos_token_id=None)
    assert cache.graph is graph  # replayed, not captured again
    assert torch.equal(out, ref)
    for a, b in zip(logits, ref_logits):
        close(a, b, 1e-2, 2e-2, what="after new weights")


def test_vlm_generate_with_the_graph_equals_functional():
    torch.manual_seed(0)
    vlm = create_model("small").to(DEV).to(torch.bfloat16).eval()
    images = torch.randn(2, 3, 224, 224, device=DEV)
    prompt = torch.randint(3, 5000, (2, 8), device=DEV)
    a = vlm.generate(images, prompt, max_new_tokens=10, eos_token_id=None, decoder="functional")
    b = vlm.generate(images, prompt, max_new_tokens=10, eos_token_id=None)  # auto: graph on CUDA
    assert torch.equal(a, b)


def test_graph_under_autocast_with_fp32_weights_equals_the_eager_step():
    """Validation decodes under bf16-mixed autocast with fp32 weights: the graph is captured with
    autocast's cast cache off, so it replays the casts instead of reading freed cached copies."""
    lm = _lm("mamba1", dtype=torch.float32)
    ids = torch.randint(3, 1000, (2, 32), device=DEV)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ref, ref_logits = _decode(lm, ids, "functional", max_new_tokens=8, eos_token_id=None)
        out, logits = _decode(lm, ids, "graph", max_new_tokens=8, eos_token_id=None)
    torch.cuda.empty_cache()  # freed blocks are reused: a graph reading them would now go wrong
    with torch.autocast("cuda", dtype=torch.bfloat16):
        again, _ = _decode(lm, ids, "graph", max_new_tokens=8, eos_token_id=None)
    assert torch.equal(out, ref) and torch.equal(again, ref)
    for a, b in zip(logits, ref_logits):
        close(a, b, 1e-2, 2e-2, what="autocast")


def _fused_graph_matches_the_functional_step(batch: int, what: str, ssm: str = "mamba1") -> None:
    """The LM decoded with ops.set_fused_step(True) in a fresh graph (the kernels the environment
    selects): >= 90% of the greedy tokens and the first 4 steps' logits, to bf16 rounding, equal the
    unfused functional step's."""
    from vlm_mamba import ops

    lm = _lm(ssm)
    ids = torch.randint(3, 1000, (batch, 64), device=DEV)
    kw = dict(max_new_tokens=12, eos_token_id=None)
    ref, ref_logits = _decode(lm, ids, "functional", **kw)
    ops.set_fused_step(True)
    try:
        decoding._CACHES.pop(lm, None)  # a fresh capture with the fused step
        out, logits = _decode(lm, ids, "graph", **kw)
    finally:
        ops.set_fused_step(None)
        decoding._CACHES.pop(lm, None)
    assert (out == ref).float().mean() >= 0.9
    for i, (a, b) in enumerate(zip(logits[:4], ref_logits[:4])):
        close(a, b, 2e-2, 5e-2, what=f"{what} {i}")


def _dtproj_kernel_equals_its_twin(b: int, seed: int = 0, warps: int | None = None) -> None:
    """The fused dt_proj + state update at ``b`` rows against its PyTorch twin per element (y and
    the state updated in place), inputs laid out as the mixer's step makes them (views)."""
    from vlm_mamba.ops import triton_step

    g = torch.Generator(device="cpu").manual_seed(seed)
    e, n, r = 200, 16, 13
    rn = lambda *s: torch.randn(*s, generator=g).to(DEV)  # noqa: E731
    dbc = rn(b, r + 2 * n).bfloat16()
    xz = rn(b, 2 * e).bfloat16()
    args = dict(x=rn(b, e).bfloat16(), dt_low=dbc[:, :r], dt_weight=rn(e, r) * 0.3, dt_bias=rn(e) * 0.5,
                A=-torch.exp(rn(e, n) * 0.5), B=dbc[:, r : r + n], C=dbc[:, r + n :], D=rn(e), z=xz[:, e:])  # fmt: skip
    s_k = rn(b, e, n)
    s_r = s_k.clone()
    y = triton_step.selective_state_update_dtproj_(s_k, **args, num_warps=warps)
    y_ref = triton_step.selective_state_update_dtproj_ref(s_r, **args)
    close(y.float(), y_ref.float(), 1e-2, 1e-2, what=f"fused step kernel y (bf16 out), b={b}, warps={warps}")
    close(s_k, s_r, 1e-5, 1e-5, what=f"fused step kernel state, b={b}, warps={warps}")


def _in_proj_kernel_equals_its_twin(b: int, conv: bool, seed: int = 0) -> None:
    """The add + norm + in_proj kernel at ``b`` rows (with the conv step in its epilogue when
    ``conv``) against its PyTorch twin per element: outputs, the residual, the conv state in place."""
    from vlm_mamba.ops import triton_step

    g = torch.Generator(device="cpu").manual_seed(seed)
    rn = lambda *s: torch.randn(*s, generator=g).to(DEV)  # noqa: E731
    h, res = rn(b, 300).bfloat16(), rn(b, 300)
    nw, w = rn(300).abs() + 0.5, (rn(130, 300) * 0.1).bfloat16()
    if not conv:
        y, ro = triton_step.add_rms_norm_linear(h, res, nw, 1e-5, w)
        y_ref, ro_ref = triton_step.add_rms_norm_linear_ref(h, res, nw, 1e-5, w)
        close(y.float(), y_ref.float(), 2e-2, 2e-2, what=f"add + norm + in_proj kernel (bf16 out), b={b}")
        assert torch.equal(ro, ro_ref)
        return
    cargs = dict(conv_weight=rn(60, 4) * 0.5, conv_bias=rn(60))
    cs_k = rn(b, 60, 3).bfloat16()
    cs_r = cs_k.clone()
    y, _ = triton_step.add_rms_norm_linear(h, res, nw, 1e-5, w, conv_state=cs_k, **cargs)
    y_ref, _ = triton_step.add_rms_norm_linear_ref(h, res, nw, 1e-5, w, conv_state=cs_r, **cargs)
    close(y.float(), y_ref.float(), 2e-2, 2e-2, what=f"add + norm + in_proj + conv kernel (bf16 out), b={b}")
    close(
        cs_k.float(), cs_r.float(), 2e-2, 2e-2, what=f"conv state (its newest slot: in_proj's x, bf16), b={b}"
    )
    assert torch.equal(cs_k[..., :-1], cs_r[..., :-1])  # the shifted slots are copies


@pytest.mark.skipif(
    DRY, reason="Triton kernels need a GPU (under the interpreter: tests/test_triton_step.py)"
)
@pytest.mark.parametrize("batch", [1, 4])
def test_fused_dtproj_step_in_the_graph_equals_the_unfused_step(batch, monkeypatch):
    """ops.set_fused_step(True): Mamba-1's in-place step computes dt inside the state update and
    folds the block's add + norm into in_proj (ops.triton_step); in the captured graph, the logits
    of every step match the unfused functional step to bf16 rounding (the fused dt is accumulated in
    fp32), and both kernels equal their twins on CUDA per element."""
    from vlm_mamba import ops

    monkeypatch.setenv(ops.FUSED_CONV_ENV, "0")  # the conv step as its own kernel (the other test folds it)
    _fused_graph_matches_the_functional_step(batch, "fused step")
    _dtproj_kernel_equals_its_twin(3)
    _in_proj_kernel_equals_its_twin(3, conv=False)


@pytest.mark.skipif(
    DRY, reason="Triton kernels need a GPU (under the interpreter: tests/test_triton_step.py)"
)
def test_conv_step_in_the_in_proj_kernel_in_the_graph_equals_the_unfused_step(monkeypatch):
    """VLM_MAMBA_FUSED_CONV=1 (the default) with the fused step at b=1: the conv's one-token step
    runs in the add + norm + in_proj kernel's epilogue; the graph's logits match the unfused
    functional step to bf16 rounding, and the kernel equals its twin on CUDA (outputs and the conv
    state in place)."""
    from vlm_mamba import ops

    monkeypatch.setenv(ops.FUSED_CONV_ENV, "1")
    _fused_graph_matches_the_functional_step(1, "fused conv step")
    _in_proj_kernel_equals_its_twin(1, conv=True)


@pytest.mark.skipif(
    DRY, reason="Triton kernels need a GPU (under the interpreter: tests/test_triton_step.py)"
)
@pytest.mark.parametrize("warps", [None, 4])
@pytest.mark.parametrize("b", [12, 64])
def test_fused_step_kernels_above_eight_rows_equal_their_twins(b, warps):
    """The fused step's kernels at batches above ops.FUSED_STEP_MAX_BATCH (beam search at 4 prompts x
    3 beams is 12 rows; the state update then defaults to one warp a program), per element against
    their PyTorch twins: the dt_proj + state update (y and the state in place) and the add + norm +
    in_proj + conv kernel (outputs and the conv state)."""
    _dtproj_kernel_equals_its_twin(b, seed=b, warps=warps)
    _in_proj_kernel_equals_its_twin(b, conv=True, seed=b)


def _mamba2_kernels_equal_their_twins(b: int, seed: int = 0) -> None:
    """Mamba-2's fused kernels on CUDA per element against their twins: add + norm + in_proj with the
    conv step on x B C (conv_offset = e; z and dt untouched) and the gated norm + out_proj."""
    from vlm_mamba.ops import triton_step

    g = torch.Generator(device="cpu").manual_seed(seed)
    rn = lambda *s: torch.randn(*s, generator=g).to(DEV)  # noqa: E731
    e, c, nh, d = 96, 96 + 2 * 64, 3, 160
    h, res = rn(b, d).bfloat16(), rn(b, d)
    nw, w = rn(d).abs() + 0.5, (rn(e + c + nh, d) * 0.1).bfloat16()
    cargs = dict(conv_weight=rn(c, 4) * 0.5, conv_bias=rn(c), conv_offset=e)
    cs_k = rn(b, c, 3).bfloat16()
    cs_r = cs_k.clone()
    y, _ = triton_step.add_rms_norm_linear(h, res, nw, 1e-5, w, conv_state=cs_k, **cargs)
    y_ref, _ = triton_step.add_rms_norm_linear_ref(h, res, nw, 1e-5, w, conv_state=cs_r, **cargs)
    close(y.float(), y_ref.float(), 2e-2, 2e-2, what=f"Mamba-2 add + norm + in_proj + conv (bf16), b={b}")
    close(cs_k.float(), cs_r.float(), 2e-2, 2e-2, what=f"Mamba-2 conv state, b={b}")
    yz = rn(b, 2 * e).bfloat16()
    nw2, w2 = rn(e).abs() + 0.5, (rn(d, e) * 0.1).bfloat16()
    o = triton_step.rms_norm_gated_linear(yz[:, e:], yz[:, :e], nw2, 1e-5, w2)
    o_ref = triton_step.rms_norm_gated_linear_ref(yz[:, e:], yz[:, :e], nw2, 1e-5, w2)
    close(o.float(), o_ref.float(), 2e-2, 2e-2, what=f"gated norm + out_proj (bf16), b={b}")


@pytest.mark.skipif(
    DRY, reason="Triton kernels need a GPU (under the interpreter: tests/test_triton_step.py)"
)
@pytest.mark.parametrize("conv", ["1", "0"])
def test_mamba2_fused_step_in_the_graph_equals_the_unfused_step(conv, monkeypatch):
    """Mamba-2 at b=1 with the fused step (the default there): the block's add + norm, in_proj and
    (VLM_MAMBA_FUSED_CONV=1) the conv step in one kernel, the gated norm and out_proj in another; the
    graph's tokens and logits match the unfused functional step to bf16 rounding, and the kernels
    equal their twins on CUDA."""
    from vlm_mamba import ops

    monkeypatch.setenv(ops.FUSED_CONV_ENV, conv)
    _fused_graph_matches_the_functional_step(1, f"Mamba-2 fused step conv={conv}", ssm="mamba2")
    _mamba2_kernels_equal_their_twins(1)
    _mamba2_kernels_equal_their_twins(5, seed=1)


@pytest.mark.skipif(
    DRY, reason="Triton kernels need a GPU (under the interpreter: tests/test_triton_step.py)"
)
def test_x_proj_fold_in_the_graph_equals_the_unfused_step(monkeypatch):
    """VLM_MAMBA_FUSED_XPROJ=1 (opt-in) at b=1: x_proj's partial products in the in_proj kernel's
    epilogue, summed by the state update; the graph's tokens and logits match the unfused functional
    step to bf16 rounding, and on CUDA the partials equal their twin's and the state update from them
    equals the one from x_proj's output."""
    from vlm_mamba import ops
    from vlm_mamba.ops import triton_step

    monkeypatch.setenv(ops.FUSED_CONV_ENV, "1")
    monkeypatch.setenv(ops.FUSED_XPROJ_ENV, "1")
    _fused_graph_matches_the_functional_step(1, "x_proj fold")
    g = torch.Generator(device="cpu").manual_seed(5)
    rn = lambda *s: torch.randn(*s, generator=g).to(DEV)  # noqa: E731
    e, r, n = 200, 13, 16
    h, res = rn(1, 300).bfloat16(), rn(1, 300)
    nw, w = rn(300).abs() + 0.5, (rn(2 * e, 300) * 0.1).bfloat16()
    conv = dict(conv_weight=rn(e, 4) * 0.5, conv_bias=rn(e), xproj_weight=(rn(r + 2 * n, e) * 0.1).bfloat16())
    cs = rn(1, e, 3).bfloat16()
    xz, _, part = triton_step.add_rms_norm_linear(h, res, nw, 1e-5, w, conv_state=cs.clone(), **conv)
    xz_r, _, part_r = triton_step.add_rms_norm_linear_ref(h, res, nw, 1e-5, w, conv_state=cs.clone(), **conv)
    close(part, part_r, 5e-2, 5e-2, what="x_proj partials (bf16 in_proj outputs)")
    wdt, bdt, A, D = rn(e, r) * 0.3, rn(e) * 0.5, -torch.exp(rn(e, n) * 0.5), rn(e)
    s_k = rn(1, e, n)
    s_r = s_k.clone()
    y = triton_step.selective_state_update_dtproj_(s_k, xz[:, :e], None, wdt, bdt, A, None, None, D, xz[:, e:],
                                                   partials=part)  # fmt: skip
    dtl, B, C = part.sum(1).split([r, n, n], dim=-1)
    y_r = triton_step.selective_state_update_dtproj_ref(s_r, xz[:, :e], dtl, wdt, bdt, A, B, C, D, xz[:, e:])
    close(y.float(), y_r.float(), 1e-2, 1e-2, what="state update from the partials (bf16 out)")
    close(s_k, s_r, 1e-5, 1e-5, what="state from the partials")


def _decode_selecting(lm, ids, decoder, **kw):
    """decode through the step function's select_step: under a graph, the step and the token
    selection (greedy or the sampler) are one replay; the logits of every step recorded."""
    step = decoding.make_step_fn(lm, decoder, ids.device)
    seen, inner = [], step.select_step

    def select_step(tok, done, state, selector):
        tok, done, logits, state = inner(tok, done, state, selector)
        seen.append(logits.float().clone())
        return tok, done, logits, state

    step.select_step = select_step
    with torch.no_grad():
        out = lm(ids, return_state=True, logits="last")
        toks = decode(step, out.state, out.logits[:, -1], GenerationConfig(decoder=decoder, **kw))
    return toks, seen


@pytest.mark.parametrize("ssm", ["mamba1", "mamba2"])
@pytest.mark.parametrize(
    "mode",
    [
        {},
        {"do_sample": True, "top_k": 50, "seed": 3},
        {"do_sample": True, "top_p": 0.9, "temperature": 0.7, "seed": 4},
    ],
)
@pytest.mark.parametrize("batch", [1, 4])
def test_sampler_inside_the_graph_equals_the_eager_step(ssm, mode, batch):
    """Greedy and sampling with the selection captured in the decode graph against the eager
    in-place step (same kernels): the same tokens (the sampler's draws from the seed replayed by
    the graph's registered generator), logits per element; a later call with another seed replays
    the same graph and still matches the eager step with that seed; EOS stops rows in the graph."""
    lm = _lm(ssm)
    ids = torch.randint(3, 1000, (batch, 48), device=DEV)
    kw = dict(max_new_tokens=12, eos_token_id=None, **mode)
    ref, ref_logits = _decode_selecting(lm, ids, "inplace", **kw)
    out, logits = _decode_selecting(lm, ids, "graph", **kw)
    assert torch.equal(out, ref)
    for i, (a, b) in enumerate(zip(logits, ref_logits)):
        close(a, b, 1e-2, 2e-2, what=f"{ssm} {mode} step {i}")
    cache = next(c for c in decoding._CACHES[lm].values() if c.batch_size == batch)
    graphs = dict(cache.select_graphs)
    assert DRY or len(graphs) == 1, "the step + selection graph was not captured"
    kw2 = dict(kw, seed=kw.get("seed", 0) + 100)
    ref2, _ = _decode_selecting(lm, ids, "inplace", **kw2)
    out2, _ = _decode_selecting(lm, ids, "graph", **kw2)
    assert torch.equal(out2, ref2)
    assert all(cache.select_graphs[k] is v for k, v in graphs.items())  # replayed, not captured again
    if mode.get("do_sample"):
        assert not torch.equal(out2, out), "another seed drew the same 12 tokens"
    eos = int(ref[0, 2])
    a, _ = _decode_selecting(lm, ids, "inplace", **dict(kw, eos_token_id=eos, sync_every=4))
    b, _ = _decode_selecting(lm, ids, "graph", **dict(kw, eos_token_id=eos, sync_every=4))
    assert torch.equal(a, b) and a.shape[1] <= 12


def test_sampler_inside_the_graph_under_autocast_with_fp32_weights():
    """Validation's case: fp32 weights under bf16 autocast, the step + sampler graph captured with
    the cast cache off, equal to the eager in-place step, and still after freed blocks are reused."""
    lm = _lm("mamba1", dtype=torch.float32)
    ids = torch.randint(3, 1000, (2, 32), device=DEV)
    kw = dict(max_new_tokens=8, eos_token_id=None, do_sample=True, top_k=20, seed=1)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ref, _ = _decode_selecting(lm, ids, "inplace", **kw)
        out, _ = _decode_selecting(lm, ids, "graph", **kw)
    torch.cuda.empty_cache()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        again, _ = _decode_selecting(lm, ids, "graph", **kw)
    assert torch.equal(out, ref) and torch.equal(again, ref)

"""Prefill from a cached state on CUDA: Mamba-1's scan from an initial state through the CUDA scan
from h0 (``ops.cuda_scan_state``) and the Triton forms (``ops.triton_scan``, no (b,e,l,n) tensor)
against the sequential reference scan, per element,
fp32 and bf16, with and without trailing pads; and the whole model: [image] prefilled, then the
prompt from that state, equals the same tokens prefilled at once (logits and final states).
Needs a GPU and the kernels (``pytest -m gpu tests/test_gpu_prefill.py``)."""

import pytest
import torch

from tests.gpu_util import DEV, DRY, FAST, close, kernels_missing
from vlm_mamba import create_model, ops
from vlm_mamba.layers.mamba1 import PAD_DELTA
from vlm_mamba.ops import cuda as ops_cuda
from vlm_mamba.ops import triton_scan
from vlm_mamba.ops.reference import selective_scan_ref

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(kernels_missing(), reason="needs CUDA and the mamba_ssm / causal_conv1d kernels"),
]


def _scan_inputs(dtype, b=3, e=96, length=300, n=16, pads=False, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    delta = r(b, e, length) * 0.5 - 1.0
    if pads:
        delta[0, :, 200:] = PAD_DELTA  # trailing pads: softplus gives dt = 0 exactly
        delta[2, :, 1:] = PAD_DELTA
    t = dict(
        u=r(b, e, length), delta=delta, A=-torch.exp(r(e, n) * 0.5), B=r(b, n, length), C=r(b, n, length),
        D=r(e), z=r(b, e, length), delta_bias=r(e) * 0.3, initial_state=r(b, e, n),
    )  # fmt: skip
    low = {"u", "delta", "B", "C", "z"}  # activations in the compute dtype, parameters fp32
    return {k: (v.to(DEV, dtype) if k in low else v.to(DEV)) for k, v in t.items()}


def _cuda_scan_state():
    """The CUDA scan from a state, built (a test of it fails, not skips, when the build fails)."""
    from vlm_mamba.ops import cuda_scan_state

    if DRY:
        pytest.skip("the CUDA kernel has no CPU twin to dry-run")
    assert cuda_scan_state.load() is not None, cuda_scan_state.unavailable_reason()
    return cuda_scan_state


@pytest.mark.parametrize("form", ["cuda", "two_pass", "one_pass"])
@pytest.mark.parametrize("pads", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scan_from_a_state_equals_the_reference_scan(dtype, pads, form, monkeypatch):
    """ops.selective_scan from a state on the kernels: the CUDA scan from h0 (the default), mamba_ssm's
    selective_scan_fn from zero + the Triton h0 term (two_pass), or the one-pass Triton scan."""
    monkeypatch.setenv(triton_scan.STATE_SCAN_ENV, form)
    t = _scan_inputs(dtype, pads=pads)
    if form == "cuda":
        _cuda_scan_state()
    assert ops_cuda._initial_state_kernel_ok(t["A"], t["C"], *t.values())  # a Triton path runs
    with torch.no_grad():
        y, last = ops.selective_scan(**t, delta_softplus=True, return_last_state=True, kernel=FAST)
        ry, rlast = selective_scan_ref(**t, delta_softplus=True, return_last_state=True)
    tol = (1e-4, 1e-4) if dtype == torch.float32 else (2e-2, 5e-2)
    close(y, ry, *tol, what=f"{form} y {dtype} pads={pads}")
    close(last, rlast, 1e-4, 1e-4, what=f"{form} last state {dtype} pads={pads}")


# lengths across the kernel's five (threads, items) bins, a ragged chunk, and several 2048-token
# chunks whose carried prefix must continue the state
@pytest.mark.parametrize("length", [1, 5, 128, 200, 256, 511, 777, 1024, 2048, 2049, 4500])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_scan_from_a_state_equals_the_reference_per_element(dtype, length):
    """ops.cuda_scan_state against the sequential reference scan from the same state (outputs and
    last state per element), and from a zero state against mamba_ssm's own kernel, which runs the
    same arithmetic in the same order: within a rounding of the output dtype."""
    k = _cuda_scan_state()
    t = _scan_inputs(dtype, b=2, e=64, length=length, seed=length)
    h0 = t.pop("initial_state")
    with torch.no_grad():
        y, last = k.selective_scan_from_state(**t, delta_softplus=True, h0=h0)
        ry, rlast = selective_scan_ref(**t, delta_softplus=True, initial_state=h0, return_last_state=True)
        y0, last0 = k.selective_scan_from_state(**t, delta_softplus=True, h0=None)
        sy, slast = ops_cuda.load().selective_scan_fn(
            t["u"], t["delta"], t["A"], t["B"], t["C"], t["D"], t["z"], t["delta_bias"], True, True
        )
    tol = (1e-4, 1e-4) if dtype == torch.float32 else (2e-2, 5e-2)
    close(y, ry, *tol, what=f"y from h0, {dtype}, l={length}")
    close(last, rlast, 1e-4, 1e-4, what=f"last state from h0, {dtype}, l={length}")
    assert y.dtype == dtype and last.dtype == torch.float32 and last.shape == h0.shape
    same = (1e-5, 1e-5) if dtype == torch.float32 else (2 * torch.finfo(dtype).eps, 1e-2)  # ~1 ulp
    close(y0, sy, *same, what=f"y from zero vs mamba_ssm, {dtype}, l={length}")
    close(last0, slast, 1e-5, 1e-6, what=f"last state from zero vs mamba_ssm, {dtype}, l={length}")


@pytest.mark.parametrize("variant", ["no_z_D_bias", "no_softplus", "model_layout", "unaligned", "pads"])
def test_cuda_scan_from_a_state_options_and_layouts(variant):
    """The kernel's options (no gate, no D, no bias, raw dt) and the layouts it meets: the mixer's
    (delta and z as (e, b, l) memory viewed (b, e, l), B and C strided views of x_proj's output),
    rows that start off a 16-byte boundary (element-wise loads), trailing pads (dt = 0 exactly)."""
    k = _cuda_scan_state()
    b, e, n, L = 3, 48, 16, 333
    t = _scan_inputs(torch.bfloat16, b=b, e=e, n=n, length=L, pads=variant == "pads", seed=7)
    h0 = t.pop("initial_state")
    softplus = variant != "no_softplus"
    if variant == "no_z_D_bias":
        t.update(z=None, D=None, delta_bias=None)
    if variant == "no_softplus":
        t["delta"] = torch.nn.functional.softplus(t["delta"].float()).to(torch.bfloat16)  # dt >= 0 as given
        t["delta_bias"] = None
    if variant == "model_layout":
        t["delta"] = t["delta"].transpose(0, 1).contiguous().transpose(0, 1)  # (e,b,l) memory
        t["z"] = t["z"].transpose(0, 1).contiguous().transpose(0, 1)
        xdbl = torch.randn(b, L, 5 + 2 * n, device=DEV, dtype=torch.bfloat16)  # x_proj's (b,l,r+2n)
        t["B"], t["C"] = xdbl[..., 5 : 5 + n].transpose(1, 2), xdbl[..., 5 + n :].transpose(1, 2)
    if variant == "unaligned":
        for name in ("u", "delta", "z"):
            wide = torch.randn(b, e, L + 1, device=DEV, dtype=torch.bfloat16)
            wide[..., 1:] = t[name]
            t[name] = wide[..., 1:]  # rows of 333 elements starting 2 bytes in
    with torch.no_grad():
        y, last = k.selective_scan_from_state(**t, delta_softplus=softplus, h0=h0)
        ry, rlast = selective_scan_ref(**t, delta_softplus=softplus, initial_state=h0, return_last_state=True)
    close(y, ry, 2e-2, 5e-2, what=f"y {variant}")
    close(last, rlast, 1e-4, 1e-4, what=f"last state {variant}")
    if variant == "model_layout":
        assert y.stride() == t["delta"].stride()  # laid out like delta, as mamba_ssm's output


def test_scan_from_a_state_with_gradients_keeps_the_differentiable_path():
    t = _scan_inputs(torch.float32, length=64)
    t["initial_state"].requires_grad_()
    assert not ops_cuda._initial_state_kernel_ok(t["A"], t["C"], *t.values())
    y = ops.selective_scan(**t, delta_softplus=True, kernel=FAST)
    (g,) = torch.autograd.grad(y.float().sum(), (t["initial_state"],))
    h0 = t["initial_state"].detach().requires_grad_()
    ry = selective_scan_ref(**{**t, "initial_state": h0}, delta_softplus=True)
    (rg,) = torch.autograd.grad(ry.float().sum(), (h0,))
    close(g, rg, 1e-3, 1e-3, what="d initial_state")


@pytest.mark.parametrize("form", ["auto", "cuda", "prefix", "two_pass", "one_pass"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prompt_prefilled_from_the_image_state_equals_one_prefill(dtype, form, monkeypatch):
    """generate's image-state path: [image] then the left-padded prompt from its state, against
    [image][prompt] in one prefill, on the CUDA kernels (logits of the last token, final states),
    in every form of the scan from a state (the state as 2n prefix tokens, the h0 term, one pass)."""
    from vlm_mamba.ops import triton_scan

    monkeypatch.setenv(triton_scan.STATE_SCAN_ENV, form)
    torch.manual_seed(0)
    model = create_model("small").to(DEV).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    images = torch.randn(2, 3, 224, 224, device=DEV)
    ids = torch.randint(3, 5000, (2, 40), device=DEV)
    mask = torch.ones(2, 40, dtype=torch.bool, device=DEV)
    mask[1, :15] = False  # left padding
    lm = model.language
    with torch.no_grad(), torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
        state = model.prefill_images(images)
        a = lm(
            inputs_embeds=lm.embed(ids), attention_mask=mask, state=state, return_state=True, logits="last"
        )
        img, img_mask = model.encode_images(images)
        emb = torch.cat([img, lm.embed(ids)], 1)
        full_mask = torch.cat([img_mask, mask], 1)
        b = lm(inputs_embeds=emb, attention_mask=full_mask, return_state=True, logits="last")
    tol = (1e-3, 1e-3) if dtype == torch.float32 else (5e-2, 1.5e-1)
    close(a.logits, b.logits, *tol, what=f"last logits {dtype}")
    for i, (sa, sb) in enumerate(zip(a.state, b.state)):
        close(sa.ssm, sb.ssm, *tol, what=f"layer {i} ssm state {dtype}")
        close(sa.conv, sb.conv, *tol, what=f"layer {i} conv state {dtype}")


@pytest.mark.parametrize("weights", ["bf16", "fp32_autocast"])
def test_prefill_graphs_equal_the_eager_prefill(weights):
    """prefill_images(cuda_graph=True) and generate (graphs by default on CUDA): captured once per shape,
    replayed with new images and prompts, following in-place weight updates, equal to the eager path
    per element (states and the first token's logits) and in the generated tokens."""
    from vlm_mamba.models.graphs import graph_cache

    torch.manual_seed(0)
    model = create_model("small").to(DEV).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    if weights == "bf16":
        model = model.to(torch.bfloat16)
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=weights != "bf16")
    tol = (2e-2, 5e-2)
    cache = graph_cache(model)
    for seed in range(3):
        g = torch.Generator(device="cpu").manual_seed(seed)
        images = torch.randn(2, 3, 224, 224, generator=g).to(DEV)
        with torch.no_grad(), amp:
            eager = model.prefill_images(images)
            graphed = model.prefill_images(images, cuda_graph=True)
        for i, (a, b) in enumerate(zip(eager, graphed)):
            close(b.ssm, a.ssm, *tol, what=f"{weights} image state ssm layer {i} seed {seed}")
            close(b.conv.float(), a.conv.float(), *tol, what=f"{weights} image state conv layer {i}")
        if seed == 1:
            with torch.no_grad():
                model.language.layers[0].mixer.out_proj.weight.mul_(1.5)  # in place: the graph follows
    assert cache.captures == 1  # one image batch shape, captured at its second call (seed 1)

    ids = torch.randint(3, 5000, (2, 21), device=DEV)
    mask = torch.ones(2, 21, dtype=torch.bool, device=DEV)
    mask[1, :9] = False
    with torch.no_grad(), amp:
        a = model.generate(images, ids, mask, max_new_tokens=8, eos_token_id=None, prefill_graph=False)
        # the default (graphs): the image graph replays; the prompt's bucket is seen first here (eager)
        b = model.generate(images, ids, mask, max_new_tokens=8, eos_token_id=None)
        b2 = model.generate(
            images, ids[:, 2:], mask[:, 2:], max_new_tokens=8, eos_token_id=None, prefill_graph=True
        )
        a2 = model.generate(
            images, ids[:, 2:], mask[:, 2:], max_new_tokens=8, eos_token_id=None, prefill_graph=False
        )
    assert cache.captures == 2  # bucket 32, captured at b2 (its second sighting), serves both lengths
    agree = (a == b).float().mean().item(), (a2 == b2).float().mean().item()
    assert min(agree) >= 0.85, agree  # bf16 rounding may flip a near-tie late in a row
    assert torch.equal(a[:, :2], b[:, :2]) and torch.equal(a2[:, :2], b2[:, :2])


@pytest.mark.parametrize("pads", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_short_scan_from_zero_equals_the_reference_scan(dtype, pads, monkeypatch):
    """VLM_MAMBA_SHORT_SCAN=1: a forward-only scan without a state up to SHORT_SCAN_MAX_LENGTH
    tokens runs the step-at-a-time Triton kernel from a zero state, equal to the reference scan per
    element (output and last state), and a longer one keeps mamba_ssm's scan."""
    monkeypatch.setenv(triton_scan.SHORT_SCAN_ENV, "1")
    t = _scan_inputs(dtype, length=196, pads=pads)
    t.pop("initial_state")
    calls = []
    real = triton_scan.selective_scan_from_state
    monkeypatch.setattr(
        triton_scan, "selective_scan_from_state", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    with torch.no_grad():
        y, last = ops.selective_scan(**t, delta_softplus=True, return_last_state=True, kernel=FAST)
        ry, rlast = selective_scan_ref(**t, delta_softplus=True, return_last_state=True)
        assert DRY or calls == [1]
        longer = _scan_inputs(dtype, length=300)
        longer.pop("initial_state")
        ops.selective_scan(**longer, delta_softplus=True, kernel=FAST)
        assert DRY or calls == [1]  # 300 tokens > SHORT_SCAN_MAX_LENGTH: mamba_ssm's scan (with its h0 term)
    tol = (1e-4, 1e-4) if dtype == torch.float32 else (2e-2, 5e-2)
    close(y, ry, *tol, what=f"short scan y {dtype} pads={pads}")
    close(last, rlast, 1e-4, 1e-4, what=f"short scan last state {dtype} pads={pads}")


def test_short_scan_in_the_vlm_equals_mamba_ssm(monkeypatch):
    """The VLM's inference with VLM_MAMBA_SHORT_SCAN=1 (vision encoder off mamba_inner_fn, the image's
    LM prefill, the prompt's): the image states per element, and generate's tokens and first logits,
    equal the default kernels', with prefill graphs (a graph is captured per setting)."""
    from vlm_mamba.models.graphs import graph_cache

    torch.manual_seed(0)
    model = create_model("small").to(DEV).eval()  # fp32: two kernels' rounding orders, compared tightly
    images = torch.randn(4, 3, 224, 224, device=DEV)
    ids = torch.randint(3, 5000, (4, 12), device=DEV)
    out = {}
    for flag in ("0", "1"):
        monkeypatch.setenv(triton_scan.SHORT_SCAN_ENV, flag)
        with torch.no_grad():
            states = model.prefill_images(images)
            toks = [model.generate(images, ids, max_new_tokens=6, eos_token_id=None) for _ in range(3)]
        out[flag] = states, toks
    (s0, t0), (s1, t1) = out["0"], out["1"]
    for i, (a, b) in enumerate(zip(s0, s1)):
        close(b.ssm, a.ssm, 1e-3, 1e-3, what=f"short scan image state layer {i}")
        close(b.conv, a.conv, 1e-3, 1e-3, what=f"short scan image conv window layer {i}")
    assert all(torch.equal(t, t0[0]) for t in t0) and all(torch.equal(t, t1[0]) for t in t1)
    assert (t0[0] == t1[0]).float().mean().item() >= 0.85 and torch.equal(t0[0][:, :2], t1[0][:, :2])
    assert DRY or graph_cache(model).captures >= 2  # the image graph under each setting

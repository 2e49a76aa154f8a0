"""The compiled CPU scan as a torch custom op, and torch.compile around it.

``vlm_mamba::selective_scan_cpu`` (and its backward op) must pass torch's own custom-op checks (schema,
fake tensors, autograd registration), equal the sequential reference in values and gradients, and
keep a compiled graph whole: compiled equals eager for the op, a mixer and a training step of the
tiny VLM through ``CompileModel``, which runs the eager forward outside training and switches itself
off, saying why, without a C++ compiler.
"""

from __future__ import annotations

import logging

import pytest
import torch

from vlm_mamba import ops
from vlm_mamba.ops import cpu_kernels as K
from vlm_mamba.ops import reference as R

needs_cpu_kernel = pytest.mark.skipif(
    ops.cpu_unavailable_reason() is not None,
    reason=f"compiled CPU kernel unavailable: {ops.cpu_unavailable_reason()}",
)


def _needs_inductor():
    reason = K.cxx_unavailable_reason()
    return pytest.mark.skipif(reason is not None, reason=f"inductor cannot build CPU kernels: {reason}")


needs_inductor = _needs_inductor()


def _inputs(b=2, e=32, L=7, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)
    return dict(
        u=r(b, e, L), delta=r(b, e, L) * 0.5, A=-torch.rand(e, n, generator=g) * 2 - 0.1, B=r(b, n, L),
        C=r(b, n, L), D=r(e), z=r(b, e, L), delta_bias=r(e) * 0.3, initial_state=r(b, e, n),
    )  # fmt: skip


ORDER = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state"]


def _grads(fn, d, with_last: bool):
    xs = {k: v.detach().clone().requires_grad_(True) for k, v in d.items()}
    out = fn(*[xs[k] for k in ORDER[:8]], True, xs["initial_state"], with_last)
    y, h = out if with_last else (out, None)
    w = torch.linspace(-1, 1, y.shape[-1])
    loss = (y * w).sum() + (h.square().sum() if h is not None else 0)
    loss.backward()
    return (y, h), {k: v.grad for k, v in xs.items()}


@needs_cpu_kernel
def test_custom_op_passes_torch_opcheck():
    d = _inputs()
    cl = lambda t: t.transpose(1, 2).contiguous()  # (b,e,l) -> (b,l,e)
    tm = lambda t: t.transpose(1, 2).contiguous()[:, None]  # (b,n,l) -> (b,1,l,n)
    args = (
        cl(d["u"]), cl(d["delta"]), d["A"].t().contiguous(), tm(d["B"]), tm(d["C"]), d["D"], cl(d["z"]),
        d["delta_bias"], True, d["initial_state"],
    )  # fmt: skip
    args = tuple(a.requires_grad_(True) if isinstance(a, torch.Tensor) else a for a in args)
    torch.library.opcheck(K.scan_fwd, args)
    no_optionals = (*args[:5], None, None, None, False, None)
    torch.library.opcheck(K.scan_fwd, no_optionals)


@needs_cpu_kernel
@pytest.mark.parametrize("with_last", [False, True])
def test_custom_op_matches_reference_values_and_gradients(with_last):
    d = _inputs(b=3, e=48, L=9, n=5)
    (y, h), g = _grads(K.selective_scan_cpu, d, with_last)
    (y_ref, h_ref), g_ref = _grads(R.selective_scan_ref, d, with_last)
    torch.testing.assert_close(y, y_ref, atol=1e-4, rtol=1e-4)
    if with_last:
        torch.testing.assert_close(h, h_ref, atol=1e-4, rtol=1e-4)
    for k in ORDER:
        torch.testing.assert_close(g[k], g_ref[k], atol=1e-4, rtol=1e-4, msg=k)


@needs_cpu_kernel
@needs_inductor
def test_compiled_scan_is_one_graph_and_equals_eager():
    d = _inputs()
    torch._dynamo.reset()
    compiled = torch.compile(K.selective_scan_cpu, fullgraph=True)  # fullgraph: a break is an error
    (y, h), g = _grads(compiled, d, True)
    (y0, h0), g0 = _grads(K.selective_scan_cpu, d, True)
    torch.testing.assert_close(y, y0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h, h0, atol=1e-5, rtol=1e-5)
    for k in ORDER:
        torch.testing.assert_close(g[k], g0[k], atol=1e-5, rtol=1e-5, msg=k)


@needs_cpu_kernel
@needs_inductor
def test_compiled_mixer_is_one_graph_and_equals_eager():
    from vlm_mamba.layers import MambaMixer

    torch.manual_seed(0)
    mixer = MambaMixer(16, d_state=4, expand=2, kernel="cpu")  # d_inner 32: two vectors of lanes
    x = torch.randn(2, 9, 16)
    torch._dynamo.reset()
    compiled = torch.compile(mixer, fullgraph=True, dynamic=True)
    out = compiled(x)
    out.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in mixer.named_parameters()}
    mixer.zero_grad()
    ref = mixer(x)
    ref.square().sum().backward()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for n, p in mixer.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, atol=1e-5, rtol=1e-5, msg=n)


def _tiny_module():
    from vlm_mamba import create_model
    from vlm_mamba.training.module import VLMambaLitModule

    torch.manual_seed(0)
    cfg = create_model("tiny").config
    return VLMambaLitModule(cfg.model_copy(update={"bos_token_id": 1, "eos_token_id": 2}))


def _batch(t: int):
    g = torch.Generator().manual_seed(t)
    ids = torch.randint(3, 500, (4, t), generator=g)
    mask = torch.ones(4, t, dtype=torch.long)
    mask[1, t - 2 :] = 0  # right padding
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :2] = -100
    return {
        "images": torch.randn(4, 3, 32, 32, generator=g),
        "input_ids": ids,
        "attention_mask": mask,
        "labels": labels,
    }


class _FakeTrainer:
    pass


def test_compile_callback_uses_the_compiled_forward_only_to_train(monkeypatch):
    import vlm_mamba.training.callbacks as C

    calls = []

    def fake_compile(fn, **kw):  # records the options and each call of the "compiled" function
        calls.append(("compile", fn.__self__.__class__.__name__, kw["dynamic"]))
        return lambda *a, **k: calls.append("compiled") or fn(*a, **k)

    monkeypatch.setattr(C.torch, "compile", fake_compile)
    monkeypatch.setattr(C, "_smoke_test_compile", lambda: None)
    monkeypatch.setattr(C, "cxx_unavailable_reason", lambda: None)
    module = _tiny_module()
    C.CompileModel(modules=["vision", "language"], dynamic=["language"]).setup(_FakeTrainer(), module, "fit")
    assert calls == [("compile", "VisionMamba", False), ("compile", "LanguageMamba", True)]
    calls.clear()
    module.train()
    module(_batch(6)).loss.backward()
    assert calls == ["compiled", "compiled"]
    calls.clear()
    with torch.no_grad():
        module(_batch(6))
    module.eval()
    module(_batch(6))
    assert calls == []  # eval mode or no grad: the eager forward


@pytest.mark.slow
@needs_cpu_kernel
@needs_inductor
def test_compile_callback_trains_as_eager_and_evaluates_eager():
    from vlm_mamba.training.callbacks import CompileModel

    eager, compiled = _tiny_module(), _tiny_module()
    cb = CompileModel(modules=["vision", "language"], dynamic=["language"])
    torch._dynamo.reset()
    cb.setup(_FakeTrainer(), compiled, "fit")
    assert cb.off_reason is None and cb.compiled == ["vision", "language"]
    for t in (7, 9):  # two text lengths: one dynamic graph for the language model
        losses = []
        for m in (eager, compiled):
            m.train()
            m.zero_grad()
            loss = m(_batch(t)).loss
            loss.backward()
            losses.append((loss, {n: p.grad for n, p in m.named_parameters()}))
        torch.testing.assert_close(losses[1][0], losses[0][0], atol=1e-5, rtol=1e-5)
        for n, grad in losses[0][1].items():
            torch.testing.assert_close(losses[1][1][n], grad, atol=1e-4, rtol=1e-4, msg=n)
    # outside training (eval mode or no grad) the eager forward runs: nothing new is traced
    from torch._dynamo.utils import counters

    frames = dict(counters["frames"])
    compiled.eval()
    eager.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(_batch(5)).loss, eager(_batch(5)).loss)
    compiled.train()
    with torch.no_grad():
        torch.testing.assert_close(compiled(_batch(6)).loss, eager.train()(_batch(6)).loss)
    assert dict(counters["frames"]) == frames
    assert set(compiled.state_dict()) == set(eager.state_dict())


def test_compile_callback_switches_off_without_a_cpp_compiler(monkeypatch, caplog):
    from vlm_mamba.training.callbacks import CompileModel

    monkeypatch.setenv("CXX", "/nonexistent/c++")
    assert "is not an executable" in K.cxx_unavailable_reason()
    module = _tiny_module()
    forward = module.model.language.forward
    cb = CompileModel()
    with caplog.at_level(logging.WARNING, logger="vlm_mamba.training.callbacks"):
        cb.setup(_FakeTrainer(), module, "fit")
    assert cb.off_reason is not None and not cb.compiled
    assert "torch.compile is off" in caplog.text and "/nonexistent/c++" in caplog.text
    assert module.model.language.forward == forward  # untouched: eager

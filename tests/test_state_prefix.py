"""The image state written into the sequence as 2n prefix tokens (ops.state_prefix): a scan from
zero over [prefix][prompt] equals the scan from the state, per element, against the reference scan."""

import pytest
import torch

from vlm_mamba.ops import state_prefix
from vlm_mamba.ops.reference import selective_scan_ref


def _case(dtype, b=2, e=24, n=16, L=40, seed=0, a_scale=8.0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    A = -(torch.rand(e, n, generator=g) * a_scale + 0.05)
    return dict(
        u=r(b, e, L).to(dtype), delta=(r(b, e, L) * 0.5 - 1.0).to(dtype), A=A, B=r(b, n, L), C=r(b, n, L),
        D=r(e), z=r(b, e, L).to(dtype), delta_bias=r(e) * 0.5 - 3.0,
    ), r(b, e, n) * 3.0  # fmt: skip


def _prefixed(c, h0):
    n = c["A"].shape[1]
    V = state_prefix.prefix_length(n)
    u_v, d_v, B_v = state_prefix.prefix_inputs(h0, c["A"], c["delta_bias"], c["u"].dtype)
    b, e, _ = c["u"].shape
    cat = lambda pre, x: torch.cat([pre, x], dim=-1)  # noqa: E731
    return dict(
        u=cat(u_v, c["u"]), delta=cat(d_v[None, :, None].expand(b, e, V), c["delta"]), A=c["A"],
        B=cat(B_v.t()[None].expand(b, n, V).to(c["B"].dtype), c["B"]),
        C=cat(torch.zeros(b, n, V), c["C"]), D=c["D"], z=cat(torch.zeros(b, e, V, dtype=c["z"].dtype), c["z"]),
        delta_bias=c["delta_bias"],
    ), V  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("a_scale", [1.0, 8.0, 60.0])
def test_scan_over_the_state_prefix_equals_the_scan_from_the_state(dtype, a_scale):
    c, h0 = _case(dtype, a_scale=a_scale)
    y_ref, last_ref = selective_scan_ref(**c, delta_softplus=True, initial_state=h0, return_last_state=True)
    p, V = _prefixed(c, h0)
    y, last = selective_scan_ref(**p, delta_softplus=True, return_last_state=True)
    # the state after the prefix alone is h0: ~2^-16 relative from bf16 inputs, fp32 rounding from fp32
    _, h_pre = selective_scan_ref(**{k: (v[..., :V] if k in ("u", "delta", "B", "C", "z") else v)
                                     for k, v in p.items()}, delta_softplus=True, return_last_state=True)  # fmt: skip
    tol = 1e-5 if dtype == torch.float32 else 1e-4
    assert torch.allclose(h_pre, h0, rtol=tol, atol=tol * h0.abs().max()), (h_pre - h0).abs().max()
    assert torch.allclose(last, last_ref, rtol=tol, atol=tol * last_ref.abs().max())
    # outputs after the prefix: the same values; in bf16 within one rounding of the output
    ya, yb = y[..., V:].float(), y_ref.float()
    if dtype == torch.float32:
        assert torch.allclose(ya, yb, rtol=1e-5, atol=1e-5 * yb.abs().max())
    else:
        assert ((ya - yb).abs() <= 2**-7 * yb.abs() + 1e-2).all(), (ya - yb).abs().max()


def test_the_prefix_without_a_bias_and_a_zero_state():
    c, h0 = _case(torch.float32)
    c["delta_bias"] = None
    u_v, d_v, B_v = state_prefix.prefix_inputs(torch.zeros_like(h0), c["A"], None, torch.float32)
    assert torch.equal(u_v, torch.zeros_like(u_v)) and torch.isfinite(d_v).all()
    assert torch.equal(B_v, torch.eye(16).repeat(2, 1))
    y_ref, last_ref = selective_scan_ref(**c, delta_softplus=True, initial_state=h0, return_last_state=True)
    p, V = _prefixed(c, h0)
    y, last = selective_scan_ref(**p, delta_softplus=True, return_last_state=True)
    assert torch.allclose(last, last_ref, rtol=1e-5, atol=1e-5 * last_ref.abs().max())
    assert torch.allclose(y[..., V:], y_ref, rtol=1e-5, atol=1e-5 * y_ref.abs().max())


def test_fp16_inputs_are_refused_by_name():
    with pytest.raises(ValueError, match="fp16 could overflow"):
        state_prefix.prefix_inputs(torch.zeros(1, 2, 4), -torch.ones(2, 4), None, torch.float16)


def test_mixer_state_prefix_form_equals_the_forward_from_the_state(monkeypatch):
    """MambaMixer's prefix form (the CUDA path's, run here with the reference kernels in place of
    mamba_ssm's) against the torch path from the same state: padded rows (left-padded prompts,
    compacted), a conv state reaching into the prefix for a one-token row, outputs and final states
    per element; and the form is not taken while autograd records."""
    from types import SimpleNamespace

    from vlm_mamba import ops
    from vlm_mamba.layers import MambaMixer, MixerState
    from vlm_mamba.ops import cuda, reference, triton_scan

    torch.manual_seed(0)
    m = MambaMixer(16, d_state=8, d_conv=4, expand=2, dt_rank=3).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name in ("A_log", "D") or name.startswith("dt_proj"):
                p.add_(torch.randn_like(p) * 0.3)
    g = torch.Generator().manual_seed(1)
    prefix, prompts = torch.randn(1, 7, 16, generator=g), torch.randn(3, 6, 16, generator=g)
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[0, :5], mask[1, :2] = False, False  # row 0: one real token (its conv window reads the state)
    with torch.no_grad():
        _, st = m(prefix, return_state=True)
        st = st.repeat_interleave(3)
        # a state of a trained model's size (this one's dt is tiny, so its own state is ~1e-2)
        st = MixerState(st.conv, torch.randn(st.ssm.shape, generator=g) * 2.0)
        y_ref, s_ref = m(prompts, mask=mask, state=st, return_state=True)  # the torch path (CPU)

    def scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, last=False):
        return reference.selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus, None, last)

    fake = SimpleNamespace(
        causal_conv1d_fn=lambda x, w, b=None, activation=None: reference.causal_conv1d_ref(x, w, b, activation=activation),
        selective_scan_fn=scan_fn,
    )  # fmt: skip
    monkeypatch.setattr(cuda, "load", lambda: fake)
    monkeypatch.setattr(ops, "kernel_family", lambda requested="auto", device=None: "cuda")
    monkeypatch.setenv(triton_scan.STATE_SCAN_ENV, "prefix")
    taken = []
    orig = MambaMixer._forward_state_prefix
    monkeypatch.setattr(
        MambaMixer, "_forward_state_prefix", lambda self, *a: taken.append(1) or orig(self, *a)
    )
    with torch.no_grad():
        y, s = m(prompts, mask=mask, state=st, return_state=True)
    assert taken, "the prefix form was not taken"
    for r in range(3):
        torch.testing.assert_close(y[r, mask[r]], y_ref[r, mask[r]], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(s.conv, s_ref.conv, atol=1e-6, rtol=0)
    torch.testing.assert_close(s.ssm, s_ref.ssm, atol=1e-4, rtol=1e-4)
    taken.clear()
    with torch.enable_grad():  # autograd recording: the differentiable path, not the prefix
        m(prompts, mask=mask, state=st, return_state=True)
    assert not taken

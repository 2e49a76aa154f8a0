"""Mixers and Block: prefill + step == one forward, padding is an identity step wherever it falls,
states are values (never mutated), the torch path equals the sequential reference, and weights are
read through the layer attributes at call time (what a LoRA wrapper relies on)."""

import pytest
import torch
from torch import nn

from vlm_mamba import ops
from vlm_mamba.config import LanguageConfig, VisionConfig
from vlm_mamba.layers import Block, InferenceState, Mamba2Mixer, MambaMixer, MixerState, RMSNorm, RMSNormGated

ATOL = 1e-4


def _mixer(kind: str, seed: int = 0, **kw) -> nn.Module:
    torch.manual_seed(seed)
    if kind == "mamba1":
        m = MambaMixer(16, d_state=6, d_conv=3, expand=2, dt_rank=3, **kw)
    else:
        m = Mamba2Mixer(16, d_state=6, d_conv=4, expand=2, headdim=8, ngroups=2, chunk_size=4, **kw)
    with torch.no_grad():  # make dt, A, D and the norm non-trivial so mistakes show
        for name, p in m.named_parameters():
            if name in ("A_log", "D", "dt_bias", "norm.weight") or name.startswith("dt_proj"):
                p.add_(torch.randn_like(p) * 0.3)
    return m.eval()


KINDS = ["mamba1", "mamba2"]


def _x(b=3, L=10, d=16, seed=1):
    return torch.randn(b, L, d, generator=torch.Generator().manual_seed(seed))


def _close(a, b, atol=ATOL):
    torch.testing.assert_close(a, b, atol=atol, rtol=1e-4)


def _state_close(s1: MixerState, s2: MixerState):
    _close(s1.conv, s2.conv)
    _close(s1.ssm, s2.ssm)


@pytest.mark.parametrize("kind", KINDS)
def test_prefill_then_step_equals_forward(kind):
    m, x = _mixer(kind), _x()
    with torch.no_grad():
        full, full_state = m(x, return_state=True)
        y, st = m(x[:, :4], return_state=True)
        outs = [y]
        for t in range(4, x.shape[1]):
            yt, st = m.step(x[:, t], st)
            outs.append(yt[:, None])
    _close(torch.cat(outs, 1), full)
    _state_close(st, full_state)


@pytest.mark.parametrize("kind", KINDS)
def test_step_from_zero_state_equals_forward(kind):
    m, x = _mixer(kind), _x(L=5)
    with torch.no_grad():
        st, outs = m.allocate_state(3), []
        for t in range(5):
            yt, st = m.step(x[:, t], st)
            outs.append(yt)
        _close(torch.stack(outs, 1), m(x))


@pytest.mark.parametrize("kind", KINDS)
def test_forward_continues_from_state(kind):
    m, x = _mixer(kind), _x(L=11)
    with torch.no_grad():
        full, full_state = m(x, return_state=True)
        y1, s1 = m(x[:, :6], return_state=True)
        y2, s2 = m(x[:, 6:], state=s1, return_state=True)
    _close(torch.cat([y1, y2], 1), full)
    _state_close(s2, full_state)


def _rows_alone(m, x, mask, state=None):
    """Each row's real tokens run alone: outputs at real positions and final states."""
    ys, states = [], []
    for r in range(x.shape[0]):
        st = state.index_select(torch.tensor([r])) if state is not None else None
        y, s = m(x[r : r + 1, mask[r]], state=st, return_state=True)
        ys.append(y[0])
        states.append(s)
    return ys, states


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("where", ["left", "middle", "right", "scattered"])
def test_padded_batch_equals_rows_alone(kind, where):
    m, x = _mixer(kind), _x(b=3, L=9)
    mask = torch.ones(3, 9, dtype=torch.bool)
    if where == "left":
        mask[0, :3], mask[1, :7] = False, False
    elif where == "middle":
        mask[0, 3:6], mask[1, 1:2] = False, False
    elif where == "right":
        mask[0, 5:], mask[2, 8:] = False, False
    else:
        mask[0, ::2], mask[1, 1::3] = False, False
    with torch.no_grad():
        y, state = m(x, mask=mask, return_state=True)
        ys, states = _rows_alone(m, x, mask)
    for r in range(3):
        _close(y[r, mask[r]], ys[r])
        _state_close(state.index_select(torch.tensor([r])), states[r])
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("kind", KINDS)
def test_pads_after_a_prefix_continue_from_the_state(kind):
    """A shared prefix (an image, say) prefilled once, forked, then left-padded prompts of different
    lengths continue from the non-zero state: each row equals its prompt run alone from that state."""
    m = _mixer(kind)
    prefix, prompts = _x(b=1, L=5, seed=2), _x(b=3, L=6, seed=3)
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[0, :4], mask[1, :1] = False, False
    with torch.no_grad():
        _, st = m(prefix, return_state=True)
        st = st.repeat_interleave(3)
        y, final = m(prompts, mask=mask, state=st, return_state=True)
        ys, states = _rows_alone(m, prompts, mask, state=st)
        # and decoding onward from the padded prefill equals decoding from each row alone
        nxt = _x(b=3, L=1, seed=4)[:, 0]
        y_step, _ = m.step(nxt, final)
    for r in range(3):
        _close(y[r, mask[r]], ys[r])
        _state_close(final.index_select(torch.tensor([r])), states[r])
        with torch.no_grad():
            y_alone, _ = m.step(nxt[r : r + 1], states[r])
        _close(y_step[r], y_alone[0])
    assert not torch.allclose(st.ssm, torch.zeros_like(st.ssm)), "prefix state should be non-zero"


@pytest.mark.parametrize("kind", KINDS)
def test_all_padded_row_keeps_its_state(kind):
    m, x = _mixer(kind), _x(b=2, L=4)
    mask = torch.tensor([[False] * 4, [True] * 4])
    with torch.no_grad():
        st = m(_x(b=2, L=3, seed=5), return_state=True)[1]
        _, new = m(x, mask=mask, state=st, return_state=True)
    _state_close(new.index_select(torch.tensor([0])), st.index_select(torch.tensor([0])))


@pytest.mark.parametrize("kind", KINDS)
def test_step_is_functional_and_masked_rows_keep_state(kind):
    m, x = _mixer(kind), _x(b=2, L=3)
    with torch.no_grad():
        _, st = m(x, return_state=True)
        before = st.clone()
        _, new = m.step(x[:, 0], st, mask=torch.tensor([True, False]))
    assert torch.equal(st.conv, before.conv) and torch.equal(st.ssm, before.ssm), "step mutated its input"
    _state_close(new.index_select(torch.tensor([1])), st.index_select(torch.tensor([1])))
    assert not torch.allclose(new.ssm[0], st.ssm[0])


@pytest.mark.parametrize("path", ["torch", "cpu"])
@pytest.mark.parametrize("kind", KINDS)
def test_torch_path_equals_reference_values_and_grads(kind, path):
    if path == "cpu" and ops.cpu_unavailable_reason() is not None:
        pytest.skip(f"compiled CPU kernel unavailable: {ops.cpu_unavailable_reason()}")
    x, mask = _x(b=2, L=7), torch.ones(2, 7, dtype=torch.bool)
    mask[0, :2] = False
    outs, grads = [], []
    for kernel in (path, "ref"):
        m = _mixer(kind, kernel=kernel).train()
        st = m.allocate_state(2)
        st.ssm.normal_(generator=torch.Generator().manual_seed(0))
        y, s = m(x, mask=mask, state=st, return_state=True)
        (y.square().sum() + s.ssm.sum()).backward()
        outs.append(y)
        grads.append({n: p.grad for n, p in m.named_parameters()})
    _close(outs[0], outs[1])
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        assert grads[0][n] is not None, f"{n} got no gradient"
        _close(grads[0][n], grads[1][n], atol=1e-3)


class _MergedLinear(nn.Module):
    """Stand-in for a LoRA wrapper: exposes the effective weight as a property computed per call."""

    def __init__(self, base: nn.Linear, delta: torch.Tensor):
        super().__init__()
        self.base, self.delta = base, nn.Parameter(delta)

    @property
    def weight(self):
        return self.base.weight + self.delta

    @property
    def bias(self):
        return self.base.bias

    def forward(self, x):
        return nn.functional.linear(x, self.weight, self.bias)


@pytest.mark.parametrize("name", ["in_proj", "x_proj", "dt_proj", "out_proj"])
def test_wrapped_linear_effective_weight_is_used(name):
    m, x = _mixer("mamba1"), _x(L=5)
    delta = torch.randn_like(getattr(m, name).weight) * 0.1
    ref = _mixer("mamba1")
    with torch.no_grad():
        getattr(ref, name).weight += delta
        want = ref(x)
    setattr(m, name, _MergedLinear(getattr(m, name), delta))
    y = m(x)
    _close(y, want)
    y.sum().backward()
    assert getattr(m, name).delta.grad is not None and getattr(m, name).delta.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", KINDS)
def test_block_prefill_step_and_fp32_residual(kind):
    blk = Block(16, _mixer(kind), norm_cls=RMSNorm, residual_in_fp32=True).eval()
    x = _x(L=6)
    with torch.no_grad():
        full, fs = blk(x, return_state=True)
        y, st = blk(x[:, :3], return_state=True)
        outs = [y]
        for t in range(3, 6):
            yt, st = blk.step(x[:, t], st)
            outs.append(yt[:, None])
        _close(torch.cat(outs, 1), full)
        _state_close(st, fs)
        # residual: output minus input is the mixer of the normed input
        _close(full - x, blk.mixer(blk.norm(x)))
        assert blk(x.to(torch.bfloat16)).dtype == torch.float32
        blk16 = Block(16, _mixer(kind), residual_in_fp32=False)
        assert blk16(x.to(torch.bfloat16).float()).dtype == torch.float32


def test_states_fork_and_select_independently():
    s = MixerState(torch.arange(6.0).view(2, 3, 1), torch.arange(8.0).view(2, 4, 1))
    r = s.repeat_interleave(2)
    assert r.conv.shape[0] == 4 and torch.equal(r.ssm[1], s.ssm[0]) and torch.equal(r.ssm[2], s.ssm[1])
    sel = s.index_select(torch.tensor([1, 1, 0]))
    assert torch.equal(sel.conv[2], s.conv[0])
    c = s.clone()
    c.ssm += 1
    assert not torch.equal(c.ssm, s.ssm)
    inf = InferenceState([s, s.clone()])
    assert len(inf.repeat_interleave(3)) == 2 and inf.repeat_interleave(3).batch_size == 6
    assert InferenceState.cat([inf, inf.index_select(torch.tensor([0]))]).batch_size == 3


def test_from_config_for_language_and_vision():
    lang = LanguageConfig(
        d_model=32, n_layers=1, d_state=8, ssm="mamba2", headdim=16, ngroups=2, vocab_size=10
    )
    m2 = Mamba2Mixer.from_config(lang, layer_idx=0)
    assert (m2.nheads, m2.ngroups, m2.d_state, m2.norm.group_size) == (4, 2, 8, 32)
    vis = VisionConfig(d_model=24, n_layers=1, d_state=4, dt_rank=5, d_conv=2, expand=1)
    m1 = MambaMixer.from_config(vis, layer_idx=3)
    assert (m1.d_inner, m1.dt_rank, m1.d_conv, m1.layer_idx) == (24, 5, 2, 3)
    assert m1.x_proj.weight.shape == (5 + 2 * 4, 24)
    y = m1(torch.randn(2, 7, 24), mask=torch.tensor([[1] * 7, [1] * 3 + [0] * 4]))
    assert y.shape == (2, 7, 24)


def test_mask_shape_is_checked():
    with pytest.raises(ValueError, match="mask has shape"):
        _mixer("mamba1")(_x(b=2, L=5), mask=torch.ones(2, 4, dtype=torch.bool))


def test_gated_norm_groups_and_order():
    x, z = torch.randn(2, 8), torch.randn(2, 8)
    n = RMSNormGated(8, eps=1e-6, group_size=4)
    g = x * torch.nn.functional.silu(z)
    want = torch.cat([RMSNorm(4, eps=1e-6)(g[:, :4]), RMSNorm(4, eps=1e-6)(g[:, 4:])], -1)
    _close(n(x, z), want)
    nb = RMSNormGated(8, eps=1e-6, norm_before_gate=True)
    _close(nb(x, z), RMSNorm(8, eps=1e-6)(x) * torch.nn.functional.silu(z))


def test_block_carry_equals_block_forward_exactly():
    """The carried-residual form (what LanguageMamba runs, fusable add + norm) computes bit for bit
    what chaining Block.forward and a final norm did before the fusion."""
    blocks = [
        Block(16, _mixer(k, seed=i), norm_cls=RMSNorm, residual_in_fp32=True) for i, k in enumerate(KINDS)
    ]
    norm_f = RMSNorm(16)
    with torch.no_grad():
        norm_f.weight.add_(torch.randn(16) * 0.3)
        x = _x(L=7)
        want = x
        for blk in blocks:
            want = blk(want)
        want = norm_f(want)
        hidden, residual = x, None
        for blk in blocks:
            hidden, residual = blk.forward_carry(hidden, residual)
        got = ops.add_rms_norm(hidden, residual, norm_f.weight, norm_f.eps, True, prenorm=False)
    assert torch.equal(got, want)


@pytest.mark.parametrize("kind", KINDS)
def test_lengths_on_compacted_rows_equal_the_mask(kind):
    """``lengths`` (rows already compacted, what LanguageMamba passes) is the mask path without the
    per-layer permutation: the same outputs at real positions and the same final states."""
    m, x = _mixer(kind), _x(b=3, L=8)
    mask = torch.ones(3, 8, dtype=torch.bool)
    mask[0, :3], mask[1, 2:4], mask[2, 6:] = False, False, False
    order, inverse, lengths = ops.compact_by_mask(mask)
    with torch.no_grad():
        y_mask, s_mask = m(x, mask=mask, return_state=True)
        y_len, s_len = m(ops.gather_time(x, order), lengths=lengths, return_state=True)
    _close(ops.gather_time(y_len, inverse)[mask], y_mask[mask])
    _state_close(s_len, s_mask)
    with pytest.raises(ValueError, match="not both"):
        m(x, mask=mask, lengths=lengths)


@pytest.mark.parametrize("kind", KINDS)
def test_padded_training_forward_equals_rows_alone_with_grads(kind):
    """Without a returned state the compacted rows run unmasked (the fused path on CUDA): real outputs
    and every gradient equal the rows run alone, and nothing flows to a pad."""
    mask = torch.ones(3, 9, dtype=torch.bool)
    mask[0, :3], mask[1, 4:6], mask[2, 7:] = False, False, False
    x = _x(b=3, L=9).requires_grad_(True)
    m = _mixer(kind).train()
    y = m(x, mask=mask)
    y[mask].square().sum().backward()
    ref = _mixer(kind).train()
    xs = x.detach().clone().requires_grad_(True)
    for r in range(3):
        yr = ref(xs[r : r + 1, mask[r]])
        yr.square().sum().backward()
        _close(y[r, mask[r]], yr[0])
    _close(x.grad, xs.grad)
    assert torch.equal(x.grad[~mask], torch.zeros_like(x.grad[~mask]))
    for p, q in zip(m.parameters(), ref.parameters()):
        _close(p.grad, q.grad, atol=1e-3)


def _lora_mixer(kind, targets, dropout):
    from vlm_mamba.layers.lora import LoRALinear

    m = _mixer(kind)
    torch.manual_seed(7)
    for name in targets:
        lora = LoRALinear(getattr(m, name), rank=2, alpha=4.0, dropout=dropout)
        nn.init.normal_(lora.lora_B, std=0.3)  # a visible adapter
        setattr(m, name, lora)
    return m


@pytest.mark.parametrize(
    "kind, target",
    [("mamba1", "x_proj"), ("mamba1", "dt_proj"), ("mamba1", "out_proj"), ("mamba1", "in_proj"),
     ("mamba2", "out_proj"), ("mamba2", "in_proj")],
)  # fmt: skip
def test_lora_dropout_applies_on_every_target(kind, target):
    """Issue 12, item 8: an adapter's dropout acts wherever the adapter sits. With p = 1 in training
    the adapter's input is all dropped, so the mixer equals the base model; in eval it is active."""
    m, x = _lora_mixer(kind, [target], dropout=1.0), _x(L=6)
    base = _mixer(kind)
    merged = _lora_mixer(kind, [target], dropout=0.0)
    from vlm_mamba.layers.mamba1 import reads_weight_only

    with torch.no_grad():
        m.train()
        assert not reads_weight_only(getattr(m, target))
        off = (m(x) - base(x)).abs().max()  # all dropped: the base model
        m.eval()
        assert reads_weight_only(getattr(m, target))
        _close(m(x), merged(x))
        on = (m(x) - base(x)).abs().max()  # the adapter's effect
    assert on > 0 and off < 1e-3 * on, (off, on)

"""vlm_mamba.ops: the pure-PyTorch scans and convs equal the sequential references (values and
gradients), padding helpers, and the kernel-family switch."""

import logging

import pytest
import torch

from vlm_mamba import ops
from vlm_mamba.ops import cpu_kernels as K
from vlm_mamba.ops import reference as R
from vlm_mamba.ops import torch_ops as T

needs_cpu_kernel = pytest.mark.skipif(
    ops.cpu_unavailable_reason() is not None,
    reason=f"compiled CPU kernel unavailable: {ops.cpu_unavailable_reason()}",
)


def _leaves(*ts):
    return [t.detach().clone().requires_grad_(True) if t is not None else None for t in ts]


def _assert_same_with_grads(f, g, inputs, atol=1e-4, rtol=1e-4):
    """f and g agree on outputs and on gradients of a random projection of every output."""
    a, b = _leaves(*inputs), _leaves(*inputs)
    oa, ob = f(*a), g(*b)
    oa, ob = (oa if isinstance(oa, tuple) else (oa,)), (ob if isinstance(ob, tuple) else (ob,))
    gen = torch.Generator().manual_seed(1)
    weights = [torch.randn(o.shape, generator=gen) for o in oa]
    for x, y in zip(oa, ob):
        torch.testing.assert_close(x, y, atol=atol, rtol=rtol)
    sum((o * w).sum() for o, w in zip(oa, weights)).backward()
    sum((o * w).sum() for o, w in zip(ob, weights)).backward()
    n_grads = 0
    for x, y in zip(a, b):
        if x is None:
            continue
        assert x.grad is not None and y.grad is not None
        torch.testing.assert_close(x.grad, y.grad, atol=atol, rtol=rtol)
        n_grads += 1
    assert n_grads > 0


def _m1_inputs(b=2, e=6, L=11, n=5, groups=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)
    BC = (b, groups, n, L) if groups else (b, n, L)
    return dict(
        u=r(b, e, L), delta=r(b, e, L) * 0.5, A=-torch.rand(e, n, generator=g) * 2 - 0.1, B=r(*BC), C=r(*BC),
        D=r(e), z=r(b, e, L), delta_bias=r(e) * 0.3, initial_state=r(b, e, n),
    )  # fmt: skip


M1_ORDER = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state"]


@pytest.mark.parametrize("groups", [None, 2])
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize(
    "impl",
    [T.selective_scan_loop, T.selective_scan_chunked, lambda *a: T.selective_scan_chunked(*a, chunk=4)],
)
def test_selective_scan_matches_reference(impl, with_state, groups):
    d = _m1_inputs(groups=groups)
    if not with_state:
        d["initial_state"] = None
    inputs = [d[k] for k in M1_ORDER]

    def run(fn):
        return lambda u, dl, A, B, C, D, z, db, h0: fn(u, dl, A, B, C, D, z, db, True, h0, True)

    _assert_same_with_grads(run(impl), run(R.selective_scan_ref), inputs)


@needs_cpu_kernel
@pytest.mark.parametrize(
    "shape",
    [
        dict(e=32, L=11, n=5),
        dict(e=32, L=11, n=5, groups=2),  # 16 channels per group: one vector each
        dict(e=48, L=40, n=8),  # three vectors of channels, a demo-like length
        dict(e=16, L=1, n=3),
        dict(b=3, e=6, L=9, n=4),  # 6 channels: not a multiple of the lanes, runs the PyTorch path
    ],
)
@pytest.mark.parametrize("with_state", [False, True])
def test_compiled_cpu_scan_matches_reference(shape, with_state):
    d = _m1_inputs(**shape)
    if not with_state:
        d["initial_state"] = None
    inputs = [d[k] for k in M1_ORDER]

    def run(fn):
        return lambda u, dl, A, B, C, D, z, db, h0: fn(u, dl, A, B, C, D, z, db, True, h0, True)

    # the last state is returned too, so its gradient (dh_last) flows through the kernel's backward
    _assert_same_with_grads(run(K.selective_scan_cpu), run(R.selective_scan_ref), inputs)


@needs_cpu_kernel
def test_compiled_cpu_scan_edge_cases():
    d = _m1_inputs(e=16, L=6, n=4)
    # no optionals, bf16 in and out (computed in fp32), fp64 (the PyTorch path keeps its precision)
    out = K.selective_scan_cpu(d["u"], d["delta"].abs(), d["A"], d["B"], d["C"])
    torch.testing.assert_close(out, R.selective_scan_ref(d["u"], d["delta"].abs(), d["A"], d["B"], d["C"]))
    bf = K.selective_scan_cpu(d["u"].bfloat16(), d["delta"].abs(), d["A"], d["B"], d["C"])
    assert bf.dtype == torch.bfloat16
    f64 = K.selective_scan_cpu(*(d[k].double() for k in ("u", "delta", "A", "B", "C")), delta_softplus=True)
    assert f64.dtype == torch.float64
    ref64 = R.selective_scan_ref(*(d[k].double() for k in ("u", "delta", "A", "B", "C")), delta_softplus=True)
    torch.testing.assert_close(f64, ref64.to(f64.dtype), atol=1e-5, rtol=1e-5)
    # softplus and the z gate across their whole range: torch's threshold (x > 20 passes through),
    # log1p(exp(x)) for very negative x, saturated sigmoids
    ramp = torch.linspace(-40, 40, 6).expand(2, 16, 6).contiguous()
    small_A = d["A"] * 0.01  # keeps exp(dt A) away from 0 at dt ~ 40, so every step matters
    for args in ((d["u"], ramp, small_A, d["B"], d["C"], d["D"], ramp * 2, None, True),
                 (d["u"], ramp * 0.01, d["A"], d["B"], d["C"], None, None, d["delta_bias"], True)):  # fmt: skip
        torch.testing.assert_close(
            K.selective_scan_cpu(*args), R.selective_scan_ref(*args), rtol=1e-4, atol=1e-4
        )
    # length 0: no output steps, the initial state comes back unchanged
    y, h = K.selective_scan_cpu(
        d["u"][..., :0], d["delta"][..., :0], d["A"], d["B"][..., :0], d["C"][..., :0],
        initial_state=d["initial_state"], return_last_state=True,
    )  # fmt: skip
    assert y.shape == (2, 16, 0) and torch.equal(h, d["initial_state"])
    with pytest.raises(ValueError, match="initial_state has shape"):
        K.selective_scan_cpu(d["u"], d["delta"], d["A"], d["B"], d["C"], initial_state=d["initial_state"][:1])


@needs_cpu_kernel
def test_compiled_cpu_scan_splits_rows_over_threads():
    """The batch rows go to several threads (one dA buffer each): the result is the one-thread result."""
    d = _m1_inputs(b=5, e=32, L=9, n=4)
    inputs = [d[k] for k in M1_ORDER]
    run = lambda u, dl, A, B, C, D, z, db, h0: K.selective_scan_cpu(u, dl, A, B, C, D, z, db, True, h0, True)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert len(K._row_ranges(5)) == 1
        one = _leaves(*inputs)
        y1, h1 = run(*one)
        (y1.sum() + h1.sum()).backward()
        torch.set_num_threads(3)
        assert len(K._row_ranges(5)) == 3
        many = _leaves(*inputs)
        y3, h3 = run(*many)
        (y3.sum() + h3.sum()).backward()
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(y1, y3)
    for a, b in zip(one, many):
        torch.testing.assert_close(a.grad, b.grad)


def test_cpu_kernel_build_is_cached_and_reports_a_missing_compiler(tmp_path, monkeypatch):
    monkeypatch.setenv(K.CACHE_ENV, str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    with pytest.raises(RuntimeError, match="no C compiler found"):
        K.build()
    monkeypatch.delenv("CC")
    if K._compiler() is None:
        pytest.skip("no C compiler on this machine")
    lib = K.build()
    assert lib.parent == tmp_path / "kernels" and lib.exists()
    mtime = lib.stat().st_mtime_ns
    assert K.build() == lib and lib.stat().st_mtime_ns == mtime, "a second build reuses the cached library"
    assert sorted(p.name for p in lib.parent.iterdir()) == [lib.name], "no temporary files left behind"


def test_selective_scan_dispatch_matches_reference_without_optionals():
    d = _m1_inputs(L=7)
    out = ops.selective_scan(d["u"], d["delta"].abs(), d["A"], d["B"], d["C"], kernel="torch")
    ref = R.selective_scan_ref(d["u"], d["delta"].abs(), d["A"], d["B"], d["C"])
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def _ssd_inputs(b=2, L=13, h=4, p=3, g=2, n=5, seed=0, D_dim=1):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen)
    return dict(
        x=r(b, L, h, p), dt=r(b, L, h) * 0.5, A=-torch.rand(h, generator=gen) * 2 - 0.1, B=r(b, L, g, n),
        C=r(b, L, g, n), D=r(h) if D_dim == 1 else r(h, p), z=r(b, L, h, p), initial_states=r(b, h, p, n),
        dt_bias=r(h) * 0.3,
    )  # fmt: skip


SSD_ORDER = ["x", "dt", "A", "B", "C", "D", "z", "initial_states", "dt_bias"]


@pytest.mark.parametrize("cpu_chunk", [4, 64])
@pytest.mark.parametrize("impl", ["loop", "chunked"])
@pytest.mark.parametrize("D_dim", [1, 2])
def test_ssd_matches_reference(impl, cpu_chunk, D_dim, monkeypatch):
    monkeypatch.setattr(T, "SSD_CPU_CHUNK", cpu_chunk)
    fn = {"loop": T.ssd_loop, "chunked": T.ssd_chunked}[impl]
    d = _ssd_inputs(D_dim=D_dim)

    def run(f):
        return lambda x, dt, A, B, C, D, z, s0, db: f(x, dt, A, B, C, 8, D, z, s0, True, db, True)

    _assert_same_with_grads(run(fn), run(R.ssd_chunk_scan_ref), [d[k] for k in SSD_ORDER])


def test_ssd_reference_equals_mamba1_reference_with_scalar_heads():
    """Two references written independently agree: SSD with one channel per head (p=1, g=h) is the
    Mamba-1 scan with A constant over the state dimension."""
    d = _ssd_inputs(p=1, g=4, h=4)
    y2, s2 = R.ssd_chunk_scan_ref(
        d["x"],
        d["dt"],
        d["A"],
        d["B"],
        d["C"],
        8,
        d["D"],
        None,
        d["initial_states"],
        True,
        d["dt_bias"],
        True,
    )
    n = d["B"].shape[-1]
    y1, s1 = R.selective_scan_ref(
        d["x"][..., 0].transpose(1, 2), d["dt"].transpose(1, 2), d["A"][:, None].expand(4, n),
        d["B"].permute(0, 2, 3, 1), d["C"].permute(0, 2, 3, 1), d["D"], None, d["dt_bias"], True,
        d["initial_states"][:, :, 0], True,
    )  # fmt: skip
    torch.testing.assert_close(y1, y2[..., 0].transpose(1, 2), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s1, s2[:, :, 0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("with_state", [False, True])
def test_causal_conv1d_matches_reference(k, with_state):
    g = torch.Generator().manual_seed(0)
    x, w, bias = (
        torch.randn(2, 5, 9, generator=g),
        torch.randn(5, k, generator=g),
        torch.randn(5, generator=g),
    )
    init = torch.randn(2, 5, k - 1, generator=g) if with_state else None

    def run(f):
        return lambda x, w, bias, init: f(x, w, bias, init, True, "silu")

    _assert_same_with_grads(run(T.causal_conv1d_torch), run(R.causal_conv1d_ref), [x, w, bias, init])
    # the channels-last twin (the CPU kernel's mixer path): (b,l,e) in and out, the same numbers
    last = lambda x, w, bias, init: T.causal_conv1d_channels_last(x.transpose(1, 2), w, bias, init).transpose(
        1, 2
    )
    ref = lambda x, w, bias, init: R.causal_conv1d_ref(x, w, bias, init)
    _assert_same_with_grads(last, ref, [x, w, bias, init])


def test_conv_is_causal_and_continues_from_its_final_state():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(1, 3, 10, generator=g), torch.randn(3, 4, generator=g)
    full, _ = T.causal_conv1d_torch(x, w, return_final_states=True)
    first, st = T.causal_conv1d_torch(x[..., :6], w, return_final_states=True)
    second = T.causal_conv1d_torch(x[..., 6:], w, initial_states=st)
    torch.testing.assert_close(torch.cat([first, second], -1), full)
    y, st2 = T.causal_conv1d_update_torch(x[..., 6], st, w)
    torch.testing.assert_close(y, full[..., 6])
    torch.testing.assert_close(st2, x[..., 4:7])
    x2 = x.clone()
    x2[..., 7:] += 1.0  # the future does not change the past
    torch.testing.assert_close(T.causal_conv1d_torch(x2, w)[..., :7], full[..., :7])


def test_selective_state_update_is_one_scan_step():
    d = _m1_inputs(L=1)
    y, s = R.selective_scan_ref(
        d["u"],
        d["delta"],
        d["A"],
        d["B"],
        d["C"],
        d["D"],
        d["z"],
        d["delta_bias"],
        True,
        d["initial_state"],
        True,
    )
    h0 = d["initial_state"].clone()
    y1, s1 = ops.selective_state_update(
        h0, d["u"][..., 0], d["delta"][..., 0], d["A"], d["B"][..., 0], d["C"][..., 0], d["D"], d["z"][..., 0],
        d["delta_bias"], True, kernel="torch",
    )  # fmt: skip
    torch.testing.assert_close(y1, y[..., 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s1, s, atol=1e-5, rtol=1e-5)
    assert torch.equal(h0, d["initial_state"]), "the state passed in was modified"


def test_selective_state_update_heads_is_one_ssd_step():
    d = _ssd_inputs(L=1)
    h, p, n = 4, 3, 5
    y, s = R.ssd_chunk_scan_ref(
        d["x"],
        d["dt"],
        d["A"],
        d["B"],
        d["C"],
        8,
        d["D"],
        d["z"],
        d["initial_states"],
        True,
        d["dt_bias"],
        True,
    )
    y1, s1 = ops.selective_state_update(
        d["initial_states"], d["x"][:, 0], d["dt"][:, 0, :, None].expand(-1, h, p),
        d["A"][:, None, None].expand(h, p, n), d["B"][:, 0], d["C"][:, 0], d["D"][:, None].expand(h, p),
        d["z"][:, 0], d["dt_bias"][:, None].expand(h, p), True, kernel="torch",
    )  # fmt: skip
    torch.testing.assert_close(y1, y[:, 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s1, s, atol=1e-5, rtol=1e-5)


def test_compact_by_mask_round_trip_and_conv_window():
    mask = torch.tensor(
        [[0, 0, 1, 1, 1], [1, 0, 1, 0, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.bool
    )
    order, inverse, lengths = ops.compact_by_mask(mask)
    assert lengths.tolist() == [3, 3, 5, 0]
    pos = torch.arange(5).expand(4, 5)
    packed = pos.gather(1, order)
    assert packed[0, :3].tolist() == [2, 3, 4] and packed[1, :3].tolist() == [0, 2, 4]
    assert torch.equal(packed.gather(1, inverse), pos)
    # conv window after the real tokens: last k-1 of [init, real...]
    x = packed.float()[:, None, :]  # (b,1,l): values are original positions
    init = torch.full((4, 1, 3), -1.0)
    win = ops.conv_window(x, init, lengths, 4)
    assert win[0, 0].tolist() == [2, 3, 4]
    assert win[1, 0].tolist() == [0, 2, 4]
    assert win[3, 0].tolist() == [-1, -1, -1]  # nothing real: the initial window stays


def test_kernel_family_env_override_and_logging(monkeypatch, caplog):
    ops._resolve.cache_clear()
    monkeypatch.setenv(ops.KERNEL_ENV, "ref")
    with caplog.at_level(logging.INFO, logger="vlm_mamba.ops"):
        assert ops.kernel_family("auto", "cpu") == "ref"
        assert ops.kernel_family("auto", "cpu") == "ref"
        assert ops.kernel_family("torch", "cpu") == "torch"  # an explicit argument wins over the env
    assert sum("'ref'" in r.getMessage() for r in caplog.records) == 1, "the choice is logged once"
    monkeypatch.setenv(ops.KERNEL_ENV, "fast")
    with pytest.raises(ValueError, match="VLM_MAMBA_KERNEL"):
        ops.kernel_family("auto", "cpu")
    monkeypatch.delenv(ops.KERNEL_ENV)
    with pytest.raises(ValueError, match="kernel="):
        ops.kernel_family("triton", "cpu")
    ops._resolve.cache_clear()


def test_auto_on_cpu_uses_the_compiled_kernel_or_says_why_not(monkeypatch, caplog):
    ops._resolve.cache_clear()
    monkeypatch.delenv(ops.KERNEL_ENV, raising=False)
    reason = ops.cpu_unavailable_reason()
    assert ops.kernel_family("auto", "cpu") == ("cpu" if reason is None else "torch")
    # a machine without a working build: auto falls back to PyTorch and logs why; forcing it raises
    ops._resolve.cache_clear()
    with monkeypatch.context() as mp:
        mp.setattr(ops, "cpu_unavailable_reason", lambda: "RuntimeError: no C compiler found")
        with caplog.at_level(logging.INFO, logger="vlm_mamba.ops"):
            assert ops.kernel_family("auto", "cpu") == "torch"
        assert any("no C compiler found" in r.getMessage() for r in caplog.records)
        with pytest.raises(
            RuntimeError, match="forces the compiled CPU kernel, but it cannot be used: .*compiler"
        ):
            ops.kernel_family("cpu", "cpu")
    ops._resolve.cache_clear()
    if reason is None:  # the dispatcher routes the Mamba-1 scan to the kernel, the other ops to PyTorch
        calls = []
        real = K.selective_scan_cpu
        monkeypatch.setattr(K, "selective_scan_cpu", lambda *a: calls.append(1) or real(*a))
        d = _m1_inputs(e=16, L=3)
        ops.selective_scan(d["u"], d["delta"], d["A"], d["B"], d["C"], kernel="cpu")
        assert calls == [1]
        w = torch.randn(16, 4, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(ops.causal_conv1d(d["u"], w, kernel="cpu"), R.causal_conv1d_ref(d["u"], w))


def test_kernel_env_ref_routes_ops_to_reference(monkeypatch):
    ops._resolve.cache_clear()
    monkeypatch.setenv(ops.KERNEL_ENV, "ref")
    calls = []
    real = R.selective_scan_ref
    monkeypatch.setattr(R, "selective_scan_ref", lambda *a: calls.append(1) or real(*a))
    d = _m1_inputs(L=3)
    ops.selective_scan(d["u"], d["delta"], d["A"], d["B"], d["C"])
    assert calls == [1]
    ops._resolve.cache_clear()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_forced_cuda_without_kernels_raises_with_reason():
    ops._resolve.cache_clear()
    with pytest.raises(RuntimeError, match="forces the CUDA kernels, but they cannot be used: .+"):
        ops.kernel_family("cuda", "cpu")
    d = _m1_inputs(L=3)
    with pytest.raises(RuntimeError, match="cuda"):
        ops.selective_scan(d["u"], d["delta"], d["A"], d["B"], d["C"], kernel="cuda")


@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("residual_in_fp32", [False, True])
def test_add_rms_norm_twin_is_add_then_norm(with_residual, residual_in_fp32):
    """The unfused twin of mamba_ssm's rms_norm_fn(prenorm=True) is exactly the add, then RMSNorm."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 8, generator=g).to(torch.bfloat16)
    res = torch.randn(2, 5, 8, generator=g) if with_residual else None
    w = torch.rand(8, generator=g) + 0.5
    for kernel in ("torch", "ref"):
        out, new_res = ops.add_rms_norm(x, res, w, 1e-5, residual_in_fp32, kernel=kernel)
        want_res = x if res is None else res + x
        xf = want_res.float()
        want = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5) * w
        assert torch.equal(out, want) and out.dtype == torch.float32
        assert torch.equal(new_res, want_res.float() if residual_in_fp32 else want_res)
        assert new_res.dtype == (torch.float32 if residual_in_fp32 or with_residual else torch.bfloat16)
        alone = ops.add_rms_norm(x, res, w, 1e-5, residual_in_fp32, prenorm=False, kernel=kernel)
        assert torch.equal(alone, out)


def test_gated_norm_dispatch_equals_reference():
    g = torch.Generator().manual_seed(0)
    x, z, w = torch.randn(3, 12, generator=g), torch.randn(3, 12, generator=g), torch.rand(12, generator=g)
    for before in (False, True):
        want = R.rms_norm_gated_ref(x, w, z, 1e-6, 4, before)
        torch.testing.assert_close(ops.rms_norm_gated(x, w, z, 1e-6, 4, before, kernel="torch"), want)
        xs = x.reshape(3, 3, 4)  # three groups of four channels
        manual = xs * (1 if before else torch.nn.functional.silu(z).reshape(3, 3, 4))
        manual = (manual * torch.rsqrt(manual.pow(2).mean(-1, keepdim=True) + 1e-6)).reshape(3, 12) * w
        if before:
            manual = manual * torch.nn.functional.silu(z)
        torch.testing.assert_close(want, manual)


@pytest.mark.parametrize("length", [0, 2, 3, 9])
def test_conv_window_equals_the_last_columns_of_initial_then_input(length):
    """Every mix of initial window and real inputs: rows shorter than k-1 keep part of the initial
    window; the reference concatenates the whole sequence and slices."""
    g = torch.Generator().manual_seed(length)
    b, e, k = 5, 3, 4
    x = torch.randn(b, e, length, generator=g)
    init = torch.randn(b, e, k - 1, generator=g)
    lengths = torch.randint(0, length + 1, (b,), generator=g)
    for initial in (init, None):
        win = ops.conv_window(x, initial, lengths, k)
        full = torch.cat([initial if initial is not None else torch.zeros(b, e, k - 1), x], dim=-1)
        for i, n in enumerate(lengths.tolist()):
            assert torch.equal(win[i], full[i, :, n : n + k - 1]), (i, n)

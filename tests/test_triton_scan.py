"""The Triton kernel for Mamba-1's scan from an initial state (ops.triton_scan) against its plain
twin, on the CPU through Triton's interpreter. TRITON_INTERPRET=1 must be set before triton is
first imported, so the cases run in a child process (``_triton_scan_cases.py``) and report back;
the GPU run of the kernel inside the model is in tests/test_gpu_prefill.py."""

from pathlib import Path

import pytest

from tests.triton_interpret import run_interpreted

pytest.importorskip("triton")

CASES = Path(__file__).with_name("_triton_scan_cases.py")


@pytest.fixture(scope="module")
def results() -> dict:
    return run_interpreted(CASES)


@pytest.mark.parametrize("gate", [True, False])
@pytest.mark.parametrize("softplus", [True, False])
def test_kernel_equals_the_plain_twin_per_element(results, gate, softplus):
    out = results[f"twin gate={gate} softplus={softplus}"]
    assert out["y_err"] <= 2e-6 * max(1.0, out["y_scale"]), out
    assert out["last_err"] <= 2e-6 * max(1.0, out["last_scale"]), out


@pytest.mark.parametrize("cutoff", ["default", "none"])
def test_skipping_decayed_h0_terms_keeps_the_result(results, cutoff):
    """add_initial_state skips a block's term once exp(A c) < exp(-cutoff) in all its channels
    (channels ordered by decay): with the default cutoff the output equals the plain twin as tightly
    as with every term computed; the last state is always complete."""
    out = results[f"cutoff {cutoff}"]
    assert out["y_err"] <= 2e-6 * max(1.0, out["y_scale"]), out
    assert out["last_err"] <= 2e-6 * max(1.0, out["last_scale"]), out


def test_a_loose_cutoff_shows_the_skip_is_taken(results):
    """Cutoff 1 (terms dropped below e^-1 of their size): an error of the order of the h0 term itself,
    which the default's agreement above would hide if the skip never ran."""
    out = results["cutoff 1"]
    assert out["y_err"] > 1e-3 * out["h0_term"] > 0, out
    assert out["last_err"] <= 2e-6 * max(1.0, out["last_scale"]), out


def test_trailing_pads_leave_the_last_state_of_the_real_tokens(results):
    assert results["pads"]["last_err"] <= 1e-6, results["pads"]


def test_bf16_inputs_fp32_accumulation(results):
    out = results["bf16"]
    assert out["dtype"] == "torch.bfloat16" and out["y_err"] <= 1e-2 * max(1.0, out["y_scale"]), out


@pytest.mark.parametrize("case", ["gate=True D=True", "gate=False D=False"])
def test_one_pass_scan_from_a_state_equals_the_reference_scan(results, case):
    """selective_scan_from_state (the state in registers, an associative scan per time block)
    against the sequential reference, pads included, per element; the last state too."""
    out = results[f"one pass {case}"]
    assert out["y_err"] <= 2e-6 * max(1.0, out["y_scale"]), out
    assert out["last_err"] <= 2e-6 * max(1.0, out["last_scale"]), out


def test_one_pass_scan_in_bf16_keeps_fp32_state(results):
    out = results["one pass bf16"]
    assert out["dtype"] == "torch.bfloat16" and out["y_err"] <= 1e-2 * max(1.0, out["y_scale"]), out
    assert out["last_err"] <= 1e-4 * max(1.0, out["last_scale"]), out


@pytest.mark.parametrize("case", ["gate=True D=True", "gate=False D=False", "bf16"])
def test_step_at_a_time_scan_from_a_state_equals_the_reference_scan(results, case):
    """The sequential kernel (short prompts: one step at a time, the state in registers) against the
    reference scan, trailing pads included, per element; y and the last state."""
    out = results[f"sequential {case}"]
    bf16 = case == "bf16"
    assert out["y_err"] <= (1e-2 if bf16 else 2e-6) * max(1.0, out["y_scale"]), out
    assert out["last_err"] <= (1e-4 if bf16 else 2e-6) * max(1.0, out["last_scale"]), out


def test_a_short_prompt_takes_the_sequential_kernel_with_the_same_result(results):
    out = results["sequential default for 12 tokens"]
    assert out["auto_vs_block_err"] <= 1e-2 * max(1.0, out["scale"]), out


@pytest.mark.parametrize(
    "case", ["k=4 L=12 torch.float32", "k=4 L=2 torch.float32", "k=2 L=12 torch.bfloat16"]
)
def test_short_prompt_conv_from_a_window_equals_its_twin_and_ops_conv(results, case):
    """ops.triton_conv (a prompt from a cached conv window, one program per row and channel block)
    against its twin and ops.causal_conv1d's torch path with initial_states, per element; a prompt
    shorter than the window included."""
    out = results[f"short conv {case}"]
    assert out["dtype"] == case.split()[-1], out
    tol = (1e-5 if "float32" in case else 2e-2) * max(1.0, out["scale"])
    assert out["err"] <= tol and out["twin_err"] <= tol, out


def test_rejects_what_it_cannot_do(results):
    assert "power of two" in results["errors"]["n=6"]
    assert "(b, n, l)" in results["errors"]["grouped C"]


def test_state_scan_form_one_pass_for_short_eager_prefills_and_the_override(monkeypatch):
    from vlm_mamba.ops import triton_scan as T

    monkeypatch.delenv(T.STATE_SCAN_ENV, raising=False)
    assert T.state_scan_form(1, T.ONE_PASS_MAX_TOKENS) == "one_pass"
    assert T.state_scan_form(8, T.ONE_PASS_MAX_TOKENS // 8 + 1) == "two_pass"
    for value, form in (
        ("two_pass", "two_pass"),
        ("ONE_PASS", "one_pass"),
        ("triton", "one_pass"),
        ("prefix", "prefix"),
    ):
        monkeypatch.setenv(T.STATE_SCAN_ENV, value)
        assert T.state_scan_form(64, 4096) == form and T.state_scan_form(1, 16) == form
    monkeypatch.setenv(T.STATE_SCAN_ENV, "fast")
    with pytest.raises(ValueError, match="VLM_MAMBA_STATE_SCAN='fast'"):
        T.state_scan_form(1, 16)
    # while a CUDA graph is being captured, "auto" takes the form with less device time; a forced
    # form stays forced
    monkeypatch.setattr(T.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(T.torch.cuda, "is_current_stream_capturing", lambda: True)
    monkeypatch.delenv(T.STATE_SCAN_ENV)
    assert T.state_scan_form(1, T.SEQUENTIAL_MAX_LENGTH + 1) == "two_pass"
    # a prompt up to SEQUENTIAL_MAX_LENGTH tokens takes the step-at-a-time kernel, captured or not
    assert T.state_scan_form(160, T.SEQUENTIAL_MAX_LENGTH) == "one_pass"
    monkeypatch.setenv(T.STATE_SCAN_ENV, "one_pass")
    assert T.state_scan_form(1, 4096) == "one_pass"
    monkeypatch.setenv(T.STATE_SCAN_ENV, "two_pass")
    assert T.state_scan_form(160, 16) == "two_pass"


def test_state_scan_form_takes_the_cuda_scan_where_it_serves(monkeypatch):
    """With the CUDA scan from a state available, "auto" takes it above SEQUENTIAL_MAX_LENGTH tokens,
    eager or captured; "cuda" forced without it falls back to auto's choice; other forms stay forced."""
    from vlm_mamba.ops import triton_scan as T

    monkeypatch.delenv(T.STATE_SCAN_ENV, raising=False)
    L = T.SEQUENTIAL_MAX_LENGTH
    assert T.state_scan_form(8, 4096, cuda_kernel=True) == "cuda"
    assert T.state_scan_form(1, L + 1, cuda_kernel=True) == "cuda"
    assert T.state_scan_form(160, L, cuda_kernel=True) == "one_pass"  # the step-at-a-time kernel
    monkeypatch.setenv(T.STATE_SCAN_ENV, "cuda")
    assert T.state_scan_form(8, 4096, cuda_kernel=True) == "cuda"
    assert T.state_scan_form(8, 4096) == "two_pass" and T.state_scan_form(1, 1024) == "one_pass"
    monkeypatch.setenv(T.STATE_SCAN_ENV, "two_pass")
    assert T.state_scan_form(8, 4096, cuda_kernel=True) == "two_pass"
    monkeypatch.setattr(T.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(T.torch.cuda, "is_current_stream_capturing", lambda: True)
    monkeypatch.delenv(T.STATE_SCAN_ENV)
    assert T.state_scan_form(1, L + 1, cuda_kernel=True) == "cuda"


def test_cuda_scan_state_says_why_it_cannot_serve_and_ships_its_sources(monkeypatch):
    """Without CUDA the kernel is not built and says why; its sources are where the build reads
    them and in the package data; the argument check turns away what the kernel does not take."""
    import tomllib
    import torch

    from vlm_mamba.ops import cuda_scan_state as K

    monkeypatch.setattr(K, "_module", None)
    monkeypatch.setattr(K, "_reason", None)
    monkeypatch.setattr(K.torch.cuda, "is_available", lambda: False)
    assert K.load() is None and "is_available() is False" in K.unavailable_reason()
    for f in K.SOURCES + K.HEADERS:
        assert (K.CSRC / f).is_file(), f
    data = tomllib.loads((K.CSRC.parents[2] / "pyproject.toml").read_text())
    globs = data["tool"]["setuptools"]["package-data"]["vlm_mamba"]
    assert all(any(Path("ops/csrc", f).match(g) for g in globs) for f in K.SOURCES + K.HEADERS)
    assert K._name().startswith("vlm_mamba_scan_state_")
    u, A, B = torch.zeros(1, 4, 8), torch.zeros(4, 16), torch.zeros(1, 16, 8)
    assert not K.applies(u, u, A, B, B, None)  # a CPU tensor
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    assert K.applies(u, u, A, B, B, u) and K.applies(
        u.bfloat16(), u.bfloat16(), A, B.bfloat16(), B.bfloat16(), None
    )
    assert not K.applies(u.half(), u.half(), A, B.half(), B.half(), None)  # fp16: the Triton forms
    assert not K.applies(u, u, A, B[:, None], B[:, None], None)  # grouped (b, g, n, l) B and C
    assert not K.applies(u, u, torch.zeros(4, 512), B, B, None)  # d_state above 256
    assert not K.applies(u, u.bfloat16(), A, B, B, None)  # mixed dtypes


def test_short_scan_switch_reads_its_variable(monkeypatch):
    """VLM_MAMBA_SHORT_SCAN: auto (unset) from SHORT_SCAN_MIN_BATCH rows and up to
    SHORT_SCAN_MAX_LENGTH tokens, on at any batch, off never; a bad value names the variable."""
    from vlm_mamba.ops import triton_scan as TS

    monkeypatch.delenv(TS.SHORT_SCAN_ENV, raising=False)
    n, L = TS.SHORT_SCAN_MIN_BATCH, TS.SHORT_SCAN_MAX_LENGTH
    assert TS.short_scan_applies(n, L) and not TS.short_scan_applies(n - 1, L)
    assert not TS.short_scan_applies(n, L + 1)
    monkeypatch.setenv(TS.SHORT_SCAN_ENV, "on")
    assert TS.short_scan_applies(1, L) and not TS.short_scan_applies(1, L + 1)
    monkeypatch.setenv(TS.SHORT_SCAN_ENV, "0")
    assert not TS.short_scan_applies(4 * n, 16)
    monkeypatch.setenv(TS.SHORT_SCAN_ENV, "fast")
    with pytest.raises(ValueError, match=TS.SHORT_SCAN_ENV):
        TS.short_scan_applies(n, 16)


def test_decay_order_is_kept_per_layer_and_follows_its_parameters():
    """triton_scan.decay_order: channels by slowest decay (min_n |A_n| x softplus(bias)), a
    permutation; the same tensor on the next call, updated in place (not replaced: a captured graph
    reads it) when A_log or the bias changes."""
    import torch
    import torch.nn.functional as F

    from vlm_mamba.ops import triton_scan as T

    g = torch.Generator().manual_seed(0)
    A_log = torch.nn.Parameter(torch.randn(24, 4, generator=g))
    bias = torch.nn.Parameter(torch.randn(24, generator=g))

    def expected():
        rate = torch.exp(A_log.detach()).amin(1) * F.softplus(bias.detach())
        return torch.argsort(rate).to(torch.int32)

    first = T.decay_order(A_log, bias)
    assert first.dtype == torch.int32 and torch.equal(
        first.sort().values, torch.arange(24, dtype=torch.int32)
    )
    assert torch.equal(first, expected())
    assert T.decay_order(A_log, bias) is first
    with torch.no_grad():
        bias.mul_(-3.0)  # a new order
    again = T.decay_order(A_log, bias)
    assert (
        again is first and torch.equal(again, expected()) and not torch.equal(again, torch.sort(again).values)
    )
    with torch.no_grad():
        A_log.add_(torch.randn(24, 4, generator=g))
    assert T.decay_order(A_log, bias) is first and torch.equal(first, expected())


def test_short_conv_writes_into_a_given_output_view(results):
    """causal_conv1d_short(out=): the k-1 outputs that read the window written into the first
    columns of a longer prompt's output, the other columns left alone (ops.cuda.causal_conv1d)."""
    out = results["short conv out="]
    assert out["err"] <= 1e-5 and out["untouched"], out

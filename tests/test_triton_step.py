"""The fused Mamba-1 decode step (dt_proj folded into the state update, ops.triton_step) against its
plain twin and the unfused step, on the CPU through Triton's interpreter (a child process: the
interpreter is chosen before triton is imported). The kernel inside the captured decode graph on a
GPU: tests/test_gpu_decoding.py."""

from pathlib import Path

import pytest

from tests.triton_interpret import run_interpreted

pytest.importorskip("triton")

CASES = Path(__file__).with_name("_triton_step_cases.py")


@pytest.fixture(scope="module")
def results() -> dict:
    return run_interpreted(CASES)


@pytest.mark.parametrize("gate", [True, False])
@pytest.mark.parametrize("d", [True, False])
def test_kernel_equals_the_plain_twin_per_element(results, gate, d):
    out = results[f"twin gate={gate} D={d}"]
    assert out["y_err"] <= 2e-6 * max(1.0, out["y_scale"]), out
    assert out["state_err"] <= 2e-6 * max(1.0, out["state_scale"]), out


def test_twin_equals_the_unfused_step(results):
    out = results["twin_vs_unfused"]
    assert out["y_err"] <= 1e-5 * max(1.0, out["y_scale"]) and out["state_err"] <= 1e-5, out


def test_bf16_activations_fp32_state(results):
    out = results["bf16"]
    assert out["dtype"] == "torch.bfloat16"
    assert out["y_err"] <= 1e-2 * max(1.0, out["y_scale"]) and out["state_err"] <= 1e-5, out


def test_a_state_size_that_is_not_a_power_of_two_is_refused(results):
    assert "power-of-two state size, got d_state=12" in results["n12"]


@pytest.mark.parametrize("res", [True, False])
@pytest.mark.parametrize("dtype", ["torch.float32", "torch.bfloat16"])
def test_add_norm_linear_equals_its_twin_and_the_unfused_ops(results, res, dtype):
    out = results[f"norm_linear res={res} {dtype}"]
    assert out["dtype"] == dtype
    fp32 = dtype == "torch.float32"
    assert out["y_err"] <= (2e-5 if fp32 else 2e-2) * max(1.0, out["y_scale"]), (
        out
    )  # bf16: one rounding apart
    assert out["res_err"] <= 1e-6 and out["res_unfused_err"] <= 1e-6, out
    assert out["unfused_err"] <= (2e-5 if fp32 else 2e-2) * max(1.0, out["y_scale"]), out


@pytest.mark.parametrize("conv", ["k=4 bias=True", "k=2 bias=False"])
@pytest.mark.parametrize("dtype", ["torch.float32", "torch.bfloat16"])
def test_add_norm_linear_with_the_conv_step_equals_its_twin_and_the_unfused_ops(results, conv, dtype):
    """The conv's one-token step in in_proj's epilogue (x half only, the block straddling x / z
    included): outputs and the conv state updated in place, against the twin and against add + norm,
    in_proj and ops.causal_conv1d_update_ run apart (the torch conv rounds to bf16 per op: looser)."""
    out = results[f"norm_linear_conv {conv} {dtype}"]
    assert out["dtype"] == dtype and out["state_moved"] > 0, out
    fp32 = dtype == "torch.float32"
    assert out["y_err"] <= (2e-5 if fp32 else 2e-2) * max(1.0, out["y_scale"]), out
    # the state's newest slot is in_proj's x, one rounding of a differently summed product apart
    assert out["state_err"] <= (2e-5 if fp32 else 2e-2) * max(1.0, out["y_scale"]), out
    assert out["state_unfused_err"] <= (2e-5 if fp32 else 2e-2) * max(1.0, out["y_scale"]), out
    assert out["unfused_err"] <= (2e-5 if fp32 else 6e-2) * max(1.0, out["y_scale"]), out


@pytest.mark.parametrize("dtype", ["torch.float32", "torch.bfloat16"])
def test_the_conv_step_at_an_offset_serves_mamba2s_in_proj_layout(results, dtype):
    """Mamba-2's in_proj writes z, then x B C (the conv's channels), then dt: with conv_offset = e the
    conv step takes the middle outputs only (z and dt pass through as in_proj wrote them), against the
    twin and the unfused ops, the conv state updated in place."""
    out = results[f"norm_linear_conv offset {dtype}"]
    assert out["dtype"] == dtype and out["state_moved"] > 0, out
    fp32 = dtype == "torch.float32"
    tol = (2e-5 if fp32 else 2e-2) * max(1.0, out["y_scale"])
    assert out["y_err"] <= tol and out["state_err"] <= tol and out["state_unfused_err"] <= tol, out
    assert out["z_dt_err"] <= tol, out
    assert out["unfused_err"] <= (2e-5 if fp32 else 6e-2) * max(1.0, out["y_scale"]), out


def test_a_conv_offset_past_in_projs_outputs_is_refused(results):
    assert (
        "offset" in results["conv_offset_past_end"]
        and "in_proj outputs 63" in results["conv_offset_past_end"]
    )


@pytest.mark.parametrize(
    "case",
    [
        "z=True before=False torch.float32->torch.float32",
        "z=True before=True torch.float32->torch.float32",
        "z=False before=False torch.float32->torch.float32",
        "z=True before=False torch.bfloat16->torch.bfloat16",
        "z=True before=False torch.float32->torch.bfloat16",
    ],
)
def test_gated_norm_out_proj_equals_its_twin_and_the_unfused_ops(results, case):
    """Mamba-2's gated RMSNorm and out_proj in one kernel against its twin and against
    ops.rms_norm_gated's torch twin followed by F.linear, per element (bf16: a rounding apart)."""
    out = results[f"gated_norm_linear {case}"]
    assert out["dtype"] == case.split("->")[1], out
    fp32 = case.endswith("torch.float32")
    assert out["err"] <= (2e-5 if fp32 else 2e-2) * max(1.0, out["scale"]), out
    assert out["unfused_err"] <= (2e-5 if fp32 else 2e-2) * max(1.0, out["scale"]), out


@pytest.mark.parametrize("dtype", ["torch.float32", "torch.bfloat16"])
def test_x_proj_folded_into_in_proj_and_the_state_update_equals_the_unfused_step(results, dtype):
    """x_proj without a launch of its own: the in_proj kernel's programs write x_proj's partial products
    over their conv channels (8 blocks over 60 channels, the last straddling x / z), the state update
    sums them. From the kernel's own in_proj + conv outputs, y and the state equal x_proj and the
    state update run apart (bf16: y's one rounding; the state in fp32); against the twins' in_proj
    outputs, the partials, their sum, y and the state agree to the bf16 rounding of in_proj's x and
    z (a flipped last bit of x moves dt through x_proj and dt_proj)."""
    out = results[f"xproj fold {dtype}"]
    assert out["parts"] == [2, 8, 14], out
    fp32 = dtype == "torch.float32"
    assert out["own_y_err"] <= (2e-6 if fp32 else 5e-3) * max(1.0, out["y_scale"]), out
    assert out["own_state_err"] <= 2e-6 * max(1.0, out["state_scale"]), out
    tol = 2e-5 if fp32 else 5e-2
    assert out["part_err"] <= tol * max(1.0, out["part_scale"]), out
    assert out["sum_err"] <= tol * max(1.0, out["sum_scale"]), out
    assert out["y_err"] <= tol * max(1.0, out["y_scale"]), out
    assert out["state_err"] <= tol * max(1.0, out["state_scale"]), out


def test_x_proj_partials_need_the_conv_step(results):
    assert "x_proj's partial products need the conv step" in results["xproj without conv"]

"""Shared by the GPU test files: the device, the kernel families compared, per-element tolerances.

``close(a, b, rtol, atol)`` is ``torch.testing.assert_close`` with ``atol`` in units of b's RMS:
every element must satisfy |a - b| <= atol * rms(b) + rtol * |b|, so one tolerance fits tensors of
any magnitude (gradients of a parameter summed over a batch, logits) while no element can be far
off (a max|a - b| / max|b| check lets small entries be wrong by 100%). When ``VLM_MAMBA_TOL_LOG``
names a file, each check appends what it needed (the smallest atol at its rtol) as a JSON line:
the record the tolerances here were chosen from.

``VLM_MAMBA_GPU_DRY=1`` runs the GPU tests' own logic on the CPU, the ``torch`` family against
``ref`` instead of ``cuda`` against ``torch`` (a check of the tests, not of the kernels).
"""

from __future__ import annotations

import json
import os

import torch

DRY = os.environ.get("VLM_MAMBA_GPU_DRY") == "1"
DEV = "cpu" if DRY else "cuda"
FAST, PLAIN = ("torch", "ref") if DRY else ("cuda", "torch")


def kernels_missing() -> bool:
    from vlm_mamba import ops

    return not DRY and (not torch.cuda.is_available() or ops.cuda_unavailable_reason() is not None)


def needed_atol(a: torch.Tensor, b: torch.Tensor, rtol: float) -> float:
    """The smallest atol (in units of rms(b)) for which ``close(a, b, rtol, atol)`` passes."""
    a, b = a.detach().float(), b.detach().float()
    scale = b.square().mean().sqrt().clamp_min(1e-12).item()
    return max(((a - b).abs() - rtol * b.abs()).max().item(), 0.0) / scale if a.numel() else 0.0


def close(a: torch.Tensor, b: torch.Tensor, rtol: float, atol: float, what: str = "") -> None:
    """Per element: |a - b| <= atol * rms(b) + rtol * |b| (see the top)."""
    a, b = a.detach().float(), b.detach().float()
    assert a.shape == b.shape, f"{what}: shapes {tuple(a.shape)} vs {tuple(b.shape)}"
    scale = b.square().mean().sqrt().clamp_min(1e-12).item()
    need = needed_atol(a, b, rtol)
    log = os.environ.get("VLM_MAMBA_TOL_LOG")
    if log:
        test = os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0]
        with open(log, "a") as f:
            f.write(json.dumps({"test": test, "what": what, "rtol": rtol, "atol": atol, "need": need}) + "\n")
    torch.testing.assert_close(
        a, b, rtol=rtol, atol=atol * scale, msg=lambda m: f"{what}: needs atol {need:.2e} x rms\n{m}"
    )

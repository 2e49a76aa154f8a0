"""RMSNorm and the gated, grouped RMSNorm of Mamba-2.

Both compute in fp32 and return the input's dtype (mamba_ssm's ``RMSNorm`` / ``RMSNormGated`` and
transformers' ``MambaRMSNorm`` / ``MambaRMSNormGated`` do the same), so bf16 activations keep a
stable statistic. The math is ``vlm_mamba.ops``' (``reference.rms_norm_ref``; the gated norm goes
through ``ops.rms_norm_gated``, mamba_ssm's triton kernel on CUDA). A block's norm is fused with its
residual add by ``Block`` (``ops.add_rms_norm``), which reads ``weight`` and ``eps`` from here.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vlm_mamba import ops
from vlm_mamba.ops.reference import rms_norm_ref


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight (Zhang & Sennrich 2019), over the last dim."""

    def __init__(self, d: int, eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d, device=device, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm_ref(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class RMSNormGated(nn.Module):
    """Mamba-2's output norm: RMSNorm over groups of ``group_size`` channels, gated by silu(z).

    ``norm_before_gate=False`` (mamba_ssm's default): norm(x * silu(z)) * weight; True:
    norm(x) * weight * silu(z). ``group_size`` = d_inner / ngroups in mamba_ssm's ``Mamba2``.
    """

    def __init__(
        self, d: int, eps: float = 1e-5, group_size: int | None = None, norm_before_gate: bool = False,
        kernel: str = "auto", device=None, dtype=None,
    ):  # fmt: skip
        super().__init__()
        self.eps, self.kernel = eps, kernel
        self.group_size = group_size or d
        if d % self.group_size:
            raise ValueError(f"RMSNormGated: group_size={self.group_size} must divide d={d}")
        self.norm_before_gate = norm_before_gate
        self.weight = nn.Parameter(torch.ones(d, device=device, dtype=dtype))

    def forward(self, x: Tensor, z: Tensor | None = None) -> Tensor:
        """x, z (..., d) -> (..., d) in x's dtype."""
        return ops.rms_norm_gated(
            x, self.weight, z, self.eps, self.group_size, self.norm_before_gate, kernel=self.kernel
        )

    def extra_repr(self) -> str:
        return (
            f"{self.weight.shape[0]}, eps={self.eps}, group_size={self.group_size}, "
            f"norm_before_gate={self.norm_before_gate}"
        )

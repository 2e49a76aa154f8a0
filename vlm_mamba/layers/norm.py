"""RMSNorm and the gated, grouped RMSNorm of Mamba-2.

Both compute in fp32 and return the input's dtype (mamba_ssm's ``RMSNorm`` / ``RMSNormGated`` and
transformers' ``MambaRMSNorm`` / ``MambaRMSNormGated`` do the same), so bf16 activations keep a
stable statistic.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight (Zhang & Sennrich 2019), over the last dim."""

    def __init__(self, d: int, eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d, device=device, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class RMSNormGated(nn.Module):
    """Mamba-2's output norm: RMSNorm over groups of ``group_size`` channels, gated by silu(z).

    ``norm_before_gate=False`` (mamba_ssm's default): norm(x * silu(z)) * weight; True:
    norm(x) * weight * silu(z). ``group_size`` = d_inner / ngroups in mamba_ssm's ``Mamba2``.
    """

    def __init__(
        self, d: int, eps: float = 1e-5, group_size: int | None = None, norm_before_gate: bool = False,
        device=None, dtype=None,
    ):  # fmt: skip
        super().__init__()
        self.eps = eps
        self.group_size = group_size or d
        if d % self.group_size:
            raise ValueError(f"RMSNormGated: group_size={self.group_size} must divide d={d}")
        self.norm_before_gate = norm_before_gate
        self.weight = nn.Parameter(torch.ones(d, device=device, dtype=dtype))

    def forward(self, x: Tensor, z: Tensor | None = None) -> Tensor:
        xf = x.float()
        if z is not None and not self.norm_before_gate:
            xf = xf * F.silu(z.float())
        xg = xf.unflatten(-1, (-1, self.group_size))  # (..., groups, group_size)
        y = (xg * torch.rsqrt(xg.pow(2).mean(-1, keepdim=True) + self.eps)).flatten(-2) * self.weight.float()
        if z is not None and self.norm_before_gate:
            y = y * F.silu(z.float())
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"{self.weight.shape[0]}, eps={self.eps}, group_size={self.group_size}, "
            f"norm_before_gate={self.norm_before_gate}"
        )

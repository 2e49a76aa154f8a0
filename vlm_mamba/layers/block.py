"""Pre-norm residual block: x + mixer(norm(x)), the unit every Mamba stack repeats.

mamba_ssm's ``Block`` carries the residual separately to fuse add+norm; without that kernel the
plain form below computes the same thing (transformers' ``MambaBlock`` does likewise).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vlm_mamba.layers.norm import RMSNorm
from vlm_mamba.layers.state import MixerState


class Block(nn.Module):
    """x (b,l,d) -> x + mixer(norm(x)). With ``residual_in_fp32`` the residual stream (and so the
    output) is fp32 whatever the activations' dtype, as in mamba_ssm, so bf16 rounding errors do not
    accumulate over layers.

    Args: d_model; mixer: a module with ``forward(x, mask, state, return_state)``, ``step`` and
    ``allocate_state`` (``MambaMixer``, ``Mamba2Mixer``); norm_cls: called as ``norm_cls(d_model)``.
    """

    def __init__(self, d_model: int, mixer: nn.Module, norm_cls=RMSNorm, residual_in_fp32: bool = True):
        super().__init__()
        self.residual_in_fp32 = residual_in_fp32
        self.norm = norm_cls(d_model)
        self.mixer = mixer

    def _residual(self, x: Tensor) -> Tensor:
        return x.float() if self.residual_in_fp32 else x

    def forward(
        self,
        x: Tensor,
        mask: Tensor | None = None,
        state: MixerState | None = None,
        return_state: bool = False,
    ):
        """x (b,l,d) -> y (b,l,d) [, MixerState]; mask/state/return_state as the mixer's forward."""
        out = self.mixer(
            self.norm(x.to(self.norm.weight.dtype)), mask=mask, state=state, return_state=return_state
        )
        if return_state:
            y, new_state = out
            return self._residual(x) + y, new_state
        return self._residual(x) + out

    def step(self, x: Tensor, state: MixerState, mask: Tensor | None = None) -> tuple[Tensor, MixerState]:
        """One token: x (b,d) -> (y (b,d), new MixerState)."""
        y, new_state = self.mixer.step(self.norm(x.to(self.norm.weight.dtype)), state, mask=mask)
        return self._residual(x) + y, new_state

    def allocate_state(self, batch: int, dtype: torch.dtype | None = None, device=None) -> MixerState:
        return self.mixer.allocate_state(batch, dtype=dtype, device=device)

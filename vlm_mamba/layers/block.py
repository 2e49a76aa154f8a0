"""Pre-norm residual block: x + mixer(norm(x)), the unit every Mamba stack repeats.

``forward`` takes and returns the residual stream x. ``forward_carry`` is mamba_ssm ``Block``'s
form, which a stack of blocks uses: the residual travels beside the mixer's output, so the add that
closes block i and the norm that opens block i+1 are one op (``ops.add_rms_norm``: mamba_ssm's
triton ``rms_norm_fn`` on CUDA, one read of each input and one write of each output; the plain add
then norm elsewhere, which computes exactly what ``forward`` did before the fusion).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vlm_mamba import ops
from vlm_mamba.layers.norm import RMSNorm
from vlm_mamba.layers.state import MixerState


class Block(nn.Module):
    """x (b,l,d) -> x + mixer(norm(x)). With ``residual_in_fp32`` the residual stream (and so the
    output) is fp32 whatever the activations' dtype, as in mamba_ssm, so bf16 rounding errors do not
    accumulate over layers.

    Args: d_model; mixer: a module with ``forward(x, mask, state, return_state)``, ``step`` and
    ``allocate_state`` (``MambaMixer``, ``Mamba2Mixer``); norm_cls: called as ``norm_cls(d_model)``;
    kernel: the family for the fused add + norm (default: the mixer's ``kernel``).
    """

    def __init__(
        self,
        d_model: int,
        mixer: nn.Module,
        norm_cls=RMSNorm,
        residual_in_fp32: bool = True,
        kernel: str | None = None,
    ):
        super().__init__()
        self.residual_in_fp32 = residual_in_fp32
        self.norm = norm_cls(d_model)
        self.mixer = mixer
        self.kernel = kernel if kernel is not None else getattr(mixer, "kernel", "auto")

    def _residual(self, x: Tensor) -> Tensor:
        return x.float() if self.residual_in_fp32 else x

    def add_norm(self, hidden: Tensor, residual: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """residual <- hidden + residual (hidden alone when None); returns (norm(residual), residual)."""
        if isinstance(self.norm, RMSNorm):
            return ops.add_rms_norm(
                hidden, residual, self.norm.weight, self.norm.eps, self.residual_in_fp32, kernel=self.kernel
            )
        res = hidden if residual is None else residual + hidden
        return self.norm(res.to(self.norm.weight.dtype)), self._residual(res)

    def forward_carry(
        self,
        hidden: Tensor,
        residual: Tensor | None = None,
        lengths: Tensor | None = None,
        state: MixerState | None = None,
        return_state: bool = False,
    ):
        """mamba_ssm ``Block.forward``: (hidden, residual) -> (mixer(norm(hidden + residual)), hidden +
        residual) [, MixerState]. The first block gets the embeddings and residual None.

        ``lengths`` (b,): the rows are compacted (real tokens first, pads trailing; see
        ``vlm_mamba.ops.padding``) and a returned state stops after ``lengths`` tokens.
        """
        normed, residual = self.add_norm(hidden, residual)
        kw = {} if lengths is None else {"lengths": lengths}
        out = self.mixer(normed, state=state, return_state=return_state, **kw)
        if return_state:
            y, new_state = out
            return y, residual, new_state
        return out, residual

    def forward(
        self,
        x: Tensor,
        mask: Tensor | None = None,
        state: MixerState | None = None,
        return_state: bool = False,
    ):
        """x (b,l,d) -> y (b,l,d) [, MixerState]; mask/state/return_state as the mixer's forward."""
        normed, residual = self.add_norm(x)
        out = self.mixer(normed, mask=mask, state=state, return_state=return_state)
        if return_state:
            y, new_state = out
            return residual + y, new_state
        return residual + out

    def step_(self, x: Tensor, state: MixerState, A: Tensor | None = None) -> Tensor:
        """One token, ``state`` updated in place (``mixer.step_``): x (b,d) -> y (b,d)."""
        return self._residual(x) + self.mixer.step_(self.norm(x.to(self.norm.weight.dtype)), state, A)

    def step(self, x: Tensor, state: MixerState, mask: Tensor | None = None) -> tuple[Tensor, MixerState]:
        """One token: x (b,d) -> (y (b,d), new MixerState)."""
        y, new_state = self.mixer.step(self.norm(x.to(self.norm.weight.dtype)), state, mask=mask)
        return self._residual(x) + y, new_state

    def allocate_state(self, batch: int, dtype: torch.dtype | None = None, device=None) -> MixerState:
        return self.mixer.allocate_state(batch, dtype=dtype, device=device)

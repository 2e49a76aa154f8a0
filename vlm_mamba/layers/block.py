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
            normed, residual = ops.add_rms_norm(
                hidden, residual, self.norm.weight, self.norm.eps, self.residual_in_fp32, kernel=self.kernel
            )
            w = self.norm.weight.dtype
            if normed.dtype != w and not torch.is_autocast_enabled(normed.device.type):
                # the kernel writes in hidden's dtype: an fp32 residual stream (``forward``'s input after
                # the first block) into bf16 weights must reach the mixer in the weights' dtype
                normed = normed.to(w)
            return normed, residual
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

    def step_carry_(
        self, hidden: Tensor, residual: Tensor | None, state: MixerState, A: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """One token in :meth:`forward_carry`'s form, ``state`` updated in place (``mixer.step_``):
        (hidden (b,d), residual) -> (mixer output, hidden + residual). The add that closes the previous
        block and this block's norm are one kernel, as in mamba_ssm's ``Block.step``. With the fused
        decode step on (``ops.set_fused_step``) and a mixer that allows it, the add, the norm and the
        mixer's in_proj are one kernel (``ops.triton_step.add_rms_norm_linear``)."""
        m = self.mixer
        if isinstance(self.norm, RMSNorm) and hasattr(m, "step_xz_") and m.fused_in_proj_ok(hidden):
            from vlm_mamba.ops import triton_step

            w = m.in_proj.weight
            out_dtype = ops.compute_dtype(w)
            conv = ops.fused_conv_switch()  # the conv step in the same kernel (default on)
            out = triton_step.add_rms_norm_linear(
                hidden, residual, self.norm.weight, self.norm.eps, w, self.residual_in_fp32, out_dtype,
                **m.fused_in_proj_args(state, conv),
            )  # fmt: skip
            xz, residual = out[:2]
            # a third output: x_proj's partial products (Mamba-1, ops.fused_xproj_switch)
            return m.step_xz_(
                xz, state, A, conv_done=conv, **({"partials": out[2]} if len(out) > 2 else {})
            ), residual
        normed, residual = self.add_norm(hidden, residual)
        return m.step_(normed, state, A), residual

    def step_carry(
        self, hidden: Tensor, residual: Tensor | None, state: MixerState, mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor, MixerState]:
        """The functional twin of :meth:`step_carry_`: -> (mixer output, residual, new MixerState);
        rows with ``mask`` (b,) False keep their state."""
        normed, residual = self.add_norm(hidden, residual)
        y, new_state = self.mixer.step(normed, state, mask=mask)
        return y, residual, new_state

    def step(self, x: Tensor, state: MixerState, mask: Tensor | None = None) -> tuple[Tensor, MixerState]:
        """One token in :meth:`forward`'s form: x (b,d) -> (x + mixer(norm(x)), new MixerState)."""
        y, residual, new_state = self.step_carry(x, None, state, mask=mask)
        return residual + y, new_state

    def allocate_state(self, batch: int, dtype: torch.dtype | None = None, device=None) -> MixerState:
        return self.mixer.allocate_state(batch, dtype=dtype, device=device)

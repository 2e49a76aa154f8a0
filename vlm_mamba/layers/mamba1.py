"""Mamba-1 mixer (Gu & Dao 2023, "Mamba", section 3 and Figure 3), twin of mamba_ssm's ``Mamba``.

Parameter names, shapes and initialisation follow ``mamba_ssm.modules.mamba_simple.Mamba``, so its
checkpoints and transformers' ``MambaMixer`` ones load as they are. Kernels come from
``vlm_mamba.ops`` only.

Shapes: ``b`` batch, ``l`` length, ``d`` model width, ``e`` inner width (expand * d), ``n`` state
size, ``k`` conv width, ``r`` dt rank.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlm_mamba import ops
from vlm_mamba.layers.state import MixerState

# The raw dt of a padding position: softplus of it (plus any bias) underflows to exactly 0 in fp32,
# in PyTorch, mamba_ssm's kernels and the compiled CPU kernel alike (finite, so no inf * 0 anywhere).
PAD_DELTA = -1.0e4


def _prepare_mask(mask: Tensor | None, x: Tensor) -> Tensor | None:
    """mask (b,l) -> bool, or None when every position is real (the unmasked fast path)."""
    if mask is None:
        return None
    if mask.shape != x.shape[:2]:
        raise ValueError(
            f"mask has shape {tuple(mask.shape)}, expected (batch, length) = {tuple(x.shape[:2])}"
        )
    mask = mask.to(device=x.device, dtype=torch.bool)
    return None if bool(mask.all()) else mask


def init_dt_bias(n: int, dt_min: float, dt_max: float, dt_init_floor: float, device=None) -> Tensor:
    """Bias such that softplus(bias) is log-uniform in [dt_min, dt_max] (mamba_ssm's dt init)."""
    dt = torch.exp(
        torch.rand(n, device=device) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
    ).clamp(min=dt_init_floor)
    return dt + torch.log(-torch.expm1(-dt))  # inverse of softplus


class MambaMixer(nn.Module):
    """Selective SSM mixer: in_proj -> causal conv -> SiLU -> selective scan (x) gated by SiLU(z) -> out_proj.

    ``forward`` runs a whole sequence (optionally from a state, optionally with padding that acts as
    identity steps); ``step`` one token; both return new states and never touch module attributes.
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | str = "auto",
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init: str = "random",
        dt_scale: float = 1.0,
        dt_init_floor: float = 1e-4,
        conv_bias: bool = True,
        bias: bool = False,
        layer_idx: int | None = None,
        kernel: str = "auto",
        device=None,
        dtype=None,
    ):
        super().__init__()
        fk = {"device": device, "dtype": dtype}
        self.d_model, self.d_state, self.d_conv, self.expand = d_model, d_state, d_conv, expand
        self.d_inner = expand * d_model
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.layer_idx = layer_idx
        self.kernel = kernel

        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias, **fk)
        self.conv1d = nn.Conv1d(
            self.d_inner, self.d_inner, d_conv, groups=self.d_inner, padding=d_conv - 1, bias=conv_bias, **fk
        )
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False, **fk)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True, **fk)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **fk)

        # dt_proj: weights keep the variance of dt at init; bias puts softplus(dt) in [dt_min, dt_max]
        std = self.dt_rank**-0.5 * dt_scale
        with torch.no_grad():
            if dt_init == "constant":
                nn.init.constant_(self.dt_proj.weight, std)
            elif dt_init == "random":
                nn.init.uniform_(self.dt_proj.weight, -std, std)
            else:
                raise ValueError(f"dt_init must be 'random' or 'constant', got {dt_init!r}")
            self.dt_proj.bias.copy_(init_dt_bias(self.d_inner, dt_min, dt_max, dt_init_floor, device))
        self.dt_proj.bias._no_reinit = True  # the LM's init pass leaves it alone (mamba_ssm convention)

        # S4D-real init: A = -(1..n) for every channel, kept as log(-A) in fp32
        A = torch.arange(1, d_state + 1, dtype=torch.float32, device=device).repeat(self.d_inner, 1)  # (e,n)
        self.A_log = nn.Parameter(torch.log(A))
        self.A_log._no_weight_decay = True
        self.D = nn.Parameter(torch.ones(self.d_inner, device=device))
        self.D._no_weight_decay = True

    @classmethod
    def from_config(cls, cfg, layer_idx: int | None = None, device=None, dtype=None) -> MambaMixer:
        """Build from an ``SSMConfig`` (``LanguageConfig`` / ``VisionConfig``)."""
        return cls(
            cfg.d_model, d_state=cfg.d_state, d_conv=cfg.d_conv, expand=cfg.expand, dt_rank=cfg.dt_rank,
            dt_min=cfg.dt_min, dt_max=cfg.dt_max, dt_init_floor=cfg.dt_init_floor, conv_bias=cfg.conv_bias,
            bias=cfg.bias, layer_idx=layer_idx, kernel=cfg.kernel, device=device, dtype=dtype,
        )  # fmt: skip

    def allocate_state(self, batch: int, dtype=None, device=None) -> MixerState:
        """Zero state: conv (b,e,k-1) in ``dtype`` (default: the weights'), ssm (b,e,n) fp32."""
        w = self.in_proj.weight
        device = device if device is not None else w.device
        conv = torch.zeros(batch, self.d_inner, self.d_conv - 1, device=device, dtype=dtype or w.dtype)
        return MixerState(conv, torch.zeros(batch, self.d_inner, self.d_state, device=device))

    def forward(
        self,
        x: Tensor,
        mask: Tensor | None = None,
        state: MixerState | None = None,
        return_state: bool = False,
    ):
        """x (b,l,d) -> y (b,l,d) [, final MixerState]. mask (b,l): True = real, False = identity step."""
        b, L, _ = x.shape
        mask = _prepare_mask(mask, x)
        A = -torch.exp(self.A_log.float())  # (e,n)
        if mask is None and state is None and not return_state and ops.fused_mamba_inner_available(
            self.kernel, x, self.d_conv
        ):  # fmt: skip
            # weights read through the attributes now, so a LoRA wrapper's merged .weight is used
            xz = self.in_proj(x).transpose(1, 2)  # (b,2e,l)
            return ops.mamba_inner(
                xz, self.conv1d.weight, self.conv1d.bias, self.x_proj.weight, self.dt_proj.weight,
                self.out_proj.weight, self.out_proj.bias, A, self.D.float(), self.dt_proj.bias.float(),
            )  # fmt: skip

        if mask is not None:  # real tokens first (see vlm_mamba.ops.padding)
            order, inverse, lengths = ops.compact_by_mask(mask)
            x = x.gather(1, ops.expand_index(order, x))
            valid = torch.arange(L, device=x.device) < lengths[:, None]  # (b,l)
        xi, z = self.in_proj(x).chunk(2, dim=-1)  # (b,l,e) each
        conv_init = state.conv if state is not None else None
        if ops.kernel_family(self.kernel, x.device) == "cpu":
            # the compiled CPU scan reads (b,l,e): keep the channels last throughout, the scan's
            # (b,e,l) arguments below are transposed views of it
            xc = ops.causal_conv1d_channels_last(
                xi, self.conv1d.weight[:, 0], self.conv1d.bias, initial_states=conv_init
            )  # (b,l,e)
            dt, B, C = self.x_proj(xc).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
            delta = F.linear(dt, self.dt_proj.weight)  # (b,l,e), bias added in the scan
            if mask is not None:
                delta = delta.masked_fill(~valid[..., None], PAD_DELTA)
            xc, delta = xc.transpose(1, 2), delta.transpose(1, 2)  # (b,e,l) views
        else:
            xc = ops.causal_conv1d(
                xi.transpose(1, 2), self.conv1d.weight[:, 0], self.conv1d.bias, initial_states=conv_init,
                kernel=self.kernel,
            )  # (b,e,l)  # fmt: skip
            dt, B, C = self.x_proj(xc.transpose(1, 2)).split(
                [self.dt_rank, self.d_state, self.d_state], dim=-1
            )
            delta = self.dt_proj.weight @ dt.transpose(1, 2)  # (e,r) @ (b,r,l) -> (b,e,l), bias added below
            if mask is not None:  # dt = softplus(-1e4 + bias) = 0 exactly at pads: exp(0*A) = 1 and no
                # input, an identity step. Done before the scan so the scan keeps its fused bias + softplus.
                delta = delta.masked_fill(~valid[:, None], PAD_DELTA)
        xi, z = xi.transpose(1, 2), z.transpose(1, 2)  # (b,e,l) views
        y = ops.selective_scan(
            xc, delta, A, B.transpose(1, 2), C.transpose(1, 2), self.D.float(), z, self.dt_proj.bias.float(), True,
            initial_state=state.ssm if state is not None else None, return_last_state=return_state,
            kernel=self.kernel,
        )  # fmt: skip
        if return_state:
            y, ssm = y
        out = self.out_proj(y.transpose(1, 2))  # (b,l,d)
        if mask is not None:
            out = out.gather(1, ops.expand_index(inverse, out))
        if not return_state:
            return out
        lengths = lengths if mask is not None else torch.full((b,), L, device=x.device)
        return out, MixerState(ops.conv_window(xi, conv_init, lengths, self.d_conv), ssm)

    def step(self, x: Tensor, state: MixerState, mask: Tensor | None = None) -> tuple[Tensor, MixerState]:
        """One token: x (b,d) -> (y (b,d), new MixerState). Rows with mask (b,) False keep their state."""
        xi, z = self.in_proj(x).chunk(2, dim=-1)  # (b,e)
        xc, conv = ops.causal_conv1d_update(
            xi, state.conv, self.conv1d.weight[:, 0], self.conv1d.bias, kernel=self.kernel
        )
        dt, B, C = self.x_proj(xc).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.linear(dt, self.dt_proj.weight)  # (b,e), bias added in the update
        A = -torch.exp(self.A_log.float())
        y, ssm = ops.selective_state_update(
            state.ssm,
            xc,
            dt,
            A,
            B,
            C,
            self.D,
            z=z,
            dt_bias=self.dt_proj.bias,
            dt_softplus=True,
            kernel=self.kernel,
        )
        new = MixerState(conv, ssm)
        if mask is not None:
            new = _keep_masked(new, state, mask)
        return self.out_proj(y), new


def _keep_masked(new: MixerState, old: MixerState, mask: Tensor) -> MixerState:
    """Rows where mask (b,) is False keep ``old`` (a pad step is an identity step)."""
    m = mask.to(device=new.ssm.device, dtype=torch.bool)
    conv = torch.where(m[:, None, None], new.conv, old.conv.to(new.conv.dtype))
    ssm = torch.where(m.view(-1, *([1] * (new.ssm.dim() - 1))), new.ssm, old.ssm.to(new.ssm.dtype))
    return MixerState(conv, ssm)

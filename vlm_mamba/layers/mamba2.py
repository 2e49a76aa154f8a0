"""Mamba-2 mixer (Dao & Gu 2024, "Transformers are SSMs", section 7), twin of mamba_ssm's ``Mamba2``.

One in_proj produces z, x, B, C and dt together; a causal conv runs over (x, B, C); the SSD scan has
one scalar decay per head; a gated, grouped RMSNorm and out_proj finish. Parameter names and the
in_proj layout follow ``mamba_ssm.modules.mamba2.Mamba2`` (defaults: ``rmsnorm=True``,
``D_has_hdim=False``, ``d_ssm=d_inner``), which transformers' ``Mamba2Mixer`` shares.

Shapes: ``b`` batch, ``l`` length, ``d`` model width, ``e`` inner width, ``h`` heads, ``p`` head
width, ``g`` groups, ``n`` state size, ``k`` conv width, ``c`` conv channels = e + 2 g n.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vlm_mamba import ops
from vlm_mamba.layers.mamba1 import (
    PAD_DELTA,
    _keep_masked,
    fused_linear_ok,
    init_dt_bias,
    reads_weight_only,
    run_compacted,
)
from vlm_mamba.layers.norm import RMSNormGated
from vlm_mamba.layers.state import MixerState


class Mamba2Mixer(nn.Module):
    """SSD mixer; ``forward`` / ``step`` / ``allocate_state`` as ``MambaMixer``'s."""

    def __init__(
        self,
        d_model: int,
        d_state: int = 128,
        d_conv: int = 4,
        expand: int = 2,
        headdim: int = 64,
        ngroups: int = 1,
        chunk_size: int = 256,
        A_init_range: tuple[float, float] = (1.0, 16.0),
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        conv_bias: bool = True,
        bias: bool = False,
        norm_eps: float = 1e-5,
        norm_before_gate: bool = False,
        layer_idx: int | None = None,
        kernel: str = "auto",
        device=None,
        dtype=None,
    ):
        super().__init__()
        fk = {"device": device, "dtype": dtype}
        self.d_model, self.d_state, self.d_conv, self.expand = d_model, d_state, d_conv, expand
        self.d_inner = expand * d_model
        if self.d_inner % headdim:
            raise ValueError(
                f"Mamba2Mixer: headdim={headdim} must divide d_inner=expand*d_model={self.d_inner}"
            )
        self.headdim, self.nheads = headdim, self.d_inner // headdim
        if self.nheads % ngroups:
            raise ValueError(f"Mamba2Mixer: ngroups={ngroups} must divide nheads={self.nheads}")
        self.ngroups, self.chunk_size = ngroups, chunk_size
        self.layer_idx, self.kernel = layer_idx, kernel
        self.conv_dim = self.d_inner + 2 * ngroups * d_state

        # in_proj output, in order: z (e), x (e), B (g n), C (g n), dt (h)
        self.in_proj = nn.Linear(
            d_model, 2 * self.d_inner + 2 * ngroups * d_state + self.nheads, bias=bias, **fk
        )
        self.conv1d = nn.Conv1d(
            self.conv_dim,
            self.conv_dim,
            d_conv,
            groups=self.conv_dim,
            padding=d_conv - 1,
            bias=conv_bias,
            **fk,
        )
        self.dt_bias = nn.Parameter(init_dt_bias(self.nheads, dt_min, dt_max, dt_init_floor, device))
        self.dt_bias._no_weight_decay = True
        A = torch.empty(self.nheads, dtype=torch.float32, device=device).uniform_(*A_init_range)
        self.A_log = nn.Parameter(torch.log(A))
        self.A_log._no_weight_decay = True
        self.D = nn.Parameter(torch.ones(self.nheads, device=device))
        self.D._no_weight_decay = True
        self.norm = RMSNormGated(
            self.d_inner,
            eps=norm_eps,
            group_size=self.d_inner // ngroups,
            norm_before_gate=norm_before_gate,
            kernel=kernel,
            **fk,
        )
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **fk)

    @classmethod
    def from_config(cls, cfg, layer_idx: int | None = None, device=None, dtype=None) -> Mamba2Mixer:
        """Build from a ``LanguageConfig`` (its Mamba-2 fields: headdim, ngroups, chunk_size, ...)."""
        return cls(
            cfg.d_model, d_state=cfg.d_state, d_conv=cfg.d_conv, expand=cfg.expand, headdim=cfg.headdim,
            ngroups=cfg.ngroups, chunk_size=cfg.chunk_size, dt_min=cfg.dt_min, dt_max=cfg.dt_max,
            dt_init_floor=cfg.dt_init_floor, conv_bias=cfg.conv_bias, bias=cfg.bias, norm_eps=cfg.norm_eps,
            norm_before_gate=cfg.norm_before_gate, layer_idx=layer_idx, kernel=cfg.kernel, device=device,
            dtype=dtype,
        )  # fmt: skip

    def allocate_state(self, batch: int, dtype=None, device=None) -> MixerState:
        """Zero state: conv (b,c,k-1) in ``dtype`` (default: the weights'), ssm (b,h,p,n) fp32."""
        w = self.in_proj.weight
        device = device if device is not None else w.device
        conv = torch.zeros(batch, self.conv_dim, self.d_conv - 1, device=device, dtype=dtype or w.dtype)
        ssm = torch.zeros(batch, self.nheads, self.headdim, self.d_state, device=device)
        return MixerState(conv, ssm)

    def _split(self, zxbcdt: Tensor):
        """(..., 2e + 2gn + h) -> z (..., e), xBC (..., c), dt (..., h)."""
        return zxbcdt.split([self.d_inner, self.conv_dim, self.nheads], dim=-1)

    def forward(
        self,
        x: Tensor,
        mask: Tensor | None = None,
        state: MixerState | None = None,
        return_state: bool = False,
        lengths: Tensor | None = None,
    ):
        """x (b,l,d) -> y (b,l,d) [, final MixerState]. mask (b,l): True = real, False = identity step.

        ``lengths`` (b,) instead of a mask: x is already compacted, as in ``MambaMixer.forward``.
        """
        if mask is None:
            return self._forward(x, lengths, state, return_state)
        if lengths is not None:
            raise ValueError("pass mask or lengths, not both")
        return run_compacted(self._forward, x, mask, state, return_state)

    def _fused_ok(self, x: Tensor) -> bool:
        """mamba_split_conv1d_scan_combined can serve this call (it reads out_proj's and the norm's weight)."""
        return ops.fused_mamba2_available(self.kernel, x, self.d_conv) and reads_weight_only(self.out_proj)

    def _forward(self, x: Tensor, lengths: Tensor | None, state: MixerState | None, return_state: bool):
        """x (b,l,d), padded rows compacted (real before ``lengths``, None = all real)."""
        b, L, _ = x.shape
        h, p, g, n = self.nheads, self.headdim, self.ngroups, self.d_state
        if not return_state:  # trailing pads cannot reach a real position (causal): no masking
            lengths = None
        A = -torch.exp(self.A_log.float())  # (h,)
        zxbcdt = self.in_proj(x)  # (b,l,e+c+h): z (e), xBC (c), dt (h)
        if state is None and not return_state and self._fused_ok(x):
            return ops.mamba_split_conv1d_scan(
                zxbcdt, self.conv1d.weight[:, 0], self.conv1d.bias, self.dt_bias, A, self.D, self.chunk_size,
                self.norm.weight, self.norm.eps, self.out_proj.weight, self.out_proj.bias, p, g,
                self.norm.norm_before_gate,
            )  # fmt: skip
        z, xBC, dt = self._split(zxbcdt)  # (b,l,e) (b,l,c) (b,l,h)
        xBC_in = xBC.transpose(1, 2)  # (b,c,l)
        conv_init = state.conv if state is not None else None
        xBC = ops.causal_conv1d(
            xBC_in, self.conv1d.weight[:, 0], self.conv1d.bias, initial_states=conv_init, kernel=self.kernel
        ).transpose(1, 2)  # (b,l,c)
        xs, B, C = xBC.split([self.d_inner, g * n, g * n], dim=-1)
        if lengths is not None:  # softplus(-1e4 + dt_bias) = 0 at the trailing pads: identity steps,
            # with the bias and softplus left to the scan and dt kept in its dtype
            valid = torch.arange(L, device=x.device) < lengths[:, None]  # (b,l)
            dt = dt.masked_fill(~valid[..., None], PAD_DELTA)
        y = ops.ssd_chunk_scan(
            xs.reshape(b, L, h, p), dt, A, B.reshape(b, L, g, n), C.reshape(b, L, g, n), self.chunk_size,
            D=self.D, z=None, initial_states=state.ssm if state is not None else None,
            return_final_states=return_state, dt_bias=self.dt_bias, dt_softplus=True, kernel=self.kernel,
        )  # fmt: skip
        if return_state:
            y, ssm = y
        out = self.out_proj(self.norm(y.reshape(b, L, self.d_inner), z))  # (b,l,d)
        if not return_state:
            return out
        lengths = lengths if lengths is not None else torch.full((b,), L, device=x.device)
        return out, MixerState(ops.conv_window(xBC_in, conv_init, lengths, self.d_conv), ssm.float())

    def decode_A(self) -> Tensor:
        """A (h,p,n) fp32, per-head scalars broadcast as the one-token step reads them (computed once
        per generation by the decoding cache)."""
        h, p, n = self.nheads, self.headdim, self.d_state
        return (-torch.exp(self.A_log.float()))[:, None, None].expand(h, p, n)

    def step_(self, x: Tensor, state: MixerState, A: Tensor | None = None) -> Tensor:
        """One token with ``state`` updated in place: x (b,d) -> y (b,d) (see ``MambaMixer.step_``)."""
        return self.step_xz_(self.in_proj(x), state, A)

    def fused_in_proj_ok(self, x: Tensor) -> bool:
        """Whether the block may fold its add + norm (and the conv step) into in_proj for a decode step,
        as ``MambaMixer.fused_in_proj_ok``."""
        return fused_linear_ok(self.in_proj, x, self.kernel)

    def fused_in_proj_args(self, state: MixerState, conv: bool) -> dict:
        """``add_rms_norm_linear``'s arguments for this in_proj: 4 outputs and 4 warps a program (on an
        H200 at d 768, n 128: 4.3 us with the conv step against 4.6 with the default 8 x 8 and 6.8 for
        the unfused ops); with ``conv``, the conv step's, whose channels are x, B, C, after z."""
        tiles = dict(block_o=4, num_warps=4)
        if not conv:
            return tiles
        return dict(
            tiles, conv_state=state.conv, conv_weight=self.conv1d.weight[:, 0], conv_bias=self.conv1d.bias,
            conv_offset=self.d_inner,
        )  # fmt: skip

    def _fused_norm_out_ok(self, y: Tensor) -> bool:
        """The gated norm and out_proj as one kernel (``triton_step.rms_norm_gated_linear``): the fused
        step on, a small batch, one norm group, a plain out_proj without bias."""
        return self.ngroups == 1 and fused_linear_ok(self.out_proj, y, self.kernel)

    def step_xz_(
        self, zxbcdt: Tensor, state: MixerState, A: Tensor | None = None, conv_done: bool = False
    ) -> Tensor:
        """:meth:`step_` after in_proj: zxbcdt (b, e+c+h) -> y (b,d), ``state`` updated in place.
        ``conv_done``: the x, B, C part is already the conv's output (``add_rms_norm_linear``)."""
        b = zxbcdt.shape[0]
        h, p, g, n = self.nheads, self.headdim, self.ngroups, self.d_state
        z, xBC, dt = self._split(zxbcdt)  # (b,e) (b,c) (b,h)
        if not conv_done:
            xBC = ops.causal_conv1d_update_(
                xBC, state.conv, self.conv1d.weight[:, 0], self.conv1d.bias, kernel=self.kernel
            )
        xs, B, C = xBC.split([self.d_inner, g * n, g * n], dim=-1)
        y = ops.selective_state_update_(
            state.ssm, xs.reshape(b, h, p), dt[..., None].expand(b, h, p), self.decode_A() if A is None else A,
            B.reshape(b, g, n), C.reshape(b, g, n), D=self.D[:, None].expand(h, p), z=None,
            dt_bias=self.dt_bias[:, None].expand(h, p), dt_softplus=True, kernel=self.kernel,
        ).reshape(b, self.d_inner)  # fmt: skip
        if self._fused_norm_out_ok(y):
            from vlm_mamba.ops import triton_step

            w = self.out_proj.weight
            return triton_step.rms_norm_gated_linear(
                y, z, self.norm.weight, self.norm.eps, w, self.norm.norm_before_gate, ops.compute_dtype(w)
            )
        return self.out_proj(self.norm(y, z))

    def step(self, x: Tensor, state: MixerState, mask: Tensor | None = None) -> tuple[Tensor, MixerState]:
        """One token: x (b,d) -> (y (b,d), new MixerState). Rows with mask (b,) False keep their state."""
        b = x.shape[0]
        h, p, g, n = self.nheads, self.headdim, self.ngroups, self.d_state
        z, xBC, dt = self._split(self.in_proj(x))  # (b,e) (b,c) (b,h)
        xBC, conv = ops.causal_conv1d_update(
            xBC, state.conv, self.conv1d.weight[:, 0], self.conv1d.bias, kernel=self.kernel
        )
        xs, B, C = xBC.split([self.d_inner, g * n, g * n], dim=-1)
        # per-head scalars broadcast over the head width, as mamba_ssm's Mamba2.step does
        A = (-torch.exp(self.A_log.float()))[:, None, None].expand(h, p, n)
        y, ssm = ops.selective_state_update(
            state.ssm, xs.reshape(b, h, p), dt[..., None].expand(b, h, p), A, B.reshape(b, g, n),
            C.reshape(b, g, n), D=self.D[:, None].expand(h, p), z=None,
            dt_bias=self.dt_bias[:, None].expand(h, p), dt_softplus=True, kernel=self.kernel,
        )  # fmt: skip
        new = MixerState(conv, ssm)
        if mask is not None:
            new = _keep_masked(new, state, mask)
        return self.out_proj(self.norm(y.reshape(b, self.d_inner), z)), new

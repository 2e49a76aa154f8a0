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


def check_mask(mask: Tensor, x: Tensor) -> Tensor:
    """mask (b,l), True/1 = real -> bool on x's device (shape checked; no host sync)."""
    if mask.shape != x.shape[:2]:
        raise ValueError(
            f"mask has shape {tuple(mask.shape)}, expected (batch, length) = {tuple(x.shape[:2])}"
        )
    return mask.to(device=x.device, dtype=torch.bool)


def run_compacted(forward, x: Tensor, mask: Tensor, state, return_state: bool):
    """A mixer's forward with padding anywhere as identity steps (``vlm_mamba.ops.padding``): the
    real tokens of each row first, ``forward(x, lengths, state, return_state)`` on those compacted
    rows, the outputs back in their places."""
    order, inverse, lengths = ops.compact_by_mask(check_mask(mask, x))
    out = forward(ops.gather_time(x, order), lengths, state, return_state)
    if return_state:
        return ops.gather_time(out[0], inverse), out[1]
    return ops.gather_time(out, inverse)


# the fused add + norm + in_proj reads W once per row: on an H200 (benchmarks/bench_step_kernels.py)
# 3.9 us against 5.3 us for the norm + cuBLAS at b=1, but 7.4 against 5.3 us at b=8
FUSED_NORM_LINEAR_MAX_BATCH = 1


def fused_linear_ok(layer: nn.Module, x: Tensor, kernel: str) -> bool:
    """Whether a fused decode-step kernel may do ``layer``'s product on ``x`` (b, ...) itself (a norm
    folded in front of it): the fused step switched on, at most FUSED_NORM_LINEAR_MAX_BATCH rows, a
    plain linear without bias (``reads_weight_only``)."""
    return (
        x.shape[0] <= FUSED_NORM_LINEAR_MAX_BATCH
        and layer.bias is None
        and reads_weight_only(layer)
        and ops.fused_step_enabled(x, kernel)
    )


def reads_weight_only(layer: nn.Module) -> bool:
    """Whether ``F.linear(x, layer.weight, layer.bias)`` is what ``layer(x)`` computes.

    Fused kernels read the weight and multiply inside. That is exact for ``nn.Linear`` and for an
    adapter whose ``.weight`` is its effective weight (``layers.lora.LoRALinear``), except while a
    dropout inside it is active: dropout acts on the adapter's input, which a weight cannot express,
    so such a layer must be called (issue 12, item 8: LoRA dropout on x_proj/dt_proj/out_proj).
    """
    if type(layer) is nn.Linear:
        return True
    return not any(isinstance(m, nn.Dropout) and m.training and m.p > 0 for m in layer.modules())


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
        lengths: Tensor | None = None,
    ):
        """x (b,l,d) -> y (b,l,d) [, final MixerState]. mask (b,l): True = real, False = identity step.

        ``lengths`` (b,) instead of a mask: x is already compacted (``LanguageMamba`` does it once
        for all layers), row i real before ``lengths[i]`` and padded after.
        """
        if mask is None:
            return self._forward(x, lengths, state, return_state)
        if lengths is not None:
            raise ValueError("pass mask or lengths, not both")
        return run_compacted(self._forward, x, mask, state, return_state)

    def _fused_ok(self, x: Tensor) -> bool:
        """mamba_inner_fn can serve this call: CUDA kernels, and weights that say what the layers do."""
        return ops.fused_mamba_inner_available(self.kernel, x, self.d_conv) and all(
            reads_weight_only(layer) for layer in (self.x_proj, self.dt_proj, self.out_proj)
        )

    def _short_scan(self, x: Tensor, length: int) -> bool:
        """A forward-only call the step-at-a-time scan serves (``ops.triton_scan.SHORT_SCAN_ENV``:
        short, a large batch) leaves mamba_inner_fn for the split path, whose scan takes that kernel
        (``ops.cuda.selective_scan``)."""
        from vlm_mamba.ops import triton_scan

        return (
            not torch.is_grad_enabled()
            and ops.kernel_family(self.kernel, x.device) == "cuda"
            and triton_scan.short_scan_applies(x.shape[0], length)
        )

    def _xz(self, x: Tensor) -> Tensor:
        """in_proj for mamba_inner_fn: x (b,l,d) -> xz (b,2e,l) with unit stride along l, computed as
        mamba_ssm's ``Mamba.forward`` does (W @ x^T), so the kernel needs no ``.contiguous()`` copy."""
        b, L, d = x.shape
        if not reads_weight_only(self.in_proj):  # an adapter's dropout: its forward must run
            return self.in_proj(x).transpose(1, 2)
        xz = self.in_proj.weight @ x.reshape(b * L, d).t()  # (2e, b*l)
        if self.in_proj.bias is not None:
            xz = xz + self.in_proj.bias.to(xz.dtype)[:, None]
        return xz.view(-1, b, L).transpose(0, 1)  # (b,2e,l)

    def _delta(self, dt: Tensor) -> tuple[Tensor, Tensor | None]:
        """dt (b,l,r) -> (delta (b,l,e) without the bias, the bias for the scan); an adapter with
        active dropout is called instead, bias included (the scan then adds none)."""
        if reads_weight_only(self.dt_proj):
            return F.linear(dt, self.dt_proj.weight), self.dt_proj.bias.float()
        return self.dt_proj(dt), None

    def _delta_channels_first(self, dt: Tensor) -> tuple[Tensor, Tensor | None]:
        """dt (b,l,r) (a view of x_proj's contiguous output) -> (delta (b,e,l), the bias for the
        scan), as the CUDA scan reads it. With a plain dt_proj: (e,r) @ (r, b*l) viewed as (b,e,l),
        mamba_ssm's layout, in memory (e,b,l) like xz; a batched (e,r) @ (b,r,l) came out
        (b,l,e)-major and was copied (measured on an H200), and the scan's output, allocated like
        delta, then cost out_proj a copy too. An adapter with active dropout is called instead."""
        b, L, _ = dt.shape
        if reads_weight_only(self.dt_proj):
            delta = (self.dt_proj.weight @ dt.reshape(b * L, -1).t()).view(-1, b, L).transpose(0, 1)
            return delta, self.dt_proj.bias.float()
        return self.dt_proj(dt).transpose(1, 2), None

    def _forward(self, x: Tensor, lengths: Tensor | None, state: MixerState | None, return_state: bool):
        """x (b,l,d), padded rows compacted (real before ``lengths``, None = all real)."""
        b, L, _ = x.shape
        if not return_state:  # trailing pads cannot reach a real position (causal): no masking
            lengths = None
        A = -torch.exp(self.A_log.float())  # (e,n)
        if state is None and not return_state and self._fused_ok(x) and not self._short_scan(x, L):
            # weights read through the attributes now, so a LoRA wrapper's merged .weight is used
            return ops.mamba_inner(
                self._xz(x), self.conv1d.weight, self.conv1d.bias, self.x_proj.weight, self.dt_proj.weight,
                self.out_proj.weight, self.out_proj.bias, A, self.D.float(), self.dt_proj.bias.float(),
            )  # fmt: skip

        if state is not None and self._state_prefix_ok(x, L):
            return self._forward_state_prefix(x, lengths, state, return_state, A)
        valid = None if lengths is None else torch.arange(L, device=x.device) < lengths[:, None]  # (b,l)
        conv_init = state.conv if state is not None else None
        if ops.kernel_family(self.kernel, x.device) == "cpu":
            # the compiled CPU scan reads (b,l,e): keep the channels last throughout, the scan's
            # (b,e,l) arguments below are transposed views of it
            xi, z = self.in_proj(x).chunk(2, dim=-1)  # (b,l,e) each
            xc = ops.causal_conv1d_channels_last(
                xi, self.conv1d.weight[:, 0], self.conv1d.bias, initial_states=conv_init
            )  # (b,l,e)
            dt, B, C = self.x_proj(xc).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
            delta, delta_bias = self._delta(dt)  # (b,l,e), bias added in the scan
            if valid is not None:
                delta = delta.masked_fill(~valid[..., None], PAD_DELTA)
            xc, delta = xc.transpose(1, 2), delta.transpose(1, 2)  # (b,e,l) views
            xi, z = xi.transpose(1, 2), z.transpose(1, 2)  # (b,e,l) views
        else:
            # (b,e,l) with unit stride along l, as mamba_ssm's Mamba.forward: the conv and the scan
            # read x and z without .contiguous() copies
            xi, z = self._xz(x).chunk(2, dim=1)  # (b,e,l) each
            xc = ops.causal_conv1d(
                xi, self.conv1d.weight[:, 0], self.conv1d.bias, initial_states=conv_init, kernel=self.kernel
            )  # (b,e,l)
            dt, B, C = self.x_proj(xc.transpose(1, 2)).split(
                [self.dt_rank, self.d_state, self.d_state], dim=-1
            )
            delta, delta_bias = self._delta_channels_first(dt)  # (b,e,l)
            if valid is not None:  # dt = softplus(-1e4 + bias) = 0 exactly at pads: exp(0*A) = 1 and no
                # input, an identity step. Done before the scan so the scan keeps its fused bias + softplus.
                # In place on dt_proj's fresh output: the out-of-place masked_fill clones to a contiguous
                # (b,e,l), and the scan's output (laid out like delta) then cost out_proj a copy too (two
                # (b,e,l) copies a layer: 7.6 of 24.7 ms at b=8, 4K, H200, d2f79d7)
                delta.masked_fill_(~valid[:, None], PAD_DELTA)
        order = None
        if state is not None and not torch.is_grad_enabled() and x.is_cuda:
            from vlm_mamba.ops import triton_scan

            order = triton_scan.decay_order(self.A_log, self.dt_proj.bias)  # for the h0 term's skip
        y = ops.selective_scan(
            xc, delta, A, B.transpose(1, 2), C.transpose(1, 2), self.D.float(), z, delta_bias, True,
            initial_state=state.ssm if state is not None else None, return_last_state=return_state,
            kernel=self.kernel, channel_order=order,
        )  # fmt: skip
        if return_state:
            y, ssm = y
        out = self.out_proj(y.transpose(1, 2))  # (b,l,d)
        if not return_state:
            return out
        lengths = lengths if lengths is not None else torch.full((b,), L, device=x.device)
        return out, MixerState(ops.conv_window(xi, conv_init, lengths, self.d_conv), ssm)

    def _state_prefix_ok(self, x: Tensor, length: int) -> bool:
        """Whether a forward from a state takes the state-prefix form (``ops.state_prefix``): CUDA
        kernels, no autograd (the prefix is written in place), bf16/fp32 inputs, the form chosen
        (``VLM_MAMBA_STATE_SCAN=prefix``; opt-in, see ``ops.triton_scan.state_scan_form``)."""
        from vlm_mamba.ops import triton_scan

        if torch.is_grad_enabled() or ops.kernel_family(self.kernel, x.device) != "cuda":
            return False
        dtype = ops.compute_dtype(self.in_proj.weight)
        if dtype not in (torch.float32, torch.bfloat16) or self.d_conv - 1 > 2 * self.d_state:
            return False
        return triton_scan.state_scan_form(x.shape[0], length) == "prefix"

    def _forward_state_prefix(
        self, x: Tensor, lengths: Tensor | None, state: MixerState, return_state: bool, A: Tensor
    ):
        """The forward from ``state`` as a forward from zero over [2n prefix tokens][x]: mamba_ssm's
        scan carries the state on (``ops.state_prefix``: the prefix's inputs rebuild it), its
        outputs are dropped. The prefix is written into the layer's own tensors: x grows by 2n rows
        before in_proj (one (b,l,d) copy), the conv state goes into the k-1 inputs before the
        prompt, the prefix's u / delta / B / z over the conv's, x_proj's and in_proj's outputs."""
        from vlm_mamba.ops import state_prefix

        b, L, _ = x.shape
        V = state_prefix.prefix_length(self.d_state)
        k1 = self.d_conv - 1
        x = F.pad(x, (0, 0, V, 0))  # (b, V+l, d)
        xi, z = self._xz(x).chunk(2, dim=1)  # (b,e,V+l) each, (e,b,l)-major
        if k1:
            xi[:, :, V - k1 : V] = state.conv.to(xi.dtype)  # the conv reads them as the window
        xc = ops.causal_conv1d(xi, self.conv1d.weight[:, 0], self.conv1d.bias, kernel=self.kernel)
        x_dbl = self.x_proj(xc.transpose(1, 2))  # (b, V+l, r+2n)
        dt, B, C = x_dbl.split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta, delta_bias = self._delta_channels_first(dt)  # (b,e,V+l)
        u_v, d_v, B_v = state_prefix.prefix_inputs(state.ssm, A, delta_bias, xc.dtype)
        xc[:, :, :V] = u_v
        delta[:, :, :V] = d_v[:, None]
        B[:, :V] = B_v.to(B.dtype)
        z[:, :, :V] = 0
        n_real = lengths + V if lengths is not None else None
        if n_real is not None:  # trailing pads: identity steps, so the last state is the rows' own
            valid = torch.arange(V + L, device=x.device) < n_real[:, None]
            delta = delta.masked_fill(~valid[:, None], PAD_DELTA)
        y, ssm = ops.selective_scan(
            xc, delta, A, B.transpose(1, 2), C.transpose(1, 2), self.D.float(), z, delta_bias, True,
            return_last_state=True, kernel=self.kernel,
        )  # fmt: skip
        out = self.out_proj(y.transpose(1, 2))[:, V:]  # (b,l,d): the prefix's outputs dropped
        if not return_state:
            return out
        n_real = n_real if n_real is not None else torch.full((b,), V + L, device=x.device)
        return out, MixerState(ops.conv_window(xi, None, n_real, self.d_conv), ssm)

    def decode_A(self) -> Tensor:
        """A = -exp(A_log) (e,n) fp32, as the one-token step reads it (the decoding cache computes it
        once per generation instead of once per token)."""
        return -torch.exp(self.A_log.float())

    def step_(self, x: Tensor, state: MixerState, A: Tensor | None = None) -> Tensor:
        """One token with ``state`` updated in place: x (b,d) -> y (b,d). The graph-capturable twin of
        :meth:`step` (static buffers, the kernels' in-place updates); ``A`` from :meth:`decode_A`."""
        return self.step_xz_(self.in_proj(x), state, A)

    def fused_in_proj_ok(self, x: Tensor) -> bool:
        """Whether the block may fold its add + norm into this mixer's in_proj for a decode step
        (``ops.triton_step.add_rms_norm_linear``): the fused step switched on, a small batch, a plain
        in_proj without bias."""
        return fused_linear_ok(self.in_proj, x, self.kernel)

    def fused_in_proj_args(self, state: MixerState, conv: bool) -> dict:
        """``add_rms_norm_linear``'s arguments for this in_proj: with ``conv``, the conv step's (its
        channels: in_proj's x half). The default tiles (8 outputs, 8 warps) were the fastest at
        o = 2e = 3072 on an H200."""
        if not conv:
            return {}
        args = dict(conv_state=state.conv, conv_weight=self.conv1d.weight[:, 0], conv_bias=self.conv1d.bias)
        if (
            ops.fused_xproj_switch()
            and self.x_proj.bias is None
            and reads_weight_only(self.x_proj)
            and reads_weight_only(self.dt_proj)
            and not self.d_state & (self.d_state - 1)
        ):  # x_proj's partial products too, summed by the fused state update (step_xz_'s partials)
            args["xproj_weight"] = self.x_proj.weight
        return args

    def step_xz_(
        self,
        xz: Tensor,
        state: MixerState,
        A: Tensor | None = None,
        conv_done: bool = False,
        partials: Tensor | None = None,
    ) -> Tensor:
        """:meth:`step_` after in_proj: xz (b,2e) -> y (b,d), ``state`` updated in place.
        ``conv_done``: xz's x half is already the conv's output and ``state.conv`` already updated
        (the conv step in in_proj's kernel, ``ops.fused_conv_switch``); ``partials``: x_proj's partial
        products from that kernel (``ops.fused_xproj_switch``), summed by the fused state update."""
        xi, z = xz.chunk(2, dim=-1)  # (b,e)
        A = self.decode_A() if A is None else A
        if partials is not None:  # x_proj without a launch: the state update sums its partials
            from vlm_mamba.ops import triton_step

            y = triton_step.selective_state_update_dtproj_(
                state.ssm, xi, None, self.dt_proj.weight, self.dt_proj.bias, A, None, None, self.D, z,
                partials=partials,
            )  # fmt: skip
            return self.out_proj(y)
        xc = xi if conv_done else ops.causal_conv1d_update_(
            xi, state.conv, self.conv1d.weight[:, 0], self.conv1d.bias, kernel=self.kernel
        )  # fmt: skip
        dt, B, C = self.x_proj(xc).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        if (
            ops.fused_step_enabled(xc, self.kernel)
            and reads_weight_only(self.dt_proj)
            and not self.d_state & (self.d_state - 1)
        ):  # dt_proj inside the state update: one launch fewer (ops.triton_step)
            from vlm_mamba.ops import triton_step

            y = triton_step.selective_state_update_dtproj_(
                state.ssm, xc, dt, self.dt_proj.weight, self.dt_proj.bias, A, B, C, self.D, z
            )
            return self.out_proj(y)
        dt = F.linear(dt, self.dt_proj.weight)  # (b,e), bias added in the update
        y = ops.selective_state_update_(
            state.ssm, xc, dt, A, B, C, self.D, z=z, dt_bias=self.dt_proj.bias, dt_softplus=True,
            kernel=self.kernel,
        )  # fmt: skip
        return self.out_proj(y)

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

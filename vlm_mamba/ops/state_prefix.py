"""Mamba-1's scan from an initial state as a scan from zero over 2n prefix tokens (forward only).

mamba_ssm's ``selective_scan_fn`` starts from zero. Rather than adding the free evolution of the
state ``h0`` afterwards (``triton_scan.add_initial_state``, which costs a second pass with n
exponentials per element), the state is *written into the sequence*: 2n tokens placed before the
prompt whose inputs rebuild h0 exactly enough, so the zero-state kernel itself carries it on.

With softplus-dt ``dt``, one-hot ``B`` and input ``u``, a token adds ``dt * u`` to one state component
and every later token multiplies it by ``exp(dt' * A)``. Prefix token ``j < n`` writes component j
(the high part, h0 rounded to the input dtype after scaling), token ``n + j`` the remainder (the low
part): after the 2n tokens the state is h0 to ~2^-16 relative in bf16 inputs (fp32 inputs: to fp32
rounding). All prefix tokens share one dt per channel, small enough that the decay over 2n steps
stays above 1/e (so the scaled inputs stay far from overflow), and the kernel's own dt is recomputed
here from the stored delta, exactly as the kernel forms it (delta + bias, softplus). Their outputs
are dropped. The conv state goes into the k-1 inputs just before the prompt, so the conv needs no
initial state either.

``vlm_mamba.layers.mamba1`` builds the prefix in the tensors it already has (the sequence grows by 2n
columns before in_proj: one (b, l, d) copy a layer instead of the h0 pass) when
``VLM_MAMBA_STATE_SCAN=prefix``; the tests check the construction against the reference scan on the
CPU and the model's prefill with it on a GPU. Opt-in because it measured slower than the h0 pass on
an H200 (``ops.triton_scan``'s notes: mamba_ssm's scan works in 2048-token chunks, so 4096 + 32
tokens cost it 2.4x 4096), not because it is less exact.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def prefix_length(d_state: int) -> int:
    """Tokens the state takes: a high and a low part per state component."""
    return 2 * d_state


def prefix_inputs(
    h0: Tensor, A: Tensor, delta_bias: Tensor | None, dtype: torch.dtype
) -> tuple[Tensor, Tensor, Tensor]:
    """The prefix that rebuilds ``h0`` under a scan with ``delta_softplus=True``.

    Args: h0 (b,e,n) fp32; A (e,n) (negative); delta_bias (e,) the bias the scan adds (None: 0);
    dtype: the scan's input dtype (u and delta).
    Returns: u (b,e,2n) and delta (e,) in ``dtype`` (the same delta at every prefix token), and
    B (2n,n) fp32 one-hot (token j writes component j mod n).
    """
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"the state prefix needs fp32 or bf16 inputs (fp16 could overflow), got {dtype}")
    e, n = A.shape
    V = prefix_length(n)
    A = A.float()
    bias = delta_bias.float() if delta_bias is not None else torch.zeros(e, device=A.device)
    target = (1.0 / (A.abs().amax(dim=1).clamp_min(1e-6) * V)).clamp(max=1e-2)  # (e,) dt to aim at
    delta = (torch.log(torch.expm1(target)) - bias).to(dtype)  # softplus^-1, minus what the scan adds
    dt = F.softplus(delta.float() + bias)  # (e,) the dt the scan forms from the stored delta
    k = torch.arange(n, device=A.device, dtype=torch.float32)
    # steps after token j (high part, j < n) and after token n + j (low part) until the prompt
    gain_hi = dt[:, None] * torch.exp(A * dt[:, None] * (V - 1 - k))  # (e,n): what u_hi is multiplied by
    gain_lo = dt[:, None] * torch.exp(A * dt[:, None] * (n - 1 - k))
    h0 = h0.float()
    u_hi = (h0 / gain_hi).to(dtype)
    u_lo = ((h0 - u_hi.float() * gain_hi) / gain_lo).to(dtype)
    B = torch.eye(n, device=A.device).repeat(2, 1)  # (2n, n)
    return torch.cat([u_hi, u_lo], dim=-1), delta, B

"""Linear head + cross-entropy in row chunks: the (rows, vocabulary) logits never exist at once.

A language model's loss is ``CE(h @ W^T, y)``. Done plainly, the logits of every labelled row are
one tensor, in the compute dtype and again in fp32 for the softmax, plus their gradient: at 32K
tokens and a 50K vocabulary that is the largest activation of a training step. This function walks
the rows in chunks and, as liger-kernel's ``LigerFusedLinearCrossEntropyFunction`` does, computes
the gradients of ``h`` and ``W`` in the forward pass, chunk by chunk, so only one chunk's logits are
alive (about ``chunk_rows * V * 4`` bytes); the backward only scales them by the incoming gradient.

The loss is a weighted sum, ``sum_i w_i * CE_i``: ``w_i = 1/N`` is the usual mean over tokens, and
per-row weights express any other reduction (the VLM's per-sequence mean). Logits are taken in the
autocast dtype when autocast is on (bf16 on the GPU, as the plain head would), the softmax in fp32.
``linear_cross_entropy_ref`` is the plain twin the tests compare values and gradients against.
On CUDA (Triton present) each chunk's loss statistics and logits gradient come from one kernel that
works in place on the chunk's logits in the compute dtype (``vlm_mamba.ops.triton_ce``); elsewhere
from the PyTorch ops below.

Shapes: ``m`` labelled rows, ``d`` width, ``V`` vocabulary, ``c`` rows per chunk.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor

from vlm_mamba.ops import triton_ce

CHUNK_BYTES = 256 * 2**20  # fp32 logits of one chunk


def _chunk_rows(vocab: int, rows: int) -> int:
    return max(1, min(rows, CHUNK_BYTES // (4 * vocab)))


def _use_kernel(h: Tensor) -> bool:
    """The Triton chunk kernel serves CUDA tensors (and any device under ``TRITON_INTERPRET=1``)."""
    return triton_ce.available() and (h.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")


def compute_dtype(h: Tensor) -> torch.dtype:
    """The dtype a matmul on ``h`` runs in: autocast's for ``h``'s device where it is on, else h's."""
    if torch.is_autocast_enabled(h.device.type):
        return torch.get_autocast_dtype(h.device.type)
    return h.dtype


class _ChunkedLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: Tensor, w: Tensor, target: Tensor, row_weight: Tensor, chunk: int) -> Tensor:
        m = h.shape[0]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        cdt = compute_dtype(h)
        with torch.autocast(h.device.type, enabled=False):  # dtypes are chosen explicitly below
            wc = w.to(cdt)
            grad_h = torch.empty_like(h) if need_h else None
            grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need_w else None
            loss = torch.zeros((), dtype=torch.float32, device=h.device)
            kernel = _use_kernel(h)
            for s in range(0, m, chunk):
                hc, tc, rw = h[s : s + chunk].to(cdt), target[s : s + chunk], row_weight[s : s + chunk]
                logits = hc @ wc.t()  # (c, V) in the compute dtype
                if kernel:  # lse, the target's logit and (softmax - onehot) * weight in place, one kernel
                    lse, xt = triton_ce.ce_rows_(logits, tc, rw, grad=need_h or need_w)
                    loss += ((lse - xt) * rw).sum()
                    g = logits
                else:
                    logits = logits.float()
                    lse = logits.logsumexp(-1)  # (c,)
                    loss += ((lse - logits.gather(1, tc[:, None])[:, 0]) * rw).sum()
                    if need_h or need_w:  # softmax, in place: d CE / d logits = p - onehot
                        g = logits.sub_(lse[:, None]).exp_()
                        g[torch.arange(g.shape[0], device=g.device), tc] -= 1.0
                        g = g.mul_(rw[:, None]).to(cdt)  # (c, V)
                if not (need_h or need_w):
                    continue
                if need_h:
                    grad_h[s : s + chunk] = (g @ wc).to(h.dtype)
                if need_w:
                    grad_w += (g.t() @ hc).float()
        ctx.save_for_backward(grad_h if need_h else torch.empty(0), grad_w if need_w else torch.empty(0))
        ctx.w_dtype = w.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_out.to(grad_h.dtype) if ctx.needs_input_grad[0] else None
        gw = (grad_w * grad_out).to(ctx.w_dtype) if ctx.needs_input_grad[1] else None
        return gh, gw, None, None, None


def linear_cross_entropy(
    h: Tensor, weight: Tensor, target: Tensor, row_weight: Tensor | None = None, chunk_rows: int | None = None
) -> Tensor:
    """``sum_i row_weight_i * CE(h_i @ weight^T, target_i)`` without materialising all logits.

    Args:
        h: (m, d) hidden states of the labelled rows.
        weight: (V, d) the LM head (slice off padded vocabulary rows first).
        target: (m,) class ids, all valid (select the labelled rows before calling).
        row_weight: (m,) fp32 weights; None = 1/m (the mean over rows).
        chunk_rows: rows per chunk; default so that a chunk's fp32 logits take ~256 MiB.
    Returns:
        the fp32 scalar loss (0 for m = 0, still connected to the graph).
    """
    m = h.shape[0]
    if row_weight is None:
        row_weight = torch.full((m,), 1.0 / max(m, 1), dtype=torch.float32, device=h.device)
    if m == 0:
        return (h.sum() + weight.sum()).float() * 0.0
    chunk = chunk_rows or _chunk_rows(weight.shape[0], m)
    return _ChunkedLinearCE.apply(h, weight, target, row_weight.float(), int(chunk))


def linear_cross_entropy_ref(
    h: Tensor, weight: Tensor, target: Tensor, row_weight: Tensor | None = None
) -> Tensor:
    """The plain twin: all logits at once, then ``F.cross_entropy`` per row, weighted and summed."""
    m = h.shape[0]
    if row_weight is None:
        row_weight = torch.full((m,), 1.0 / max(m, 1), dtype=torch.float32, device=h.device)
    ce = F.cross_entropy(F.linear(h, weight).float(), target, reduction="none")
    return (ce * row_weight.float()).sum()

"""Padding as an identity step: move each row's real tokens to the front, keep their order.

A padded position must change neither the state nor any real output, wherever it falls (left
padding, pads between a cached prefix and a prompt, a fuyu canvas). A stable per-row permutation
puts the real tokens first; ``LanguageMamba`` applies it once per forward, before the first layer,
and its inverse once after the last (every layer in between is per position or causal, so the
permutation commutes with the norms and residual adds), and a mixer called with a mask does the same
around itself. Computed on the device, with no host sync: a batch with no pads gets the identity.

Pads that trail the real tokens cannot change any real position's output (the conv and the scan are
causal), so without a returned state the compacted rows run the unmasked (fused) kernels as they
are. Only a returned state must stop at each row's last real token: there the scan gets dt = 0 at
the trailing pads, which keeps its state (exp(0 * A) = 1, input 0), so the final SSM state is the
one after the last real token, and the final conv window is read at each row's real length.

Shapes: ``b`` batch, ``l`` length, ``e`` channels, ``k`` conv width.
"""

from __future__ import annotations

import torch
from torch import Tensor


def compact_by_mask(mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """mask (b,l) bool, True = real -> (order (b,l), inverse (b,l), lengths (b,)).

    ``x.gather(1, order)`` puts the real tokens first in their original order; gathering the result
    with ``inverse`` restores the original positions.
    """
    if mask.dim() != 2:
        raise ValueError(f"mask must be (batch, length), got shape {tuple(mask.shape)}")
    order = torch.argsort((~mask.bool()).to(torch.int8), dim=1, stable=True)  # (b,l)
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(order)
    inverse = torch.empty_like(order).scatter_(1, order, positions)  # a permutation's inverse, no sort
    return order, inverse, mask.sum(dim=1)


def gather_time(x: Tensor, idx: Tensor) -> Tensor:
    """x (b,l,...) reordered along time by idx (b,l): out[i, t] = x[i, idx[i, t]]."""
    return x.gather(1, expand_index(idx, x))


def previous_real(mask: Tensor) -> Tensor:
    """mask (b,l) -> (b,l): the index of the last real position strictly before each one, -1 if none.

    The position that predicts token t in a causal model: t-1 unless pads sit in between. A pad must
    never predict, since after compaction it runs after the row's real tokens and has read them all.
    """
    pos = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last_at_or_before = torch.where(mask.bool(), pos, -1).cummax(dim=1).values  # (b,l)
    return torch.nn.functional.pad(last_at_or_before[:, :-1], (1, 0), value=-1)


def expand_index(idx: Tensor, x: Tensor) -> Tensor:
    """idx (b,l) -> (b,l,*x.shape[2:]) for ``x.gather(1, ...)`` on a (b,l,...) tensor."""
    return idx.view(*idx.shape, *([1] * (x.dim() - 2))).expand(*idx.shape, *x.shape[2:])


def conv_window(x: Tensor, initial_states: Tensor | None, lengths: Tensor, width: int) -> Tensor:
    """The conv state after each row's real tokens: the last k-1 inputs among [initial, x[:length]].

    Reads only those k-1 columns (a gather from x, the rest from the initial window), so a prefill's
    final conv state costs (b,e,k-1), not a copy of the whole (b,e,l) input.

    Args: x (b,e,l) conv input with real tokens first; initial_states (b,e,k-1) or None (zeros);
    lengths (b,); width k. Returns (b,e,k-1).
    """
    b, e, L = x.shape
    k1 = width - 1
    pos = lengths[:, None] - k1 + torch.arange(k1, device=x.device)  # (b,k-1) positions in x; < 0: initial
    from_x = (
        x.gather(2, pos.clamp(0, max(L - 1, 0))[:, None, :].expand(b, e, k1)) if L else x.new_zeros(b, e, k1)
    )
    init = initial_states.to(x.dtype) if initial_states is not None else x.new_zeros(b, e, k1)
    from_init = init.gather(2, (pos + k1).clamp(0, k1 - 1)[:, None, :].expand(b, e, k1))
    return torch.where((pos >= 0)[:, None, :], from_x, from_init)

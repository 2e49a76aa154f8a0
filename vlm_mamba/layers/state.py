"""Recurrent state of the mixers: a small typed value, never a module attribute.

``MixerState`` holds one layer's conv window and SSM state; ``InferenceState`` one per layer. Both
are plain dataclasses whose methods return new objects, so a cached prefix state (an image, say)
can be forked over prompts or beams without copying by hand.

Shapes: ``b`` batch, ``c`` conv channels (Mamba-1: e; Mamba-2: e + 2 g n), ``k`` conv width,
``e`` inner width, ``n`` state size, ``h`` heads, ``p`` head width.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class MixerState:
    """conv: (b,c,k-1) the last k-1 conv inputs; ssm: (b,e,n) Mamba-1 or (b,h,p,n) Mamba-2 (fp32)."""

    conv: Tensor
    ssm: Tensor

    @property
    def batch_size(self) -> int:
        return self.ssm.shape[0]

    def index_select(self, idx: Tensor) -> MixerState:
        """Rows ``idx`` (reorder, drop or repeat rows, e.g. beam search)."""
        idx = idx.to(self.ssm.device)
        return MixerState(self.conv.index_select(0, idx), self.ssm.index_select(0, idx))

    def repeat_interleave(self, n: int) -> MixerState:
        """Each row ``n`` times in a row: (b,...) -> (b*n,...)."""
        return MixerState(self.conv.repeat_interleave(n, dim=0), self.ssm.repeat_interleave(n, dim=0))

    def clone(self) -> MixerState:
        return MixerState(self.conv.clone(), self.ssm.clone())

    def to(self, *args, **kwargs) -> MixerState:
        """Like ``Tensor.to``; a dtype applies to the conv window only (the SSM state stays fp32)."""
        conv = self.conv.to(*args, **kwargs)
        return MixerState(conv, self.ssm.to(device=conv.device))

    def detach(self) -> MixerState:
        return MixerState(self.conv.detach(), self.ssm.detach())

    @staticmethod
    def cat(states: list[MixerState]) -> MixerState:
        """Stack the rows of several states (same layer shapes) into one batch."""
        return MixerState(torch.cat([s.conv for s in states]), torch.cat([s.ssm for s in states]))


@dataclass
class InferenceState:
    """One ``MixerState`` per layer, in layer order."""

    layers: list[MixerState] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, i: int) -> MixerState:
        return self.layers[i]

    def __iter__(self) -> Iterator[MixerState]:
        return iter(self.layers)

    @property
    def batch_size(self) -> int:
        return self.layers[0].batch_size

    def index_select(self, idx: Tensor) -> InferenceState:
        return InferenceState([s.index_select(idx) for s in self.layers])

    def repeat_interleave(self, n: int) -> InferenceState:
        return InferenceState([s.repeat_interleave(n) for s in self.layers])

    def clone(self) -> InferenceState:
        return InferenceState([s.clone() for s in self.layers])

    def to(self, *args, **kwargs) -> InferenceState:
        return InferenceState([s.to(*args, **kwargs) for s in self.layers])

    def detach(self) -> InferenceState:
        return InferenceState([s.detach() for s in self.layers])

    @staticmethod
    def cat(states: list[InferenceState]) -> InferenceState:
        return InferenceState(
            [MixerState.cat(list(per_layer)) for per_layer in zip(*[s.layers for s in states])]
        )

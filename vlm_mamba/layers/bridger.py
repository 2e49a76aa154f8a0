"""BridgerFFN: the vision-to-language bridge.

``Linear(d_vis -> expansion_factor * d_bridge) -> GELU -> Linear(-> d_lang)`` (+ RMSNorm), the
two-layer MLP projector of LLaVA-1.5 (Liu et al. 2023, sec. 3) that the seed calls BridgerFFN.
``d_bridge`` is ``BridgerConfig.d_model`` and defaults to the language width.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import VLMambaConfig
from .norm import RMSNorm


class BridgerFFN(nn.Module):
    """Maps vision features to language-model embeddings.

    Args:
        d_in: vision width.
        d_hidden: ``expansion_factor * BridgerConfig.d_model``.
        d_out: language width.
    """

    def __init__(
        self,
        d_in: int,
        d_hidden: int,
        d_out: int,
        norm: bool = True,
        dropout: float = 0.0,
        eps: float = 1e-5,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.fc1 = nn.Linear(d_in, d_hidden, **factory)
        self.act = nn.GELU()
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(d_hidden, d_out, **factory)
        self.norm = RMSNorm(d_out, eps=eps, **factory) if norm else nn.Identity()

    @classmethod
    def from_config(cls, cfg: VLMambaConfig, device=None, dtype=None) -> BridgerFFN:
        return cls(
            cfg.vision.d_model,
            cfg.bridger_hidden,
            cfg.language.d_model,
            norm=cfg.bridger.norm,
            dropout=cfg.bridger.dropout,
            eps=cfg.language.norm_eps,
            device=device,
            dtype=dtype,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(b, p, d_vis) -> (b, p, d_lang)."""
        return self.norm(self.fc2(self.drop(self.act(self.fc1(x)))))

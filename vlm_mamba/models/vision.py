"""VisionMamba: a Vim-style encoder (Zhu et al. 2024, "Vision Mamba", sec. 3.3).

Glossary: ``b`` batch, ``p`` patches (r rows x q columns), ``d`` vision width.

Patches -> learned position embedding (bicubically resized for other image sizes) -> residual
blocks whose mixer reads the patch sequence in both directions -> final RMSNorm. A causal scan
alone would let the first patches see nothing of the image; the backward scan gives every patch
the whole image, as Vim's bidirectional block does (its ``if_divide_out``: the mean of the two
directions).
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import VisionConfig
from ..layers import Block, MambaMixer, RMSNorm
from ..layers.patch_embed import PatchEmbed, interpolate_pos_embed


class BidirectionalMixer(nn.Module):
    """Two Mamba-1 mixers, one over the sequence and one over its reverse; outputs averaged.

    ``mask`` (b, p) bool marks real tokens; reversing a left-aligned padded sequence would put
    the pads first, which the mixers treat as identity steps, so masking stays exact.
    """

    def __init__(self, cfg: VisionConfig, layer_idx: int) -> None:
        super().__init__()
        self.fwd = MambaMixer.from_config(cfg, layer_idx=layer_idx)
        self.bwd = MambaMixer.from_config(cfg, layer_idx=layer_idx)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, **_) -> torch.Tensor:
        rev = None if mask is None else mask.flip(1)
        y_f = self.fwd(x, mask=mask)
        y_b = self.bwd(x.flip(1), mask=rev).flip(1)
        return 0.5 * (y_f + y_b)


class VisionMamba(nn.Module):
    """Mamba image encoder: (b, 3, H, W) -> (b, p, d) features, p = (H/s)(W/s)."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_chans, cfg.d_model, cfg.conv_stem)
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_patches, cfg.d_model))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        layers = []
        for i in range(cfg.n_layers):
            if cfg.scan == "bidirectional":
                mixer = BidirectionalMixer(cfg, layer_idx=i)
            else:
                mixer = MambaMixer.from_config(cfg, layer_idx=i)
            layers.append(Block(cfg.d_model, mixer, partial(RMSNorm, eps=cfg.norm_eps), cfg.residual_in_fp32))
        self.layers = nn.ModuleList(layers)
        self.norm_f = RMSNorm(cfg.d_model, eps=cfg.norm_eps)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x, grid = self.patch_embed(images)  # (b, p, d)
        x = x + interpolate_pos_embed(self.pos_embed, self.cfg.grid_size, grid).to(x.dtype)
        for layer in self.layers:
            if self.cfg.gradient_checkpointing and self.training:
                x = checkpoint(layer, x, use_reentrant=False)
            else:
                x = layer(x)
        return self.norm_f(x.to(self.norm_f.weight.dtype))

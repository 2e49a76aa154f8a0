"""Image to token sequences: the encoder's conv patch embedding and the Fuyu patch projection.

Glossary: ``b`` batch, ``c`` channels, ``H``/``W`` pixels, ``s`` patch size, ``r``/``q`` patch rows
and columns, ``p`` tokens, ``d`` width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


class PatchEmbed(nn.Module):
    """Non-overlapping conv patch embedding (ViT / Vim): (b, c, H, W) -> (b, r*q, d).

    ``stem_channels`` puts 3x3 stride-2 convolutions (+ GELU) before the patchify convolution, a
    convolutional stem (Xiao et al. 2021, "Early convolutions help transformers see better"): each
    halves the resolution, and the patchify kernel shrinks to ``patch_size / 2**len(stem_channels)``,
    so the token grid is unchanged. A linear patchify sees a shape only as a pixel template; the
    stem gives each token local, non-linear features (edges, corners).
    """

    def __init__(
        self,
        patch_size: int,
        in_chans: int,
        d_model: int,
        stem_channels: tuple[int, ...] | list[int] = (),
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.patch_size = patch_size
        stem: list[nn.Module] = []
        c = in_chans
        for ch in stem_channels:
            stem += [nn.Conv2d(c, ch, kernel_size=3, stride=2, padding=1, **factory), nn.GELU()]
            c = ch
        self.stem = nn.Sequential(*stem)
        k = patch_size >> len(stem_channels)
        self.proj = nn.Conv2d(c, d_model, kernel_size=k, stride=k, **factory)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        s = self.patch_size
        if images.shape[-2] % s or images.shape[-1] % s:
            raise ValueError(f"image size {tuple(images.shape[-2:])} is not a multiple of patch_size={s}")
        if len(self.stem) == 0:
            # kernel == stride == patch: the conv is one matmul over the flattened patches, same
            # weights; on the 2-core CPU forward+backward of the demo's 96 px patchify (b=16) took
            # 2.5 ms as a matmul and 4.2 ms through the conv (mkldnn) path
            r, q = images.shape[-2] // s, images.shape[-1] // s
            patches = rearrange(images, "b c (r s1) (q s2) -> b (r q) (c s1 s2)", s1=s, s2=s)
            return F.linear(patches, self.proj.weight.flatten(1), self.proj.bias), (r, q)
        x = self.proj(self.stem(images))  # (b, d, r, q)
        grid = (x.shape[-2], x.shape[-1])
        return rearrange(x, "b d r q -> b (r q) d"), grid


def interpolate_pos_embed(pos: torch.Tensor, src_grid: int, dst: tuple[int, int]) -> torch.Tensor:
    """Bicubic resize of a learned (1, src_grid**2, d) position table to a (r, q) grid (DeiT / timm)."""
    if (src_grid, src_grid) == tuple(dst):
        return pos
    grid = rearrange(pos, "1 (r q) d -> 1 d r q", r=src_grid)
    grid = F.interpolate(grid.float(), size=dst, mode="bicubic", align_corners=False).to(pos.dtype)
    return rearrange(grid, "1 d r q -> 1 (r q) d")


class FuyuPatchProjection(nn.Module):
    """Fuyu-8B's vision path (Adept 2023): raw pixel patches, one linear layer, no encoder.

    Patches are read in raster order with a learned row-break token after each patch row, so the
    causal scan knows where a row ends. Images of different sizes share a per-batch canvas; the
    patches outside an image (and the row-breaks of rows outside it) are returned masked out,
    which the language model treats as identity steps: a row's output never depends on the
    padding of its neighbours.
    """

    def __init__(self, patch_size: int, in_chans: int, d_model: int, device=None, dtype=None) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Linear(in_chans * patch_size * patch_size, d_model, device=device, dtype=dtype)
        self.row_break = nn.Parameter(torch.zeros(d_model, device=device, dtype=dtype))
        nn.init.normal_(self.row_break, std=0.02)

    def forward(
        self, images: torch.Tensor, image_sizes: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Args:
            images: (b, c, H, W) canvas, each image at the top-left, H and W multiples of the patch.
            image_sizes: (b, 2) long (h, w) pixels of each real image (multiples of the patch);
                None = the whole canvas.

        Returns:
            tokens (b, r*(q+1), d) and mask (b, r*(q+1)) bool, True on real patches/row-breaks.
        """
        s = self.patch_size
        b, _, H, W = images.shape
        if H % s or W % s:
            raise ValueError(f"fuyu canvas {H}x{W} is not a multiple of patch_size={s}")
        r, q = H // s, W // s
        patches = rearrange(images, "b c (r s1) (q s2) -> b r q (s1 s2 c)", s1=s, s2=s)
        tok = self.proj(patches)  # (b, r, q, d)
        tok = torch.cat([tok, tok.new_zeros(b, r, 1, tok.shape[-1])], dim=2)  # (b, r, q+1, d)
        if image_sizes is None:
            sizes = torch.tensor([[H, W]], device=images.device).expand(b, 2)
        else:
            sizes = image_sizes.to(device=images.device, dtype=torch.long)
            if sizes.shape != (b, 2) or (sizes % s).any() or (sizes <= 0).any():
                raise ValueError(f"image_sizes must be (b, 2) positive patch multiples, got {sizes.tolist()}")
            if (sizes[:, 0] > H).any() or (sizes[:, 1] > W).any():
                raise ValueError(f"image_sizes {sizes.tolist()} exceed the {H}x{W} canvas")
        h, w = sizes[:, 0] // s, sizes[:, 1] // s  # (b,) patch rows / columns of each real image
        cols = torch.arange(q + 1, device=images.device)
        rows = torch.arange(r, device=images.device)
        # the row-break goes right after each image's last column (column w), over canvas padding
        is_brk = (cols[None, :] == w[:, None])[:, None, :, None]  # (b, 1, q+1, 1)
        tok = torch.where(is_brk, self.row_break.to(tok.dtype), tok)
        mask = (rows[None, :] < h[:, None])[:, :, None] & (cols[None, :] <= w[:, None])[
            :, None, :
        ]  # (b, r, q+1)
        return rearrange(tok, "b r q d -> b (r q) d"), rearrange(mask, "b r q -> b (r q)")

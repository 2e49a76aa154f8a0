"""Image transforms for the two vision modes (decoded PIL RGB -> uint8 tensor; collate normalises).

- ``encoder``: resize to a square ``img_size`` without cropping (a VQA question may ask about a
  corner, so nothing is cut off; the aspect change is what CLIP/BLIP-style square inputs accept),
  normalise with the ImageNet statistics Vim and the timm ViTs were trained with.
- ``fuyu``: Fuyu-8B's processor: keep the aspect ratio, scale down only so the longer side fits
  ``max_img_size``, then pad to a multiple of ``patch_size`` (done per batch in collate, with a canvas
  as large as the batch's largest image and ``image_sizes`` giving each image's padded (h, w)).

Transforms return uint8 (3, h, w) so workers ship 4x fewer bytes; :func:`normalize` runs on the batch.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)


def to_uint8_tensor(img: Image.Image) -> torch.Tensor:
    """PIL RGB (w, h) -> uint8 (3, h, w)."""
    return torch.from_numpy(np.array(img, dtype=np.uint8, copy=True)).permute(2, 0, 1).contiguous()


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 (..., 3, h, w) -> float32, ImageNet mean/std."""
    mean = torch.tensor(IMAGE_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGE_STD).view(3, 1, 1)
    return (images.float().div_(255) - mean) / std


class EncoderTransform:
    """Square resize to ``img_size`` (bicubic, antialiased by PIL)."""

    def __init__(self, img_size: int):
        if img_size <= 0:
            raise ValueError(f"img_size must be positive, got {img_size}")
        self.img_size = img_size

    def draft_size(self, size: tuple[int, int] | None = None) -> tuple[int, int]:
        return (self.img_size, self.img_size)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        if img.size != (self.img_size, self.img_size):
            img = img.resize((self.img_size, self.img_size), Image.Resampling.BICUBIC)
        return to_uint8_tensor(img)


class FuyuTransform:
    """Aspect-preserving downscale so max(h, w) <= ``max_img_size``; padding happens in collate."""

    def __init__(self, max_img_size: int, patch_size: int):
        if max_img_size <= 0 or patch_size <= 0:
            raise ValueError(f"max_img_size={max_img_size} and patch_size={patch_size} must be positive")
        if max_img_size % patch_size:
            raise ValueError(f"max_img_size={max_img_size} must be a multiple of patch_size={patch_size}")
        self.max_img_size, self.patch_size = max_img_size, patch_size

    def target_size(self, w: int, h: int) -> tuple[int, int]:
        scale = min(1.0, self.max_img_size / max(w, h))
        return max(1, round(w * scale)), max(1, round(h * scale))

    def __call__(self, img: Image.Image) -> torch.Tensor:
        size = self.target_size(*img.size)
        if size != img.size:
            img = img.resize(size, Image.Resampling.BICUBIC)
        return to_uint8_tensor(img)

    def draft_size(self, size: tuple[int, int]) -> tuple[int, int]:
        return self.target_size(*size)

    def padded(self, h: int, w: int) -> tuple[int, int]:
        p = self.patch_size
        return math.ceil(h / p) * p, math.ceil(w / p) * p


def make_transform(vision_mode: str, img_size: int, patch_size: int, max_img_size: int):
    if vision_mode == "encoder":
        if img_size % patch_size:
            raise ValueError(f"img_size={img_size} is not a multiple of patch_size={patch_size}")
        return EncoderTransform(img_size)
    if vision_mode == "fuyu":
        return FuyuTransform(max_img_size, patch_size)
    raise ValueError(f"vision_mode={vision_mode!r}: expected 'encoder' or 'fuyu'")

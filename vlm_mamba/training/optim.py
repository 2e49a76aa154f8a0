"""The optimiser's parameter groups and the learning-rate schedule (AdamW, warmup + cosine).

No Lightning here: :class:`vlm_mamba.training.module.VLMambaLitModule` builds the optimiser from
these, and benchmarks or scripts can reuse them on a bare ``nn.Module``.
"""

from __future__ import annotations

import math
from typing import Any

from torch import nn

# Parameter names (last dotted component) that never take weight decay: mamba_ssm's
# ``_no_weight_decay`` set for Mamba-1/2 (A_log, D, dt_bias) and timm's for ViT/Vim (pos_embed, cls_token).
NO_DECAY_NAMES = frozenset({"A_log", "D", "dt_bias", "pos_embed", "cls_token"})
_NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d)


def param_groups(
    model: nn.Module, weight_decay: float, decay_embeddings: bool = False
) -> list[dict[str, Any]]:
    """Split the trainable parameters of ``model`` into a decayed and a non-decayed AdamW group.

    Not decayed: every parameter with fewer than 2 dimensions (biases, norm weights, ``D``,
    ``dt_bias``), names in :data:`NO_DECAY_NAMES` (``A_log`` is 2-D yet must not decay: decay
    would pull the SSM's decay rates towards 1), parameters flagged ``_no_weight_decay``
    (mamba_ssm's convention), weights of norm modules (any class named ``*Norm*``) and, unless
    ``decay_embeddings``, ``nn.Embedding`` weights. A weight shared by two modules (tied
    embedding/head) is listed once, under its first name.

    Returns:
        ``[{"params", "weight_decay", "name": "decay"}, {..., "name": "no_decay"}]`` (empty
        groups dropped); each group also carries ``param_names`` for inspection.
    """
    no_decay_ids: set[int] = set()
    for mod in model.modules():
        is_norm = isinstance(mod, _NORM_TYPES) or "norm" in type(mod).__name__.lower()
        is_emb = isinstance(mod, nn.Embedding) and not decay_embeddings
        if is_norm or is_emb:
            no_decay_ids.update(id(p) for p in mod.parameters(recurse=False))
    decay, no_decay, decay_names, no_decay_names = [], [], [], []
    for name, p in model.named_parameters():  # shared parameters are yielded once
        if not p.requires_grad:
            continue
        leaf = name.rsplit(".", 1)[-1]
        if (
            p.ndim < 2
            or leaf in NO_DECAY_NAMES
            or getattr(p, "_no_weight_decay", False)
            or id(p) in no_decay_ids
        ):
            no_decay.append(p)
            no_decay_names.append(name)
        else:
            decay.append(p)
            decay_names.append(name)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "name": "decay", "param_names": decay_names},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay", "param_names": no_decay_names},
    ]
    return [g for g in groups if g["params"]]


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """LR multiplier: linear from ``1/(warmup+1)`` to 1 over ``warmup_steps``, then cosine to ``min_lr_ratio``.

    The warmup starts above zero so the first update is not wasted (as in nanoGPT's ``get_lr``).
    Past ``total_steps`` it stays at ``min_lr_ratio``.
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if total_steps <= warmup_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class WarmupCosine:
    """Picklable-free LambdaLR multiplier (a plain object: LambdaLR stores its ``__dict__``, which
    holds only numbers, so checkpoints stay loadable with ``weights_only=True``)."""

    def __init__(self, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> None:
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.min_lr_ratio = min_lr_ratio

    def __call__(self, step: int) -> float:
        return warmup_cosine(step, self.warmup_steps, self.total_steps, self.min_lr_ratio)

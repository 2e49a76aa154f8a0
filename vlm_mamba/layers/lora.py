"""LoRA (Hu et al. 2021) injected into the mixers' linear layers, visible to fused kernels.

mamba_ssm's fused path (``mamba_inner_fn``) never calls ``in_proj(x)``: it reads
``in_proj.weight``, ``x_proj.weight``, ``dt_proj.weight`` and ``out_proj.weight`` and multiplies
inside the kernel. An adapter that only overrides ``forward`` (peft's ``lora.Linear``, the seed's
LoRA) is silently skipped there, or crashes when the attribute is gone. ``LoRALinear`` therefore
exposes ``.weight`` as the *effective* weight ``W + (alpha / r) * B @ A``, differentiable in A and
B, so every kernel that reads the attribute trains the adapter. On the PyTorch path ``forward``
takes the cheaper low-rank route (and applies dropout, which a merged weight cannot express).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..config import LoRAConfig


class LoRALinear(nn.Module):
    """``nn.Linear`` plus a rank-r update; ``.weight`` / ``.bias`` behave like the wrapped layer's.

    Parameters: ``base.weight`` (frozen), ``base.bias``, ``lora_A`` (r, in), ``lora_B`` (out, r).
    ``lora_B`` starts at zero, so the output is unchanged at initialisation.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        self.base = base
        self.rank = rank
        self.scaling = alpha / rank
        self.in_features, self.out_features = base.in_features, base.out_features
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        base.weight.requires_grad_(False)

    def delta_weight(self) -> torch.Tensor:
        """(out, in) = scaling * B @ A."""
        return (self.lora_B @ self.lora_A) * self.scaling

    @property
    def weight(self) -> torch.Tensor:
        if self.merged:
            return self.base.weight
        return self.base.weight + self.delta_weight().to(self.base.weight.dtype)

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged:
            return y
        return (
            y
            + F.linear(F.linear(self.dropout(x), self.lora_A.to(x.dtype)), self.lora_B.to(x.dtype))
            * self.scaling
        )

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into ``base.weight`` (inference: no extra matmul)."""
        if not self.merged:
            self.base.weight += self.delta_weight().to(self.base.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge` (training again)."""
        if self.merged:
            self.base.weight -= self.delta_weight().to(self.base.weight.dtype)
            self.merged = False

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` carrying the merged weight (for plain checkpoints)."""
        out = nn.Linear(
            self.in_features,
            self.out_features,
            bias=self.base.bias is not None,
            device=self.base.weight.device,
            dtype=self.base.weight.dtype,
        )
        with torch.no_grad():
            out.weight.copy_(self.weight)
            if self.base.bias is not None:
                out.bias.copy_(self.base.bias)
        return out

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, scaling={self.scaling:g}"


def inject_lora(root: nn.Module, cfg: LoRAConfig) -> list[str]:
    """Replace every ``nn.Linear`` named in ``cfg.targets`` under ``root`` by a ``LoRALinear``.

    Returns the qualified names that were wrapped; raises if none matched (a config naming
    layers the model does not have must not train nothing).
    """
    wrapped = []
    for name, module in list(root.named_modules()):
        for target in cfg.targets:
            child = getattr(module, target, None)
            if isinstance(child, nn.Linear):
                setattr(module, target, LoRALinear(child, cfg.rank, cfg.alpha, cfg.dropout))
                wrapped.append(f"{name}.{target}" if name else target)
    if not wrapped:
        raise ValueError(f"lora.targets={cfg.targets} matched no nn.Linear under {type(root).__name__}")
    return wrapped


def lora_modules(root: nn.Module) -> Iterable[tuple[str, LoRALinear]]:
    return ((n, m) for n, m in root.named_modules() if isinstance(m, LoRALinear))


def merge_lora(root: nn.Module, unload: bool = False) -> int:
    """Merge every adapter; with ``unload`` replace each by a plain ``nn.Linear``. Returns the count."""
    items = list(lora_modules(root))
    for name, mod in items:
        if unload:
            parent = root.get_submodule(name.rsplit(".", 1)[0]) if "." in name else root
            setattr(parent, name.rsplit(".", 1)[-1], mod.to_linear())
        else:
            mod.merge()
    return len(items)


def unmerge_lora(root: nn.Module) -> int:
    items = list(lora_modules(root))
    for _, mod in items:
        mod.unmerge()
    return len(items)

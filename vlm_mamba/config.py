"""Validated architecture configs (Pydantic v2).

Architecture lives here: every size, variant and derived field of the model, with field and
cross-field checks whose errors name the field and the value. The model code reads these and never
re-derives anything. Unknown keys are errors everywhere (``extra="forbid"``), so a typo in a Hydra
override or a YAML file fails loudly instead of being ignored.

The seed's names are kept: ``VisionConfig``, ``LanguageConfig``, ``BridgerConfig``, ``LoRAConfig``,
``VLMambaConfig``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Kernel = Literal["auto", "cuda", "cpu", "torch", "ref"]
LoRATarget = Literal["in_proj", "out_proj", "x_proj", "dt_proj"]


class _Config(BaseModel):
    """Base: forbid unknown keys, validate on assignment, YAML/JSON round-trip."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_json(self, path: str | Path | None = None) -> str:
        text = self.model_dump_json(indent=2)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    def to_yaml(self, path: str | Path | None = None) -> str:
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_json(cls, src: str | Path):
        """Load from a JSON string or a path to a JSON file."""
        p = Path(src) if not str(src).lstrip().startswith("{") else None
        text = p.read_text() if p is not None else str(src)
        return cls.model_validate(json.loads(text))

    @classmethod
    def from_yaml(cls, src: str | Path):
        """Load from a YAML string or a path to a YAML file."""
        p = Path(src)
        text = p.read_text() if "\n" not in str(src) and p.exists() else str(src)
        return cls.model_validate(yaml.safe_load(text))


class SSMConfig(_Config):
    """Fields shared by the vision and language Mamba stacks (mamba_ssm's names and defaults)."""

    d_model: int = Field(768, gt=0, description="residual stream width (d)")
    n_layers: int = Field(12, gt=0, description="number of residual Mamba blocks")
    d_state: int = Field(16, gt=0, description="SSM state size per channel (n)")
    d_conv: int = Field(4, ge=1, le=8, description="causal depthwise conv width (k)")
    expand: int = Field(2, gt=0, description="inner width = expand * d_model (e)")
    dt_rank: int | Literal["auto"] = Field(
        "auto", description="Mamba-1 dt projection rank; auto = ceil(d/16)"
    )
    dt_min: float = Field(0.001, gt=0)
    dt_max: float = Field(0.1, gt=0)
    dt_init_floor: float = Field(1e-4, gt=0)
    conv_bias: bool = True
    bias: bool = Field(False, description="bias on in_proj/out_proj")
    norm_eps: float = Field(1e-5, gt=0)
    residual_in_fp32: bool = Field(True, description="keep the residual stream in fp32 under mixed precision")
    kernel: Kernel = Field("auto", description="force a kernel family (see vlm_mamba.ops); auto picks")
    gradient_checkpointing: bool = Field(False, description="recompute each block in backward")

    @field_validator("dt_rank")
    @classmethod
    def _dt_rank_positive(cls, v):
        if v != "auto" and v <= 0:
            raise ValueError(f"dt_rank must be 'auto' or a positive integer, got {v!r}")
        return v

    @model_validator(mode="after")
    def _dt_range(self):
        if self.dt_min > self.dt_max:
            raise ValueError(f"dt_min={self.dt_min} must not exceed dt_max={self.dt_max}")
        return self

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def dt_rank_value(self) -> int:
        return math.ceil(self.d_model / 16) if self.dt_rank == "auto" else int(self.dt_rank)


class LanguageConfig(SSMConfig):
    """The Mamba language model (``vlm_mamba.models.language.LanguageMamba``)."""

    vocab_size: int = Field(50257, gt=0)
    ssm: Literal["mamba1", "mamba2"] = Field("mamba1", description="mixer family of every block")
    # Mamba-2 only (mamba_ssm.modules.mamba2.Mamba2 names)
    headdim: int = Field(64, gt=0, description="Mamba-2 head width (p)")
    ngroups: int = Field(1, gt=0, description="Mamba-2 B/C groups (g)")
    chunk_size: int = Field(256, gt=0, description="Mamba-2 SSD chunk length")
    norm_before_gate: bool = Field(False, description="Mamba-2 gated RMSNorm order")
    pad_vocab_size_multiple: int = Field(8, gt=0, description="embedding/head rows padded to this multiple")
    tie_embeddings: bool = True

    @model_validator(mode="after")
    def _mamba2_shapes(self):
        if self.ssm == "mamba2":
            if self.d_inner % self.headdim:
                raise ValueError(
                    f"language.headdim={self.headdim} must divide d_inner=expand*d_model={self.d_inner}"
                )
            if self.nheads % self.ngroups:
                raise ValueError(f"language.ngroups={self.ngroups} must divide nheads={self.nheads}")
        return self

    @property
    def nheads(self) -> int:
        return self.d_inner // self.headdim

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_size_multiple
        return ((self.vocab_size + m - 1) // m) * m


class VisionConfig(SSMConfig):
    """The Mamba vision encoder (Vim-style) and, in fuyu mode, the patch projection width."""

    img_size: int = Field(224, gt=0, description="square input size in encoder mode")
    patch_size: int = Field(16, gt=0)
    in_chans: int = Field(3, gt=0)
    scan: Literal["bidirectional", "forward"] = "bidirectional"
    max_img_size: int = Field(448, gt=0, description="fuyu mode: longest side after resizing")
    conv_stem: list[int] = Field(
        default_factory=list,
        description="encoder mode: channels of 3x3 stride-2 convolutions before the patchify "
        "convolution (a convolutional stem); each halves the resolution, so patch_size must be "
        "divisible by 2**len(conv_stem). Empty: the plain ViT/Vim patchify.",
    )
    center_images: bool = Field(
        False,
        description="subtract each image's per-channel mean before the patch embedding (per-image "
        "centring). On flat backgrounds (the synthetic shapes) the constant background otherwise "
        "dominates every patch and a model trained from scratch never starts reading the objects.",
    )

    @model_validator(mode="after")
    def _patch_divides(self):
        if self.img_size % self.patch_size:
            raise ValueError(
                f"vision.img_size={self.img_size} is not a multiple of vision.patch_size={self.patch_size}"
            )
        if self.max_img_size % self.patch_size:
            raise ValueError(
                f"vision.max_img_size={self.max_img_size} is not a multiple of vision.patch_size={self.patch_size}"
            )
        if self.conv_stem and (
            self.patch_size % (2 ** len(self.conv_stem)) or any(c <= 0 for c in self.conv_stem)
        ):
            raise ValueError(
                f"vision.conv_stem={self.conv_stem}: needs positive channel counts and patch_size="
                f"{self.patch_size} divisible by 2**{len(self.conv_stem)} (each stem convolution halves the resolution)"
            )
        return self

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def patch_dim(self) -> int:
        return self.in_chans * self.patch_size**2


class BridgerConfig(_Config):
    """BridgerFFN: Linear(vision -> expansion_factor * d_model) -> GELU -> Linear(-> language) (+ norm)."""

    d_model: int | None = Field(None, gt=0, description="hidden base width; None = the language width")
    expansion_factor: int = Field(4, gt=0)
    norm: bool = Field(True, description="RMSNorm on the bridge output")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    # The bridge's widths are always derived (vision.d_model -> language.d_model). These two let a
    # config that states them (the seed's API, configs written for other VLM codebases) be checked
    # against the towers at validation instead of failing at weight loading; they never change a shape.
    in_dim: int | None = Field(
        None,
        gt=0,
        description="a check, not a setting: when given it must equal vision.d_model (the input width is derived)",
    )
    out_dim: int | None = Field(
        None,
        gt=0,
        description="a check, not a setting: when given it must equal language.d_model (the output width is derived)",
    )


class LoRAConfig(_Config):
    """Low-rank adapters on the mixers' linear layers (``vlm_mamba.layers.lora``)."""

    rank: int = Field(8, gt=0)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    targets: list[LoRATarget] = Field(default_factory=lambda: ["in_proj", "out_proj"])
    apply_to: Literal["language", "vision", "both"] = "language"
    train_bridge: bool = Field(True, description="the bridge stays trainable beside the adapters")

    @field_validator("targets")
    @classmethod
    def _targets_nonempty(cls, v):
        if not v:
            raise ValueError("lora.targets must name at least one of in_proj, out_proj, x_proj, dt_proj")
        if len(set(v)) != len(v):
            raise ValueError(f"lora.targets has duplicates: {v}")
        return v

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


class VLMambaConfig(_Config):
    """The whole model: vision (encoder or fuyu projection) -> bridge -> language."""

    vision: VisionConfig = Field(default_factory=VisionConfig)
    language: LanguageConfig = Field(default_factory=LanguageConfig)
    bridger: BridgerConfig = Field(default_factory=BridgerConfig)
    vision_mode: Literal["encoder", "fuyu"] = "encoder"
    lora: LoRAConfig | None = None
    prompt_order: Literal["image_first", "text_first"] = "image_first"
    freeze_vision: bool = False
    freeze_language: bool = False
    bos_token_id: int | None = Field(None, ge=0)
    eos_token_id: int | None = Field(None, ge=0)
    pad_token_id: int = Field(0, ge=0)
    initializer_range: float = Field(
        0.02, gt=0, description="std of the token embedding's normal init (mamba_ssm's initializer_range)"
    )

    @model_validator(mode="after")
    def _cross_checks(self):
        b, v, lang = self.bridger, self.vision, self.language
        if b.in_dim is not None and b.in_dim != v.d_model:
            raise ValueError(f"bridger.in_dim={b.in_dim} does not match vision.d_model={v.d_model}")
        if b.out_dim is not None and b.out_dim != lang.d_model:
            raise ValueError(f"bridger.out_dim={b.out_dim} does not match language.d_model={lang.d_model}")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            tok = getattr(self, name)
            if tok is not None and tok >= lang.vocab_size:
                raise ValueError(f"{name}={tok} is outside language.vocab_size={lang.vocab_size}")
        if self.lora is not None and self.lora.apply_to in ("vision", "both") and self.vision_mode == "fuyu":
            if self.lora.apply_to == "vision":
                raise ValueError(
                    "lora.apply_to='vision' but vision_mode='fuyu' has no vision encoder to adapt"
                )
        return self

    @property
    def bridger_hidden(self) -> int:
        return self.bridger.expansion_factor * (self.bridger.d_model or self.language.d_model)

    @property
    def trains_bridge_only(self) -> bool:
        return self.freeze_vision and self.freeze_language and self.lora is None

"""The benchmark's peer: an attention VLM with VLMamba's interface and (within ~5%) its parameter count.

Glossary: ``b`` batch, ``p`` image tokens, ``t`` text tokens, ``l`` = p + t, ``d`` width, ``h`` heads,
``k`` head width, ``V`` vocabulary (``Vp`` padded), ``L`` KV-cache capacity.

What it is, so the comparison can be judged:

- vision: a ViT (Dosovitskiy et al. 2021): the same conv patch embedding and learned position table
  as ``VisionMamba``, pre-norm blocks of bidirectional multi-head attention + GELU MLP (4x), final
  LayerNorm; width = ``vision.d_model``;
- bridge: VLMamba's own ``BridgerFFN`` (identical weights shape);
- language: a GPT-2-style pre-norm causal decoder (LayerNorm, attention, GELU MLP 4x) with rotary
  position embeddings (RoPE, Su et al. 2021; parameter-free, so the match is not skewed by a
  position table) and an embedding tied to the head; width = ``language.d_model``, same padded
  vocabulary; image tokens prepended to the text as in VLMamba's ``image_first`` order;
- attention is ``F.scaled_dot_product_attention`` (torch picks FlashAttention on CUDA with bf16);
- generation keeps a static KV cache (one (b, h, L, k) buffer per layer sized to prompt + new
  tokens, gpt-fast style) and decodes through ``vlm_mamba.generation.decode``, the same greedy loop
  VLMamba uses.

Widths equal VLMamba's; layer counts are chosen per component by :func:`match_peer_config` so each
component, and the total, matches VLMamba's parameter count (a ViT block has ~12 d^2 parameters, a
Mamba block ~6 d^2 and a bidirectional Vim block ~12 d^2, so the language decoder gets about half of
VLMamba's language layers).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vlm_mamba.config import VLMambaConfig
from vlm_mamba.generation import GenerationConfig, decode
from vlm_mamba.layers.bridger import BridgerFFN
from vlm_mamba.layers.patch_embed import PatchEmbed


@dataclass
class PeerConfig:
    """The peer's architecture; :func:`match_peer_config` derives it from a ``VLMambaConfig``."""

    img_size: int
    patch_size: int
    in_chans: int
    d_vision: int
    n_vision_layers: int
    n_vision_heads: int
    d_lang: int
    n_lang_layers: int
    n_lang_heads: int
    vocab_size: int
    padded_vocab_size: int
    bridger_hidden: int
    bridger_norm: bool
    mlp_ratio: int = 4
    rope_base: float = 10000.0
    norm_eps: float = 1e-5

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def default_heads(d: int) -> int:
    """Head count for width ``d``: 64-wide heads (GPT-2, ViT-B), narrower when 64 does not divide d."""
    for k in (64, 32, 16, 8):
        if d % k == 0:
            return d // k
    return 1


# ----------------------------------------------------------------------------------- attention
def rope_cos_sin(positions: torch.Tensor, k: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE tables for ``positions`` (l,): cos, sin (l, k) in fp32 (GPT-NeoX's rotate-half layout)."""
    inv_freq = 1.0 / base ** (torch.arange(0, k, 2, device=positions.device, dtype=torch.float32) / k)
    ang = positions.float()[:, None] * inv_freq[None, :]  # (l, k/2)
    ang = torch.cat([ang, ang], dim=-1)  # (l, k)
    return ang.cos(), ang.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (b, h, l, k) rotated by position: x cos + rotate_half(x) sin, computed in fp32."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    rot = torch.cat([-x2, x1], dim=-1)
    return (xf * cos + rot * sin).to(x.dtype)


class KVCache:
    """Static per-layer key/value buffers (b, h, L, k), filled in place; ``pos`` = tokens cached.

    Buffers are allocated at the first write, in the dtype the keys arrive in (bf16 under autocast).
    Mutated in place: only greedy decoding (no beam forks) uses it.
    """

    def __init__(self, n_layers: int, capacity: int) -> None:
        self.capacity = capacity
        self.k: list[torch.Tensor | None] = [None] * n_layers
        self.v: list[torch.Tensor | None] = [None] * n_layers
        self.pos = 0

    def write(self, i: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (b, h, s, k) at [pos, pos+s) of layer i; return the filled prefix (b, h, pos+s, k)."""
        b, h, s, kd = k.shape
        end = self.pos + s
        if end > self.capacity:
            raise ValueError(f"KV cache overflow: {end} tokens > capacity {self.capacity}")
        if self.k[i] is None:
            self.k[i] = k.new_empty(b, h, self.capacity, kd)
            self.v[i] = v.new_empty(b, h, self.capacity, kd)
        self.k[i][:, :, self.pos : end] = k
        self.v[i][:, :, self.pos : end] = v
        return self.k[i][:, :, :end], self.v[i][:, :, :end]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v if t is not None)


class SelfAttention(nn.Module):
    """Multi-head self-attention through SDPA; causal with RoPE (decoder) or bidirectional (ViT)."""

    def __init__(self, d: int, n_heads: int, causal: bool, rope_base: float | None) -> None:
        super().__init__()
        if d % n_heads:
            raise ValueError(f"width {d} is not divisible by n_heads={n_heads}")
        self.h, self.k = n_heads, d // n_heads
        self.causal, self.rope_base = causal, rope_base
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(
        self, x: torch.Tensor, cache: KVCache | None = None, layer_idx: int = 0, pos: int = 0
    ) -> torch.Tensor:
        """x (b, s, d) at absolute positions [pos, pos+s) -> (b, s, d)."""
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.h, self.k).permute(2, 0, 3, 1, 4)  # each (b, h, s, k)
        if self.rope_base is not None:
            cos, sin = rope_cos_sin(torch.arange(pos, pos + s, device=x.device), self.k, self.rope_base)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            if pos > 0 and s > 1:  # SDPA's is_causal aligns top-left: only a prefill from 0 or 1-token steps
                raise ValueError("a multi-token chunk after a filled cache is not supported")
            k, v = cache.write(layer_idx, k, v)  # (b, h, pos+s, k)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal and s > 1)  # (b, h, s, k)
        return self.proj(y.transpose(1, 2).reshape(b, s, d))


class TransformerBlock(nn.Module):
    """Pre-norm residual block: x + attn(ln(x)), then x + mlp(ln(x)) with a 4x GELU MLP (GPT-2, ViT)."""

    def __init__(
        self, d: int, n_heads: int, causal: bool, rope_base: float | None, mlp_ratio: int, eps: float
    ) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d, eps=eps)
        self.attn = SelfAttention(d, n_heads, causal, rope_base)
        self.ln2 = nn.LayerNorm(d, eps=eps)
        self.mlp = nn.Sequential(
            nn.Linear(d, mlp_ratio * d), nn.GELU(approximate="tanh"), nn.Linear(mlp_ratio * d, d)
        )

    def forward(
        self, x: torch.Tensor, cache: KVCache | None = None, layer_idx: int = 0, pos: int = 0
    ) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), cache, layer_idx, pos)
        return x + self.mlp(self.ln2(x))


# ----------------------------------------------------------------------------------- the model
@dataclass
class PeerOutput:
    logits: torch.Tensor  # (b, t, V) at the text positions, predicting the next token
    loss: torch.Tensor | None = None


class PeerTransformerVLM(nn.Module):
    """ViT -> BridgerFFN -> causal Transformer decoder over [image][text]; VLMamba's call signatures."""

    def __init__(self, cfg: PeerConfig, bridger: BridgerFFN) -> None:
        super().__init__()
        self.cfg = cfg
        grid = cfg.img_size // cfg.patch_size
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_chans, cfg.d_vision)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid, cfg.d_vision))
        self.vision_layers = nn.ModuleList(
            TransformerBlock(cfg.d_vision, cfg.n_vision_heads, False, None, cfg.mlp_ratio, cfg.norm_eps)
            for _ in range(cfg.n_vision_layers)
        )
        self.vision_norm = nn.LayerNorm(cfg.d_vision, eps=cfg.norm_eps)
        self.bridger = bridger
        self.embedding = nn.Embedding(cfg.padded_vocab_size, cfg.d_lang)
        self.layers = nn.ModuleList(
            TransformerBlock(cfg.d_lang, cfg.n_lang_heads, True, cfg.rope_base, cfg.mlp_ratio, cfg.norm_eps)
            for _ in range(cfg.n_lang_layers)
        )
        self.norm_f = nn.LayerNorm(cfg.d_lang, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_lang, cfg.padded_vocab_size, bias=False)
        self._init_weights()
        self.lm_head.weight = self.embedding.weight  # tied, as VLMamba's

    @torch.no_grad()
    def _init_weights(self) -> None:
        """GPT-2's init: N(0, 0.02) weights, zero biases, residual writes scaled by 1/sqrt(2 n_layers)."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for stack in (self.vision_layers, self.layers):
            for blk in stack:
                for w in (blk.attn.proj.weight, blk.mlp[2].weight):
                    w /= math.sqrt(2 * max(len(stack), 1))

    # ------------------------------------------------------------------ pieces
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(b, c, H, W) -> image tokens in language width (b, p, d)."""
        x, grid = self.patch_embed(images)  # (b, p, d_vis)
        if grid != (self.cfg.img_size // self.cfg.patch_size,) * 2:
            raise ValueError(f"images {tuple(images.shape[-2:])} differ from img_size={self.cfg.img_size}")
        x = x + self.pos_embed.to(x.dtype)
        for blk in self.vision_layers:
            x = blk(x)
        return self.bridger(self.vision_norm(x))  # (b, p, d)

    def _decode(self, x: torch.Tensor, cache: KVCache | None = None, pos: int = 0) -> torch.Tensor:
        """Decoder stack over x (b, s, d) at positions [pos, pos+s) -> normed hidden states (b, s, d)."""
        for i, blk in enumerate(self.layers):
            x = blk(x, cache, i, pos)
        return self.norm_f(x)

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(h)  # (..., Vp)
        return logits[..., : self.cfg.vocab_size]

    # ------------------------------------------------------------------ training forward
    def forward(
        self,
        images: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> PeerOutput:
        """Teacher-forced pass over [image][text], VLMamba's semantics: ``logits[:, i]`` predicts token
        i+1, the first text token is predicted from the last image position, loss over labels != -100.

        ``attention_mask`` may only mark right padding: a causal decoder never lets a real token see
        a later pad, so no mask is needed (left padding would be, and is refused).
        """
        b, t = input_ids.shape
        if attention_mask is not None:
            m = attention_mask.long()
            if bool((m[:, 1:] > m[:, :-1]).any()):
                raise ValueError("attention_mask is not right padded; the peer supports right padding only")
        img = self.encode_images(images)  # (b, p, d)
        p = img.shape[1]
        x = torch.cat([img, self.embedding(input_ids).to(img.dtype)], dim=1)  # (b, l, d)
        h = self._decode(x)[:, p - 1 :]  # (b, t+1, d): last image position, then each text position
        logits_all = self._logits(h)  # (b, t+1, V), one head matmul for logits and loss
        loss = None
        if labels is not None:
            target = labels != -100  # (b, t)
            pred = logits_all[:, :-1]  # (b, t, V): position i-1 predicts token i
            loss = F.cross_entropy(pred[target].float(), labels[target]) if target.any() else pred.sum() * 0.0
        return PeerOutput(logits=logits_all[:, 1:], loss=loss)

    # ------------------------------------------------------------------ generation
    def step(self, input_ids: torch.Tensor, state: KVCache) -> tuple[torch.Tensor, KVCache]:
        """One token per row: input_ids (b,) -> (logits (b, V), the cache advanced by one, in place)."""
        x = self.embedding(input_ids)[:, None]  # (b, 1, d)
        h = self._decode(x, state, state.pos)  # (b, 1, d)
        state.pos += 1
        return self._logits(h[:, 0]), state

    @torch.no_grad()
    def generate(
        self,
        images: torch.Tensor,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor | None = None,
        max_new_tokens: int = 20,
        eos_token_id: int | None = None,
        pad_token_id: int = 0,
    ) -> torch.Tensor:
        """Greedy decoding after a one-pass prefill of [image][prompt]; (b, n_new) token ids.

        Prompts must be unpadded (``prompt_mask`` None or all ones): the benchmark needs no more.
        """
        if prompt_mask is not None and not bool(prompt_mask.bool().all()):
            raise ValueError("the peer decodes unpadded prompts only (prompt_mask must be all ones)")
        gcfg = GenerationConfig(
            max_new_tokens=max_new_tokens, eos_token_id=eos_token_id, pad_token_id=pad_token_id
        )
        img = self.encode_images(images)  # (b, p, d)
        x = torch.cat([img, self.embedding(prompt_ids).to(img.dtype)], dim=1)  # (b, p+s, d)
        cache = KVCache(len(self.layers), capacity=x.shape[1] + max_new_tokens)
        h = self._decode(x, cache, 0)  # (b, p+s, d)
        cache.pos = x.shape[1]
        last = self._logits(h[:, -1])  # (b, V): the head on the last position only

        def step_fn(tok: torch.Tensor, st: KVCache):
            return self.step(tok, st)

        return decode(step_fn, cache, last, gcfg)

    def num_parameters(self) -> dict[str, int]:
        """Counts per component, VLMamba's keys (tied embedding/head counted once)."""

        def count(params) -> int:
            return sum(p.numel() for p in {id(p): p for p in params}.values())

        vision = [self.patch_embed, self.vision_layers, self.vision_norm]
        out = {
            "vision": count(p for m in vision for p in m.parameters()) + self.pos_embed.numel(),
            "bridger": count(self.bridger.parameters()),
            "language": count(
                p for m in (self.embedding, self.layers, self.norm_f, self.lm_head) for p in m.parameters()
            ),
        }
        out["total"] = count(self.parameters())
        out["trainable"] = count(p for p in self.parameters() if p.requires_grad)
        return out


# ----------------------------------------------------------------------------------- matching
def _peer_config(cfg: VLMambaConfig, n_vision: int, n_lang: int) -> PeerConfig:
    v, lang = cfg.vision, cfg.language
    return PeerConfig(
        img_size=v.img_size,
        patch_size=v.patch_size,
        in_chans=v.in_chans,
        d_vision=v.d_model,
        n_vision_layers=n_vision,
        n_vision_heads=default_heads(v.d_model),
        d_lang=lang.d_model,
        n_lang_layers=n_lang,
        n_lang_heads=default_heads(lang.d_model),
        vocab_size=lang.vocab_size,
        padded_vocab_size=lang.padded_vocab_size,
        bridger_hidden=cfg.bridger_hidden,
        bridger_norm=cfg.bridger.norm,
        norm_eps=lang.norm_eps,
    )


def build_peer(cfg: VLMambaConfig, n_vision: int, n_lang: int, device=None) -> PeerTransformerVLM:
    """The peer for a VLMamba config with the given layer counts (weights on ``device``)."""
    with torch.device(device or "cpu"):
        return PeerTransformerVLM(_peer_config(cfg, n_vision, n_lang), BridgerFFN.from_config(cfg))


def match_peer_config(
    cfg: VLMambaConfig, mamba_counts: dict[str, int], tolerance: float = 0.05
) -> tuple[int, int]:
    """Layer counts (vision, language) whose peer matches ``mamba_counts`` (VLMamba.num_parameters()).

    Parameters are linear in the layer counts, so the counts come from peers built on the meta
    device (no memory): each component is rounded down and up to a whole number of blocks; of the
    four choices, those with a total within ``tolerance`` of VLMamba's are kept and the one closest
    per component (sum of the vision and language differences) wins.
    """
    base = build_peer(cfg, 0, 0, device="meta").num_parameters()
    per_v = build_peer(cfg, 1, 0, device="meta").num_parameters()["vision"] - base["vision"]
    per_l = build_peer(cfg, 0, 1, device="meta").num_parameters()["language"] - base["language"]
    fv = (mamba_counts["vision"] - base["vision"]) / per_v
    fl = (mamba_counts["language"] - base["language"]) / per_l
    best = None
    for nv in sorted({max(1, math.floor(fv)), max(1, math.ceil(fv))}):
        for nl in sorted({max(1, math.floor(fl)), max(1, math.ceil(fl))}):
            dv = base["vision"] + nv * per_v - mamba_counts["vision"]
            dl = base["language"] + nl * per_l - mamba_counts["language"]
            total = base["total"] + nv * per_v + nl * per_l
            key = (abs(total / mamba_counts["total"] - 1) > tolerance, abs(dv) + abs(dl))
            if best is None or key < best[0]:
                best = (key, nv, nl)
    return best[1], best[2]

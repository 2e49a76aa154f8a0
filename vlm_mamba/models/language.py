"""The Mamba language model: embedding -> N pre-norm Mamba blocks -> final RMSNorm -> LM head.

Same layout and parameter names as mamba_ssm's ``MambaLMHeadModel`` (without the ``backbone.``
prefix), so ``from_pretrained`` loads its checkpoints and transformers' ``MambaForCausalLM`` /
``Mamba2ForCausalLM`` ones from a local directory. ``inputs_embeds`` lets the VLM put image
embeddings before the text; ``state`` / ``return_state`` / ``step`` give prefill and recurrent
decoding; ``attention_mask`` makes padded positions identity steps.

Padding costs one permutation per forward, not one per layer: the real tokens of each row are moved
to the front before the first block and put back after the last (``vlm_mamba.ops.padding``). The
pads then trail every row, where they reach no real position, so without a returned state every
layer runs the unmasked fused kernels, whatever the padding was (right, left, a fuyu canvas); with
a returned state (prefill) the layers make the trailing pads identity steps (dt = 0) so the state
stops at each row's last real token. Nothing in the forward reads a value back to the host: the
permutation is computed on the device, and a mask with no pads gets the identity.

Shapes: ``b`` batch, ``l`` length, ``d`` model width, ``V`` vocabulary (padded: ``Vp``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from vlm_mamba import ops
from vlm_mamba.config import LanguageConfig
from vlm_mamba.layers import Block, InferenceState, Mamba2Mixer, MambaMixer, RMSNorm

INIT_STD = 0.02  # embedding init std when the config names none (mamba_ssm's initializer_range)


@dataclass
class LMOutput:
    logits: (
        Tensor | None
    )  # (b,l,V) from forward (None for logits="none"), (b,V) from step; padded rows sliced off
    state: InferenceState | None = None  # final recurrent state (forward with return_state, step)
    hidden_states: Tensor | None = None  # (b,l,d) or (b,d), after the final norm
    loss: Tensor | None = None  # forward with labels: mean next-token cross-entropy


class LanguageMamba(nn.Module):
    """Mamba-1 or Mamba-2 language model (``cfg.ssm``), head tied to the embedding by default.

    ``initializer_range``: the embedding's init std; default ``cfg.initializer_range`` where the
    config has that field, else 0.02 (mamba_ssm's and transformers' default).
    """

    def __init__(self, cfg: LanguageConfig, device=None, dtype=None, initializer_range: float | None = None):
        super().__init__()
        self.config = cfg
        self.kernel = cfg.kernel  # the final add + norm's family (the blocks follow their mixers)
        if initializer_range is None:
            initializer_range = getattr(cfg, "initializer_range", None) or INIT_STD
        if not initializer_range > 0:
            raise ValueError(f"initializer_range={initializer_range} must be positive")
        self.initializer_range = float(initializer_range)
        fk = {"device": device, "dtype": dtype}
        mixer_cls = {"mamba1": MambaMixer, "mamba2": Mamba2Mixer}[cfg.ssm]
        norm_cls = partial(RMSNorm, eps=cfg.norm_eps, **fk)
        self.embedding = nn.Embedding(cfg.padded_vocab_size, cfg.d_model, **fk)
        self.layers = nn.ModuleList(
            Block(cfg.d_model, mixer_cls.from_config(cfg, i, **fk), norm_cls, cfg.residual_in_fp32)
            for i in range(cfg.n_layers)
        )
        self.norm_f = norm_cls(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.padded_vocab_size, bias=False, **fk)
        self._init_weights()
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embedding.weight

    @torch.no_grad()
    def _init_weights(self) -> None:
        """mamba_ssm ``_init_weights``: zero linear biases (not dt_proj's), N(0, initializer_range)
        embedding, and out_proj rescaled by 1/sqrt(n_layers) (GPT-2's scaled init of residual-stream
        writes)."""
        for m in self.modules():
            if isinstance(m, nn.Linear) and m.bias is not None and not getattr(m.bias, "_no_reinit", False):
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.embedding.weight, std=self.initializer_range)
        for layer in self.layers:
            w = layer.mixer.out_proj.weight
            nn.init.kaiming_uniform_(w, a=math.sqrt(5))
            w /= math.sqrt(self.config.n_layers)

    # ----------------------------------------------------------------------------------- helpers
    def embed(self, input_ids: Tensor) -> Tensor:
        """input_ids (b,l) -> (b,l,d)."""
        return self.embedding(input_ids)

    def allocate_inference_cache(self, batch: int, dtype=None, device=None) -> InferenceState:
        """Zero state for ``batch`` rows (conv windows in ``dtype``, SSM states fp32)."""
        return InferenceState(
            [layer.allocate_state(batch, dtype=dtype, device=device) for layer in self.layers]
        )

    def _inputs(self, input_ids: Tensor | None, inputs_embeds: Tensor | None) -> Tensor:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        return self.embedding(input_ids) if input_ids is not None else inputs_embeds

    def _final_norm(self, hidden: Tensor, residual: Tensor | None) -> Tensor:
        """norm_f(hidden + residual): the last block's add and the final norm in one kernel."""
        return ops.add_rms_norm(
            hidden, residual, self.norm_f.weight, self.norm_f.eps, self.config.residual_in_fp32,
            prenorm=False, kernel=self.kernel,
        )  # fmt: skip

    def _logits(self, h: Tensor) -> Tensor:
        logits = self.lm_head(h)  # (..., Vp)
        V = self.config.vocab_size
        return logits if logits.shape[-1] == V else logits[..., :V]

    # ----------------------------------------------------------------------------------- forward
    def forward(
        self,
        input_ids: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        attention_mask: Tensor | None = None,
        state: InferenceState | None = None,
        return_state: bool = False,
        logits: str | None = None,
        labels: Tensor | None = None,
    ) -> LMOutput:
        """input_ids (b,l) or inputs_embeds (b,l,d) -> LMOutput(logits (b,l,V), state, hidden_states, loss).

        ``logits``: ``"all"`` positions, only the ``"last"`` (b,1,V) (prefill before decoding), or
        ``"none"`` (callers that apply the head to a subset of ``hidden_states``): the head is the
        largest matmul at small widths, so computing it where nobody reads it is the main waste.
        Default: ``"all"``, or ``"none"`` when ``labels`` are given.

        ``labels`` (b,l), aligned with the input (the model shifts), -100 = no target: ``loss`` is
        the mean next-token cross-entropy, each target predicted by the last real position before
        it, computed by ``ops.linear_cross_entropy`` (the head on labelled positions only, in row
        chunks: no (b,l,V) logits).

        attention_mask (b,l), 1/True = real: a 0 position is an identity step for every layer (its
        logits are meaningless). ``state`` continues from a previous prefill or step.
        """
        logits = logits or ("none" if labels is not None else "all")
        if logits not in ("all", "last", "none"):
            raise ValueError(f"logits={logits!r}: expected 'all', 'last' or 'none'")
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if state is not None and len(state) != len(self.layers):
            raise ValueError(f"state has {len(state)} layers, the model {len(self.layers)}")
        src = input_ids if input_ids is not None else inputs_embeds  # (b,l) or (b,l,d)
        inverse = lengths = None
        if attention_mask is not None:  # real tokens first, once for all layers (see the top)
            if attention_mask.shape != src.shape[:2]:
                raise ValueError(
                    f"attention_mask has shape {tuple(attention_mask.shape)}, expected {tuple(src.shape[:2])}"
                )
            order, inverse, lengths = ops.compact_by_mask(attention_mask.to(src.device, torch.bool))
            src = ops.gather_time(src, order)  # pads trailing
        x = self.embedding(src) if input_ids is not None else src  # (b,l,d)
        ckpt = self.config.gradient_checkpointing and self.training and torch.is_grad_enabled()
        hidden, residual, new_states = x, None, []
        for i, layer in enumerate(self.layers):
            st = state[i] if state is not None else None
            if return_state:
                hidden, residual, s = layer.forward_carry(hidden, residual, lengths, st, return_state=True)
                new_states.append(s)
            elif ckpt:
                hidden, residual = checkpoint(
                    layer.forward_carry, hidden, residual, None, st, use_reentrant=False
                )
            else:
                hidden, residual = layer.forward_carry(hidden, residual, state=st)
        h = self._final_norm(hidden, residual)  # (b,l,d)
        if inverse is not None:
            h = ops.gather_time(h, inverse)  # back to the input's positions
        out = self._logits(h) if logits == "all" else self._logits(h[:, -1:]) if logits == "last" else None
        loss = None if labels is None else self.loss(h, labels, attention_mask)
        return LMOutput(out, InferenceState(new_states) if return_state else None, h, loss)

    def loss(self, h: Tensor, labels: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Mean next-token cross-entropy from hidden states h (b,l,d) (see ``forward``'s ``labels``)."""
        if labels.shape != h.shape[:2]:
            raise ValueError(f"labels have shape {tuple(labels.shape)}, expected {tuple(h.shape[:2])}")
        real = torch.ones_like(labels, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        pred = ops.previous_real(real)  # (b,l) the position predicting each token
        target = (labels != -100) & real & (pred >= 0)
        hs = ops.gather_time(h, pred.clamp_min(0))[target]  # (m,d)
        return ops.linear_cross_entropy(hs, self.lm_head.weight[: self.config.vocab_size], labels[target])

    @torch.no_grad()
    def generate(self, input_ids: Tensor, attention_mask: Tensor | None = None, **gen_kwargs: Any) -> Tensor:
        """Prefill ``input_ids`` (b,l) (LEFT padded with ``attention_mask``) and decode:
        ``gen_kwargs`` are ``vlm_mamba.generation.GenerationConfig`` fields (``max_new_tokens``,
        ``num_beams``, ``do_sample``, ``eos_token_id``, ``decoder``: on CUDA a graph-captured
        in-place step by default). Returns (b, n_new) token ids, padding after each row's EOS."""
        from ..generation import GenerationConfig, decode
        from .decoding import make_step_fn

        cfg = GenerationConfig(**gen_kwargs)
        out = self(input_ids, attention_mask=attention_mask, return_state=True, logits="last")
        last = out.logits[:, -1]  # (b,V)
        return decode(make_step_fn(self, cfg.decoder, last.device), out.state, last, cfg)

    def step_(self, input_ids: Tensor, cache: Any) -> Tensor:
        """One token per row with the decoding cache's state updated in place: input_ids (b,) ->
        logits (b,V). ``cache`` is a ``vlm_mamba.models.decoding.DecodeCache`` (its buffers and the
        layers' A, computed once); the graph-captured decoder replays exactly this."""
        hidden, residual = self.embedding(input_ids), None  # (b,d)
        for layer, st, A in zip(self.layers, cache.state, cache.A):
            hidden, residual = layer.step_carry_(hidden, residual, st, A)
        return self._logits(self._final_norm(hidden, residual))

    def step(
        self,
        input_ids: Tensor | None = None,
        state: InferenceState | None = None,
        inputs_embeds: Tensor | None = None,
        mask: Tensor | None = None,
    ) -> LMOutput:
        """One token per row: input_ids (b,) or inputs_embeds (b,d) -> LMOutput(logits (b,V), new state).

        Called as ``step(token, state)`` or ``step(inputs_embeds=e, state=state)``. ``mask`` (b,)
        False keeps a row's state unchanged (finished or padded rows). ``state`` is not modified.
        """
        if state is None:
            raise ValueError("step needs a state: allocate_inference_cache(batch) or a prefill's state")
        hidden, residual = self._inputs(input_ids, inputs_embeds), None  # (b,d)
        new_states = []
        for layer, st in zip(self.layers, state):
            hidden, residual, s = layer.step_carry(hidden, residual, st, mask=mask)
            new_states.append(s)
        h = self._final_norm(hidden, residual)
        return LMOutput(self._logits(h), InferenceState(new_states), h)

    # ------------------------------------------------------------------------------- checkpoints
    @classmethod
    def from_pretrained(cls, path: str | Path, device=None, dtype=None, **overrides: Any) -> LanguageMamba:
        """Load a local transformers ``MambaForCausalLM`` / ``Mamba2ForCausalLM`` directory
        (config.json + safetensors or bin) or a mamba_ssm ``MambaLMHeadModel`` one (config.json +
        pytorch_model.bin). ``overrides`` are ``LanguageConfig`` fields (e.g. ``kernel="torch"``,
        ``pad_vocab_size_multiple=16``). Embedding/head rows are padded or cut to the configured
        padded vocabulary; every other mismatch is an error listing the keys.
        """
        path = Path(path)
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise FileNotFoundError(f"{cfg_file} not found: from_pretrained needs a checkpoint directory")
        raw = json.loads(cfg_file.read_text())
        fields = _config_fields(raw, cfg_file)
        fields.update(overrides)
        cfg = LanguageConfig(**fields)
        sd = _convert_state_dict(_load_tensors(path), cfg, path)
        model = cls(cfg, device=device, dtype=dtype)
        _check_keys(model, sd, path)
        if cfg.tie_embeddings:
            sd["lm_head.weight"] = sd["embedding.weight"]
        model.load_state_dict(sd, strict=True)
        return model


# ------------------------------------------------------------------------------ checkpoint helpers
def _number(v) -> float:
    """A JSON number, including transformers' ``{"__float__": "Infinity"}`` and "inf" strings."""
    if isinstance(v, dict) and "__float__" in v:
        v = v["__float__"]
    return float(v)


def _config_fields(raw: dict, where: Path) -> dict:
    """A checkpoint's config.json -> LanguageConfig fields (transformers or mamba_ssm naming)."""

    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ValueError(f"{where}: {msg}; vlm_mamba cannot reproduce this architecture")

    model_type = raw.get("model_type")
    if model_type in ("mamba", "mamba2"):  # transformers
        need(raw.get("hidden_act", "silu") == "silu", f"hidden_act={raw.get('hidden_act')!r} (only 'silu')")
        f = {
            "ssm": "mamba1" if model_type == "mamba" else "mamba2",
            "d_model": raw["hidden_size"],
            "n_layers": raw["num_hidden_layers"],
            "vocab_size": raw["vocab_size"],
            "d_state": raw.get("state_size", 16),
            "d_conv": raw.get("conv_kernel", 4),
            "expand": raw.get("expand", 2),
            "conv_bias": raw.get("use_conv_bias", True),
            "bias": raw.get("use_bias", False),
            "norm_eps": raw.get("layer_norm_epsilon", 1e-5),
            "residual_in_fp32": raw.get("residual_in_fp32", True),
            "tie_embeddings": raw.get("tie_word_embeddings", model_type == "mamba"),
            "pad_vocab_size_multiple": 1,  # transformers checkpoints store the vocabulary unpadded
        }
        for ours, theirs in (("dt_min", "time_step_min"), ("dt_max", "time_step_max")):
            if theirs in raw:
                f[ours] = raw[theirs]
        if "time_step_floor" in raw:
            f["dt_init_floor"] = raw["time_step_floor"]
        if model_type == "mamba":
            f["dt_rank"] = raw.get("time_step_rank", "auto")
        else:
            lim = tuple(_number(v) for v in raw.get("time_step_limit", (0.0, float("inf"))))
            need(lim == (0.0, float("inf")), f"time_step_limit={list(lim)} (only no clamping)")
            need(
                raw["num_heads"] * raw["head_dim"] == raw.get("expand", 2) * raw["hidden_size"],
                "num_heads*head_dim != expand*hidden_size",
            )
            f.update(
                headdim=raw["head_dim"], ngroups=raw.get("n_groups", 1), chunk_size=raw.get("chunk_size", 256)
            )
        return f
    if "d_model" in raw and "n_layer" in raw:  # mamba_ssm MambaConfig
        need(not raw.get("attn_layer_idx"), f"attn_layer_idx={raw.get('attn_layer_idx')} (attention layers)")
        need(not raw.get("d_intermediate", 0), f"d_intermediate={raw.get('d_intermediate')} (MLP layers)")
        need(raw.get("rms_norm", True), "rms_norm=false (LayerNorm)")
        ssm_cfg = dict(raw.get("ssm_cfg") or {})
        layer = ssm_cfg.pop("layer", "Mamba1")
        need(layer in ("Mamba1", "Mamba2"), f"ssm_cfg.layer={layer!r}")
        f = {
            "ssm": "mamba1" if layer == "Mamba1" else "mamba2",
            "d_model": raw["d_model"],
            "n_layers": raw["n_layer"],
            "vocab_size": raw["vocab_size"],
            "residual_in_fp32": raw.get("residual_in_fp32", True),
            "pad_vocab_size_multiple": raw.get("pad_vocab_size_multiple", 8),
            "tie_embeddings": raw.get("tie_embeddings", True),
        }
        if layer == "Mamba2":  # mamba_ssm Mamba2's defaults differ from LanguageConfig's
            f.update(d_state=128, headdim=64, ngroups=1, chunk_size=256)
        same = ("d_state", "d_conv", "expand", "dt_rank", "dt_min", "dt_max", "dt_init_floor", "conv_bias",
                "bias", "headdim", "ngroups", "chunk_size", "norm_before_gate")  # fmt: skip
        init_only = ("dt_init", "dt_scale", "A_init_range", "use_fast_path", "use_mem_eff_path",
                     "sequence_parallel", "process_group")  # fmt: skip
        for key, val in ssm_cfg.items():
            if key in same:
                f[key] = val
            elif key == "rmsnorm":
                need(val, "ssm_cfg.rmsnorm=false (Mamba-2 without the gated norm)")
            elif key == "D_has_hdim":
                need(not val, "ssm_cfg.D_has_hdim=true")
            elif key == "d_ssm":
                need(val is None or val == f.get("expand", 2) * raw["d_model"], f"ssm_cfg.d_ssm={val}")
            elif key == "dt_limit":
                lim = tuple(_number(v) for v in val)
                need(lim == (0.0, float("inf")), f"ssm_cfg.dt_limit={val} (only no clamping)")
            elif key not in init_only:
                need(False, f"unknown ssm_cfg key {key!r}")
        return f
    raise ValueError(
        f"{where}: neither a transformers Mamba/Mamba2 config (model_type 'mamba'/'mamba2') nor a mamba_ssm "
        f"MambaLMHeadModel config (d_model, n_layer); keys: {sorted(raw)}"
    )


def _load_tensors(path: Path) -> dict[str, Tensor]:
    """All tensors of a checkpoint directory: safetensors preferred, else pickle-free torch.load."""
    from safetensors.torch import load_file

    for index_name, loader in (
        ("model.safetensors.index.json", load_file),
        ("pytorch_model.bin.index.json", partial(torch.load, map_location="cpu", weights_only=True)),
    ):
        index = path / index_name
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            sd = {}
            for shard in shards:
                sd.update(loader(str(path / shard)))
            return sd
    if (path / "model.safetensors").is_file():
        return load_file(str(path / "model.safetensors"))
    if (path / "pytorch_model.bin").is_file():
        return torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise FileNotFoundError(
        f"{path}: no model.safetensors, pytorch_model.bin or their .index.json shards; found {sorted(p.name for p in path.iterdir())}"
    )


def _convert_state_dict(sd: dict[str, Tensor], cfg: LanguageConfig, path: Path) -> dict[str, Tensor]:
    """Checkpoint keys -> ours; embedding/head rows fitted to ``cfg.padded_vocab_size``."""
    out = {}
    for key, val in sd.items():
        k = key.removeprefix("backbone.")
        k = "embedding.weight" if k == "embeddings.weight" else k
        out[k] = val
    Vp, V = cfg.padded_vocab_size, cfg.vocab_size
    for k in ("embedding.weight", "lm_head.weight"):
        if k not in out:
            continue
        w = out[k]
        if w.dim() != 2 or w.shape[0] < V or w.shape[1] != cfg.d_model:
            raise ValueError(
                f"{path}: {k} has shape {tuple(w.shape)}, expected ({V}..., {cfg.d_model}) for "
                f"vocab_size={V}, d_model={cfg.d_model}"
            )
        # rows past the vocabulary are padding either side: cut or zero-fill to our padded size
        out[k] = w[:Vp] if w.shape[0] >= Vp else torch.cat([w, w.new_zeros(Vp - w.shape[0], w.shape[1])])
    if cfg.tie_embeddings and "lm_head.weight" in out:
        head = out.pop("lm_head.weight")
        if "embedding.weight" in out and not torch.equal(head[:V], out["embedding.weight"][:V]):
            raise ValueError(
                f"{path}: lm_head.weight differs from the embedding but tie_embeddings=True; "
                "pass tie_embeddings=False"
            )
    return out


def _check_keys(model: nn.Module, sd: dict[str, Tensor], path: Path) -> None:
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        expected.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    shapes = sorted(
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(expected[k])}"
        for k in set(sd) & set(expected)
        if tuple(sd[k].shape) != tuple(expected[k])
    )
    if missing or unexpected or shapes:
        raise ValueError(
            f"{path}: checkpoint does not match LanguageMamba({model.config.ssm}):\n"
            f"  missing keys: {missing}\n  unexpected keys: {unexpected}\n  shape mismatches: {shapes}"
        )

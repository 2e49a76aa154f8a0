"""VLMamba: image -> (VisionMamba | Fuyu patch projection) -> BridgerFFN -> LanguageMamba.

Glossary: ``b`` batch, ``p`` image tokens, ``t`` text tokens, ``l`` = p + t, ``d`` language width,
``V`` vocabulary, ``n`` images (with ``b`` prompts pointing into them through ``image_index``).

The image tokens are prepended to the text (``prompt_order="image_first"``, the default: a causal
scan must read the image before the question), or placed after the prompt
(``"text_first"``: [prompt][image][target]). Padding anywhere (fuyu canvas patches, text pads,
left-padded prompts after a cached image state) is an identity step of the language model, so a
batch equals its rows run one by one.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..config import VLMambaConfig
from ..generation import GenerationConfig, decode
from ..layers.bridger import BridgerFFN
from ..layers.lora import inject_lora, lora_modules, merge_lora, unmerge_lora
from ..layers.patch_embed import FuyuPatchProjection
from ..layers.state import InferenceState, MixerState
from .decoding import make_step_fn
from .graphs import graph_cache, graph_unavailable_reason, prompt_bucket, sharded
from .language import LanguageMamba, LMOutput
from .vision import VisionMamba

log = logging.getLogger(__name__)

LOSS_REDUCTIONS = ("token", "sample")  # VLMamba.forward(loss_reduction=...)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
TOKENIZER_NAME = "tokenizer.json"
TOKENIZER_CONFIG_NAME = "tokenizer_config.json"  # the special tokens' names (vlm_mamba.export)
SAVED_FILES = frozenset({CONFIG_NAME, WEIGHTS_NAME, TOKENIZER_NAME, TOKENIZER_CONFIG_NAME})
LORA_MERGED_KEY = "lora_merged"  # safetensors metadata: JSON list of the adapters saved merged


@dataclass
class VLMambaOutput:
    """``logits`` (b, t, V): the language model's output at each text position (predicting the
    next token); ``loss``: mean cross-entropy over target tokens (labels != -100)."""

    logits: torch.Tensor | None  # None with return_logits=False
    loss: torch.Tensor | None = None  # (b, t) with loss_reduction="none"


class VLMamba(nn.Module):
    """The vision-language model. ``model(image, text_tokens)`` returns a :class:`VLMambaOutput`."""

    def __init__(self, config: VLMambaConfig, pretrained_language: str | Path | None = None) -> None:
        """Build the network; ``pretrained_language`` (a local Mamba LM directory, see
        :meth:`load_pretrained_language`) is loaded into the plain language model before any LoRA
        adapter is injected, so adapters wrap the pretrained weights."""
        super().__init__()
        self.config = config
        v = config.vision
        if config.vision_mode == "encoder":
            self.vision: nn.Module = VisionMamba(v)
        else:
            self.vision = FuyuPatchProjection(v.patch_size, v.in_chans, v.d_model)
        self.bridger = BridgerFFN.from_config(config)
        self.language = LanguageMamba(config.language, initializer_range=config.initializer_range)
        if pretrained_language is not None:
            self.load_pretrained_language(pretrained_language)
        self.lora_targets: list[str] = []
        if config.lora is not None:
            self._add_lora()
        self._apply_freezing()

    # ------------------------------------------------------------------ set-up
    @torch.no_grad()
    def load_pretrained_language(self, path: str | Path) -> None:
        """Copy a local pretrained Mamba LM (transformers or mamba_ssm layout, read by
        ``LanguageMamba.from_pretrained``) into ``self.language``; shapes must match the config.

        Only before adapters exist: the checkpoint names plain ``in_proj.weight``, an injected
        adapter ``in_proj.base.weight`` (the constructor's ``pretrained_language`` orders it right).
        """
        if self.has_lora:
            raise ValueError(
                "load_pretrained_language: LoRA adapters are already injected; pass pretrained_language "
                "to VLMamba(...) so the weights load into the plain modules first"
            )
        src = LanguageMamba.from_pretrained(path).state_dict()
        ours = self.language.state_dict()
        bad = [k for k in ours if k in src and src[k].shape != ours[k].shape]
        missing = [k for k in ours if k not in src]
        unexpected = [k for k in src if k not in ours]
        if bad or missing or unexpected:
            raise ValueError(
                f"pretrained_language={path}: does not fit model.language (shape mismatch: {bad[:5]}, "
                f"missing: {missing[:5]}, unexpected: {unexpected[:5]}); set model.language to its config"
            )
        self.language.load_state_dict(src, strict=True)

    def _add_lora(self) -> None:
        lora = self.config.lora
        if lora.apply_to in ("language", "both"):
            self.lora_targets += [f"language.{n}" for n in inject_lora(self.language, lora)]
        if lora.apply_to in ("vision", "both") and self.config.vision_mode == "encoder":
            self.lora_targets += [f"vision.{n}" for n in inject_lora(self.vision, lora)]

    def _apply_freezing(self) -> None:
        """Training stages: LoRA trains only the adapters (+ the connector); else the freeze flags.

        In fuyu mode the patch projection has no pretrained weights: it is part of the connector
        and trains with the bridge.
        """
        cfg = self.config
        if cfg.lora is not None:
            for name, p in self.named_parameters():
                p.requires_grad_("lora_A" in name or "lora_B" in name)
            if cfg.lora.train_bridge:
                self.bridger.requires_grad_(True)
                if cfg.vision_mode == "fuyu":
                    self.vision.requires_grad_(True)
        if cfg.freeze_vision:
            self.vision.requires_grad_(False)
        if cfg.freeze_language:
            self.language.requires_grad_(False)

    # ------------------------------------------------------------------ images
    def encode_images(
        self, images: torch.Tensor, image_sizes: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(n, c, H, W) -> image tokens in language width (n, p, d) and their mask (n, p) bool.

        Pixels are cast to the vision weights' dtype (a loader's fp32 images into a bf16 model), as
        transformers' vision towers do with ``pixel_values``."""
        images = images.to(next(self.vision.parameters()).dtype)
        if self.config.vision.center_images:
            images = center_images(images, image_sizes)
        if self.config.vision_mode == "encoder":
            feats = self.vision(images)  # (n, p, d_vis)
            mask = torch.ones(feats.shape[:2], dtype=torch.bool, device=feats.device)
        else:
            feats, mask = self.vision(images, image_sizes)  # (n, p, d_vis), (n, p)
        return self.bridger(feats), mask

    # ------------------------------------------------------------------ training forward
    def forward(
        self,
        images: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        loss_reduction: str = "token",
        return_logits: bool = True,
    ) -> VLMambaOutput:
        """Teacher-forced pass over [image][text] (or [prompt][image][target]).

        Args:
            images: (b, c, H, W); fuyu: a canvas with ``image_sizes`` (b, 2).
            input_ids: (b, t), right padded.
            attention_mask: (b, t) 1 on real tokens; None = all real.
            labels: (b, t) aligned with ``input_ids``; -100 on prompt and padding.
            loss_reduction: ``"token"``: the mean cross-entropy over all target tokens of the batch
                (a 15-token caption weighs 15 times a one-word answer); ``"sample"``: the mean over
                each sequence's target tokens, then over the sequences, so every example weighs the
                same whatever its length (task mixes of captions and short answers); ``"none"``: the
                (b, t) cross-entropy of each text token (0 where it is no target), for analysis.
            return_logits: False skips the (b, t, V) logits (training reads only the loss, whose
                head runs on the target positions alone); ``logits`` is then None.
        """
        if loss_reduction not in (*LOSS_REDUCTIONS, "none"):
            raise ValueError(
                f"loss_reduction={loss_reduction!r}: expected one of {LOSS_REDUCTIONS} or 'none'"
            )
        b, t = input_ids.shape
        img, img_mask = self.encode_images(images, image_sizes)  # (b, p, d), (b, p)
        txt = self.language.embed(input_ids)  # (b, t, d)
        tmask = (
            torch.ones(b, t, dtype=torch.bool, device=input_ids.device)
            if attention_mask is None
            else attention_mask.bool()
        )
        split = self._text_before_image(tmask, labels)  # (b,)
        image_first = self.config.prompt_order == "image_first"
        emb, mask, text_pos = _interleave(
            txt, tmask, img, img_mask, split, image_first
        )  # (b,l,d) (b,l) (b,t)
        # decided from the inputs' structure, not their values: no host sync in the training forward
        all_real = attention_mask is None and self.config.vision_mode == "encoder"
        hidden = self.language(
            inputs_embeds=emb, attention_mask=None if all_real else mask, logits="none"
        ).hidden_states  # (b, l, d)
        logits = None
        if return_logits:
            logits = self.language._logits(_gather_time(hidden, text_pos))  # (b, t, V)
        loss = None
        if labels is not None:
            loss = self._loss(hidden, text_pos, mask, labels, loss_reduction)
        return VLMambaOutput(logits=logits, loss=loss)

    def _loss(
        self,
        hidden: torch.Tensor,
        text_pos: torch.Tensor,
        mask: torch.Tensor,
        labels: torch.Tensor,
        reduction: str = "token",
    ) -> torch.Tensor:
        """Cross-entropy over target tokens (labels != -100), reduced per ``reduction`` (see forward).

        Text token k is predicted by the last *real* position before it (``mask`` (b, l) of the
        interleaved sequence): mostly text token k-1; where the image sits in between
        ([prompt][image][target], or a labelled first token) the last real image token. A padded
        slot must never predict: the language model moves pads after the real tokens
        (``ops.compact_by_mask``), so a pad's output has read the whole row, targets included (a
        fuyu canvas smaller than its grid ends in such slots).

        The head runs on the predicting positions of target tokens only (a VQA batch is mostly
        prompt), through ``ops.linear_cross_entropy``, which never holds the logits of all of them
        at once; the reductions are its row weights.
        """
        target = labels != -100  # (b, t)
        pred = ops.previous_real(mask).gather(1, text_pos)  # (b, t) position predicting each text token
        scored = target & (pred >= 0)
        h = _gather_time(hidden, pred.clamp_min(0))[scored]  # (m, d)
        y = labels[scored]  # (m,)
        if reduction == "none":
            ce = torch.zeros(labels.shape, dtype=torch.float32, device=labels.device)  # (b, t)
            ce[scored] = F.cross_entropy(self.language._logits(h).float(), y, reduction="none")
            return ce
        count = scored.sum(1)  # (b,) target tokens per sequence
        if reduction == "token":
            weight = torch.full(y.shape, 1.0, device=y.device) / count.sum().clamp_min(1)
        else:  # "sample": each sequence with a target weighs the same
            rows_with_targets = (count > 0).sum().clamp_min(1)
            weight = (1.0 / (count.clamp_min(1) * rows_with_targets))[:, None].expand_as(labels)[scored]
        head = self.language.lm_head.weight[: self.config.language.vocab_size]  # (V, d), padded rows cut
        return ops.linear_cross_entropy(h, head, y, weight)

    def _text_before_image(self, tmask: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """(b,) number of text positions placed before the image tokens."""
        b, t = tmask.shape
        if self.config.prompt_order == "image_first":
            return torch.zeros(b, dtype=torch.long, device=tmask.device)
        if labels is None:  # no prompt/target split known: all the text, then the image
            return torch.full((b,), t, dtype=torch.long, device=tmask.device)
        is_target = (labels != -100) & tmask  # the prompt is everything before the first target
        first = torch.where(is_target.any(1), is_target.float().argmax(1), tmask.sum(1))
        return first.long()

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def prefill_images(
        self,
        images: torch.Tensor,
        image_sizes: torch.Tensor | None = None,
        prefix_ids: torch.Tensor | None = None,
        cuda_graph: bool | None = False,
    ):
        """The image-state cache: run the language model over each image's tokens (and an
        optional fixed prompt prefix (s,)) once, returning the state (an ``InferenceState`` of n
        rows) to fork for any number of prompts (VQAv2 asks ~5 questions per image).

        ``cuda_graph``: on CUDA, in encoder mode without ``image_sizes`` or a prefix (fixed shapes),
        the vision encoder, the bridge and the LM prefill replay as one CUDA graph per image batch
        shape (``vlm_mamba.models.graphs``); elsewhere it runs op by op, as without it (True logs
        why once, None does not)."""
        if self.config.prompt_order != "image_first":
            raise ValueError("the image-state cache needs prompt_order='image_first'")
        if (
            cuda_graph is not False
            and image_sizes is None
            and prefix_ids is None
            and self._graphable(images, quiet=cuda_graph is None)
        ):
            flat = graph_cache(self).run("prefill_images", self._image_prefill_flat, [images])
            if flat is not None:
                return _unflatten_state(flat)
        img, img_mask = self.encode_images(images, image_sizes)
        if prefix_ids is not None:
            pre = self.language.embed(prefix_ids.view(1, -1).expand(img.shape[0], -1))
            img = torch.cat([img, pre], dim=1)
            img_mask = torch.cat(
                [img_mask, torch.ones(pre.shape[:2], dtype=torch.bool, device=pre.device)], 1
            )
        out = self.language(
            inputs_embeds=img, attention_mask=_none_if_all(img_mask), return_state=True, logits="none"
        )
        return out.state

    def _graphable(self, x: torch.Tensor, quiet: bool = False) -> bool:
        """Whether this call can replay a CUDA graph: CUDA kernels, encoder mode, eval mode, not
        sharded; otherwise it runs op by op (logged once per reason unless ``quiet``)."""
        reason = graph_unavailable_reason(x.device)
        if reason is None and self.config.vision_mode != "encoder":
            reason = "fuyu mode (the canvas shapes follow each batch's images)"
        if reason is None and (self.training or sharded(self)):
            reason = "the model is training or sharded (FSDP)"
        if reason is not None and not quiet and reason not in _GRAPH_LOGGED:
            _GRAPH_LOGGED.add(reason)
            log.info("prefill runs without CUDA graphs: %s", reason)
        return reason is None

    def _image_prefill_flat(self, images: torch.Tensor) -> list[torch.Tensor]:
        """``prefill_images`` in encoder mode as a function of tensors: the state's tensors, flat."""
        img, _ = self.encode_images(images)
        return _flatten_state(self.language(inputs_embeds=img, return_state=True, logits="none").state)

    def _prompt_prefill_flat(
        self, txt: torch.Tensor, mask: torch.Tensor, *state: torch.Tensor
    ) -> list[torch.Tensor]:
        """The prompt prefill from a forked image state as a function of tensors: (last logits (b,V),
        the new state's tensors flat). Always masked (a graph cannot ask the host whether it must)."""
        out = self.language(
            inputs_embeds=txt,
            attention_mask=mask,
            state=_unflatten_state(state),
            return_state=True,
            logits="last",
        )
        return [out.logits[:, -1], *_flatten_state(out.state)]

    @torch.no_grad()
    def generate(
        self,
        images: torch.Tensor | None,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        image_index: torch.Tensor | None = None,
        image_state: Any = None,
        use_image_cache: bool = True,
        **gen_kwargs: Any,
    ) -> torch.Tensor:
        """Batched decoding for (b) prompts about (n) images.

        Args:
            images: (n, c, H, W), or None when ``image_state`` (from :meth:`prefill_images`) is given.
            prompt_ids: (b, s) LEFT padded; ``prompt_mask`` (b, s) 1 on real tokens.
            image_index: (b,) the image row of each prompt; None = prompt i asks about image i.
            use_image_cache: prefill each image once and fork its state (image_first only); False
                recomputes [image][prompt] for every prompt (same result, the test's reference).
            gen_kwargs: :class:`GenerationConfig` fields; ``eos_token_id`` / ``pad_token_id``
                default to the model config's.

        Returns:
            (b, n_new) token ids: each row ends at its EOS, then padding.
        """
        gen_kwargs.setdefault("eos_token_id", self.config.eos_token_id)
        gen_kwargs.setdefault("pad_token_id", self.config.pad_token_id)
        gcfg = GenerationConfig(**gen_kwargs)
        b, s = prompt_ids.shape
        dev = prompt_ids.device
        pmask = torch.ones(b, s, dtype=torch.bool, device=dev) if prompt_mask is None else prompt_mask.bool()
        if image_index is None:
            image_index = torch.arange(b, device=dev)
        txt = self.language.embed(prompt_ids)  # (b, s, d)
        lm = self.language
        if self.config.prompt_order == "image_first" and (use_image_cache or image_state is not None):
            if image_state is None:
                image_state = self.prefill_images(images, image_sizes, cuda_graph=gcfg.prefill_graph)
            state = image_state.index_select(image_index)  # fork: (b, ...)
            flat = None
            if gcfg.prefill_graph is not False and self._graphable(txt, quiet=gcfg.prefill_graph is None):
                # left-pad the prompts to their bucket: the pads are identity steps, so one graph
                # serves every prompt length up to the bucket
                pad = prompt_bucket(s) - s
                txt_p, mask_p = F.pad(txt, (0, 0, pad, 0)), F.pad(pmask, (pad, 0), value=False)
                flat = graph_cache(self).run(
                    "prompt_prefill", self._prompt_prefill_flat, [txt_p, mask_p, *_flatten_state(state)]
                )
            if flat is not None:
                out = LMOutput(flat[0][:, None], _unflatten_state(flat[1:]))
            else:
                out = lm(
                    inputs_embeds=txt,
                    attention_mask=_none_if_all(pmask),
                    state=state,
                    return_state=True,
                    logits="last",
                )
        else:
            img, img_mask = self.encode_images(images, image_sizes)
            img, img_mask = img[image_index], img_mask[image_index]  # (b, p, d), (b, p)
            if self.config.prompt_order == "image_first":
                emb, mask = torch.cat([img, txt], 1), torch.cat([img_mask, pmask], 1)
            else:
                emb, mask = torch.cat([txt, img], 1), torch.cat([pmask, img_mask], 1)
            out = lm(inputs_embeds=emb, attention_mask=_none_if_all(mask), return_state=True, logits="none")
            # the last real position predicts the first new token: with text_first a fuyu canvas can
            # end in padded slots, whose outputs are no prediction (see _loss)
            last_real = ops.previous_real(F.pad(mask, (0, 1), value=True))[:, -1].clamp_min(0)  # (b,)
            out.logits = lm._logits(_gather_time(out.hidden_states, last_real[:, None]))  # (b, 1, V)
        last = out.logits[:, -1]  # (b, V): left padding puts every row's last real token last
        return decode(make_step_fn(lm, gcfg.decoder, last.device), out.state, last, gcfg)

    # ------------------------------------------------------------------ utilities
    def num_parameters(self, trainable_only: bool = False) -> dict[str, int]:
        """Parameter counts per component (tied embedding/head counted once)."""

        def count(m: nn.Module) -> int:
            seen, n = set(), 0
            for p in m.parameters():
                if id(p) in seen or (trainable_only and not p.requires_grad):
                    continue
                seen.add(id(p))
                n += p.numel()
            return n

        out = {"vision": count(self.vision), "bridger": count(self.bridger), "language": count(self.language)}
        out["total"] = count(self)
        out["trainable"] = sum(
            p.numel() for p in {id(p): p for p in self.parameters() if p.requires_grad}.values()
        )
        return out

    def merge_lora(self, unload: bool = False) -> VLMamba:
        """Fold adapters into the weights; ``unload`` leaves a plain model (config.lora = None)."""
        merge_lora(self, unload=unload)
        if unload:
            self.config = self.config.model_copy(update={"lora": None})
            self.lora_targets = []
        return self

    def unmerge_lora(self) -> VLMamba:
        unmerge_lora(self)
        return self

    @property
    def has_lora(self) -> bool:
        return any(True for _ in lora_modules(self))

    def save_pretrained(
        self, path: str | Path, tokenizer: Any = None, extra_files: Mapping[str, str] | None = None
    ) -> Path:
        """Write ``config.json``, ``model.safetensors`` and, if given, ``tokenizer.json`` to ``path``.

        ``tokenizer`` may be a path to a tokenizer.json or an object with ``save(path)``;
        ``extra_files`` maps further names in :data:`SAVED_FILES` to their text. Which adapters are
        merged is stored in the weights' metadata, so a merged model reloads merged (its
        ``base.weight`` already holds the update) and can still be unmerged.

        Everything is written into a fresh temporary sibling folder; an existing ``path`` is renamed
        aside, the new folder renamed in, then the old one removed, so a complete model is on disk
        at every moment. ``path`` must be absent, empty, or an earlier save_pretrained output
        (nothing but :data:`SAVED_FILES`): anything else raises ``FileExistsError`` and is left alone.
        """
        from safetensors.torch import save_model

        path = Path(path)
        _check_replaceable(path)
        unknown = set(extra_files or {}) - SAVED_FILES
        if unknown:
            raise ValueError(f"save_pretrained: extra_files {sorted(unknown)} not in {sorted(SAVED_FILES)}")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
        try:
            self.config.to_json(tmp / CONFIG_NAME)
            merged = [name for name, mod in lora_modules(self) if mod.merged]
            meta = {"format": "pt", "library": "vlm_mamba", LORA_MERGED_KEY: json.dumps(merged)}
            save_model(self, str(tmp / WEIGHTS_NAME), metadata=meta)
            if tokenizer is not None:
                if isinstance(tokenizer, (str, Path)):
                    shutil.copy(tokenizer, tmp / TOKENIZER_NAME)
                else:
                    tokenizer.save(str(tmp / TOKENIZER_NAME))
            for name, text in (extra_files or {}).items():
                (tmp / name).write_text(text)
            _swap_in(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # our own temporary folder only
            raise
        return path

    @classmethod
    def from_pretrained(
        cls, path: str | Path, map_location: str | torch.device = "cpu", **overrides
    ) -> VLMamba:
        """Load a :meth:`save_pretrained` directory (no training code needed), adapters merged or not
        as they were saved."""
        from safetensors import safe_open
        from safetensors.torch import load_model

        path = Path(path)
        cfg_file = path / CONFIG_NAME
        if not cfg_file.is_file():
            raise FileNotFoundError(f"{cfg_file} not found: not a VLMamba.save_pretrained directory")
        data = json.loads(cfg_file.read_text())
        data.update(overrides)
        model = cls(VLMambaConfig.model_validate(data))
        weights = path / WEIGHTS_NAME
        missing, unexpected = load_model(model, str(weights), strict=False, device=str(map_location))
        if missing or unexpected:
            raise ValueError(
                f"{weights}: missing keys {sorted(missing)}, unexpected keys {sorted(unexpected)}"
            )
        with safe_open(str(weights), framework="pt") as f:
            merged = json.loads((f.metadata() or {}).get(LORA_MERGED_KEY, "[]"))
        adapters = dict(lora_modules(model))
        stray = [name for name in merged if name not in adapters]
        if stray:
            raise ValueError(
                f"{weights}: metadata marks {stray[:5]} as merged LoRA adapters; the model has none"
            )
        for name in merged:  # base.weight already holds W + BA: mark it, do not fold it in again
            adapters[name].merged = True
        return model.to(map_location)


def _check_replaceable(path: Path) -> None:
    """Raise unless ``path`` is absent, an empty folder or an earlier save_pretrained output."""
    if not path.exists():
        return
    if not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a directory; save_pretrained will not replace it")
    names = {p.name for p in path.iterdir()}
    if names and not ({CONFIG_NAME, WEIGHTS_NAME} <= names and names <= SAVED_FILES):
        other = sorted(names - SAVED_FILES) or sorted({CONFIG_NAME, WEIGHTS_NAME} - names)
        raise FileExistsError(
            f"{path} is not empty and not a VLMamba.save_pretrained output (it has {other[:5]}); "
            "save_pretrained replaces only its own outputs: choose another directory"
        )


def _swap_in(new: Path, path: Path) -> None:
    """Rename ``new`` to ``path``; an existing ``path`` is renamed aside first and removed last."""
    if not path.exists():
        new.rename(path)
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
    aside.rmdir()  # a unique free name for the rename below
    path.rename(aside)
    try:
        new.rename(path)
    except BaseException:
        aside.rename(path)  # put the previous model back
        raise
    shutil.rmtree(aside)  # the previous save_pretrained output (checked by _check_replaceable)


# ---------------------------------------------------------------------- sequence helpers
def center_images(images: torch.Tensor, image_sizes: torch.Tensor | None = None) -> torch.Tensor:
    """Subtract each image's per-channel mean; with ``image_sizes`` (fuyu canvases, each image at
    the top-left) the mean is over the real pixels only and the padding stays zero."""
    if image_sizes is None:
        return images - images.mean(dim=(2, 3), keepdim=True)
    h, w = images.shape[-2:]
    rows = torch.arange(h, device=images.device)[None, :, None] < image_sizes[:, 0, None, None]
    cols = torch.arange(w, device=images.device)[None, None, :] < image_sizes[:, 1, None, None]
    real = (rows & cols)[:, None].to(images.dtype)  # (n, 1, H, W)
    mean = (images * real).sum(dim=(2, 3), keepdim=True) / real.sum(dim=(2, 3), keepdim=True).clamp_min(1)
    return (images - mean) * real


def _flatten_state(state: InferenceState) -> list[torch.Tensor]:
    return [t for layer in state for t in (layer.conv, layer.ssm)]


def _unflatten_state(flat: Sequence[torch.Tensor]) -> InferenceState:
    return InferenceState([MixerState(flat[i], flat[i + 1]) for i in range(0, len(flat), 2)])


_GRAPH_LOGGED: set[str] = set()


def _none_if_all(mask: torch.Tensor) -> torch.Tensor | None:
    """Masks that mark every position real are dropped: the unmasked kernels are faster."""
    return None if bool(mask.all()) else mask


def _gather_time(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x (b, l, d), idx (b, t) -> (b, t, d)."""
    return x.gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))


def _interleave(
    txt: torch.Tensor,
    tmask: torch.Tensor,
    img: torch.Tensor,
    img_mask: torch.Tensor,
    split: torch.Tensor,
    image_first: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row: text[:split], image, text[split:].

    Args:
        txt (b, t, d), tmask (b, t), img (b, p, d), img_mask (b, p), split (b,); ``image_first``:
        split is 0 in every row (prompt_order="image_first"), a plain concatenation.

    Returns:
        embeddings (b, l, d), mask (b, l), and the position of every text token (b, t).
    """
    b, t, _ = txt.shape
    p = img.shape[1]
    dev = txt.device
    k = torch.arange(t, device=dev)[None, :]  # (1, t)
    text_pos = torch.where(k < split[:, None], k, k + p)  # (b, t)
    if image_first:  # a plain concatenation
        return torch.cat([img, txt], 1), torch.cat([img_mask, tmask], 1), text_pos
    j = torch.arange(t + p, device=dev)[None, :]  # (1, l)
    s = split[:, None]
    src = torch.where(j < s, j, torch.where(j < s + p, t + (j - s), j - p))  # index into cat([txt, img])
    both = torch.cat([txt, img.to(txt.dtype)], 1)  # (b, t+p, d)
    both_mask = torch.cat([tmask, img_mask], 1)
    return _gather_time(both, src), both_mask.gather(1, src), text_pos

"""Text tokenizer: a byte-level BPE trained at prepare time, or any local HF ``tokenizer.json``.

Byte-level BPE (GPT-2 style, HF ``tokenizers``) so every string round-trips exactly and no text is
ever out of vocabulary. Our trained tokenizers put the specials first: ``<|pad|>`` = 0 (the model's
default ``pad_token_id``), ``<|bos|>`` = 1, ``<|eos|>`` = 2. A loaded tokenizer (e.g. the GPT-NeoX one
of the public Mamba LMs) gets its BOS/EOS/PAD from ``tokenizer_config.json`` /
``special_tokens_map.json`` beside it, else from well-known token names; a tokenizer without a pad
token pads with EOS (padding is masked everywhere, so its id never matters).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|eos|>"
_BOS_NAMES = (BOS, "<s>", "<|begin_of_text|>", "<|endoftext|>", "[CLS]")
_EOS_NAMES = (EOS, "</s>", "<|end_of_text|>", "<|endoftext|>", "[SEP]")
_PAD_NAMES = (PAD, "<pad>", "<|padding|>", "[PAD]")


class TextTokenizer:
    """A HF ``tokenizers.Tokenizer`` plus the BOS/EOS/PAD ids the collate functions and the model need.

    ``encode`` never adds specials (collate places BOS/EOS itself); ``decode`` drops them.
    """

    def __init__(self, tokenizer: Tokenizer, bos_token: str, eos_token: str, pad_token: str | None = None):
        self.tokenizer = tokenizer
        self.bos_token, self.eos_token = bos_token, eos_token
        self.pad_token = pad_token or eos_token
        ids = {}
        for role, tok in (("bos", self.bos_token), ("eos", self.eos_token), ("pad", self.pad_token)):
            tid = tokenizer.token_to_id(tok)
            if tid is None:
                raise ValueError(f"{role} token {tok!r} is not in the tokenizer's vocabulary")
            ids[role] = tid
        self.bos_token_id: int = ids["bos"]
        self.eos_token_id: int = ids["eos"]
        self.pad_token_id: int = ids["pad"]

    @classmethod
    def from_json(cls, text: str, specials: dict[str, str | None] | None = None) -> TextTokenizer:
        """From a ``tokenizer.json`` string and the special token names (as a checkpoint stores
        them, see ``VLMambaLitModule.on_save_checkpoint``); our defaults where a name is missing."""
        specials = specials or {}
        return cls(
            Tokenizer.from_str(text),
            bos_token=specials.get("bos_token") or BOS,
            eos_token=specials.get("eos_token") or EOS,
            pad_token=specials.get("pad_token"),
        )

    def specials(self) -> dict[str, str]:
        """The special tokens' names, as ``tokenizer_config.json`` and checkpoints store them."""
        return {"bos_token": self.bos_token, "eos_token": self.eos_token, "pad_token": self.pad_token}

    @property
    def vocab_size(self) -> int:
        """Number of ids (added tokens included): the model's ``language.vocab_size``."""
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def batch_decode(self, batch: Iterable[Iterable[int]], skip_special_tokens: bool = True) -> list[str]:
        return [self.decode(ids, skip_special_tokens) for ids in batch]

    def special_ids(self) -> dict[str, int]:
        """``{"bos_token_id", "eos_token_id", "pad_token_id"}`` as VLMambaConfig names them."""
        return {
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
        }

    def save(self, path: str | Path) -> Path:
        """Write ``tokenizer.json`` (+ ``tokenizer_config.json`` naming the specials) atomically.

        ``path`` is a directory or a ``*.json`` file name.
        """
        path = Path(path)
        if path.suffix != ".json":
            path = path / "tokenizer.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        self.tokenizer.save(str(tmp))
        os.replace(tmp, path)
        cfg = self.specials()
        cfg_path = path.with_name("tokenizer_config.json")
        tmp = cfg_path.with_name(f".{cfg_path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(cfg, indent=1))
        os.replace(tmp, cfg_path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> TextTokenizer:
        """Load a ``tokenizer.json`` file or a directory holding one (a HF model folder)."""
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(
                f"tokenizer {file} not found (prepare a dataset to train one, or point to a HF tokenizer.json)"
            )
        tok = Tokenizer.from_file(str(file))
        specials = _read_specials(file.parent)
        vocab = tok.get_vocab(with_added_tokens=True)

        def pick(role: str, names: tuple[str, ...]) -> str | None:
            if specials.get(role) in vocab:
                return specials[role]
            return next((n for n in names if n in vocab), None)

        bos, eos, pad = (
            pick("bos_token", _BOS_NAMES),
            pick("eos_token", _EOS_NAMES),
            pick("pad_token", _PAD_NAMES),
        )
        if eos is None:
            raise ValueError(f"{file}: no EOS token found (tried tokenizer_config.json and {_EOS_NAMES})")
        return cls(tok, bos or eos, eos, pad)


def _read_specials(folder: Path) -> dict[str, str]:
    """bos/eos/pad token strings from HF's ``tokenizer_config.json`` or ``special_tokens_map.json``."""
    out: dict[str, str] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # later files win
        f = folder / name
        if not f.is_file():
            continue
        try:
            cfg = json.loads(f.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{f}: not valid JSON: {err}") from err
        for role in ("bos_token", "eos_token", "pad_token"):
            v = cfg.get(role)
            if isinstance(v, dict):
                v = v.get("content")
            if isinstance(v, str):
                out[role] = v
    return out


def train_bpe_tokenizer(
    texts: Iterable[str], vocab_size: int = 8192, min_frequency: int = 2
) -> TextTokenizer:
    """Train a byte-level BPE on ``texts``; ids 0/1/2 = pad/bos/eos.

    The vocabulary may come out smaller than ``vocab_size`` on a small corpus (no merge left to make).
    """
    if vocab_size < 256 + 3:
        raise ValueError(f"vocab_size={vocab_size} must be >= 259 (256 byte symbols + pad/bos/eos)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return TextTokenizer(tok, BOS, EOS, PAD)

"""Tokenizer: BPE training, exact round trip, specials, loading other HF tokenizers."""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from vlm_mamba.data.tokenizer import TextTokenizer, train_bpe_tokenizer

CORPUS = ["a red circle at the top left.", "Question: what color is the square? Answer: blue"] * 50


@pytest.fixture(scope="module")
def tok():
    return train_bpe_tokenizer(CORPUS, vocab_size=400)


def test_specials_come_first(tok):
    assert tok.special_ids() == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    assert 259 < tok.vocab_size <= 400


@pytest.mark.parametrize(
    "text", ["a red circle at the top left.", "  two  spaces", "Ünïcödé ✓ 漢字 🙂", "x\ny\t", ""]
)
def test_round_trip_is_exact(tok, text):
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_training_merges_frequent_words(tok):
    assert len(tok.encode(" circle")) == 1  # seen 50 times: one token
    assert tok.encode("") == []


def test_decode_drops_specials(tok):
    ids = [tok.bos_token_id, *tok.encode("a red circle"), tok.eos_token_id, tok.pad_token_id]
    assert tok.decode(ids) == "a red circle"
    assert tok.batch_decode([ids, tok.encode(" blue")]) == ["a red circle", " blue"]


def test_save_load_file_and_folder(tok, tmp_path):
    path = tok.save(tmp_path / "tk")
    assert path == tmp_path / "tk" / "tokenizer.json"
    for src in (path, tmp_path / "tk"):
        again = TextTokenizer.load(src)
        assert again.special_ids() == tok.special_ids() and again.encode("red square") == tok.encode(
            "red square"
        )


def test_load_neox_style_tokenizer_without_pad(tmp_path):
    """GPT-NeoX style: <|endoftext|> is BOS and EOS, named in tokenizer_config.json as dicts."""
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=280, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    t.train_from_iterator(CORPUS, trainer=trainer)
    t.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": {"content": "<|endoftext|>"}, "eos_token": "<|endoftext|>"})
    )
    loaded = TextTokenizer.load(tmp_path)
    assert loaded.bos_token_id == loaded.eos_token_id == loaded.pad_token_id == 0  # pad falls back to eos


def test_missing_tokenizer_and_missing_eos_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer .* not found"):
        TextTokenizer.load(tmp_path / "nope.json")
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel()
    t.train_from_iterator(
        CORPUS,
        trainer=trainers.BpeTrainer(vocab_size=270, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()),
    )
    t.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match="no EOS token"):
        TextTokenizer.load(tmp_path / "tokenizer.json")


def test_vocab_too_small_is_rejected():
    with pytest.raises(ValueError, match="vocab_size=100"):
        train_bpe_tokenizer(CORPUS, vocab_size=100)

"""Shared-tokenizer check on small tokenizers built in the test."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from eft_jax.vocab import VocabMismatchError, common_vocab_size

WORDS = ["<unk>", "<s>", "</s>", "the", "cat", "sat", "on", "mat", "a", "dog", "ran", "far"]


def make_tokenizer(words: list[str], added: list[str] = ()) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    if added:
        fast.add_tokens(list(added))
    return fast


def test_identical_tokenizers():
    toks = {"large_base": make_tokenizer(WORDS), "small_base": make_tokenizer(WORDS), "small_ft": make_tokenizer(WORDS)}
    assert common_vocab_size(toks) == len(WORDS)


def test_single_tokenizer():
    assert common_vocab_size({"only": make_tokenizer(WORDS)}) == len(WORDS)


def test_extra_added_tokens_give_min_size():
    chat = make_tokenizer(WORDS, added=["<|im_start|>", "<|im_end|>"])
    assert len(chat) == len(WORDS) + 2
    assert common_vocab_size({"base": make_tokenizer(WORDS), "chat": chat}) == len(WORDS)
    assert common_vocab_size({"chat": chat, "base": make_tokenizer(WORDS)}) == len(WORDS)


def test_swapped_token_raises_naming_id_and_strings():
    swapped = list(WORDS)
    swapped[4], swapped[5] = swapped[5], swapped[4]
    toks = {
        "large_base": make_tokenizer(WORDS),
        "small_base": make_tokenizer(WORDS),
        "small_ft": make_tokenizer(swapped),
    }
    with pytest.raises(VocabMismatchError) as err:
        common_vocab_size(toks)
    msg = str(err.value)
    assert "'large_base'" in msg and "'small_ft'" in msg
    assert "token id 4" in msg and "'cat'" in msg and "'sat'" in msg
    assert isinstance(err.value, ValueError)


def test_different_added_token_in_common_range_raises():
    a = make_tokenizer(WORDS, added=["<|a|>", "<|b|>"])
    b = make_tokenizer(WORDS, added=["<|x|>"])
    with pytest.raises(VocabMismatchError, match=r"token id 12 is '<\|a\|>' in 'a' but '<\|x\|>' in 'b'"):
        common_vocab_size({"a": a, "b": b})


def test_empty_mapping():
    with pytest.raises(ValueError, match="at least one"):
        common_vocab_size({})

"""Check that the models of an EFT combination share one vocabulary, and find each model's end tokens.

EFT adds and subtracts per-token log-probs of different models, which only makes sense when token id
``i`` means the same string in every model. Tokenizers may differ in length (added tokens, padded
vocabularies); the common range ``[0, min(len(tokenizer)))`` must match exactly, and the engine masks
ids beyond it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # keep `import eft_jax.vocab` free of the transformers import cost
    from transformers import PreTrainedTokenizerBase

__all__ = ["END_MARKERS", "VocabMismatchError", "common_vocab_size", "end_token_ids"]

# Special tokens that end a text or a turn in the families people use (GPT-2 / Qwen / Phi-2 end of text,
# Qwen / ChatML end of turn, Llama 3 end of text / turn / message, Gemma end of turn and end of text,
# Phi-3 end of turn, Llama 2 / Mistral / Falcon-style EOS, DeepSeek's). A checkpoint often declares only
# one of them as its EOS (every Qwen2.5 GGUF declares only <|im_end|>), yet in EFT the models disagree on
# which one ends an answer: a plain-prompted base ends with <|endoftext|>, a chat model with <|im_end|>.
END_MARKERS = (
    "<|endoftext|>", "<|im_end|>", "<|end_of_text|>", "<|eot_id|>", "<|eom_id|>", "<end_of_turn>", "<eos>",
    "</s>", "<|end|>", "<|end▁of▁sentence|>",
)


class VocabMismatchError(ValueError):
    """Two models map the same token id to different token strings."""


def _id_to_token(tokenizer: PreTrainedTokenizerBase, n: int) -> list[str | None]:
    """Token strings of ids 0..n-1 (None for an id the tokenizer does not define), in one call."""
    tokens = tokenizer.convert_ids_to_tokens(list(range(n)))
    return list(tokens)


def common_vocab_size(tokenizers: Mapping[str, PreTrainedTokenizerBase]) -> int:
    """The common vocabulary size ``min(len(tok))`` of all tokenizers, after checking that they agree.

    Every tokenizer must map each id below that size to the same token string as the first one;
    otherwise :class:`VocabMismatchError` names both models, the first differing id and both strings.
    """
    if not tokenizers:
        raise ValueError("common_vocab_size needs at least one tokenizer")
    sizes = {name: len(tok) for name, tok in tokenizers.items()}
    n = min(sizes.values())
    names = list(tokenizers)
    ref_name = names[0]
    ref_tokens = _id_to_token(tokenizers[ref_name], n)
    for name in names[1:]:
        tokens = _id_to_token(tokenizers[name], n)
        if tokens == ref_tokens:  # one C-level comparison in the common case
            continue
        first = next(i for i, (a, b) in enumerate(zip(ref_tokens, tokens, strict=True)) if a != b)
        raise VocabMismatchError(
            f"models {ref_name!r} and {name!r} do not share a tokenizer: token id {first} is "
            f"{ref_tokens[first]!r} in {ref_name!r} but {tokens[first]!r} in {name!r} "
            f"(compared ids 0..{n - 1}; tokenizer sizes {sizes}). EFT needs every model to use the same "
            "vocabulary over the common id range."
        )
    return n


def end_token_ids(tokenizer: PreTrainedTokenizerBase, declared: tuple[int, ...] = (), *,
                  markers: bool = True) -> tuple[int, ...]:
    """The ids that end generation for one model: its tokenizer's EOS, the ids its checkpoint declares
    (``Model.end_token_ids``: generation_config.json / config.json ``eos_token_id``, GGUF eos / eot / eom),
    and with ``markers`` every special token of the vocabulary named in ``END_MARKERS`` (special or added
    tokens only: never an ordinary piece of text that happens to spell one)."""
    eos = tokenizer.eos_token_id
    ids = {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None}
    ids |= {int(t) for t in declared}
    if markers:
        special = {**tokenizer.get_added_vocab(),
                   **{t: tokenizer.convert_tokens_to_ids(t) for t in tokenizer.all_special_tokens}}
        ids |= {int(special[m]) for m in END_MARKERS if special.get(m) is not None}
    return tuple(sorted(ids))

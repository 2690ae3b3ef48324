"""Check that the models of an EFT combination share one vocabulary.

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

__all__ = ["VocabMismatchError", "common_vocab_size"]


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

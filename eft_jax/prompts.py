"""Per-model prompt rendering and tokenization, left-padding and length buckets.

Each model of an EFT spec gets the same prompt in its own format (chat template for a chat model,
plain text or a base-style template for a base model), so each has its own prompt tokens. Generated
tokens are shared by all models and never re-tokenized.

A response prefix (proxy-tuning's ``chat_response_prefix``, e.g. ``"Answer:"``) is the text the response starts
with: its token ids (the prefix tokenized on its own, without special tokens) are appended after each model's
rendered prompt, chat template and plain formats alike, so every model continues the same tokens. It is part
of the prompt, not of the response: the output text starts after it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Union

import numpy as np

Messages = list[dict[str, str]]
Prompt = Union[str, Messages]


class PromptError(ValueError):
    """One prompt cannot be run (empty, too long, malformed); the batch goes on without it."""


def _as_messages(prompt: Prompt) -> Messages:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def _as_text(prompt: Prompt) -> str:
    """A chat-form prompt for a non-chat format: its last user message (base models see the question)."""
    if isinstance(prompt, str):
        return prompt
    users = [m["content"] for m in prompt if m.get("role") == "user"]
    if not users:
        raise PromptError("a chat-form prompt needs at least one message with role 'user'")
    return users[-1]


def validate_prompt(prompt: Any) -> Prompt:
    """Check a prompt's form: a non-empty string, or a non-empty list of {role, content} messages."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise PromptError("empty prompt")
        return prompt
    if isinstance(prompt, list) and prompt and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in prompt
    ):
        if not any(m["content"].strip() for m in prompt):
            raise PromptError("empty prompt: every message has empty content")
        return prompt
    raise PromptError("a prompt must be a non-empty string or a list of {'role': str, 'content': str} messages")


def render_tokens(tokenizer: Any, prompt: Prompt, prompt_format: str, response_prefix: str = "") -> list[int]:
    """Token ids of ``prompt`` for one model, in its ``prompt_format`` ("chat", "plain", "...{prompt}..."),
    followed by those of ``response_prefix`` (see the module docstring)."""
    if prompt_format == "chat":
        ids = tokenizer.apply_chat_template(_as_messages(prompt), add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # transformers >= 5 returns a BatchEncoding
            ids = ids["input_ids"]
    else:
        text = _as_text(prompt) if prompt_format == "plain" else prompt_format.replace("{prompt}", _as_text(prompt))
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    return [int(t) for t in ids] + prefix_tokens(tokenizer, response_prefix)


def prefix_tokens(tokenizer: Any, response_prefix: str) -> list[int]:
    """The token ids of a response prefix: the text tokenized on its own, without special tokens ([] for "")."""
    if not response_prefix:
        return []
    return [int(t) for t in tokenizer(response_prefix, add_special_tokens=False)["input_ids"]]


def bucket_length(n: int, minimum: int = 16) -> int:
    """Round a length up to a power of two (at least ``minimum``), so few programs are compiled."""
    size = minimum
    while size < n:
        size *= 2
    return size


def prompt_bucket(n: int, minimum: int = 16) -> int:
    """Round a prompt length up to the next of 16, 24, 32, 48, 64, 96, ... (powers of two and one and a half
    times them, at least ``minimum``): prefill computes every padded position, so this grid wastes at most a
    third of it (a power of two: up to half), for at most twice the prompt-length programs."""
    size = bucket_length(n, minimum)
    three_quarters = 3 * size // 4
    return three_quarters if n <= three_quarters and three_quarters >= minimum and size % 4 == 0 else size


def left_pad(rows: Sequence[Sequence[int]], length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded tokens and positions ``[batch, length]``; padding has position -1."""
    tokens = np.full((len(rows), length), pad_id, np.int32)
    positions = np.full((len(rows), length), -1, np.int32)
    for i, row in enumerate(rows):
        n = len(row)
        if n:
            tokens[i, length - n:] = row
            positions[i, length - n:] = np.arange(n)
    return tokens, positions


def context_overflow(label: str, context: int, prompt_tokens: int, max_new: int) -> str | None:
    """None if ``prompt_tokens + max_new`` fits a model's ``context``, else a message saying why not."""
    if prompt_tokens + max_new <= context:
        return None
    return (f"prompt is {prompt_tokens} tokens for {label}, whose context is {context}: with "
            f"max_new_tokens={max_new} it needs {prompt_tokens + max_new}")

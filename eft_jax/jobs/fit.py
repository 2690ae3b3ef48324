"""The long-prompt policy: make a prompt fit every model's context, or say why it cannot.

A prompt fits when, for every model of the spec, its rendered prompt (in that model's format) plus
``max_new`` tokens is within the model's context. ``truncate_left`` keeps the end of the prompt (the
most recent text, next to where the response starts): for a chat prompt it first drops the oldest
messages (keeping a leading system message), then cuts the start of the remaining text, at a token
boundary, as little as possible (binary search).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from eft_jax.prompts import Prompt, PromptError, context_overflow, render_tokens
from eft_jax.spec import Component


def prompt_lengths(components: Sequence[Component], prompt: Prompt) -> list[int]:
    """Rendered prompt length (tokens) for each model."""
    return [len(render_tokens(c.model.tokenizer, prompt, c.prompt_format)) for c in components]


def _overflow(components: Sequence[Component], prompt: Prompt, max_new: int) -> str | None:
    """None if the prompt fits every model; otherwise a description of the first model it does not fit."""
    for c, n in zip(components, prompt_lengths(components, prompt), strict=True):
        problem = context_overflow(c.label, c.model.config.max_position_embeddings, n, max_new)
        if problem:
            return problem
    return None


def fit_prompt(components: Sequence[Component], prompt: Prompt, max_new: int, policy: str) -> tuple[Prompt, int]:
    """The prompt to run and how many prompt tokens were cut (0 if it fits as it is).

    Raises PromptError if it does not fit and the policy is "skip", or if even truncation cannot make
    it fit (e.g. max_new_tokens alone exceeds a context).
    """
    problem = _overflow(components, prompt, max_new)
    if problem is None:
        return prompt, 0
    if policy == "skip":
        raise PromptError(f"{problem} (job.on_long_prompt=skip)")
    before = max(prompt_lengths(components, prompt))
    fitted = _truncate_left(components, prompt, max_new)
    if fitted is None:
        raise PromptError(f"{problem}, and cutting it from the left cannot make it fit (lower max_new_tokens)")
    return fitted, before - max(prompt_lengths(components, fitted))


def _truncate_left(components: Sequence[Component], prompt: Prompt, max_new: int) -> Prompt | None:
    fits = lambda p: _overflow(components, p, max_new) is None  # noqa: E731
    if isinstance(prompt, str):
        return _cut_text(components, prompt, lambda text: text, fits)
    messages = [dict(m) for m in prompt]
    system = messages[:1] if messages and messages[0].get("role") == "system" else []
    rest = messages[len(system):]
    # Drop whole messages, oldest first, while a user message remains to answer.
    while len(rest) > 1 and not fits(system + rest):
        rest = rest[1:]
        if not any(m.get("role") == "user" for m in rest):
            return None
    if fits(system + rest):
        return system + rest
    if not rest:
        return None
    last = rest[-1]
    return _cut_text(components, last["content"], lambda text: system + rest[:-1] + [{**last, "content": text}], fits)


def _cut_text(components: Sequence[Component], text: str, build: Any, fits: Any) -> Prompt | None:
    """``build(suffix of text)`` for the longest suffix (at a token boundary) that fits, or None."""
    tokenizer = components[0].model.tokenizer
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        starts = [int(a) for a, _ in enc["offset_mapping"]]
        suffix = lambda k: text[starts[k]:]  # noqa: E731
    except (NotImplementedError, TypeError, KeyError, ValueError):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        starts = list(range(len(ids)))
        suffix = lambda k: tokenizer.decode(ids[k:])  # noqa: E731
    n = len(starts)

    def ok(k: int) -> bool:
        s = suffix(k)
        if not s.strip():
            return False
        try:
            return fits(build(s))
        except PromptError:
            return False

    if n == 0 or not ok(n - 1):
        return None
    lo, hi = 1, n - 1  # the smallest k with ok(k): cut as little as possible
    while lo < hi:
        mid = (lo + hi) // 2
        if ok(mid):
            hi = mid
        else:
            lo = mid + 1
    return build(suffix(lo))

"""The first stage of the request path: a prompt becomes a ``Rendered`` request, checked once.

    prompt (+ max_new, stream) --Renderer.render--> Rendered --Engine.run--> slots --> GenerationResult

``Renderer.render`` validates the prompt's form, renders it once for every model the engine runs (each
in its own format: a chat template, plain text, a base-style template), applies the long-prompt policy
and checks the shared vocabulary. Every check of a prompt lives here; what comes out can be decoded
without any further check, so the engine never renders or validates a prompt again.

The long-prompt policy: a prompt fits when, for every model, its rendered prompt plus ``max_new`` tokens
is within the model's context. ``"skip"`` refuses one that does not; ``"truncate_left"`` keeps the end of
the prompt (the most recent text, next to where the response starts): for a chat prompt it first drops
the oldest messages (keeping a leading system message), then cuts the start of the remaining text, at a
token boundary, as little as possible (binary search).

Randomness: a request's ``stream`` names its random stream; the sample depends on (seed, stream,
position) only. ``stream_id`` derives one from the prompt's content by default.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Sequence
from typing import Any, Literal

from eft_jax.sampling import SamplingParams
from eft_jax.prompts import Prompt, PromptError, context_overflow, render_tokens, validate_prompt
from eft_jax.spec import Component

LongPromptPolicy = Literal["skip", "truncate_left"]


@dataclasses.dataclass(frozen=True)
class Rendered:
    """A request ready to decode (or score): every check passed.

    prompt: the prompt as it runs (shortened if the policy cut it). tokens: its token ids for each model
    the engine runs, in the engine's order. max_new: the most tokens to generate (for scoring, the
    response's length). stream: the random stream. cut: prompt tokens removed by ``truncate_left`` (the
    most over the models). response: for scoring, the response's token ids.

    Per-request generation settings (``Engine.run`` decodes requests with different ones in one batch):
    sampling: this request's ``sampling.SamplingParams`` (None: the run's); weights: its reward weights, one
    per fine-tune (None: the run's); stop: its stop strings (added to the run's). Set them with
    ``dataclasses.replace`` on a rendered request.
    """

    prompt: Prompt
    tokens: tuple[tuple[int, ...], ...]
    max_new: int
    stream: int
    cut: int = 0
    response: tuple[int, ...] = ()
    sampling: SamplingParams | None = None
    weights: tuple[float, ...] | None = None
    stop: tuple[str, ...] = ()


def stream_id(prompt: Any, sample_index: int = 0) -> int:
    """A stable 31-bit id from a JSON-able value (e.g. the prompt) and a sample index: a random stream."""
    digest = hashlib.blake2b(json.dumps([prompt, sample_index]).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF


@dataclasses.dataclass(frozen=True)
class Renderer:
    """Renders prompts for ``components`` (the distinct models an engine runs) over a ``vocab``-token
    shared vocabulary."""

    components: tuple[Component, ...]
    vocab: int

    def render(self, prompt: Any, max_new: int, *, stream: int | None = None,
               on_long_prompt: LongPromptPolicy = "skip", response: Sequence[int] = (),
               response_prefix: str = "") -> Rendered:
        """The checked request, or PromptError saying what is wrong with it and what to do.

        stream: the random stream (default ``stream_id(prompt)``). response: scoring's response tokens
        (then ``max_new`` must be their number). response_prefix: text the response starts with, appended
        after each model's rendered prompt (``prompts.render_tokens``); it counts towards the context."""
        if max_new <= 0:
            raise PromptError(f"max_new_tokens must be positive, got {max_new}")
        if not isinstance(response_prefix, str):
            raise PromptError(f"response_prefix must be a string, got {type(response_prefix).__name__}")
        prompt = validate_prompt(prompt)
        stream = stream_id(prompt) if stream is None else int(stream) & 0x7FFFFFFF
        rendered: dict[str, list[list[int]]] = {}  # each prompt tried, rendered once (with the prefix)
        problem = self._problem(prompt, max_new, rendered, response_prefix)
        cut = 0
        if problem is not None:
            if on_long_prompt != "truncate_left":
                raise PromptError(f"{problem}; shorten the prompt or max_new_tokens (or truncate it: "
                                  "on_long_prompt=truncate_left)")
            before = max(len(t) for t in rendered[_key(prompt)])
            fitted = self._truncate_left(prompt, max_new, rendered, response_prefix)
            if fitted is None:
                raise PromptError(f"{problem}, and cutting it from the left cannot make it fit (lower max_new_tokens)")
            prompt = fitted
            cut = before - max(len(t) for t in rendered[_key(prompt)])
        tokens = rendered[_key(prompt)]
        for c, ids in zip(self.components, tokens, strict=True):
            if not ids:
                raise PromptError(f"prompt renders to no tokens for {c.label}")
            if max(ids) >= self.vocab:
                raise PromptError(f"prompt for {c.label} uses token id {max(ids)} outside the shared vocabulary")
        return Rendered(prompt=prompt, tokens=tuple(tuple(t) for t in tokens), max_new=max_new,
                        stream=stream, cut=cut,
                        response=tuple(int(t) for t in response))

    def lengths(self, prompt: Prompt) -> list[int]:
        """The prompt's rendered length (tokens) for each model."""
        return [len(ids) for ids in self._tokens(prompt, {})]

    # --- the long-prompt policy ---------------------------------------------------------------------

    def _tokens(self, prompt: Prompt, rendered: dict[str, list[list[int]]], prefix: str = "") -> list[list[int]]:
        key = _key(prompt)
        if key not in rendered:
            rendered[key] = [render_tokens(c.model.tokenizer, prompt, c.prompt_format, prefix)
                             for c in self.components]
        return rendered[key]

    def _problem(self, prompt: Prompt, max_new: int, rendered: dict[str, list[list[int]]],
                 prefix: str = "") -> str | None:
        """None if the prompt fits every model's context with ``max_new``; else why not (the first model)."""
        for c, ids in zip(self.components, self._tokens(prompt, rendered, prefix), strict=True):
            problem = context_overflow(c.label, c.model.config.max_position_embeddings, len(ids), max_new)
            if problem:
                return problem
        return None

    def _truncate_left(self, prompt: Prompt, max_new: int, rendered: dict[str, list[list[int]]],
                       prefix: str = "") -> Prompt | None:
        def fits(p: Prompt) -> bool:
            try:
                return self._problem(p, max_new, rendered, prefix) is None
            except PromptError:
                return False

        if isinstance(prompt, str):
            return self._cut_text(prompt, lambda text: text, fits)
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
        return self._cut_text(last["content"], lambda text: system + rest[:-1] + [{**last, "content": text}], fits)

    def _cut_text(self, text: str, build: Callable[[str], Prompt], fits: Callable[[Prompt], bool]) -> Prompt | None:
        """``build(suffix of text)`` for the longest suffix (at a token boundary) that fits, or None."""
        tokenizer = self.components[0].model.tokenizer
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
            return bool(s.strip()) and fits(build(s))

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


def _key(prompt: Prompt) -> str:
    return json.dumps(prompt, sort_keys=True)

"""EFT generation and scoring for any number of prompts: batching, buckets, the host decode loop.

``Engine(spec)`` checks the models once (shared vocabulary, same mesh) and then serves ``generate``
and ``score`` calls. Generation sorts prompts by length and decodes them in ``batch_size`` slots that
are refilled as rows finish (``eft_jax.batching``); scoring runs fixed-size batches. Prompt lengths are
bucketed to powers of two and output lengths to whole chunks, so a job compiles a handful of programs: per batch shape ``start`` (empty caches, prefill
and token 0), the decode or speculative chunk, and the ``refill`` programs of continuous batching
(``eft_jax.batching``); nothing else, since no array is computed eagerly on the way (each eager op would
compile a program of its own). Results come back in input order.

Randomness is per prompt: the sample of a prompt depends on (seed, its stream id, position) only,
never on batch size, batch neighbours or sharding. A prompt's stream id is, by default, a hash of its
content (so the same prompt gives the same sample wherever it sits in the input); pass ``ids`` to
choose them (e.g. a job's own prompt ids combined with a sample index).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from eft_jax import decode
from eft_jax.batching import Row, RowOutput, SlotLoop, to_host
from eft_jax.prompts import (
    Prompt, PromptError, bucket_length, context_overflow, left_pad, render_tokens, validate_prompt,
)
from eft_jax.sampling import SamplingParams
from eft_jax.model import Model
from eft_jax.spec import Component, EFTSpec
from eft_jax.vocab import common_vocab_size


@dataclasses.dataclass
class GenerationResult:
    """One sample. ``tokens`` include the stop token when ``finish_reason == "stop"``; ``text`` does not.

    ``logprob`` is the sum of ``token_logprobs``: each sampled token's log-prob under the EFT
    distribution (temperature 1, before top-k/top-p/min-p, after the conservative base nucleus).
    ``component_logprobs`` maps each model's role to its per-token log-probs (on request); their
    difference ft - ref is the per-token implicit reward. ``error`` is set (and nothing else) for a
    prompt that could not be run.
    """

    index: int
    prompt: Any
    tokens: list[int] = dataclasses.field(default_factory=list)
    text: str = ""
    finish_reason: Literal["stop", "length", "error"] = "length"
    logprob: float = 0.0
    token_logprobs: list[float] = dataclasses.field(default_factory=list)
    component_logprobs: dict[str, list[float]] | None = None
    error: str | None = None
    distributions: np.ndarray | None = None  # [tokens, vocab] EFT log-probs per step, on request
    speculative: SpeculativeStats | None = None


@dataclasses.dataclass
class SpeculativeStats:
    """Per-sample speculative accounting, counted over the emitted tokens.

    ``drafted``: k per round; ``accepted``: drafts emitted; ``rejected``: rounds whose drafts stopped at a
    rejection (a corrected token was emitted after fewer than k drafts). Drafts after a rejection are
    never tested, so the per-draft acceptance probability (the "a" of the speculative decoding
    literature: expected tokens per round (1 - a^(k+1)) / (1 - a)) is accepted / (accepted + rejected),
    not accepted / drafted. ``from_draft[i]``: token i was an accepted draft; ``round_of[i]``: the round
    that emitted it (0 = the first token, sampled at prefill).
    """

    rounds: int
    drafted: int
    accepted: int
    rejected: int
    from_draft: list[bool]
    round_of: list[int]

    @property
    def acceptance_rate(self) -> float:
        """Estimated probability that a draft is accepted: accepted / (accepted + rejected)."""
        tested = self.accepted + self.rejected
        return self.accepted / tested if tested else 0.0

    @property
    def tokens_per_round(self) -> float:
        return sum(1 for r in self.round_of if r > 0) / self.rounds if self.rounds else 0.0


@dataclasses.dataclass
class ScoreResult:
    """EFT log-likelihood of a response given its prompt: per token and summed, plus per model."""

    index: int
    tokens: list[int] = dataclasses.field(default_factory=list)
    token_logprobs: list[float] = dataclasses.field(default_factory=list)
    logprob: float = 0.0
    component_logprobs: dict[str, list[float]] | None = None
    error: str | None = None


def stream_id(prompt: Prompt, sample_index: int = 0) -> int:
    """A stable 31-bit id from the prompt's content and a sample index (the default randomness stream)."""
    digest = hashlib.blake2b(json.dumps([prompt, sample_index]).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF


class Engine:
    """Generation and scoring under one ``EFTSpec``.

    chunk_size: decode steps per jitted chunk (the host checks for "all done" between chunks).
    speculative_k: draft length for speculative EFT (0: off). drafter: the drafting model - an index
      into ``spec.components`` (default: the first fine-tune, i.e. the small fine-tuned model of an
      up-scaling spec) or a separate model (e.g. to speed up plain decoding).
    """

    def __init__(self, spec: EFTSpec, *, chunk_size: int = 16, speculative_k: int = 0,
                 drafter: int | Model | Component | None = None):
        if chunk_size <= 0:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        if speculative_k < 0:
            raise ValueError(f"speculative_k must be >= 0, got {speculative_k}")
        self.spec = spec
        self.chunk_size = chunk_size
        self.speculative_k = speculative_k
        # The engine's models: the rule's, then a drafter from outside the rule if one is given.
        self.components: tuple[Component, ...] = spec.components
        self.drafter_index = -1
        if speculative_k:
            if drafter is None:
                if spec.is_plain:
                    raise ValueError("speculative decoding of a single model needs a drafter model (drafter=...)")
                drafter = 2
            if isinstance(drafter, int):
                if not 0 <= drafter < len(spec.components):
                    raise ValueError(f"drafter index {drafter} is not one of the spec's {len(spec.components)} models")
                self.drafter_index = drafter
            else:
                extra = drafter if isinstance(drafter, Component) else Component(drafter, "plain", "drafter")
                self.components = self.components + (extra,)
                self.drafter_index = len(self.components) - 1
        # A model used in two roles with the same prompt (e.g. base == ref) is run once.
        self.runs, self.sources = _distinct(self.components)
        self.score_runs, self.score_sources = _distinct(spec.components)
        comps = self.components
        missing = [c.label for c in comps if c.model.tokenizer is None]
        if missing:
            raise ValueError(f"model(s) {missing} have no tokenizer; EFT needs each model's tokenizer")
        # Raises VocabMismatchError naming the first differing id.
        self.vocab = min(common_vocab_size({c.label: c.model.tokenizer for c in comps}),
                         *(c.model.vocab_size for c in comps))
        self.tokenizer = comps[-1].model.tokenizer  # any one will do: the vocabularies agree
        self.mesh = spec.base.model.mesh
        self.data_size = self.mesh.shape.get("data", 1) if spec.base.model.rules.mesh_axis("batch") else 1
        self.stop_ids = tuple(sorted({t for c in comps for t in _eos_ids(c.model.tokenizer) if t < self.vocab}))
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None and pad < self.vocab else 0)
        self.labels = [c.label for c in spec.components]

    # --- public API ----------------------------------------------------------------------------------

    def generate(
        self,
        prompts: Sequence[Prompt],
        sampling: SamplingParams = SamplingParams(),
        *,
        on_batch: Callable[[list[GenerationResult]], None] | None = None,
        **kwargs: Any,
    ) -> list[GenerationResult]:
        """Sample one response per prompt; results in input order. Arguments as for :meth:`stream`;
        ``on_batch`` is called with each group of results as it finishes (for incremental output)."""
        results: list[GenerationResult | None] = [None] * len(prompts)
        for group in self.stream(prompts, sampling, **kwargs):
            for r in group:
                results[r.index] = r
            if on_batch is not None:
                on_batch(group)
        return results  # type: ignore[return-value]

    def stream(
        self,
        prompts: Sequence[Prompt],
        sampling: SamplingParams = SamplingParams(),
        *,
        max_new_tokens: int | Sequence[int] = 128,
        batch_size: int = 8,
        seed: int = 0,
        ids: Sequence[int] | None = None,
        weights: Sequence[float] | None = None,
        stop_token_ids: Sequence[int] = (),
        ignore_eos: bool = False,
        return_component_logprobs: bool = False,
        return_distributions: bool = False,
        on_error: Literal["raise", "report"] = "raise",
        continuous: bool = True,
    ) -> Iterator[list[GenerationResult]]:
        """Sample one response per prompt, yielding results as their rows finish (a list per decode chunk).

        max_new_tokens: one limit, or one per prompt. batch_size: rows decoded together (slots).
        ids: per-prompt randomness streams (default ``stream_id(prompt)``). weights: override the spec's
        reward weights (no recompilation). on_error: "raise" refuses the whole call if any prompt is
        invalid (empty, longer than a model's context, ...); "report" yields a result with ``error`` set
        for it (first) and runs the rest. ignore_eos: do not stop at the models' end-of-sequence tokens
        (only at ``stop_token_ids``), e.g. to benchmark fixed-length decoding. continuous: refill a
        finished row with the next prompt at once (continuous batching); False waits until every row of
        the batch is done (static batching). Samples are the same either way.
        """
        n = len(prompts)
        limits = [max_new_tokens] * n if isinstance(max_new_tokens, int) else list(max_new_tokens)
        if len(limits) != n:
            raise ValueError(f"{len(limits)} max_new_tokens values for {n} prompts")
        streams = [stream_id(p) for p in prompts] if ids is None else [int(i) & 0x7FFFFFFF for i in ids]
        if len(streams) != n:
            raise ValueError(f"{len(streams)} ids for {n} prompts")
        batch_size = self._batch_size(batch_size)
        if return_distributions and self.speculative_k:
            raise ValueError("return_distributions is not available with speculative decoding")

        errors: list[GenerationResult] = []
        rows: list[Row] = []
        for i, prompt in enumerate(prompts):
            try:
                rows.append(Row(i, self._render(prompt, limits[i], self.runs), limits[i], streams[i]))
            except PromptError as e:
                if on_error == "raise":
                    raise PromptError(f"prompt {i}: {e}") from None
                errors.append(GenerationResult(index=i, prompt=prompt, finish_reason="error", error=str(e)))
        if errors:
            yield errors
        if not rows:
            return
        plan = decode.Plan(
            configs=tuple(c.model.config for c in self.runs), sources=self.sources[: len(self.spec.components)],
            vocab=self.vocab, n_ft=len(self.spec.fine_tuned), base_top_p=self.spec.base_top_p, sampling=sampling,
            stop_ids=tuple(sorted((set() if ignore_eos else set(self.stop_ids)) | {int(t) for t in stop_token_ids})),
            pad_id=self.pad_id,
            chunk=self.chunk_size, record_components=return_component_logprobs,
            record_distributions=return_distributions,
        )
        # Longest prompts first: they set the cache size, and later (shorter) ones fit in it.
        rows.sort(key=lambda r: (-max(len(t) for t in r.tokens), r.index))
        slots = SlotLoop(self, plan, rows, batch_size, self._weights(weights), seed, continuous)
        for finished in slots.run():
            yield [self._result(plan, prompts, row, out) for row, out in finished]

    def score(
        self,
        prompts: Sequence[Prompt],
        responses: Sequence[str | Sequence[int]],
        *,
        batch_size: int = 8,
        weights: Sequence[float] | None = None,
        on_error: Literal["raise", "report"] = "raise",
    ) -> list[ScoreResult]:
        """EFT log-likelihood of each response given its prompt (teacher forcing, no sampling).

        A response is text (tokenized once, without special tokens) or a list of token ids. Memory
        grows as batch x response length x vocab x models: lower ``batch_size`` for long responses.
        """
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        batch_size = self._batch_size(batch_size)
        results: list[ScoreResult | None] = [None] * len(prompts)
        rendered: dict[int, list[list[int]]] = {}
        targets: dict[int, list[int]] = {}
        for i, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
            try:
                resp = (self.tokenizer(response, add_special_tokens=False)["input_ids"]
                        if isinstance(response, str) else [int(t) for t in response])
                if not resp:
                    raise PromptError("empty response")
                if max(resp) >= self.vocab or min(resp) < 0:
                    raise PromptError(f"response token ids must lie in [0, {self.vocab})")
                rendered[i] = self._render(prompt, len(resp), self.score_runs)
                targets[i] = resp
            except PromptError as e:
                if on_error == "raise":
                    raise PromptError(f"pair {i}: {e}") from None
                results[i] = ScoreResult(index=i, error=str(e))

        plan = decode.Plan(
            configs=tuple(c.model.config for c in self.score_runs), sources=self.score_sources, vocab=self.vocab,
            n_ft=len(self.spec.fine_tuned), base_top_p=self.spec.base_top_p, sampling=SamplingParams(),
            stop_ids=(), pad_id=self.pad_id, chunk=1,
        )
        w = self._weights(weights)
        for batch in self._batches(rendered, batch_size):
            for r in self._score_batch(plan, batch, batch_size, rendered, targets, w):
                results[r.index] = r
        return results  # type: ignore[return-value]

    # --- internals -----------------------------------------------------------------------------------

    def _batch_size(self, batch_size: int) -> int:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        # The batch is split over the mesh's data axis: round up to a multiple of it.
        return math.ceil(batch_size / self.data_size) * self.data_size

    def _weights(self, weights: Sequence[float] | None) -> jax.Array:
        w = self.spec.weights if weights is None else tuple(float(x) for x in weights)
        if len(w) != len(self.spec.fine_tuned):
            raise ValueError(f"{len(w)} weights for {len(self.spec.fine_tuned)} fine-tuned model(s)")
        return self._replicated(np.asarray(w if w else (0.0,), np.float32))

    def _render(self, prompt: Any, max_new: int, components: Sequence[Component]) -> list[list[int]]:
        """Each model's prompt tokens; PromptError if empty or too long for a model's context."""
        if max_new <= 0:
            raise PromptError(f"max_new_tokens must be positive, got {max_new}")
        prompt = validate_prompt(prompt)
        rows = []
        for c in components:
            ids = render_tokens(c.model.tokenizer, prompt, c.prompt_format)
            if not ids:
                raise PromptError(f"prompt renders to no tokens for {c.label}")
            problem = context_overflow(c.label, c.model.config.max_position_embeddings, len(ids), max_new)
            if problem:
                raise PromptError(f"{problem}; shorten the prompt or max_new_tokens")
            if max(ids) >= self.vocab:
                raise PromptError(f"prompt for {c.label} uses token id {max(ids)} outside the shared vocabulary")
            rows.append(ids)
        return rows

    def _batches(self, rendered: dict[int, list[list[int]]], batch_size: int) -> list[list[int]]:
        """Prompt indices grouped into batches, longest first (similar lengths share a bucket)."""
        order = sorted(rendered, key=lambda i: (-max(len(r) for r in rendered[i]), i))
        return [order[s:s + batch_size] for s in range(0, len(order), batch_size)]

    def _place(self, x: np.ndarray) -> jax.Array:
        """A host array (identical on every process) onto the mesh, batch over the data axis.

        Built from a callback so it also works on multi-host meshes, where each process only
        places its own devices' slices."""
        spec = PartitionSpec(self.spec.base.model.rules.mesh_axis("batch"), *([None] * (x.ndim - 1)))
        return jax.make_array_from_callback(x.shape, NamedSharding(self.mesh, spec), lambda index: x[index])

    def _replicated(self, x: np.ndarray) -> jax.Array:
        """A small host array (weights, seed) on every device of the mesh: placed, so nothing is compiled
        (``jnp.asarray(x, dtype)`` compiles a conversion program), and placed the same way on every call."""
        return jax.make_array_from_callback(x.shape, NamedSharding(self.mesh, PartitionSpec()), lambda index: x[index])

    def _padded_rows(self, batch: list[int], batch_size: int) -> list[int]:
        # Dummy rows repeat the batch's first prompt; their outputs are dropped.
        return batch + [batch[0]] * (batch_size - len(batch))

    def _result(self, plan: decode.Plan, prompts: Sequence[Prompt], row: Row, out: RowOutput) -> GenerationResult:
        """A finished row's ``GenerationResult`` (text decoded without the stop token)."""
        toks = out.tokens.tolist()
        stopped = bool(toks) and toks[-1] in plan.stop_ids
        lps = out.logprobs.astype(float).tolist()
        spec = out.speculative
        return GenerationResult(
            index=row.index, prompt=prompts[row.index], tokens=toks,
            text=self.tokenizer.decode(toks[:-1] if stopped else toks, skip_special_tokens=True),
            finish_reason="stop" if stopped else "length", logprob=float(sum(lps)), token_logprobs=lps,
            component_logprobs=None if out.components is None else {
                label: out.components[m].astype(float).tolist() for m, label in enumerate(self.labels)},
            distributions=out.distributions,
            speculative=None if spec is None else SpeculativeStats(
                rounds=int(spec["rounds"]), drafted=int(spec["drafted"]), accepted=int(spec["accepted"]),
                rejected=int(spec["rejected"]), from_draft=spec["from_draft"].tolist(),
                round_of=spec["round_of"].tolist()),
        )

    def _score_batch(self, plan, batch, batch_size, rendered, targets, weights) -> list[ScoreResult]:
        rows = self._padded_rows(batch, batch_size)
        resp_len = bucket_length(max(len(targets[i]) for i in rows), minimum=8)
        seqs_per_model, predict_at = [], []
        for m in range(len(self.score_runs)):
            seqs = [rendered[i][m] + targets[i] for i in rows]
            length = bucket_length(max(len(s) for s in seqs))
            seqs_per_model.append(left_pad(seqs, length, self.pad_id))
            # Left padding puts each response at the end: token j is predicted at length - r - 1 + j.
            at = np.zeros((len(rows), resp_len), np.int32)
            for b, i in enumerate(rows):
                r = len(targets[i])
                at[b, :r] = length - r - 1 + np.arange(r)
            predict_at.append(self._place(at))
        target = np.full((len(rows), resp_len), self.pad_id, np.int32)
        for b, i in enumerate(rows):
            target[b, : len(targets[i])] = targets[i]
        params = tuple(c.model.run_params for c in self.score_runs)
        eft, comps = decode.score_batch(
            plan, params, tuple(self._place(t) for t, _ in seqs_per_model),
            tuple(self._place(p) for _, p in seqs_per_model), tuple(predict_at), self._place(target), weights,
        )
        eft, comps = to_host(eft), to_host(comps)
        out = []
        for b, i in enumerate(batch):
            r = len(targets[i])
            lps = eft[b, :r].astype(float).tolist()
            out.append(ScoreResult(
                index=i, tokens=list(targets[i]), token_logprobs=lps, logprob=float(sum(lps)),
                component_logprobs={label: comps[m, b, :r].astype(float).tolist() for m, label in enumerate(self.labels)},
            ))
        return out


def _distinct(components: Sequence[Component]) -> tuple[tuple[Component, ...], tuple[int, ...]]:
    """The distinct (model, prompt format) pairs to run, and each component's index among them."""
    runs: list[Component] = []
    keys: list[tuple[int, str]] = []
    sources = []
    for c in components:
        key = (id(c.model), c.prompt_format)
        if key not in keys:
            keys.append(key)
            runs.append(c)
        sources.append(keys.index(key))
    return tuple(runs), tuple(sources)


def _eos_ids(tokenizer: Any) -> list[int]:
    eos = tokenizer.eos_token_id
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


def generate(spec: EFTSpec, prompts: Sequence[Prompt], sampling: SamplingParams = SamplingParams(), *,
             chunk_size: int = 16, speculative_k: int = 0, drafter: int | Model | Component | None = None,
             **kwargs: Any) -> list[GenerationResult]:
    """One-call EFT generation: ``Engine(spec, ...).generate(prompts, sampling, **kwargs)``."""
    engine = Engine(spec, chunk_size=chunk_size, speculative_k=speculative_k, drafter=drafter)
    return engine.generate(prompts, sampling, **kwargs)


def score(spec: EFTSpec, prompts: Sequence[Prompt], responses: Sequence[str | Sequence[int]], **kwargs: Any) -> list[ScoreResult]:
    """One-call EFT scoring: ``Engine(spec).score(prompts, responses, **kwargs)``."""
    return Engine(spec).score(prompts, responses, **kwargs)

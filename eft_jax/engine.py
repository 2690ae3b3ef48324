"""The engine: one EFT spec's models, checked once, serving generation and scoring.

The request path, one way, one value type per stage::

    prompt --Engine.render--> Rendered --Engine.run--> slots (batching.SlotLoop) --> decode | speculative
           --> GenerationResult (yielded in an Update after each chunk) --> the caller's output record

``Engine.render`` (``requests.Renderer``) makes every check of a prompt and renders it once per model;
``Engine.run`` decodes rendered requests in ``batch_size`` slots refilled as rows finish (continuous
batching, ``eft_jax.batching``) and yields what each chunk finished: nothing calls back into the caller.
``generate`` / ``stream`` / ``score`` are the short forms for notebooks: prompts in, results out.

Prompt lengths are bucketed (16, 24, 32, 48, ...: ``prompts.prompt_bucket``) and output lengths to whole
chunks, so a job compiles a handful of programs: per batch shape ``start`` (empty caches, prefill and token
0), the decode or speculative chunk (one per attention window), and the ``refill`` programs of continuous
batching; nothing else, since no array is computed eagerly on the way (each eager op would compile a program
of its own).

On a mesh that spans processes (multi-controller JAX), every process calls ``run`` / ``score_rendered``
together, each with its own requests, decoded in the rows of the batch its devices hold
(``eft_jax.lockstep``); each gets its own requests' results. (Each process may pass the same requests: it
then decodes all of them itself.)

Randomness is per request: a sample depends on (seed, its stream id, position) only, never on batch
size, batch neighbours, scheduling or sharding. By default a prompt's stream is a hash of its content
(the same prompt gives the same sample wherever it sits in the input); pass ``ids`` / ``stream`` to
choose them (e.g. a job's own prompt ids combined with a sample index).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import jax
import numpy as np

from eft_jax import decode
from eft_jax.batching import Row, RowOutput, SlotLoop
from eft_jax.lockstep import Peers
from eft_jax.model import Model
from eft_jax.prompts import Prompt, PromptError
from eft_jax.requests import LongPromptPolicy, Rendered, Renderer
from eft_jax.results import GenerationResult, ScoreResult, SpeculativeStats, Update
from eft_jax.sampling import Features, SamplingParams
from eft_jax.scoring import score_pairs
from eft_jax.sharding import HostPlacement
from eft_jax.spec import Component, EFTSpec
from eft_jax.vocab import common_vocab_size, end_token_ids

__all__ = ["Engine", "GenerationResult", "Rendered", "ScoreResult", "SpeculativeStats", "Update", "generate",
           "score"]


class Engine:
    """Generation and scoring under one ``EFTSpec``.

    chunk_size: decode steps per jitted chunk (the host checks for "all done" between chunks).
    speculative_k: draft length for speculative EFT (0: off). drafter: the drafting model - an index
      into ``spec.components`` (default: ``spec.default_drafter``, the first fine-tune, i.e. the small
      fine-tuned model of an up-scaling spec) or a separate model (e.g. to speed up plain decoding).
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
                drafter = spec.default_drafter
                if drafter is None:
                    raise ValueError("speculative decoding of a single model needs a drafter model (drafter=...)")
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
        self.place = HostPlacement(self.mesh, spec.base.model.rules.mesh_axis("batch"))
        self.peers = Peers(self.place)  # the processes sharing the mesh (one, mostly)
        # On CPU a chunk ends as soon as every row is done (no host sync to fear); elsewhere it runs its
        # fixed length (a data-dependent loop exit would sync with the host every step).
        self.stop_early = self.mesh.devices.flat[0].platform == "cpu"
        # What ends a sample: any model's end of text or of turn ("all"), or only what each model's
        # tokenizer and checkpoint declare ("declared"); see vocab.end_token_ids.
        self.end_ids = {
            policy: tuple(sorted({t for c in comps for t in end_token_ids(c.model.tokenizer, c.model.end_token_ids,
                                                                          markers=policy == "all")
                                  if t < self.vocab}))
            for policy in ("all", "declared")}
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None and pad < self.vocab else 0)
        self.labels = [c.label for c in spec.components]
        self.renderer = Renderer(self.runs, self.vocab)  # generation: every model that decodes (drafter too)
        self.score_renderer = Renderer(self.score_runs, self.vocab)

    # --- the request path: render, then run -----------------------------------------------------------

    def render(self, prompt: Any, max_new_tokens: int = 128, *, stream: int | None = None,
               on_long_prompt: LongPromptPolicy = "skip", response_prefix: str = "") -> Rendered:
        """A prompt checked and rendered for every model this engine runs, or PromptError saying why it
        cannot run (empty, malformed, too long for a context under ``on_long_prompt="skip"``, ...).
        response_prefix: text the response starts with, after each model's prompt (``prompts.render_tokens``)."""
        return self.renderer.render(prompt, max_new_tokens, stream=stream, on_long_prompt=on_long_prompt,
                                    response_prefix=response_prefix)

    def render_pair(self, prompt: Any, response: str | Sequence[int], *,
                    on_long_prompt: LongPromptPolicy = "skip", response_prefix: str = "") -> Rendered:
        """A (prompt, response) pair ready to score. A text response is tokenized once, without special
        tokens; a list is taken as token ids. response_prefix: as for :meth:`render` (part of the prompt: the
        response is scored after it)."""
        ids = (self.tokenizer(response, add_special_tokens=False)["input_ids"] if isinstance(response, str)
               else [int(t) for t in response])
        if not ids:
            raise PromptError("the response encodes to no tokens" if isinstance(response, str) else "empty response")
        if max(ids) >= self.vocab or min(ids) < 0:
            raise PromptError(f"response token ids must lie in [0, {self.vocab})")
        return self.score_renderer.render(prompt, len(ids), stream=0, on_long_prompt=on_long_prompt, response=ids,
                                          response_prefix=response_prefix)

    def run(
        self,
        requests: Sequence[Rendered],
        sampling: SamplingParams = SamplingParams(),
        *,
        batch_size: int = 8,
        seed: int = 0,
        weights: Sequence[float] | None = None,
        stop_token_ids: Sequence[int] = (),
        stop: Sequence[str] = (),
        ignore_eos: bool = False,
        end_tokens: Literal["all", "declared"] = "all",
        return_component_logprobs: bool = False,
        return_distributions: bool = False,
        top_logprobs: int = 0,
        continuous: bool = True,
    ) -> Iterator[Update]:
        """Decode rendered requests; after every chunk, yield the samples that finished in it (``index``: the
        request's position in ``requests``) and the number of tokens the chunk decoded.

        batch_size: rows decoded together (slots; rounded up to a multiple of the mesh's data axis).
        weights: override the spec's reward weights (no recompilation). end_tokens: which end tokens stop
        a sample besides ``stop_token_ids``: "all" (default) every model's end-of-text and end-of-turn
        tokens - in EFT the models disagree on which one ends an answer, so one model's EOS alone can let
        an answer run on -, "declared" only those each model's tokenizer and checkpoint declare
        (``vocab.end_token_ids``). ignore_eos: stop only at ``stop_token_ids``, e.g. to benchmark fixed lengths.
        stop: stop strings (vLLM's ``stop``): a sample ends with the token that completes one (searched in
        its decoded text after every chunk), its ``text`` ends before it, ``stop_reason`` names it; the tokens
        kept are those the sample would have had anyway (a sample depends on its position only).
        continuous: refill a finished row with the next request at once (continuous batching); False waits
        until every row of the batch is done (static batching). Samples are the same either way.
        top_logprobs: K > 0 records, per step and on device, the K most likely tokens of the reported EFT
        distribution with their EFT log-prob and each model's (``GenerationResult.top_ids``, ``top_logprobs``,
        ``top_component_logprobs``); K is static (one program per K). return_distributions: every step's whole
        EFT distribution ([tokens, vocab] per sample, copied to the host: tests and analysis only).

        Per request: ``Rendered.sampling`` (else ``sampling``), ``Rendered.weights`` (else ``weights``) and
        ``Rendered.stop`` (added to ``stop``). Requests with different settings share one batch: the values are
        traced per row, and the compiled program depends only on which features some request uses
        (``sampling.Features``); a run where every request has the same filters compiles them statically, as
        before. A request gets exactly the sample it gets alone with its settings. Penalties are refused with
        speculative decoding; logit_bias ids must be < the shared vocabulary (ValueError naming the request).
        """
        if end_tokens not in self.end_ids:
            raise ValueError(f"end_tokens must be one of {sorted(self.end_ids)}, got {end_tokens!r}")
        if (isinstance(top_logprobs, bool) or not isinstance(top_logprobs, (int, np.integer))
                or not 0 <= top_logprobs <= self.vocab):
            raise ValueError(f"top_logprobs must be an integer in [0, {self.vocab}] (the shared vocabulary), "
                             f"got {top_logprobs!r}")
        top_logprobs = int(top_logprobs)
        stop = tuple(stop)
        if any(not isinstance(s, str) or not s for s in stop):
            raise ValueError(f"stop strings must be non-empty strings, got {list(stop)!r}")
        # Each request's effective settings: its own, else the run's; run-level ignore_eos applies to all.
        settings = [r.sampling if r.sampling is not None else sampling for r in requests]
        if ignore_eos:
            settings = [dataclasses.replace(s, ignore_eos=True) for s in settings]
        self.peers.agree(lambda: self._check_requests(requests, settings), ValueError)
        default_w = self.spec.weights if weights is None else tuple(float(x) for x in weights)
        row_w = {r.weights if r.weights is not None else default_w for r in requests}
        # The compiled program depends on the settings of every process's requests (each decodes its own).
        every = self.peers.gather((set(settings), row_w))
        settings_all = [s for mine, _ in every for s in mine]
        weights_all = {w for _, theirs in every for w in theirs}
        if not settings_all:
            return
        mixed_weights = bool(self.spec.fine_tuned) and len(weights_all) > 1
        if not mixed_weights:
            weights = next(iter(weights_all))  # every request has the same weights: the run's, static shape
        features = Features.of(settings_all, self.vocab, row_weights=mixed_weights)
        explicit = {int(t) for t in stop_token_ids}
        ends = set(self.end_ids[end_tokens])
        all_ignore = all(s.ignore_eos for s in settings_all)
        plan = decode.Plan(
            configs=tuple(c.model.config for c in self.runs), sources=self.sources[: len(self.spec.components)],
            vocab=self.vocab, n_ft=len(self.spec.fine_tuned), base_top_p=self.spec.base_top_p,
            sampling=SamplingParams() if features.row_filters else SamplingParams(*settings_all[0].filters),
            stop_ids=tuple(sorted((set() if all_ignore else ends) | explicit)),
            pad_id=self.pad_id, chunk=self.chunk_size, record_components=return_component_logprobs,
            record_distributions=return_distributions, top_logprobs=top_logprobs, stop_early=self.stop_early, features=features,
            eos_ids=tuple(sorted(ends - explicit)) if features.ignore_eos else (),
        )
        rows = [Row(i, r.tokens, r.max_new, r.stream, settings[i], r.weights, tuple(dict.fromkeys(stop + r.stop)))
                for i, r in enumerate(requests)]
        # Longest prompts first: they set the cache size, and later (shorter) ones fit in it.
        rows.sort(key=lambda r: (-max(len(t) for t in r.tokens), r.index))
        slots = SlotLoop(self, plan, rows, self._batch_size(batch_size), self._weights(weights), seed, continuous,
                         self._stop_check() if any(r.stop for r in rows) else None)
        for finished, tokens in slots.run():
            yield Update([self._result(plan, requests[row.index], row, out) for row, out in finished], tokens)

    # --- short forms: prompts in, results out --------------------------------------------------------

    def generate(self, prompts: Sequence[Prompt], sampling: SamplingParams = SamplingParams(),
                 **kwargs: Any) -> list[GenerationResult]:
        """One sample per prompt, in input order. Arguments as for :meth:`stream`."""
        results: list[GenerationResult | None] = [None] * len(prompts)
        for update in self.stream(prompts, sampling, **kwargs):
            for r in update.finished:
                results[r.index] = r
        return results  # type: ignore[return-value]

    def stream(
        self,
        prompts: Sequence[Prompt],
        sampling: SamplingParams = SamplingParams(),
        *,
        max_new_tokens: int | Sequence[int] = 128,
        ids: Sequence[int] | None = None,
        on_error: Literal["raise", "report"] = "raise",
        **run_kwargs: Any,
    ) -> Iterator[Update]:
        """:meth:`render` every prompt, then :meth:`run` them; results carry the prompt's index in ``prompts``.

        max_new_tokens: one limit, or one per prompt. ids: per-prompt random streams (default: a hash
        of the prompt). on_error: "raise" refuses the whole call if any prompt cannot run; "report" yields
        a result with ``error`` set for it (first) and runs the rest. Other arguments: :meth:`run`'s.
        """
        n = len(prompts)
        limits = [max_new_tokens] * n if isinstance(max_new_tokens, int) else list(max_new_tokens)
        if len(limits) != n:
            raise ValueError(f"{len(limits)} max_new_tokens values for {n} prompts")
        if ids is not None and len(ids) != n:
            raise ValueError(f"{len(ids)} ids for {n} prompts")
        self._batch_size(run_kwargs.get("batch_size", 8))  # a bad argument fails before any rendering
        errors, rendered, origin = [], [], []
        for i, prompt in enumerate(prompts):
            try:
                rendered.append(self.render(prompt, limits[i], stream=None if ids is None else ids[i]))
                origin.append(i)
            except PromptError as e:
                if on_error == "raise":
                    raise PromptError(f"prompt {i}: {e}") from None
                errors.append(GenerationResult(index=i, prompt=prompt, finish_reason="error", error=str(e)))
        if errors:
            yield Update(errors, 0)
        for update in self.run(rendered, sampling, **run_kwargs):
            for r in update.finished:
                r.index = origin[r.index]
            yield update

    def score(self, prompts: Sequence[Prompt], responses: Sequence[str | Sequence[int]], *, batch_size: int = 8,
              weights: Sequence[float] | None = None, on_error: Literal["raise", "report"] = "raise",
              ) -> list[ScoreResult]:
        """EFT log-likelihood of each response given its prompt (teacher forcing, no sampling), in input order.

        A response is text (tokenized once, without special tokens) or a list of token ids. Memory
        grows as batch x response length x vocab x models: lower ``batch_size`` for long responses.
        on_error: as for :meth:`stream`.
        """
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        results: list[ScoreResult | None] = [None] * len(prompts)
        pairs, origin = [], []
        for i, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
            try:
                pairs.append(self.render_pair(prompt, response))
                origin.append(i)
            except PromptError as e:
                if on_error == "raise":
                    raise PromptError(f"pair {i}: {e}") from None
                results[i] = ScoreResult(index=i, error=str(e))
        for batch in self.score_rendered(pairs, batch_size=batch_size, weights=weights):
            for r in batch:
                r.index = origin[r.index]
                results[r.index] = r
        return results  # type: ignore[return-value]

    def score_rendered(self, pairs: Sequence[Rendered], *, batch_size: int = 8,
                       weights: Sequence[float] | None = None) -> Iterator[list[ScoreResult]]:
        """Score rendered pairs (:meth:`render_pair`) in batches of ``batch_size``, yielding each batch's
        results (``index``: the pair's position in ``pairs``)."""
        plan = decode.Plan(
            configs=tuple(c.model.config for c in self.score_runs), sources=self.score_sources, vocab=self.vocab,
            n_ft=len(self.spec.fine_tuned), base_top_p=self.spec.base_top_p, sampling=SamplingParams(),
            stop_ids=(), pad_id=self.pad_id, chunk=1,
        )
        params = tuple(c.model.run_params for c in self.score_runs)
        yield from score_pairs(plan, params, self.peers, self.labels, pairs, self._batch_size(batch_size),
                               self._weights(weights))

    # --- internals -----------------------------------------------------------------------------------

    def _batch_size(self, batch_size: int) -> int:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        # The batch is split over the mesh's data axis: round up to a multiple of it.
        return math.ceil(batch_size / self.place.data_size) * self.place.data_size

    def _weights(self, weights: Sequence[float] | None) -> jax.Array:
        w = self.spec.weights if weights is None else tuple(float(x) for x in weights)
        if len(w) != len(self.spec.fine_tuned):
            raise ValueError(f"{len(w)} weights for {len(self.spec.fine_tuned)} fine-tuned model(s)")
        return self.place.replicated(np.asarray(w if w else (0.0,), np.float32))

    def _check_requests(self, requests: Sequence[Rendered], settings: Sequence[SamplingParams]) -> None:
        """Per-request values the engine must refuse: logit_bias ids outside the shared vocabulary, weights of
        the wrong length, penalties under speculative decoding, empty stop strings."""
        n_ft = len(self.spec.fine_tuned)
        for i, (r, s) in enumerate(zip(requests, settings, strict=True)):
            if s.logit_bias and s.logit_bias[-1][0] >= self.vocab:
                raise ValueError(f"request {i}: logit_bias token id {s.logit_bias[-1][0]} is outside the shared "
                                 f"vocabulary (ids must be < {self.vocab})")
            if r.weights is not None and len(r.weights) != n_ft:
                raise ValueError(f"request {i}: {len(r.weights)} weights for {n_ft} fine-tuned model(s)")
            if self.speculative_k and s.penalties:
                raise ValueError(f"request {i}: repetition/presence/frequency penalties are not supported with "
                                 "speculative decoding (their token counts change inside a round); set them to "
                                 "their neutral values (1, 0, 0) or decode without speculative_k")
            if any(not isinstance(x, str) or not x for x in r.stop):
                raise ValueError(f"request {i}: stop strings must be non-empty strings, got {list(r.stop)!r}")

    def _stop_check(self) -> Any:
        """For ``SlotLoop``: the first prefix of a row's tokens, beyond those already checked, whose decoded
        text contains one of the row's stop strings: (its length, the string that appears first in it), or None."""

        def text(tokens: np.ndarray) -> str:
            return self.tokenizer.decode(tokens.tolist(), skip_special_tokens=True)

        def check(tokens: np.ndarray, checked: int, stop: tuple[str, ...]) -> tuple[int, str] | None:
            if not any(s in text(tokens) for s in stop):
                return None
            for n in range(checked + 1, len(tokens) + 1):
                prefix = text(tokens[:n])
                hits = sorted((prefix.find(s), s) for s in stop if s in prefix)
                if hits:
                    return n, hits[0][1]
            return None  # the string spans tokens checked earlier only in a decoding that merges them

        return check

    def _result(self, plan: decode.Plan, request: Rendered, row: Row, out: RowOutput) -> GenerationResult:
        """A finished row's ``GenerationResult`` (text decoded without the stop token or stop string)."""
        toks = out.tokens.tolist()
        stop_ids = set(plan.stop_ids) - (set(plan.eos_ids) if row.sampling.ignore_eos else set())
        stopped = bool(toks) and toks[-1] in stop_ids and out.stop_string is None
        text = self.tokenizer.decode(toks[:-1] if stopped else toks, skip_special_tokens=True)
        if out.stop_string is not None:
            text = text[: text.find(out.stop_string)]
        lps = out.logprobs.astype(float).tolist()
        spec = out.speculative
        return GenerationResult(
            index=row.index, prompt=request.prompt, tokens=toks, text=text,
            finish_reason="stop" if stopped or out.stop_string is not None else "length",
            stop_reason=out.stop_string if out.stop_string is not None else (toks[-1] if stopped else None),
            logprob=float(sum(lps)), token_logprobs=lps,
            component_logprobs=None if out.components is None else {
                label: out.components[m].astype(float).tolist() for m, label in enumerate(self.labels)},
            distributions=out.distributions, top_ids=out.top_ids, top_logprobs=out.top_logprobs,
            top_component_logprobs=None if out.top_components is None else {
                label: out.top_components[m] for m, label in enumerate(self.labels)},
            speculative=None if spec is None else SpeculativeStats(
                rounds=int(spec["rounds"]), drafted=int(spec["drafted"]), accepted=int(spec["accepted"]),
                rejected=int(spec["rejected"]), from_draft=spec["from_draft"].tolist(),
                round_of=spec["round_of"].tolist()),
        )


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


def generate(spec: EFTSpec, prompts: Sequence[Prompt], sampling: SamplingParams = SamplingParams(), *,
             chunk_size: int = 16, speculative_k: int = 0, drafter: int | Model | Component | None = None,
             **kwargs: Any) -> list[GenerationResult]:
    """One-call EFT generation: ``Engine(spec, ...).generate(prompts, sampling, **kwargs)``."""
    engine = Engine(spec, chunk_size=chunk_size, speculative_k=speculative_k, drafter=drafter)
    return engine.generate(prompts, sampling, **kwargs)


def score(spec: EFTSpec, prompts: Sequence[Prompt], responses: Sequence[str | Sequence[int]], **kwargs: Any) -> list[ScoreResult]:
    """One-call EFT scoring: ``Engine(spec).score(prompts, responses, **kwargs)``."""
    return Engine(spec).score(prompts, responses, **kwargs)

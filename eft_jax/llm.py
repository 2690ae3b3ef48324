"""A Python front end a vLLM user recognises: ``LLM(...).generate(prompts, SamplingParams(...))``.

    from eft_jax.llm import LLM, SamplingParams

    llm = LLM("configs/qwen2.5-upscale-7b-base-0.5b-instruct.yaml")     # or LLM() for the embedded default
    outputs = llm.generate(["Explain EFT."], SamplingParams(temperature=0.7, top_p=0.9, max_tokens=128, n=2))
    print(outputs[0].outputs[0].text, outputs[0].outputs[0].finish_reason)
    outputs = llm.chat([{"role": "user", "content": "Hi!"}], SamplingParams(max_tokens=32))

The models come from a job config (the same YAML and ``key.sub=value`` overrides as ``eft-jax generate``)
or from an :class:`~eft_jax.spec.EFTSpec` built in Python. Results come back in input order with vLLM's
field names (``RequestOutput.outputs[i].text``, ``token_ids``, ``cumulative_logprob``, ``logprobs``,
``finish_reason``, ``stop_reason``) plus the EFT extras: each model's per-token log-probs
(``CompletionOutput.eft.component_logprobs``) and the per-token implicit reward of each fine-tune
(fine-tune minus reference).

``SamplingParams`` here is vLLM's request-level one (``n``, ``max_tokens``, ``seed``, ``stop``, the filters,
``min_tokens``, ``logit_bias`` and the penalties); ``eft_jax.sampling.SamplingParams`` is the engine's per-row
part, which this one builds. ``generate`` takes one SamplingParams, or one per prompt (as vLLM does): prompts
with different settings share the batch.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from eft_jax import sampling as _sampling
from eft_jax.engine import Engine
from eft_jax.prompts import PromptError
from eft_jax.spec import EFTSpec


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """vLLM-style sampling settings of one ``generate`` call.

    n: samples per prompt. temperature (0: greedy), top_p, top_k (-1 or 0: off, as in vLLM), min_p: the
    filters. max_tokens: new tokens per sample. seed: the random seed (samples depend only on seed, prompt
    index and sample index). stop: stop strings. stop_token_ids: extra stop tokens. ignore_eos: stop only
    at those. logprobs: also return the top-``logprobs`` alternatives of every sampled token (None: only
    the sampled token's log-prob). min_tokens, logit_bias ({token id: bias in [-100, 100]}),
    repetition_penalty, presence_penalty, frequency_penalty: vLLM's (see ``eft_jax.sampling``). Log-probs are those
    of the EFT distribution (temperature 1, before logit_bias, the penalties and the filters).
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    max_tokens: int = 16
    seed: int = 0
    stop: tuple[str, ...] | str | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    min_tokens: int = 0
    logit_bias: dict[int, float] | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"SamplingParams.n must be >= 1, got {self.n}")
        if self.max_tokens < 1:
            raise ValueError(f"SamplingParams.max_tokens must be >= 1, got {self.max_tokens}")
        if self.logprobs is not None and self.logprobs < 0:
            raise ValueError(f"SamplingParams.logprobs must be None or >= 0, got {self.logprobs}")
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        object.__setattr__(self, "stop", stop)
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        self.engine_sampling()  # the filters' own checks, now rather than at the first call

    def engine_sampling(self) -> _sampling.SamplingParams:
        """The engine's per-row part: filters, min_tokens, ignore_eos, logit_bias and penalties."""
        return _sampling.SamplingParams(
            temperature=self.temperature, top_k=max(self.top_k, 0), top_p=self.top_p, min_p=self.min_p,
            min_tokens=self.min_tokens, ignore_eos=self.ignore_eos, logit_bias=tuple((self.logit_bias or {}).items()),
            repetition_penalty=self.repetition_penalty, presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty)


@dataclasses.dataclass
class EFTOutputs:
    """The EFT extras of one sample: each model's per-token log-probs (by role label), and each fine-tune's
    per-token implicit reward log p_ft - log p_ref."""

    component_logprobs: dict[str, list[float]]
    implicit_rewards: dict[str, list[float]]


@dataclasses.dataclass
class CompletionOutput:
    """One sample, in vLLM's shape. ``logprobs``: per sampled token, {token id: log-prob} of the token and
    the top alternatives (when ``SamplingParams.logprobs`` was set)."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float
    logprobs: list[dict[int, float]] | None
    finish_reason: str
    stop_reason: str | int | None
    eft: EFTOutputs | None = None


@dataclasses.dataclass
class RequestOutput:
    """All samples of one prompt, in vLLM's shape."""

    request_id: str
    prompt: Any
    outputs: list[CompletionOutput]
    finished: bool = True


class LLM:
    """EFT generation behind vLLM's ``LLM`` interface.

    config: a job config YAML path (None: the embedded default), with ``overrides`` (``key.sub=value``) as on
    the command line; or ``spec``: an ``EFTSpec`` of loaded models (then ``speculative_k``/``chunk_size`` set
    the engine). batch_size: rows decoded together (default: the config's ``job.batch_size``, else 8).
    response_prefix: text every reply starts with, appended after each model's rendered prompt (default: the
    config's ``job.response_prefix``, else none); ``generate`` may override it per call.

    With a config, :meth:`get_default_sampling_params` (what ``generate`` uses when given no SamplingParams)
    holds the config's sampling settings, with those it leaves out taken from the fine-tune's
    ``generation_config.json`` exactly as ``eft-jax generate`` takes them (``jobs.runner.generation_defaults``;
    ``sampling.use_generation_config=false`` turns it off), and its ``max_new_tokens``, stop strings, stop ids
    and seed. vLLM's ``LLM`` does the same with the model's generation_config.
    """

    def __init__(self, config: str | None = None, *, overrides: Sequence[str] = (), spec: EFTSpec | None = None,
                 speculative_k: int = 0, chunk_size: int = 16, batch_size: int | None = None,
                 response_prefix: str | None = None):
        if spec is not None:
            if config is not None or overrides:
                raise ValueError("give a config or a spec, not both")
            self.engine = Engine(spec, chunk_size=chunk_size, speculative_k=speculative_k)
            self.batch_size = batch_size or 8
            self._defaults = SamplingParams()
            self.response_prefix = response_prefix or ""
        else:
            from eft_jax.config import load_config
            from eft_jax.jobs.runner import build_engine, generation_defaults

            job_config = generation_defaults(load_config(config, overrides))
            self.engine = build_engine(job_config).engine
            self.batch_size = batch_size or job_config.job.batch_size
            self._defaults = _from_config(job_config)
            self.response_prefix = job_config.job.response_prefix if response_prefix is None else response_prefix
        self.labels = self.engine.labels

    def get_default_sampling_params(self) -> SamplingParams:
        """The SamplingParams ``generate`` uses when given none (see the class docstring)."""
        return self._defaults

    def generate(self, prompts: str | Sequence[Any],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None, *,
                 use_tqdm: bool = True, response_prefix: str | None = None) -> list[RequestOutput]:
        """Sample ``n`` completions of each prompt (a string, or a list of chat messages), in input order.
        ``sampling_params``: one for every prompt, or a list with one per prompt (vLLM's form); None:
        :meth:`get_default_sampling_params`. response_prefix: this call's reply prefix (default: the LLM's);
        it is part of the prompt, not of the returned text."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        prefix = self.response_prefix if response_prefix is None else response_prefix
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            per_prompt = [sampling_params or self._defaults] * len(prompts)
        else:
            per_prompt = list(sampling_params)
            if len(per_prompt) != len(prompts):
                raise ValueError(f"{len(per_prompt)} SamplingParams for {len(prompts)} prompts: give one, or one "
                                 "per prompt")
        # One random stream per (prompt index, sample index): a sample does not depend on the others.
        rows = [(i, j) for i, p in enumerate(per_prompt) for j in range(p.n)]
        rendered = []  # each prompt rendered once, with its settings; its samples differ in their stream only
        for i, (prompt, p) in enumerate(zip(prompts, per_prompt, strict=True)):
            try:
                r = self.engine.render(prompt, p.max_tokens, response_prefix=prefix)
            except PromptError as e:
                raise PromptError(f"prompt {i}: {e}") from None
            rendered.append(dataclasses.replace(r, sampling=p.engine_sampling(), stop=p.stop))
        requests = [dataclasses.replace(rendered[i], stream=_stream(i, j)) for i, j in rows]
        results: dict[tuple[int, int], Any] = {}
        bar = _progress(use_tqdm, sum(p.n * p.max_tokens for p in per_prompt))
        try:
            # One run per distinct (seed, stop token ids, what is recorded): run-level settings of the engine.
            keys = sorted({self._run_key(p) for p in per_prompt})
            for key in keys:
                seed, stop_ids, top = key
                picked = [k for k, (i, _) in enumerate(rows) if self._run_key(per_prompt[i]) == key]
                # The top alternatives are computed on device: K, the most any prompt of the run asks for.
                k_top = max((per_prompt[rows[k][0]].logprobs or 0 for k in picked), default=0) if top else 0
                for update in self.engine.run(
                    [requests[k] for k in picked], batch_size=self.batch_size, seed=seed, stop_token_ids=stop_ids,
                    return_component_logprobs=True, top_logprobs=k_top,
                ):
                    for r in update.finished:
                        results[rows[picked[r.index]]] = r
                    if bar is not None:
                        bar.update(update.tokens)
        finally:
            if bar is not None:
                bar.close()
        return [RequestOutput(str(i), prompt, [self._completion(j, results[(i, j)], per_prompt[i])
                                               for j in range(per_prompt[i].n)])
                for i, prompt in enumerate(prompts)]

    @staticmethod
    def _run_key(p: SamplingParams) -> tuple[int, tuple[int, ...], bool]:
        return p.seed, p.stop_token_ids, p.logprobs is not None and p.logprobs > 0

    def chat(self, messages: Sequence[dict[str, str]] | Sequence[Sequence[dict[str, str]]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None, *, use_tqdm: bool = True,
             response_prefix: str | None = None) -> list[RequestOutput]:
        """Like :meth:`generate` for one conversation (a list of messages) or a list of them. Each model
        renders a conversation its own way (its prompt format in the config: chat template or plain)."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        return self.generate(conversations, sampling_params, use_tqdm=use_tqdm, response_prefix=response_prefix)

    def _completion(self, index: int, result: Any, params: SamplingParams) -> CompletionOutput:
        components = result.component_logprobs or {}
        ref = self.labels[1] if len(self.labels) > 1 else None
        rewards = {label: list(np.subtract(components[label], components[ref]))
                   for label in self.labels[2:]} if ref is not None else {}
        logprobs = None
        if params.logprobs is not None:
            logprobs = []
            for j, token in enumerate(result.tokens):
                entry = {int(token): float(result.token_logprobs[j])}
                if params.logprobs:  # the step's most likely ids (on device), descending, lower id first on ties
                    for t, v in zip(result.top_ids[j, : params.logprobs], result.top_logprobs[j, : params.logprobs],
                                    strict=True):
                        entry.setdefault(int(t), float(v))
                logprobs.append(entry)
        return CompletionOutput(
            index=index, text=result.text, token_ids=list(result.tokens), cumulative_logprob=float(result.logprob),
            logprobs=logprobs, finish_reason=result.finish_reason, stop_reason=result.stop_reason,
            eft=EFTOutputs(components, rewards) if components else None)


def _from_config(config: Any) -> SamplingParams:
    """A job config's sampling settings, limits and seed as vLLM-style SamplingParams (n = ``job.n``)."""
    c, job = config.sampling, config.job
    return SamplingParams(
        n=job.n, temperature=c.temperature, top_p=c.top_p, top_k=c.top_k, min_p=c.min_p, max_tokens=job.max_new_tokens,
        seed=job.seed, stop=tuple(c.stop), stop_token_ids=tuple(c.stop_token_ids), ignore_eos=c.ignore_eos,
        min_tokens=c.min_tokens, logit_bias=dict(c.logit_bias), repetition_penalty=c.repetition_penalty,
        presence_penalty=c.presence_penalty, frequency_penalty=c.frequency_penalty)


def _stream(prompt_index: int, sample: int) -> int:
    """A 31-bit random-stream id for one (prompt, sample) pair."""
    digest = hashlib.sha256(f"llm:{prompt_index}:{sample}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def _progress(enabled: bool, total_tokens: int) -> Any:
    """A tqdm bar over the tokens to decode (an upper bound: samples may stop early), or None."""
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total_tokens, unit="tok", desc="eft-jax", smoothing=0.1, mininterval=0.5,
                bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} tokens [{elapsed}<{remaining}, {rate_fmt}]")


__all__ = ["LLM", "CompletionOutput", "EFTOutputs", "RequestOutput", "SamplingParams"]

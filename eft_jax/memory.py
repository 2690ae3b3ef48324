"""The memory plan: the bytes a job needs on each device, from the configs alone, before anything is loaded.

Loading a 70B model takes minutes; finding out afterwards that it (or its KV caches) does not fit wastes
them. ``generate`` / ``score`` compute this plan first and refuse a job that does not fit, with the table
and a suggestion; ``eft-jax config`` prints it. All figures are bytes **per device**: every device of the
``(data, model)`` mesh holds the same amount (shards are even, replicated arrays are whole everywhere).

What is counted, per model (a model used in several roles with the same path, dtype and sharding is
and quantization is loaded once and counted once, as ``jobs.runner.build_engine`` loads it):

- **weights** - exact. Each parameter of ``llama.abstract_params`` in the model's stored type
  (:func:`weight_leaves`, the one place that decides bytes per parameter: the dtype, and with
  ``quantize: int8`` one byte per projection weight plus its float32 per-output-channel scales), divided by
  the product of the mesh-axis sizes its ``PartitionSpec`` splits it over (``sharding.logical_to_spec``
  under the model's rules: the same call that places the loaded weights). Tested equal to the loaded
  arrays' shards.
- **KV cache** - exact for the shapes given. One cache per model and prompt format the engine decodes
  with (the drafter's too): k and v ``[layers, batch, slots, kv_heads, head_dim]`` in the model's dtype,
  ``pos`` int32 ``[batch, slots]``, ``length`` int32 ``[batch]``, placed as ``Model.cache_layout`` places
  them (batch over ``data``; kv heads over ``model`` under tensor-parallel rules when they divide).
  ``slots`` is what ``batching.SlotLoop`` allocates: the prompt bucket (``prompts.prompt_bucket``) + ``out_len``
  (``1 + chunk * ceil((max_new - 1) / chunk)``) + ``k + 1`` with speculative decoding. The batch is
  ``job.batch_size`` rounded up to a multiple of the ``data`` axis.
- **working memory** - an estimate of the largest buffers a step holds besides weights and caches:
  a continuous-batching refill prefills new rows into caches of their own before putting them in place
  (``decode.refill``; when more than half of the slots are free it refills the whole batch at once: a
  second full set of caches), each model's float32 logits ``[batch, n, padded vocab]`` (n = k + 1 with
  speculative decoding), and, shared by all models, one layer's prefill activations of the largest model
  (float32 attention scores ``[batch, heads, prompt, slots]`` as the einsum/XLA attention materialises
  them, and the MLP's gate and up projections), the EFT combination and sampling filters
  (:data:`COMBINE_BUFFERS` float32 ``[batch, n, vocab]`` arrays besides one per rule member) and the
  output buffers. ``score`` has no caches: its logits are ``[batch, response, vocab]`` per model and
  its forward runs over prompt + response at once.

XLA's other temporaries (fusions, collectives, the compiled programs themselves) are not counted
exactly: a job fits when the total is at most ``1 - HEADROOM`` (90%) of the device memory.

The prompt length is not known before the tokenizers run, so ``generate`` / ``score`` bound it from the
input: a prompt's UTF-8 bytes + the longest ``{prompt}`` template + :data:`TEMPLATE_ALLOWANCE` tokens
(+ :data:`MESSAGE_ALLOWANCE` per chat message) for chat templates and special tokens. Byte-level BPE
(Llama 3, Qwen2, SmolLM2) and SentencePiece with byte fallback (Llama 2) never make more tokens than
bytes, so this is an upper bound; it is capped by each model's context rounded up to a power of two,
which bounds any prompt the long-prompt policy lets through. The plan is an upper bound throughout.

Device memory: ``mesh.device_memory_gb`` when set (it overrides detection); else
``device.memory_stats()["bytes_limit"]`` where the backend reports it (GPU: what XLA's allocator may
use, by default 75% of the GPU's memory - see ``XLA_PYTHON_CLIENT_MEM_FRACTION``; TPU); else, on CPU,
the host's available RAM (``MemAvailable``, or the cgroup's limit when lower) divided by the mesh's CPU
devices of this host: virtual CPU devices share the host's memory, and each holds its own copy of
replicated arrays. Where none of these is known the plan is printed but nothing is refused.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from eft_jax.config import Config, ModelEntry, resolve_model_path
from eft_jax.models import llama
from eft_jax.models.config import LlamaConfig
from eft_jax.models.kv_cache import CACHE_LOGICAL_AXES, CacheLayout
from eft_jax.prompts import bucket_length, prompt_bucket
from eft_jax.sharding import DATA, MODEL, logical_to_spec, resolve_rules

__all__ = [
    "COMBINE_BUFFERS", "HEADROOM", "DeviceMemory", "MemoryPlan", "ModelSpec", "ModelUsage", "Workload",
    "cache_bytes_per_device", "cache_slots", "config_workload", "detect_device_memory", "does_not_fit_message",
    "host_available_bytes", "largest_batch", "output_length", "plan_memory", "read_model_spec", "read_model_specs",
    "suggestions", "weight_bytes_per_device", "weight_leaves", "workload_from_requests",
]

HEADROOM = 0.10  # the fraction of device memory left to what the plan does not count exactly
COMBINE_BUFFERS = 3  # EFT log-probs, the sampling filter's sorted values and their indices ([batch, n, vocab] f32)
TEMPLATE_ALLOWANCE = 128  # tokens a chat template and special tokens may add to a prompt ...
MESSAGE_ALLOWANCE = 16  # ... plus this many per chat message (role headers)
DEFAULT_PROMPT_TOKENS = 1024  # `eft-jax config`: the prompt length assumed when no input is given


# --- Inputs ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What the plan needs to know about a checkpoint: its architecture, its own dtype (used when the
    config's ``dtype`` is null) and its own quantization (an ``eft-jax convert --quantize int8`` checkpoint)."""

    config: LlamaConfig
    checkpoint_dtype: str
    checkpoint_quantize: str | None = None


@dataclasses.dataclass(frozen=True)
class Workload:
    """The shapes a job runs with.

    prompt_tokens: an upper bound on any prompt's tokens (before the cap by each model's context).
    new_tokens: generate: the largest ``max_new_tokens`` of a line; score: the longest response's tokens.
    batch_size: ``job.batch_size`` (rounded up to a multiple of the data axis by the plan).
    """

    command: str  # "generate" or "score"
    batch_size: int
    prompt_tokens: int
    new_tokens: int
    chunk_size: int = 16
    speculative_k: int = 0


@dataclasses.dataclass(frozen=True)
class DeviceMemory:
    """Memory of one device, in bytes, and where the figure comes from. ``shared``: the devices share
    one pool (CPU devices and the host's RAM), so a bigger mesh does not bring more memory."""

    bytes: int
    source: str
    shared: bool = False


def read_model_specs(config: Config, names: Sequence[str] | None = None) -> dict[str, ModelSpec]:
    """Each job model's :class:`ModelSpec`, from its config.json, GGUF header or eft-jax checkpoint
    marker: no weight is read. Raises ``CheckpointError`` / ``UnsupportedConfigError`` as loading would."""
    return {name: read_model_spec(config.models[name]) for name in (names or config.model_names())}


def read_model_spec(entry: ModelEntry) -> ModelSpec:
    """One model's architecture and own dtype without its weights (see :func:`read_model_specs`).

    An HF directory's own dtype is that of its safetensors' embedding (the header only is read), as
    ``load_model`` decides it; with no weight files (a config.json alone) config.json's ``torch_dtype``.
    """
    from eft_jax.loading import hf_dir, orbax_checkpoint
    from eft_jax.loading.load import GGUF_DEFAULT_DTYPE, checked_path, model_config, own_dtype
    from eft_jax.loading.source import CheckpointError

    path = checked_path(resolve_model_path(entry.path))
    if path.is_file():
        from eft_jax.loading.gguf import open_gguf

        cfg = model_config(open_gguf(path).hf_config, f"{path} (GGUF metadata)")
        return ModelSpec(cfg, jnp.dtype(GGUF_DEFAULT_DTYPE).name)
    if orbax_checkpoint.is_orbax_checkpoint(path):
        cfg, dtype = orbax_checkpoint.read_checkpoint_meta(path)
        return ModelSpec(cfg, jnp.dtype(dtype).name, orbax_checkpoint.read_checkpoint_quantize(path))
    hf = hf_dir.read_hf_config(path)
    cfg = model_config(hf, str(path / "config.json"))
    if entry.dtype is not None:
        return ModelSpec(cfg, entry.dtype)  # the checkpoint's own does not matter: nothing more to read
    try:
        from eft_jax.loading.safetensors_source import SafetensorsSource

        dtype = own_dtype(SafetensorsSource(hf_dir.safetensors_files(path)), cfg).name
    except CheckpointError:  # no weight files: loading will say so; plan from config.json
        dtype = str(hf.get("torch_dtype") or hf.get("dtype") or "float32")
    return ModelSpec(cfg, dtype)


def workload_from_requests(config: Config, requests: Sequence[Any], command: str) -> Workload:
    """The job's shapes, with prompt (and response) lengths bounded from the input's text (see the
    module docstring). ``requests``: parsed input lines (``prompt``, ``max_new_tokens``, ``response``)."""
    templates = [len(e.prompt_format.encode()) for e in config.models.values()
                 if e.prompt_format not in ("chat", "plain")]
    extra = max(templates, default=0) + TEMPLATE_ALLOWANCE
    prompt = max((_text_bytes(r.prompt) + extra + MESSAGE_ALLOWANCE * _messages(r.prompt) for r in requests),
                 default=1)
    if command == "score":
        # Responses are tokenized without special tokens; +1 for a SentencePiece word-start marker.
        new = max((len((r.response or "").encode()) + 1 for r in requests), default=1)
    else:
        new = max((r.max_new_tokens or config.job.max_new_tokens for r in requests), default=config.job.max_new_tokens)
    return Workload(command, config.job.batch_size, prompt, new, config.job.chunk_size,
                    config.speculative.k if command == "generate" else 0)


def config_workload(config: Config, prompt_tokens: int = DEFAULT_PROMPT_TOKENS) -> Workload:
    """``generate``'s shapes for prompts of up to ``prompt_tokens`` tokens (no input at hand)."""
    return Workload("generate", config.job.batch_size, prompt_tokens, config.job.max_new_tokens,
                    config.job.chunk_size, config.speculative.k)


def _text_bytes(prompt: Any) -> int:
    if isinstance(prompt, str):
        return len(prompt.encode())
    return sum(len(str(m.get("content", "")).encode()) for m in prompt if isinstance(m, dict))


def _messages(prompt: Any) -> int:
    return 1 if isinstance(prompt, str) else len(prompt)


# --- Bytes per device -----------------------------------------------------------------------------------


def weight_leaves(cfg: LlamaConfig, dtype: str, quantize: str | None = None) -> Any:
    """The parameters as ``ShapeDtypeStruct`` leaves in their stored type: the one place that decides a
    model's bytes per parameter (its dtype; with ``quantize`` "int8" the projections are int8 and each has a
    float32 ``*_scale`` leaf, see ``eft_jax.models.quant``)."""
    return llama.abstract_params(cfg, jnp.dtype(dtype), quantize)


def _mesh(axes: Mapping[str, int]) -> jax.sharding.AbstractMesh:
    return jax.sharding.AbstractMesh((axes[DATA], axes[MODEL]), (DATA, MODEL))


def _per_device(shape: Sequence[int], itemsize: int, axes: Sequence[str], rules: Any, mesh: Any) -> int:
    """Bytes of one device's shard of an array with logical ``axes`` under ``rules``."""
    spec = logical_to_spec(axes, shape, rules, mesh)
    split = math.prod(mesh.shape[a] for a in spec if a is not None)
    return math.prod(shape) * itemsize // split


def weight_bytes_per_device(cfg: LlamaConfig, dtype: str, sharding: str, axes: Mapping[str, int],
                            quantize: str | None = None) -> int:
    """Bytes of a model's weights on each device of a ``{"data": d, "model": m}`` mesh (exact)."""
    return _weight_bytes(cfg, jnp.dtype(dtype).name, sharding, axes[DATA], axes[MODEL], quantize)


@functools.lru_cache(maxsize=256)
def _weight_bytes(cfg: LlamaConfig, dtype: str, sharding: str, data: int, model: int, quantize: str | None) -> int:
    mesh, rules = _mesh({DATA: data, MODEL: model}), resolve_rules(sharding)
    leaves = jax.tree.leaves(weight_leaves(cfg, dtype, quantize))
    logical = jax.tree.leaves(llama.param_logical_axes(cfg, quantize), is_leaf=lambda x: isinstance(x, tuple))
    return sum(_per_device(a.shape, a.dtype.itemsize, ax, rules, mesh) for a, ax in zip(leaves, logical, strict=True))


def cache_slots(prompt_bucket: int, new_tokens: int, chunk: int, speculative_k: int = 0) -> int:
    """Cache positions per row, as ``batching.SlotLoop`` allocates them: the prompt bucket, the output
    buffer ``1 + chunk * ceil((new_tokens - 1) / chunk)``, and ``k + 1`` for a speculative round."""
    return prompt_bucket + output_length(new_tokens, chunk) + (speculative_k + 1 if speculative_k else 0)


def output_length(new_tokens: int, chunk: int) -> int:
    """The decode state's output buffer length (``SlotLoop.out_len``)."""
    return 1 + chunk * math.ceil((new_tokens - 1) / chunk)


def cache_bytes_per_device(cfg: LlamaConfig, dtype: str, sharding: str, axes: Mapping[str, int], batch: int,
                           slots: int) -> int:
    """Bytes of one KV cache (k, v, pos, length) of ``batch`` rows x ``slots`` positions on each device."""
    return _cache_bytes(cfg, jnp.dtype(dtype).name, sharding, axes[DATA], axes[MODEL], batch, slots)


@functools.lru_cache(maxsize=1024)
def _cache_bytes(cfg: LlamaConfig, dtype: str, sharding: str, data: int, model: int, batch: int, slots: int) -> int:
    mesh, rules = _mesh({DATA: data, MODEL: model}), resolve_rules(sharding)
    layout = CacheLayout(num_layers=cfg.num_layers, batch=batch, slots=slots, num_kv_heads=cfg.num_kv_heads,
                         head_dim=cfg.head_dim, dtype=dtype)
    abstract = jax.eval_shape(layout.zeros)
    leaves = (abstract.k, abstract.v, abstract.pos, abstract.length)
    logical = (CACHE_LOGICAL_AXES.k, CACHE_LOGICAL_AXES.v, CACHE_LOGICAL_AXES.pos, CACHE_LOGICAL_AXES.length)
    return sum(_per_device(a.shape, a.dtype.itemsize, ax, rules, mesh) for a, ax in zip(leaves, logical, strict=True))


# --- The plan -------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ModelUsage:
    """One loaded model's row of the plan (bytes per device)."""

    names: tuple[str, ...]  # config entries sharing this load
    roles: tuple[str, ...]
    params: int
    dtype: str  # the float type; "int8+<dtype>" when the projections are int8
    sharding: str
    weights: int
    kv_cache: int
    working: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.working


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Bytes per device of a job, and whether they fit (see the module docstring)."""

    config: Config
    workload: Workload
    axes: Mapping[str, int]
    memory: DeviceMemory | None
    batch: int  # rows, a multiple of the data axis
    slots: Mapping[str, int]  # cache positions per row, by model name (generate)
    models: tuple[ModelUsage, ...]
    shared: int  # working memory not attributed to one model

    @property
    def total(self) -> int:
        return sum(m.total for m in self.models) + self.shared

    @property
    def usable(self) -> int | None:
        return None if self.memory is None else int(self.memory.bytes * (1 - HEADROOM))

    @property
    def fits(self) -> bool:
        """True when the total is within the usable memory (or the memory is unknown)."""
        return self.usable is None or self.total <= self.usable

    def table(self) -> str:
        """The plan as a text table, one row per loaded model."""
        w = self.workload
        shape = f"mesh data={self.axes[DATA]} x model={self.axes[MODEL]}"
        per_row = self.batch // self.axes[DATA]
        if w.command == "generate":
            slots = sorted(set(self.slots.values()))
            what = (f"batch {self.batch} ({per_row} per device) x {'/'.join(map(str, slots))} cache slots "
                    f"(prompts <= {w.prompt_tokens} tokens, max_new_tokens {w.new_tokens}"
                    + (f", speculative k={w.speculative_k}" if w.speculative_k else "") + ")")
        else:
            what = (f"batch {self.batch} ({per_row} per device), prompts <= {w.prompt_tokens} tokens, "
                    f"responses <= {w.new_tokens} tokens")
        head = ("model", "params", "dtype", "sharding", "weights", "KV cache", "working", "total")
        rows = [head]
        for m in self.models:
            label = "=".join(m.names) + f" ({', '.join(m.roles)})"
            rows.append((label, _count(m.params), m.dtype, m.sharding, _size(m.weights), _size(m.kv_cache),
                         _size(m.working), _size(m.total)))
        rows.append(("shared working memory", "", "", "", "", "", _size(self.shared), _size(self.shared)))
        rows.append(("total", "", "", "", _size(sum(m.weights for m in self.models)),
                     _size(sum(m.kv_cache for m in self.models)),
                     _size(sum(m.working for m in self.models) + self.shared), _size(self.total)))
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        lines = [f"memory plan for {w.command}, bytes per device ({shape}; {what}):"]
        for r in rows:
            cells = [r[0].ljust(widths[0]), *(c.rjust(widths[i]) for i, c in enumerate(r) if i)]
            lines.append("  " + "  ".join(cells).rstrip())
        if self.memory is None:
            lines.append("  available: unknown (set mesh.device_memory_gb to check the plan)")
        else:
            verdict = "fits" if self.fits else f"does NOT fit (needs {_size(self.total)})"
            lines.append(f"  available: {_size(self.memory.bytes)} per device ({self.memory.source}); "
                         f"usable after {HEADROOM:.0%} headroom: {_size(self.usable)} -> {verdict}")
        return "\n".join(lines)


def plan_memory(config: Config, specs: Mapping[str, ModelSpec], axes: Mapping[str, int], workload: Workload,
                memory: DeviceMemory | None) -> MemoryPlan:
    """The per-device plan of ``config`` running ``workload`` on a ``{"data": d, "model": m}`` mesh.

    specs: :func:`read_model_specs` (by model name). memory: :func:`detect_device_memory`, or None.
    """
    axes = {DATA: int(axes[DATA]), MODEL: int(axes[MODEL])}
    data = axes[DATA]
    batch = math.ceil(workload.batch_size / data) * data
    rows = batch // data
    generate = workload.command == "generate"
    n = workload.speculative_k + 1 if generate and workload.speculative_k else 1

    def entry(name: str) -> tuple[ModelEntry, ModelSpec, str]:
        e = config.models[name]
        return e, specs[name], e.dtype or specs[name].checkpoint_dtype

    def quantize(name: str) -> str | None:
        return config.models[name].quantize or specs[name].checkpoint_quantize

    # Loads: one per (path, dtype, sharding, quantize), as build_engine; caches: one per (load, prompt format), as
    # the engine's distinct runs (the drafter's included when generating).
    users = list(config.roles())
    if generate and config.drafter_name() is not None:
        users.append(("drafter", config.drafter_name()))
    loads: dict[tuple, list[str]] = {}
    roles: dict[tuple, list[str]] = {}
    runs: set[tuple] = set()
    for role, name in users:
        e, _, dtype = entry(name)
        key = (str(resolve_model_path(e.path)), dtype, e.sharding, quantize(name))
        if name not in loads.setdefault(key, []):
            loads[key].append(name)
        roles.setdefault(key, []).append(role)
        runs.add((key, e.prompt_format))

    mesh = _mesh(axes)
    slots: dict[str, int] = {}
    usages = []
    prefill_peak = 0
    for key, names in loads.items():
        e, spec, dtype = entry(names[0])
        cfg = spec.config
        prompt = min(prompt_bucket(workload.prompt_tokens), bucket_length(cfg.max_position_embeddings))
        kv = working = 0
        model_split = mesh.shape[MODEL] if e.sharding == "tensor_parallel" else 1
        heads = cfg.num_heads // model_split if cfg.num_heads % model_split == 0 else cfg.num_heads
        mlp = cfg.intermediate_size // model_split if cfg.intermediate_size % model_split == 0 else cfg.intermediate_size
        n_runs = sum(1 for (k, _) in runs if k == key)
        if generate:
            s = cache_slots(prompt, workload.new_tokens, workload.chunk_size, workload.speculative_k)
            slots.update({name: s for name in names})
            one = cache_bytes_per_device(cfg, dtype, e.sharding, axes, batch, s)
            kv = n_runs * one
            # A refill's new caches (up to the whole batch) + float32 logits [rows, n, vocab] per run.
            working = kv + n_runs * rows * n * cfg.vocab_size * 4
            scores = rows * heads * prompt * s * 4
            acts = 2 * rows * prompt * mlp * jnp.dtype(dtype).itemsize
        else:
            response = prompt_bucket(workload.new_tokens, minimum=8)  # as scoring pads them
            seq = min(prompt_bucket(workload.prompt_tokens + workload.new_tokens),
                      bucket_length(cfg.max_position_embeddings))
            working = n_runs * rows * response * cfg.vocab_size * 4
            scores = rows * heads * seq * seq * 4
            acts = 2 * rows * seq * mlp * jnp.dtype(dtype).itemsize
        prefill_peak = max(prefill_peak, scores + acts)
        q = quantize(names[0])
        usages.append(ModelUsage(tuple(names), tuple(roles[key]), cfg.num_params, f"{q}+{dtype}" if q else dtype,
                                 e.sharding, weight_bytes_per_device(cfg, dtype, e.sharding, axes, q), kv, working))

    vocab = max(specs[name].config.vocab_size for _, name in users)
    rule = len(config.roles())
    if generate:
        out_len = output_length(workload.new_tokens, workload.chunk_size)
        # tokens, logprobs (4 + 4), per-member log-probs (4 each), speculative round_of + from_draft (4 + 1).
        outputs = rows * out_len * (8 + 4 * rule + (5 if workload.speculative_k else 0))
        combine = (rule + COMBINE_BUFFERS) * rows * n * vocab * 4
    else:
        response = bucket_length(workload.new_tokens, minimum=8)
        outputs = rows * response * 4 * (1 + rule)
        combine = (2 * rule + 1) * rows * response * vocab * 4  # sliced, EFT log-probs, per-member log-softmax
    return MemoryPlan(config, workload, axes, memory, batch, slots, tuple(usages), prefill_peak + combine + outputs)


# --- Device memory --------------------------------------------------------------------------------------


def detect_device_memory(device_memory_gb: float | None, devices: Sequence[Any], local_devices: int | None = None
                         ) -> DeviceMemory | None:
    """The memory of one mesh device (see the module docstring); None when unknown.

    devices: the mesh's devices; local_devices: how many of them are on this host (default: all).
    """
    if device_memory_gb is not None:
        return DeviceMemory(int(device_memory_gb * 1e9), "mesh.device_memory_gb")
    device = devices[0]
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 - backends without the call raise various errors
        stats = None
    if stats and stats.get("bytes_limit"):
        return DeviceMemory(int(stats["bytes_limit"]), f"{device.platform.upper()} memory_stats bytes_limit")
    if device.platform == "cpu":
        host = host_available_bytes()
        if host:
            count = local_devices or len(devices)
            share = f" shared by {count} CPU devices" if count > 1 else ""
            return DeviceMemory(host // count, f"host RAM available {_size(host)}{share}", shared=True)
    return None


def host_available_bytes() -> int | None:
    """Available host RAM: /proc/meminfo's MemAvailable, lowered to the cgroup's remaining limit."""
    available = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    if available is None:
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, AttributeError):
            return None
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
        if limit != "max":
            available = min(available, int(limit) - used)
    except (OSError, ValueError):
        pass
    return max(available, 0)


# --- When it does not fit -------------------------------------------------------------------------------


def does_not_fit_message(plan: MemoryPlan, specs: Mapping[str, ModelSpec]) -> str:
    """The table and what to change, for a plan that does not fit."""
    return plan.table() + "\n" + "\n".join("  - " + s for s in suggestions(plan, specs))


def suggestions(plan: MemoryPlan, specs: Mapping[str, ModelSpec]) -> list[str]:
    """Changes that make the job fit, each checked against the plan (the largest batch first)."""
    config, axes, w, memory = plan.config, plan.axes, plan.workload, plan.memory
    out = []
    data = axes[DATA]
    batch = largest_batch(config, specs, axes, w, memory, below=plan.batch)
    if batch:
        out.append(f"job.batch_size={batch}: the largest batch size that fits (now {config.job.batch_size})")
    smallest = dataclasses.replace(w, batch_size=data)
    names = list(dict.fromkeys(n for m in plan.models for n in m.names))
    wide = [n for n in names if (config.models[n].dtype or specs[n].checkpoint_dtype) == "float32"]
    if wide:
        smaller = _with_models(config, {n: {"dtype": "bfloat16"} for n in wide})
        out.append(_verdict(" ".join(f"models.{n}.dtype=bfloat16" for n in wide) + ": half the bytes of float32",
                            smaller, specs, axes, w, memory))
    unquantized = [n for n in names if config.models[n].quantize is None and specs[n].checkpoint_quantize is None]
    if unquantized:
        int8 = _with_models(config, {n: {"quantize": "int8"} for n in unquantized})
        out.append(_verdict(" ".join(f"models.{n}.quantize=int8" for n in unquantized)
                            + ": one byte per projection weight (eft_jax/models/quant.py)", int8, specs, axes, w, memory))
    replicated = [n for n in names if config.models[n].sharding == "replicated"]
    if replicated and axes[MODEL] > 1:
        split = _with_models(config, {n: {"sharding": "tensor_parallel"} for n in replicated})
        out.append(_verdict(" ".join(f"models.{n}.sharding=tensor_parallel" for n in replicated)
                            + f": split over the {axes[MODEL]} devices of mesh.model", split, specs, axes, w, memory))
    if memory is not None and not memory.shared:  # more CPU devices bring no more host memory
        everything = _with_models(config, {n: {"sharding": "tensor_parallel"} for n in names})
        for m in (2 ** i for i in range(1, 11)):
            wider = {DATA: data, MODEL: m}
            if m > axes[MODEL] and plan_memory(everything, specs, wider, smallest, memory).fits:
                most = largest_batch(everything, specs, wider, w, memory)
                out.append(f"mesh.model={m} (tensor-parallel over more devices, every model tensor_parallel): "
                           f"{data * m} devices of {_size(memory.bytes)} fit job.batch_size={most}")
                break
    kv = sum(m.kv_cache for m in plan.models)
    if w.command == "generate" and kv > plan.total // 4:
        out.append(f"a smaller job.max_new_tokens (now {w.new_tokens}) or shorter prompts: the KV caches hold "
                   "prompt + max_new_tokens positions per row")
    if not batch and not plan_memory(config, specs, axes, smallest, memory).fits:
        out.insert(0, f"even job.batch_size={data} does not fit (the weights alone need "
                      f"{_size(sum(m.weights for m in plan.models))} per device)")
    out.append("mesh.device_memory_gb=... if the devices have more memory than detected (the plan is an upper "
               "bound; see eft_jax/memory.py)")
    return out


def largest_batch(config: Config, specs: Mapping[str, ModelSpec], axes: Mapping[str, int], workload: Workload,
                  memory: DeviceMemory | None, below: int | None = None) -> int | None:
    """The largest batch size (a multiple of the data axis, up to ``below`` exclusive, default
    ``workload.batch_size`` inclusive) whose plan fits; None if even one row per device does not."""
    data = axes[DATA]
    top = (below - data) // data if below is not None else math.ceil(workload.batch_size / data)

    def fits(rows: int) -> bool:
        return plan_memory(config, specs, axes, dataclasses.replace(workload, batch_size=rows * data), memory).fits

    if top < 1 or not fits(1):
        return None
    lo, hi = 1, top  # fits(lo); memory grows with the batch, so bisect for the last that fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo * data


def _with_models(config: Config, changes: Mapping[str, Mapping[str, Any]]) -> Config:
    models = {n: dataclasses.replace(e, **changes.get(n, {})) for n, e in config.models.items()}
    return dataclasses.replace(config, models=models)


def _verdict(change: str, config: Config, specs: Mapping[str, ModelSpec], axes: Mapping[str, int], w: Workload,
             memory: DeviceMemory | None) -> str:
    batch = largest_batch(config, specs, axes, w, memory)
    return change + (f" (fits with job.batch_size={batch})" if batch else " (not enough alone)")


def _size(n: int | None) -> str:
    """Bytes for people: decimal units (1 GB = 1e9 bytes, as mesh.device_memory_gb)."""
    if n is None:
        return "?"
    for scale, unit in ((1e9, "GB"), (1e6, "MB"), (1e3, "KB")):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def _count(n: int) -> str:
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)



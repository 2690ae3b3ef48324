"""What a job checks before it loads any weights: the mesh fits, the tokenizers agree, prompts render.

Loading a 70B base takes minutes; a setup mistake found after it wastes them. Everything that needs
only the config, the visible devices and the tokenizers is checked here, first:

- the mesh (``mesh.data`` x ``mesh.model``) fits the visible devices;
- the memory plan (``eft_jax.memory``: weights, KV caches and working memory per device, from the
  models' config.json / GGUF headers and the input's lengths) fits the devices' memory;
- every model used by the job (the EFT roles and the drafter) has a tokenizer, a ``chat`` prompt format
  has a chat template, and all tokenizers share one vocabulary (the first differing id is named);
- one probe prompt and the job's first valid prompt render for every (model, prompt format): a missing
  library (e.g. jinja2 for chat templates), a template that cannot render or a broken tokenizer stops
  the job here with one message, instead of failing every input line the same way.

A prompt that cannot be rendered because of its own content (``PromptError``, e.g. a chat prompt
without a user message for a plain model) is the line's problem, reported per line later, not here.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from eft_jax.config import Config, MeshConfig, resolve_model_path
from eft_jax.jobs.records import JobError
from eft_jax.prompts import Prompt, PromptError, render_tokens

PROBE_PROMPT = "Hello"


def make_job_mesh(mc: MeshConfig) -> Any:
    """The ``(data, model)`` mesh of a config over the first ``data * model`` visible devices."""
    import jax

    from eft_jax.sharding import make_mesh

    devices = jax.devices()
    where = f"{len(devices)} {devices[0].platform.upper()} device(s) visible"
    if mc.model > len(devices):
        raise JobError(f"mesh.model={mc.model} needs at least {mc.model} devices; {where}. Lower mesh.model.")
    data = mc.data if mc.data != -1 else len(devices) // mc.model
    if data * mc.model > len(devices):
        raise JobError(f"mesh.data={data} x mesh.model={mc.model} needs {data * mc.model} devices; {where}. "
                       "Lower mesh.data or mesh.model (mesh.data=-1 uses every device not used by mesh.model).")
    return make_mesh(data, mc.model, devices[: data * mc.model])


def check_memory(config: Config, command: str, requests: Sequence[Any], mesh: Any) -> Any:
    """The job's memory plan (``eft_jax.memory.MemoryPlan``); JobError with the per-model table and what
    to change (a batch size that fits, ...) when it does not fit. Reads config.json / GGUF headers only."""
    import jax

    from eft_jax import memory
    from eft_jax.loading import CheckpointError
    from eft_jax.models.config import UnsupportedConfigError

    specs = {}
    for name in config.model_names():
        try:
            specs[name] = memory.read_model_spec(config.models[name])
        except (CheckpointError, UnsupportedConfigError) as e:
            raise JobError(f"{config.source}: models.{name}: {e}") from None
    devices = list(mesh.devices.flat)
    local = sum(1 for d in devices if d.process_index == jax.process_index())
    available = memory.detect_device_memory(config.mesh.device_memory_gb, devices, local)
    workload = memory.workload_from_requests(config, requests, command)
    plan = memory.plan_memory(config, specs, dict(mesh.shape), workload, available)
    if not plan.fits:
        raise JobError(f"{config.source}: the job does not fit in device memory; nothing was loaded.\n"
                       + memory.does_not_fit_message(plan, specs))
    return plan


def check_tokenizers(config: Config, prompts: Sequence[Prompt]) -> dict[str, Any]:
    """Each job model's tokenizer (by model name), after checking formats, vocabularies and rendering.

    ``prompts``: prompts to render for every model (e.g. the job's first valid one); a probe prompt is
    always added. Raises JobError naming the model entry and what to fix.
    """
    from eft_jax.loading import CheckpointError, load_tokenizer
    from eft_jax.vocab import VocabMismatchError, common_vocab_size

    by_path: dict[str, Any] = {}
    tokenizers: dict[str, Any] = {}
    for name in config.model_names():
        path = resolve_model_path(config.models[name].path)
        if str(path) not in by_path:
            try:
                by_path[str(path)] = load_tokenizer(path)
            except CheckpointError as e:
                raise JobError(f"{config.source}: models.{name}: {e}") from None
        tokenizers[name] = by_path[str(path)]
        if tokenizers[name] is None:
            raise JobError(f"{config.source}: models.{name} ({path}) has no tokenizer files; EFT needs each "
                           "model's tokenizer (add tokenizer.json / tokenizer_config.json to the directory)")
        if config.models[name].prompt_format == "chat" and not getattr(tokenizers[name], "chat_template", None):
            raise JobError(f"{config.source}: models.{name}.prompt_format is 'chat' but the tokenizer of {path} has "
                           "no chat template; use 'plain' or a template with {prompt}")
    try:
        common_vocab_size({f"models.{name}": tok for name, tok in tokenizers.items()})
    except VocabMismatchError as e:
        raise JobError(f"{config.source}: the models do not share a tokenizer: {e}") from None
    for name in tokenizers:
        _check_renders(config, name, tokenizers[name], [PROBE_PROMPT, *prompts])
    return tokenizers


def _check_renders(config: Config, name: str, tokenizer: Any, prompts: Sequence[Prompt]) -> None:
    fmt = config.models[name].prompt_format
    for prompt in prompts:
        try:
            render_tokens(tokenizer, prompt, fmt)
        except PromptError:
            continue  # the prompt's own problem: reported for its line later
        except Exception as e:  # noqa: BLE001 - a library or template failure, whatever its type
            raise JobError(f"{config.source}: models.{name} cannot render a prompt in its prompt_format {fmt!r}: "
                           f"{type(e).__name__}: {e}{_remedy(e)}") from None


def _remedy(error: Exception) -> str:
    """What to do about a rendering failure, where the error says (a missing package)."""
    if not isinstance(error, ImportError):
        return ". Fix the model's chat template or choose another prompt_format"
    match = re.search(r"requires (?:the )?([A-Za-z0-9_.-]+)", str(error))
    package = getattr(error, "name", None) or (match.group(1) if match else None)
    if package:
        return f". Install the missing package into this environment: python3 -m pip install {package}"
    return ". Install the missing package named above into this environment"

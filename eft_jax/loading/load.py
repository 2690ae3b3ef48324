"""``load_model``: one entry point for HF directories, GGUF files and our orbax checkpoints."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from eft_jax.loading import hf_dir, orbax_checkpoint
from eft_jax.loading.hub import looks_like_hub_id, resolve_hub_id
from eft_jax.loading.source import CheckpointError, TensorSource
from eft_jax.loading.weights import place_run_weights, place_weights
from eft_jax.model import Model, param_shardings
from eft_jax.models.config import LlamaConfig, UnsupportedConfigError
from eft_jax.models.families import config_from_hf, family
from eft_jax.models.quant import check_quantize
from eft_jax.sharding import ShardingRules, resolve_rules, single_device_mesh

# A dequantized GGUF has no "own" float type; bf16 is what one would run it in on an accelerator.
GGUF_DEFAULT_DTYPE = jnp.bfloat16


def load_model(
    source: str | os.PathLike,
    *,
    dtype: Any = None,
    mesh: Mesh | None = None,
    sharding: str | ShardingRules | dict = "tensor_parallel",
    tokenizer: Any = None,
    quantize: str | None = None,
) -> Model:
    """Load a Llama-family causal LM onto ``mesh``.

    Args:
      source: a Hugging Face checkpoint directory (config.json + safetensors, sharded or not), a
        ``.gguf`` file, a directory written by ``eft-jax convert``, or a Hub id (``org/name[@revision]``)
        found in the local Hugging Face cache (nothing is downloaded unless ``EFT_JAX_ALLOW_DOWNLOAD=1``).
      dtype: parameter dtype (e.g. ``jnp.bfloat16``); None keeps the checkpoint's own (bf16 for GGUF).
      mesh: device mesh with axes ("data", "model"); None uses one device.
      sharding: "tensor_parallel" (weights split over the ``model`` axis), "replicated", or a
        logical-axis -> mesh-axis mapping.
      tokenizer: the checkpoint's tokenizer if already loaded (``load_tokenizer(source)``), so it is
        not built twice.
      quantize: "int8": the decoder layers' projection matrices are quantized to int8 with a float32 scale
        per output channel, tensor by tensor while loading, straight into their shardings (embeddings,
        LM head, norms and biases stay in ``dtype``; see ``eft_jax.models.quant``). An ``eft-jax convert
        --quantize int8`` checkpoint is int8 already (None keeps what it holds).
    """
    path = checked_path(source)
    mesh = mesh if mesh is not None else single_device_mesh()
    rules = resolve_rules(sharding)
    check_quantize(quantize)

    if path.is_file():
        from eft_jax.loading.gguf import open_gguf

        ckpt = open_gguf(path)
        cfg = model_config(ckpt.hf_config, f"{path} (GGUF metadata)")
        dtype = dtype if dtype is not None else GGUF_DEFAULT_DTYPE
        params = _place(cfg, ckpt.tensors, mesh, rules, dtype, quantize)
        return Model(cfg, params, tokenizer or ckpt.load_tokenizer(), mesh, rules, str(path), ckpt.end_token_ids)

    if orbax_checkpoint.is_orbax_checkpoint(path):
        cfg, saved_dtype = orbax_checkpoint.read_checkpoint_meta(path)
        dtype = dtype if dtype is not None else saved_dtype
        saved = orbax_checkpoint.read_checkpoint_quantize(path)
        if quantize is not None and saved != quantize:
            raise CheckpointError(f"{path}: holds {saved or 'unquantized'} weights, not {quantize}; convert the "
                                  f"source with `eft-jax convert SRC DEST --quantize {quantize}`, or load this one "
                                  "without quantize")
        params = orbax_checkpoint.restore_params(path, cfg, param_shardings(cfg, mesh, rules, saved), dtype, saved)
        return Model(cfg, params, tokenizer or orbax_checkpoint.load_checkpoint_tokenizer(path), mesh, rules,
                     str(path), orbax_checkpoint.read_end_token_ids(path))

    hf_config, tensors = hf_dir.open_hf_dir(path)
    cfg = model_config(hf_config, str(path / "config.json"))
    if dtype is None:
        dtype = own_dtype(tensors, cfg)
    params = _place(cfg, tensors, mesh, rules, dtype, quantize)
    return Model(cfg, params, tokenizer or hf_dir.load_hf_tokenizer(path), mesh, rules, str(path),
                 hf_dir.declared_end_ids(path, hf_config))


def _place(cfg: LlamaConfig, tensors: TensorSource, mesh: Mesh, rules: ShardingRules, dtype: Any,
           quantize: str | None) -> dict[str, Any]:
    """The params of an HF-named ``[out, in]`` source on ``mesh``: on one CPU device straight in the run
    layout the model uses there (``Model.run_params``), elsewhere in the canonical layout, shard by shard."""
    device = mesh.devices.flat[0]
    if quantize is None and mesh.devices.size == 1 and device.platform == "cpu":
        return place_run_weights(cfg, tensors, NamedSharding(mesh, PartitionSpec()), dtype)
    return place_weights(cfg, tensors, param_shardings(cfg, mesh, rules, quantize), dtype, quantize)


def load_tokenizer(source: str | os.PathLike) -> Any:
    """A checkpoint's tokenizer (chat template included) without reading its weights; None if it has none.

    Cheap next to ``load_model``: jobs use it to check tokenizers and prompt formats before loading.
    """
    path = checked_path(source)
    if path.is_file():
        from eft_jax.loading.gguf import open_gguf

        return open_gguf(path).load_tokenizer()
    if orbax_checkpoint.is_orbax_checkpoint(path):
        return orbax_checkpoint.load_checkpoint_tokenizer(path)
    hf_dir.read_hf_config(path)  # the same refusal as load_model for a directory that is no checkpoint
    return hf_dir.load_hf_tokenizer(path)


def checked_path(source: str | os.PathLike) -> Path:
    """``source`` as a path, or CheckpointError if it does not exist or is a file that is no .gguf. A
    ``source`` that is no local path but has the shape of a Hugging Face Hub id (``org/name[@revision]``)
    is looked up in the local Hugging Face cache (``eft_jax.loading.hub``)."""
    path = Path(source).expanduser()
    if not path.exists() and looks_like_hub_id(str(source)):
        path = resolve_hub_id(str(source))
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if path.is_file() and path.suffix != ".gguf":
        raise CheckpointError(
            f"{path}: a file source must be a .gguf file; for a Hugging Face checkpoint pass its directory"
        )
    return path


def model_config(hf_config: dict, where: str) -> LlamaConfig:
    """The config of an HF-style config dict; CheckpointError (naming ``where``) if it is malformed."""
    try:
        return config_from_hf(hf_config, where=where)
    except UnsupportedConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: malformed config ({e})") from None


def own_dtype(tensors: Any, cfg: LlamaConfig | None = None) -> Any:
    """An HF checkpoint's own dtype (what ``load_model`` keeps when given none): its embedding's (under the
    name ``cfg``'s family gives it; Llama's without a config), float32 if it has no embedding tensor. Reads
    the safetensors header only."""
    names = ["model.embed_tokens.weight"]
    if cfg is not None:
        fam = family(cfg.architecture)
        embed = fam.top_names.get(("embed",), names[0])
        names = [embed, embed.removeprefix(fam.base_prefix)]  # (a checkpoint saved without its base prefix)
    keys = set(tensors.keys())
    for name in names:
        if name in keys:
            return jnp.dtype(tensors.dtype(name))
    return jnp.dtype(jnp.float32)


def convert(source: str | os.PathLike, dest: str | os.PathLike, *, dtype: Any = None,
            quantize: str | None = None) -> Model:
    """Read ``source`` once (any supported format) and write our orbax checkpoint to ``dest``; with
    ``quantize`` ("int8") the checkpoint holds the int8 weights and scales, restored as they are.

    ``dest`` must not exist yet: that is checked before anything is read.
    """
    check_quantize(quantize)
    if Path(dest).expanduser().exists():
        raise FileExistsError(f"{dest} already exists; choose a new destination directory (nothing was read)")
    model = load_model(source, dtype=dtype, quantize=quantize)
    orbax_checkpoint.save_checkpoint(model, Path(dest))
    return model

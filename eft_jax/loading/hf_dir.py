"""A Hugging Face checkpoint directory: config.json + model.safetensors (or sharded + index) + tokenizer."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

from eft_jax.loading.safetensors_source import SafetensorsSource
from eft_jax.loading.source import CheckpointError
from eft_jax.loading.tokenizer_json import PLAIN_CLASSES, TokenizerJson

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def read_hf_config(directory: Path) -> dict[str, Any]:
    path = directory / "config.json"
    if not path.is_file():
        raise CheckpointError(
            f"{directory}: no config.json. Expected a Hugging Face checkpoint directory (config.json + "
            "*.safetensors), a .gguf file, or a checkpoint written by `eft-jax convert`."
        )
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def safetensors_files(directory: Path) -> list[Path]:
    """The weight files: those named by model.safetensors.index.json, else every *.safetensors."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e!r})") from None
        files = sorted({directory / name for name in weight_map.values()})
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index} names shard file(s) that do not exist: {missing}")
        return files
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        others = [p.name for p in directory.glob("*.bin")] + [p.name for p in directory.glob("*.pt")]
        hint = f" (found {others}: re-save with save_pretrained(..., safe_serialization=True))" if others else ""
        raise CheckpointError(f"{directory}: no *.safetensors weight files{hint}")
    return files


def open_hf_dir(directory: Path) -> tuple[dict[str, Any], SafetensorsSource]:
    config = read_hf_config(directory)
    return config, SafetensorsSource(safetensors_files(directory))


def load_hf_tokenizer(directory: Path) -> Any:
    """The directory's tokenizer (chat template included), or None with a warning if it has none: a
    ``TokenizerJson`` for a plain ``tokenizer.json`` one (no transformers import), else transformers' own."""
    if not any((directory / name).is_file() for name in _TOKENIZER_FILES):
        warnings.warn(f"{directory}: no tokenizer files; text prompts will not work with this model", stacklevel=3)
        return None
    try:
        plain = TokenizerJson.from_directory(directory)
        if plain is not None:
            return plain
        if _plain_fast_tokenizer(directory):
            # The class AutoTokenizer would pick, without its import of transformers' model and config
            # machinery (which imports torch where installed): ~0.5 s instead of ~2 s, once per process.
            from transformers import PreTrainedTokenizerFast

            return PreTrainedTokenizerFast.from_pretrained(str(directory))
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(directory))
    except Exception as e:  # transformers and tokenizers raise many types here; all mean the same to the user
        raise CheckpointError(f"{directory}: cannot load the tokenizer ({type(e).__name__}: {e})") from None


def _plain_fast_tokenizer(directory: Path) -> bool:
    """Whether the directory's tokenizer is a plain ``tokenizer.json`` one (``tokenizer_class`` one of
    ``PLAIN_CLASSES``), which ``PreTrainedTokenizerFast`` loads exactly as AutoTokenizer does."""
    try:
        declared = json.loads((directory / "tokenizer_config.json").read_text()).get("tokenizer_class")
    except (OSError, ValueError, AttributeError):
        return False
    return declared in PLAIN_CLASSES and (directory / "tokenizer.json").is_file()


def declared_end_ids(directory: Path, hf_config: dict[str, Any]) -> tuple[int, ...]:
    """The ``eos_token_id`` values (an id or a list) of config.json and generation_config.json, which
    is where instruct models list their end-of-turn tokens (e.g. Llama 3.1: [128001, 128008, 128009])."""
    sources = [hf_config]
    generation = directory / "generation_config.json"
    if generation.is_file():
        try:
            sources.append(json.loads(generation.read_text()))
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{generation}: cannot read it ({e}); fix or remove the file") from None
    ids: set[int] = set()
    for source in sources:
        eos = source.get("eos_token_id")
        for e in eos if isinstance(eos, list) else [eos]:
            if isinstance(e, int):
                ids.add(e)
    return tuple(sorted(ids))

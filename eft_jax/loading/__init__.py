"""Checkpoint formats (HF safetensors, GGUF, our orbax) -> ``eft_jax.Model``."""

from eft_jax.loading.load import convert, load_model, load_tokenizer
from eft_jax.loading.source import CheckpointError

__all__ = ["CheckpointError", "convert", "load_model", "load_tokenizer"]

"""A checkpoint's tensors, read lazily by Hugging Face name.

Every on-disk format (sharded safetensors, GGUF, ...) is presented to the loader through this one
interface, so the code that places weights onto devices is written once. Names and orientation follow
Hugging Face ``transformers`` Llama-family state dicts, e.g. ``model.layers.3.self_attn.q_proj.weight``
with shape ``[out_features, in_features]``.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np


class TensorSource(Protocol):
    """Read-only, lazy access to a checkpoint's tensors in Hugging Face naming and layout."""

    def keys(self) -> list[str]:
        """Every tensor name the checkpoint holds."""
        ...

    def shape(self, name: str) -> tuple[int, ...]:
        """The tensor's shape, without reading its data."""
        ...

    def read(self, name: str) -> np.ndarray:
        """The whole tensor as a numpy array (floating point; dequantized where stored quantized)."""
        ...

    def location(self, name: str) -> str:
        """Where the tensor lives (a file path), for error messages."""
        ...


class CheckpointError(ValueError):
    """A checkpoint cannot be used as it is; the message names the file or key and what to do."""

"""eft-jax: emulated fine-tuning (EFT) of large language models in JAX.

The public names below are imported on first use, so that ``import eft_jax`` (and the ``eft-jax``
command's start-up, before it can handle Ctrl-C) costs only JAX's own import, not Flax, orbax and
transformers.
"""

from __future__ import annotations

import importlib
import signal as _signal
from typing import TYPE_CHECKING, Any

from eft_jax import compile_cache as _compile_cache
from eft_jax.interrupts import Interrupts as _Interrupts

# JAX's persistent compilation cache, per user, unless EFT_JAX_COMPILE_CACHE=off or the user set
# jax_compilation_cache_dir themselves (see eft_jax/compile_cache.py for the contract). This imports JAX,
# whose garbage-collection callback swallows a Ctrl-C that lands in it; with Python's own SIGINT handler
# in place, the import records it and raises it at the end, so ``import eft_jax`` is interrupted as any
# import is (another handler, e.g. a notebook's, is left alone).
if _signal.getsignal(_signal.SIGINT) is _signal.default_int_handler:
    with _Interrupts() as _interrupts:
        _compile_cache.configure()
        _interrupts.check()
else:
    _compile_cache.configure()

_EXPORTS = {
    "CheckpointError": "eft_jax.loading.source",
    "convert": "eft_jax.loading.load",
    "load_model": "eft_jax.loading.load",
    "load_tokenizer": "eft_jax.loading.load",
    "Model": "eft_jax.model",
    "LlamaConfig": "eft_jax.models.config",
    "UnsupportedConfigError": "eft_jax.models.config",
    "make_mesh": "eft_jax.sharding",
}

__all__ = ["CheckpointError", "LlamaConfig", "Model", "UnsupportedConfigError", "convert", "load_model",
           "load_tokenizer", "make_mesh"]  # = sorted(_EXPORTS)

if TYPE_CHECKING:
    from eft_jax.loading.load import convert, load_model, load_tokenizer
    from eft_jax.loading.source import CheckpointError
    from eft_jax.model import Model
    from eft_jax.models.config import LlamaConfig, UnsupportedConfigError
    from eft_jax.sharding import make_mesh


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'eft_jax' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))

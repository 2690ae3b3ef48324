"""eft-jax: emulated fine-tuning (EFT) of large language models in JAX."""

from eft_jax.loading import CheckpointError, convert, load_model
from eft_jax.model import Model
from eft_jax.models.config import LlamaConfig, UnsupportedConfigError
from eft_jax.sharding import make_mesh

__all__ = ["CheckpointError", "LlamaConfig", "Model", "UnsupportedConfigError", "convert", "load_model", "make_mesh"]

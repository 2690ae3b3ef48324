"""The key/value cache: a plain pytree passed into the forward function and returned updated.

Layout: one buffer per k and v for all layers, ``[layers, batch, slots, kv_heads, head_dim]``, plus two
small int arrays shared by all layers:

- ``pos[b, s]``: the position of the token stored in slot ``s`` of row ``b`` (-1: empty or padding), so
  attention masks come from positions and left-padded rows need no special case;
- ``length[b]``: the next free slot of row ``b``. Each row has its own pointer, so rows of a batch can
  advance by different amounts (speculative decoding) and be rolled back by lowering the pointer,
  without copying anything.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    k: Float[Array, "layers batch slots kv_heads head_dim"]
    v: Float[Array, "layers batch slots kv_heads head_dim"]
    pos: Int[Array, "batch slots"]
    length: Int[Array, " batch"]

    @property
    def num_slots(self) -> int:
        return self.k.shape[2]

    @classmethod
    def zeros(
        cls, *, num_layers: int, batch: int, slots: int, num_kv_heads: int, head_dim: int, dtype: jnp.dtype
    ) -> KVCache:
        shape = (num_layers, batch, slots, num_kv_heads, head_dim)
        return cls(
            k=jnp.zeros(shape, dtype),
            v=jnp.zeros(shape, dtype),
            pos=jnp.full((batch, slots), -1, jnp.int32),
            length=jnp.zeros((batch,), jnp.int32),
        )

    def rewind(self, length: Int[Array, " batch"]) -> KVCache:
        """Forget everything written at or after slot ``length[b]`` of each row (no copy of k/v)."""
        return dataclasses.replace(self, length=length.astype(jnp.int32))


CACHE_LOGICAL_AXES = KVCache(
    k=("layers", "batch", "cache_seq", "kv_heads", "head_dim"),  # type: ignore[arg-type]
    v=("layers", "batch", "cache_seq", "kv_heads", "head_dim"),  # type: ignore[arg-type]
    pos=("batch", "cache_seq"),  # type: ignore[arg-type]
    length=("batch",),  # type: ignore[arg-type]
)

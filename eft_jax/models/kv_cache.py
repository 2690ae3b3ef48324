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


@dataclasses.dataclass(frozen=True)
class CacheLayout:
    """An empty cache described statically (hashable: a jit static argument), so that a jitted program
    can create its caches itself instead of taking them from a separately compiled constructor.

    ``shardings``: the NamedShardings of (k, v, pos, length), or () to leave the placement to the compiler.
    """

    num_layers: int
    batch: int
    slots: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    shardings: tuple = ()

    def zeros(self) -> KVCache:
        """The empty cache (call it inside ``jit``), constrained to ``shardings``."""
        cache = KVCache.zeros(num_layers=self.num_layers, batch=self.batch, slots=self.slots,
                              num_kv_heads=self.num_kv_heads, head_dim=self.head_dim, dtype=jnp.dtype(self.dtype))
        if not self.shardings:
            return cache
        leaves = (cache.k, cache.v, cache.pos, cache.length)
        return KVCache(*(jax.lax.with_sharding_constraint(x, s) for x, s in zip(leaves, self.shardings, strict=True)))


CACHE_LOGICAL_AXES = KVCache(
    k=("layers", "batch", "cache_seq", "kv_heads", "head_dim"),  # type: ignore[arg-type]
    v=("layers", "batch", "cache_seq", "kv_heads", "head_dim"),  # type: ignore[arg-type]
    pos=("batch", "cache_seq"),  # type: ignore[arg-type]
    length=("batch",),  # type: ignore[arg-type]
)

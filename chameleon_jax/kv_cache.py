"""The fixed-size key/value cache used by `Transformer.decode`.

One array for keys and one for values, stacked over layers: `k[l]` is layer l's
cache of shape [batch, max_len, kv_heads, head_dim] in the compute dtype. Slots are
addressed by index; which slots a query may see is decided by the caller's
`kv_mask` (so rows can be left-padded, and a stream can forget its context without
reallocating), not by anything stored here.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

# Logical axes of k and v (the layer axis is never sharded).
CACHE_AXES = ("layers", "cache_batch", "cache_length", "cache_kv_heads", "head_dim")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """k, v: [layers, batch, max_len, kv_heads, head_dim]."""

    k: jax.Array
    v: jax.Array

    @classmethod
    def zeros(cls, num_layers: int, batch: int, max_len: int, kv_heads: int, head_dim: int, dtype) -> "KVCache":
        shape = (num_layers, batch, max_len, kv_heads, head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))

    @property
    def num_layers(self) -> int:
        return self.k.shape[0]

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def layer(self, index) -> tuple[jax.Array, jax.Array]:
        """(k_bskh, v_bskh) of one layer; `index` may be traced."""
        return (
            jax.lax.dynamic_index_in_dim(self.k, index, axis=0, keepdims=False),
            jax.lax.dynamic_index_in_dim(self.v, index, axis=0, keepdims=False),
        )

    def write(self, index, write_index, k_btkh: jax.Array, v_btkh: jax.Array) -> "KVCache":
        """Stores T new entries of layer `index` in slots [write_index, write_index + T).

        Only the new entries are written (an in-place update inside a jitted step).
        `write_index + T` must not exceed max_len: XLA clamps out-of-range slices.
        """
        zero = jnp.zeros((), jnp.int32)
        start = (jnp.asarray(index, jnp.int32), zero, jnp.asarray(write_index, jnp.int32), zero, zero)
        k = jax.lax.dynamic_update_slice(self.k, k_btkh.astype(self.k.dtype)[None], start)
        v = jax.lax.dynamic_update_slice(self.v, v_btkh.astype(self.v.dtype)[None], start)
        return KVCache(k, v)

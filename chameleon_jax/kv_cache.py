"""The fixed-size key/value cache used by `Transformer.decode`.

Each layer has its own keys and values of shape [batch, kv_heads, max_len, head_dim]
in the compute dtype. Heads come before slots so that a one-token query attends with
two batched matmuls straight off the cache, with no transpose. A looped model holds a
tuple of per-layer arrays, so a layer's write touches only its own buffer (in place
inside a jitted loop). A scanned model (`scan_layers`) holds them stacked, [layers, ...],
carried through its scan; each layer reads its slice and writes only its new entries.

Slots are addressed by index; which slots a query may see is decided by the caller's
`kv_mask` (so rows can be left-padded, and a stream can forget its context without
reallocating), not by anything stored here.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

# Logical axes of one layer's k and v, and of the stacked form (the layer axis is never sharded).
CACHE_AXES = ("cache_batch", "cache_kv_heads", "cache_length", "head_dim")
STACKED_CACHE_AXES = ("layers", *CACHE_AXES)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """k, v: tuples of per-layer arrays [batch, kv_heads, max_len, head_dim], or (stacked)
    single arrays [layers, batch, kv_heads, max_len, head_dim]."""

    k: tuple[jax.Array, ...] | jax.Array
    v: tuple[jax.Array, ...] | jax.Array

    @classmethod
    def zeros(cls, num_layers: int, batch: int, max_len: int, kv_heads: int, head_dim: int, dtype, *,
              stacked: bool = False) -> "KVCache":
        shape = (batch, kv_heads, max_len, head_dim)
        if stacked:
            shape = (num_layers, *shape)
            return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
        return cls(tuple(jnp.zeros(shape, dtype) for _ in range(num_layers)),
                   tuple(jnp.zeros(shape, dtype) for _ in range(num_layers)))

    @property
    def stacked(self) -> bool:
        return not isinstance(self.k, tuple)

    @property
    def num_layers(self) -> int:
        return self.k.shape[0] if self.stacked else len(self.k)

    @property
    def batch_size(self) -> int:
        return self.k[0].shape[0]

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]

    def layer(self, index: int) -> tuple[jax.Array, jax.Array]:
        """(k, v) of layer `index`: its own arrays, or the stacked pair itself."""
        return (self.k, self.v) if self.stacked else (self.k[index], self.v[index])


def read_layer(k: jax.Array, v: jax.Array, layer=None) -> tuple[jax.Array, jax.Array]:
    """(k_bksh, v_bksh) of one layer: k and v themselves, or (with `layer`, which may be
    traced) that layer's slice of stacked arrays."""
    if layer is None:
        return k, v
    return (jax.lax.dynamic_index_in_dim(k, layer, axis=0, keepdims=False),
            jax.lax.dynamic_index_in_dim(v, layer, axis=0, keepdims=False))


def write_layer(k: jax.Array, v: jax.Array, write_index, k_btkh: jax.Array, v_btkh: jax.Array,
                layer=None) -> tuple[jax.Array, jax.Array]:
    """k and v with T new entries of one layer stored in slots [write_index, write_index + T).

    k, v: that layer's [B, K, S, H] arrays, or (with `layer`) stacked [L, B, K, S, H] ones.
    write_index: one slot for every row, or int32 [B], each row's own (a per-row scatter).
    Only the new entries are written (an in-place update inside a jitted loop, as long as
    nothing reads the written arrays afterwards in the same step). `write_index + T` must
    not exceed max_len: XLA clamps out-of-range slices.
    """
    write_index = jnp.asarray(write_index, jnp.int32)
    zero = jnp.zeros((), jnp.int32)
    lead = () if layer is None else (jnp.asarray(layer, jnp.int32),)
    k_bkth = k_btkh.astype(k.dtype).transpose(0, 2, 1, 3)
    v_bkth = v_btkh.astype(v.dtype).transpose(0, 2, 1, 3)
    if layer is not None:
        k_bkth, v_bkth = k_bkth[:, None], v_bkth[:, None]  # [B, 1, K, T, H]: one layer's entries
    if write_index.ndim == 0:
        put = lambda a, new: jax.lax.dynamic_update_slice(a, jnp.moveaxis(new, 0, len(lead)),
                                                          (*lead, zero, zero, write_index, zero))
    else:  # each row at its own slot: a per-row update along the cache's batch axis
        put_row = lambda row, new, at: jax.lax.dynamic_update_slice(row, new, (*lead, zero, at, zero))
        put = lambda a, new: jax.vmap(put_row, in_axes=(len(lead), 0, 0), out_axes=len(lead))(a, new, write_index)
    return put(k, k_bkth), put(v, v_bkth)

"""Decode attention straight off the [B, K, S, H] KV cache, read before this pass writes it."""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Passes of at most this many new tokens per row (decode steps, speculative windows) attend
# the cache from before their write; longer ones (prefills) write first and call the
# attention kernels, since their own T x T block is most of the work.
MAX_CACHED_QUERIES = 64


def decode_step_attention(q_btnh, k_bksh, v_bksh, k_btkh, v_btkh, mask_b1ts, write_index) -> jax.Array:
    """T queries per row against a [B, K, S, H] cache plus their own new keys and values: [B, T, N, H].

    The cache is the one from before this pass's write: slots [write_index, write_index + T)
    are skipped there and the T new keys/values (already rotated) stand in for them, so
    the cache is only read before its in-place write, never after (reading the written
    array makes XLA copy the whole cache on every step of a loop). The layout is already
    the batched-matmul one (batch B, K; contract H, then S): nothing is transposed or
    repeated, and the logits are float32. mask_b1ts is `attention.decode_mask`'s: query
    t sees slot s iff the row's kv_mask has s and s <= write_index + t. write_index: one
    slot for every row, or int32 [B], each row's own.
    """
    b, t, n, h = q_btnh.shape
    kv, s = k_bksh.shape[1], k_bksh.shape[2]
    q_bkgth = q_btnh.reshape(b, t, kv, n // kv, h).transpose(0, 2, 3, 1, 4) * jnp.asarray(h ** -0.5, q_btnh.dtype)
    old_bkgts = jnp.einsum("bkgth,bksh->bkgts", q_bkgth, k_bksh, preferred_element_type=jnp.float32)
    new_bkgtu = jnp.einsum("bkgth,bukh->bkgtu", q_bkgth, k_btkh, preferred_element_type=jnp.float32)
    slots_s = jnp.arange(s, dtype=jnp.int32)
    write_b = jnp.broadcast_to(jnp.asarray(write_index, jnp.int32), (b,))
    stale_b111s = ((slots_s >= write_b[:, None]) & (slots_s < write_b[:, None] + t))[:, None, None, None]
    mask_bts = mask_b1ts[:, 0]
    new_btu = jax.vmap(lambda m_ts, w: jax.lax.dynamic_slice_in_dim(m_ts, w, t, axis=-1))(mask_bts, write_b)
    neg = jnp.finfo(jnp.float32).min
    logits_bkgtx = jnp.concatenate(
        [jnp.where(mask_bts[:, None, None] & ~stale_b111s, old_bkgts, neg),
         jnp.where(new_btu[:, None, None], new_bkgtu, neg)], axis=-1
    )
    probs_bkgtx = jax.nn.softmax(logits_bkgtx, axis=-1).astype(v_bksh.dtype)
    out_bkgth = jnp.einsum("bkgts,bksh->bkgth", probs_bkgtx[..., :s], v_bksh)
    out_bkgth = out_bkgth + jnp.einsum("bkgtu,bukh->bkgth", probs_bkgtx[..., s:], v_btkh)
    return out_bkgth.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)

"""One-token decode attention straight off the [B, K, S, H] KV cache."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def decode_step_attention(q_b1nh, k_bksh, v_bksh, k_b1kh, v_b1kh, mask_b11s, write_index) -> jax.Array:
    """One query per row against a [B, K, S, H] cache plus its own new key and value: [B, 1, N, H].

    The cache is the one from before this step's write: slot `write_index` is skipped
    there and the new key/value (already rotated) stand in for it, so the cache is only
    read before its in-place write, never after (reading the written array makes XLA
    copy it). The layout is already the batched-matmul one (batch B, K; contract H,
    then S): nothing is transposed or repeated, the mask stays [B, 1, 1, S], and the
    logits are float32.
    """
    b, _, n, h = q_b1nh.shape
    kv, s = k_bksh.shape[1], k_bksh.shape[2]
    q_bkgh = q_b1nh.reshape(b, kv, n // kv, h) * jnp.asarray(h ** -0.5, q_b1nh.dtype)
    old_bkgs = jnp.einsum("bkgh,bksh->bkgs", q_bkgh, k_bksh, preferred_element_type=jnp.float32)
    new_bkg1 = jnp.einsum("bkgh,bkh->bkg", q_bkgh, k_b1kh[:, 0], preferred_element_type=jnp.float32)[..., None]
    stale_s = jnp.arange(s, dtype=jnp.int32) == write_index
    new_b111 = jax.lax.dynamic_slice_in_dim(mask_b11s, write_index, 1, axis=-1)
    neg = jnp.finfo(jnp.float32).min
    logits_bkgt = jnp.concatenate(
        [jnp.where(mask_b11s & ~stale_s, old_bkgs, neg), jnp.where(new_b111, new_bkg1, neg)], axis=-1
    )
    probs_bkgt = jax.nn.softmax(logits_bkgt, axis=-1).astype(v_bksh.dtype)
    out_bkgh = jnp.einsum("bkgs,bksh->bkgh", probs_bkgt[..., :s], v_bksh)
    out_bkgh = out_bkgh + probs_bkgt[..., s:] * v_b1kh[:, 0, :, None, :]
    return out_bkgh.reshape(b, 1, n, h)

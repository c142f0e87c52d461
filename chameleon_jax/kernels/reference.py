"""The readable reference kernel: an explicit einsum softmax, grouped query heads, float32 logits."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def allowed_keys(start: int, end: int, keys: int, mask_b1ts, is_causal: bool) -> jax.Array:
    """bool [B|1, 1, 1, end - start, keys]: which of the first `keys` keys queries [start, end) may see."""
    allowed = jnp.ones((1, 1, 1, end - start, keys), bool)
    if is_causal:
        allowed = allowed & (jnp.arange(keys)[None, :] <= jnp.arange(start, end)[:, None])
    if mask_b1ts is not None:
        allowed = allowed & mask_b1ts[:, :, None, start:end, :keys]
    return allowed


def naive_attention(q_btnh, k_bskh, v_bskh, mask_b1ts=None, *, is_causal: bool = False) -> jax.Array:
    """Explicit softmax(q k^T / sqrt(h)) v with grouped query heads; float32 logits."""
    b, t, n, h = q_btnh.shape
    kv = k_bskh.shape[2]
    q_btkgh = q_btnh.reshape(b, t, kv, n // kv, h)
    logits = jnp.einsum("btkgh,bskh->bkgts", q_btkgh, k_bskh, preferred_element_type=jnp.float32)
    logits = logits * (h ** -0.5)
    allowed = allowed_keys(0, t, k_bskh.shape[1], mask_b1ts, is_causal)
    logits = jnp.where(allowed, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v_bskh.dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v_bskh)
    return out.reshape(b, t, n, h)

"""Attention: masks, the kernel dispatch, and the multi-head (GQA) attention layer.

The kernel is `jax.nn.dot_product_attention` (XLA, or cuDNN flash attention on
GPU), or an explicit einsum softmax (`naive`) kept as the readable reference. All
three take grouped-query attention as it is: N query heads against K key/value
heads, never materialising the repeated keys.

Masks are boolean, True = may attend, shaped [batch, 1, T, S] (broadcast over heads).
Masked logits get a large finite negative value, so a row that may attend to nothing
(a left-padding query) yields a harmless uniform average rather than NaN.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from chameleon_jax.config import ModelConfig
from chameleon_jax.kv_cache import KVCache
from chameleon_jax.layers import QKNorm, apply_rope, dtype_of, make_param, normal
from chameleon_jax.sharding import constrain

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "naive")


# --------------------------------------------------------------------------- masks


def segment_mask(segment_ids_bt: jax.Array) -> jax.Array:
    """[B, 1, T, T]: query t may see key s only within its own segment (causality is separate)."""
    return (segment_ids_bt[:, :, None] == segment_ids_bt[:, None, :])[:, None]


def decode_mask(kv_mask_bs: jax.Array, write_index: jax.Array, num_queries: int) -> jax.Array:
    """[B, 1, T, S]: query t (stored at slot write_index + t) sees slot s iff kv_mask[b, s] and s <= write_index + t."""
    slots_s = jnp.arange(kv_mask_bs.shape[1], dtype=jnp.int32)
    query_slot_t = jnp.asarray(write_index, jnp.int32) + jnp.arange(num_queries, dtype=jnp.int32)
    causal_ts = slots_s[None, :] <= query_slot_t[:, None]
    return (kv_mask_bs.astype(bool)[:, None, :] & causal_ts[None])[:, None]


# --------------------------------------------------------------------------- kernel


def resolve_implementation(impl: str, dtype, head_dim: int, backend: str | None = None) -> str:
    """The kernel `impl` stands for on this backend.

    `auto` picks cuDNN flash attention on GPU when it can run (half precision, head_dim a
    multiple of 8 up to 128) and XLA otherwise (CPU, TPU, float32 on GPU).
    """
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation must be one of {IMPLEMENTATIONS}, got {impl!r}")
    if impl != "auto":
        return impl
    backend = backend or jax.default_backend()
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    cudnn_ok = half and head_dim % 8 == 0 and head_dim <= 128
    return "cudnn" if backend == "gpu" and cudnn_ok else "xla"


def naive_attention(q_btnh, k_bskh, v_bskh, mask_b1ts=None, *, is_causal: bool = False) -> jax.Array:
    """Explicit softmax(q k^T / sqrt(h)) v with grouped query heads; float32 logits."""
    b, t, n, h = q_btnh.shape
    kv = k_bskh.shape[2]
    q_btkgh = q_btnh.reshape(b, t, kv, n // kv, h)
    logits = jnp.einsum("btkgh,bskh->bkgts", q_btkgh, k_bskh, preferred_element_type=jnp.float32)
    logits = logits * (h ** -0.5)
    s = k_bskh.shape[1]
    allowed = jnp.ones((1, 1, 1, t, s), bool)
    if is_causal:
        allowed = allowed & jnp.tril(jnp.ones((t, s), bool))
    if mask_b1ts is not None:
        allowed = allowed & mask_b1ts[:, :, None]
    logits = jnp.where(allowed, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v_bskh.dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v_bskh)
    return out.reshape(b, t, n, h)


def dot_product_attention(
    q_btnh: jax.Array,
    k_bskh: jax.Array,
    v_bskh: jax.Array,
    mask_b1ts: jax.Array | None = None,
    *,
    is_causal: bool = False,
    implementation: str = "xla",
) -> jax.Array:
    """Attention output [B, T, N, H]. `is_causal` assumes queries and keys are aligned (T == S)."""
    impl = resolve_implementation(implementation, q_btnh.dtype, q_btnh.shape[-1])
    if impl == "naive":
        return naive_attention(q_btnh, k_bskh, v_bskh, mask_b1ts, is_causal=is_causal)
    return jax.nn.dot_product_attention(
        q_btnh, k_bskh, v_bskh, mask=mask_b1ts, is_causal=is_causal, implementation=impl
    )


# --------------------------------------------------------------------------- layer


class Attention(nnx.Module):
    """Multi-head attention with grouped KV heads, QK-norm (before RoPE), no biases."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        if cfg.num_heads % cfg.num_kv_heads:
            raise ValueError(f"num_heads ({cfg.num_heads}) must be a multiple of num_kv_heads ({cfg.num_kv_heads})")
        d, n, k, h = cfg.hidden_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        dtype, pdtype = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
        init = normal(cfg.initializer_range)
        self.dtype = dtype
        self.rope_theta = cfg.rope_theta
        self.implementation = cfg.attention_impl
        self.wq_dnh = make_param(rngs, init, (d, n, h), ("embed", "heads", "head_dim"), pdtype)
        self.wk_dkh = make_param(rngs, init, (d, k, h), ("embed", "kv_heads", "head_dim"), pdtype)
        self.wv_dkh = make_param(rngs, init, (d, k, h), ("embed", "kv_heads", "head_dim"), pdtype)
        self.wo_nhd = make_param(rngs, init, (n, h, d), ("heads", "head_dim", "embed"), pdtype)
        if cfg.qk_norm == "none":
            self.q_norm = self.k_norm = None
        else:
            kw = dict(eps=cfg.qk_norm_eps, dtype=dtype, param_dtype=pdtype, rngs=rngs)
            self.q_norm = QKNorm(n, h, cfg.qk_norm, "heads", **kw)
            self.k_norm = QKNorm(k, h, cfg.qk_norm, "kv_heads", **kw)

    def project(self, x_btd: jax.Array, positions_bt: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """q [B,T,N,H], k and v [B,T,K,H]; q and k normalised, then rotated."""
        dt = self.dtype
        q_btnh = jnp.einsum("btd,dnh->btnh", x_btd, self.wq_dnh[...].astype(dt))
        k_btkh = jnp.einsum("btd,dkh->btkh", x_btd, self.wk_dkh[...].astype(dt))
        v_btkh = jnp.einsum("btd,dkh->btkh", x_btd, self.wv_dkh[...].astype(dt))
        if self.q_norm is not None:
            q_btnh = self.q_norm(q_btnh)
            k_btkh = self.k_norm(k_btkh)
        q_btnh = apply_rope(q_btnh, positions_bt, self.rope_theta)
        k_btkh = apply_rope(k_btkh, positions_bt, self.rope_theta)
        q_btnh = constrain(q_btnh, ("activation_batch", "activation_length", "activation_heads", None))
        k_btkh = constrain(k_btkh, ("activation_batch", "activation_length", "activation_kv_heads", None))
        v_btkh = constrain(v_btkh, ("activation_batch", "activation_length", "activation_kv_heads", None))
        return tuple(checkpoint_name(a, "qkv_proj") for a in (q_btnh, k_btkh, v_btkh))

    def __call__(
        self,
        x_btd: jax.Array,
        positions_bt: jax.Array,
        *,
        mask_b1ts: jax.Array | None,
        is_causal: bool,
        cache: KVCache | None = None,
        layer=None,
        write_index=None,
    ) -> tuple[jax.Array, KVCache | None]:
        """Self-attention over the T new tokens, or (with `cache`) over the cache after
        writing the new keys and values into layer `layer` at `write_index`."""
        q_btnh, k_bskh, v_bskh = self.project(x_btd, positions_bt)
        if cache is not None:
            cache = cache.write(layer, write_index, k_bskh, v_bskh)
            k_bskh, v_bskh = cache.layer(layer)
            k_bskh = constrain(k_bskh, ("cache_batch", "cache_length", "cache_kv_heads", None))
            v_bskh = constrain(v_bskh, ("cache_batch", "cache_length", "cache_kv_heads", None))
        out_btnh = dot_product_attention(
            q_btnh, k_bskh, v_bskh, mask_b1ts, is_causal=is_causal, implementation=self.implementation
        )
        out_btnh = constrain(out_btnh, ("activation_batch", "activation_length", "activation_heads", None))
        y_btd = jnp.einsum("btnh,nhd->btd", out_btnh, self.wo_nhd[...].astype(self.dtype))
        return y_btd, cache

"""Attention: masks and the multi-head (GQA) attention layer.

The kernels live in `chameleon_jax.kernels`, one module each (XLA or cuDNN, chunked,
naive, splash, ring, decode), with the rule that picks one (`resolve_implementation`,
`dot_product_attention`). A decode step, or a speculative window of up to
`MAX_CACHED_QUERIES` tokens, skips the dispatch: einsums straight off the [B, K, S, H]
cache read before the pass writes it (`decode_step_attention`).

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
from chameleon_jax.kernels import (  # noqa: F401  (the kernels' names, as this module always offered them)
    CHUNK,
    IMPLEMENTATIONS,
    chunked_attention,
    decode_step_attention,
    dot_product_attention,
    naive_attention,
    resolve_implementation,
)
from chameleon_jax.kernels.decode import MAX_CACHED_QUERIES
from chameleon_jax.kv_cache import CACHE_AXES, read_layer, write_layer
from chameleon_jax.layers import QKNorm, apply_rope, dense, dtype_of, make_param, matmul_dtype_of, normal
from chameleon_jax.sharding import constrain


# --------------------------------------------------------------------------- masks


def segment_mask(segment_ids_bt: jax.Array) -> jax.Array:
    """[B, 1, T, T]: query t may see key s only within its own segment (causality is separate)."""
    return (segment_ids_bt[:, :, None] == segment_ids_bt[:, None, :])[:, None]


def decode_mask(kv_mask_bs: jax.Array, write_index: jax.Array, num_queries: int) -> jax.Array:
    """[B, 1, T, S]: query t (stored at slot write_index + t) sees slot s iff kv_mask[b, s] and s <= write_index + t.

    write_index: one slot for every row, or int32 [B], each row's own."""
    slots_s = jnp.arange(kv_mask_bs.shape[1], dtype=jnp.int32)
    write_b1 = jnp.broadcast_to(jnp.asarray(write_index, jnp.int32), kv_mask_bs.shape[:1])[:, None]
    query_slot_bt = write_b1 + jnp.arange(num_queries, dtype=jnp.int32)
    causal_bts = slots_s[None, None, :] <= query_slot_bt[:, :, None]
    return (kv_mask_bs.astype(bool)[:, None, :] & causal_bts)[:, None]


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
        self.matmul_dtype = matmul_dtype_of(cfg)
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
        q_btnh = dense(x_btd, self.wq_dnh[...].astype(dt), operand_dtype=self.matmul_dtype)
        k_btkh = dense(x_btd, self.wk_dkh[...].astype(dt), operand_dtype=self.matmul_dtype)
        v_btkh = dense(x_btd, self.wv_dkh[...].astype(dt), operand_dtype=self.matmul_dtype)
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
        segment_ids_bt: jax.Array | None = None,
        cache: tuple[jax.Array, jax.Array] | None = None,
        layer=None,
        write_index=None,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        """Self-attention over the T new tokens, or over the cache with the new keys and
        values stored at `write_index`. `segment_ids_bt`: the ids `mask_b1ts` was built from
        (for the kernels that read ids, not masks). `cache`: this layer's (k, v), each
        [B, K, S, H], or with `layer` the stacked [L, B, K, S, H] pair. Returns the output
        [B, T, D] and the updated cache pair."""
        q_btnh, k_btkh, v_btkh = self.project(x_btd, positions_bt)
        if cache is None:
            out_btnh = dot_product_attention(
                q_btnh, k_btkh, v_btkh, mask_b1ts, is_causal=is_causal, implementation=self.implementation,
                segment_ids_bt=segment_ids_bt,
            )
        elif q_btnh.shape[1] <= MAX_CACHED_QUERIES:
            k_bksh, v_bksh = (constrain(a, CACHE_AXES) for a in read_layer(*cache, layer))
            out_btnh = decode_step_attention(q_btnh, k_bksh, v_bksh, k_btkh, v_btkh, mask_b1ts, write_index)
            # XLA writes the cache in place only when the write provably follows the read,
            # else it copies the layer's cache every step; a zero-weight dependence on the
            # output orders them. (It changes nothing unless that row's output is not finite.)
            after_b111 = 0 * out_btnh[:, :, :1, :1]
            cache = write_layer(*cache, write_index, k_btkh + after_b111, v_btkh + after_b111, layer)
        else:  # a prefill: write, then read back with one transpose for the kernel dispatch
            cache = write_layer(*cache, write_index, k_btkh, v_btkh, layer)
            k_bksh, v_bksh = (constrain(a, CACHE_AXES) for a in read_layer(*cache, layer))
            out_btnh = dot_product_attention(
                q_btnh, k_bksh.transpose(0, 2, 1, 3), v_bksh.transpose(0, 2, 1, 3), mask_b1ts,
                is_causal=is_causal, implementation=self.implementation,
            )
        out_btnh = constrain(out_btnh, ("activation_batch", "activation_length", "activation_heads", None))
        # Heads and head_dim merged by hand: contracting both in one einsum lets XLA on CPU
        # pick a (head_dim, heads) order and transpose the whole weight on every call.
        b, t, n, h = out_btnh.shape
        wo_ed = self.wo_nhd[...].astype(self.dtype).reshape(n * h, -1)
        y_btd = dense(out_btnh.reshape(b, t, n * h), wo_ed, operand_dtype=self.matmul_dtype)
        return y_btd, cache

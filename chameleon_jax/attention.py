"""Attention: masks, the kernel dispatch, and the multi-head (GQA) attention layer.

The kernel is `jax.nn.dot_product_attention` (XLA, or cuDNN flash attention on
GPU), `chunked` (query blocks that skip the keys causality hides, softmax
normalised after the value product; the CPU default), or an explicit einsum
softmax (`naive`) kept as the readable reference. All take grouped-query
attention as it is: N query heads against K key/value heads, never
materialising the repeated keys. A one-token decode step skips the
dispatch: two einsums straight off the [B, K, S, H] cache (`decode_step_attention`).

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
from chameleon_jax.kv_cache import CACHE_AXES, read_layer, write_layer
from chameleon_jax.layers import QKNorm, apply_rope, dense, dtype_of, make_param, normal
from chameleon_jax.sharding import constrain

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "chunked", "naive")
CHUNK = 96  # query block of the chunked kernel (fastest of 64-384 for 384-token rows on a CPU)


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
    multiple of 8 up to 128), `chunked` on CPU, and XLA otherwise (TPU, float32 on GPU).
    """
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation must be one of {IMPLEMENTATIONS}, got {impl!r}")
    if impl != "auto":
        return impl
    backend = backend or jax.default_backend()
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    cudnn_ok = half and head_dim % 8 == 0 and head_dim <= 128
    if backend == "cpu":
        return "chunked"
    return "cudnn" if backend == "gpu" and cudnn_ok else "xla"


def _allowed(start: int, end: int, keys: int, mask_b1ts, is_causal: bool) -> jax.Array:
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
    allowed = _allowed(0, t, k_bskh.shape[1], mask_b1ts, is_causal)
    logits = jnp.where(allowed, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v_bskh.dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v_bskh)
    return out.reshape(b, t, n, h)


def chunked_attention(q_btnh, k_bskh, v_bskh, mask_b1ts=None, *, is_causal: bool = False,
                      chunk: int = CHUNK) -> jax.Array:
    """The same result as `naive_attention`, in query blocks of `chunk`, with less memory traffic.

    On a CPU, attention over packed rows is bound by the passes over the float32
    [B, N, T, S] scores, not by the two matmuls. Two changes cut those passes:
    - with `is_causal`, query block [a, b) reads keys [0, b) only, so the scores
      cover about (1 + 1/n) / 2 of the square for n blocks instead of all of it;
    - the softmax is normalised after the value product: exp(s - max) @ v is divided
      by the row sums, a [T, H] division instead of a [T, S] one (and none of it in
      the backward pass over the scores). The max is a constant for differentiation
      (the result does not depend on it), so gradients are exact.
    A query that may see no key gets a finite average of the keys its block reads
    (the other kernels average all keys); such rows are padding, never trained on.
    """
    b, t, n, h = q_btnh.shape
    kv, s = k_bskh.shape[2], k_bskh.shape[1]
    q_btkgh = q_btnh.reshape(b, t, kv, n // kv, h) * jnp.asarray(h ** -0.5, q_btnh.dtype)
    neg = jnp.finfo(jnp.float32).min
    outs = []
    for start in range(0, t, chunk):
        end = min(t, start + chunk)
        keys = end if is_causal else s
        logits = jnp.einsum("btkgh,bskh->bkgts", q_btkgh[:, start:end], k_bskh[:, :keys],
                            preferred_element_type=jnp.float32)
        logits = jnp.where(_allowed(start, end, keys, mask_b1ts, is_causal), logits, neg)
        weights = jnp.exp(logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True)))
        out_btkgh = jnp.einsum("bkgts,bskh->btkgh", weights.astype(v_bskh.dtype), v_bskh[:, :keys])
        total_btkg = jnp.transpose(jnp.sum(weights, axis=-1), (0, 3, 1, 2))
        outs.append(out_btkgh / total_btkg[..., None].astype(out_btkgh.dtype))
    return jnp.concatenate(outs, axis=1).reshape(b, t, n, h)


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
    if impl == "chunked":
        return chunked_attention(q_btnh, k_bskh, v_bskh, mask_b1ts, is_causal=is_causal)
    return jax.nn.dot_product_attention(
        q_btnh, k_bskh, v_bskh, mask=mask_b1ts, is_causal=is_causal, implementation=impl
    )


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
        q_btnh = dense(x_btd, self.wq_dnh[...].astype(dt))
        k_btkh = dense(x_btd, self.wk_dkh[...].astype(dt))
        v_btkh = dense(x_btd, self.wv_dkh[...].astype(dt))
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
        cache: tuple[jax.Array, jax.Array] | None = None,
        layer=None,
        write_index=None,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        """Self-attention over the T new tokens, or over the cache with the new keys and
        values stored at `write_index`. `cache`: this layer's (k, v), each [B, K, S, H], or
        with `layer` the stacked [L, B, K, S, H] pair. Returns the output [B, T, D] and the
        updated cache pair."""
        q_btnh, k_btkh, v_btkh = self.project(x_btd, positions_bt)
        if cache is None:
            out_btnh = dot_product_attention(
                q_btnh, k_btkh, v_btkh, mask_b1ts, is_causal=is_causal, implementation=self.implementation
            )
        elif q_btnh.shape[1] == 1:
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
        y_btd = dense(out_btnh.reshape(b, t, n * h), wo_ed)
        return y_btd, cache

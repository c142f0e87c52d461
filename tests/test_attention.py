"""Attention kernels agree with each other, masks mean what they say, `auto` picks the right kernel."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from chameleon_jax.attention import (
    decode_mask,
    decode_step_attention,
    dot_product_attention,
    naive_attention,
    resolve_implementation,
    segment_mask,
)
from chameleon_jax.config import ModelConfig
from chameleon_jax.transformer import Transformer


def qkv(b=2, t=7, s=7, n=4, k=2, h=16, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(keys[0], (b, t, n, h)), jax.random.normal(keys[1], (b, s, k, h)),
            jax.random.normal(keys[2], (b, s, k, h)))


def reference(q, k, v, allowed_bts):
    """Per-head loop with the KV heads explicitly repeated, in float64 numpy."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    groups = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, groups, axis=2), np.repeat(v, groups, axis=2)
    logits = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
    logits = np.where(np.asarray(allowed_bts)[:, None], logits, -1e30)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bnts,bsnh->btnh", p, v)


@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
def test_xla_and_naive_agree_with_reference_under_causal_and_segment_masks(kv_heads):
    q, k, v = qkv(k=kv_heads)
    segments = jnp.asarray([[1, 1, 1, 2, 2, 2, 2], [5, 5, 5, 5, 5, 5, 5]])
    mask = segment_mask(segments)
    allowed = np.tril(np.ones((7, 7), bool))[None] & np.asarray(mask[:, 0])
    ref = reference(q, k, v, allowed)
    for impl in ("xla", "naive"):
        out = dot_product_attention(q, k, v, mask, is_causal=True, implementation=impl)
        np.testing.assert_allclose(out, ref, atol=1e-5, err_msg=impl)
    causal_only = reference(q, k, v, np.tril(np.ones((7, 7), bool))[None].repeat(2, 0))
    np.testing.assert_allclose(naive_attention(q, k, v, is_causal=True), causal_only, atol=1e-5)
    np.testing.assert_allclose(dot_product_attention(q, k, v, is_causal=True, implementation="xla"), causal_only, atol=1e-5)


def test_decode_mask_combines_kv_mask_and_causality():
    kv_mask = jnp.asarray([[False, True, True, True, True, False], [True] * 6])
    m = np.asarray(decode_mask(kv_mask, jnp.int32(2), 2))[:, 0]
    # Queries sit at slots 2 and 3: they see slots <= 2 and <= 3, and only where kv_mask allows.
    np.testing.assert_array_equal(m[0], [[False, True, True, False, False, False], [False, True, True, True, False, False]])
    np.testing.assert_array_equal(m[1], [[True, True, True, False, False, False], [True, True, True, True, False, False]])
    q, k, v = qkv(t=2, s=6, seed=1)
    mask = decode_mask(kv_mask, jnp.int32(2), 2)
    ref = reference(q, k, v, np.asarray(mask[:, 0]))
    for impl in ("xla", "naive"):
        np.testing.assert_allclose(dot_product_attention(q, k, v, mask, implementation=impl), ref, atol=1e-5)


@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
def test_decode_step_reads_the_cache_from_before_its_write(kv_heads):
    """The step sees its own new key/value at write_index, never the stale cache slot there."""
    q, k, v = qkv(t=1, s=9, k=kv_heads, seed=2)
    kv_mask = jnp.asarray([[False, True, True, True, True, True, False, False, False], [True] * 9])
    mask = decode_mask(kv_mask, jnp.int32(5), 1)
    assert mask.shape == (2, 1, 1, 9)
    ref = reference(q, k, v, np.asarray(mask[:, 0]))
    stale_k, stale_v = (a.transpose(0, 2, 1, 3).at[:, :, 5].set(100.0) for a in (k, v))
    out = decode_step_attention(q, stale_k, stale_v, k[:, 5:6], v[:, 5:6], mask, jnp.int32(5))
    np.testing.assert_allclose(out, ref, atol=1e-5)
    nothing = decode_step_attention(q, stale_k, stale_v, k[:, 5:6], v[:, 5:6], jnp.zeros_like(mask), jnp.int32(5))
    assert bool(jnp.isfinite(nothing).all())


def test_a_window_of_queries_reads_the_cache_from_before_its_write_at_each_rows_own_slot():
    """T = 3 queries per row, written at slots 5 and 2: each sees the earlier slots its mask allows
    and its own window's keys causally, never the stale cache entries under the window."""
    q, k, v = qkv(t=3, s=9, k=2, seed=3)
    write_b = jnp.asarray([5, 2], jnp.int32)
    kv_mask = jnp.asarray([[False, True, True, True, True, True, True, True, False], [True] * 9])
    mask = decode_mask(kv_mask, write_b, 3)
    assert mask.shape == (2, 1, 3, 9)
    np.testing.assert_array_equal(np.asarray(mask[1, 0, 0]), np.arange(9) <= 2)
    # The full keys/values: row b's window at slots [write_b[b], write_b[b] + 3).
    k_new, v_new = qkv(t=3, s=3, k=2, seed=4)[1:]
    full_k, full_v = np.array(k), np.array(v)
    for row, at in enumerate([5, 2]):
        full_k[row, at:at + 3], full_v[row, at:at + 3] = k_new[row], v_new[row]
    ref = reference(q, full_k, full_v, np.asarray(mask[:, 0]))
    stale_k, stale_v = (a.transpose(0, 2, 1, 3) for a in (k, v))  # the cache before the write
    out = decode_step_attention(q, stale_k, stale_v, k_new, v_new, mask, write_b)
    np.testing.assert_allclose(out, ref, atol=1e-5)


def test_query_that_may_see_nothing_stays_finite():
    q, k, v = qkv(t=1, s=4)
    nothing = jnp.zeros((2, 1, 1, 4), bool)
    for impl in ("xla", "naive"):
        assert bool(jnp.isfinite(dot_product_attention(q, k, v, nothing, implementation=impl)).all())


def test_auto_dispatch():
    assert resolve_implementation("auto", jnp.bfloat16, 128, backend="gpu") == "cudnn"
    assert resolve_implementation("auto", jnp.float16, 64, backend="gpu") == "cudnn"
    assert resolve_implementation("auto", jnp.float32, 128, backend="gpu") == "xla"  # cuDNN needs half precision
    assert resolve_implementation("auto", jnp.bfloat16, 12, backend="gpu") == "xla"  # head_dim not a multiple of 8
    assert resolve_implementation("auto", jnp.bfloat16, 128, backend="cpu") == "chunked"
    assert resolve_implementation("auto", jnp.bfloat16, 128, backend="tpu") == "splash"
    assert resolve_implementation("auto", jnp.bfloat16, 64, backend="tpu") == "xla"  # under the kernel's lane width
    # A dense mask (a decode prefill) goes to the kernel that takes any mask.
    assert resolve_implementation("auto", jnp.bfloat16, 128, backend="tpu", segments_only=False) == "xla"
    assert resolve_implementation("splash", jnp.float32, 16, backend="cpu", segments_only=False) == "xla"
    assert resolve_implementation("cudnn", jnp.float32, 128, backend="cpu") == "cudnn"  # explicit choice is kept
    assert resolve_implementation("naive", jnp.bfloat16, 128) == "naive"
    with pytest.raises(ValueError, match="flash"):
        resolve_implementation("flash", jnp.bfloat16, 128)
    if jax.default_backend() == "cpu":
        assert resolve_implementation("auto", jnp.bfloat16, 128) == "chunked"


def test_model_logits_agree_across_kernels():
    cfg = dataclasses.replace(ModelConfig(), num_kv_heads=2, attention_impl="xla")
    x = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 9)))
    segments = jnp.asarray([[0] * 4 + [1] * 5, [0] * 9])
    xla = Transformer(cfg, rngs=nnx.Rngs(0))
    naive = Transformer(dataclasses.replace(cfg, attention_impl="naive"), rngs=nnx.Rngs(0))
    np.testing.assert_allclose(naive(x, None, segments), xla(x, None, segments), atol=1e-5)


@pytest.mark.parametrize("is_causal, t, s", [(True, 11, 11), (False, 5, 11)])
def test_chunked_kernel_matches_the_reference_values_and_gradients(is_causal, t, s):
    from chameleon_jax.attention import chunked_attention, naive_attention

    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(2, t, 4, 8)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(2, s, 2, 8)), jnp.float32) for _ in range(2))  # GQA: 4 heads, 2 kv
    seg = np.array([[1] * 4 + [2] * (s - 4), [1] * s])
    mask = segment_mask(jnp.asarray(seg))[:, :, -t:]
    if not is_causal:
        mask = mask.at[1, :, 0].set(False)  # a query that may see nothing (left padding): uniform average

    def loss(fn, **kw):
        return lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v, mask, is_causal=is_causal, **kw)))

    want = jax.value_and_grad(loss(naive_attention), argnums=(0, 1, 2))(q, k, v)
    got = jax.value_and_grad(loss(chunked_attention, chunk=4), argnums=(0, 1, 2))(q, k, v)  # 4 does not divide t
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=2e-5)


def test_chunked_kernel_gives_finite_output_to_a_query_that_sees_nothing():
    from chameleon_jax.attention import chunked_attention

    q, k, v = (jnp.ones((1, 6, 2, 4), jnp.float32) for _ in range(3))
    mask = jnp.ones((1, 1, 6, 6), bool).at[0, 0, 4].set(False)
    out = chunked_attention(q, k, v, mask, is_causal=True, chunk=4)
    assert bool(jnp.all(jnp.isfinite(out)))

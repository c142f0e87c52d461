"""Splash attention (Pallas, interpret mode on the CPU) computes what the naive kernel computes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from chameleon_jax.kernels import dot_product_attention, naive_attention
from chameleon_jax.attention import segment_mask
from chameleon_jax.kernels.splash import block_size, padded_length


def test_splash_matches_naive_values_and_gradients_on_packed_gqa_rows():
    """Causal, three packed segments, 4 query heads on 2 kv heads, 200 tokens (not a multiple of the 128 block)."""
    b, t, n, k, h = 1, 200, 4, 2, 16
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (b, t, n, h))
    kk = jax.random.normal(keys[1], (b, t, k, h))
    v = jax.random.normal(keys[2], (b, t, k, h))
    cotangent = jax.random.normal(keys[3], (b, t, n, h))
    seg = jnp.asarray(np.repeat([1, 2, 3], [70, 80, 50])[None])

    def splash(q, kk, v):
        return dot_product_attention(q, kk, v, segment_mask(seg), is_causal=True, implementation="splash",
                                     segment_ids_bt=seg)

    def naive(q, kk, v):
        return naive_attention(q, kk, v, segment_mask(seg), is_causal=True)

    out, vjp = jax.vjp(jax.jit(splash), q, kk, v)
    ref, ref_vjp = jax.vjp(naive, q, kk, v)
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=0)
    for got, want, name in zip(vjp(cotangent), ref_vjp(cotangent), "qkv"):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0, err_msg=f"d{name}")
    # The segments really mask: the first token of segment 2 attends to itself alone.
    np.testing.assert_allclose(out[0, 70, :2], jnp.broadcast_to(v[0, 70, 0], (2, h)), atol=1e-5)


def test_splash_block_sizes_follow_the_padded_length():
    assert [padded_length(t) for t in (1, 128, 200, 4096)] == [128, 128, 256, 4096]
    assert [block_size(t) for t in (128, 256, 384, 1024, 32768)] == [128, 256, 128, 512, 512]
    with pytest.raises(ValueError, match="multiple of 128"):
        block_size(200)

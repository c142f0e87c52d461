"""layers.dense: the projection matmul with its own backward pass, against plain autodiff."""

from __future__ import annotations

import contextlib
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from chameleon_jax.layers import DENSE_NAME, dense


def _reference(x, w, out_dtype=None):
    spec_out = "nhijk"[: w.ndim - 1]
    return jnp.einsum(f"btd,d{spec_out}->bt{spec_out}", x, w, preferred_element_type=out_dtype)


# (input width, weight shape): x narrower than the output (x^T dy form) and wider
# (the transposed dy^T x form), and a [d, heads, head_dim] weight like q/k/v.
SHAPES = [(8, (8, 24)), (24, (24, 8)), (16, (16, 4, 6)), (12, (12, 12))]


@pytest.mark.parametrize("d,w_shape", SHAPES)
def test_dense_value_and_gradients_match_einsum_autodiff(d, w_shape):
    kx, kw, kg = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (2, 5, d), jnp.float32)
    w = jax.random.normal(kw, w_shape, jnp.float32)
    g = jax.random.normal(kg, (2, 5, *w_shape[1:]), jnp.float32)

    def loss(fn):
        return lambda x, w: jnp.sum(fn(x, w) * g)

    ours = jax.value_and_grad(loss(dense), argnums=(0, 1))(x, w)
    ref = jax.value_and_grad(loss(_reference), argnums=(0, 1))(x, w)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_dense_bfloat16_inputs_with_float32_output_keep_the_input_dtypes_in_the_gradients():
    kx, kw = jax.random.split(jax.random.key(1))
    x = jax.random.normal(kx, (2, 3, 16), jnp.float32).astype(jnp.bfloat16)
    w = jax.random.normal(kw, (16, 40), jnp.float32).astype(jnp.bfloat16)
    y = dense(x, w, jnp.float32)
    assert y.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y), np.asarray(_reference(x, w, jnp.float32)), rtol=1e-6)

    def loss(fn):
        return lambda x, w: jnp.sum(jnp.sin(fn(x, w, jnp.float32)))

    ours = jax.grad(loss(dense), argnums=(0, 1))(x, w)
    ref = jax.grad(loss(_reference), argnums=(0, 1))(x, w)
    for a, b in zip(ours, ref):
        assert a.dtype == jnp.bfloat16 and b.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=2e-2, atol=2e-2)


def _saved(f, *args) -> str:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        jax.ad_checkpoint.print_saved_residuals(f, *args)
    return buf.getvalue()


def test_dense_output_is_named_for_remat_policies():
    x = jnp.ones((1, 4, 8))
    w = jnp.ones((8, 8))

    def f(x, w):
        return jnp.sum(jnp.tanh(dense(jnp.tanh(x), w)))

    saved = _saved(jax.checkpoint(f, policy=jax.checkpoint_policies.save_only_these_names(DENSE_NAME)), x, w)
    nothing = _saved(jax.checkpoint(f, policy=jax.checkpoint_policies.nothing_saveable), x, w)
    assert DENSE_NAME in saved
    assert DENSE_NAME not in nothing

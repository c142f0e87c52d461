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


def _inputs(seed, d, w_shape):
    """x [2, 5, d], w of w_shape and an output cotangent g, all float32 normals."""
    kx, kw, kg = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(kx, (2, 5, d), jnp.float32), jax.random.normal(kw, w_shape, jnp.float32),
            jax.random.normal(kg, (2, 5, *w_shape[1:]), jnp.float32))


@pytest.mark.parametrize("d,w_shape", SHAPES)
def test_dense_value_and_gradients_match_einsum_autodiff(d, w_shape):
    x, w, g = _inputs(0, d, w_shape)

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


@pytest.mark.parametrize("d,w_shape", SHAPES)
def test_dense_bfloat16_operands_round_the_products_and_keep_float32_values_and_gradients(d, w_shape):
    x, w, g = _inputs(2, d, w_shape)
    bf = jnp.bfloat16

    def ours(x, w):
        return jnp.sum(dense(x, w, operand_dtype=bf) * g)

    def ref(x, w):  # the same products with the rounding written out: y = x~ w~, dx = dy~ w~^T, dw = x~^T dy~
        y = _reference(x.astype(bf), w.astype(bf), jnp.float32)
        return jnp.sum(y * g)

    (v1, (dx1, dw1)) = jax.value_and_grad(ours, argnums=(0, 1))(x, w)
    v2 = ref(x, w)
    g_bf = g.astype(bf).astype(jnp.float32)  # the backward pass rounds dy too
    dx2 = jnp.einsum("bt...,d...->btd", g_bf, w.astype(bf).astype(jnp.float32))
    dw2 = jnp.einsum("btd,bt...->d...", x.astype(bf).astype(jnp.float32), g_bf)
    assert dx1.dtype == jnp.float32 and dw1.dtype == jnp.float32
    np.testing.assert_allclose(float(v1), float(v2), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(dx1), np.asarray(dx2), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(dw1), np.asarray(dw2), rtol=1e-5, atol=1e-5)
    # and the rounding is real: float32 operands give another value
    assert abs(float(v1) - float(jnp.sum(_reference(x, w) * g))) > 1e-4


def test_dense_bfloat16_operands_lower_to_bfloat16_dots_with_float32_results():
    x = jnp.ones((2, 4, 8), jnp.float32)
    w = jnp.ones((8, 16), jnp.float32)
    loss = lambda x, w: jnp.sum(jnp.sin(dense(x, w, operand_dtype=jnp.bfloat16)))  # noqa: E731
    hlo = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(x, w).as_text()
    dots = [line for line in hlo.splitlines() if "dot_general" in line]
    assert len(dots) == 3  # the product and its two gradients
    for line in dots:
        operands, result = line.rsplit(" : ", 1)[1].split(" -> ")
        assert operands.count("xbf16>") == 2 and result.endswith("xf32>"), line


@pytest.mark.parametrize("d,w_shape", SHAPES)
def test_dense_bfloat16_operands_run_jitted_inside_a_larger_program(d, w_shape):
    """Compiled with element-wise work around it, as in a model: XLA may then rewrite the
    weight gradient's product, and a CPU has no kernel for every bf16 x bf16 -> f32 form."""
    x, w, g = _inputs(3, d, w_shape)
    bf = jnp.bfloat16

    def loss(x, w):
        return jnp.sum(jnp.sin(dense(jnp.tanh(x), w, operand_dtype=bf)) * g)

    def ref(x, w):
        return jnp.sum(jnp.sin(_reference(jnp.tanh(x).astype(bf), w.astype(bf), jnp.float32)) * g)

    dx1, dw1 = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, w)
    dx2, dw2 = jax.grad(ref, argnums=(0, 1))(x, w)
    # the reference keeps dy in float32, so the gradients agree to dy's bf16 rounding
    np.testing.assert_allclose(np.asarray(dx1), np.asarray(dx2), rtol=2e-2, atol=2e-2)
    np.testing.assert_allclose(np.asarray(dw1), np.asarray(dw2), rtol=2e-2, atol=2e-2)

"""Quantizers: codes and vectors agree, EMA updates and dead-code restarts, FSQ's code grid."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vqvae import VQ_PRESETS
from vqvae.model import create_model
from vqvae.quantizers import FSQ, L2EMAQuantizer, VectorQuantizer


def _tiny(**kw):
    return dataclasses.replace(VQ_PRESETS["tiny"](), **kw)


def _images(n, size, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


@pytest.mark.slow
def test_decode_equals_the_forward_reconstruction():
    """Codes carry everything: decode(encode(x)) is what the training forward pass reconstructs."""

    @nnx.jit
    def forward_and_codes(model, x):
        recon, q = model(x)
        return recon, q.codes, model.encode(x), model.decode(q.codes)

    x = jnp.asarray(_images(2, 16)) / 127.5 - 1
    small = dict(channel_mult=(1, 2), mid_attention=False)  # the quantizer is under test, not the depth
    for cfg in (_tiny(quantizer="l2_ema", **small), _tiny(quantizer="fsq", fsq_levels=(4, 4, 4), codebook_size=64, **small)):
        recon, codes, encoded, decoded = forward_and_codes(create_model(cfg, 1), x)
        np.testing.assert_array_equal(encoded, codes)
        np.testing.assert_allclose(decoded, recon, atol=1e-4)


def test_fsq_codes_and_vectors_are_a_bijection():
    fsq = FSQ((8, 5, 5, 5))
    assert fsq.codebook_size == 1000
    codes = jnp.arange(1000)
    vectors = fsq.lookup(codes)
    assert len(np.unique(np.asarray(vectors), axis=0)) == 1000
    assert float(jnp.abs(vectors).max()) <= 1.0
    # Any latent: its quantized vector is exactly the lookup of its code, and codes cover [0, K).
    z = jax.random.normal(jax.random.key(0), (4, 8, 8, 4)) * 3
    q = fsq(z)
    np.testing.assert_allclose(fsq.lookup(q.codes), q.z_q, atol=1e-6)
    assert int(q.codes.min()) >= 0 and int(q.codes.max()) < 1000
    # Straight-through: the gradient reaches the latents.
    g = jax.grad(lambda z: jnp.sum(fsq(z).z_q))(z)
    assert float(jnp.abs(g).sum()) > 0


def test_l2_ema_codes_round_trip_and_codebook_stays_unit_norm():
    q = L2EMAQuantizer(64, 8, decay=0.9, dead_code_threshold=0.5, rngs=nnx.Rngs(0))
    codes = jnp.arange(64).reshape(1, 8, 8)
    out = q(q.lookup(codes))
    np.testing.assert_array_equal(out.codes, codes)
    # Training updates move the codebook (EMA) and restart codes no vector chose.
    z = jax.random.normal(jax.random.key(1), (4, 4, 4, 8)) + 3.0  # all near one direction: few codes win
    before = np.asarray(q.codebook[...])
    for i in range(30):
        out = q(z, train=True, key=jax.random.key(i))
    after = np.asarray(q.codebook[...])
    assert not np.allclose(before, after)
    np.testing.assert_allclose(np.linalg.norm(after, axis=1), 1.0, atol=1e-5)
    z_n = np.asarray(z).reshape(-1, 8) / np.linalg.norm(np.asarray(z).reshape(-1, 8), axis=1, keepdims=True)
    restarted = np.isclose(after[:, None, :], z_n[None], atol=1e-5).all(-1).any(-1)
    assert restarted.sum() > 0  # dead codes now sit on batch vectors
    with pytest.raises(ValueError, match="PRNG key"):
        q(z, train=True)


def test_plain_vq_matches_brute_force_nearest_code():
    q = VectorQuantizer(32, 4, rngs=nnx.Rngs(0))
    z = jax.random.normal(jax.random.key(2), (2, 3, 3, 4)) * 0.05
    out = q(z)
    e = np.asarray(q.codebook[...])
    d = ((np.asarray(z).reshape(-1, 1, 4) - e[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(np.asarray(out.codes).reshape(-1), d.argmin(1))
    np.testing.assert_allclose(out.codebook_loss, out.commit_loss, rtol=1e-6)

"""The tokenizer interface, the quantizers, the directory format and the image metrics."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from chameleon_jax.configlib import ConfigError
from vqvae import VQ_PRESETS, Tokenizer, VQModel, load_tokenizer
from vqvae.config import validate
from vqvae.image_metrics import mse, psnr_from_mse, ssim
from vqvae.quantizers import FSQ, L2EMAQuantizer, VectorQuantizer


def _tiny(**kw):
    return dataclasses.replace(VQ_PRESETS["tiny"](), **kw)


def _images(n, size, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(VQModel(_tiny(), rngs=nnx.Rngs(0)))


def test_encode_decode_shapes_and_dtypes(tok):
    assert tok.image_size == 16 and tok.grid == (4, 4) and tok.codes_per_image == 16 and tok.codebook_size == 64
    codes = tok.encode(_images(3, 16))
    assert codes.shape == (3, 4, 4) and codes.dtype == jnp.int32
    assert int(codes.min()) >= 0 and int(codes.max()) < 64
    images = tok.decode(codes)
    assert images.shape == (3, 16, 16, 3) and images.dtype == jnp.uint8
    # Flat code rows (as a language model emits them) decode the same.
    np.testing.assert_array_equal(tok.decode(np.asarray(codes).reshape(3, 16)), images)


def test_chunked_batches_match_one_batch(tok):
    x = _images(5, 16, seed=1)
    codes = tok.encode(x)
    np.testing.assert_array_equal(tok.encode(x, batch_size=2), codes)
    np.testing.assert_array_equal(tok.decode(codes, batch_size=2), tok.decode(codes))


@pytest.mark.parametrize(
    "bad, message",
    [
        (np.zeros((2, 16, 16, 3), np.float32), "uint8.*got dtype float32"),
        (np.zeros((2, 16, 16, 4), np.uint8), "3 channels.*got 4"),
        (np.zeros((2, 8, 16, 3), np.uint8), "16x16 pixels, got 8x16"),
        (np.zeros((16, 16, 3), np.uint8), r"got shape \(16, 16, 3\)"),
    ],
)
def test_bad_images_are_clear_errors(tok, bad, message):
    with pytest.raises(ValueError, match=message):
        tok.encode(bad)


@pytest.mark.parametrize(
    "bad, message",
    [
        (np.zeros((2, 4, 4), np.float32), "integer codes.*got dtype float32"),
        (np.zeros((2, 3, 4), np.int32), r"got shape \(2, 3, 4\)"),
        (np.full((2, 4, 4), 64, np.int32), r"got values in \[64, 64\]"),
    ],
)
def test_bad_codes_are_clear_errors(tok, bad, message):
    with pytest.raises(ValueError, match=message):
        tok.decode(bad)


def test_decode_equals_the_forward_reconstruction():
    """Codes carry everything: decode(encode(x)) is what the training forward pass reconstructs."""
    for cfg in (_tiny(), _tiny(quantizer="l2_ema"), _tiny(quantizer="fsq", fsq_levels=(4, 4, 4), codebook_size=64)):
        model = VQModel(cfg, rngs=nnx.Rngs(1))
        x = jnp.asarray(_images(2, 16)) / 127.5 - 1
        recon, q = model(x)
        np.testing.assert_array_equal(model.encode(x), q.codes)
        np.testing.assert_allclose(model.decode(q.codes), recon, atol=1e-4)


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


def test_tokenizer_directory_round_trip(tmp_path):
    for cfg in (_tiny(), _tiny(quantizer="l2_ema")):
        tok = Tokenizer(VQModel(cfg, rngs=nnx.Rngs(3)))
        x = _images(2, 16, seed=4)
        out = tok.save(tmp_path / cfg.quantizer, source="test")
        assert {p.name for p in out.iterdir()} == {"config.json", "params", "tokenizer.json"}
        loaded = load_tokenizer(out)
        assert loaded.config == cfg and loaded.meta["source"] == "test"
        np.testing.assert_array_equal(loaded.encode(x), tok.encode(x))
        np.testing.assert_array_equal(loaded.decode(tok.encode(x)), tok.decode(tok.encode(x)))
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        load_tokenizer(tmp_path / "nothing")


def test_encoder_only_tokenizer_refuses_to_decode():
    tok = Tokenizer(VQModel(_tiny(decoder=False), rngs=nnx.Rngs(0)))
    codes = tok.encode(_images(1, 16))
    with pytest.raises(ValueError, match="no decoder"):
        tok.decode(codes)


def test_config_validation_names_the_problem():
    with pytest.raises(ConfigError, match="not divisible by the downsample factor 4"):
        validate(_tiny(image_size=18))
    with pytest.raises(ConfigError, match="norm_groups 32 does not divide"):
        validate(_tiny(norm_groups=32))
    with pytest.raises(ConfigError, match="product of fsq_levels"):
        validate(_tiny(quantizer="fsq", fsq_levels=(8, 5, 5, 5), codebook_size=64))
    released = VQ_PRESETS["chameleon"]()
    assert released.grid == (32, 32) and released.codes_per_image == 1024 and released.codebook_size == 8192


def test_psnr_and_ssim():
    a = _images(2, 32, seed=5)
    assert np.isinf(psnr_from_mse(mse(a, a))).all()
    np.testing.assert_allclose(ssim(a, a), 1.0, atol=1e-5)
    noisy = np.clip(a.astype(int) + np.random.default_rng(6).integers(-20, 21, a.shape), 0, 255).astype(np.uint8)
    m = np.asarray(mse(a, noisy))
    np.testing.assert_allclose(psnr_from_mse(m), 10 * np.log10(255**2 / m), rtol=1e-6)
    # Brute force: the Gaussian-weighted statistics of every valid 11x11 window.
    x, y = a[:1].astype(np.float64), noisy[:1].astype(np.float64)
    g = np.exp(-((np.arange(11) - 5) ** 2) / (2 * 1.5**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    vals = []
    for i in range(32 - 10):
        for j in range(32 - 10):
            for c in range(3):
                px, py = x[0, i : i + 11, j : j + 11, c], y[0, i : i + 11, j : j + 11, c]
                mx, my = (w * px).sum(), (w * py).sum()
                vx, vy = (w * px * px).sum() - mx * mx, (w * py * py).sum() - my * my
                cxy = (w * px * py).sum() - mx * my
                vals.append((2 * mx * my + c1) * (2 * cxy + c2) / ((mx * mx + my * my + c1) * (vx + vy + c2)))
    np.testing.assert_allclose(float(ssim(a[:1], noisy[:1])[0]), np.mean(vals), rtol=1e-4)

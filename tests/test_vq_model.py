"""The tokenizer interface: shapes, dtypes, input errors, the directory format, config checks."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from chameleon_jax.configlib import ConfigError
from vqvae import VQ_PRESETS, Tokenizer, load_tokenizer
from vqvae.config import validate
from vqvae.model import create_model


def _tiny(**kw):
    return dataclasses.replace(VQ_PRESETS["tiny"](), **kw)


def _images(n, size, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(create_model(_tiny(), 0))


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


def test_tokenizer_directory_round_trip(tmp_path):
    for cfg in (_tiny(), _tiny(quantizer="l2_ema")):
        tok = Tokenizer(create_model(cfg, 3))
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
    tok = Tokenizer(create_model(_tiny(decoder=False), 0))
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


def test_patch_encoder_codes_depend_on_their_own_patch_only():
    model = create_model(_tiny(encoder="patch"), 0)
    x = np.asarray(_images(1, 16, seed=3), np.float32) / 127.5 - 1.0
    y = x.copy()
    y[:, :4, :4] = -x[:, :4, :4]  # change only the top-left 4x4 patch (factor 4)
    lx, ly = np.asarray(model.latents(x)), np.asarray(model.latents(y))
    assert not np.allclose(lx[:, 0, 0], ly[:, 0, 0])
    np.testing.assert_array_equal(lx[:, 1:], ly[:, 1:])
    np.testing.assert_array_equal(lx[:, 0, 1:], ly[:, 0, 1:])
    # The conv encoder, by contrast, lets one patch move codes far from it.
    conv = create_model(_tiny(), 0)
    assert not np.allclose(np.asarray(conv.latents(x))[:, 3, 3], np.asarray(conv.latents(y))[:, 3, 3])

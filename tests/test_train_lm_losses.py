import jax
import jax.numpy as jnp
import numpy as np

from chameleon_jax.losses import lm_loss_sums, means_from_sums


def test_weighted_cross_entropy_z_loss_and_modalities():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 7)).astype(np.float32)
    targets = rng.integers(0, 7, (2, 5))
    weights = np.array([[1, 1, 0.5, 0, 0], [1, 0, 1, 1, 2]], np.float32)
    modality = np.array([[0, 1, 1, 0, 0], [0, 0, 1, 1, 1]], np.int8)
    z = 1e-2
    sums = lm_loss_sums(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights), jnp.asarray(modality), z)
    m = means_from_sums(sums)

    log_z = np.log(np.exp(logits.astype(np.float64)).sum(-1))
    ce = log_z - np.take_along_axis(logits, targets[..., None], -1)[..., 0]
    per_token = ce + z * log_z**2
    np.testing.assert_allclose(m["loss"], (weights * per_token).sum() / weights.sum(), rtol=1e-5)
    np.testing.assert_allclose(m["ce"], (weights * ce).sum() / weights.sum(), rtol=1e-5)
    text, image = weights * (modality == 0), weights * (modality == 1)
    np.testing.assert_allclose(m["text_loss"], (text * ce).sum() / text.sum(), rtol=1e-5)
    np.testing.assert_allclose(m["image_loss"], (image * ce).sum() / image.sum(), rtol=1e-5)
    top = (np.argmax(logits, -1) == targets).astype(np.float32)
    np.testing.assert_allclose(m["accuracy"], (weights * top).sum() / weights.sum(), rtol=1e-6)


def test_modality_without_weight_reports_nan_not_zero():
    sums = lm_loss_sums(jnp.zeros((1, 3, 4)), jnp.zeros((1, 3), jnp.int32), jnp.ones((1, 3)),
                        jnp.zeros((1, 3), jnp.int8), 0.0)
    m = jax.device_get(means_from_sums(sums))
    assert np.isnan(m["image_loss"]) and np.isclose(m["text_loss"], np.log(4))

"""Reconstruction quality without downloaded weights: PSNR and SSIM on uint8 images.

Both take uint8 (or float on the 0..255 scale) [B, H, W, 3] and return one value
per image, so callers can average or keep per-image figures.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def mse(a, b) -> jax.Array:
    """Per-image mean squared error on the 0..255 scale: [B]."""
    d = jnp.asarray(a, jnp.float32) - jnp.asarray(b, jnp.float32)
    return jnp.mean(d * d, axis=(1, 2, 3))


def psnr_from_mse(m, peak: float = 255.0):
    """PSNR in dB; infinite for a perfect match."""
    m = np.asarray(m, np.float64)
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(peak * peak / m)


def _gaussian_window(size: int, sigma: float) -> np.ndarray:
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    g = np.exp(-(x * x) / (2 * sigma * sigma))
    return (g / g.sum()).astype(np.float32)


def _filter_valid(x_bhwc, g):
    """Separable 'valid' filtering of every channel with the 1-D window g (applied along H then W)."""
    k = len(g)
    c = x_bhwc.shape[-1]
    kernel_h = jnp.asarray(np.tile(g.reshape(k, 1, 1, 1), (1, 1, 1, c)))  # HWIO, depthwise
    kernel_w = jnp.asarray(np.tile(g.reshape(1, k, 1, 1), (1, 1, 1, c)))
    dn = ("NHWC", "HWIO", "NHWC")
    y = jax.lax.conv_general_dilated(x_bhwc, kernel_h, (1, 1), "VALID", dimension_numbers=dn, feature_group_count=c)
    return jax.lax.conv_general_dilated(y, kernel_w, (1, 1), "VALID", dimension_numbers=dn, feature_group_count=c)


@functools.partial(jax.jit, static_argnames=("window", "sigma"))
def ssim(a, b, window: int = 11, sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03, peak: float = 255.0):
    """Per-image SSIM [B] (Wang et al. 2004): an 11x11 Gaussian window (sigma 1.5), valid positions
    only, computed per channel and averaged over positions and channels."""
    a = jnp.asarray(a, jnp.float32)
    b = jnp.asarray(b, jnp.float32)
    g = _gaussian_window(window, sigma)
    c1, c2 = (k1 * peak) ** 2, (k2 * peak) ** 2
    mu_a, mu_b = _filter_valid(a, g), _filter_valid(b, g)
    var_a = _filter_valid(a * a, g) - mu_a**2
    var_b = _filter_valid(b * b, g) - mu_b**2
    cov = _filter_valid(a * b, g) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return jnp.mean(s, axis=(1, 2, 3))

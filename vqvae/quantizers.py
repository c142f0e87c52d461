"""Quantizers: latents [B, h, w, D] -> (quantized latents, int32 codes [B, h, w], losses).

- `VectorQuantizer`: Chameleon's (taming's) plain nearest-code lookup with a
  straight-through gradient, a learned codebook and the codebook + commitment loss.
- `L2EMAQuantizer`: codes and latents on the unit sphere at a low width
  (LlamaGen-style, e.g. 8), the codebook updated by exponential moving averages
  of the vectors assigned to each code, and codes nobody uses restarted from
  vectors of the current batch.
- `FSQ`: finite scalar quantization; each dimension is bounded and rounded to
  one of L levels; the code is the mixed-radix number of the rounded digits.

All three share `__call__(z, *, train, key)`, `lookup(codes)` and `codebook_size`.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vqvae.config import VQConfig


class EMAState(nnx.Variable):
    """State updated by moving averages inside the train step, never by the optimizer."""


@dataclasses.dataclass
class Quantized:
    """What a quantizer returns. `z_q` carries the straight-through gradient to the encoder."""

    z_q: jax.Array  # [B, h, w, D] float
    codes: jax.Array  # [B, h, w] int32
    codebook_loss: jax.Array  # scalar: moves codes toward latents (0 where the codebook is not learned)
    commit_loss: jax.Array  # scalar: moves latents toward their codes (unweighted; the trainer applies beta)
    z: jax.Array  # [B, h, w, D] the continuous latent the quantizer rounded (after its normalisation / bounding)


jax.tree_util.register_dataclass(
    Quantized, data_fields=["z_q", "codes", "codebook_loss", "commit_loss", "z"], meta_fields=[]
)


def _straight_through(z, z_q):
    return z + jax.lax.stop_gradient(z_q - z)


def _l2_normalize(x, eps: float = 1e-6):
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


class VectorQuantizer(nnx.Module):
    """Nearest code by squared distance (taming's formula: |z|^2 + |e|^2 - 2 z.e, first minimum wins)."""

    def __init__(self, codebook_size: int, dim: int, rngs: nnx.Rngs):
        self.codebook_size = codebook_size
        bound = 1.0 / codebook_size
        self.codebook = nnx.Param(
            jax.random.uniform(rngs.params(), (codebook_size, dim), jnp.float32, -bound, bound)
        )

    def nearest(self, z_nd):
        e_kd = self.codebook[...]
        d_nk = (
            jnp.sum(z_nd**2, axis=1, keepdims=True)
            + jnp.sum(e_kd**2, axis=1)[None, :]
            - 2 * jnp.einsum("nd,kd->nk", z_nd, e_kd, precision=jax.lax.Precision.HIGHEST)
        )
        return jnp.argmin(d_nk, axis=1).astype(jnp.int32)

    def lookup(self, codes):
        return jnp.take(self.codebook[...], codes, axis=0)

    def __call__(self, z_bhwd, *, train: bool = False, key=None) -> Quantized:
        b, h, w, d = z_bhwd.shape
        codes = self.nearest(z_bhwd.reshape(-1, d)).reshape(b, h, w)
        z_q = self.lookup(codes)
        codebook_loss = jnp.mean((z_q - jax.lax.stop_gradient(z_bhwd)) ** 2)
        commit_loss = jnp.mean((jax.lax.stop_gradient(z_q) - z_bhwd) ** 2)
        return Quantized(_straight_through(z_bhwd, z_q), codes, codebook_loss, commit_loss, z_bhwd)


class L2EMAQuantizer(nnx.Module):
    """Unit-norm codes at a low width; EMA codebook; dead codes restarted from batch vectors.

    A code is dead when the moving average of how many vectors it receives per
    batch falls below `dead_code_threshold`; it is then moved onto a latent of
    the current batch and given a count of twice the threshold, so it has about
    ln(2) / (1 - decay) steps to win vectors before it is moved again. The
    latent is drawn with probability proportional to its quantization error:
    restarts go where the codebook serves the data worst, not to the most
    common content (on flat pictures most latents are background).
    """

    def __init__(self, codebook_size: int, dim: int, decay: float, dead_code_threshold: float, rngs: nnx.Rngs):
        self.codebook_size = codebook_size
        self.decay = decay
        self.threshold = dead_code_threshold
        init = _l2_normalize(jax.random.normal(rngs.params(), (codebook_size, dim), jnp.float32))
        self.codebook = EMAState(init)
        self.ema_sum = EMAState(init)
        self.ema_count = EMAState(jnp.ones((codebook_size,), jnp.float32))

    def nearest(self, z_nd):
        sim_nk = jnp.einsum("nd,kd->nk", z_nd, self.codebook[...], precision=jax.lax.Precision.HIGHEST)
        return jnp.argmax(sim_nk, axis=1).astype(jnp.int32)

    def lookup(self, codes):
        return jnp.take(self.codebook[...], codes, axis=0)

    def __call__(self, z_bhwd, *, train: bool = False, key=None) -> Quantized:
        b, h, w, d = z_bhwd.shape
        z_bhwd = _l2_normalize(z_bhwd)
        z_nd = z_bhwd.reshape(-1, d)
        codes_n = self.nearest(jax.lax.stop_gradient(z_nd))
        z_q = self.lookup(codes_n).reshape(z_bhwd.shape)
        codebook_loss = jnp.mean((z_q - jax.lax.stop_gradient(z_bhwd)) ** 2)  # reported only: no gradient reaches it
        commit_loss = jnp.mean((jax.lax.stop_gradient(z_q) - z_bhwd) ** 2)
        if train:
            if key is None:
                raise ValueError("L2EMAQuantizer needs a PRNG key in training (dead-code restarts)")
            err_n = jnp.sum((jax.lax.stop_gradient(z_q - z_bhwd)).reshape(-1, d) ** 2, axis=1)
            self._ema_update(jax.lax.stop_gradient(z_nd), codes_n, err_n, key)
        return Quantized(
            _straight_through(z_bhwd, z_q), codes_n.reshape(b, h, w), codebook_loss, commit_loss, z_bhwd
        )

    def _ema_update(self, z_nd, codes_n, err_n, key):
        k = self.codebook_size
        count_k = jnp.zeros((k,), jnp.float32).at[codes_n].add(1.0)
        sum_kd = jnp.zeros((k, z_nd.shape[1]), jnp.float32).at[codes_n].add(z_nd)
        ema_count = self.decay * self.ema_count[...] + (1 - self.decay) * count_k
        ema_sum = self.decay * self.ema_sum[...] + (1 - self.decay) * sum_kd
        codebook = _l2_normalize(ema_sum)
        dead_k = ema_count < self.threshold
        # Where every latent sits on its code (err 0 everywhere) this falls back to uniform draws.
        logits_n = jnp.log(err_n + 1e-12 + 1e-6 * jnp.max(err_n))
        fresh_kd = z_nd[jax.random.categorical(key, logits_n, shape=(k,))]
        self.codebook[...] = jnp.where(dead_k[:, None], fresh_kd, codebook)
        self.ema_sum[...] = jnp.where(dead_k[:, None], fresh_kd * (2 * self.threshold), ema_sum)
        self.ema_count[...] = jnp.where(dead_k, 2 * self.threshold, ema_count)


def fsq_basis(levels) -> np.ndarray:
    """int32 [len(levels)]: each FSQ digit's place value (code = d0 + L0 d1 + L0 L1 d2 ...)."""
    return np.cumprod((1,) + tuple(levels)[:-1]).astype(np.int32)


def fsq_digits(codes, levels):
    """[..., len(levels)]: each FSQ code's digits, least significant first; numpy or jax arrays."""
    return (codes[..., None] // fsq_basis(levels)) % np.asarray(levels, np.int32)


class FSQ(nnx.Module):
    """Finite scalar quantization (levels e.g. (8, 5, 5, 5) = 1000 codes); no parameters, no codebook loss."""

    def __init__(self, levels: tuple[int, ...]):
        self.levels = tuple(int(l) for l in levels)
        self.codebook_size = math.prod(self.levels)

    @property
    def _levels(self):
        return np.asarray(self.levels, np.int32)

    @property
    def _basis(self):
        return fsq_basis(self.levels)

    @property
    def _half_width(self):
        return self._levels // 2

    def _bound(self, z):
        # Maps each dimension into an interval whose rounding yields exactly L integers
        # centred on zero ({-L/2 .. L/2 - 1} for even L).
        levels = jnp.asarray(self._levels, jnp.float32)
        half = (levels - 1) * (1 - 1e-3) / 2
        offset = jnp.where(self._levels % 2 == 0, 0.5, 0.0)
        shift = jnp.arctanh(offset / half)
        return jnp.tanh(z + shift) * half - offset

    def lookup(self, codes):
        digits = fsq_digits(codes, self.levels)
        return (digits - self._half_width).astype(jnp.float32) / self._half_width

    def __call__(self, z_bhwd, *, train: bool = False, key=None) -> Quantized:
        bounded = self._bound(z_bhwd)
        rounded = _straight_through(bounded, jnp.round(bounded))
        digits = jax.lax.stop_gradient(rounded).astype(jnp.int32) + self._half_width
        codes = jnp.sum(digits * self._basis, axis=-1).astype(jnp.int32)
        zero = jnp.zeros((), jnp.float32)
        return Quantized(rounded / self._half_width, codes, zero, zero, bounded / self._half_width)


def make_quantizer(cfg: VQConfig, rngs: nnx.Rngs):
    if cfg.quantizer == "vq":
        return VectorQuantizer(cfg.codebook_size, cfg.embed_dim, rngs)
    if cfg.quantizer == "l2_ema":
        return L2EMAQuantizer(cfg.codebook_size, cfg.embed_dim, cfg.ema_decay, cfg.dead_code_threshold, rngs)
    if cfg.quantizer == "fsq":
        return FSQ(cfg.fsq_levels)
    raise ValueError(f"unknown quantizer {cfg.quantizer!r}; expected vq, l2_ema or fsq")

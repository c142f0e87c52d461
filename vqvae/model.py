"""The VQ model: encoder -> quant_conv -> quantizer -> post_quant_conv -> decoder.

Pixels are float in [-1, 1] (uint8 / 127.5 - 1, as Chameleon feeds its VQGAN),
channels last. The quantizer's width is `cfg.code_dim`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from vqvae import layers
from vqvae.config import VQConfig, validate
from vqvae.quantizers import Quantized, make_quantizer


class VQModel(nnx.Module):
    def __init__(self, cfg: VQConfig, *, rngs: nnx.Rngs):
        validate(cfg)
        self.cfg = cfg
        self.encoder = layers.PatchEncoder(cfg, rngs) if cfg.encoder == "patch" else layers.Encoder(cfg, rngs)
        self.quant_conv = layers.conv(cfg.z_channels, cfg.code_dim, 1, rngs)
        self.quantize = make_quantizer(cfg, rngs)
        if cfg.decoder:
            self.post_quant_conv = layers.conv(cfg.code_dim, cfg.z_channels, 1, rngs)
            self.decoder = layers.Decoder(cfg, rngs)
        else:
            self.post_quant_conv = None
            self.decoder = None

    def latents(self, x_bhwc) -> jax.Array:
        """Pixels [B, S, S, 3] in [-1, 1] -> pre-quantization latents [B, h, w, code_dim]."""
        return self.quant_conv(self.encoder(x_bhwc))

    def encode(self, x_bhwc) -> jax.Array:
        """Pixels [B, S, S, 3] in [-1, 1] -> int32 codes [B, h, w] (row-major grid)."""
        return self.quantize(self.latents(x_bhwc), train=False).codes

    def decode_latents(self, z_q_bhwd) -> jax.Array:
        if self.decoder is None:
            raise ValueError(
                "this tokenizer has no decoder (it was imported encoder-only, e.g. from Hugging Face's "
                "ChameleonVQVAE); it can encode images but not decode codes"
            )
        return self.decoder(self.post_quant_conv(z_q_bhwd))

    def decode(self, codes_bhw) -> jax.Array:
        """int codes [B, h, w] -> pixels [B, S, S, 3], unclamped float (≈[-1, 1])."""
        return self.decode_latents(self.quantize.lookup(codes_bhw))

    def __call__(self, x_bhwc, *, train: bool = False, key=None, quantize_mix=1.0) -> tuple[jax.Array, Quantized]:
        """Reconstruction (unclamped) and the quantizer's output; `train` updates EMA codebooks.

        quantize_mix < 1 decodes `z + mix * (z_q - z)`: 0 bypasses quantization (the training
        warmup lets the encoder learn informative latents before codes are imposed).
        """
        q = self.quantize(self.latents(x_bhwc), train=train, key=key)
        z_in = q.z_q if isinstance(quantize_mix, float) and quantize_mix == 1.0 else q.z + quantize_mix * (q.z_q - q.z)
        return self.decode_latents(z_in), q


def pixels_from_uint8(images_bhwc) -> jax.Array:
    return images_bhwc.astype(jnp.float32) / 127.5 - 1.0


def uint8_from_pixels(x_bhwc) -> jax.Array:
    """Clamps to [-1, 1] and rounds to the nearest uint8 level."""
    return jnp.round((jnp.clip(x_bhwc, -1.0, 1.0) + 1.0) * 127.5).astype(jnp.uint8)


@functools.lru_cache(maxsize=16)
def _init_program(cfg: VQConfig):
    def init(seed):
        # RngBitGenerator keys: one compiled program, several times faster to build than threefry's.
        return nnx.state(VQModel(cfg, rngs=nnx.Rngs(jax.random.key(seed, impl="rbg"))))

    return jax.jit(init)


def create_model(cfg: VQConfig, seed: int = 0) -> VQModel:
    """A freshly initialised model from one compiled init program (cached per config).

    `VQModel(cfg, rngs=...)` run eagerly compiles every initializer separately; this is
    the quicker way to get many models of one shape (tests, sweeps).
    """
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: VQModel(cfg, rngs=nnx.Rngs(0))))
    return nnx.merge(graphdef, _init_program(cfg)(seed))

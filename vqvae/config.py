"""The image tokenizer's configuration, with presets from `tiny` (tests) to the released Chameleon shape."""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

from vqvae.configlib import ConfigError, param


@dataclasses.dataclass(frozen=True)
class VQConfig:
    """A taming/Chameleon VQGAN: encoder -> quant_conv -> quantizer -> post_quant_conv -> decoder.

    The defaults are the released Chameleon tokenizer (512 px, 32x32 = 1024 codes of 8192).
    """

    image_size: int = param(512, "side of the square RGB input in pixels")
    base_channels: int = param(128, "channels of the first level (taming `ch`)")
    channel_mult: tuple[int, ...] = param((1, 1, 2, 2, 4), "channel multiplier per level; len-1 downsamplings by 2")
    num_res_blocks: int = param(2, "res blocks per encoder level (the decoder has one more)")
    attn_resolutions: tuple[int, ...] = param((), "feature-map sides at which levels add an attention block after each res block")
    encoder: Literal["vqgan", "patch"] = param(
        "vqgan",
        "vqgan: the taming/Chameleon conv encoder (each code sees the whole picture through GroupNorm, mid "
        "attention and wide receptive fields); patch: each code is computed from its own patch alone "
        "(stride-f patch projection + per-position MLPs), so equal patches always get equal codes",
    )
    mid_attention: bool = param(True, "single-head attention in the middle blocks (taming 'vanilla')")
    norm_groups: int = param(32, "GroupNorm groups (every channel count must be divisible by it)")
    norm_eps: float = param(1e-6, "GroupNorm epsilon")
    z_channels: int = param(256, "encoder output / decoder input channels")
    embed_dim: int = param(256, "code vector width (the quantizer works at this width; FSQ: len(fsq_levels))")
    quantizer: Literal["vq", "l2_ema", "fsq"] = param(
        "vq",
        "vq: plain nearest-code quantizer with codebook + commitment loss (Chameleon); "
        "l2_ema: l2-normalised codes with EMA updates and dead-code restart; fsq: finite scalar quantization",
    )
    codebook_size: int = param(8192, "number of codes (fsq: must equal the product of fsq_levels)")
    fsq_levels: tuple[int, ...] = param((8, 5, 5, 5), "FSQ levels per dimension (8,5,5,5 = 1000 codes)")
    beta: float = param(0.25, "commitment loss weight")
    ema_decay: float = param(0.99, "l2_ema: decay of the codebook's moving averages")
    dead_code_threshold: float = param(
        0.5, "l2_ema: a code whose moving-average count per batch falls below this is restarted from a batch vector"
    )
    decoder: bool = param(True, "build the decoder (false for encoder-only imports such as Hugging Face's)")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    @property
    def grid(self) -> tuple[int, int]:
        side = self.image_size // self.downsample_factor
        return (side, side)

    @property
    def codes_per_image(self) -> int:
        h, w = self.grid
        return h * w

    @property
    def code_dim(self) -> int:
        """Width of a quantized vector (FSQ: one dimension per level)."""
        return len(self.fsq_levels) if self.quantizer == "fsq" else self.embed_dim


def validate(cfg: VQConfig) -> VQConfig:
    """Raises ConfigError for a shape that cannot be built; returns `cfg`."""
    if cfg.image_size % cfg.downsample_factor:
        raise ConfigError(
            f"image_size {cfg.image_size} is not divisible by the downsample factor {cfg.downsample_factor} "
            f"of channel_mult {cfg.channel_mult}"
        )
    channels = {cfg.base_channels * m for m in cfg.channel_mult} | {cfg.base_channels}
    bad = sorted(c for c in channels if c % cfg.norm_groups)
    if bad:
        raise ConfigError(f"norm_groups {cfg.norm_groups} does not divide the channel counts {bad}")
    if cfg.quantizer == "fsq":
        if math.prod(cfg.fsq_levels) != cfg.codebook_size:
            raise ConfigError(
                f"fsq: codebook_size {cfg.codebook_size} != product of fsq_levels {cfg.fsq_levels} "
                f"({math.prod(cfg.fsq_levels)})"
            )
        if min(cfg.fsq_levels) < 2:
            raise ConfigError(f"fsq: every level needs at least 2 values, got {cfg.fsq_levels}")
    if cfg.codebook_size > 2**31 - 1:
        raise ConfigError("codebook_size must fit an int32")
    return cfg


def _tiny() -> VQConfig:
    """Seconds on a laptop: 16 px -> 4x4 codes of 64."""
    return VQConfig(
        image_size=16, base_channels=8, channel_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(),
        norm_groups=4, z_channels=16, embed_dim=8, quantizer="vq", codebook_size=64,
    )


def _shapes() -> VQConfig:
    """Shapes 64 px -> 8x8 = 64 codes of 512 (FSQ levels 8, 8, 8); docs/experiments.md has the runs behind it.

    Channels 16, 16, 32, 64 at 64, 32, 16, 8 px. GroupNorm with 2 groups, i.e. at
    least 8 channels per group: with 1-2 channels per group each norm rescales a
    channel by its own per-picture statistics, which erases which palette colour
    a flat object has.
    """
    return VQConfig(
        image_size=64, base_channels=16, channel_mult=(1, 1, 2, 4), num_res_blocks=1, attn_resolutions=(),
        mid_attention=True, norm_groups=2, z_channels=32, embed_dim=8, quantizer="fsq", fsq_levels=(8, 8, 8),
        codebook_size=512,
    )


def _shapes32() -> VQConfig:
    """Shapes 32 px -> 4x4 = 16 codes of 512: the `shapes` network on pictures half the size.

    A picture costs the transformer 18 tokens instead of 66. Each code covers 8x8 px,
    as in `shapes`, but an object now spans one to four codes instead of one to nine.
    """
    return dataclasses.replace(_shapes(), image_size=32)


def _shapes24() -> VQConfig:
    """Shapes 24 px -> 3x3 = 9 codes of 512: the `shapes` network on pictures of 24 px.

    At 24 px the cells of the 3x3 layout are 8 px wide, so each code covers exactly one
    cell and an object never shares a code with another. At 32 px an object spans codes
    that the object in a neighbouring cell also touches.
    """
    return dataclasses.replace(_shapes(), image_size=24)


def _chameleon() -> VQConfig:
    """The released Chameleon VQGAN (512 px, 32x32 = 1024 codes of 8192)."""
    return VQConfig()


VQ_PRESETS = {"tiny": _tiny, "shapes": _shapes, "shapes32": _shapes32, "shapes24": _shapes24, "chameleon": _chameleon}

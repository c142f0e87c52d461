"""The taming/Chameleon VQGAN encoder and decoder, channels-last (NHWC).

Attribute names follow the taming state dict (`down[i].block[j].conv1`,
`mid.attn_1.q`, `up[i].upsample.conv`, ...) so that importing released weights
is a rename plus a kernel transpose (vqvae/convert.py).
"""

from __future__ import annotations

import einops
import jax
import jax.numpy as jnp
from flax import nnx

from vqvae.config import VQConfig


def swish(x):
    return x * jax.nn.sigmoid(x)


def conv(cin: int, cout: int, kernel: int, rngs: nnx.Rngs, *, stride: int = 1, padding="SAME") -> nnx.Conv:
    return nnx.Conv(cin, cout, (kernel, kernel), strides=stride, padding=padding, rngs=rngs)


def group_norm(channels: int, cfg: VQConfig, rngs: nnx.Rngs) -> nnx.GroupNorm:
    # Two-pass variance, as torch computes it: the fast E[x^2]-E[x]^2 form drifts on imported weights.
    return nnx.GroupNorm(
        channels, num_groups=cfg.norm_groups, epsilon=cfg.norm_eps, use_fast_variance=False, rngs=rngs
    )


class ResnetBlock(nnx.Module):
    """norm -> swish -> conv3x3 -> norm -> swish -> conv3x3, plus a 1x1 shortcut when widths differ."""

    def __init__(self, cin: int, cout: int, cfg: VQConfig, rngs: nnx.Rngs):
        self.norm1 = group_norm(cin, cfg, rngs)
        self.conv1 = conv(cin, cout, 3, rngs)
        self.norm2 = group_norm(cout, cfg, rngs)
        self.conv2 = conv(cout, cout, 3, rngs)
        self.nin_shortcut = conv(cin, cout, 1, rngs) if cin != cout else None

    def __call__(self, x_bhwc):
        h = self.conv1(swish(self.norm1(x_bhwc)))
        h = self.conv2(swish(self.norm2(h)))
        if self.nin_shortcut is not None:
            x_bhwc = self.nin_shortcut(x_bhwc)
        return x_bhwc + h


class AttnBlock(nnx.Module):
    """Single-head self-attention over all h*w positions, q/k/v/proj as 1x1 convs, residual."""

    def __init__(self, channels: int, cfg: VQConfig, rngs: nnx.Rngs):
        self.norm = group_norm(channels, cfg, rngs)
        self.q = conv(channels, channels, 1, rngs)
        self.k = conv(channels, channels, 1, rngs)
        self.v = conv(channels, channels, 1, rngs)
        self.proj_out = conv(channels, channels, 1, rngs)

    def __call__(self, x_bhwc):
        _, h, _, c = x_bhwc.shape
        y = self.norm(x_bhwc)
        q_btc, k_btc, v_btc = (einops.rearrange(f(y), "b h w c -> b (h w) c") for f in (self.q, self.k, self.v))
        weights_bts = jax.nn.softmax(jnp.einsum("btc,bsc->bts", q_btc, k_btc) * c**-0.5, axis=-1)
        out_btc = jnp.einsum("bts,bsc->btc", weights_bts, v_btc)
        return x_bhwc + self.proj_out(einops.rearrange(out_btc, "b (h w) c -> b h w c", h=h))


class Downsample(nnx.Module):
    """Pad right and bottom by one, then a 3x3 stride-2 conv (taming's asymmetric padding)."""

    def __init__(self, channels: int, rngs: nnx.Rngs):
        self.conv = conv(channels, channels, 3, rngs, stride=2, padding=((0, 1), (0, 1)))

    def __call__(self, x_bhwc):
        return self.conv(x_bhwc)


class Upsample(nnx.Module):
    """Nearest-neighbour 2x, then a 3x3 conv."""

    def __init__(self, channels: int, rngs: nnx.Rngs):
        self.conv = conv(channels, channels, 3, rngs)

    def __call__(self, x_bhwc):
        x_bhwc = jnp.repeat(jnp.repeat(x_bhwc, 2, axis=1), 2, axis=2)
        return self.conv(x_bhwc)


class Level(nnx.Module):
    """One resolution: res blocks (each optionally followed by attention) and a resampler."""

    def __init__(self, blocks: list, attns: list, resample):
        self.block = nnx.List(blocks)
        self.attn = nnx.List(attns)
        # The resampler is named as taming names it on each side.
        self.downsample = resample if isinstance(resample, Downsample) else None
        self.upsample = resample if isinstance(resample, Upsample) else None

    def __call__(self, x_bhwc):
        for i, block in enumerate(self.block):
            x_bhwc = block(x_bhwc)
            if len(self.attn):
                x_bhwc = self.attn[i](x_bhwc)
        if self.downsample is not None:
            x_bhwc = self.downsample(x_bhwc)
        if self.upsample is not None:
            x_bhwc = self.upsample(x_bhwc)
        return x_bhwc


class Mid(nnx.Module):
    def __init__(self, channels: int, cfg: VQConfig, rngs: nnx.Rngs):
        self.block_1 = ResnetBlock(channels, channels, cfg, rngs)
        self.attn_1 = AttnBlock(channels, cfg, rngs) if cfg.mid_attention else None
        self.block_2 = ResnetBlock(channels, channels, cfg, rngs)

    def __call__(self, x_bhwc):
        x_bhwc = self.block_1(x_bhwc)
        if self.attn_1 is not None:
            x_bhwc = self.attn_1(x_bhwc)
        return self.block_2(x_bhwc)


class Encoder(nnx.Module):
    """uint8-derived pixels in [-1, 1], [B, S, S, 3] -> latents [B, S/f, S/f, z_channels]."""

    def __init__(self, cfg: VQConfig, rngs: nnx.Rngs):
        ch, mult = cfg.base_channels, cfg.channel_mult
        self.conv_in = conv(3, ch, 3, rngs)
        levels, res, block_in = [], cfg.image_size, ch
        for i, m in enumerate(mult):
            block_out = ch * m
            blocks, attns = [], []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(block_in, block_out, cfg, rngs))
                block_in = block_out
                if res in cfg.attn_resolutions:
                    attns.append(AttnBlock(block_in, cfg, rngs))
            last = i == len(mult) - 1
            levels.append(Level(blocks, attns, None if last else Downsample(block_in, rngs)))
            res = res if last else res // 2
        self.down = nnx.List(levels)
        self.mid = Mid(block_in, cfg, rngs)
        self.norm_out = group_norm(block_in, cfg, rngs)
        self.conv_out = conv(block_in, cfg.z_channels, 3, rngs)

    def __call__(self, x_bhwc):
        h = self.conv_in(x_bhwc)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(swish(self.norm_out(h)))


class PatchEncoder(nnx.Module):
    """Pixels [B, S, S, 3] -> latents [B, S/f, S/f, z_channels], each a function of its own f x f patch only.

    A stride-f patch projection, then `num_res_blocks` per-position residual MLPs
    (LayerNorm over channels, 1x1 convs): nothing mixes neighbouring patches, so a
    patch always gets the same code whatever else is in the picture (plain
    background is one code everywhere), unlike the conv encoder, whose GroupNorm,
    mid attention and receptive field let every code depend on the whole picture.
    The decoder keeps its full spatial context. It trains faster than the conv
    encoder (docs/experiments.md compares the two).
    """

    def __init__(self, cfg: VQConfig, rngs: nnx.Rngs):
        f, width = cfg.downsample_factor, cfg.base_channels * cfg.channel_mult[-1]
        self.conv_in = nnx.Conv(3, width, (f, f), strides=f, padding="VALID", rngs=rngs)
        self.norms = nnx.List([nnx.LayerNorm(width, rngs=rngs) for _ in range(cfg.num_res_blocks)])
        self.fc1 = nnx.List([conv(width, 2 * width, 1, rngs) for _ in range(cfg.num_res_blocks)])
        self.fc2 = nnx.List([conv(2 * width, width, 1, rngs) for _ in range(cfg.num_res_blocks)])
        self.norm_out = nnx.LayerNorm(width, rngs=rngs)
        self.conv_out = conv(width, cfg.z_channels, 1, rngs)

    def __call__(self, x_bhwc):
        h = self.conv_in(x_bhwc)
        for norm, fc1, fc2 in zip(self.norms, self.fc1, self.fc2):
            h = h + fc2(swish(fc1(norm(h))))
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(nnx.Module):
    """Latents [B, s, s, z_channels] -> pixels [B, S, S, 3] (unclamped; callers clamp to [-1, 1])."""

    def __init__(self, cfg: VQConfig, rngs: nnx.Rngs):
        ch, mult = cfg.base_channels, cfg.channel_mult
        block_in = ch * mult[-1]
        res = cfg.image_size // cfg.downsample_factor
        self.conv_in = conv(cfg.z_channels, block_in, 3, rngs)
        self.mid = Mid(block_in, cfg, rngs)
        levels = [None] * len(mult)
        for i in reversed(range(len(mult))):
            block_out = ch * mult[i]
            blocks, attns = [], []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, block_out, cfg, rngs))
                block_in = block_out
                if res in cfg.attn_resolutions:
                    attns.append(AttnBlock(block_in, cfg, rngs))
            levels[i] = Level(blocks, attns, Upsample(block_in, rngs) if i != 0 else None)
            res = res * 2 if i != 0 else res
        self.up = nnx.List(levels)  # indexed by level, like taming's `up`; run from the last
        self.norm_out = group_norm(block_in, cfg, rngs)
        self.conv_out = conv(block_in, 3, 3, rngs)

    def __call__(self, z_bhwc):
        h = self.mid(self.conv_in(z_bhwc))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(swish(self.norm_out(h)))

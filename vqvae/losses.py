"""Training losses: reconstruction, codebook and commitment terms, and a hook for extra losses.

A perceptual (LPIPS-style) or adversarial loss needs network weights that this
project does not ship. A user who has them registers a loss by name and sets
`extra_loss=<name>` (and `extra_loss_weight`) in the training config:

    def my_lpips(images, reconstructions, step):   # float [B, S, S, 3] in [-1, 1], int32 step -> scalar
        return lpips_apply(frozen_params, images, reconstructions).mean()
    vqvae.losses.register_extra_loss("lpips", my_lpips)

The function runs inside the jitted train step, so it must be traceable; it may
close over frozen weights (they become constants of the step). `step` (the number
of updates done before this one) lets a loss start late, as VQGAN's adversarial
term does (`jnp.where(step >= start, loss, 0.0)`). A trained discriminator (a GAN
loss with its own optimizer) needs its own state in the train step and is not
provided.
"""

from __future__ import annotations

from typing import Callable, Literal

import jax
import jax.numpy as jnp

from vqvae.quantizers import Quantized

ExtraLoss = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]
_EXTRA_LOSSES: dict[str, ExtraLoss] = {}


def register_extra_loss(name: str, fn: ExtraLoss) -> None:
    """Makes `fn(images, reconstructions, step) -> scalar` available as `extra_loss=name`."""
    _EXTRA_LOSSES[name] = fn


def get_extra_loss(name: str) -> ExtraLoss:
    if name not in _EXTRA_LOSSES:
        known = ", ".join(sorted(_EXTRA_LOSSES)) or "none registered"
        raise KeyError(f"extra loss {name!r} is not registered (vqvae.losses.register_extra_loss); known: {known}")
    return _EXTRA_LOSSES[name]


def reconstruction_loss(x, y, kind: Literal["l1", "l2", "l1+l2"]) -> jax.Array:
    """Mean absolute (l1), squared (l2) or both (l1+l2: l2's strong pull on large errors, l1's on small ones)."""
    if kind == "l1":
        return jnp.mean(jnp.abs(x - y))
    if kind == "l2":
        return jnp.mean((x - y) ** 2)
    if kind == "l1+l2":
        return jnp.mean(jnp.abs(x - y) + (x - y) ** 2)
    raise ValueError(f"unknown reconstruction loss {kind!r}; expected l1, l2 or l1+l2")


def vq_loss(
    images, reconstructions, q: Quantized, *, recon_kind: Literal["l1", "l2", "l1+l2"], beta: float,
    codebook_weight: float = 1.0, extra: ExtraLoss | None = None, extra_weight: float = 0.0, step=0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """total = recon + codebook_weight * codebook + beta * commit (+ extra_weight * extra)."""
    recon = reconstruction_loss(images, reconstructions, recon_kind)
    total = recon + codebook_weight * q.codebook_loss + beta * q.commit_loss
    terms = {"recon": recon, "codebook": q.codebook_loss, "commit": q.commit_loss}
    if extra is not None and extra_weight:
        terms["extra"] = extra(images, reconstructions, step)
        total = total + extra_weight * terms["extra"]
    return total, {"loss": total, **terms}


def code_counts(codes, codebook_size: int) -> jax.Array:
    """How often each code occurs in `codes` ([codebook_size] floats; additive over batches)."""
    return jnp.zeros((codebook_size,), jnp.float32).at[codes.reshape(-1)].add(1.0)


def count_statistics(counts) -> dict[str, jax.Array]:
    """Fraction of the codebook used and the perplexity exp(H) of the code distribution in `counts`."""
    p = counts / jnp.maximum(counts.sum(), 1.0)
    entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))
    return {"usage": jnp.mean(counts > 0), "perplexity": jnp.exp(entropy)}

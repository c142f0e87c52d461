"""AdamW with linear warmup + cosine decay, global-norm clipping, no decay on norms and biases."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from chameleon_jax.configlib import param

if TYPE_CHECKING:  # jax is imported on first use, so configs can be read before XLA flags are set
    import optax

# Parameters whose path contains one of these names are never weight-decayed.
NO_DECAY_NAMES = ("norm", "bias", "scale")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """Optimizer and learning-rate schedule (Chameleon recipe by default)."""

    lr: float = param(3e-4, "peak learning rate (after warmup)")
    warmup_steps: int = param(100, "linear warmup from 0 to lr over this many steps")
    decay_steps: int = param(0, "cosine decay length after warmup; 0 = until the last training step")
    min_lr_ratio: float = param(0.1, "final learning rate as a fraction of lr")
    b1: float = param(0.9, "Adam beta1")
    b2: float = param(0.95, "Adam beta2")
    eps: float = param(1e-5, "Adam epsilon")
    weight_decay: float = param(0.1, "decoupled weight decay on matrices (never on norms or biases)")
    clip_norm: float = param(1.0, "clip gradients to this global L2 norm; 0 disables clipping")
    grad_accum: int = param(1, "microbatches per step (gradients summed over a scan, one update per step)")


def make_schedule(cfg: OptimConfig, total_steps: int) -> "optax.Schedule":
    """Linear warmup to `lr`, then cosine decay to `lr * min_lr_ratio`."""
    import optax

    warmup = max(int(cfg.warmup_steps), 0)
    decay = cfg.decay_steps if cfg.decay_steps > 0 else max(total_steps - warmup, 1)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.lr,
        warmup_steps=warmup,
        decay_steps=warmup + decay,
        end_value=cfg.lr * cfg.min_lr_ratio,
    )


def decay_mask(params):
    """True for parameters that take weight decay: matrices outside norms; not biases or scales."""
    import jax

    def decays(path, leaf) -> bool:
        names = "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path).lower()
        return getattr(leaf, "ndim", 0) >= 2 and not any(n in names for n in NO_DECAY_NAMES)

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(cfg: OptimConfig, total_steps: int) -> "optax.GradientTransformation":
    """clip_by_global_norm -> AdamW(schedule, masked weight decay)."""
    import optax

    parts = []
    if cfg.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(cfg.clip_norm))
    parts.append(
        optax.adamw(
            make_schedule(cfg, total_steps),
            b1=cfg.b1,
            b2=cfg.b2,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            mask=decay_mask,
        )
    )
    return optax.chain(*parts)

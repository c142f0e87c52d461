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


def make_optimizer(cfg: OptimConfig, total_steps: int, *, flat: bool = False) -> "optax.GradientTransformation":
    """clip_by_global_norm -> AdamW(schedule, masked weight decay).

    flat=True runs the same update on two flat vectors, the parameters that decay and the rest
    (`flat_by_decay`), instead of on each parameter array: a few long element-wise kernels instead of
    several short ones per array. Its state holds those vectors, so use it only where the whole train
    state is replicated (a purely data-parallel step), never on a sharded one.
    """
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
            mask={"decay": True, "rest": False} if flat else decay_mask,
        )
    )
    tx = optax.chain(*parts)
    return flat_by_decay(tx) if flat else tx


def flat_by_decay(inner: "optax.GradientTransformation") -> "optax.GradientTransformation":
    """`inner` applied to {"decay": vector, "rest": vector}: the parameters `decay_mask` marks, and the
    others, each raveled into one vector (the update is handed back in the parameters' own structure).
    optax.flatten makes one vector; two keep the weight-decay mask."""
    import jax
    import jax.numpy as jnp
    import optax

    def grouped(tree, flags):
        leaves = jax.tree.leaves(tree)

        def cat(want: bool):
            parts = [x.reshape(-1) for x, f in zip(leaves, flags) if f == want]
            return jnp.concatenate(parts) if parts else jnp.zeros((0,), jnp.float32)

        return {"decay": cat(True), "rest": cat(False)}

    def ungrouped(groups, params, flags):
        leaves, treedef = jax.tree.flatten(params)
        offsets, out = {"decay": 0, "rest": 0}, []
        for x, f in zip(leaves, flags):
            name = "decay" if f else "rest"
            start = offsets[name]
            out.append(groups[name][start:start + x.size].reshape(x.shape).astype(x.dtype))
            offsets[name] = start + x.size
        return jax.tree.unflatten(treedef, out)

    def init(params):
        return inner.init(grouped(params, jax.tree.leaves(decay_mask(params))))

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("flat_by_decay needs the parameters in update (their structure and decay mask)")
        flags = jax.tree.leaves(decay_mask(params))
        new, state = inner.update(grouped(updates, flags), state, grouped(params, flags))
        return ungrouped(new, params, flags), state

    return optax.GradientTransformation(init, update)

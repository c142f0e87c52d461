"""What the tools measure on in place of real data and weights: random batches in the training
layout, the project's `Trainer` with its real optimizer, shape-only models, and fake CPU devices."""

from __future__ import annotations

import os
import sys

import numpy as np

from chameleon_jax import configlib
from chameleon_jax.config import ModelConfig


def jax_started() -> bool:
    """Whether XLA's backends exist: importing jax does not create them, the first device query does,
    and XLA_FLAGS is read then."""
    if "jax" not in sys.modules:
        return False
    try:
        from jax._src import xla_bridge

        return bool(xla_bridge.backends_are_initialized())
    except (ImportError, AttributeError):  # no way to tell: assume the worst
        return True


def set_cpu_devices(n: int) -> None:
    """Asks XLA for `n` host devices; must run before jax's first device query (a no-op off CPU).

    Once jax has started on the CPU with another count, that is a config error: XLA cannot be asked again.
    """
    if n <= 0:
        return
    if jax_started():
        import jax

        if jax.devices()[0].platform == "cpu" and jax.device_count() != n:
            raise configlib.ConfigError(
                f"cpu_devices={n}, but jax was already started with {jax.device_count()} CPU devices; "
                "set cpu_devices=0 to use them as they are"
            )
        return
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    os.environ["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={n}"])


def synthetic_batch(rows: int, seq_len: int, vocab: int, docs_per_row: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    """Random tokens in the training batch layout, `docs_per_row` packed documents per row.

    Every row has the same document boundaries (segment ids 1..docs_per_row, positions restarting
    at each); tokens, targets and modality are random; every loss weight is 1.
    """
    rng = np.random.default_rng(seed)
    ids_bt = rng.integers(0, vocab, (rows, seq_len + 1)).astype(np.int32)
    bounds = np.linspace(0, seq_len, docs_per_row + 1).astype(int)
    seg_t = np.zeros((seq_len,), np.int32)
    pos_t = np.zeros((seq_len,), np.int32)
    for d in range(docs_per_row):
        seg_t[bounds[d] : bounds[d + 1]] = d + 1
        pos_t[bounds[d] : bounds[d + 1]] = np.arange(bounds[d + 1] - bounds[d])
    return {
        "tokens": ids_bt[:, :-1],
        "targets": ids_bt[:, 1:],
        "positions": np.tile(pos_t, (rows, 1)),
        "segment_ids": np.tile(seg_t, (rows, 1)),
        "loss_weights": np.ones((rows, seq_len), np.float32),
        "modality": rng.integers(0, 2, (rows, seq_len)).astype(np.int8),
    }


def make_trainer(cfg: ModelConfig, mesh, rules, optim=None, total_steps: int = 1000):
    """The project's `Trainer` on `mesh` with the real optimizer and schedule (`train.optim`, default
    `OptimConfig()`); `mesh` may be an `AbstractMesh`, and nothing is allocated until `init_state`."""
    from train.optim import OptimConfig, make_optimizer, make_schedule
    from train.step import Trainer

    optim = optim if optim is not None else OptimConfig()
    return Trainer(cfg, make_optimizer(optim, total_steps), mesh, rules,
                   schedule=make_schedule(optim, total_steps), grad_accum=optim.grad_accum)


def device_batch(trainer, rows: int, seq_len: int, docs_per_row: int = 2, seed: int = 0) -> dict:
    """`synthetic_batch` for the trainer's model, placed on its mesh as its train step shards a batch."""
    import jax

    host = synthetic_batch(rows, seq_len, trainer.cfg.vocab_size, docs_per_row, seed)
    return {k: jax.device_put(v, trainer.batch_sharding(v.shape)) for k, v in host.items()}


def abstract_model(cfg: ModelConfig):
    """`Transformer(cfg)` as shapes and dtypes only (`nnx.eval_shape`): nothing allocated."""
    from flax import nnx

    from chameleon_jax.transformer import Transformer

    return nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))

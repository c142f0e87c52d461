"""What the tools measure on in place of real data and weights: random batches in the training
layout, the project's `Trainer` with its real optimizer, and shape-only models."""

from __future__ import annotations

import numpy as np

from chameleon_jax.config import ModelConfig


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

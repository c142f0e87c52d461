"""Teacher-forced scoring of packed rows (`sequence.pack`) on one device or a device mesh.

The rows go through the model in chunks of `batch_size` rows, each chunk padded with
zero rows (which carry no loss weight) so that one compiled shape serves every chunk.
On a mesh the rows are split over the data axes like a training batch, whole rows per
data shard; every process builds the same rows and places the ones its devices hold.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import numpy as np
from flax import nnx

from chameleon_jax.generation.placement import Placement, fetch
from chameleon_jax.sharding import use_mesh


@functools.partial(jax.jit, static_argnames=("graphdef", "reduce"))
def _score(state, rows, graphdef, reduce):
    logits = nnx.merge(graphdef, state)(rows["tokens"], rows["positions"], rows["segment_ids"])
    return reduce(logits, rows)


def score_rows(pipe, batch: dict[str, np.ndarray], batch_size: int,
               reduce: Callable[[jax.Array, dict[str, jax.Array]], Any]) -> list[Any]:
    """`reduce(logits [B, T, V], rows) -> pytree of arrays` over every chunk of `batch`'s rows.

    `pipe` holds the model (`pipe.model`) and, when it runs on a mesh, `pipe.mesh` and
    `pipe.rules`. Returns one host pytree per chunk, in row order; a per-row output of
    the last chunk includes its padding rows (callers keep the first rows they sent).
    The compiled program is kept per model graph, `reduce` and row shape, so a module-level
    `reduce` called again on rows of the same shape does not compile again.
    """
    graphdef, state = nnx.split(pipe.model)
    placement = None if getattr(pipe, "mesh", None) is None else Placement.of(pipe.mesh, pipe.rules)
    if placement is not None:  # whole rows per data shard
        batch_size = placement.row_shards * -(-batch_size // placement.row_shards)
    run = functools.partial(_score, graphdef=graphdef, reduce=reduce)
    outputs = []
    n_rows = batch["tokens"].shape[0]
    for i in range(0, n_rows, batch_size):
        rows = {k: v[i : i + batch_size] for k, v in batch.items()}
        pad = batch_size - rows["tokens"].shape[0]
        if pad:
            rows = {k: np.concatenate([v, np.zeros((pad, *v.shape[1:]), v.dtype)]) for k, v in rows.items()}
        if placement is not None:
            rows = {k: jax.make_array_from_callback(v.shape, placement.rows(v.shape), lambda idx, v=v: v[idx])
                    for k, v in rows.items()}
            with use_mesh(placement.mesh, placement.rules):  # the model's activation constraints apply
                out = run(state, rows)
        else:
            out = run(state, rows)
        outputs.append(jax.tree.map(fetch, out))
    return outputs

"""Where the decode loop runs on a device mesh, and how the processes of a multi-process run share a batch.

The mesh and the rules table are the training ones (`MeshConfig`, `sharding.py`):

- parameters keep their training layout (`sharding.state_shardings`);
- the rows (each prompt with its guidance streams, adjacent: see `guidance.py`) and
  the KV cache are split over the mesh axes of `cache_batch` (data and fsdp by
  default), whole prompts per device, so guidance never crosses devices; key/value
  heads over those of `cache_kv_heads` (tensor), or replicated where they do not divide;
- the logits, and with them the sampling, are sharded by the model's own constraints
  (vocabulary over `tensor`); it is one SPMD program, so every device of a row's
  group computes the same chosen token, and the random draws do not depend on the
  layout (jax's partitionable threefry), so a mesh samples what one device samples.

Prompts are padded to a multiple of the row shards with copies of a real prompt
that carry its random stream id (they make the same choices and finish with it, so
they add no loop steps); their outputs are dropped.

Several processes (`jax.distributed`): each passes only its own prompts. The
processes agree on the padded prompt length and the per-process row count, each
process's rows are one contiguous block of the global batch (assembled with
`jax.make_array_from_process_local_data`, as the training batch is), and each
process gets back its own prompts' outputs. A row's random stream id is its index
in the concatenation of all processes' prompts, so N processes sample exactly what
one process given all the prompts samples.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from chameleon_jax import sharding as sharding_lib

ROW_AXES = ("cache_batch",)


@dataclasses.dataclass(frozen=True)
class Placement:
    """A mesh and the rules table (hashable: the compiled loop is specialised on it)."""

    mesh: Mesh
    rules: tuple[tuple[str, str], ...]

    @classmethod
    def of(cls, mesh: Mesh, rules=None) -> "Placement":
        from chameleon_jax.config import MeshConfig

        rules = MeshConfig().rules if rules is None else rules
        items = rules.items() if hasattr(rules, "items") else rules
        return cls(mesh, tuple((str(k), str(v)) for k, v in items))

    @property
    def row_shards(self) -> int:
        """How many ways the rows are split (the mesh axes `cache_batch` maps to)."""
        spec = sharding_lib.logical_to_spec(ROW_AXES, self.rules)
        axes = [a for part in spec if part for a in ((part,) if isinstance(part, str) else part)]
        return math.prod(self.mesh.shape[a] for a in axes)

    def sharding(self, logical_axes: Sequence[str | None], shape: Sequence[int] | None = None) -> NamedSharding:
        return sharding_lib.named_sharding(self.mesh, logical_axes, self.rules, shape)

    def rows(self, shape: Sequence[int]) -> NamedSharding:
        """Rows split over the data axes, every other dimension replicated."""
        return self.sharding((*ROW_AXES, *[None] * (len(shape) - 1)), shape)

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())


# --------------------------------------------------------------------------- processes


def allgather(x: np.ndarray) -> np.ndarray:
    """[processes, ...]: every process's `x` (same shape on each), in process order."""
    x = np.asarray(x)
    if jax.process_count() == 1:
        return x[None]
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=False))


@dataclasses.dataclass(frozen=True)
class LocalBatch:
    """This process's share of a global batch of prompts."""

    prompts: list[list[int]]  # this process's prompts, padded to `per_process`
    row_ids: np.ndarray  # int32 [per_process]: each prompt's random stream id
    real: int  # how many of `prompts` are real
    start: int  # index of this process's first prompt in the global (padded) batch
    per_process: int
    global_prompts: int  # per_process * processes
    all_lengths: list[int]  # lengths of every process's real prompts (for the length plan)


def local_batch(prompts: Sequence[Sequence[int]], placement: Placement, bos_id: int,
                stream_ids: Sequence[int] | None = None) -> LocalBatch:
    """Pads this process's prompts so that the global batch splits into whole prompts per row shard.

    A collective when there are several processes: every process must call it.
    """
    processes, index = jax.process_count(), jax.process_index()
    counts = allgather(np.asarray([len(prompts)], np.int64))[:, 0]
    longest = int(counts.max())
    # Each process's block must cover whole row shards (when the rows split over the processes).
    unit = max(1, placement.row_shards // math.gcd(placement.row_shards, processes))
    per_process = max(unit, unit * math.ceil(longest / unit))
    lengths = np.zeros([longest], np.int64)
    lengths[: len(prompts)] = [len(p) for p in prompts]
    all_lengths = allgather(lengths)
    offset = int(counts[:index].sum())
    filler = list(prompts[0]) if prompts else [bos_id]
    padded = [list(p) for p in prompts] + [filler] * (per_process - len(prompts))
    row_ids = np.zeros([per_process], np.int32)
    row_ids[: len(prompts)] = offset + np.arange(len(prompts)) if stream_ids is None else stream_ids
    row_ids[len(prompts):] = row_ids[0] if prompts else 0
    return LocalBatch(
        prompts=padded, row_ids=row_ids, real=len(prompts), start=index * per_process, per_process=per_process,
        global_prompts=per_process * processes,
        all_lengths=[int(n) for p in range(processes) for n in all_lengths[p, : counts[p]]],
    )


def _held_rows(sharding: NamedSharding, shape: tuple[int, ...]) -> tuple[int, int]:
    """[start, stop) of the leading-axis rows this process's devices hold."""
    spans = [(idx[0].start or 0, shape[0] if idx[0].stop is None else idx[0].stop)
             for idx in sharding.addressable_devices_indices_map(shape).values()]
    return min(s for s, _ in spans), max(e for _, e in spans)


def assemble(local: np.ndarray, sharding: NamedSharding, global_rows: int, start: int) -> jax.Array:
    """A global array [global_rows, ...] from this process's rows [start, start + len(local)).

    One process: a plain placement. Several: `make_array_from_process_local_data` with the
    process's own rows when its devices hold exactly those; otherwise (rows not split by
    process, e.g. a tensor axis spanning processes) the rows are gathered first.
    """
    local = np.asarray(local)
    shape = (global_rows, *local.shape[1:])
    if jax.process_count() == 1:
        return jax.device_put(local, sharding)
    if _held_rows(sharding, shape) == (start, start + local.shape[0]):
        return jax.make_array_from_process_local_data(sharding, local, shape)
    everything = allgather(local).reshape(shape)
    return jax.make_array_from_callback(shape, sharding, lambda idx: everything[idx])


def replicate(tree: Any, placement: Placement) -> Any:
    """Host values (the same on every process) as arrays replicated over the mesh."""
    sharding = placement.replicated

    def one(x):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

    return jax.tree.map(one, tree)


def fetch(x: jax.Array) -> np.ndarray:
    """The whole of a (possibly multi-process) array on this host."""
    if x.is_fully_addressable:
        return np.asarray(x)
    if x.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def gather_token_lists(rows: Sequence[Sequence[int]], pad: int = -1) -> list[list[int]]:
    """Every process's lists of ids, concatenated in process order (the same on every process)."""
    if jax.process_count() == 1:
        return [list(r) for r in rows]
    counts = allgather(np.asarray([len(rows)], np.int64))[:, 0]
    width = int(allgather(np.asarray([max([len(r) for r in rows], default=0)], np.int64)).max())
    block = np.full([int(counts.max()), width + 1], pad, np.int64)
    for i, r in enumerate(rows):
        block[i, 0] = len(r)
        block[i, 1 : 1 + len(r)] = r
    everything = allgather(block)
    return [everything[p, i, 1 : 1 + everything[p, i, 0]].tolist() for p in range(len(counts)) for i in range(counts[p])]


# --------------------------------------------------------------------------- the sharded loop


@functools.partial(jax.jit, static_argnames=("loop", "graphdef", "spec", "placement"))
def _loop_on_mesh(model_state, tables, tokens_rp, mask_rp, params, seed, *, loop: Callable, graphdef, spec,
                  placement: Placement):
    # Traced inside the mesh context, so every `constrain` in the model (activations, the KV cache's
    # cache_batch / cache_kv_heads) pins its array to the mesh.
    with sharding_lib.use_mesh(placement.mesh, placement.rules):
        out_bn, length_b, steps, logits_bnv = loop(graphdef, model_state, tables, tokens_rp, mask_rp, params,
                                                   jax.random.key(seed), spec=spec)
        out_bn = sharding_lib.constrain(out_bn, (*ROW_AXES, None))
        length_b = sharding_lib.constrain(length_b, ROW_AXES)
        logits_bnv = sharding_lib.constrain(logits_bnv, (*ROW_AXES, None, "activation_vocab"))
    return out_bn, length_b, steps, logits_bnv


def run_loop(loop: Callable, graphdef, model_state, tables, tokens_rp: np.ndarray, mask_rp: np.ndarray, params,
             seed: int, *, spec, placement: Placement, batch: LocalBatch, streams: int):
    """Runs the decode loop over the global batch; returns this process's rows of
    (out [B, N], lengths [B], steps, logits [B, N, V]) as numpy arrays, padding dropped."""
    rows = batch.global_prompts * streams
    tokens = assemble(tokens_rp, placement.rows((rows, tokens_rp.shape[1])), rows, batch.start * streams)
    mask = assemble(mask_rp, placement.rows((rows, mask_rp.shape[1])), rows, batch.start * streams)
    row_ids = assemble(batch.row_ids, placement.rows((batch.global_prompts,)), batch.global_prompts, batch.start)
    params = replicate(params._replace(row_ids_b=None), placement)._replace(row_ids_b=row_ids)
    out_bn, length_b, steps, logits_bnv = _loop_on_mesh(
        model_state, replicate(tables, placement), tokens, mask, params, replicate(np.int32(seed), placement),
        loop=loop, graphdef=graphdef, spec=spec, placement=placement,
    )
    mine = slice(batch.start, batch.start + batch.real)
    logits = fetch(logits_bnv)[mine] if spec.return_logits else None
    return fetch(out_bn)[mine], fetch(length_b)[mine], int(fetch(steps)), logits

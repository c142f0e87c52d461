"""Gradient sums over a data-parallel mesh in one all-reduce of one flat vector.

Under `jax.jit` with replicated parameters and a batch split over the devices, XLA
sums each gradient leaf across the devices as one operand of an all-reduce. XLA's
CPU backend runs every operand as its own exchange between the device threads,
about 0.1 ms each whatever its size: on two CPU devices, 100 leaves of 7,300
floats take 10 ms to sum and one vector of 730,000 floats 0.8 ms. A small model
with a hundred parameter arrays pays that on every step.

`shard_sums(fn, ...)` runs `fn` on each device's rows under `shard_map` and sums
what it returns across the devices as a single flattened vector. It applies where
the step is purely data parallel: every array of the train state replicated and
the batch split along its rows over all the devices (`pure_data_parallel`).
`use_flat_sum` picks it for a `mode` of "auto" (on CPU meshes of several devices),
"flat" or "xla".
"""

from __future__ import annotations

from typing import Any, Callable

import jax
from jax.flatten_util import ravel_pytree
from jax.sharding import Mesh, PartitionSpec

from chameleon_jax import sharding as shd

MODES = ("auto", "flat", "xla")


def _split(mesh: Mesh, entry) -> int:
    """How many ways one PartitionSpec entry splits its dimension on `mesh`."""
    names = entry if isinstance(entry, tuple) else (entry,)
    n = 1
    for name in names:
        n *= mesh.shape[name] if name else 1
    return n


def pure_data_parallel(mesh: Mesh, state_shardings: Any, batch_spec: PartitionSpec) -> bool:
    """True when every state array is replicated and the batch is split over all devices by rows only."""
    if mesh.size < 2 or not batch_spec or _split(mesh, batch_spec[0]) != mesh.size:
        return False
    if any(_split(mesh, entry) > 1 for entry in batch_spec[1:]):
        return False
    return all(s.is_fully_replicated for s in jax.tree.leaves(state_shardings))


def use_flat_sum(mode: str, mesh: Mesh, state_shardings: Any, batch_spec: PartitionSpec) -> bool:
    """Whether a step on this mesh sums its gradients with `shard_sums` ("auto": on CPU devices only)."""
    if mode not in MODES:
        raise ValueError(f"grad_sum must be one of {MODES}, got {mode!r}")
    if mode == "xla":
        return False
    fits = pure_data_parallel(mesh, state_shardings, batch_spec)
    if mode == "flat" and not fits:
        raise ValueError("grad_sum='flat' needs a purely data-parallel step (every state array replicated, the batch "
                         f"split by rows over all {mesh.size} devices); this mesh is {dict(mesh.shape)}")
    return fits and (mode == "flat" or mesh.devices.flat[0].platform == "cpu")


def shard_sums(
    fn: Callable[[Any, Any], tuple[Any, Any]], mesh: Mesh, batch_spec: PartitionSpec
) -> Callable[[Any, Any], tuple[Any, Any]]:
    """`fn(replicated, local_batch) -> (sums, same)` run per device; `sums` is added up over the devices.

    `replicated` reaches every device whole and `local_batch` holds the device's rows (`batch_spec`
    splits them). `sums` must be additive over rows (gradient and loss sums); it is flattened into one
    float vector, summed in one all-reduce and unflattened (each leaf keeps its dtype). `same` must not
    depend on the rows (e.g. an advanced RNG counter) and is returned as computed. Logical sharding
    constraints are off inside `fn`: each device sees plain local arrays.
    """
    rows_axes = batch_spec[0]

    def body(replicated, local_batch):
        with shd.no_mesh():
            sums, same = fn(replicated, local_batch)
        flat, unflatten = ravel_pytree(sums)
        return unflatten(jax.lax.psum(flat, rows_axes)), same

    # check_vma=False: gradients taken per device stay local (no implicit sum), as the one psum above expects.
    return jax.shard_map(body, mesh=mesh, in_specs=(PartitionSpec(), batch_spec), out_specs=PartitionSpec(),
                         check_vma=False)

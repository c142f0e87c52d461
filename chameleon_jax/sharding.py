"""Device mesh, logical-axis rules, and sharded model creation.

The model names logical axes only (`embed`, `heads`, `activation_batch`, ...). The
rules table (`MeshConfig.rules`) maps each name to mesh axes of the
('data', 'fsdp', 'sequence', 'tensor') mesh: `"data+fsdp"` for several, `""` for
replicated. `sequence` splits the token dimension of activations (context parallelism:
attention then runs as ring attention, see `chameleon_jax.kernels.ring`).
Changing the parallelism is a config edit, never a model edit.

Two conventions keep one table usable for every model size:
- a mesh axis is used at most once per array (the first dimension that asks for it
  gets it), so `activation_batch -> data+fsdp` and `embed -> fsdp` can coexist;
- a dimension whose size the mesh axes do not divide is left replicated (e.g. 8 KV
  heads on a 16-way tensor axis) instead of failing to compile.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from typing import Any, Iterator, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from chameleon_jax.configlib import ConfigError

MESH_AXES = ("data", "fsdp", "sequence", "tensor")

Rules = Sequence[tuple[str, str]] | Mapping[str, str]
LogicalAxes = Sequence[str | None]


# --------------------------------------------------------------------------- mesh


def _fill_sizes(sizes: Sequence[int], total: int, what: str) -> tuple[int, ...]:
    sizes = list(sizes)
    free = [i for i, s in enumerate(sizes) if s == -1]
    if len(free) > 1:
        raise ConfigError(f"at most one {what} mesh size may be -1, got {dict(zip(MESH_AXES, sizes))}")
    if any(s == 0 or s < -1 for s in sizes):
        raise ConfigError(f"{what} mesh sizes must be positive or -1, got {dict(zip(MESH_AXES, sizes))}")
    fixed = math.prod(s for s in sizes if s != -1)
    if free:
        if total % fixed:
            raise ConfigError(
                f"{what} mesh {dict(zip(MESH_AXES, sizes))}: the fixed sizes (product {fixed}) "
                f"do not divide the {total} devices available"
            )
        sizes[free[0]] = total // fixed
    elif fixed != total:
        raise ConfigError(
            f"{what} mesh {dict(zip(MESH_AXES, sizes))} needs {fixed} devices, but {total} are available"
        )
    return tuple(sizes)


def build_mesh(mesh_cfg, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The ('data', 'fsdp', 'sequence', 'tensor') mesh described by a `MeshConfig`.

    In-slice sizes (`data`, `fsdp`, `sequence`, `tensor`, one of them may be -1) fill the
    devices of one slice; `dcn_*` sizes multiply them across slices (multi-slice pods, built with
    `create_hybrid_device_mesh` so the slow links carry the data-parallel traffic).
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    dcn = (mesh_cfg.dcn_data, mesh_cfg.dcn_fsdp, 1, mesh_cfg.dcn_tensor)  # the ring stays inside a slice
    if any(s < 1 for s in dcn):
        raise ConfigError(f"dcn mesh sizes must be >= 1, got {dict(zip(MESH_AXES, dcn))}")
    slices = math.prod(dcn)
    if n % slices:
        raise ConfigError(f"{n} devices cannot be split into {slices} slices (dcn sizes {dict(zip(MESH_AXES, dcn))})")
    ici = _fill_sizes((mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.sequence, mesh_cfg.tensor), n // slices, "in-slice")
    if slices > 1:
        if not all(hasattr(d, "slice_index") for d in devices):
            raise ValueError(f"a multi-slice mesh (dcn sizes {dcn}) needs devices that report a slice_index")
        device_array = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices)
    else:
        try:
            device_array = mesh_utils.create_device_mesh(ici, devices)
        except (ValueError, NotImplementedError, AssertionError):
            # Topology-aware placement is unavailable for some device kinds; plain order is correct, only slower.
            device_array = np.asarray(devices).reshape(ici)
    return Mesh(device_array, MESH_AXES)


# --------------------------------------------------------------------------- rules


def _rules_dict(rules: Rules) -> dict[str, tuple[str, ...]]:
    items = rules.items() if isinstance(rules, Mapping) else rules
    out = {}
    for name, target in items:
        if target is None or target == "":
            axes: tuple[str, ...] = ()
        elif isinstance(target, str):
            axes = tuple(a for a in target.split("+") if a)
        else:
            axes = tuple(target)
        out[name] = axes
    return out


def logical_to_spec(
    logical_axes: LogicalAxes,
    rules: Rules,
    shape: Sequence[int] | None = None,
    mesh: Mesh | None = None,
) -> PartitionSpec:
    """The PartitionSpec for an array whose dimensions carry `logical_axes`.

    `None` in `logical_axes` means replicated. An unknown logical name is an error
    (a typo would otherwise silently replicate a large tensor). Given `shape` and
    `mesh`, dimensions that the mesh axes do not divide stay replicated.
    """
    table = _rules_dict(rules)
    used: set[str] = set()
    spec: list[Any] = []
    for dim, name in enumerate(logical_axes):
        if name is None:
            spec.append(None)
            continue
        if name not in table:
            raise ValueError(f"logical axis {name!r} has no entry in the sharding rules; known: {sorted(table)}")
        axes = tuple(a for a in table[name] if a not in used)
        if shape is not None and mesh is not None and axes:
            size = math.prod(mesh.shape[a] for a in axes)
            if shape[dim] % size:
                axes = ()
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*spec)


def named_sharding(
    mesh: Mesh, logical_axes: LogicalAxes, rules: Rules, shape: Sequence[int] | None = None
) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(logical_axes, rules, shape, mesh))


# --------------------------------------------------------------------------- activation constraints

_ACTIVE: contextvars.ContextVar[tuple[Mesh, Rules] | None] = contextvars.ContextVar("chameleon_mesh", default=None)


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: Rules) -> Iterator[Mesh]:
    """Within this context, `constrain` pins activations to the mesh via the rules.

    The context matters while a function is *traced*: jit the train or decode step
    inside it (or call the jitted function for the first time inside it).
    """
    token = _ACTIVE.set((mesh, rules))
    try:
        yield mesh
    finally:
        _ACTIVE.reset(token)


@contextlib.contextmanager
def no_mesh() -> Iterator[None]:
    """Within this context `constrain` is a no-op (code traced per device, e.g. under `shard_map`)."""
    token = _ACTIVE.set(None)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active_mesh() -> tuple[Mesh, Rules] | None:
    """The (mesh, rules) of the enclosing `use_mesh`, or None outside one."""
    return _ACTIVE.get()


def constrain(x: jax.Array, logical_axes: LogicalAxes) -> jax.Array:
    """`with_sharding_constraint` by logical names; a no-op when no mesh is active."""
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    return jax.lax.with_sharding_constraint(x, named_sharding(mesh, logical_axes, rules, x.shape))


# --------------------------------------------------------------------------- model state


def _variable_axes(v: nnx.Variable, ndim: int) -> tuple[str | None, ...]:
    axes = v.get_metadata().get("out_sharding") if isinstance(v, nnx.Variable) else None
    if not axes:
        return (None,) * ndim
    if len(axes) != ndim:
        raise ValueError(f"variable of rank {ndim} carries {len(axes)} logical axes {tuple(axes)}")
    return tuple(axes)


def state_shardings(abstract_state: Any, mesh: Mesh, rules: Rules) -> Any:
    """NamedShardings for every Variable of an `nnx.State` (abstract or concrete).

    The result has the state's structure (each Variable's value replaced by its
    sharding), so it can be given to `jax.jit(out_shardings=...)` or used as an
    orbax restore target. Variables without logical axes (RNG state) are replicated.
    """

    def one(v):
        value = v.get_value() if isinstance(v, nnx.Variable) else v
        shape = tuple(getattr(value, "shape", ()))
        axes = _variable_axes(v, len(shape))
        sharding = NamedSharding(mesh, logical_to_spec(axes, rules, shape, mesh))
        return v.replace(sharding) if isinstance(v, nnx.Variable) else sharding

    return jax.tree.map(one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def create_sharded(make, mesh: Mesh, rules: Rules):
    """The module `make()` builds, its variables born sharded (jitted init with out_shardings).

    `make` constructs the module (e.g. `lambda: Transformer(cfg, rngs=nnx.Rngs(seed))`);
    these helpers know logical axes, not any particular model.
    """
    abstract = nnx.eval_shape(make)
    graphdef, abstract_state = nnx.split(abstract)
    shardings = state_shardings(abstract_state, mesh, rules)

    @functools.partial(jax.jit, out_shardings=shardings)
    def init():
        return nnx.state(make())

    with use_mesh(mesh, rules):
        state = init()
    return nnx.merge(graphdef, state)


def place_model(model, mesh: Mesh, rules: Rules):
    """`model` with every variable moved into its sharding on `mesh` (those already there stay put).

    A mesh spanning several processes takes each value from this host's copy, so every
    process must hold the same values (a model built from the same seed, or loaded).
    """
    graphdef, state = nnx.split(model)

    def put(x, sharding):
        if getattr(x, "sharding", None) == sharding or sharding.is_fully_addressable:
            return jax.device_put(x, sharding)
        if isinstance(x, jax.Array) and not x.is_fully_addressable:  # already global: reshard on the devices
            return jax.jit(lambda a: a, out_shardings=sharding)(x)
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(put(jax.random.key_data(x), sharding), impl=jax.random.key_impl(x))
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])

    return nnx.merge(graphdef, jax.tree.map(put, state, state_shardings(state, mesh, rules)))

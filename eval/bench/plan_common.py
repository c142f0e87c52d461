"""What the training and the inference planners share: mesh sizes, abstract and local meshes, shard sizes,
XLA's memory figures, the per-accelerator fit, table printing and output."""

from __future__ import annotations

import json
import math
import os
from typing import Any, Callable, Sequence

from chameleon_jax import configlib
from chameleon_jax.checkpoint import path_str
from chameleon_jax.config import MeshConfig
from chameleon_jax.host_devices import jax_started, set_cpu_devices
from eval.bench import accelerators

MESH_AXES = ("data", "fsdp", "sequence", "tensor")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def mesh_sizes(mesh_cfg: MeshConfig, num_devices: int | None) -> dict[str, int]:
    """Axis sizes of the ('data', 'fsdp', 'sequence', 'tensor') mesh (in-slice size x across-slice size).

    One in-slice size may be -1; it then takes the devices left over, which needs `num_devices`.
    """
    ici = [mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.sequence, mesh_cfg.tensor]
    dcn = [mesh_cfg.dcn_data, mesh_cfg.dcn_fsdp, 1, mesh_cfg.dcn_tensor]
    if any(s < 1 for s in dcn) or any(s == 0 or s < -1 for s in ici) or ici.count(-1) > 1:
        raise configlib.ConfigError(f"mesh sizes must be positive (one in-slice size may be -1), got {mesh_cfg}")
    if -1 in ici:
        if num_devices is None:
            raise configlib.ConfigError("a mesh size of -1 needs --devices (the total device count)")
        slices = math.prod(dcn)
        fixed = math.prod(s for s in ici if s != -1)
        if num_devices % (slices * fixed):
            raise configlib.ConfigError(f"{num_devices} devices do not split into {slices} slice(s) of {fixed}*k")
        ici[ici.index(-1)] = num_devices // (slices * fixed)
    sizes = {a: i * d for a, i, d in zip(MESH_AXES, ici, dcn)}
    if num_devices is not None and math.prod(sizes.values()) != num_devices:
        raise configlib.ConfigError(f"mesh {sizes} has {math.prod(sizes.values())} devices, --devices says {num_devices}")
    return sizes


def parse_mesh(text: str) -> MeshConfig:
    """'data=2,fsdp=4,sequence=2,tensor=1' or 'data=2 tensor=4' (any MeshConfig size field, separated by commas
    or spaces; unnamed in-slice sizes are 1)."""
    cfg = MeshConfig(data=1, fsdp=1, sequence=1, tensor=1)
    items = text.replace(",", " ").split()
    if not items:
        raise configlib.ConfigError(f"a mesh needs sizes like data=2,fsdp=4,tensor=1, got {text!r}")
    return configlib.apply_overrides(cfg, items)


def abstract_mesh(sizes: dict[str, int]):
    from jax.sharding import AbstractMesh

    return AbstractMesh(tuple(sizes.get(a, 1) for a in MESH_AXES), MESH_AXES)


def shard_bytes(shape, logical_axes, rules, mesh, itemsize: int) -> int:
    """Bytes of one device's shard of a `shape` array whose axes are named `logical_axes`, under `rules`."""
    from jax.sharding import NamedSharding

    from chameleon_jax.sharding import logical_to_spec

    spec = logical_to_spec(logical_axes, rules, shape, mesh)
    return math.prod(NamedSharding(mesh, spec).shard_shape(tuple(shape))) * itemsize


# --------------------------------------------------------------------------- the compiler check


def compile_backend(args, mesh_cfg: MeshConfig) -> str | None:
    """With --compile: the backend XLA compiles for here, else None.

    Before jax's first device query, asks for as many CPU devices as the mesh has (unless
    XLA_FLAGS already names a count) and defaults JAX_PLATFORMS to the CPU, so the estimate
    and the compiled program describe the same backend.
    """
    if not args.compile:
        return None
    if not jax_started():
        if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
            set_cpu_devices(math.prod(mesh_sizes(mesh_cfg, args.devices).values()))
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    return jax.default_backend()


def local_mesh(mesh_cfg: MeshConfig):
    """The mesh on this process's first devices; a config error where it has too few."""
    import jax

    from chameleon_jax.sharding import build_mesh

    sizes = mesh_sizes(mesh_cfg, None)
    need = math.prod(sizes.values())
    if jax.device_count() < need:
        raise configlib.ConfigError(
            f"--compile needs {need} devices for mesh {sizes}, this process has {jax.device_count()} "
            f"(on CPU set XLA_FLAGS=--xla_force_host_platform_device_count={need} before starting)"
        )
    return build_mesh(mesh_cfg, jax.devices()[:need])


def memory_figures(compiled) -> dict[str, Any]:
    """XLA's `memory_analysis()` of a compiled program, bytes per device, with its peak."""
    import jax

    m = compiled.memory_analysis()
    out = {"backend": jax.default_backend(), "argument_bytes": int(m.argument_size_in_bytes),
           "output_bytes": int(m.output_size_in_bytes), "alias_bytes": int(m.alias_size_in_bytes),
           "temp_bytes": int(m.temp_size_in_bytes)}
    # Donated inputs: aliased outputs reuse the argument buffers, so the peak is args + other outputs + temps.
    out["peak_bytes"] = out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"] + out["temp_bytes"]
    return out


# --------------------------------------------------------------------------- output


def accelerator_fit(a: accelerators.Accelerator, needed: int, reserve: float) -> dict[str, Any]:
    """Whether `needed` bytes per device fit in (1 - reserve) of the chip's memory."""
    usable = a.memory_bytes * (1 - reserve)
    return {"accelerator": a.name, "memory_bytes": a.memory_bytes, "usable_bytes": int(usable),
            "bytes_per_device": needed, "fits": needed <= usable, "fraction_of_memory": needed / a.memory_bytes}


def fits_table(plan: dict[str, Any], brief: bool) -> str:
    """One row per accelerator (only the chosen one when brief), the chosen one marked."""
    chosen = plan["accelerator"]
    rows = []
    for f in ([chosen] if brief and chosen else plan["all_accelerators"]):
        a = accelerators.ACCELERATORS[f["accelerator"]]
        mark = "<-" if chosen and chosen["accelerator"] == a.name else ""
        rows.append([a.name, a.memory_label, f"{100 * f['fraction_of_memory']:.0f}%", "yes" if f["fits"] else "NO", mark])
    return _table(rows, ["accelerator", "memory", "used", "fits", ""])


def estimate_vs_xla(pairs: dict[str, tuple[str, int, int]]) -> dict[str, float]:
    """Ratios estimate / compiler, one per `key: (label, estimate bytes, XLA bytes)` pair."""
    return {key: estimate / max(xla, 1) for key, (_, estimate, xla) in pairs.items()}


def estimate_vs_xla_table(pairs: dict[str, tuple[str, int, int]], plan: dict[str, Any], xla: dict[str, Any]) -> str:
    """The compared quantities side by side, then the whole estimate against XLA's peak."""
    rows = [[label, _gib(estimate), _gib(x)] for label, estimate, x in pairs.values()]
    rows.append(["peak", _gib(plan["total_bytes_per_device"]), _gib(xla["peak_bytes"])])
    return _table(rows, ["estimate vs compiler, per device", "estimate", f"XLA ({xla['backend']})"])


def emit(args, plan: dict[str, Any], xla: dict[str, Any] | None, render: Callable[..., str]) -> None:
    """Prints the plan: one JSON object with --json, else `render`'s tables."""
    if args.json:
        print(json.dumps({"preset": args.preset, **plan}))
    else:
        print(render(plan, args.preset, xla, brief=args.brief))


def _path_str(path) -> str:
    return "/".join(p for p in path_str(path).split(".") if p != "value")


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def _gib(n: float) -> str:
    return f"{n / 2**30:,.2f} GiB" if n >= 2**26 else f"{n / 2**20:,.2f} MiB"


def _table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])

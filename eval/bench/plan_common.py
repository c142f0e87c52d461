"""What the training and the inference planners share: mesh sizes, abstract meshes, table printing."""

from __future__ import annotations

import math
from typing import Sequence

from chameleon_jax import configlib
from chameleon_jax.checkpoint import path_str
from chameleon_jax.config import MeshConfig

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
    """'data=2,fsdp=4,sequence=2,tensor=1' (any MeshConfig size field; unnamed in-slice sizes are 1)."""
    cfg = MeshConfig(data=1, fsdp=1, sequence=1, tensor=1)
    items = [s.strip() for s in text.split(",") if s.strip()]
    if not items:
        raise configlib.ConfigError("--mesh needs sizes like data=2,fsdp=4,tensor=1")
    return configlib.apply_overrides(cfg, items)


def abstract_mesh(sizes: dict[str, int]):
    from jax.sharding import AbstractMesh

    return AbstractMesh(tuple(sizes.get(a, 1) for a in MESH_AXES), MESH_AXES)


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

"""Joining a multi-process run (`jax.distributed`) from a generation or evaluation entry point.

The same switch and fields as training (`train.lm`): `distributed=auto` joins when
`num_processes > 1`, a `coordinator_address` or `$JAX_COORDINATOR_ADDRESS` is set;
`on` always joins (cluster auto-detection); `off` never does. It must run before any
other JAX call. On CPU the processes talk through gloo.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Literal

from chameleon_jax.configlib import param

_JOINED = False


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """How this process joins a multi-process run."""

    distributed: Literal["auto", "on", "off"] = param(
        "auto", "jax.distributed.initialize(): on = always, auto = when num_processes > 1, a coordinator_address "
                "or $JAX_COORDINATOR_ADDRESS is set, off = never")
    coordinator_address: str = param("", "host:port of process 0 for multi-process runs")
    num_processes: int = param(0, "number of processes of a multi-process run; 0 = auto-detect")
    process_id: int = param(-1, "this process's index in a multi-process run; -1 = auto-detect")


def maybe_initialize(cfg: DistributedConfig) -> None:
    """`jax.distributed.initialize` when `cfg` asks for a multi-process run (once per process).

    `cfg` is any config with the four fields of `DistributedConfig` (`train.lm`'s too).
    """
    global _JOINED
    if _JOINED or cfg.distributed == "off":
        return
    wanted = cfg.distributed == "on" or cfg.num_processes > 1 or bool(cfg.coordinator_address) or bool(
        os.environ.get("JAX_COORDINATOR_ADDRESS"))
    if not wanted:
        return
    import jax

    kwargs: dict[str, Any] = {}
    if cfg.coordinator_address:
        kwargs["coordinator_address"] = cfg.coordinator_address
    if cfg.num_processes > 0:
        kwargs["num_processes"] = cfg.num_processes
    if cfg.process_id >= 0:
        kwargs["process_id"] = cfg.process_id
    if os.environ.get("JAX_PLATFORMS", "").startswith("cpu"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**kwargs)
    _JOINED = True


def is_primary() -> bool:
    """True on the process that writes results (process 0, or the only one)."""
    import jax

    return jax.process_index() == 0

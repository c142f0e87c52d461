"""Accelerator specifications used by the memory planner and the GPU check.

Figures are the vendors' published per-chip numbers (one JAX device each): memory
capacity, HBM bandwidth, and dense (no sparsity) bf16 matmul peak. A TPU v4/v5p
chip has two TensorCores presented as one device, so a `v5p-8` slice is 4 devices;
v5e and v6e slices are named by chip count (`v5e-8` = 8 devices).
"""

from __future__ import annotations

import dataclasses

GiB = 2**30
GB = 10**9


@dataclasses.dataclass(frozen=True)
class Accelerator:
    name: str
    memory_bytes: int
    hbm_bandwidth: float  # bytes per second
    peak_bf16_flops: float  # dense FLOP/s
    device_kinds: tuple[str, ...]  # lowercase substrings of `jax.Device.device_kind` that identify it
    memory_label: str  # the capacity as the vendor states it

    @property
    def backend(self) -> str:
        """The JAX backend that drives it ("tpu" or "gpu")."""
        return "tpu" if self.name.startswith("v") else "gpu"

    def describe(self) -> str:
        return (f"{self.name}: {self.memory_label}, {self.hbm_bandwidth / 1e12:.2f} TB/s HBM, "
                f"{self.peak_bf16_flops / 1e12:.0f} TFLOP/s bf16")


ACCELERATORS: dict[str, Accelerator] = {
    a.name: a
    for a in (
        Accelerator("v4", 32 * GiB, 1228e9, 275e12, ("tpu v4",), "32 GiB"),
        Accelerator("v5e", 16 * GiB, 819e9, 197e12, ("tpu v5 lite", "tpu v5e"), "16 GiB"),
        Accelerator("v5p", 95 * GiB, 2765e9, 459e12, ("tpu v5p", "tpu v5"), "95 GiB"),
        Accelerator("v6e", 32 * GiB, 1640e9, 918e12, ("tpu v6 lite", "tpu v6e"), "32 GiB"),
        Accelerator("a100", 80 * GB, 2039e9, 312e12, ("a100",), "80 GB"),
        Accelerator("h100", 80 * GB, 3350e9, 989e12, ("h100",), "80 GB"),
        Accelerator("h200", 141 * GB, 4800e9, 989e12, ("h200",), "141 GB"),
    )
}

ALIASES = {"tpu-v4": "v4", "tpu-v5e": "v5e", "v5litepod": "v5e", "tpu-v5p": "v5p", "tpu-v6e": "v6e",
           "trillium": "v6e", "h100-sxm": "h100", "a100-80gb": "a100"}


def get(name: str) -> Accelerator:
    """Looks up an accelerator by name (case-insensitive); a clear error lists the known ones."""
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key not in ACCELERATORS:
        raise KeyError(f"unknown accelerator {name!r}; known: {', '.join(ACCELERATORS)}")
    return ACCELERATORS[key]


def detect(device_kind: str) -> Accelerator | None:
    """The table entry matching a `jax.Device.device_kind` string, or None (CPU, unknown chips).

    PCIe H100s have lower bandwidth and peak than the SXM part in the table, so they are
    not matched rather than matched wrongly.
    """
    kind = device_kind.lower()
    if "pcie" in kind:
        return None
    # Longer (more specific) patterns first: "tpu v5 lite" before "tpu v5".
    candidates = sorted(((p, a) for a in ACCELERATORS.values() for p in a.device_kinds), key=lambda x: -len(x[0]))
    for pattern, acc in candidates:
        if pattern in kind:
            return acc
    return None

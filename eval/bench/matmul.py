"""Matmul throughput by operand and result dtype: does this machine have a fast bf16 path?

    python -m eval.bench.matmul                                  # the demo transformer's projections
    python -m eval.bench.matmul shapes=2048x2048x2048 repeats=20

For each `MxKxN` in `shapes` a jitted [M, K] x [K, N] dot on the default device runs in
float32, in bf16 with a float32 result (what `model.matmul_dtype=bfloat16` and a bf16 model
compute), and in bf16 with a bf16 result; the figure is GFLOP/s, the best of `repeats`
timed calls. On CPUs with AMX, XLA's bf16 x bf16 -> f32 dot is several times faster than
float32, while bf16 -> bf16 is slower than float32: the first row says whether
`model.matmul_dtype=bfloat16` pays on a machine.
"""

from __future__ import annotations

import dataclasses
import time

from chameleon_jax import configlib
from chameleon_jax.configlib import param
from eval.bench import json_main

# (name, operand dtype, result dtype)
KINDS = (("f32", "float32", "float32"), ("bf16->f32", "bfloat16", "float32"), ("bf16->bf16", "bfloat16", "bfloat16"))


@dataclasses.dataclass(frozen=True)
class BenchMatmulConfig:
    """Which products to time."""

    shapes: str = param("6144x192x576,6144x576x192,6144x192x896",
                        "MxKxN products, comma-separated (default: the demo transformer's projections over one "
                        "32 x 192 batch)")
    repeats: int = param(20, "timed calls per product and dtype (after one untimed); the best counts")
    out: str = param("", "also write the figures as JSON here")


def parse_shapes(text: str) -> list[tuple[int, int, int]]:
    """'6144x192x576,64x64x64' -> [(6144, 192, 576), (64, 64, 64)]; a clear error for anything else."""
    out = []
    for item in (s.strip() for s in text.split(",") if s.strip()):
        parts = item.lower().split("x")
        if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise configlib.ConfigError(f"shapes: {item!r} is not MxKxN with three positive integers")
        out.append(tuple(int(p) for p in parts))
    if not out:
        raise configlib.ConfigError("shapes: give at least one MxKxN product")
    return out


def gflops(m: int, k: int, n: int, operand: str, result: str, repeats: int) -> float:
    """GFLOP/s of the best of `repeats` jitted [m, k] x [k, n] dots."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.standard_normal((m, k), np.float32), operand)
    b = jnp.asarray(rng.standard_normal((k, n), np.float32), operand)
    f = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.dtype(result)))
    f(a, b).block_until_ready()
    best = float("inf")
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        f(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * m * k * n / best / 1e9


def bench(cfg: BenchMatmulConfig) -> list[dict]:
    import jax

    shapes, rows = parse_shapes(cfg.shapes), []
    print(f"device {jax.devices()[0].device_kind} ({jax.default_backend()}); GFLOP/s, best of {cfg.repeats}")
    print(f"{'M x K x N':<20}" + "".join(f"{name:>12}" for name, _, _ in KINDS) + f"{'bf16->f32 / f32':>18}")
    for m, k, n in shapes:
        row = {"shape": [m, k, n]}
        for name, operand, result in KINDS:
            row[name] = gflops(m, k, n, operand, result, cfg.repeats)
        row["bf16_f32_speedup"] = row["bf16->f32"] / row["f32"]
        rows.append(row)
        print(f"{f'{m} x {k} x {n}':<20}" + "".join(f"{row[name]:12.1f}" for name, _, _ in KINDS)
              + f"{row['bf16_f32_speedup']:17.2f}x", flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    json_main(argv, {"default": BenchMatmulConfig}, "default", bench)


if __name__ == "__main__":
    main()

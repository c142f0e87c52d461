"""Reading stored Shapes records: the builder's own parser against TFDS's generic decoder.

    python -m eval.bench.records                       # 20000 records of the 32 px train split
    python -m eval.bench.records image_size=64 records=5000

Both read the same records, in blocks of `TfdsSource.read_block`, from a build of the
split under the data folder (built first if none holds enough records); the figures are microseconds a record,
read and decoded, and their ratio, measured in one process back to back (alternating
rounds, so a drift of the machine's speed falls on both).
"""

from __future__ import annotations

import dataclasses
import time

from chameleon_jax.configlib import ConfigError, param
from eval.bench import json_main


@dataclasses.dataclass(frozen=True)
class BenchRecordsConfig:
    """What to read."""

    image_size: int = param(32, "Shapes picture size of the split to read")
    split: str = param("train", "Shapes split")
    records: int = param(20000, "records read per round by each decoder")
    rounds: int = param(3, "rounds of each decoder, alternating; the figures are each one's best round")
    data_dir: str = param("", "Shapes data folder; empty = the default (CHAMELEON_JAX_DATA or <repo>/data)")
    out: str = param("", "also write the figures as JSON here")


def _read_all(src, n: int) -> float:
    start = time.perf_counter()
    for lo in range(0, n, src.read_block):
        src.__getitems__(range(lo, min(lo + src.read_block, n)))
    return time.perf_counter() - start


def bench(cfg: BenchRecordsConfig) -> dict:
    from chameleon_jax.data import shapes

    if cfg.records < 1 or cfg.rounds < 1:
        raise ConfigError(f"records and rounds must be at least 1, got {cfg.records} and {cfg.rounds}")
    # A build holding at least `records` examples of the split is read (its first ones); else one is built.
    sizes = {cfg.split: cfg.records}
    fast = shapes.load(cfg.split, cfg.image_size, cfg.data_dir or None, sizes, backend="tfds")
    generic = shapes.load(cfg.split, cfg.image_size, cfg.data_dir or None, sizes, backend="tfds")
    if not fast._fast:
        raise RuntimeError("the stored records do not parse with the builder's layout; nothing to compare")
    generic._fast = False
    n = len(fast)
    best = {"fast": float("inf"), "tfds": float("inf")}
    for _ in range(cfg.rounds):
        best["fast"] = min(best["fast"], _read_all(fast, n))
        best["tfds"] = min(best["tfds"], _read_all(generic, n))
    out = {
        "records": n,
        "image_size": cfg.image_size,
        "fast_us_per_record": best["fast"] / n * 1e6,
        "tfds_us_per_record": best["tfds"] / n * 1e6,
        "speedup": best["tfds"] / best["fast"],
    }
    print(f"Shapes {cfg.split} {cfg.image_size} px, {n} records, best of {cfg.rounds} rounds each")
    print(f"  builder's parser   {out['fast_us_per_record']:8.1f} us/record")
    print(f"  TFDS's decoder     {out['tfds_us_per_record']:8.1f} us/record")
    print(f"  ratio              {out['speedup']:8.1f}x")
    return out


def main(argv: list[str] | None = None) -> None:
    json_main(argv, {"default": BenchRecordsConfig}, "default", bench)


if __name__ == "__main__":
    main()

"""Padding and packing time of the LM loader's packers on a tokenised shard folder.

    python -m eval.bench.packing shards=runs/demo/lm/tokens/train              # the demo's rows
    python -m eval.bench.packing shards=DIR seq_len=384 rows=16 pack_docs=1,64,512 grain_bins=32
    python -m eval.bench.packing pack_docs=512 grain_bins= read_threads=0,2   # documents read ahead in threads

For each `pack_docs` the training stream of the folder (chameleon_jax.data.grain_pipeline,
seed 0, one process) is read for `batches` batches of `rows` x `seq_len`; the figure is the
share of slots left as padding and the milliseconds a batch takes to build (documents read in
the packing thread; each further `read_threads` setting times the first pack_docs again with
that many read-ahead threads). For each of
`grain_bins` the same documents, in the same order, go through grain's own packers
(`grain.experimental.BestFitPackIterDataset` and `FirstFitPackIterDataset`) for comparison:
those emit all their open rows whenever a document fits none of them.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np

from chameleon_jax import configlib
from chameleon_jax.configlib import param
from eval.bench import json_main


@dataclasses.dataclass(frozen=True)
class BenchPackingConfig:
    """What to pack."""

    shards: str = param("runs/demo/lm/tokens/train", "tokenised shard folder (train.tokenize output)")
    seq_len: int = param(192, "tokens per row")
    rows: int = param(32, "rows per batch")
    pack_docs: str = param("1,512", "the loader's pack_docs settings to measure, comma-separated")
    grain_bins: str = param("32,64", "num_packing_bins of grain's packers to compare, comma-separated; empty = none")
    read_threads: str = param("0", "the loader's read_threads settings to time (with the first pack_docs), comma-separated")
    batches: int = param(600, "batches read per setting (after 5 untimed)")
    out: str = param("", "also write the figures as JSON here")


def _loader(cfg: BenchPackingConfig, docs, pack_docs: int, read_threads: int = 0) -> dict[str, float]:
    from chameleon_jax.data.grain_pipeline import GrainBatches, batches

    it = GrainBatches(batches(docs, cfg.seq_len, 0, "split", cfg.rows, read_threads=read_threads, pack_docs=pack_docs))
    for _ in range(5):
        it.next_local()
    used, t0 = 0, time.perf_counter()
    for _ in range(cfg.batches):
        used += int((it.next_local()["segment_ids"] > 0).sum())
    dt = time.perf_counter() - t0
    return {"padding": 1 - used / (cfg.batches * cfg.rows * cfg.seq_len), "ms_per_batch": 1000 * dt / cfg.batches}


def _grain(cfg: BenchPackingConfig, docs, bins: int, kind: str) -> dict[str, float]:
    import grain

    # About as many documents as the loader read: its slots over the documents' mean length.
    probe = [docs[i].slots for i in range(200)]
    n = int(cfg.batches * cfg.rows * cfg.seq_len / float(np.mean(probe)))
    ds = grain.MapDataset.range(n).map(lambda i: {"ids": np.asarray(docs[i].ids[1:], np.int32)}).to_iter_dataset()
    packer = getattr(grain.experimental, kind)
    rows, used = 0, 0
    for row in packer(ds, length_struct={"ids": cfg.seq_len}, num_packing_bins=bins, shuffle_bins=False):
        rows += 1
        used += int((row["ids_segment_ids"] > 0).sum())
    return {"padding": 1 - used / (rows * cfg.seq_len)}


def bench(cfg: BenchPackingConfig) -> dict:
    if not Path(cfg.shards).is_dir():
        raise configlib.ConfigError(f"shards={cfg.shards} is not a folder (tokenise first: python -m train.tokenize)")
    from chameleon_jax.data.grain_pipeline import document_stream
    from chameleon_jax.data.shards import ShardSet

    docs = document_stream([ShardSet(cfg.shards)], [1.0], 0, 0, 1)  # the training stream: seed 0, one process
    out: dict[str, dict] = {}
    pack = [int(x) for x in cfg.pack_docs.split(",") if x.strip()]
    for p in pack:
        r = out[f"pack_docs={p}"] = _loader(cfg, docs, p)
        print(f"loader pack_docs={p:<5} padding {r['padding']:6.1%}   {r['ms_per_batch']:6.1f} ms a batch of "
              f"{cfg.rows} x {cfg.seq_len}", flush=True)
    for t in (int(x) for x in cfg.read_threads.split(",") if x.strip()):
        if t and pack:
            r = out[f"pack_docs={pack[0]} read_threads={t}"] = _loader(cfg, docs, pack[0], t)
            print(f"loader pack_docs={pack[0]:<5} read_threads={t}: {r['ms_per_batch']:6.1f} ms a batch", flush=True)
    for b in (int(x) for x in cfg.grain_bins.split(",") if x.strip()):
        for kind in ("BestFitPackIterDataset", "FirstFitPackIterDataset"):
            r = out[f"grain {kind} bins={b}"] = _grain(cfg, docs, b, kind)
            print(f"grain {kind:<24} bins={b:<4} padding {r['padding']:6.1%}", flush=True)
    return out


def main(argv: list[str] | None = None) -> None:
    json_main(argv, {"default": BenchPackingConfig}, "default", bench)


if __name__ == "__main__":
    main()

"""Data-path figures: peak memory of tokenising and of loading at growing sizes, loader and encoder speed.

    python -m eval.bench.data                            # 10k, 50k, 200k Shapes documents, 24 px pictures
    python -m eval.bench.data sizes=2000,8000 out=/tmp/bench_data.json

For each size N: `python -m train.tokenize source=shapes shapes_docs=N` (24 px
Shapes pictures drawn on access from `shapes_examples` examples, encoded by a VQ
tokenizer of the `shapes24` architecture with random weights unless vq_dir is
given: the same compute as a trained one) runs in a child process, which
reports its peak RSS and pictures/s; then another child reads the shards through
the grain pipeline (chameleon_jax.data.grain_pipeline) in batches of the `small`
preset (16 rows x 384 tokens) and reports its peak RSS and tokens/s. The loader's
rate is set against what one `small` train step consumes per second on this
machine (eval.bench.train, measured in a third child unless train_tokens_per_s is
given). Peak RSS should not grow with N: nothing holds the whole set.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from chameleon_jax.configlib import ConfigError, param
from eval.bench import json_main


@dataclasses.dataclass(frozen=True)
class BenchDataConfig:
    """What to measure."""

    sizes: str = param("10000,50000,200000", "document counts to tokenise and load, comma-separated")
    vq_dir: str = param("", "tokenizer to encode with; empty = a random-weight `shapes24` VQ model (same cost)")
    shapes_examples: int = param(2000, "distinct Shapes examples the documents draw their pictures from")
    docs_per_shard: int = param(4096, "documents per shard")
    load_batches: int = param(300, "batches read by the loader at each size (after 5 untimed)")
    batch_rows: int = param(16, "rows per batch (the `small` preset's batch)")
    seq_len: int = param(384, "tokens per row (the `small` preset's)")
    workers: int = param(0, "grain worker processes of the loader")
    train_tokens_per_s: float = param(0.0, "tokens/s of one `small` train step here; 0 = measure with eval.bench.train")
    work_dir: str = param("", "folder for the shards; empty = a temporary folder (deleted)")
    out: str = param("", "also write the figures as JSON here")


_TOKENIZE_CHILD = """
import json, resource, sys, time
import train.tokenize as t
t0 = time.perf_counter()
out = t.run(t.configlib.from_cli(sys.argv[1:], t.PRESETS, "default"))
m = json.loads((out / "manifest-00000-of-00001.json").read_text())
print("RESULT", json.dumps({"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                            "seconds": time.perf_counter() - t0, **m["rates"], "documents": m["documents"],
                            "images": m["images"], "tokens": m["tokens"]}))
"""

_LOAD_CHILD = """
import json, resource, sys, time
from chameleon_jax.data.grain_pipeline import ShardData
from chameleon_jax.lm_data import LMDataConfig
from chameleon_jax.sequence import SequenceConfig
shards, rows, seq_len, n, workers = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
if __name__ == "__main__":
    cfg = LMDataConfig(source="shards", shards=shards, workers=workers, sequence=SequenceConfig(seq_len=seq_len))
    it = ShardData.build(cfg).train_iterator(rows)
    for _ in range(5):
        it.next_local()
    t0 = time.perf_counter()
    used = 0
    for _ in range(n):
        used += int((it.next_local()["segment_ids"] > 0).sum())
    dt = time.perf_counter() - t0
    it.close()
    print("RESULT", json.dumps({"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                                "tokens_per_s": n * rows * seq_len / dt, "filled": used / (n * rows * seq_len),
                                "batches_per_s": n / dt}))
"""


def _child(args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(args[:3])} failed:\n{proc.stderr[-3000:]}")
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def random_tokenizer(directory: Path) -> Path:
    """A `shapes24` VQ tokenizer with random weights (the encoder's cost without training one)."""
    from flax import nnx

    import vqvae

    model = vqvae.VQModel(vqvae.VQ_PRESETS["shapes24"](), rngs=nnx.Rngs(0))
    return vqvae.save_tokenizer(model, directory / "vq-random")


def bench(cfg: BenchDataConfig) -> dict:
    try:
        sizes = [int(s) for s in cfg.sizes.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"sizes={cfg.sizes!r}: give document counts as comma-separated integers") from None
    tmp = tempfile.TemporaryDirectory(prefix="bench_data_") if not cfg.work_dir else None
    work = Path(cfg.work_dir or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    vq_dir = cfg.vq_dir or str(random_tokenizer(work))
    rows = []
    for n in sizes:
        out = work / f"tok-{n}"
        tok = _child(["-c", _TOKENIZE_CHILD, "source=shapes", f"shapes_docs={n}", "shapes_split=train",
                      f"shapes_examples={cfg.shapes_examples}", "shapes_backend=generate", "interleaved_weight=0",
                      f"vq_dir={vq_dir}", f"out_dir={out}", f"docs_per_shard={cfg.docs_per_shard}", "progress=false"])
        load = _child(["-c", _LOAD_CHILD, str(out), str(cfg.batch_rows), str(cfg.seq_len), str(cfg.load_batches),
                       str(cfg.workers)])
        rows.append({"documents": n, "tokenize": tok, "load": load})
        print(f"{n:>8} docs | tokenize: peak RSS {tok['peak_rss_mib']:7.0f} MiB, {tok['docs_per_s']:6.0f} docs/s, "
              f"{tok['images_per_s']:6.0f} pictures/s | load: peak RSS {load['peak_rss_mib']:6.0f} MiB, "
              f"{load['tokens_per_s']:9.0f} tokens/s", flush=True)
    train_tps = cfg.train_tokens_per_s
    if not train_tps:
        bench_train = _child(["-c", "import json,sys; from eval.bench.train import bench, BenchTrainConfig; "
                                    "r = bench(BenchTrainConfig(steps=3, warmup_steps=1)); "
                                    "print('RESULT', json.dumps(r))"])
        train_tps = bench_train["tokens_per_s"]

    def spread(key, part):
        values = [r[part][key] for r in rows]
        return max(values) / min(values) - 1

    result = {
        "sizes": rows,
        "tokenize_peak_rss_spread": spread("peak_rss_mib", "tokenize"),
        "load_peak_rss_spread": spread("peak_rss_mib", "load"),
        "load_tokens_per_s_min": min(r["load"]["tokens_per_s"] for r in rows),
        "train_small_tokens_per_s": train_tps,
        "loader_over_train_step": min(r["load"]["tokens_per_s"] for r in rows) / train_tps,
        "tokenize_images_per_s_median": sorted(r["tokenize"]["images_per_s"] for r in rows)[len(rows) // 2],
    }
    print(f"peak RSS spread over sizes: tokenize {result['tokenize_peak_rss_spread']:.1%}, "
          f"load {result['load_peak_rss_spread']:.1%}")
    print(f"loader {result['load_tokens_per_s_min']:.0f} tokens/s against {train_tps:.0f} tokens/s consumed by a "
          f"`small` train step: {result['loader_over_train_step']:.1f}x")
    if tmp is not None:
        tmp.cleanup()
    return result


def main(argv: list[str] | None = None) -> None:
    json_main(argv, {"default": BenchDataConfig}, "default", bench)


if __name__ == "__main__":
    main()

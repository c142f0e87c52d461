"""The packing benchmark: padding shares of the loader's packers and of grain's on one shard folder."""

import numpy as np

from chameleon_jax import configlib
from chameleon_jax.data import Document, Segment, write_jsonl
from eval.bench import packing
from train.tokenize import TokenizeConfig, run


def test_best_fit_blocks_pad_less_than_greedy_rows_and_every_figure_is_a_share(tmp_path):
    rng = np.random.default_rng(0)
    words = "red green blue circle square star left right top bottom small big".split()
    docs = [Document((Segment(text=" ".join(rng.choice(words, int(rng.integers(4, 14))))),)) for _ in range(120)]
    write_jsonl(docs, tmp_path / "d.jsonl")
    run(configlib.from_dict(TokenizeConfig, {"source": "jsonl", "input": str(tmp_path / "d.jsonl"),
                                             "out_dir": str(tmp_path / "tok"), "progress": False,
                                             "text_vocab_size": 64}))
    cfg = packing.BenchPackingConfig(shards=str(tmp_path / "tok"), seq_len=32, rows=4, pack_docs="1,64",
                                     grain_bins="8", batches=20, read_threads="0,2")
    out = packing.bench(cfg)
    assert set(out) == {"pack_docs=1", "pack_docs=64", "pack_docs=1 read_threads=2", "grain BestFitPackIterDataset bins=8",
                        "grain FirstFitPackIterDataset bins=8"}
    # Read-ahead threads hand out the same documents: the same rows, so the same padding.
    assert out["pack_docs=1 read_threads=2"]["padding"] == out["pack_docs=1"]["padding"]
    assert all(0.0 <= r["padding"] < 1.0 for r in out.values())
    assert out["pack_docs=64"]["padding"] < out["pack_docs=1"]["padding"]

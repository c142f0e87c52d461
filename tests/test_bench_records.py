"""The record-reading benchmark runs and prints both decoders' figures."""

import pytest

from eval.bench import records

pytest.importorskip("tensorflow_datasets")


def test_bench_records_reads_both_ways_and_reports_the_ratio(tmp_path, capsys):
    cfg = records.BenchRecordsConfig(split="train", records=12, rounds=1, data_dir=str(tmp_path))
    out = records.bench(cfg)
    assert out["records"] == 12
    assert out["fast_us_per_record"] > 0 and out["tfds_us_per_record"] > 0
    assert out["speedup"] == pytest.approx(out["tfds_us_per_record"] / out["fast_us_per_record"])
    printed = capsys.readouterr().out
    assert "builder's parser" in printed and "TFDS's decoder" in printed


def test_bench_records_refuses_an_empty_read():
    with pytest.raises(records.ConfigError, match="records and rounds"):
        records.bench(records.BenchRecordsConfig(records=0))

import json
import math

from eval.bench import train as bench_train


def test_bench_train_reports_throughput_mfu_and_memory(tmp_path, capsys):
    out = tmp_path / "bench.json"
    bench_train.main([
        "preset=tiny", "steps=2", "warmup_steps=0", "matmul_size=256", "matmul_repeats=2", "matmul_interleaved=1",
        "batch_size=8", "seq_len=64", "cpu_devices=0", f"out={out}",
    ])
    text = capsys.readouterr().out
    for label in ("tokens/s", "model FLOP/s", "matmul peak", "MFU", "memory"):
        assert label in text
    r = json.loads(out.read_text())
    assert r["devices"] == 8 and r["tokens_per_s"] > 0 and r["peak_matmul_flops_per_s"] > 0
    assert 0 < r["mfu"] and math.isfinite(r["mfu"]) and math.isfinite(r["final_loss"])
    from chameleon_jax.config import MODEL_PRESETS
    from chameleon_jax.transformer import flops_per_token

    expected = flops_per_token(MODEL_PRESETS["tiny"](), 64) * r["tokens_per_s"]
    assert math.isclose(r["model_flops_per_s"], expected, rel_tol=1e-6)
    assert math.isclose(r["mfu"], r["model_flops_per_s"] / r["peak_matmul_flops_per_s"], rel_tol=1e-6)
    assert r["host_peak_rss_mib"] > 0 and r["xla_flops_per_s"] > 0


def test_synthetic_batch_packs_documents():
    from eval.bench.synthetic import synthetic_batch

    b = synthetic_batch(2, 12, 50, 3)
    assert b["segment_ids"][0].tolist() == [1] * 4 + [2] * 4 + [3] * 4
    assert b["positions"][0].tolist() == [0, 1, 2, 3] * 3
    assert (b["targets"][:, :-1] == b["tokens"][:, 1:]).all()

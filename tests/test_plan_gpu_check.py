"""eval.bench.gpu_check: its --smoke run on the CPU, and the decode traffic it divides by the bandwidth."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from chameleon_jax.config import MODEL_PRESETS
from chameleon_jax.transformer import count_params
from eval.bench import gpu_check

REPO = Path(__file__).resolve().parent.parent


def test_decode_bytes_count_weights_once_and_the_whole_cache():
    cfg = MODEL_PRESETS["chameleon-7b"]()  # bf16 compute, f32 parameters
    b = gpu_check.decode_bytes_per_step(cfg, batch=4, cache_len=1024)
    assert b["weights"] == count_params(cfg, include_embedding=False) * 4 + 4 * 4096 * 4
    assert b["kv_cache"] == 2 * 32 * 4 * 1024 * 32 * 128 * 2  # k and v, 32 layers, bf16
    assert b["total"] == b["weights"] + b["kv_cache"]


def test_presets_used_by_the_check_have_the_intended_sizes():
    assert 1.0e9 < count_params(gpu_check.plan.presets()["chameleon-1b"]()) < 1.3e9
    assert gpu_check.FULL.decode_preset == "chameleon-7b"


@pytest.mark.slow
def test_smoke_run_prints_one_json_object(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # one CPU device, as on a one-GPU machine
    r = subprocess.run([sys.executable, "-m", "eval.bench.gpu_check", "--smoke", "--out", str(tmp_path / "o.json")],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [l for l in r.stdout.splitlines() if l.strip()]
    assert len(lines) == 1, r.stdout  # stdout holds the JSON and nothing else
    out = json.loads(lines[0])
    assert out == json.loads((tmp_path / "o.json").read_text())
    assert out["errors"] == {} and out["smoke"] is True
    assert out["data_modules_loaded"] == []
    assert out["accelerator"] is None and out["device_kind"] == "cpu"  # no spec for a CPU: no MFU claimed

    train = out["train"]
    assert train["tokens_per_s"] > 0 and train["mfu"] is None and train["mfu_vs_measured_matmul"] > 0
    assert train["tokens_per_s"] == pytest.approx(train["batch"] * train["seq"] / train["step_s_median"])
    assert train["planned_bytes_per_device"] > 0

    runs = out["decode"]["runs"]
    assert [r["batch"] for r in runs] == [1, 2]
    for run in runs:
        assert run["tokens_per_s"] > 0 and run["hbm_fraction"] is None
        assert run["tokens_per_s"] == pytest.approx(run["batch"] * 1e3 / run["step_ms"])
        assert run["bytes_per_step"] == run["weight_bytes_per_step"] + run["kv_bytes_per_step"]

    jac = out["jacobi_tiny"]
    assert (jac["codes"], jac["window"]) == (gpu_check.SMOKE.jacobi_codes, gpu_check.SMOKE.jacobi_window)
    assert [r["guidance"] for r in jac["runs"]] == ["plain", "guided"]
    for run in jac["runs"]:
        # Sequential: the prefill and one pass a code, then <eoi>; Jacobi verifies up to a window a pass.
        assert run["sequential_passes"] == jac["codes"] + 2
        assert jac["codes"] / jac["window"] <= run["jacobi_passes"] <= run["sequential_passes"]
        assert run["speedup"] == pytest.approx(run["sequential_s"] / run["jacobi_s"])


def test_bench_vocabulary_keeps_specials_codes_and_text_apart():
    vocab = gpu_check.bench_vocabulary(512, codebook_size=256)
    assert vocab.codebook_size == 256 and vocab.image_token_mask.sum() == 256
    assert not (vocab.image_token_mask & vocab.text_token_mask).any()
    assert vocab.text_token_mask.sum() == 512 - 6 - 256 + 2  # text pieces, eos and eot
    with pytest.raises(gpu_check.configlib.ConfigError, match="cannot hold"):
        gpu_check.bench_vocabulary(300, codebook_size=300)

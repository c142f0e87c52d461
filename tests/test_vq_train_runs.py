"""Tokenizer training runs: a finished run is reused, a different model is refused, overwrite retrains."""

import dataclasses

import pytest

from chameleon_jax import configlib
from train import vqvae as train_vq
from train.metrics import read_metrics


def _cfg(run_dir, *overrides):
    # decay_steps fixes the schedule so runs of different lengths share one compiled step.
    base = ["optim.decay_steps=100", "tensorboard=false", f"run_dir={run_dir}"]
    return configlib.apply_overrides(train_vq.PRESETS["tiny"](), base + list(overrides))


def test_finished_run_is_reused_and_overwrite_retrains(tmp_path, capsys):
    cfg = _cfg(tmp_path / "run", "steps=2")
    run = train_vq.run(cfg)
    stamp = (run / "tokenizer" / "tokenizer.json").stat().st_mtime_ns
    train_vq.run(cfg)
    assert "reusing the finished tokenizer" in capsys.readouterr().err
    assert (run / "tokenizer" / "tokenizer.json").stat().st_mtime_ns == stamp
    other = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, codebook_size=32))
    with pytest.raises(configlib.ConfigError, match="different model.*codebook_size: 64 -> 32"):
        train_vq.run(other)
    train_vq.run(dataclasses.replace(cfg, overwrite=True))
    assert (run / "tokenizer" / "tokenizer.json").stat().st_mtime_ns != stamp
    assert [r["step"] for r in read_metrics(run)] == [1, 2]  # a fresh run, not appended to the old one

"""Tokenizer training runs: a finished run is reused, a different model is refused, overwrite retrains;
the folder data source."""

import dataclasses

import numpy as np
import pytest

from chameleon_jax import configlib
from train import vqvae as train_vq
from train.metrics import read_metrics


def _cfg(run_dir, *overrides):
    # decay_steps fixes the schedule so runs of different lengths share one compiled step.
    base = ["optim.decay_steps=100", "tensorboard=false", f"run_dir={run_dir}"]
    return configlib.apply_overrides(train_vq.PRESETS["tiny"](), base + list(overrides))


def test_finished_run_is_reused_and_overwrite_retrains(tmp_path, caplog):
    cfg = _cfg(tmp_path / "run", "steps=2")
    run = train_vq.run(cfg)
    stamp = (run / "tokenizer" / "tokenizer.json").stat().st_mtime_ns
    with caplog.at_level("INFO", logger="train.vqvae"):
        train_vq.run(cfg)
    assert "reusing the finished tokenizer" in caplog.text
    assert (run / "tokenizer" / "tokenizer.json").stat().st_mtime_ns == stamp
    other = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, codebook_size=32))
    with pytest.raises(configlib.ConfigError, match="different model.*codebook_size: 64 -> 32"):
        train_vq.run(other)
    train_vq.run(dataclasses.replace(cfg, overwrite=True))
    assert (run / "tokenizer" / "tokenizer.json").stat().st_mtime_ns != stamp
    assert [r["step"] for r in read_metrics(run)] == [1, 2]  # a fresh run, not appended to the old one


def test_folder_source_centre_crops_and_resizes(tmp_path):
    from PIL import Image

    for i, (w, h) in enumerate([(40, 20), (20, 40), (16, 16)]):
        pic = np.zeros((h, w, 3), np.uint8)
        pic[h // 2 - 4 : h // 2 + 4, w // 2 - 4 : w // 2 + 4] = (200, 10, 10)  # a red centre survives the crop
        Image.fromarray(pic).save(tmp_path / f"{i}.png")
    data = train_vq.VQDataConfig(source="folder", data_dir=str(tmp_path))
    images = train_vq.load_images(data, "train", 16)
    assert images.shape == (3, 16, 16, 3) and images.dtype == np.uint8
    assert (images[:, 8, 8, 0] > 150).all()
    with pytest.raises(configlib.ConfigError, match="data.data_dir"):
        train_vq.load_images(train_vq.VQDataConfig(source="folder"), "train", 16)


def test_checkpoint_every_zero_saves_only_the_last_step_and_log_every_zero_is_refused(tmp_path):
    run = train_vq.run(_cfg(tmp_path / "run", "steps=3", "checkpoint_every=0", "sample_every=0"))
    assert sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == [3]
    with pytest.raises(configlib.ConfigError, match="log_every must be >= 1"):
        train_vq.run(_cfg(tmp_path / "other", "steps=3", "log_every=0"))

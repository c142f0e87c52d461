"""Tokenizer training: the loss falls, resuming is exact."""

import json

import numpy as np

from chameleon_jax import configlib
from train import vqvae as train_vq
from train.metrics import read_metrics
from vqvae import load_tokenizer


def _cfg(run_dir, *overrides):
    # decay_steps fixes the schedule so runs of different lengths share one compiled step.
    base = ["optim.decay_steps=100", "tensorboard=false", f"run_dir={run_dir}"]
    return configlib.apply_overrides(train_vq.PRESETS["tiny"](), base + list(overrides))


def test_training_reduces_loss_and_exports_a_tokenizer(tmp_path):
    run = train_vq.run(_cfg(tmp_path / "run", "steps=40"))
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == list(range(1, 41))
    first = np.mean([r["recon"] for r in rows[:5]])
    last = np.mean([r["recon"] for r in rows[-5:]])
    assert last < 0.7 * first, (first, last)
    tok = load_tokenizer(run / "tokenizer")
    assert tok.grid == (4, 4) and tok.meta["step"] == 40
    images = train_vq.synthetic_images(4, 16, seed=9)
    assert tok.decode(tok.encode(images)).shape == images.shape
    assert list((run / "samples").glob("*.png"))
    saved = configlib.load(train_vq.VQTrainConfig, run / "config.json")
    assert saved.steps == 40 and saved.model == tok.config
    headline = json.loads((run / "metrics.json").read_text())
    assert headline["vq_train_steps"] == 40


def test_resume_gives_the_same_next_loss(tmp_path):
    straight = train_vq.run(_cfg(tmp_path / "straight", "steps=3"))
    train_vq.run(_cfg(tmp_path / "resumed", "steps=2"))
    resumed = train_vq.run(_cfg(tmp_path / "resumed", "steps=3"))  # restarts from the step-2 checkpoint
    a, b = read_metrics(straight), read_metrics(resumed)
    assert [r["step"] for r in b] == [1, 2, 3]
    for key in ("loss", "recon", "commit", "usage"):
        np.testing.assert_allclose(b[2][key], a[2][key], rtol=1e-5, err_msg=key)
    ta, tb = load_tokenizer(straight), load_tokenizer(resumed)
    images = train_vq.synthetic_images(4, 16, seed=3)
    np.testing.assert_array_equal(ta.encode(images), tb.encode(images))

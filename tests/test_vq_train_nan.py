"""A diverging tokenizer run stops with a clear error and leaves its last good checkpoint."""

import jax.numpy as jnp
import pytest

from chameleon_jax import configlib
from train import vqvae as train_vq
from vqvae import losses


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    # The extra-loss hook sees the step: finite for two steps, then NaN.
    losses.register_extra_loss("test_nan_from_step_2", lambda x, y, step: jnp.where(step >= 2, jnp.nan, 0.0))
    run_dir = tmp_path / "run"
    cfg = configlib.apply_overrides(train_vq.PRESETS["tiny"](), [
        f"run_dir={run_dir}", "steps=4", "checkpoint_every=2", "tensorboard=false",
        "extra_loss=test_nan_from_step_2", "extra_loss_weight=1.0",
    ])
    with pytest.raises(train_vq.TrainingDivergedError, match="loss became nan at step 3.*checkpoint is step 2"):
        train_vq.run(cfg)
    assert sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()) == [2]
    assert not (run_dir / "tokenizer").exists()

"""The sharded train step computes the same thing on a (data, fsdp, tensor) mesh as on one device."""

import jax
import numpy as np
import pytest

from chameleon_jax.config import MeshConfig, ModelConfig
from chameleon_jax.sharding import build_mesh
from train.optim import OptimConfig, decay_mask, make_optimizer, make_schedule
from train.step import Trainer

RULES = MeshConfig().rules
OPTIM = OptimConfig(lr=1e-2, warmup_steps=1, decay_steps=10)


def _batch(step: int, rows: int = 8, seq: int = 32, vocab: int = 512):
    rng = np.random.default_rng(step)
    ids = rng.integers(0, vocab, (rows, seq + 1)).astype(np.int32)
    cut = rng.integers(4, seq - 4, rows)
    seg = np.where(np.arange(seq)[None] < cut[:, None], 1, 2).astype(np.int32)
    seg[:, -2:] = 0  # padding
    pos = np.where(seg == 1, np.arange(seq)[None], np.arange(seq)[None] - cut[:, None]).astype(np.int32)
    pos[seg == 0] = 0
    return {
        "tokens": ids[:, :-1], "targets": ids[:, 1:], "positions": pos, "segment_ids": seg,
        "loss_weights": (seg > 0).astype(np.float32) * rng.choice([0.5, 1.0], (rows, seq)).astype(np.float32),
        "modality": rng.integers(0, 2, (rows, seq)).astype(np.int8),
    }


def _losses(mesh, grad_accum: int = 1, steps: int = 3):
    cfg = ModelConfig()
    trainer = Trainer(cfg, make_optimizer(OPTIM, 10), mesh, RULES, schedule=make_schedule(OPTIM, 10),
                      grad_accum=grad_accum, seed=0)
    state = trainer.init_state()
    losses, image_losses = [], []
    for step in range(steps):
        # One batch over and over: the loss must fall, and the comparison sees the same data.
        batch = {k: jax.device_put(v, trainer.batch_sharding(v.shape)) for k, v in _batch(0).items()}
        state, metrics = trainer.train_step(state, batch)
        losses.append(float(metrics["loss"]))
        image_losses.append(float(metrics["image_loss"]))
    return trainer, state, np.array(losses), np.array(image_losses)


@pytest.fixture(scope="module")
def single_device():
    return _losses(build_mesh(MeshConfig(), devices=jax.devices()[:1]))


def test_mesh_2x2x2_matches_single_device(single_device):
    assert jax.device_count() == 8
    trainer, state, losses, image_losses = _losses(build_mesh(MeshConfig(data=2, fsdp=2, tensor=2)))
    _, _, ref, ref_image = single_device
    np.testing.assert_allclose(losses, ref, atol=1e-5, rtol=0)
    np.testing.assert_allclose(image_losses, ref_image, atol=1e-5, rtol=0)
    assert losses[-1] < losses[0]
    # The state really is sharded: some weight is split over fsdp and tensor, and so is its Adam moment.
    specs = {str(x.sharding.spec) for x in jax.tree.leaves(state["params"])}
    assert any("fsdp" in s and "tensor" in s for s in specs)
    mu_specs = {str(x.sharding.spec) for x in jax.tree.leaves(state["opt_state"]) if x.ndim >= 2}
    assert any("fsdp" in s for s in mu_specs)


def test_gradient_accumulation_matches_one_big_batch(single_device):
    _, _, losses, _ = _losses(build_mesh(MeshConfig(), devices=jax.devices()[:1]), grad_accum=2)
    np.testing.assert_allclose(losses, single_device[2], atol=1e-5, rtol=0)


def test_no_weight_decay_on_norms_and_biases(single_device):
    trainer, state, _, _ = single_device
    flags = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(decay_mask(state["params"]))}
    assert any(v for k, v in flags.items() if "wq" in k)
    assert not any(v for k, v in flags.items() if "norm" in k or "bias" in k)


def test_dropout_trains_and_draws_fresh_masks_each_step():
    mesh = build_mesh(MeshConfig(), devices=jax.devices()[:1])
    batch = {k: jax.device_put(v) for k, v in _batch(0).items()}

    def run(dropout: float, grad_accum: int = 1):
        trainer = Trainer(ModelConfig(dropout=dropout), make_optimizer(OPTIM, 10), mesh, RULES,
                          schedule=make_schedule(OPTIM, 10), grad_accum=grad_accum, seed=0)
        state = trainer.init_state()
        evals = [float(trainer.eval_sums(state, batch)["loss_sum"])]
        state, m = trainer.train_step(state, batch)
        return float(m["loss"]), evals[0], m

    loss_drop, eval_drop, m = run(0.5)
    loss_plain, eval_plain, _ = run(0.0)
    assert np.isfinite(loss_drop) and np.isfinite(float(m["grad_norm"]))
    assert eval_drop == pytest.approx(eval_plain)  # evaluation runs without dropout
    assert abs(loss_drop - loss_plain) > 1e-3  # training runs with it
    loss_accum, _, _ = run(0.5, grad_accum=2)
    assert np.isfinite(loss_accum)

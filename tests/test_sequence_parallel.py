"""Context parallelism: the `sequence` mesh axis splits each row's tokens and attention runs as a ring.

Everything is compared with the same computation on one device, on packed rows (several
segments per row, restarted positions, padding).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from chameleon_jax import sharding as shd
from chameleon_jax.config import MeshConfig, ModelConfig
from chameleon_jax.transformer import Transformer
from tests.test_train_lm_sharding import _batch, _losses

CFG = ModelConfig(num_layers=1, num_kv_heads=2, max_seq_len=64)


def _loss_and_grads(model, batch):
    def loss(params, rest):
        logits_btv = nnx.merge(graphdef, params, rest)(batch["tokens"], batch["positions"], batch["segment_ids"])
        logp_btv = jax.nn.log_softmax(logits_btv)
        nll = -jnp.take_along_axis(logp_btv, batch["targets"][..., None], -1)[..., 0]
        return jnp.sum(nll * batch["loss_weights"]) / jnp.sum(batch["loss_weights"]), logits_btv

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return jax.jit(jax.value_and_grad(loss, has_aux=True)), params, rest


@pytest.fixture(scope="module")
def unsharded():
    model = Transformer(CFG, rngs=nnx.Rngs(0))
    batch = {k: jnp.asarray(v) for k, v in _batch(0, rows=4, seq=64).items()}
    fn, params, rest = _loss_and_grads(model, batch)
    (loss, logits), grads = fn(params, rest)
    return model, batch, loss, logits, grads


@pytest.mark.parametrize("mesh_cfg", [MeshConfig(data=2, sequence=4), MeshConfig(data=1, sequence=8)],
                         ids=["data2_seq4", "seq8"])
def test_ring_attention_model_matches_unsharded_logits_loss_and_gradients(unsharded, mesh_cfg):
    model, batch, ref_loss, ref_logits, ref_grads = unsharded
    mesh = shd.build_mesh(mesh_cfg)
    fn, params, rest = _loss_and_grads(model, batch)
    with shd.use_mesh(mesh, mesh_cfg.rules):
        compiled = fn.lower(params, rest).compile()
    (loss, logits), grads = compiled(params, rest)
    # The ring ran: keys and values travel between devices with collective permutes.
    assert "collective-permute" in compiled.as_text()
    # Activations are split over the sequence axis: the logits come back sharded by tokens.
    assert logits.sharding.spec[1] == "sequence"
    assert logits.addressable_shards[0].data.shape[1] == 64 // mesh_cfg.sequence
    np.testing.assert_allclose(loss, ref_loss, atol=1e-5, rtol=0)
    np.testing.assert_allclose(logits, ref_logits, atol=1e-5, rtol=0)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_ring_is_used_only_where_the_rules_split_tokens():
    from chameleon_jax.kernels import sequence_split

    q_shape, kv_shape = (4, 64, 4, 16), (4, 64, 2, 16)
    assert sequence_split(q_shape, kv_shape) is None  # no mesh active
    for mesh_cfg, ring in [(MeshConfig(data=8), False), (MeshConfig(data=2, sequence=4), True)]:
        with shd.use_mesh(shd.build_mesh(mesh_cfg), mesh_cfg.rules):
            assert (sequence_split(q_shape, kv_shape) is not None) == ring
            assert sequence_split((4, 63, 4, 16), (4, 63, 2, 16)) is None  # 63 tokens do not split 4 ways


@pytest.mark.slow
def test_train_step_with_sequence_parallelism_matches_one_device():
    _, _, ref, _ = _losses(shd.build_mesh(MeshConfig(), devices=jax.devices()[:1]), steps=2)
    trainer, state, losses, _ = _losses(shd.build_mesh(MeshConfig(data=2, sequence=4)), steps=2)
    assert trainer.batch_sharding((8, 32)).spec[1] == "sequence"  # the batch arrives split by tokens
    np.testing.assert_allclose(losses, ref, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_train_lm_with_a_sequence_axis_resumes_exactly(tmp_path):
    """train.lm on a data=2 x sequence=4 mesh: stopping at step 2 and resuming gives the uninterrupted losses."""
    from tests.test_train_lm_resume import _losses as logged_losses, small_run
    from train.lm import run

    mesh = ("mesh.data=2", "mesh.sequence=4")
    straight = run(small_run(tmp_path / "straight", "steps=4", *mesh))
    resumed = tmp_path / "resumed"
    run(small_run(resumed, "steps=2", *mesh))
    run(small_run(resumed, "steps=4", *mesh))
    a, b = logged_losses(straight), logged_losses(resumed)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    np.testing.assert_array_equal([a[s] for s in range(1, 5)], [b[s] for s in range(1, 5)])

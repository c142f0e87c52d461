"""Gradients summed per device in one all-reduce, and the optimizer on flat vectors, match the plain step."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from chameleon_jax import data_parallel
from train import vqvae as train_vq
from train.optim import OptimConfig, make_optimizer


def _mesh(shape, names):
    return Mesh(np.asarray(jax.devices()[: int(np.prod(shape))]).reshape(shape), names)


def test_pure_data_parallel_needs_replicated_state_and_rows_over_every_device():
    mesh = _mesh((4, 2), ("data", "fsdp"))
    replicated = {"w": NamedSharding(mesh, P())}
    sharded = {"w": NamedSharding(mesh, P("fsdp"))}
    assert data_parallel.pure_data_parallel(mesh, replicated, P(("data", "fsdp"), None))
    assert not data_parallel.pure_data_parallel(mesh, sharded, P(("data", "fsdp"), None))
    assert not data_parallel.pure_data_parallel(mesh, replicated, P("data", "fsdp"))  # rows over 4 of 8 devices
    assert not data_parallel.pure_data_parallel(_mesh((1,), ("data",)), replicated, P("data"))
    # An axis of size 1 splits nothing.
    seq = _mesh((8, 1), ("data", "sequence"))
    assert data_parallel.pure_data_parallel(seq, {"w": NamedSharding(seq, P())}, P("data", "sequence"))

    assert data_parallel.use_flat_sum("auto", mesh, replicated, P(("data", "fsdp")))  # CPU devices
    assert not data_parallel.use_flat_sum("xla", mesh, replicated, P(("data", "fsdp")))
    assert not data_parallel.use_flat_sum("auto", mesh, sharded, P(("data", "fsdp")))
    with pytest.raises(ValueError, match="purely data-parallel"):
        data_parallel.use_flat_sum("flat", mesh, sharded, P(("data", "fsdp")))
    with pytest.raises(ValueError, match="grad_sum must be one of"):
        data_parallel.use_flat_sum("fast", mesh, replicated, P("data"))


def test_shard_sums_adds_up_each_devices_sums():
    mesh = _mesh((8,), ("data",))
    x = jnp.arange(16 * 3, dtype=jnp.float32).reshape(16, 3)
    w = jnp.array([1.0, -2.0, 0.5])

    def fn(w, rows):
        loss = lambda w: jnp.sum((rows @ w) ** 2)
        return {"grad": jax.grad(loss)(w), "n": jnp.float32(rows.shape[0]), "count": jnp.int32(rows.shape[0])}, w * 2

    sums, same = jax.jit(data_parallel.shard_sums(fn, mesh, P("data")))(w, jax.device_put(x, NamedSharding(mesh, P("data"))))
    whole, _ = fn(w, x)
    np.testing.assert_allclose(sums["grad"], whole["grad"], rtol=1e-5)
    assert float(sums["n"]) == 16 and int(sums["count"]) == 16 and sums["count"].dtype == jnp.int32
    np.testing.assert_array_equal(same, w * 2)


def test_flat_optimizer_gives_the_tree_optimizers_updates_with_its_decay_mask():
    params = {"dense": {"kernel": jnp.ones((3, 4)), "bias": jnp.ones((4,))},
              "norm": {"scale": jnp.ones((4,))}, "embed": jnp.full((5, 3), 2.0)}
    grads = jax.tree.map(lambda p: jnp.linspace(-1.0, 1.0, p.size).reshape(p.shape), params)
    def train(cfg, flat):
        tx = make_optimizer(cfg, 10, flat=flat)
        state, p = tx.init(params), params
        for _ in range(3):
            updates, state = tx.update(grads, state, p)
            p = optax.apply_updates(p, updates)
        return p, state

    cfg = OptimConfig(lr=0.1, warmup_steps=0, weight_decay=0.5, clip_norm=0.3)
    (tree, _), (flat, state) = train(cfg, False), train(cfg, True)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), tree, flat)
    # Decay reaches the matrices and spares the bias and the norm's scale.
    undecayed, _ = train(dataclasses.replace(cfg, weight_decay=0.0), True)
    for path, decays in ((("dense", "kernel"), True), (("embed",), True), (("dense", "bias"), False),
                         (("norm", "scale"), False)):
        a, b = flat, undecayed
        for key in path:
            a, b = a[key], b[key]
        assert (not np.allclose(a, b)) == decays, path
    # The state holds one vector per group: 12 + 15 decayed entries, 4 + 4 others.
    assert {leaf.shape for leaf in jax.tree.leaves(state) if leaf.ndim} == {(27,), (8,)}


@pytest.mark.parametrize("quantizer, flat", [("vq", True), ("l2_ema", False)])
def test_vq_step_sums_per_device_where_it_can_and_matches_xla(quantizer, flat):
    cfg = train_vq.PRESETS["tiny"]()
    model = dataclasses.replace(cfg.model, quantizer=quantizer)
    devices = tuple(jax.devices())
    args = (model, cfg.optim, 100, cfg.recon_loss, cfg.codebook_weight, None, 0.0, 2, cfg.seed, devices)
    images = train_vq.synthetic_images(16, model.image_size, seed=1)
    runs = {}
    for mode in ("auto", "xla"):
        progs = train_vq._programs(*args, mode)
        assert progs.flat_sum == (flat and mode == "auto")
        leaves, rows = progs.pack(progs.init()), []
        for step in range(4):
            batch = jax.make_array_from_process_local_data(progs.batch_sharding, images)
            leaves, metrics = progs.step(leaves, batch, jax.random.key(7))
            rows.append({k: float(v) for k, v in metrics.items()})
        runs[mode] = (rows, jax.device_get(progs.unpack(leaves)["params"]))
    (rows_a, params_a), (rows_b, params_b) = runs["auto"], runs["xla"]
    for a, b in zip(rows_a, rows_b):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_allclose(a[k], b[k], rtol=2e-4, atol=1e-6, err_msg=k)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6), params_a, params_b)

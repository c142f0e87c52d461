"""Meshes, logical-axis rules, and sharded models on 8 fake CPU devices."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from chameleon_jax.config import MeshConfig, ModelConfig
from chameleon_jax.sharding import (
    build_mesh,
    constrain,
    logical_to_spec,
    named_sharding,
    state_shardings,
    use_mesh,
)
from chameleon_jax.transformer import Transformer, create_sharded_model

RULES = MeshConfig().rules


def test_build_mesh_sizes_and_fill():
    assert len(jax.devices()) == 8
    mesh = build_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    assert mesh.axis_names == ("data", "fsdp", "sequence", "tensor")
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "sequence": 1, "tensor": 2}
    assert dict(build_mesh(MeshConfig(data=-1, fsdp=1, tensor=2)).shape) == {"data": 4, "fsdp": 1, "sequence": 1,
                                                                              "tensor": 2}
    assert dict(build_mesh(MeshConfig(data=1, fsdp=-1, tensor=1)).shape) == {"data": 1, "fsdp": 8, "sequence": 1,
                                                                              "tensor": 1}
    assert dict(build_mesh(MeshConfig(data=2, sequence=-1)).shape)["sequence"] == 4
    assert build_mesh(MeshConfig(data=2, fsdp=1, tensor=2), devices=jax.devices()[:4]).size == 4


def test_mesh_that_does_not_divide_the_devices_is_a_clear_error():
    with pytest.raises(ValueError, match=r"'data': 3.*needs 12 devices, but 8 are available"):
        build_mesh(MeshConfig(data=3, fsdp=2, tensor=2))
    with pytest.raises(ValueError, match=r"product 3\) do not divide the 8 devices"):
        build_mesh(MeshConfig(data=-1, fsdp=3, tensor=1))
    with pytest.raises(ValueError, match="at most one"):
        build_mesh(MeshConfig(data=-1, fsdp=-1, tensor=1))
    with pytest.raises(ValueError, match="slice"):
        build_mesh(MeshConfig(data=-1, dcn_data=2))  # CPU devices have no slices


def test_logical_to_spec():
    assert logical_to_spec(("activation_batch", "activation_length", "activation_embed"), RULES) == P(
        ("data", "fsdp"), "sequence", None)
    assert logical_to_spec(("embed", "heads", "head_dim"), RULES) == P("fsdp", "tensor", None)
    assert logical_to_spec(("layers", "embed", "mlp"), RULES) == P(None, "fsdp", "tensor")
    # A mesh axis is used once per array: fsdp goes to the batch, so embed stays replicated.
    assert logical_to_spec(("activation_batch", "embed"), RULES) == P(("data", "fsdp"), None)
    assert logical_to_spec((None, "vocab"), {"vocab": "tensor"}) == P(None, "tensor")
    with pytest.raises(ValueError, match="'embedd' has no entry"):
        logical_to_spec(("embedd",), RULES)


def test_dimension_the_mesh_does_not_divide_stays_replicated():
    mesh = build_mesh(MeshConfig(data=2, fsdp=1, tensor=4))
    assert named_sharding(mesh, ("embed", "kv_heads", "head_dim"), RULES, shape=(64, 2, 16)).spec == P("fsdp", None, None)
    assert named_sharding(mesh, ("embed", "kv_heads", "head_dim"), RULES, shape=(64, 8, 16)).spec == P("fsdp", "tensor", None)


def test_constrain_is_a_no_op_without_a_mesh():
    x = jnp.ones((4, 3))
    assert constrain(x, ("activation_batch", None)) is x


def tiny(**kw) -> ModelConfig:
    return dataclasses.replace(ModelConfig(), **{"num_kv_heads": 2, "max_seq_len": 16, **kw})


@pytest.mark.parametrize("scan", [False, True], ids=["loop", "scan"])
def test_sharded_forward_and_decode_match_single_device(scan):
    cfg = tiny(scan_layers=scan)
    mesh = build_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    sharded = create_sharded_model(cfg, mesh, RULES, seed=0)
    single = Transformer(cfg, rngs=nnx.Rngs(0))

    wq = sharded.blocks.attn.wq_dnh if scan else sharded.blocks[0].attn.wq_dnh
    assert wq[...].sharding.spec == (P(None, "fsdp", "tensor", None) if scan else P("fsdp", "tensor", None))
    assert sharded.lm_head.w_dv[...].sharding.spec == P("fsdp", "tensor")
    for a, b in zip(jax.tree.leaves(nnx.state(sharded, nnx.Param)), jax.tree.leaves(nnx.state(single, nnx.Param))):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8)  # born sharded, same values as an unsharded init

    x = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (4, 8)), jnp.int32)
    with use_mesh(mesh, RULES):
        x_sharded = jax.device_put(x, named_sharding(mesh, ("activation_batch", "activation_length"), RULES))
        logits = nnx.jit(lambda m, t: m(t))(sharded, x_sharded)
        assert logits.sharding.spec == P(("data", "fsdp"), None, "tensor")

        cache = sharded.init_cache(4)
        kv_mask = jnp.ones((4, cfg.max_seq_len), bool)
        step = nnx.jit(lambda m, t, p, c, i: m.decode(t, p, c, i, kv_mask))
        prefill, cache = step(sharded, x_sharded[:, :5], jnp.broadcast_to(jnp.arange(5), (4, 5)), cache, 0)
        one, cache = step(sharded, x_sharded[:, 5:6], jnp.full((4, 1), 5), cache, 5)
    np.testing.assert_allclose(logits, single(x), atol=1e-5)
    np.testing.assert_allclose(prefill, single(x)[:, :5], atol=1e-5)
    np.testing.assert_allclose(one[:, 0], single(x)[:, 5], atol=1e-5)


def test_state_shardings_cover_every_variable():
    cfg = tiny(scan_layers=True)
    mesh = build_mesh(MeshConfig(data=-1, fsdp=2, tensor=2))
    _, state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    shardings = state_shardings(state, mesh, RULES)
    flat = {"/".join(map(str, k)): v for k, v in nnx.to_flat_state(shardings)}
    assert flat["embed/embedding_vd"].get_value().spec == P("tensor", "fsdp")
    assert flat["blocks/mlp/w2_fd"].get_value().spec == P(None, "tensor", "fsdp")
    assert flat["blocks/attn/q_norm/scale_nh"].get_value().spec == P(None, "tensor", None)
    rng_entries = [k for k in flat if k.startswith("dropout_rngs")]
    assert rng_entries and all(flat[k].get_value().spec == P() for k in rng_entries)

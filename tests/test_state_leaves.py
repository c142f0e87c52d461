"""StateLeaves: a train state carried as the list of its arrays steps exactly as the structured one."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from chameleon_jax.state_leaves import StateLeaves


class _Tiny(nnx.Module):
    def __init__(self, rngs):
        self.dense = nnx.Linear(3, 4, rngs=rngs)
        self.norm = nnx.LayerNorm(4, rngs=rngs)


def _setup():
    model = _Tiny(nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    tx = optax.adamw(1e-2)
    state = {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}

    def step(state, x):
        def loss(params):
            model = nnx.merge(graphdef, params)
            return jnp.mean(model.norm(model.dense(x)) ** 2 * (1 + state["step"]))

        value, grads = jax.value_and_grad(loss)(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        return {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state,
                "step": state["step"] + 1}, value

    return state, step


def test_a_step_on_the_leaf_list_computes_what_the_structured_step_computes():
    state, step = _setup()
    x = jnp.asarray(np.random.default_rng(0).normal(size=(5, 3)), jnp.float32)
    layout = StateLeaves.of(jax.eval_shape(lambda: state))
    leaves = layout.pack(state)
    assert isinstance(leaves, list) and len(leaves) == len(jax.tree.leaves(state))
    leaves_step, plain_step = jax.jit(layout.step(step), donate_argnums=0), jax.jit(step)
    plain = state
    for _ in range(3):
        plain, loss_a = plain_step(plain, x)
        leaves, loss_b = leaves_step(leaves, x)
        assert isinstance(leaves, list)
        assert float(loss_a) == float(loss_b)
    back = layout.unpack(leaves)
    assert jax.tree.structure(back) == jax.tree.structure(plain)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(plain)):
        np.testing.assert_array_equal(a, b)
    assert int(back["step"]) == 3


def test_per_leaf_shardings_pack_like_the_state_and_a_wrong_list_is_refused():
    state, _ = _setup()
    layout = StateLeaves.of(state)
    mesh = Mesh(np.asarray(jax.devices()[:1]), ("data",))
    one = NamedSharding(mesh, P())
    per_leaf = layout.pack(jax.tree.map(lambda _: one, state))
    assert len(per_leaf) == len(jax.tree.leaves(state)) and all(s is one for s in per_leaf)
    with pytest.raises(ValueError, match="expected .* state arrays, got 2"):
        layout.unpack(layout.pack(state)[:2])

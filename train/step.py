"""The sharded training state and the pure train / eval steps.

The train state is a pytree

    {"params": nnx.State, "opt_state": optax state, "model_state": nnx.State, "step": int32}

where `model_state` holds the model's non-parameter variables (its dropout RNG
stream). The model is rebuilt inside the step with `nnx.merge(graphdef, params,
model_state)`, so the step is a pure function of (state, batch). It is jitted
with explicit in/out shardings taken from the rules table and donates the state;
the state is born sharded (the init is jitted with `out_shardings`).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from chameleon_jax import sharding as shd
from chameleon_jax.config import ModelConfig
from chameleon_jax.losses import SUM_KEYS, lm_loss_sums, means_from_sums
from chameleon_jax.checkpoint import path_str
from chameleon_jax.sequence import BATCH_DTYPES, BATCH_KEYS

BATCH_AXES = ("activation_batch", "activation_length")

State = dict[str, Any]
Batch = Mapping[str, jax.Array]


def _make_model(cfg: ModelConfig, seed: int):
    from chameleon_jax.transformer import Transformer

    return Transformer(cfg, rngs=nnx.Rngs(params=seed, dropout=seed + 1))


class Trainer:
    """Builds, shards and steps the train state of one model on one mesh.

    Args:
      model_cfg: the transformer.
      tx: the optimizer (see `train.optim.make_optimizer`).
      schedule: step -> learning rate, for logging.
      mesh, rules: the device mesh and the logical-axis rules table.
      grad_accum: microbatches per step; rows of the global batch are dealt out
        round-robin so each device's rows stay on that device.
      seed: parameter init and dropout seed.
    """

    def __init__(
        self,
        model_cfg: ModelConfig,
        tx: optax.GradientTransformation,
        mesh: Mesh,
        rules,
        *,
        schedule: Callable[[jax.Array], jax.Array] | None = None,
        grad_accum: int = 1,
        seed: int = 0,
    ):
        self.cfg = model_cfg
        self.tx = tx
        self.schedule = schedule
        self.mesh = mesh
        self.rules = rules
        self.grad_accum = int(grad_accum)
        self.seed = int(seed)
        self.graphdef = nnx.split(nnx.eval_shape(lambda: _make_model(model_cfg, seed)), nnx.Param, ...)[0]
        self.abstract_state = jax.eval_shape(self._init)
        self.state_shardings = shd.state_shardings(self.abstract_state, mesh, rules)
        self.replicated = NamedSharding(mesh, PartitionSpec())
        self._jit_cache: dict[Any, Any] = {}

    # ----------------------------------------------------------------- state
    def _init(self) -> State:
        model = _make_model(self.cfg, self.seed)
        _, params, model_state = nnx.split(model, nnx.Param, ...)
        return {
            "params": params,
            "opt_state": self.tx.init(params),
            "model_state": model_state,
            "step": jnp.zeros((), jnp.int32),
        }

    def init_state(self) -> State:
        """A freshly initialised state, created directly in its sharded layout."""
        if "init" not in self._jit_cache:
            self._jit_cache["init"] = jax.jit(self._init, out_shardings=self.state_shardings)
        with shd.use_mesh(self.mesh, self.rules):
            return self._jit_cache["init"]()

    def batch_sharding(self, shape) -> NamedSharding:
        return shd.named_sharding(self.mesh, BATCH_AXES, self.rules, shape)

    def batch_shardings(self, batch_shape) -> dict[str, NamedSharding]:
        return {k: self.batch_sharding(batch_shape) for k in BATCH_KEYS}

    def model(self, state: State):
        """The NNX model holding the state's parameters (for export and evaluation)."""
        return nnx.merge(self.graphdef, state["params"], state["model_state"])

    # ------------------------------------------------------------------ steps
    def _loss(self, model, mb, deterministic: bool):
        logits_btv = model(mb["tokens"], mb["positions"], mb["segment_ids"], deterministic=deterministic)
        sums = lm_loss_sums(logits_btv, mb["targets"], mb["loss_weights"], mb["modality"], self.cfg.z_loss)
        return sums["loss_sum"], sums

    def _grads(self, params, model_state, mb):
        """Gradient sums of one (micro)batch; returns (grads, loss sums, the advanced model_state).

        The model is merged outside the differentiated function and differentiated with
        nnx.value_and_grad, so its dropout stream advances at the trace level it lives in.
        """
        model = nnx.merge(self.graphdef, params, model_state)
        grad_fn = nnx.value_and_grad(
            lambda m: self._loss(m, mb, False), argnums=nnx.DiffState(0, nnx.Param), has_aux=True
        )
        (_, sums), grads = grad_fn(model)
        return grads, sums, nnx.split(model, nnx.Param, ...)[2]

    def _microbatches(self, batch: Batch) -> dict[str, jax.Array]:
        """[B, T] -> [A, B/A, T]; microbatch a takes rows a, a+A, a+2A, ... (no cross-device moves)."""
        a = self.grad_accum

        def split(x):
            b = x.shape[0]
            if b % a:
                raise ValueError(f"batch of {b} rows does not split into grad_accum={a} microbatches")
            x = x.reshape(b // a, a, *x.shape[1:]).swapaxes(0, 1)
            return shd.constrain(x, (None,) + BATCH_AXES)

        return {k: split(batch[k]) for k in BATCH_KEYS}

    def _train_step(self, state: State, batch: Batch) -> tuple[State, dict[str, jax.Array]]:
        params = state["params"]
        if self.grad_accum == 1:
            grads, sums, model_state = self._grads(params, state["model_state"], batch)
        else:
            def body(carry, mb):
                # params ride in the carry so the model is merged from values of this trace level
                grads, sums, model_state, p = carry
                g, s, model_state = self._grads(p, model_state, mb)
                return (jax.tree.map(jnp.add, grads, g), jax.tree.map(jnp.add, sums, s), model_state, p), None

            zeros = jax.tree.map(jnp.zeros_like, params)
            sums0 = {k: jnp.zeros((), jnp.float32) for k in SUM_KEYS}
            (grads, sums, model_state, _), _ = jax.lax.scan(
                body, (zeros, sums0, state["model_state"], params), self._microbatches(batch)
            )
        scale = 1.0 / jnp.maximum(sums["weight_sum"], 1.0)
        grads = jax.tree.map(lambda g: g * scale, grads)
        updates, opt_state = self.tx.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        finite = jnp.stack([jnp.all(jnp.isfinite(p)) for p in jax.tree.leaves(new_params)]).all()
        metrics = means_from_sums(sums)
        metrics["grad_norm"] = optax.tree.norm(grads)
        metrics["param_norm"] = optax.tree.norm(new_params)
        metrics["params_finite"] = finite
        if self.schedule is not None:
            metrics["lr"] = self.schedule(state["step"])
        new_state = {"params": new_params, "opt_state": opt_state, "model_state": model_state,
                     "step": state["step"] + 1}
        return new_state, metrics

    def _eval_step(self, state: State, batch: Batch) -> dict[str, jax.Array]:
        _, sums = self._loss(self.model(state), batch, True)
        return sums

    def _jitted(self, name: str, batch_shape):
        key = (name, tuple(batch_shape))
        if key not in self._jit_cache:
            bs = self.batch_shardings(batch_shape)
            if name == "train":
                fn = jax.jit(self._train_step, in_shardings=(self.state_shardings, bs),
                             out_shardings=(self.state_shardings, self.replicated), donate_argnums=(0,))
            else:
                fn = jax.jit(self._eval_step, in_shardings=(self.state_shardings, bs),
                             out_shardings=self.replicated)
            self._jit_cache[key] = fn
        return self._jit_cache[key]

    def train_step(self, state: State, batch: Batch) -> tuple[State, dict[str, jax.Array]]:
        """One optimizer step on a global batch; `state` is donated (do not reuse it)."""
        with shd.use_mesh(self.mesh, self.rules):
            return self._jitted("train", batch["tokens"].shape)(state, dict(batch))

    def eval_sums(self, state: State, batch: Batch) -> dict[str, jax.Array]:
        """Weighted loss sums of one batch (no update; dropout off)."""
        with shd.use_mesh(self.mesh, self.rules):
            return self._jitted("eval", batch["tokens"].shape)(state, dict(batch))

    def lower_train_step(self, batch_shape):
        """The lowered train step for an abstract batch (ahead-of-time compile, FLOP counts)."""
        batch = {k: jax.ShapeDtypeStruct(batch_shape, v, sharding=self.batch_sharding(batch_shape))
                 for k, v in BATCH_DTYPES.items()}
        state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                             self.abstract_state, self.state_shardings)
        with shd.use_mesh(self.mesh, self.rules):
            return self._jitted("train", batch_shape).lower(state, batch)

    # ----------------------------------------------------------- checkpoints
    def checkpoint_tree(self, state: State) -> dict[str, jax.Array]:
        """The state as a flat `{name: array}` dict orbax can store (RNG keys as raw key data)."""
        return {path_str(p): _to_storable(x) for p, x in jax.tree_util.tree_leaves_with_path(state)}

    def abstract_checkpoint_tree(self) -> dict[str, jax.ShapeDtypeStruct]:
        """Restore target of `checkpoint_tree`: shapes, dtypes and shardings."""
        out = {}
        shardings = jax.tree.leaves(self.state_shardings)
        for (p, a), s in zip(jax.tree_util.tree_leaves_with_path(self.abstract_state), shardings):
            a = jax.eval_shape(_to_storable, a) if _is_key(a) else a
            out[path_str(p)] = jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)
        return out

    def state_from_checkpoint(self, tree: Mapping[str, jax.Array]) -> State:
        """Inverse of `checkpoint_tree`."""
        paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(self.abstract_state)
        leaves = []
        for p, a in paths_leaves:
            x = tree[path_str(p)]
            # Keys are created with the default implementation (nnx.Rngs(seed)).
            leaves.append(jax.random.wrap_key_data(x) if _is_key(a) else x)
        return jax.tree_util.tree_unflatten(treedef, leaves)




def _is_key(x) -> bool:
    return jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _to_storable(x):
    return jax.random.key_data(x) if _is_key(x) else x


_MATMUL: dict = {}


def dense_matmul_flops(n: int = 2048, repeats: int = 5, dtype=jnp.float32) -> float:
    """Best achieved FLOP/s of an n x n x n matmul on the default device (the MFU reference peak)."""
    import time

    key = (n, jnp.dtype(dtype).name)
    if key not in _MATMUL:
        a = jax.random.normal(jax.random.key(0), (n, n), dtype)
        b = jax.random.normal(jax.random.key(1), (n, n), dtype)
        mm = jax.jit(jnp.matmul)
        mm(a, b).block_until_ready()
        _MATMUL[key] = (mm, a, b)
    mm, a, b = _MATMUL[key]
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        mm(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n ** 3 / best

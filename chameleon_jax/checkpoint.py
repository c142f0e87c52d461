"""Model directories: a ModelConfig and its parameters, plus whatever callers put beside them.

    DIR/config.json     configlib.save(ModelConfig)
    DIR/params/         orbax checkpoint of the parameter tree (nnx.State of nnx.Param, as a pure dict)
    DIR/...             other owners' files (vocabulary in vocab/, image tokenizer in tokenizer/, ...)

`load_model(DIR, mesh, rules)` restores each tensor straight into its sharded layout
(an abstract target carrying NamedShardings; no host gather), after checking every
tensor's presence and shape against the config so a mismatch names the tensor.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from chameleon_jax import configlib
from chameleon_jax.config import MeshConfig, ModelConfig

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"

# Fields that decide the parameter tree; everything else may be overridden at load time.
LAYOUT_FIELDS = frozenset(
    {"vocab_size", "hidden_dim", "num_layers", "num_heads", "num_kv_heads", "head_dim", "ffn_dim", "qk_norm",
     "scan_layers"}
)


class CheckpointError(ValueError):
    """A model directory or training checkpoint is missing, incomplete, unreadable, or its tensors do not
    match the config they are loaded into."""


def path_str(path) -> str:
    """'blocks.attn.wq_dnh' for a pytree key path."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return ".".join(parts)


def abstract_params(cfg: ModelConfig) -> dict:
    """The parameter tree of `Transformer(cfg)` as a pure dict of ShapeDtypeStructs (nothing allocated)."""
    from chameleon_jax.transformer import Transformer

    model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def flat_shapes(tree) -> dict[str, tuple[tuple[int, ...], Any]]:
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {path_str(p): (tuple(x.shape), x.dtype) for p, x in leaves}


# --------------------------------------------------------------------------- save


def save_params(directory: str | os.PathLike, params: Mapping) -> None:
    """Writes a pure-dict parameter tree (jax or numpy arrays) as an orbax checkpoint, replacing any old one."""
    import orbax.checkpoint as ocp

    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(Path(directory).absolute(), params, force=True)
    checkpointer.wait_until_finished()


def save_model(path: str | os.PathLike, model, cfg: ModelConfig | None = None) -> Path:
    """Writes DIR/config.json and DIR/params/; other files in DIR are left alone."""
    path = Path(path).absolute()
    cfg = cfg if cfg is not None else model.cfg
    path.mkdir(parents=True, exist_ok=True)
    save_params(path / PARAMS_DIR, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    configlib.save(cfg, path / CONFIG_FILE)
    return path


# --------------------------------------------------------------------------- load


def load_config(path: str | os.PathLike) -> ModelConfig:
    path = Path(path)
    if not (path / CONFIG_FILE).is_file():
        raise CheckpointError(
            f"{path} is not a model directory: it has no {CONFIG_FILE} "
            f"(expected {CONFIG_FILE} and {PARAMS_DIR}/ written by save_model or the importer)"
        )
    return configlib.load(ModelConfig, path / CONFIG_FILE)


def _stored_shapes(params_dir: Path) -> dict[str, tuple[tuple[int, ...], Any]]:
    import orbax.checkpoint as ocp

    if not params_dir.is_dir():
        raise CheckpointError(f"model directory {params_dir.parent} has no {PARAMS_DIR}/ checkpoint")
    try:
        metadata = ocp.StandardCheckpointer().metadata(params_dir.absolute())
    except Exception as e:  # orbax / tensorstore: a missing, truncated or foreign file
        raise CheckpointError(f"cannot read the parameters in {params_dir}: {error_line(e)}") from None
    tree = getattr(metadata, "item_metadata", metadata)
    tree = getattr(tree, "tree", tree)
    shapes = flat_shapes(tree) if tree is not None else {}
    if not shapes:  # orbax only warns when it cannot read the metadata
        raise CheckpointError(f"cannot read the parameters in {params_dir}: no readable tensor metadata")
    return shapes


def error_line(e: BaseException) -> str:
    """The first line of an exception's message, whitespace collapsed (orbax/tensorstore errors run long)."""
    text = str(e).strip() or type(e).__name__
    return " ".join(text.splitlines()[0].split())[:300]


def check_tensors(expected: Mapping[str, tuple], stored: Mapping[str, tuple], where: str) -> None:
    """Raises CheckpointError naming every missing, unexpected or misshapen tensor."""
    problems = []
    for name in sorted(set(expected) - set(stored)):
        problems.append(f"missing tensor {name} (expected shape {expected[name][0]})")
    for name in sorted(set(stored) - set(expected)):
        problems.append(f"unexpected tensor {name} with shape {stored[name][0]}")
    for name in sorted(set(expected) & set(stored)):
        if tuple(expected[name][0]) != tuple(stored[name][0]):
            problems.append(
                f"tensor {name} has shape {stored[name][0]} in the checkpoint, the config expects {expected[name][0]}"
            )
    if problems:
        raise CheckpointError(f"{where} does not match its config:\n  " + "\n  ".join(problems))


def _concrete_rng_state(abstract_state, seed: int):
    """Fresh values for the non-parameter variables (the dropout RNG stream)."""

    def make(x):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.key(seed)
        return jnp.zeros(x.shape, x.dtype)

    return jax.tree.map(make, abstract_state)


def load_model(
    path: str | os.PathLike,
    mesh: jax.sharding.Mesh | None = None,
    rules=None,
    *,
    overrides: Mapping[str, Any] | None = None,
    seed: int = 0,
):
    """The `Transformer` stored in model directory `path`.

    mesh/rules: restore each parameter directly into its NamedSharding (rules default to
    MeshConfig's table); without a mesh, parameters land on the default device.
    overrides: config fields to change at load time (compute dtype, param_dtype, attention
    kernel, remat, dropout, max_seq_len, ...); fields that change the parameter tree cannot.
    """
    import orbax.checkpoint as ocp

    from chameleon_jax.sharding import state_shardings
    from chameleon_jax.transformer import Transformer

    path = Path(path).absolute()
    cfg = load_config(path)
    for key, value in (overrides or {}).items():
        if key in LAYOUT_FIELDS and getattr(cfg, key) != value:
            raise CheckpointError(f"cannot override {key} when loading: it changes the parameter tree")
        cfg = configlib.override(cfg, key, value)

    abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(seed)))
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    if mesh is not None:
        rules = rules if rules is not None else MeshConfig().rules
        shardings = nnx.to_pure_dict(state_shardings(params, mesh, rules))
    else:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: device, nnx.to_pure_dict(params))
    target = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), nnx.to_pure_dict(params), shardings
    )

    check_tensors(flat_shapes(target), _stored_shapes(path / PARAMS_DIR), f"checkpoint {path / PARAMS_DIR}")
    try:
        restored = ocp.StandardCheckpointer().restore(path / PARAMS_DIR, target)
    except Exception as e:  # orbax / tensorstore: a truncated or unreadable data file
        raise CheckpointError(f"cannot read the parameters in {path / PARAMS_DIR}: {error_line(e)}") from None
    nnx.replace_by_pure_dict(params, restored)
    return nnx.merge(graphdef, params, _concrete_rng_state(rest, seed))

"""Inference memory plan: bytes per device of the sharded decode loop, from abstract shapes only.

    python -m eval.bench.plan --mode generate --preset chameleon-34b --mesh tensor=8 --batch 16 --context 4096 \\
        --accelerator h100
    python -m eval.bench.plan --mode generate --preset small --mesh data=2,tensor=4 --batch 8 --context 384 --compile

Per device, for generation on the mesh with the training rules table (`generation/placement.py`):

- parameters at the serving dtype (`--param-dtype`, default the compute dtype: weights are
  cast on load), blocks held one by one as the decode loop runs them, each in its training
  shard (`sharding.state_shardings`);
- the KV cache: per layer, k and v [rows, kv_heads, context, head_dim] in the compute
  dtype, rows = batch (padded to whole prompts per data shard) x guidance streams, split
  by the `cache_batch` and `cache_kv_heads` rules (heads that do not divide stay whole);
- the largest temporaries: the prefill of a `--prompt-len` prompt runs one block at a
  time, so the larger of one block's attention half (q, k, v, the scores of the attention
  kernel this backend runs, the mask, the output) and its SwiGLU half, plus the residual
  stream, its float32 norm copies and the step's float32 logits;
- the loop's own arrays: prompt tokens and masks, and the generated ids;
- weights gathered over `fsdp`: every step needs each block's weights whole, and XLA
  hoists these loop-invariant all-gathers, so with fsdp > 1 the gathered weights (all
  but the embedding table, which is read by a gather) stay live, once for the prefill
  and once for the loop (as XLA's buffer assignment shows on CPU). fsdp saves parameter
  memory in training; for serving, prefer data and tensor axes.

`--compile` lowers the real sharded decode loop for the same shapes on this machine's
(fake CPU) devices and prints XLA's `memory_analysis()` beside the estimate; scale a big
preset down with `--set num_layers=2` and a short `--context` for that.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from chameleon_jax import configlib
from chameleon_jax.config import MeshConfig, ModelConfig
from eval.bench import accelerators
from eval.bench.plan_common import (
    DTYPE_BYTES, _count, _gib, _path_str, _table, abstract_mesh, accelerator_fit, compile_backend, emit,
    estimate_vs_xla, estimate_vs_xla_table, fits_table, local_mesh, memory_figures, mesh_sizes, shard_bytes,
)
from eval.bench.synthetic import abstract_model

STREAMS = {"none": 1, "two": 2, "three": 3}


def serving_config(cfg: ModelConfig, param_dtype: str | None) -> ModelConfig:
    """The config generation runs: blocks unstacked, no remat or dropout, parameters at the serving dtype."""
    return dataclasses.replace(cfg, scan_layers=False, remat_policy="none", dropout=0.0,
                               param_dtype=param_dtype or cfg.dtype)


def parameter_leaves(cfg: ModelConfig, mesh, rules) -> list[dict[str, Any]]:
    """Every parameter of the serving model with its shard on `mesh` (nothing allocated)."""
    import jax
    import numpy as np
    from flax import nnx

    from chameleon_jax.sharding import state_shardings

    params = nnx.state(abstract_model(cfg), nnx.Param)
    shardings = state_shardings(params, mesh, rules)
    leaves = jax.tree_util.tree_leaves_with_path(params)
    out = []
    for (path, a), s in zip(leaves, jax.tree.leaves(shardings)):
        itemsize = np.dtype(a.dtype).itemsize
        out.append({"path": _path_str(path), "shape": list(a.shape), "dtype": str(np.dtype(a.dtype)),
                    "spec": str(s.spec), "global_bytes": math.prod(a.shape) * itemsize,
                    "device_bytes": math.prod(s.shard_shape(tuple(a.shape))) * itemsize})
    return out


def padded_rows(batch: int, row_shards: int) -> int:
    """Prompts after padding to whole prompts per data shard (as `placement.local_batch` pads)."""
    return row_shards * math.ceil(batch / row_shards)


def temporaries(cfg: ModelConfig, rows: int, prompt_len: int, context: int, mesh, rules, kernel: str) -> dict:
    """Bytes per device of the largest live temporaries: one block of the prefill, the step's logits."""
    c = DTYPE_BYTES[cfg.dtype]
    r, t, s = rows, prompt_len, context
    d, n, k, h, f, v = cfg.hidden_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.ffn_dim, cfg.vocab_size

    def size(shape, axes, itemsize):
        return shard_bytes(shape, axes, rules, mesh, itemsize)

    btd = ("activation_batch", "activation_length", "activation_embed")
    btn = ("activation_batch", "activation_length", "activation_heads", None)
    btk = ("activation_batch", "activation_length", "activation_kv_heads", None)
    btf = ("activation_batch", "activation_length", "activation_mlp")
    bkts = ("activation_batch", "activation_kv_heads", None, "activation_length", None)
    residual = size((r, t, d), btd, c) + 2 * size((r, t, d), btd, 4)  # x, and the norm's float32 copies
    q, kv = size((r, t, n, h), btn, c), size((r, t, k, h), btk, c)
    if kernel == "xla":  # float32 scores and their exponentials over every key
        scores = 2 * size((r, k, n // k, t, s), bkts, 4)
    else:  # flash attention keeps none; the chunked kernel's per-block scores fuse away (XLA:CPU, measured)
        scores = 0
    mask = size((r, 1, t, s), ("activation_batch", None, "activation_length", None), 1)
    attention = 2 * q + 2 * kv + scores + mask  # q, k, v, the attention output (q's shape), scores, mask
    mlp = 3 * size((r, t, f), btf, c)  # gate, up, hidden
    logits = size((r, v), ("activation_batch", "activation_vocab"), 4)
    return {"residual_bytes": residual, "attention_bytes": attention, "mlp_bytes": mlp, "logits_bytes": logits,
            "total_bytes": residual + max(attention, mlp) + 2 * logits}


def make_generate_plan(cfg: ModelConfig, mesh_cfg: MeshConfig, *, batch: int, context: int,
                       prompt_len: int | None = None, guidance: str = "none", num_devices: int | None = None,
                       accelerator: str | None = None, backend: str | None = None, param_dtype: str | None = None,
                       reserve: float = 0.1) -> dict[str, Any]:
    """The inference memory plan as a JSON-able dict (bytes per device)."""
    from chameleon_jax.attention import resolve_implementation
    from chameleon_jax.kv_cache import CACHE_AXES

    cfg = serving_config(cfg, param_dtype)
    if context > cfg.max_seq_len:
        raise configlib.ConfigError(f"--context {context} exceeds the model's max_seq_len {cfg.max_seq_len}")
    prompt_len = prompt_len or context // 2
    if not 1 <= prompt_len < context:
        raise configlib.ConfigError(f"--prompt-len must be between 1 and --context - 1, got {prompt_len}")
    if guidance not in STREAMS:
        raise configlib.ConfigError(f"--guidance must be one of {list(STREAMS)}, got {guidance!r}")
    sizes = mesh_sizes(mesh_cfg, num_devices)
    mesh = abstract_mesh(sizes)
    rules = mesh_cfg.rules
    acc = accelerators.get(accelerator) if accelerator else None
    backend = backend or (acc.backend if acc is not None else "tpu")

    row_shards = math.prod(sizes[a] for a in ("data", "fsdp"))  # the default cache_batch rule: data+fsdp
    prompts = padded_rows(batch, row_shards)
    rows = prompts * STREAMS[guidance]
    leaves = parameter_leaves(cfg, mesh, rules)
    cache_shape = (rows, cfg.num_kv_heads, context, cfg.head_dim)
    c = DTYPE_BYTES[cfg.dtype]
    cache = 2 * cfg.num_layers * shard_bytes(cache_shape, CACHE_AXES, rules, mesh, c)
    limit = context - prompt_len
    loop_arrays = (shard_bytes((rows, prompt_len), ("cache_batch", None), rules, mesh, 5)  # int32 ids + bool mask
                   + shard_bytes((prompts, limit), ("cache_batch", None), rules, mesh, 4))

    def parts_for(backend: str) -> tuple[dict[str, int], dict]:
        kernel = resolve_implementation(cfg.attention_impl, cfg.dtype, cfg.head_dim, backend)
        temps = temporaries(cfg, rows, prompt_len, context, mesh, rules, kernel)
        temps["attention_kernel"] = kernel
        return {"params": sum(l["device_bytes"] for l in leaves), "kv_cache": cache,
                "temporaries": temps["total_bytes"], "loop_arrays": loop_arrays, "gathered_weights": gathered}, temps

    fsdp = sizes["fsdp"]
    gathered = 0 if fsdp == 1 else 2 * sum(l["device_bytes"] * fsdp for l in leaves
                                            if "fsdp" in l["spec"] and not l["path"].startswith("embed/"))

    parts, temps = parts_for(backend)
    total = sum(parts.values())

    def fit(a: accelerators.Accelerator) -> dict[str, Any]:
        needed = total if a.backend == backend else sum(parts_for(a.backend)[0].values())
        return accelerator_fit(a, needed, reserve)

    return {
        "mode": "generate",
        "model": {k: getattr(cfg, k) for k in ("vocab_size", "hidden_dim", "num_layers", "num_heads", "num_kv_heads",
                                               "head_dim", "ffn_dim", "dtype", "param_dtype")},
        "num_params": sum(math.prod(l["shape"]) for l in leaves),
        "mesh": sizes, "devices": math.prod(sizes.values()),
        "batch": batch, "padded_batch": prompts, "guidance": guidance, "rows": rows,
        "context": context, "prompt_len": prompt_len,
        "bytes_per_device": parts, "total_bytes_per_device": total, "temporaries": temps,
        "cache_spec": str(_cache_spec(cache_shape, rules, mesh)),
        "parameters": leaves, "reserve_fraction": reserve,
        "accelerator": fit(acc) if acc else None,
        "all_accelerators": [fit(a) for a in accelerators.ACCELERATORS.values()],
    }


def _cache_spec(shape, rules, mesh):
    from chameleon_jax.kv_cache import CACHE_AXES
    from chameleon_jax.sharding import logical_to_spec

    return logical_to_spec(CACHE_AXES, rules, shape, mesh)


# --------------------------------------------------------------------------- compiler check


def compiled_generate_memory(cfg: ModelConfig, mesh_cfg: MeshConfig, *, batch: int, context: int, prompt_len: int,
                             guidance: str = "none", param_dtype: str | None = None) -> dict[str, Any]:
    """XLA's memory analysis of the real sharded decode loop (prefill + while loop) on local devices."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from chameleon_jax.generation import decode, guidance as guidance_lib, modes, placement
    from chameleon_jax.generation.sampling import SamplingParams
    from chameleon_jax.sharding import state_shardings

    cfg = serving_config(cfg, param_dtype)
    mesh = local_mesh(mesh_cfg)
    place = placement.Placement.of(mesh, mesh_cfg.rules)
    graphdef, state = nnx.split(abstract_model(cfg))
    shardings = state_shardings(state, mesh, place.rules)
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state, shardings)

    prompts = padded_rows(batch, place.row_shards)
    streams = STREAMS[guidance]
    rows, limit, v = prompts * streams, context - prompt_len, cfg.vocab_size
    rep = place.replicated
    sds = lambda shape, dtype, sharding=rep: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)  # noqa: E731
    tables = modes.TokenTables(*[sds((v,), jnp.bool_)] * 3, *[sds((), jnp.int32)] * 4)
    scalar = lambda dtype: sds((), dtype)  # noqa: E731
    params = decode.DecodeParams(scalar(jnp.float32), scalar(jnp.int32), scalar(jnp.float32), scalar(jnp.float32),
                                 scalar(jnp.int32), scalar(jnp.float32), sds((3,), jnp.float32),
                                 sds((prompts,), jnp.int32, place.rows((prompts,))))
    form = guidance_lib.FORMS[streams - 1]
    spec = decode.decode_spec(limit=limit, codes_per_image=0, modality="text", form=form,
                              text=SamplingParams(1.0), image=SamplingParams(1.0), return_logits=False)
    lowered = placement._loop_on_mesh.lower(
        state, tables, sds((rows, prompt_len), jnp.int32, place.rows((rows, prompt_len))),
        sds((rows, prompt_len), jnp.bool_, place.rows((rows, prompt_len))), params, scalar(jnp.int32),
        loop=decode._decode_loop.__wrapped__, graphdef=graphdef, spec=spec, placement=place)
    param_bytes = sum(math.prod(s.shard_shape(a.shape)) * a.dtype.itemsize
                      for a, s in zip(jax.tree.leaves(state), jax.tree.leaves(shardings)))
    return {**memory_figures(lowered.compile()), "param_bytes": param_bytes}


def compared(plan: dict[str, Any], xla: dict[str, Any]) -> dict[str, tuple[str, int, int]]:
    """Parameters against XLA's parameter arguments, and everything else (cache, temporaries, loop
    arrays, gathered weights) against XLA's temporaries and outputs."""
    p = plan["bytes_per_device"]
    transient = p["kv_cache"] + p["temporaries"] + p["loop_arrays"] + p["gathered_weights"]
    return {
        "params_estimate_over_xla": ("parameters", p["params"], xla["param_bytes"]),
        "transient_estimate_over_xla": ("KV cache + temporaries + loop arrays + gathered", transient,
                                        xla["temp_bytes"] + xla["output_bytes"]),
    }


def compare_generate(plan: dict[str, Any], xla: dict[str, Any]) -> dict[str, float]:
    """Ratios estimate / compiler for the two comparable quantities."""
    return estimate_vs_xla(compared(plan, xla))


# --------------------------------------------------------------------------- output


def render_generate(plan: dict[str, Any], preset: str, xla: dict[str, Any] | None = None, brief: bool = False) -> str:
    m = plan["model"]
    mesh = ",".join(f"{a}={s}" for a, s in plan["mesh"].items())
    out = [
        f"{preset}: {_count(plan['num_params'])} params (L={m['num_layers']}, D={m['hidden_dim']}, "
        f"heads={m['num_heads']}/{m['num_kv_heads']}kv, V={m['vocab_size']}); compute {m['dtype']}, "
        f"served in {m['param_dtype']}, attention={plan['temporaries']['attention_kernel']}",
        f"generation on mesh {mesh} ({plan['devices']} devices): {plan['batch']} prompt(s) (padded to "
        f"{plan['padded_batch']}) x {plan['rows'] // plan['padded_batch']} stream(s) = {plan['rows']} rows, "
        f"context {plan['context']}, prompt {plan['prompt_len']}; KV cache sharded {plan['cache_spec']}",
        "",
    ]
    if not brief:
        prow = [[p["path"], "x".join(map(str, p["shape"])), p["dtype"], p["spec"], _gib(p["device_bytes"])]
                for p in plan["parameters"] if not p["path"].startswith("blocks/") or p["path"].startswith("blocks/0/")]
        out += [_table(prow, ["parameter (block 0 of each)", "shape", "dtype", "sharding", "per device"]), ""]
    p, t = plan["bytes_per_device"], plan["temporaries"]
    what = {"params": f"parameters ({m['param_dtype']})",
            "kv_cache": f"KV cache ({m['num_layers']} layers x k, v)",
            "temporaries": f"largest temporaries (prefill block: attention {_gib(t['attention_bytes'])}, "
                           f"SwiGLU {_gib(t['mlp_bytes'])}; logits)",
            "loop_arrays": "prompt ids and mask, generated ids",
            "gathered_weights": "weights gathered over fsdp (prefill and loop)"}
    rows = [[what[k], _gib(v)] for k, v in p.items()] + [["total", _gib(plan["total_bytes_per_device"])]]
    if xla is not None:
        out += [estimate_vs_xla_table(compared(plan, xla), plan, xla), ""]
    out += [_table(rows, ["memory per device", "bytes"]), ""]
    out += [f"fits (estimate <= {100 * (1 - plan['reserve_fraction']):.0f}% of memory):", fits_table(plan, brief)]
    return "\n".join(out)


def main(args, cfg: ModelConfig, mesh_cfg: MeshConfig) -> None:
    """`python -m eval.bench.plan --mode generate ...` (arguments parsed by eval.bench.plan)."""
    context = args.context or cfg.max_seq_len
    backend = compile_backend(args, mesh_cfg)
    plan = make_generate_plan(cfg, mesh_cfg, batch=args.batch, context=context, prompt_len=args.prompt_len,
                              guidance=args.guidance, num_devices=args.devices, accelerator=args.accelerator,
                              backend=backend, param_dtype=args.param_dtype, reserve=args.reserve)
    xla = None
    if args.compile:
        xla = compiled_generate_memory(cfg, mesh_cfg, batch=args.batch, context=context,
                                       prompt_len=plan["prompt_len"], guidance=args.guidance,
                                       param_dtype=args.param_dtype)
        plan["xla"] = xla
        plan["estimate_over_xla"] = compare_generate(plan, xla)
    emit(args, plan, xla, render_generate)

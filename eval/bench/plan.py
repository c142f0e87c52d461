"""Memory planner: bytes per device of one training step, from abstract shapes only.

    python -m eval.bench.plan --preset chameleon-7b --mesh fsdp=8 --batch 8 --seq 4096 --accelerator v5p
    python -m eval.bench.plan --preset chameleon-34b --mesh data=2,fsdp=16,tensor=2 --batch 32 --seq 4096 --remat full
    python -m eval.bench.plan --preset chameleon-7b --mesh fsdp=16,sequence=8 --batch 16 --seq 32768 --set max_seq_len=32768
    python -m eval.bench.plan --preset tiny --mesh data=2,fsdp=2,tensor=2 --batch 16 --seq 128 --compile   # + XLA's figures
    python -m eval.bench.plan ... --json                                                                    # machine output

Nothing is allocated: the project's `Trainer` builds its state with `jax.eval_shape`
on an `AbstractMesh`, and every leaf's per-device shard comes from the real model's
logical-axis metadata and the rules table (`MeshConfig.rules`). The estimate per device:

- parameters, optimizer state (the real optimizer's state: AdamW mu and nu), other state;
- gradients: one buffer per parameter, same shape, dtype and sharding;
- gathered weights: under FSDP each block's weights (and, in the backward pass, their
  gradients) exist unsharded over `fsdp` for a moment; the largest such set is counted;
- activations: an analytic count of what the backward pass keeps per block under the
  remat policy (`SAVED_BY_POLICY`, checked against JAX's own residuals in the tests),
  times the number of blocks, plus the larger half (attention or SwiGLU) of one block's
  rebuilt tensors while it is recomputed, plus the float32 logits and their gradient.
  The attention term follows the kernel the chip runs (printed as `attention=`): dense
  kernels (XLA, chunked) keep [B, N, T, T] scores, flash-style ones (cuDNN on GPU, splash
  on TPU) a [B, N, T] log-sum-exp; with the `sequence` axis every activation holds T/S
  tokens per device and ring attention keeps each ring step's key/value block.

"Fits" means the estimate is at most (1 - --reserve) of the chip's memory; the reserve
stands for what is not modelled (runtime buffers, fragmentation, XLA's own choices).

`--compile` also lowers and compiles the real train step for the same config on this
machine's (fake CPU) devices and prints XLA's `memory_analysis()` beside the estimate;
scale a big preset down with `--set num_layers=2` (and a shorter `--seq`) for that.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from typing import Any, Sequence

from chameleon_jax import configlib
from chameleon_jax.config import MODEL_PRESETS, MeshConfig, ModelConfig, chameleon_ffn_dim
from eval.bench import accelerators
from eval.bench.plan_common import (
    DTYPE_BYTES, _count, _gib, _path_str, _table, abstract_mesh, accelerator_fit, compile_backend, emit,
    estimate_vs_xla, estimate_vs_xla_table, fits_table, local_mesh, memory_figures, mesh_sizes, parse_mesh, shard_bytes,
)
from eval.bench.synthetic import make_trainer




# --------------------------------------------------------------------------- presets


def _chameleon_1b() -> ModelConfig:
    """A ~1.1B-parameter model of the Chameleon family (Llama-style widths, 64K vocabulary),
    sized for one accelerator: used by eval.bench.gpu_check to measure training MFU."""
    return ModelConfig(
        vocab_size=65536, hidden_dim=2048, num_layers=16, num_heads=16, num_kv_heads=16, head_dim=128,
        ffn_dim=chameleon_ffn_dim(2048), max_seq_len=4096, qk_norm="shared", swin_norm=False, dropout=0.0,
        dtype="bfloat16", scan_layers=True, remat_policy="save_dots",
    )


EXTRA_PRESETS = {"chameleon-1b": _chameleon_1b}


def presets() -> dict[str, Any]:
    return {**MODEL_PRESETS, **EXTRA_PRESETS}


# --------------------------------------------------------------------------- mesh


# --------------------------------------------------------------------------- state


@dataclasses.dataclass
class Leaf:
    group: str  # params | optimizer | other
    path: str
    shape: tuple[int, ...]
    dtype: str
    spec: str
    global_bytes: int
    device_bytes: int


def state_leaves(trainer) -> list[Leaf]:
    """Every leaf of the abstract train state with its shard size on the trainer's mesh."""
    import jax
    import numpy as np

    leaves = jax.tree_util.tree_leaves_with_path(trainer.abstract_state)
    shardings = jax.tree.leaves(trainer.state_shardings)
    assert len(leaves) == len(shardings), (len(leaves), len(shardings))
    out = []
    for (path, a), s in zip(leaves, shardings):
        top = str(getattr(path[0], "key", path[0]))
        group = {"params": "params", "opt_state": "optimizer"}.get(top, "other")
        shape = tuple(a.shape)
        if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            itemsize, dtype = 8, "key"  # raw key data: 2 x uint32
        else:
            itemsize, dtype = np.dtype(a.dtype).itemsize, str(np.dtype(a.dtype))
        shard = s.shard_shape(shape)
        out.append(Leaf(group, _path_str(path), shape, dtype, str(s.spec), math.prod(shape) * itemsize,
                        math.prod(shard) * itemsize))
    return out


# --------------------------------------------------------------------------- activations

# What one block keeps for its backward pass under each remat policy: the names of
# `block_tensors` below. The block input (the scan carry) is kept under every policy.
# These lists follow what JAX's autodiff saves for `chameleon_jax.transformer.Block`
# (`jax.ad_checkpoint.saved_residuals`); tests/test_plan.py checks them against it.

# The block tensors that are layers.dense outputs and must be kept for the backward pass
# (the w2 output is not: it only feeds the residual add).
DENSE_OUTPUTS = ("q_raw", "k_raw", "v", "attn_proj", "gate", "up")
SAVED_BY_POLICY = {
    "none": ("x", "attn_norm", "q", "k", "v", "qk_norm", "attn_mask", "attn_logits", "attn_exp", "attn_probs",
             "attn_softmax_stats", "attn_ring", "attn_heads", "ffn_norm", "gate", "up", "silu", "hidden",
             "attn_weights_compute_dtype", "mlp_weights_compute_dtype", "attn_out_weight_view", "attn_dropout_mask",
             "ffn_dropout_mask"),
    "full": ("x",),
    # the projections' outputs (layers.dense, named dense_out, plus any dot_general without
    # batch dimensions); attention's q.k and p.v contractions have batch dims and are recomputed.
    "save_dots": ("x", *DENSE_OUTPUTS),
}
# checkpoint_name -> tensors of one block (save_names policy). The block output (and
# `mlp_out`, which only feeds the final residual add) is the next block's saved input.
NAMED = {"qkv_proj": ("q", "k", "v"), "attn_out": ("attn_proj",), "mlp_hidden": ("hidden",),
         "mlp_out": (), "block_out": (), "dense_out": DENSE_OUTPUTS}


def saved_tensors(cfg: ModelConfig) -> tuple[str, ...]:
    if cfg.remat_policy == "save_names":
        names = []
        for n in cfg.remat_names:
            if n not in NAMED:
                raise configlib.ConfigError(f"remat name {n!r} is not one of {sorted(NAMED)}")
            names.extend(NAMED[n])
        return ("x",) + tuple(dict.fromkeys(names))
    return SAVED_BY_POLICY[cfg.remat_policy]


def ring_size(batch: int, seq: int, mesh, rules) -> int:
    """Devices the rules split a row's tokens over (1: no context parallelism)."""
    from chameleon_jax.sharding import logical_to_spec

    axes = logical_to_spec(("activation_batch", "activation_length"), rules, (batch, seq), mesh)[1]
    axes = () if axes is None else axes if isinstance(axes, tuple) else (axes,)
    return math.prod(mesh.shape[a] for a in axes)


def attention_kernel(cfg: ModelConfig, backend: str, mesh=None, rules=None, batch: int = 1, seq: int = 1) -> str:
    """The training kernel: `ring` where the rules split the tokens over the mesh, else what `auto` resolves to."""
    from chameleon_jax.kernels import resolve_implementation

    if mesh is not None and ring_size(batch, seq, mesh, rules) > 1:
        return "ring"
    return resolve_implementation(cfg.attention_impl, cfg.dtype, cfg.head_dim, backend)


@dataclasses.dataclass(frozen=True)
class Tensor:
    bytes: int  # per device
    what: str
    part: str  # "attn" or "mlp": which half of the block's backward pass reads it ("" = both)


def block_tensors(
    cfg: ModelConfig, batch: int, seq: int, mesh, rules, kernel: str, block_param_bytes: int = 0,
    training: bool = True,
) -> dict[str, Tensor]:
    """The activations of one block that autodiff may keep, per device.

    batch and seq are global; each tensor is sharded by its logical axes and the rules.
    block_param_bytes: one block's parameters per device (for their compute-dtype copies).
    """
    c = DTYPE_BYTES[cfg.dtype]
    p = DTYPE_BYTES[cfg.param_dtype]
    b, t, d, n, k, h, f = batch, seq, cfg.hidden_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.ffn_dim
    btd = ("activation_batch", "activation_length", "activation_embed")
    btn = ("activation_batch", "activation_length", "activation_heads", None)
    btk = ("activation_batch", "activation_length", "activation_kv_heads", None)
    btf = ("activation_batch", "activation_length", "activation_mlp")
    bnt = ("activation_batch", "activation_heads", "activation_length", None)

    def size(shape, axes, itemsize):
        return shard_bytes(shape, axes, rules, mesh, itemsize)

    d_c, d_32 = size((b, t, d), btd, c), size((b, t, d), btd, 4)
    q_c, k_c = size((b, t, n, h), btn, c), size((b, t, k, h), btk, c)
    f_c = size((b, t, f), btf, c)
    half = c != 4  # computing in half precision: norms keep float32 copies of their inputs
    if cfg.swin_norm:
        # norm(attn(x)) and norm(ffn(h)): each keeps its input (the projection output, plus a float32
        # copy in half precision) and its normalised value in float32. The attention's projections
        # read x itself; the SwiGLU reads h, which is kept.
        attn_norm = (d_c + d_32 + (d_32 if half else 0), "norm of the attention output: input, f32 copy, normalised")
        ffn_norm = (2 * d_c + d_32 + (d_32 if half else 0), "norm of the SwiGLU output (as above) + residual h")
    else:
        # pre-norm: each norm keeps its input in float32, its normalised value in float32 and its
        # output (the projections' input). In float32 the attention norm's input is x itself.
        attn_norm = (d_32 + d_c + (d_32 if half else 0), "attention norm: f32 input, normalised f32, output")
        ffn_norm = (2 * d_32 + d_c, "SwiGLU norm: f32 input h, normalised f32, output")
    # Flash-style kernels (cuDNN, splash) keep the output and a log-sum-exp, never [B,N,T,T]; ring
    # attention keeps, per ring step, the key/value block it met and its running statistics.
    flash = kernel in ("cudnn", "splash")
    ring = kernel == "ring"
    stats = size((b, n, t, 1), bnt, 4)
    steps = ring_size(b, t, mesh, rules) if ring else 0
    ring_bytes = steps * (2 * k_c + size((b, t), btd[:2], 4) + 2 * stats + q_c * 4 // c)
    probs = 0 if flash or ring else size((b, n, t, t), bnt, 1)  # elements per device
    attn_params = d * (n + 2 * k) * h + n * h * d
    mlp_params = 3 * d * f
    weights_c = block_param_bytes * c // p if c != p else 0
    drop = size((b, t, d), btd, 1) if cfg.dropout > 0 and training else 0
    T = Tensor
    return {
        "x": T(d_c, "block input [B,T,D]", ""),
        "attn_norm": T(*attn_norm, "attn"),
        "q_raw": T(q_c, "q projection [B,T,N,H]", "attn"),
        "k_raw": T(k_c, "k projection [B,T,K,H]", "attn"),
        "v": T(k_c, "v projection [B,T,K,H]", "attn"),
        "q": T(q_c, "q after QK-norm and RoPE [B,T,N,H]", "attn"),
        "k": T(k_c, "k after QK-norm and RoPE [B,T,K,H]", "attn"),
        "qk_norm": T((2 * (q_c + k_c) * 4 // c) if cfg.qk_norm != "none" else 0,
                     "QK-norm: centred and normalised q, k in f32", "attn"),
        "attn_mask": T(probs, "causal mask [B,N,T,T] bool", "attn"),
        "attn_logits": T(4 * probs, "masked logits [B,N,T,T] f32", "attn"),
        "attn_exp": T(4 * probs, "exp(logits - max) [B,N,T,T] f32", "attn"),
        "attn_probs": T(c * probs, f"probabilities [B,N,T,T] {cfg.dtype}", "attn"),
        "attn_softmax_stats": T(stats if flash else 0, f"{kernel} attention statistics [B,N,T] f32", "attn"),
        "attn_ring": T(ring_bytes, f"ring attention, {steps} steps: each step's k, v block, segment ids, "
                                   "running max, sum and output (f32)", "attn"),
        "attn_heads": T(q_c, "attention output per head [B,T,N,H]", "attn"),
        "attn_proj": T(d_c, "attention output projection [B,T,D]", "attn"),
        "ffn_norm": T(*ffn_norm, "mlp"),
        "gate": T(f_c, "w1 x [B,T,F]", "mlp"),
        "up": T(f_c, "w3 x [B,T,F]", "mlp"),
        "silu": T(3 * f_c, "silu(w1 x): sigmoid, output, product terms [B,T,F]", "mlp"),
        "hidden": T(f_c, "silu(w1 x) * w3 x [B,T,F]", "mlp"),
        # The output projection contracts heads and head_dim as one axis; autodiff keeps that [N*H, D]
        # view of wo. When the compute dtype differs from the parameters', the cast copy (counted in
        # attn_weights_compute_dtype) is what it keeps instead.
        "attn_out_weight_view": T(size((n * h, d), ("heads", "embed"), c) if c == p else 0,
                                  "[N*H, D] view of the attention output weight", "attn"),
        "attn_weights_compute_dtype": T(weights_c * attn_params // (attn_params + mlp_params),
                                        f"attention weights cast to {cfg.dtype}", "attn"),
        "mlp_weights_compute_dtype": T(weights_c * mlp_params // (attn_params + mlp_params),
                                       f"SwiGLU weights cast to {cfg.dtype}", "mlp"),
        "attn_dropout_mask": T(drop, "dropout mask [B,T,D] bool", "attn"),
        "ffn_dropout_mask": T(drop, "dropout mask [B,T,D] bool", "mlp"),
    }


def activation_estimate(
    cfg: ModelConfig, batch: int, seq: int, mesh, rules, kernel: str, block_param_bytes: int = 0
) -> dict[str, Any]:
    """Activation bytes per device of one train step.

    L blocks x what each keeps for the backward pass (`SAVED_BY_POLICY`), plus, under a remat
    policy, the part of one block rebuilt during its backward pass: the backward pass runs
    the SwiGLU half first, then the attention half, so only the larger half's recomputed
    tensors need to be live at once. Plus the float32 logits, their gradient and the final
    norm's input and output.
    """
    tensors = block_tensors(cfg, batch, seq, mesh, rules, kernel, block_param_bytes)
    saved = saved_tensors(cfg)
    per_block = sum(tensors[name].bytes for name in saved)
    recompute = 0
    if cfg.remat_policy != "none":
        rebuilt = [name for name in SAVED_BY_POLICY["none"] if name not in saved]
        recompute = max(sum(tensors[n].bytes for n in rebuilt if tensors[n].part == part) for part in ("attn", "mlp"))
    logits = shard_bytes((batch, seq, cfg.vocab_size), ("activation_batch", "activation_length", "activation_vocab"),
                         rules, mesh, 4)
    head = 2 * logits + 2 * tensors["x"].bytes
    return {
        "saved_tensors": {name: {"bytes": tensors[name].bytes, "what": tensors[name].what}
                          for name in saved if tensors[name].bytes},
        "per_block_bytes": per_block,
        "blocks_bytes": cfg.num_layers * per_block,
        "recompute_bytes": recompute,
        "head_bytes": head,
        "total_bytes": cfg.num_layers * per_block + recompute + head,
        "attention_kernel": kernel,
    }


def block_param_bytes(leaves: list[Leaf], cfg: ModelConfig) -> int:
    """One block's parameters, bytes per device."""
    blocks = [l for l in leaves if l.group == "params" and l.path.startswith("params/blocks/")]
    if cfg.scan_layers:
        return sum(l.device_bytes for l in blocks) // cfg.num_layers
    return sum(l.device_bytes for l in blocks if l.path.startswith("params/blocks/0/"))


def gathered_weights_bytes(leaves: list[Leaf], cfg: ModelConfig, sizes: dict[str, int]) -> int:
    """Largest set of weights all-gathered over `fsdp` at once, with its gradient before reduce-scatter.

    With stacked (scanned) blocks one block is a 1/L slice of every `blocks/...` parameter;
    the output projection and the embedding are gathered on their own.
    """
    fsdp = sizes["fsdp"]
    if fsdp == 1:
        return 0
    params = [l for l in leaves if l.group == "params"]

    def gathered(l: Leaf) -> int:
        return l.device_bytes * (fsdp if "fsdp" in l.spec else 1)

    blocks = [l for l in params if l.path.startswith("params/blocks/")]
    if cfg.scan_layers:
        block = sum(gathered(l) for l in blocks) // cfg.num_layers
    else:
        block = sum(gathered(l) for l in blocks if l.path.startswith("params/blocks/0/"))
    others = [gathered(l) for l in params if not l.path.startswith("params/blocks/")]
    return 2 * max([block] + others)


# --------------------------------------------------------------------------- the plan


def step_flops_per_device(cfg: ModelConfig, batch: int, seq: int, devices: int) -> float:
    from chameleon_jax.transformer import flops_per_token

    return flops_per_token(cfg, seq) * batch * seq / devices


def make_plan(
    cfg: ModelConfig,
    mesh_cfg: MeshConfig,
    *,
    batch: int,
    seq: int,
    num_devices: int | None = None,
    accelerator: str | None = None,
    backend: str | None = None,
    reserve: float = 0.1,
) -> dict[str, Any]:
    """The memory plan as a JSON-able dict (bytes per device)."""
    from chameleon_jax.transformer import count_params

    sizes = mesh_sizes(mesh_cfg, num_devices)
    devices = math.prod(sizes.values())
    if seq > cfg.max_seq_len:
        raise configlib.ConfigError(f"--seq {seq} exceeds the model's max_seq_len {cfg.max_seq_len}")
    batch_shards = sizes["data"] * sizes["fsdp"]
    if batch % batch_shards:
        raise configlib.ConfigError(
            f"--batch {batch} does not split over data*fsdp = {batch_shards} devices (rows are sharded over both)"
        )
    if seq % sizes["sequence"]:
        raise configlib.ConfigError(f"--seq {seq} does not split over sequence = {sizes['sequence']} devices")
    mesh = abstract_mesh(sizes)
    rules = mesh_cfg.rules
    trainer = make_trainer(cfg, mesh, rules)
    leaves = state_leaves(trainer)
    acc = accelerators.get(accelerator) if accelerator else None
    if backend is None:
        backend = acc.backend if acc is not None else "tpu"
    block_bytes = block_param_bytes(leaves, cfg)

    def total(group):
        return sum(l.device_bytes for l in leaves if l.group == group)

    def parts_for(backend: str) -> tuple[dict[str, int], dict[str, Any]]:
        kernel = attention_kernel(cfg, backend, mesh, rules, batch, seq)
        acts = activation_estimate(cfg, batch, seq, mesh, rules, kernel, block_bytes)
        param_bytes = total("params")
        return {
            "params": param_bytes,
            "optimizer": total("optimizer"),
            "other_state": total("other"),
            "gradients": param_bytes,
            "gathered_weights": gathered_weights_bytes(leaves, cfg, sizes),
            "activations": acts["total_bytes"],
        }, acts

    parts, acts = parts_for(backend)
    total_bytes = sum(parts.values())
    num_params = sum(math.prod(l.shape) for l in leaves if l.group == "params")
    assert num_params == count_params(cfg), (num_params, count_params(cfg))

    def fit(a: accelerators.Accelerator) -> dict[str, Any]:
        # Each chip with the attention kernel it would run (cuDNN flash attention on GPUs, splash on TPUs).
        needed = total_bytes if a.backend == backend else sum(parts_for(a.backend)[0].values())
        return accelerator_fit(a, needed, reserve)

    flops = step_flops_per_device(cfg, batch, seq, devices)
    return {
        "model": {k: getattr(cfg, k) for k in ("vocab_size", "hidden_dim", "num_layers", "num_heads", "num_kv_heads",
                                               "head_dim", "ffn_dim", "dtype", "param_dtype", "remat_policy",
                                               "scan_layers", "swin_norm", "dropout")},
        "num_params": num_params,
        "mesh": sizes,
        "devices": devices,
        "batch": batch,
        "seq": seq,
        "rows_per_device": batch // batch_shards,
        "tokens_per_row_per_device": seq // sizes["sequence"],
        "bytes_per_device": parts,
        "total_bytes_per_device": total_bytes,
        "activations": acts,
        "parameters": [dataclasses.asdict(l) for l in leaves if l.group == "params"],
        "reserve_fraction": reserve,
        "accelerator": fit(acc) if acc else None,
        "all_accelerators": [fit(a) for a in accelerators.ACCELERATORS.values()],
        "train_flops_per_device_per_step": flops,
        "ideal_step_seconds": ({"at_peak_bf16": flops / acc.peak_bf16_flops} if acc else None),
    }


# --------------------------------------------------------------------------- compiler check


def compiled_memory(cfg: ModelConfig, mesh_cfg: MeshConfig, *, batch: int, seq: int) -> dict[str, Any]:
    """XLA's memory analysis of the real, sharded train step compiled for local devices.

    Needs as many local devices as the mesh has (on CPU: XLA_FLAGS
    --xla_force_host_platform_device_count). Figures are per device.
    """
    import numpy as np

    from chameleon_jax.sequence import BATCH_DTYPES

    sizes = mesh_sizes(mesh_cfg, None)
    trainer = make_trainer(cfg, local_mesh(mesh_cfg), mesh_cfg.rules)
    out = memory_figures(trainer.lower_train_step((batch, seq)).compile())
    token_bytes = sum(np.dtype(d).itemsize for d in BATCH_DTYPES.values())
    out["batch_bytes"] = batch * seq * token_bytes // (sizes["data"] * sizes["fsdp"] * sizes["sequence"])
    out["state_bytes"] = out["argument_bytes"] - out["batch_bytes"]
    return out


def compared(plan: dict[str, Any], xla: dict[str, Any]) -> dict[str, tuple[str, int, int]]:
    """The two quantities the estimate and the compiler both give: the state the step keeps, against
    XLA's arguments less the batch; and what lives only during the step, against XLA's temporaries."""
    p = plan["bytes_per_device"]
    state = p["params"] + p["optimizer"] + p["other_state"]
    transient = p["gradients"] + p["gathered_weights"] + p["activations"]
    return {
        "state_estimate_over_xla": ("state (params + optimizer + other)", state, xla["state_bytes"]),
        "transient_estimate_over_xla_temp": ("transient (grads + gathered + activations)", transient,
                                             xla["temp_bytes"]),
    }


def compare(plan: dict[str, Any], xla: dict[str, Any]) -> dict[str, float]:
    """Ratios estimate / compiler for the two comparable quantities."""
    return estimate_vs_xla(compared(plan, xla))


# --------------------------------------------------------------------------- output


def render(plan: dict[str, Any], preset: str, xla: dict[str, Any] | None = None, brief: bool = False) -> str:
    m = plan["model"]
    mesh = ",".join(f"{a}={s}" for a, s in plan["mesh"].items())
    out = [
        f"{preset}: {_count(plan['num_params'])} params (L={m['num_layers']}, D={m['hidden_dim']}, "
        f"heads={m['num_heads']}/{m['num_kv_heads']}kv, F={m['ffn_dim']}, V={m['vocab_size']}); "
        f"compute {m['dtype']}, params {m['param_dtype']}, remat={m['remat_policy']}, "
        f"attention={plan['activations']['attention_kernel']}",
        f"mesh {mesh} ({plan['devices']} devices); global batch {plan['batch']} x {plan['seq']} tokens, "
        f"{plan['rows_per_device']} row(s) per device"
        + (f", {plan['tokens_per_row_per_device']} tokens of each (context parallel, ring attention)"
           if plan["mesh"]["sequence"] > 1 else ""),
        "",
    ]
    # Parameters grouped by name (stacked blocks are one row each).
    prow = [[p["path"].replace("params/", ""), "x".join(map(str, p["shape"])), p["dtype"], p["spec"],
             _gib(p["device_bytes"])] for p in plan["parameters"]]
    if not brief:
        out += [_table(prow, ["parameter", "shape", "dtype", "sharding", "per device"]), ""]
    p = plan["bytes_per_device"]
    acts = plan["activations"]
    what = {
        "params": "parameters",
        "optimizer": "optimizer state (AdamW mu, nu)",
        "other_state": "step counter, RNG",
        "gradients": "gradients (param dtype, sharded like params)",
        "gathered_weights": "largest block gathered over fsdp (+ its grads)",
        "activations": f"activations: {m['num_layers']} x {_gib(acts['per_block_bytes'])} saved"
                       f" + {_gib(acts['recompute_bytes'])} recompute + {_gib(acts['head_bytes'])} logits",
    }
    rows = [[what[k], _gib(v)] for k, v in p.items()]
    rows.append(["total", _gib(plan["total_bytes_per_device"])])
    if xla is not None:
        out += [estimate_vs_xla_table(compared(plan, xla), plan, xla)]
        if xla["backend"] == "cpu" and m["dtype"] != "float32":
            out.append(f"(XLA:CPU computes {m['dtype']} in float32, so its transient figure runs high here)")
        out.append("")
    out += [_table(rows, ["memory per device", "bytes"]), ""]
    if not brief:
        srows = [[name, v["what"], _gib(v["bytes"])] for name, v in acts["saved_tensors"].items()]
        out += [f"kept per block for the backward pass (remat={m['remat_policy']}):",
                _table(srows, ["tensor", "what", "per device"]), ""]
    out += [f"fits (estimate <= {100 * (1 - plan['reserve_fraction']):.0f}% of memory; each chip with the attention "
            f"kernel it runs):",
            fits_table(plan, brief)]
    if plan["ideal_step_seconds"]:
        out += ["", f"step time at 100% of peak bf16 FLOP/s: {plan['ideal_step_seconds']['at_peak_bf16']:.3f} s "
                    f"({plan['train_flops_per_device_per_step'] / 1e12:.1f} TFLOP per device per step)"]
    return "\n".join(out)


# --------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m eval.bench.plan", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="chameleon-7b", help=f"model preset: {', '.join(presets())}")
    p.add_argument("--mesh", default="fsdp=8", help="mesh sizes, e.g. data=2,fsdp=16,tensor=2 (unnamed sizes are 1; "
                                                  "dcn_data=... for multi-slice)")
    p.add_argument("--devices", type=int, default=None, help="total devices (only needed when a mesh size is -1)")
    p.add_argument("--batch", type=int, required=True, help="global batch in rows (sequences)")
    p.add_argument("--seq", type=int, default=None, help="tokens per row (default: the preset's max_seq_len)")
    p.add_argument("--remat", choices=["none", "full", "save_dots", "save_names"], default=None,
                   help="remat policy (default: the preset's)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="compute dtype (default: preset's)")
    p.add_argument("--param-dtype", choices=["float32", "bfloat16"], default=None, help="parameter storage dtype")
    p.add_argument("--accelerator", default=None, help=f"one of {', '.join(accelerators.ACCELERATORS)}")
    p.add_argument("--reserve", type=float, default=0.1,
                   help="fraction of device memory kept free for what the estimate leaves out (runtime, fragmentation)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="other ModelConfig fields, e.g. num_layers=2")
    p.add_argument("--compile", action="store_true",
                   help="also compile the real train step on local (fake CPU) devices and print XLA's memory analysis")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.add_argument("--brief", action="store_true", help="leave out the per-parameter and per-tensor tables")
    p.add_argument("--mode", choices=["train", "generate"], default="train",
                   help="plan a train step, or generation (eval.bench.plan_generate: --context, --prompt-len, --guidance)")
    p.add_argument("--context", type=int, default=None, help="generate: KV cache length (default: max_seq_len)")
    p.add_argument("--prompt-len", type=int, default=None, help="generate: prompt tokens prefilled (default: context/2)")
    p.add_argument("--guidance", choices=["none", "two", "three"], default="none",
                   help="generate: classifier-free guidance streams per prompt")
    return p


def resolve_model(args) -> ModelConfig:
    table = presets()
    if args.preset not in table:
        raise configlib.ConfigError(f"unknown preset {args.preset!r}; known presets: {', '.join(table)}")
    cfg = table[args.preset]()
    overrides = list(args.set)
    for flag, key in ((args.remat, "remat_policy"), (args.dtype, "dtype"), (args.param_dtype, "param_dtype")):
        if flag is not None:
            overrides.append(f"{key}={flag}")
    return configlib.apply_overrides(cfg, overrides)


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.accelerator:
        try:
            accelerators.get(args.accelerator)
        except KeyError as e:
            raise configlib.ConfigError(str(e.args[0])) from None
    cfg = resolve_model(args)
    mesh_cfg = parse_mesh(args.mesh)
    if args.mode == "generate":
        from eval.bench import plan_generate

        return plan_generate.main(args, cfg, mesh_cfg)
    seq = args.seq or cfg.max_seq_len
    backend = compile_backend(args, mesh_cfg)  # with --compile the estimate describes the program XLA compiles here
    plan = make_plan(cfg, mesh_cfg, batch=args.batch, seq=seq, num_devices=args.devices,
                     accelerator=args.accelerator, backend=backend, reserve=args.reserve)
    xla = None
    if args.compile:
        xla = compiled_memory(cfg, mesh_cfg, batch=args.batch, seq=seq)
        plan["xla"] = xla
        plan["estimate_over_xla"] = compare(plan, xla)
    emit(args, plan, xla, render)


if __name__ == "__main__":
    configlib.main_guard(main)

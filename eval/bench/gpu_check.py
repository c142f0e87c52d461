"""One-accelerator performance check: training MFU and decode speed against the chip's limits.

    python -m eval.bench.gpu_check              # on one H100/H200/TPU: several minutes (the Jacobi part alone 4 on an H200)
    python -m eval.bench.gpu_check --smoke      # tiny shapes, seconds, any machine (the CPU test runs this)

Prints one JSON object on stdout (progress goes to stderr):

- train: the project's sharded `Trainer` step (forward, backward, AdamW) on the
  `chameleon-1b` preset (eval.bench.plan.EXTRA_PRESETS) at bfloat16 compute, float32 parameters,
  with a real sequence length, synthetic packed rows, timed after warmup. MFU = model
  FLOPs per token (`transformer.flops_per_token`: 6N + attention) x tokens/s / the chip's
  peak dense bf16 FLOP/s (eval.bench.accelerators); also against a bf16 matmul measured here.
  The memory planner's estimate for the same step sits beside the device's peak bytes.
- decode: a 7B-shaped model (`chameleon-7b` shapes, random bf16 weights; its stacked layers
  unstacked first, as generation does, unless `--decode-stacked`) decoding one
  token per step with `Transformer.decode` and its fixed-size KV cache, in one compiled
  `fori_loop` of `decode_steps` steps (like the project's generation loop), timed after
  a warmup call, at each batch size. Bytes per step = every weight read once (the
  embedding table only for the rows looked up) + the whole KV cache (the decode step
  attends over the fixed-size cache, masked), so `hbm_fraction` = bytes per step /
  step time / the chip's HBM bandwidth is the fraction of the memory-bound limit reached.

- jacobi: seconds and forward passes per generated picture of `jacobi_codes` codes (1024, a
  512 px Chameleon picture), batch 1, sampled at temperature 1, without and with two-stream
  guidance, decoded sequentially and by speculative Jacobi decoding (window `jacobi_window`),
  on random bf16 models of the `small` preset and of `chameleon-7b`'s shapes, through
  `generation.generate_tokens` (the loop `Pipeline.generate` runs). Random weights accept few
  drafts compared with a trained model; the passes column says how many.

Only the model, sharding, train step and optimizer are imported (no data sets, no
TFDS or grain), so this runs on a machine with nothing but JAX, Flax and Optax.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
import traceback
from typing import Any, Sequence

from chameleon_jax import configlib
from chameleon_jax.config import MeshConfig, ModelConfig
from eval.bench import accelerators, plan, synthetic


def log(msg: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _preset(name: str, overrides: Sequence[str]) -> ModelConfig:
    table = plan.presets()
    if name not in table:
        raise configlib.ConfigError(f"unknown preset {name!r}; known: {', '.join(table)}")
    return configlib.apply_overrides(table[name](), list(overrides))


def _device_peak_bytes() -> int | None:
    import jax

    stats = jax.local_devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


# --------------------------------------------------------------------------- training


def check_train(cfg: ModelConfig, *, batch: int, seq: int, steps: int, warmup: int,
                acc: accelerators.Accelerator | None) -> dict[str, Any]:
    import jax
    import numpy as np

    from chameleon_jax.sharding import build_mesh
    from chameleon_jax.transformer import count_params, flops_per_token
    from train.optim import OptimConfig
    from train.step import dense_matmul_flops

    devices = jax.device_count()
    mesh_cfg = MeshConfig(data=-1, fsdp=1, tensor=1)
    estimate = plan.make_plan(cfg, mesh_cfg, batch=batch, seq=seq, num_devices=devices,
                              backend=jax.default_backend())
    mesh = build_mesh(mesh_cfg)
    trainer = synthetic.make_trainer(cfg, mesh, mesh_cfg.rules, OptimConfig(warmup_steps=1), steps + warmup + 2)
    data = synthetic.device_batch(trainer, batch, seq)

    t0 = time.perf_counter()
    state = trainer.init_state()
    jax.block_until_ready(state)
    init_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    state, metrics = trainer.train_step(state, data)  # compiles
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - t0
    for _ in range(warmup):
        state, metrics = trainer.train_step(state, data)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, metrics = trainer.train_step(state, data)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    step_s = float(np.median(times))
    tokens_per_s = batch * seq / step_s
    model_flops_per_s = flops_per_token(cfg, seq) * tokens_per_s
    # Big enough that the timing overhead is small against the matmul on an accelerator.
    matmul = dense_matmul_flops(8192 if acc else 512, 10, dtype=jax.numpy.bfloat16)
    plan_total = estimate["total_bytes_per_device"]
    return {
        "params": count_params(cfg),
        "batch": batch,
        "seq": seq,
        "dtype": cfg.dtype,
        "param_dtype": cfg.param_dtype,
        "remat": cfg.remat_policy,
        "attention": plan.attention_kernel(cfg, jax.default_backend()),
        "init_s": init_s,
        "first_step_s": compile_s,
        "step_s_median": step_s,
        "step_s_min": float(np.min(times)),
        "tokens_per_s": tokens_per_s,
        "model_flops_per_token": flops_per_token(cfg, seq),
        "model_tflops_per_s": model_flops_per_s / 1e12,
        "mfu": model_flops_per_s / (acc.peak_bf16_flops * devices) if acc else None,
        "measured_bf16_matmul_tflops": matmul / 1e12,
        "mfu_vs_measured_matmul": model_flops_per_s / (matmul * devices),
        "final_loss": float(metrics["loss"]),
        "planned_bytes_per_device": plan_total,
        "device_peak_bytes": _device_peak_bytes(),
    }


# --------------------------------------------------------------------------- decoding


def decode_bytes_per_step(cfg: ModelConfig, batch: int, cache_len: int) -> dict[str, int]:
    """HBM bytes one single-token decode step must read: weights once, the embedding rows
    looked up, and the whole fixed-size KV cache (keys and values of every layer)."""
    from chameleon_jax.transformer import count_params

    w = plan.DTYPE_BYTES[cfg.param_dtype]
    c = plan.DTYPE_BYTES[cfg.dtype]
    weights = count_params(cfg, include_embedding=False) * w + batch * cfg.hidden_dim * w
    kv = 2 * cfg.num_layers * batch * cache_len * cfg.num_kv_heads * cfg.head_dim * c
    return {"weights": weights, "kv_cache": kv, "total": weights + kv}


def check_decode(cfg: ModelConfig, *, batches: Sequence[int], steps: int, cache_len: int, context: int,
                 acc: accelerators.Accelerator | None, repeats: int = 3, unstack: bool = True) -> dict[str, Any]:
    import functools

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from chameleon_jax.sharding import build_mesh
    from chameleon_jax.transformer import count_params, create_sharded_model, unstack_layers

    if context + steps > cache_len:
        raise configlib.ConfigError(f"context {context} + decode steps {steps} exceed the cache ({cache_len})")
    mesh_cfg = MeshConfig(data=1, fsdp=1, tensor=1)
    mesh = build_mesh(mesh_cfg, jax.local_devices()[:1])
    t0 = time.perf_counter()
    # Decoded as the project's generation decodes it: a stacked model is unstacked first
    # (`transformer.unstack_layers`; slicing the stack inside the loop copies every layer's weights per step).
    model = create_sharded_model(cfg, mesh, mesh_cfg.rules, seed=0)
    stacked = model.cfg.scan_layers
    model = unstack_layers(model) if unstack else model
    graphdef, state = nnx.split(model)
    jax.block_until_ready(state)
    init_s = time.perf_counter() - t0
    del model

    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    @functools.partial(jax.jit, donate_argnums=(1,), out_shardings=replicated)
    def run(state, cache, token_b, start):
        b = token_b.shape[0]
        slots = jnp.arange(cache_len, dtype=jnp.int32)

        def body(i, carry):
            token_b, cache = carry
            index = start + i
            kv_mask_bs = jnp.broadcast_to(slots <= index, (b, cache_len))
            # A fresh model per trace level: nnx.scan inside decode refuses outer-trace variables.
            m = nnx.merge(graphdef, jax.tree.map(lambda x: x, state), copy=True)
            positions = jnp.full((b, 1), index, jnp.int32)
            logits_btv, cache = m.decode(token_b[:, None], positions, cache, index, kv_mask_bs)
            return jnp.argmax(logits_btv[:, -1], axis=-1).astype(jnp.int32), cache

        return jax.lax.fori_loop(0, steps, body, (token_b, cache))

    out = []
    for b in batches:
        row: dict[str, Any] = {"batch": b, "decode_steps": steps, "cache_len": cache_len, "context": context}
        # Inputs placed as the outputs will be, so the timed calls reuse the first call's compilation.
        cache = jax.device_put(nnx.merge(graphdef, state).init_cache(b, cache_len), replicated)
        token = jax.device_put(jnp.zeros((b,), jnp.int32), replicated)
        start = jax.device_put(jnp.int32(context), replicated)
        t0 = time.perf_counter()
        token, cache = run(state, cache, token, start)  # compiles
        jax.block_until_ready(token)
        row["first_call_s"] = time.perf_counter() - t0
        seconds = math.inf
        for _ in range(repeats):
            t0 = time.perf_counter()
            token, cache = run(state, cache, token, start)
            jax.block_until_ready(token)
            seconds = min(seconds, time.perf_counter() - t0)
        step_s = seconds / steps
        nbytes = decode_bytes_per_step(cfg, b, cache_len)
        row.update(
            step_ms=1e3 * step_s,
            tokens_per_s=b * steps / seconds,
            bytes_per_step=nbytes["total"],
            weight_bytes_per_step=nbytes["weights"],
            kv_bytes_per_step=nbytes["kv_cache"],
            achieved_gb_per_s=nbytes["total"] / step_s / 1e9,
            hbm_fraction=(nbytes["total"] / step_s / acc.hbm_bandwidth) if acc else None,
            memory_bound_step_ms=(1e3 * nbytes["total"] / acc.hbm_bandwidth) if acc else None,
        )
        out.append(row)
        del cache
        log(f"decode batch {b}: {row['tokens_per_s']:.1f} tokens/s, {row['step_ms']:.2f} ms/step")
    return {"params": count_params(cfg), "dtype": cfg.dtype, "param_dtype": cfg.param_dtype,
            "layers": "stacked" if stacked and not unstack else "unstacked" if stacked else "unrolled",
            "attention": plan.attention_kernel(cfg, jax.default_backend()), "init_s": init_s, "runs": out}


# --------------------------------------------------------------------------- Jacobi image decoding


def bench_vocabulary(size: int, codebook_size: int):
    """A vocabulary of `size` ids for random-weight timings: the six specials, then
    `codebook_size` image codes, then text pieces (no text backend: prompts are ids)."""
    import numpy as np

    from chameleon_jax.vocab import Vocabulary

    specials = dict(pad=0, bos=1, eos=2, boi=3, eoi=4, eot=5)
    first_code = len(specials)
    if first_code + codebook_size >= size:
        raise configlib.ConfigError(f"a vocabulary of {size} ids cannot hold {codebook_size} image codes and text")
    pieces = np.zeros([size], bool)
    pieces[first_code + codebook_size:] = True
    return Vocabulary(kind="bench", size=size, specials=specials,
                      code_to_id=np.arange(first_code, first_code + codebook_size, dtype=np.int32),
                      text_piece_mask=pieces, text_backend=None)


def check_jacobi(cfg: ModelConfig, *, codes: int, window: int, cfg_scale: float, prompt_len: int,
                 repeats: int) -> dict[str, Any]:
    """Seconds (best of `repeats`, after a compiling call) and forward passes per picture,
    sequential against Jacobi, plain and guided, one picture at a time."""
    import jax
    import numpy as np

    from chameleon_jax.generation import Guidance, SamplingParams, freeze, generate_tokens
    from chameleon_jax.sharding import build_mesh
    from chameleon_jax.transformer import count_params, create_sharded_model
    from eval.bench.decode import best_seconds

    need = prompt_len + codes + 2 + window
    cfg = dataclasses.replace(cfg, max_seq_len=max(cfg.max_seq_len, need))
    vocab = bench_vocabulary(cfg.vocab_size, codebook_size=min(8192, cfg.vocab_size // 2))
    mesh_cfg = MeshConfig(data=1, fsdp=1, tensor=1)
    t0 = time.perf_counter()
    mesh = build_mesh(mesh_cfg, jax.local_devices()[:1])
    model = freeze(create_sharded_model(cfg, mesh, mesh_cfg.rules, seed=0))  # unstacked, as generation runs it
    jax.block_until_ready(model.state)
    init_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    text_ids = np.flatnonzero(vocab.text_token_mask)
    prompt = [vocab.bos_id, *rng.choice(text_ids, prompt_len - 1).tolist()]
    rows = []
    for name, guidance in (("plain", Guidance()), ("guided", Guidance("two", scale=cfg_scale))):
        row: dict[str, Any] = {"guidance": name}
        for decoding in ("sequential", "jacobi"):
            passes, seeds = [], iter(range(1000))

            def one_picture():
                out = generate_tokens(model, vocab, [prompt], modality="image", max_new_tokens=codes + 2,
                                      image=SamplingParams(1.0), guidance=guidance, codes_per_image=codes,
                                      seed=next(seeds), image_decoding=decoding, jacobi_window=window)
                if len(out.tokens[0]) != codes + 2 or out.tokens[0][-1] != vocab.eoi_id:
                    raise RuntimeError(f"{decoding}: a picture of {len(out.tokens[0]) - 2} codes, not {codes}")
                passes.append(out.steps)

            t0 = time.perf_counter()
            row[f"{decoding}_s"] = best_seconds(one_picture, repeats)
            row[f"{decoding}_total_s"] = time.perf_counter() - t0
            row[f"{decoding}_passes"] = float(np.mean(passes))
        row["passes_ratio"] = row["sequential_passes"] / row["jacobi_passes"]
        row["speedup"] = row["sequential_s"] / row["jacobi_s"]
        rows.append(row)
        log(f"jacobi {name}: sequential {row['sequential_s']:.3f} s ({row['sequential_passes']:.0f} passes), "
            f"jacobi {row['jacobi_s']:.3f} s ({row['jacobi_passes']:.0f} passes): {row['speedup']:.2f}x")
    return {"params": count_params(cfg), "dtype": cfg.dtype, "param_dtype": cfg.param_dtype, "codes": codes,
            "window": window, "cfg_scale": cfg_scale, "prompt_len": prompt_len, "temperature": 1.0,
            "attention": plan.attention_kernel(cfg, jax.default_backend()), "init_s": init_s, "runs": rows}


# --------------------------------------------------------------------------- CLI


@dataclasses.dataclass(frozen=True)
class Shapes:
    """What is run: the training preset and its step, the decoding preset and its loop, the
    presets whose pictures are decoded sequentially and by Jacobi decoding."""

    train_preset: str
    train_overrides: tuple[str, ...]
    train_batch: int
    train_seq: int
    train_steps: int
    train_warmup: int
    decode_preset: str
    decode_overrides: tuple[str, ...]
    decode_batches: tuple[int, ...]
    decode_steps: int
    cache_len: int
    context: int
    jacobi_presets: tuple[str, ...]
    jacobi_overrides: tuple[str, ...]
    jacobi_codes: int
    jacobi_window: int
    jacobi_repeats: int


FULL = Shapes("chameleon-1b", ("dtype=bfloat16", "param_dtype=float32", "remat_policy=save_dots"), 8, 2048, 10, 2,
              "chameleon-7b", ("dtype=bfloat16", "param_dtype=bfloat16", "dropout=0.0"), (1, 16), 128, 1024, 512,
              ("small", "chameleon-7b"), ("dtype=bfloat16", "param_dtype=bfloat16", "dropout=0.0"), 1024, 16, 2)
SMOKE = Shapes("tiny", ("dtype=bfloat16", "param_dtype=float32", "remat_policy=save_dots", "scan_layers=true"),
               2, 64, 2, 1, "tiny", ("dtype=bfloat16", "param_dtype=bfloat16", "scan_layers=true"), (1, 2), 4, 32, 16,
               ("tiny",), ("dtype=bfloat16", "param_dtype=bfloat16", "scan_layers=true"), 12, 4, 1)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m eval.bench.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes (seconds on a CPU); checks the script, not the chip")
    p.add_argument("--accelerator", default=None,
                   help="spec to compare against (default: detected from the device kind; none on CPU)")
    p.add_argument("--train-batch", type=int, default=None)
    p.add_argument("--train-seq", type=int, default=None)
    p.add_argument("--train-steps", type=int, default=None)
    p.add_argument("--remat", choices=["none", "full", "save_dots", "save_names"], default=None)
    p.add_argument("--decode-batches", default=None, help="comma-separated batch sizes, e.g. 1,16")
    p.add_argument("--decode-steps", type=int, default=None)
    p.add_argument("--train-set", action="append", default=[], metavar="KEY=VALUE",
                   help="model config override for the training part (repeatable), e.g. scan_layers=false")
    p.add_argument("--decode-set", action="append", default=[], metavar="KEY=VALUE",
                   help="model config override for the decoding part (repeatable), e.g. scan_layers=false")
    p.add_argument("--decode-stacked", action="store_true",
                   help="decode a scan_layers model on its stacked layers (the slow form generation avoids) "
                        "instead of unstacking it first")
    p.add_argument("--jacobi-presets", default=None,
                   help="comma-separated presets whose pictures are timed, e.g. small,chameleon-7b")
    p.add_argument("--jacobi-codes", type=int, default=None, help="codes per picture of the Jacobi timings")
    p.add_argument("--jacobi-window", type=int, default=None, help="drafts verified per pass by Jacobi decoding")
    p.add_argument("--skip", choices=["train", "decode", "jacobi"], action="append", default=[],
                   help="leave a part out")
    p.add_argument("--out", default="", help="also write the JSON here")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import jax

    shapes = SMOKE if args.smoke else FULL
    over = {}
    if args.train_batch:
        over["train_batch"] = args.train_batch
    if args.train_seq:
        over["train_seq"] = args.train_seq
    if args.train_steps:
        over["train_steps"] = args.train_steps
    if args.remat:
        over["train_overrides"] = shapes.train_overrides + (f"remat_policy={args.remat}",)
    if args.train_set:
        over["train_overrides"] = over.get("train_overrides", shapes.train_overrides) + tuple(args.train_set)
    if args.decode_set:
        over["decode_overrides"] = shapes.decode_overrides + tuple(args.decode_set)
    if args.decode_batches:
        over["decode_batches"] = tuple(int(b) for b in args.decode_batches.split(","))
    if args.decode_steps:
        over["decode_steps"] = args.decode_steps
    if args.jacobi_presets:
        over["jacobi_presets"] = tuple(args.jacobi_presets.split(","))
    if args.jacobi_codes:
        over["jacobi_codes"] = args.jacobi_codes
    if args.jacobi_window:
        over["jacobi_window"] = args.jacobi_window
    shapes = dataclasses.replace(shapes, **over)

    device = jax.local_devices()[0]
    if args.accelerator:
        try:
            acc = accelerators.get(args.accelerator)
        except KeyError as e:
            raise configlib.ConfigError(str(e.args[0])) from None
    else:
        acc = accelerators.detect(device.device_kind)
    result: dict[str, Any] = {
        "smoke": args.smoke,
        "device_kind": device.device_kind,
        "platform": device.platform,
        "devices": jax.device_count(),
        "jax_version": jax.__version__,
        "accelerator": dataclasses.asdict(acc) if acc else None,
        "errors": {},
    }
    t_all = time.perf_counter()
    parts = {
        "train": (shapes.train_preset, shapes.train_overrides, lambda cfg: check_train(
            cfg, batch=shapes.train_batch, seq=shapes.train_seq, steps=shapes.train_steps,
            warmup=shapes.train_warmup, acc=acc)),
        "decode": (shapes.decode_preset, shapes.decode_overrides, lambda cfg: check_decode(
            cfg, batches=shapes.decode_batches, steps=shapes.decode_steps, cache_len=shapes.cache_len,
            context=shapes.context, acc=acc, unstack=not args.decode_stacked)),
    }
    if "jacobi" not in args.skip:
        for preset in shapes.jacobi_presets:
            parts[f"jacobi_{preset}"] = (preset, shapes.jacobi_overrides, lambda cfg: check_jacobi(
                cfg, codes=shapes.jacobi_codes, window=shapes.jacobi_window, cfg_scale=3.0, prompt_len=16,
                repeats=shapes.jacobi_repeats))
    for part, (preset, overrides, fn) in parts.items():
        if part in args.skip:
            continue
        cfg = _preset(preset, overrides)
        log(f"{part}: {preset} {' '.join(overrides)}")
        try:
            result[part] = {"preset": preset, "overrides": list(overrides), **_with_fallback(fn, cfg, part, result)}
        except Exception as e:  # report it and go on with the next part
            result["errors"][part] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
    result["total_s"] = time.perf_counter() - t_all
    # This must run where the data-set stack is absent: none of it may have been imported.
    result["data_modules_loaded"] = sorted(
        m for m in sys.modules if m.split(".")[0] in ("tensorflow", "tensorflow_datasets", "grain", "array_record"))
    text = json.dumps(result)
    print(text, flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 1 if result["errors"] else 0


def _with_fallback(fn, cfg: ModelConfig, part: str, result: dict[str, Any]) -> dict[str, Any]:
    """Runs fn(cfg); if the cuDNN attention kernel fails, records why and runs it again with XLA's."""
    import jax

    try:
        return fn(cfg)
    except Exception as e:
        if plan.attention_kernel(cfg, jax.default_backend()) != "cudnn":
            raise
        result.setdefault("attention_fallbacks", {})[part] = f"cudnn: {type(e).__name__}: {str(e)[:500]}"
        log(f"{part}: cuDNN attention failed ({type(e).__name__}); again with attention_impl=xla")
    # Outside the except block, so the failed attempt's buffers (held by the traceback) are freed first.
    return fn(dataclasses.replace(cfg, attention_impl="xla"))


def cli() -> None:
    """Entry point: exit status 1 if a part failed (its error is in the JSON), 2 for a bad request."""
    status = 0

    def go():
        nonlocal status
        status = main()

    configlib.main_guard(go)
    raise SystemExit(status)


if __name__ == "__main__":
    cli()

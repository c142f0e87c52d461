"""Train-step throughput: tokens/s, achieved FLOP/s and MFU against this machine's dense-matmul peak.

    python -m eval.bench.train                         # the `small` model
    python -m eval.bench.train preset=tiny batch_size=16 seq_len=256 model.dtype=bfloat16
    python -m eval.bench.train cpu_devices=0          # the devices as XLA_FLAGS gives them
    python -m eval.bench.train model.attention_impl=xla seq_len=2048 batch_size=4 model.max_seq_len=2048
    python -m eval.bench.train seq_len=8192 batch_size=1 model.max_seq_len=8192 mesh.data=1 mesh.sequence=2

MFU = model FLOPs per token (transformer.flops_per_token: 6N + attention, forward
and backward) x tokens/s / peak FLOP/s. The peak is measured in the same process
with a jitted n x n float32 matmul (best of several), once before and once after
the timed steps; the higher of the two is used, so a machine shared with other
work lowers the ratio rather than inflating it. The batch is synthetic (random
tokens packed as several documents per row) and stays on device: this measures
the compiled train step (forward, backward, AdamW update), not the input pipeline.

On CPU the host is split into `cpu_devices` XLA devices with a data-parallel mesh
(mesh.data=-1 fills them): XLA runs each device's element-wise kernels on its own
thread, which keeps both cores busy outside the matmuls.
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np

from chameleon_jax import configlib
from chameleon_jax.config import MODEL_PRESETS, MeshConfig, ModelConfig
from chameleon_jax.configlib import param
from train.optim import OptimConfig


@dataclasses.dataclass(frozen=True)
class BenchTrainConfig:
    """What to time."""

    model: ModelConfig = param(MODEL_PRESETS["small"](), "the transformer")
    mesh: MeshConfig = param(MeshConfig(), "device mesh and sharding rules")
    optim: OptimConfig = param(OptimConfig(), "optimizer (its cost is part of the step)")
    batch_size: int = param(16, "rows per step")
    seq_len: int = param(384, "tokens per row")
    docs_per_row: int = param(2, "documents packed into each row (segment ids, restarted positions)")
    steps: int = param(10, "timed steps")
    warmup_steps: int = param(2, "untimed steps after compilation")
    matmul_size: int = param(2048, "side of the square float32 matmul that measures the peak")
    matmul_repeats: int = param(10, "matmul repetitions before and after the timed steps; the fastest counts")
    matmul_interleaved: int = param(3, "matmul repetitions after each timed step (the paired peak)")
    cpu_devices: int = param(
        2, "on CPU: split the host into this many XLA devices (data-parallel over the cores); 0 = leave XLA_FLAGS alone"
    )
    out: str = param("", "also write the figures as JSON here")


def _small() -> BenchTrainConfig:
    return BenchTrainConfig()


def _tiny() -> BenchTrainConfig:
    return BenchTrainConfig(model=MODEL_PRESETS["tiny"](), batch_size=8, seq_len=256, steps=5, warmup_steps=1)


PRESETS = {"small": _small, "tiny": _tiny}


def synthetic_batch(rows: int, seq_len: int, vocab: int, docs_per_row: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random tokens in the training batch layout, `docs_per_row` packed documents per row."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (rows, seq_len + 1)).astype(np.int32)
    bounds = np.linspace(0, seq_len, docs_per_row + 1).astype(int)
    seg = np.zeros((seq_len,), np.int32)
    pos = np.zeros((seq_len,), np.int32)
    for d in range(docs_per_row):
        seg[bounds[d] : bounds[d + 1]] = d + 1
        pos[bounds[d] : bounds[d + 1]] = np.arange(bounds[d + 1] - bounds[d])
    return {
        "tokens": ids[:, :-1],
        "targets": ids[:, 1:],
        "positions": np.tile(pos, (rows, 1)),
        "segment_ids": np.tile(seg, (rows, 1)),
        "loss_weights": np.ones((rows, seq_len), np.float32),
        "modality": rng.integers(0, 2, (rows, seq_len)).astype(np.int8),
    }


def peak_memory() -> dict[str, float]:
    """Host peak RSS and, where the backend reports it, device peak bytes in use."""
    import jax

    out = {"host_peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        out["device_peak_mib"] = stats["peak_bytes_in_use"] / 2**20
    return out


def set_cpu_devices(n: int) -> None:
    """Asks XLA for `n` host devices; must run before jax is imported (a no-op off CPU)."""
    if n <= 0:
        return
    if "jax" in sys.modules:
        import jax

        if jax.devices()[0].platform == "cpu" and jax.device_count() != n:
            raise configlib.ConfigError(
                f"cpu_devices={n}, but jax was already started with {jax.device_count()} CPU devices; "
                "set cpu_devices=0 to use them as they are"
            )
        return
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    os.environ["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={n}"])


def bench(cfg: BenchTrainConfig) -> dict[str, float]:
    set_cpu_devices(cfg.cpu_devices)
    import jax

    from chameleon_jax.kernels import resolve_implementation
    from chameleon_jax.sharding import build_mesh
    from chameleon_jax.transformer import count_params, flops_per_token
    from train.optim import make_optimizer, make_schedule
    from train.step import Trainer, dense_matmul_flops

    if cfg.seq_len > cfg.model.max_seq_len:
        raise configlib.ConfigError(f"seq_len={cfg.seq_len} exceeds model.max_seq_len={cfg.model.max_seq_len}")
    peak_before = dense_matmul_flops(cfg.matmul_size, cfg.matmul_repeats)

    mesh = build_mesh(cfg.mesh)
    total = cfg.warmup_steps + cfg.steps + 1
    trainer = Trainer(cfg.model, make_optimizer(cfg.optim, total), mesh, cfg.mesh.rules,
                      schedule=make_schedule(cfg.optim, total), grad_accum=cfg.optim.grad_accum)
    host = synthetic_batch(cfg.batch_size, cfg.seq_len, cfg.model.vocab_size, cfg.docs_per_row)
    batch = {k: jax.device_put(v, trainer.batch_sharding(v.shape)) for k, v in host.items()}

    t0 = time.perf_counter()
    compiled = trainer.lower_train_step((cfg.batch_size, cfg.seq_len)).compile()
    compile_s = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    # The cost analysis describes one device's SPMD program; every device runs one.
    xla_flops = float((cost or {}).get("flops", float("nan"))) * jax.device_count()

    state = trainer.init_state()
    for _ in range(cfg.warmup_steps + 1):
        state, metrics = trainer.train_step(state, batch)
    jax.block_until_ready(metrics)
    # Each timed step is followed by a short matmul measurement, so the ratio of the two
    # follows the load of a shared machine instead of comparing different moments.
    on_cpu = jax.devices()[0].platform == "cpu"
    scale = 1 if on_cpu else jax.device_count()
    step_flops = flops_per_token(cfg.model, cfg.seq_len) * cfg.batch_size * cfg.seq_len
    times, peaks = [], []
    for _ in range(cfg.steps):
        t = time.perf_counter()
        state, metrics = trainer.train_step(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t)
        peaks.append(dense_matmul_flops(cfg.matmul_size, cfg.matmul_interleaved) * scale)
    loss = float(metrics["loss"])
    peak_after = dense_matmul_flops(cfg.matmul_size, cfg.matmul_repeats)

    peak = max(peak_before * scale, peak_after * scale, *peaks)
    tokens = cfg.batch_size * cfg.seq_len
    step_s = float(np.median(times))
    tps = tokens / step_s
    model_flops = flops_per_token(cfg.model, cfg.seq_len) * tps
    paired = [step_flops / t / p for t, p in zip(times, peaks)]
    return {
        "device": jax.devices()[0].device_kind,
        "devices": jax.device_count(),
        "params": count_params(cfg.model),
        "batch_size": cfg.batch_size,
        "seq_len": cfg.seq_len,
        "dtype": cfg.model.dtype,
        "attention": "ring" if mesh.shape["sequence"] > 1 else resolve_implementation(
            cfg.model.attention_impl, cfg.model.dtype, cfg.model.head_dim),
        "compile_s": compile_s,
        "step_s_median": step_s,
        "step_s_min": float(np.min(times)),
        "tokens_per_s": tps,
        "model_flops_per_s": model_flops,
        "xla_flops_per_s": xla_flops / step_s,
        "peak_matmul_flops_per_s": peak,
        "peak_matmul_before": peak_before,
        "peak_matmul_after": peak_after,
        "mfu": model_flops / peak,
        "mfu_paired_median": float(np.median(paired)),
        "mfu_best_step": step_flops / float(np.min(times)) / peak,
        "final_loss": loss,
        **peak_memory(),
    }


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv

    def go():
        cfg = configlib.from_cli(argv, PRESETS, "small")
        r = bench(cfg)
        print(f"device        {r['device']} x{r['devices']}  ({r['params'] / 1e6:.2f}M params, {r['dtype']})")
        print(f"batch         {r['batch_size']} x {r['seq_len']} tokens; attention {r['attention']}; "
              f"compile {r['compile_s']:.1f}s")
        print(f"step          {r['step_s_median'] * 1e3:.1f} ms median ({r['step_s_min'] * 1e3:.1f} ms best)")
        print(f"tokens/s      {r['tokens_per_s']:,.0f}")
        print(f"model FLOP/s  {r['model_flops_per_s'] / 1e9:.1f} G   (XLA-counted {r['xla_flops_per_s'] / 1e9:.1f} G)")
        print(f"matmul peak   {r['peak_matmul_flops_per_s'] / 1e9:.1f} G   "
              f"(before {r['peak_matmul_before'] / 1e9:.1f}, after {r['peak_matmul_after'] / 1e9:.1f})")
        print(f"MFU           {100 * r['mfu_paired_median']:.1f}% (median of step / following-matmul pairs); "
              f"{100 * r['mfu']:.1f}% median step vs best peak; {100 * r['mfu_best_step']:.1f}% best step vs best peak")
        mem = f"host peak RSS {r['host_peak_rss_mib']:.0f} MiB"
        if "device_peak_mib" in r:
            mem += f", device peak {r['device_peak_mib']:.0f} MiB"
        print(f"memory        {mem}")
        if cfg.out:
            Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
            Path(cfg.out).write_text(json.dumps(r, indent=2) + "\n")

    configlib.main_guard(go)


if __name__ == "__main__":
    main()

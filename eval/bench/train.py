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
import resource
import sys
import time
from pathlib import Path

import numpy as np

from chameleon_jax import configlib, host_malloc
from chameleon_jax.config import MODEL_PRESETS, MeshConfig, ModelConfig
from chameleon_jax.configlib import param
from chameleon_jax.host_devices import set_cpu_devices
from eval.bench.synthetic import device_batch, make_trainer
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


def peak_memory() -> dict[str, float]:
    """Host peak RSS and, where the backend reports it, device peak bytes in use."""
    import jax

    out = {"host_peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        out["device_peak_mib"] = stats["peak_bytes_in_use"] / 2**20
    return out


def bench(cfg: BenchTrainConfig) -> dict[str, float]:
    set_cpu_devices(cfg.cpu_devices)
    import jax

    from chameleon_jax.kernels import resolve_implementation
    from chameleon_jax.sharding import build_mesh
    from chameleon_jax.transformer import count_params, flops_per_token
    from train.step import dense_matmul_flops

    if cfg.seq_len > cfg.model.max_seq_len:
        raise configlib.ConfigError(f"seq_len={cfg.seq_len} exceeds model.max_seq_len={cfg.model.max_seq_len}")
    peak_before = dense_matmul_flops(cfg.matmul_size, cfg.matmul_repeats)

    mesh = build_mesh(cfg.mesh)
    total = cfg.warmup_steps + cfg.steps + 1
    trainer = make_trainer(cfg.model, mesh, cfg.mesh.rules, cfg.optim, total)
    batch = device_batch(trainer, cfg.batch_size, cfg.seq_len, cfg.docs_per_row)

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
    host_malloc.reexec_with_huge_pages()
    main()

"""Train the mixed-modal language model.

    python -m train.lm preset=tiny run_dir=/tmp/lm
    python -m train.lm preset=demo vq_dir=runs/demo/vq steps=3000 mesh.fsdp=2
    python -m train.lm --help                    # every field with its description

or from Python: `train.lm.run(cfg) -> run_dir`. A run directory holds

    config.json          the resolved LMTrainConfig
    tokens/              with data.source=shapes or jsonl: the documents tokenised at start,
                         and the text vocabulary trained on them (train.lm_inputs)
    checkpoints/<step>/  orbax: train state + the data iterator's position
    metrics.jsonl, tb/   per-step metrics (loss, text_loss, image_loss, tokens/s, MFU, ...)
    metrics.json         headline figures; loss_curve.png
    model/               the exported model: config.json, params/, vocab/, tokenizer/

Rerunning an unfinished run resumes from its newest intact checkpoint (model, optimizer
and data position); a finished run is reused unless overwrite=true. A non-finite loss
or parameter stops the run with an error and saves nothing after the last good
checkpoint. SIGTERM or SIGINT finish the step in flight, save it and exit with status 75;
one run at a time may use a run directory (train.run; the failure modes and exit statuses
are listed in docs/failures.md).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from chameleon_jax import configlib, host_malloc
from chameleon_jax.generation.distributed import maybe_initialize
from train.lm_config import PRESETS, LMTrainConfig
from train.run import RunSession, TrainingDivergedError, clear_run, enable_compilation_cache, guard, setup_logging

log = logging.getLogger("train.lm")


# --------------------------------------------------------------------------- setup


def maybe_initialize_distributed(cfg: LMTrainConfig) -> None:
    """`jax.distributed.initialize` for multi-process runs (must precede any other JAX call).

    The config's `distributed`, `coordinator_address`, `num_processes` and `process_id`
    fields mean what they mean for generation (`chameleon_jax.generation.distributed`).
    """
    maybe_initialize(cfg)


def resolve_config(cfg: LMTrainConfig, vocab, codes_per_image: int = 0,
                   image_code_levels: tuple[int, ...] = ()) -> LMTrainConfig:
    """Fills model.vocab_size (and the image-position and code-digit fields) from the vocabulary
    and tokenizer; checks the row length."""
    model = cfg.model
    if model.image_code_digits:
        digits = tuple(image_code_levels) if tuple(model.image_code_digits) == (-1,) else tuple(model.image_code_digits)
        if not digits:
            raise configlib.ConfigError(
                "model.image_code_digits=(-1,) takes the image tokenizer's FSQ levels, and the shards' tokenizer has "
                "none (a codebook quantizer, or its folder is gone); give the digit sizes, or [] to turn the option off"
            )
        if math.prod(digits) != vocab.codebook_size:
            raise configlib.ConfigError(
                f"model.image_code_digits={digits} make {math.prod(digits)} codes, the vocabulary has "
                f"{vocab.codebook_size}"
            )
        offset = int(vocab.code_to_id[0])
        if not np.array_equal(vocab.code_to_id, np.arange(offset, offset + vocab.codebook_size)):
            raise configlib.ConfigError(
                "model.image_code_digits needs the image codes as one block of ids in code order; this "
                "vocabulary maps them elsewhere (an imported Chameleon vocabulary)"
            )
        model = dataclasses.replace(model, image_code_digits=digits, image_code_offset=offset)
    if model.image_positions:
        rows = codes_per_image if model.image_positions == -1 else model.image_positions
        if rows < max(codes_per_image, 1):
            raise configlib.ConfigError(
                f"model.image_positions={model.image_positions} is fewer than the image tokenizer's "
                f"{codes_per_image} codes per image; use -1 to take the tokenizer's count"
            )
        model = dataclasses.replace(model, image_positions=rows, boi_id=vocab.boi_id, eoi_id=vocab.eoi_id)
    if cfg.auto_vocab_size:
        model = dataclasses.replace(model, vocab_size=vocab.padded_size(cfg.vocab_multiple))
    elif model.vocab_size < vocab.size:
        raise configlib.ConfigError(
            f"model.vocab_size={model.vocab_size} is smaller than the vocabulary ({vocab.size} ids); "
            "raise it or set auto_vocab_size=true"
        )
    seq_len = cfg.data.sequence.seq_len
    if seq_len > model.max_seq_len:
        raise configlib.ConfigError(
            f"data.sequence.seq_len={seq_len} is longer than model.max_seq_len={model.max_seq_len}"
        )
    if cfg.batch_size % cfg.optim.grad_accum:
        raise configlib.ConfigError(
            f"batch_size={cfg.batch_size} does not split into optim.grad_accum={cfg.optim.grad_accum} microbatches"
        )
    return dataclasses.replace(cfg, model=model)


_TRAINERS: dict = {}


def get_trainer(cfg: LMTrainConfig, mesh):
    """The Trainer for this model/optimizer/mesh; reused within a process so a second
    `run` (a resume, a notebook rerun) does not compile the same steps again."""
    from train.optim import make_optimizer, make_schedule
    from train.step import Trainer

    schedule_steps = cfg.steps if cfg.optim.decay_steps == 0 else None
    key = (cfg.model, cfg.optim, schedule_steps, mesh, tuple(cfg.mesh.rules), cfg.seed)
    if key not in _TRAINERS:
        if len(_TRAINERS) >= 2:
            _TRAINERS.pop(next(iter(_TRAINERS)))
        _TRAINERS[key] = Trainer(cfg.model, make_optimizer(cfg.optim, cfg.steps), mesh, cfg.mesh.rules,
                                 schedule=make_schedule(cfg.optim, cfg.steps), grad_accum=cfg.optim.grad_accum,
                                 seed=cfg.seed)
    return _TRAINERS[key]


def is_finished(run_dir: Path, cfg: LMTrainConfig) -> bool:
    import json

    headline = run_dir / "metrics.json"
    if not (headline.exists() and (run_dir / "model" / "config.json").exists()):
        return False
    return json.loads(headline.read_text()).get("lm_steps_done") == cfg.steps


# --------------------------------------------------------------------------- helpers


def _gather_data_state(state: dict) -> list[dict]:
    """Every process's iterator state (the checkpoint's extra is written by process 0)."""
    from chameleon_jax.data.grain_pipeline import allgather_json

    return allgather_json(state)


def check_batch_split(cfg: LMTrainConfig, mesh) -> None:
    """The global batch (and each microbatch) must split evenly over the mesh axes the batch is sharded on."""
    from chameleon_jax.sharding import logical_to_spec

    spec = logical_to_spec(("activation_batch",), cfg.mesh.rules)[0]
    axes = () if spec is None else (spec,) if isinstance(spec, str) else tuple(spec)
    ways = math.prod(mesh.shape[a] for a in axes)
    micro = cfg.batch_size // max(cfg.optim.grad_accum, 1)
    if ways > 1 and (cfg.batch_size % ways or micro % ways):
        over = " x ".join(f"{a}={mesh.shape[a]}" for a in axes)
        raise configlib.ConfigError(
            f"batch_size={cfg.batch_size}"
            + (f" (microbatches of {micro} with optim.grad_accum={cfg.optim.grad_accum})" if cfg.optim.grad_accum > 1 else "")
            + f" does not split over the data axes {over} ({ways} ways); use a multiple of {ways}"
        )


def _host(tree) -> dict[str, float]:
    import jax

    return {k: float(np.asarray(v)) for k, v in jax.device_get(tree).items()}


def evaluate(trainer, state, data, batch_size: int) -> dict[str, float]:
    """Validation loss over the fixed eval batches: loss, text_loss, image_loss, accuracy."""
    import jax

    from chameleon_jax.lm_data import global_batch
    from chameleon_jax.losses import means_from_sums

    batches = data.eval_local_batches(batch_size, jax.process_index(), jax.process_count())
    if not batches:
        return {}
    total: dict[str, float] = {}
    for local in batches:
        sums = _host(trainer.eval_sums(state, global_batch(local, trainer.batch_sharding, batch_size)))
        for k, v in sums.items():
            total[k] = total.get(k, 0.0) + v
    means = _host(means_from_sums({k: np.float32(v) for k, v in total.items()}))
    return {f"eval_{k}": v for k, v in means.items() if k in ("loss", "ce", "text_loss", "image_loss", "accuracy")}


def export_model(run_dir: Path, trainer, state, cfg: LMTrainConfig, data) -> Path:
    """run_dir/model: save_model (config + params), the vocabulary and the image tokenizer."""
    import jax

    from chameleon_jax.checkpoint import save_model

    out = run_dir / "model"
    save_model(out, trainer.model(state), cfg.model)
    if jax.process_index() == 0:
        data.vocab.save(out / "vocab")
        tok_out = out / "tokenizer"
        if data.tokenizer_dir is not None:
            if tok_out.is_symlink() or tok_out.is_file():
                tok_out.unlink()
            elif tok_out.exists():
                shutil.rmtree(tok_out)
            shutil.copytree(data.tokenizer_dir, tok_out)
        else:
            tok_out.mkdir(parents=True, exist_ok=True)
            (tok_out / "README.txt").write_text(
                "This model was trained with the colour-grid stand-in image tokenizer "
                f"(chameleon_jax.data.grid_tokenizer.ColourGridTokenizer, cells={data.cfg.grid_cells}, "
                f"levels={data.cfg.grid_levels}); no VQ model was used.\n"
            )
    return out


# --------------------------------------------------------------------------- the run


def run(cfg: LMTrainConfig) -> Path:
    """Trains (or resumes, or reuses) the run in `cfg.run_dir`; returns the run directory.

    Raises TrainingStopped (train.run) after saving when SIGTERM/SIGINT stopped the run,
    RunLockedError when another run holds the folder, TrainingDivergedError on NaN/inf.
    """
    run_dir = Path(cfg.run_dir).absolute()
    if cfg.steps < 1:
        raise configlib.ConfigError(f"steps must be >= 1, got {cfg.steps}")
    maybe_initialize_distributed(cfg)

    import jax

    from chameleon_jax.sharding import build_mesh

    mesh = build_mesh(cfg.mesh)
    check_batch_split(cfg, mesh)
    primary = jax.process_index() == 0
    with RunSession(run_dir, primary=primary) as session:
        if cfg.overwrite:
            if primary:
                clear_run(run_dir)
            if jax.process_count() > 1:
                from jax.experimental import multihost_utils

                multihost_utils.sync_global_devices("train.lm overwrite")
        if is_finished(run_dir, cfg):
            log.info("run %s already finished %d steps: reusing it (overwrite=true retrains)", run_dir, cfg.steps)
            return run_dir
        return _train(cfg, run_dir, mesh, session)


def _train(cfg: LMTrainConfig, run_dir: Path, mesh, session: RunSession) -> Path:
    import jax

    enable_compilation_cache(cfg.compilation_cache_dir)
    from tqdm.auto import tqdm

    from chameleon_jax.data.grain_pipeline import ShardData
    from chameleon_jax.lm_data import global_batch
    from chameleon_jax.prefetch import Prefetcher
    from chameleon_jax.transformer import flops_per_token
    from train.checkpointing import Checkpointer
    from train.metrics import MetricsWriter, plot_curves, update_headline
    from train.step import dense_matmul_flops

    pidx, pcount = jax.process_index(), jax.process_count()
    primary = pidx == 0
    run_dir.mkdir(parents=True, exist_ok=True)
    from train.lm_inputs import prepare

    data = ShardData.build(prepare(cfg, run_dir), run_dir=run_dir, vq_dir=cfg.vq_dir, is_primary=primary)
    cfg = resolve_config(cfg, data.vocab, data.image_tokenizer.codes_per_image, data.image_tokenizer.code_levels)
    if primary:
        configlib.save(cfg, run_dir / "config.json")
    seq_len = data.seq_len

    trainer = get_trainer(cfg, mesh)
    it = data.train_iterator(cfg.batch_size, pidx, pcount)
    depth = cfg.data.prefetch if cfg.data.prefetch >= 0 else (0 if jax.devices()[0].platform == "cpu" else 2)
    if depth:
        it = Prefetcher(it, depth)
    ckpt = Checkpointer(run_dir / "checkpoints", keep=cfg.keep_checkpoints, async_save=cfg.async_checkpoint)

    found = ckpt.restore_latest(trainer.abstract_checkpoint_tree(), required_extra=("data",), primary=primary)
    if found is not None:
        start, tree, extra = found
        state = trainer.state_from_checkpoint(tree)
        states = extra["data"]
        if len(states) != pcount:
            raise configlib.ConfigError(
                f"checkpoint {start} in {run_dir} was written by {len(states)} processes, this run has {pcount}"
            )
        it.restore(states[pidx])
        log.info("resumed from step %d", start)
    else:
        state = trainer.init_state()
        start = 0

    n_dev = jax.device_count()
    on_cpu = jax.devices()[0].platform == "cpu"
    peak_device = cfg.peak_flops or dense_matmul_flops()
    # Fake CPU devices share the host's cores: the host's matmul rate is the whole machine's peak.
    peak_total = peak_device * (1 if on_cpu else n_dev)
    flops_tok = flops_per_token(cfg.model, seq_len)
    tokens_per_step = cfg.batch_size * seq_len

    writer = MetricsWriter(run_dir, resume_step=start) if primary else None
    if primary and start == 0:
        update_headline(run_dir / "metrics.json", {
            "lm_params": sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state["params"])),
            "lm_vocab_size": data.vocab.size, "lm_peak_flops": peak_total, "lm_devices": n_dev,
        })
    log.info("training %s on %d devices, mesh %s, %d tokens/step, vocab %s", cfg.model, n_dev,
             dict(mesh.shape), tokens_per_step, data.vocab)

    def save(step: int) -> None:
        ckpt.save(step, trainer.checkpoint_tree(state), {"data": _gather_data_state(it.state())})

    def save_now(step: int) -> Path:
        return ckpt.save_now(step, trainer.checkpoint_tree(state), {"data": _gather_data_state(it.state())})

    bar = tqdm(total=cfg.steps, initial=start, disable=not (cfg.progress and primary), desc="lm", dynamic_ncols=True)
    window_time, window_steps, window_targets = 0.0, 0, 0.0
    last: dict[str, float] = {}
    try:
        for step in range(start, cfg.steps):
            t0 = time.perf_counter()
            batch = global_batch(it.next_local(), trainer.batch_sharding, cfg.batch_size)
            state, metrics = trainer.train_step(state, batch)
            m = _host(metrics)
            dt = time.perf_counter() - t0
            if not (math.isfinite(m["loss"]) and m["params_finite"] > 0):
                what = "loss" if not math.isfinite(m["loss"]) else "parameters after the update"
                ckpt.wait()
                good = ckpt.latest_step()
                raise TrainingDivergedError(
                    f"training diverged at step {step + 1}: the {what} became non-finite "
                    f"(loss={m['loss']}, grad_norm={m['grad_norm']}, lr={m.get('lr')}). Nothing was saved for this "
                    f"step; the last good checkpoint is "
                    + (f"step {good} in {run_dir / 'checkpoints'}" if good is not None else "none (no checkpoint yet)")
                    + ". Lower optim.lr or check the data."
                )
            done = step + 1
            if step > start:  # the first step of a process includes compilation
                window_time += dt
                window_steps += 1
                window_targets += m["loss_weight"]
            last = m
            bar.update(1)
            if done % cfg.log_interval == 0 or done == cfg.steps:
                row = {k: m[k] for k in ("loss", "ce", "z_loss", "text_loss", "image_loss", "accuracy", "grad_norm",
                                         "param_norm", "lr") if k in m}
                if window_steps:
                    tps = window_steps * tokens_per_step / window_time
                    row.update(tokens_per_s=tps, target_tokens_per_s=window_targets / window_time,
                               step_time_s=window_time / window_steps, mfu=tps * flops_tok / peak_total)
                else:
                    row.update(first_step_time_s=dt)
                bar.set_postfix(loss=f"{m['loss']:.3f}", text=f"{m['text_loss']:.3f}", image=f"{m['image_loss']:.3f}")
                if writer:
                    writer.write(done, row)
                window_time, window_steps, window_targets = 0.0, 0, 0.0
            if (cfg.eval_interval and done % cfg.eval_interval == 0) or done == cfg.steps:
                ev = evaluate(trainer, state, data, cfg.batch_size)
                if ev and writer:
                    writer.write(done, ev)
                    log.info("step %d: %s", done, ev)
                last.update(ev)
            if (cfg.checkpoint_interval and done % cfg.checkpoint_interval == 0) or done == cfg.steps:
                save(done)
            if done < cfg.steps and session.stop.should_stop(done):
                session.stopped(done, lambda: save_now(done))
    finally:
        if hasattr(it, "close"):  # a prefetch thread, or grain's worker processes
            it.close()
        bar.close()
        ckpt.close()
        if writer:
            writer.close()

    export_model(run_dir, trainer, state, cfg, data)
    if primary:
        plot_curves(run_dir, ["loss", "text_loss", "image_loss", "eval_loss", "eval_text_loss", "eval_image_loss"],
                    run_dir / "loss_curve.png", title=f"LM ({Path(cfg.run_dir).name})")
        update_headline(run_dir / "metrics.json", {
            "lm_steps_done": cfg.steps,
            **{f"lm_final_{k}": v for k, v in last.items()
               if k in ("loss", "text_loss", "image_loss", "eval_loss", "eval_text_loss", "eval_image_loss")},
        })
    return run_dir


def main(argv=None) -> None:
    setup_logging()
    argv = sys.argv[1:] if argv is None else argv

    def go():
        cfg = configlib.from_cli(argv, PRESETS, "tiny")
        print(run(cfg))

    guard(go)


if __name__ == "__main__":
    host_malloc.reexec_with_huge_pages()
    main()

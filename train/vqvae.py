"""Train an image tokenizer (VQGAN / l2-EMA VQ / FSQ).

    python -m train.vqvae                                   # preset=shapes, run_dir=runs/vq
    python -m train.vqvae preset=tiny run_dir=/tmp/vq steps=50
    python -m train.vqvae model.quantizer=fsq model.codebook_size=1000 overwrite=true
    python -m train.vqvae --help                            # every field with its description

or from Python: `train.vqvae.run(cfg) -> run_dir`. A run directory holds

    config.json          the resolved VQTrainConfig
    checkpoints/<step>/  orbax: params, EMA codebook state, optimizer state, step + the data position
    metrics.jsonl, tb/   loss, recon, codebook, commit, usage, perplexity, lr, images/s
    samples/             reconstruction previews (originals above reconstructions), PNG
    metrics.json         headline figures; vq_loss.png the loss curves
    tokenizer/           the exported tokenizer (vqvae.load_tokenizer)

Rerunning resumes from the latest checkpoint (model, optimizer, EMA state and data
position: the next loss is the one an uninterrupted run would have had). A run whose
tokenizer was exported at `steps` or later is reused unless overwrite=true; asking
for more steps than it has continues it. A NaN or infinite loss stops the run with
an error; nothing is saved after the last good checkpoint. SIGTERM or SIGINT finish the
step in flight, save it and exit with status 75; one run at a time may use a run
directory (train.run; docs/failures.md lists the failure modes and exit statuses).

Data parallel over every device: the batch is sharded over a 1-D ('data',) mesh,
parameters and optimizer state are replicated, the step is jitted with donation.

The `shapes` presets (FSQ 8x8x8 codes, GroupNorm of at least 8 channels a group,
l2 reconstruction loss, a short unquantized warmup) and the comparisons behind them
are in docs/experiments.md.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np

from chameleon_jax import configlib, host_malloc
from chameleon_jax.configlib import ConfigError, param
from chameleon_jax.data.shapes.spec import Backend as ShapesBackend
from train.optim import OptimConfig
from train.run import RunSession, TrainingDivergedError, clear_run, enable_compilation_cache, guard, setup_logging
from vqvae.config import VQ_PRESETS, VQConfig

log = logging.getLogger("train.vqvae")


@dataclasses.dataclass(frozen=True)
class VQDataConfig:
    """Where training pictures come from."""

    source: Literal["shapes", "synthetic", "folder", "tfds", "array_record"] = param(
        "shapes",
        "shapes: the Shapes data set; synthetic: random flat rectangles and discs drawn on the fly "
        "(tests, no data needed); folder: every picture under data_dir; tfds: the data set tfds_name; "
        "array_record: files matching `records` whose records are PNG/JPEG bytes. folder, tfds and array_record "
        "are streamed (decoded as read, never all in memory), shapes and synthetic are held in memory",
    )
    train_split: str = param("train", "Shapes (or TFDS) split to train on")
    preview_split: str = param("validation", "Shapes (or TFDS) split whose first pictures are shown in samples/")
    num_examples: int = param(0, "use only the first N training pictures (0 = all)")
    shapes_backend: ShapesBackend = param(
        "auto", "Shapes storage: tfds reads the built array_record files (built on first use), generate draws "
                "the same pictures on access with nothing on disk, auto is tfds when tensorflow_datasets imports")
    data_dir: str = param("", "Shapes data directory (empty = default), the picture folder for source=folder, "
                              "or the TFDS data folder for source=tfds")
    tfds_name: str = param("", "source=tfds: the data set name (name[/config])")
    tfds_image: str = param("image", "source=tfds: the picture feature ('/' for nested features)")
    records: str = param("", "source=array_record: a glob of array_record files of encoded pictures")
    random_crop: bool = param(False, "streamed sources: random square crops (shorter side resized to the model's) "
                                     "instead of the centre")
    flip: bool = param(False, "streamed sources: random horizontal flips")
    workers: int = param(0, "grain worker processes decoding pictures; 0 = reader threads of this process")
    shuffle_seed: int = param(0, "seed of the per-epoch shuffle")


@dataclasses.dataclass(frozen=True)
class VQTrainConfig:
    """Tokenizer training: model, data, optimizer, loss weights, logging and checkpoints."""

    model: VQConfig = param(VQConfig(), "the tokenizer (vqvae.config.VQConfig)")
    data: VQDataConfig = param(VQDataConfig(), "training data")
    optim: OptimConfig = param(
        OptimConfig(lr=1e-3, warmup_steps=50, min_lr_ratio=0.1, b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.0, clip_norm=1.0),
        "optimizer: AdamW (= Adam at weight_decay 0) with warmup + cosine decay and clipping",
    )
    run_dir: str = param("runs/vq", "run directory (config, checkpoints, metrics, samples, tokenizer/)")
    overwrite: bool = param(False, "start afresh even if run_dir holds a run or a finished tokenizer")
    steps: int = param(2000, "training steps")
    batch_size: int = param(32, "global batch (pictures per step), divisible by the device count")
    grad_sum: Literal["auto", "flat", "xla"] = param(
        "auto", "how gradients are summed over the devices: 'flat' (each device sums its rows, then one all-reduce of "
        "one vector), 'xla' (XLA's all-reduce, one operand per array) or 'auto' ('flat' on CPU devices when the "
        "quantizer keeps no batch statistics)"
    )
    recon_loss: Literal["l1", "l2", "l1+l2"] = param("l2", "pixel reconstruction loss on the [-1, 1] scale")
    quantize_warmup_steps: int = param(
        0, "decode continuous latents for this many steps, then blend in the quantized ones over as many more "
        "(0 = quantize from the start); the codebook follows the latents throughout"
    )
    codebook_weight: float = param(1.0, "weight of the codebook loss (plain vq only; l2_ema and fsq learn no codebook by gradient)")
    extra_loss: str = param("", "name of a loss registered with vqvae.losses.register_extra_loss (perceptual, ...)")
    extra_loss_weight: float = param(0.0, "weight of extra_loss")
    seed: int = param(0, "parameter init and per-step randomness (dead-code restarts)")
    log_every: int = param(20, "steps between metric rows")
    sample_every: int = param(500, "steps between reconstruction previews in samples/ (0 = only at the end)")
    checkpoint_every: int = param(500, "steps between checkpoints (the last step is always saved; 0 = only the last)")
    keep_checkpoints: int = param(2, "checkpoints kept on disk")
    progress: bool = param(True, "show a tqdm progress bar")
    tensorboard: bool = param(True, "also write TensorBoard events (run_dir/tb/)")
    compilation_cache_dir: str = param(
        "", "persistent XLA compilation cache folder (faster restarts); empty = off; must be set before the first compile"
    )


def _tiny() -> VQTrainConfig:
    return VQTrainConfig(
        model=VQ_PRESETS["tiny"](),
        data=VQDataConfig(source="synthetic", num_examples=256),
        optim=dataclasses.replace(VQTrainConfig().optim, lr=3e-3, warmup_steps=5),
        steps=30, batch_size=16, log_every=1, sample_every=0, checkpoint_every=1000, progress=False,
    )


def _shapes() -> VQTrainConfig:
    return VQTrainConfig(
        model=VQ_PRESETS["shapes"](),
        data=VQDataConfig(source="shapes"),
        optim=dataclasses.replace(VQTrainConfig().optim, lr=2e-3, warmup_steps=100, min_lr_ratio=0.05),
        steps=3000, batch_size=8, recon_loss="l2", quantize_warmup_steps=120,
        # Checkpoints and sample grids cost seconds each: every 1000 steps keeps the run short.
        log_every=20, sample_every=1000, checkpoint_every=1000,
    )


def _shapes32() -> VQTrainConfig:
    """The demo's tokenizer: 32 px Shapes, 4x4 = 16 codes a picture, batch 16 for 9000 steps.

    A small object is 5 px wide here, and its shape is what an undertrained tokenizer loses
    first; shorter training misreads more of them (docs/experiments.md, "The image tokenizer").
    """
    cfg = _shapes()
    return dataclasses.replace(cfg, model=VQ_PRESETS["shapes32"](), steps=9000, batch_size=16)


def _shapes24() -> VQTrainConfig:
    """The one-code-per-cell regime: 24 px Shapes, 3x3 = 9 codes, each code one cell of the
    layout (a whole object), batch 16 for 6000 steps."""
    return dataclasses.replace(_shapes32(), model=VQ_PRESETS["shapes24"](), steps=6000)


def _chameleon() -> VQTrainConfig:
    return VQTrainConfig(
        model=VQ_PRESETS["chameleon"](),
        data=VQDataConfig(source="folder"),
        optim=dataclasses.replace(VQTrainConfig().optim, lr=1e-4, warmup_steps=1000),
        steps=100_000, batch_size=32, recon_loss="l1", log_every=50, sample_every=2000, checkpoint_every=2000,
    )


PRESETS = {"tiny": _tiny, "shapes": _shapes, "shapes32": _shapes32, "shapes24": _shapes24, "chameleon": _chameleon}


# --------------------------------------------------------------------------- data


def synthetic_images(n: int, size: int, seed: int = 0) -> np.ndarray:
    """n pictures uint8 [n, size, size, 3]: a plain background with 1-2 flat rectangles or discs."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:size, 0:size]
    out = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        out[i] = rng.integers(0, 256, 3)
        for _ in range(rng.integers(1, 3)):
            cy, cx = rng.uniform(0, size, 2)
            r = rng.uniform(size / 8, size / 3)
            if rng.random() < 0.5:
                mask = (np.abs(ys - cy) < r) & (np.abs(xs - cx) < r)
            else:
                mask = (ys - cy) ** 2 + (xs - cx) ** 2 < r * r
            out[i][mask] = rng.integers(0, 256, 3)
    return out


def load_images(data: VQDataConfig, split: str, image_size: int, limit: int = 0) -> np.ndarray:
    """uint8 [N, S, S, 3] for `split` of the configured source (streamed sources: the first `limit`, fitted)."""
    if data.source == "synthetic":
        n = limit or data.num_examples or 1024
        return synthetic_images(n, image_size, seed=hash(split) % 2**16 if split != "train" else 0)
    if data.source in _STREAMED:
        pics = picture_stream(data, split, image_size, limit=limit or data.num_examples, crop=False)
        return np.stack([pics[i] for i in range(len(pics))])
    from chameleon_jax.data import shapes

    return shapes.load_images(split, image_size=image_size, data_dir=data.data_dir or None,
                              backend=data.shapes_backend, limit=limit)


_STREAMED = ("folder", "tfds", "array_record")


def picture_stream(data: VQDataConfig, split: str, image_size: int, limit: int = 0, crop: bool = False):
    """A lazily decoded grain.MapDataset of a streamed source's pictures (chameleon_jax.data.picture_stream)."""
    from chameleon_jax.data.picture_stream import picture_dataset

    if data.source == "folder" and not data.data_dir:
        raise ConfigError("data.source=folder needs data.data_dir (a folder of pictures)")
    location = {"folder": data.data_dir, "tfds": data.tfds_name, "array_record": data.records}[data.source]
    if not location:
        raise ConfigError(f"data.source={data.source} needs data.{'tfds_name' if data.source == 'tfds' else 'records'}")
    return picture_dataset(data.source, location, image_size, image_key=data.tfds_image, split=split,
                           data_dir=data.data_dir if data.source == "tfds" else "", random_crop=crop, limit=limit)


def training_pictures(data: VQDataConfig, image_size: int):
    """The training pictures as a grain.MapDataset: streamed, or held in memory (shapes, synthetic)."""
    if data.source in _STREAMED:
        return picture_stream(data, data.train_split, image_size, data.num_examples, crop=data.random_crop)
    import grain

    return grain.MapDataset.source(load_images(data, data.train_split, image_size, data.num_examples))


# --------------------------------------------------------------------------- run directory


_RUN_OUTPUTS = (
    "checkpoints", "tokenizer", "tokenizer.tmp", "samples", "tb", "metrics.jsonl", "metrics.json",
    "config.json", "vq_loss.png", "eval_vq.json", "eval_vq.png",
)


def _saved_config(run_dir: Path) -> VQTrainConfig | None:
    path = run_dir / "config.json"
    if not path.exists():
        return None
    try:
        return configlib.load(VQTrainConfig, path)
    except ConfigError:
        return None


def is_finished(run_dir: Path, cfg: VQTrainConfig) -> bool:
    """True when run_dir/tokenizer holds a tokenizer of this model config trained for >= cfg.steps."""
    from vqvae.tokenizer import is_tokenizer_dir, read_meta

    tok = run_dir / "tokenizer"
    if not is_tokenizer_dir(tok):
        return False
    saved = configlib.load(VQConfig, tok / "config.json")
    return saved == cfg.model and int(read_meta(tok).get("step", -1)) >= cfg.steps


def _check_compatible(run_dir: Path, cfg: VQTrainConfig) -> None:
    saved = _saved_config(run_dir)
    has_run = (run_dir / "checkpoints").exists() or (run_dir / "tokenizer").exists()
    if has_run and saved is not None and saved.model != cfg.model:
        diff = [
            f"{f.name}: {getattr(saved.model, f.name)!r} -> {getattr(cfg.model, f.name)!r}"
            for f in dataclasses.fields(VQConfig)
            if getattr(saved.model, f.name) != getattr(cfg.model, f.name)
        ]
        raise ConfigError(
            f"{run_dir} holds a run of a different model ({'; '.join(diff)}); "
            "pass overwrite=true to replace it or choose another run_dir"
        )


# --------------------------------------------------------------------------- training


def run(cfg: VQTrainConfig, *, extra_loss=None) -> Path:
    """Trains (or resumes, or reuses) the tokenizer of `cfg`; returns the run directory.

    extra_loss: optional `fn(images, reconstructions, step) -> scalar` (float, [-1, 1]) added
    with weight cfg.extra_loss_weight; overrides the registered cfg.extra_loss.
    Raises TrainingStopped (train.run) after saving when SIGTERM/SIGINT stopped the run,
    RunLockedError when another run holds the folder, TrainingDivergedError on NaN/inf.
    """
    import jax

    from vqvae.config import validate

    validate(cfg.model)
    if cfg.steps < 1:
        raise ConfigError(f"steps must be >= 1, got {cfg.steps}")
    if cfg.log_every < 1:
        raise ConfigError(f"log_every must be >= 1, got {cfg.log_every}")
    if cfg.checkpoint_every < 0 or cfg.sample_every < 0:
        raise ConfigError(f"checkpoint_every ({cfg.checkpoint_every}) and sample_every ({cfg.sample_every}) "
                          "must be >= 0")
    if cfg.optim.grad_accum != 1:
        raise ConfigError("optim.grad_accum is not supported by train.vqvae (raise batch_size instead)")
    n_dev = jax.device_count()
    if cfg.batch_size % n_dev:
        raise ConfigError(f"batch_size {cfg.batch_size} is not divisible by the {n_dev} devices")
    run_dir = Path(cfg.run_dir)
    with RunSession(run_dir, primary=jax.process_index() == 0) as session:
        if cfg.overwrite:
            clear_run(run_dir, _RUN_OUTPUTS)
        if is_finished(run_dir, cfg):
            log.info("reusing the finished tokenizer in %s (overwrite=true to retrain)", run_dir / "tokenizer")
            return run_dir
        _check_compatible(run_dir, cfg)
        return _train(cfg, run_dir, session, extra_loss)


def _train(cfg: VQTrainConfig, run_dir: Path, session: RunSession, extra_loss) -> Path:
    import jax
    from flax import nnx
    from tqdm import tqdm

    from train.checkpointing import Checkpointer
    from train.metrics import MetricsWriter, plot_curves, update_headline
    from vqvae import losses, viz
    from vqvae.tokenizer import save_tokenizer

    import grain  # only needed to train

    enable_compilation_cache(cfg.compilation_cache_dir)
    if cfg.model.quantizer == "vq" and cfg.codebook_weight <= 0:
        log.warning("codebook_weight <= 0 leaves the plain vq codebook untrained")
    configlib.save(cfg, run_dir / "config.json")
    extra_fn = extra_loss or (losses.get_extra_loss(cfg.extra_loss) if cfg.extra_loss else None)

    # ---- data: every host reads its rows of the same shuffled global batches.
    t0 = time.perf_counter()
    size = cfg.model.image_size
    images = training_pictures(cfg.data, size)
    preview = load_images(cfg.data, cfg.data.preview_split, size, limit=16)
    if len(images) < cfg.batch_size:
        raise ConfigError(f"batch_size {cfg.batch_size} exceeds the {len(images)} training pictures")
    data_s = time.perf_counter() - t0
    log.info("%d training pictures (%s) opened in %.1fs", len(images), cfg.data.source, data_s)
    n_proc, proc = jax.process_count(), jax.process_index()
    rows = cfg.batch_size // n_proc
    from chameleon_jax.data.grain_pipeline import worker_prefetch
    from chameleon_jax.data.picture_stream import augment

    # Global position i of the shuffled stream goes to process i mod P: each reads (and decodes) its rows only.
    dataset = augment(images.shuffle(seed=cfg.data.shuffle_seed).repeat(), size, cfg.data.random_crop,
                      cfg.data.flip, cfg.data.shuffle_seed)[proc::n_proc].batch(rows, drop_remainder=True)
    dataset = dataset.to_iter_dataset(grain.ReadOptions(num_threads=2 if cfg.data.source in _STREAMED else 1,
                                                        prefetch_buffer_size=4))
    data_iter = iter(worker_prefetch(dataset, cfg.data.workers))

    # ---- model, optimizer and their shardings: a 1-D data mesh, everything but the batch replicated.
    # The schedule's length is cfg.steps unless optim.decay_steps fixes it (then runs of any length share programs).
    schedule_steps = cfg.steps if cfg.optim.decay_steps <= 0 else 0
    progs = _programs(
        cfg.model, cfg.optim, schedule_steps, cfg.recon_loss, cfg.codebook_weight, extra_fn, cfg.extra_loss_weight,
        cfg.quantize_warmup_steps, cfg.seed, tuple(jax.devices()), cfg.grad_sum,
    )
    state = progs.init()  # the structured state: checkpoints, previews and the export read it
    schedule_lr = progs.schedule
    if progs.flat_sum:
        log.info("gradients summed per device, then in one all-reduce over %d devices", jax.device_count())

    def save_preview(step: int) -> None:
        (run_dir / "samples").mkdir(exist_ok=True)
        state = current_state()
        recon = np.asarray(progs.reconstruct(state["params"], state["buffers"], preview))
        viz.save_png(viz.comparison_grid(preview, recon), run_dir / "samples" / f"recon_{step:07d}.png")

    # ---- resume.
    ckpt = Checkpointer(run_dir / "checkpoints", keep=cfg.keep_checkpoints)
    start = 0
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state)
    found = ckpt.restore_latest(abstract, required_extra=("data",), primary=jax.process_index() == 0)
    if found is not None:
        _, state, extra = found
        data_iter.set_state(extra["data"])
        start = int(state["step"])
        log.info("resumed from step %d", start)
    if start >= cfg.steps:
        log.info("checkpoint step %d >= steps %d; exporting", start, cfg.steps)
    leaves = progs.pack(state)  # what the steps carry (chameleon_jax.state_leaves); the first step donates them
    del state

    def current_state():
        return progs.unpack(leaves)

    def save_now(step: int) -> Path:
        state = current_state()
        to_save = jax.device_get(state) if jax.process_count() == 1 else state
        return ckpt.save_now(step, to_save, {"data": data_iter.get_state()})

    base_key = jax.device_put(jax.random.key(cfg.seed), progs.replicated)
    writer = MetricsWriter(run_dir, tensorboard=cfg.tensorboard, resume_step=start) if session.primary else None
    bar = tqdm(total=cfg.steps, initial=start, disable=not cfg.progress, desc="vqvae", dynamic_ncols=True)
    last_time, last_step, compile_s = time.perf_counter(), start, None
    train_start = time.perf_counter()
    try:
        for step in range(start, cfg.steps):
            batch = jax.make_array_from_process_local_data(progs.batch_sharding, next(data_iter))
            leaves, metrics = progs.step(leaves, batch, base_key)
            loss = float(metrics["loss"])
            done = step + 1
            if compile_s is None:
                compile_s = time.perf_counter() - train_start
                last_time, last_step = time.perf_counter(), done
            if not math.isfinite(loss):
                ckpt.wait()
                raise TrainingDivergedError(
                    f"loss became {loss} at step {done}; stopping. The last good checkpoint is step "
                    f"{ckpt.latest_step()} in {ckpt.directory} (lower optim.lr or raise optim.clip_norm)"
                )
            bar.update(1)
            if done % cfg.log_every == 0 or done == cfg.steps:
                row = {name: float(v) for name, v in metrics.items()}
                now = time.perf_counter()
                if done > last_step:
                    row["images_per_s"] = (done - last_step) * cfg.batch_size / (now - last_time)
                last_time, last_step = now, done
                row["lr"] = float(schedule_lr(done - 1))
                if writer:
                    writer.write(done, row)
                bar.set_postfix(loss=f"{loss:.4f}", recon=f"{row['recon']:.4f}", usage=f"{row['usage']:.2f}")
            if cfg.sample_every and done % cfg.sample_every == 0:
                save_preview(done)
            if (cfg.checkpoint_every and done % cfg.checkpoint_every == 0) or done == cfg.steps:
                # One process: save a host copy. Orbax would otherwise gather every replica of every
                # replicated array (slow on many local devices); several processes need the global arrays.
                state = current_state()
                to_save = jax.device_get(state) if jax.process_count() == 1 else state
                ckpt.save(done, to_save, {"data": data_iter.get_state()})
            if done < cfg.steps and session.stop.should_stop(done):
                session.stopped(done, lambda: save_now(done))
    finally:
        bar.close()
        if writer:
            writer.close()
        ckpt.close()
    train_s = time.perf_counter() - train_start

    # ---- export.
    save_preview(cfg.steps)
    state = current_state()
    model = nnx.merge(progs.graphdef, jax.device_get(state["params"]), jax.device_get(state["buffers"]))
    save_tokenizer(model, run_dir / "tokenizer", source="trained", step=cfg.steps, run_dir=str(run_dir.absolute()))
    figures = {"vq_train_steps": cfg.steps, "vq_codes_per_image": cfg.model.codes_per_image}
    if start < cfg.steps:
        figures.update({"vq_train_seconds": train_s, "vq_compile_seconds": compile_s or 0.0, "vq_data_seconds": data_s})
    update_headline(run_dir / "metrics.json", figures)
    try:
        plot_curves(run_dir, ["loss", "recon", "commit"], run_dir / "vq_loss.png", title="tokenizer training")
    except ImportError:
        pass
    log.info("tokenizer written to %s (%.0fs of training this session)", run_dir / "tokenizer", train_s)
    return run_dir


@dataclasses.dataclass(frozen=True)
class _Programs:
    graphdef: Any
    init: Any  # () -> state, created replicated
    step: Any  # (state leaves, images_u8 [B,S,S,3] sharded, base key) -> (state leaves, metrics); donates them
    pack: Any  # state -> the list of its arrays that `step` carries
    unpack: Any  # that list -> state
    reconstruct: Any  # (params, buffers, images_u8) -> uint8 reconstructions
    schedule: Any
    batch_sharding: Any
    replicated: Any
    flat_sum: bool  # each device sums its rows' gradients; one all-reduce adds them up


@functools.lru_cache(maxsize=4)
def _programs(model_cfg: VQConfig, optim: OptimConfig, steps: int, recon_kind: str, codebook_weight: float,
              extra_fn, extra_weight: float, warmup: int, seed: int, devices: tuple, grad_sum: str = "auto") -> _Programs:
    """The jitted init / train step / preview of one configuration (cached: a process that trains the
    same configuration again, e.g. when resuming, compiles once)."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from chameleon_jax import data_parallel
    from chameleon_jax.state_leaves import StateLeaves
    from train.optim import make_optimizer, make_schedule
    from vqvae import losses
    from vqvae import tokenizer as tokenizer_lib
    from vqvae.model import VQModel, pixels_from_uint8

    mesh = Mesh(np.asarray(devices), ("data",))
    replicated = NamedSharding(mesh, P())
    batch_sharding = NamedSharding(mesh, P("data"))
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: VQModel(model_cfg, rngs=nnx.Rngs(seed))))
    tx = make_optimizer(optim, steps, flat=True)  # the whole state is replicated (see make_optimizer)
    k, beta = model_cfg.codebook_size, model_cfg.beta

    def init_state():
        # RngBitGenerator keys: the jitted init compiles several times faster than with threefry.
        model = VQModel(model_cfg, rngs=nnx.Rngs(jax.random.key(seed, impl="rbg")))
        params = nnx.state(model, nnx.Param)
        return {
            "params": params,
            "buffers": nnx.state(model, nnx.Not(nnx.Param)),  # EMA codebook state (empty for vq / fsq)
            "opt_state": tx.init(params),
            "step": jnp.zeros((), jnp.int32),
        }

    def quantize_mix(step):
        """0 while latents are decoded unquantized, then rising to 1 over `warmup` steps."""
        return jnp.clip((step.astype(jnp.float32) - warmup) / warmup, 0.0, 1.0) if warmup > 0 else 1.0

    def grad_sums(replicated, images_u8):
        """Gradients and loss terms of a batch, scaled to add up to the global batch's means over `shards`."""
        params, buffers, step, key = replicated
        x = pixels_from_uint8(images_u8)
        mix = quantize_mix(step)

        def loss_fn(params):
            model = nnx.merge(graphdef, params, buffers, copy=True)
            recon, q = model(x, train=True, key=key, quantize_mix=mix)
            loss, terms = losses.vq_loss(
                x, recon, q, recon_kind=recon_kind, beta=beta, codebook_weight=codebook_weight,
                extra=extra_fn, extra_weight=extra_weight, step=step,
            )
            return loss / shards, (terms, q.codes, nnx.state(model, nnx.Not(nnx.Param)))

        (_, (terms, codes, buffers)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        sums = {"grads": grads, "terms": {name: v / shards for name, v in terms.items()},
                "counts": losses.code_counts(codes, k)}
        return sums, buffers

    # Without buffers (fsq, plain vq) the step is purely data parallel: on CPU devices each one sums its
    # rows' gradients and one all-reduce adds them up (chameleon_jax.data_parallel). The EMA quantizer's
    # buffers are updated from the whole batch's codes, so XLA partitions that step as one program.
    abstract = jax.eval_shape(init_state)
    shards = len(devices) if not jax.tree.leaves(abstract["buffers"]) and data_parallel.use_flat_sum(
        grad_sum, mesh, replicated, batch_sharding.spec) else 1
    step_sums = data_parallel.shard_sums(grad_sums, mesh, batch_sharding.spec) if shards > 1 else grad_sums

    def train_step(state, images_u8, base_key):
        key = jax.random.fold_in(base_key, state["step"])
        sums, buffers = step_sums((state["params"], state["buffers"], state["step"], key), images_u8)
        grads = sums["grads"]
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        new_state = {
            "params": optax.apply_updates(state["params"], updates),
            "buffers": buffers,
            "opt_state": opt_state,
            "step": state["step"] + 1,
        }
        metrics = {**sums["terms"], **losses.count_statistics(sums["counts"]), "grad_norm": optax.tree.norm(grads),
                   "quantize_mix": quantize_mix(state["step"])}
        return new_state, metrics

    def reconstruct(params, buffers, images_u8):
        state = nnx.merge_state(params, buffers)
        return tokenizer_lib._decode(graphdef, state, tokenizer_lib._encode(graphdef, state, images_u8))

    # The steps carry the state as a plain list of arrays, which JAX flattens in C++, not as NNX
    # variables flattened one by one in Python (chameleon_jax.state_leaves).
    layout = StateLeaves.of(abstract)
    return _Programs(
        graphdef=graphdef,
        init=jax.jit(init_state, out_shardings=replicated),
        step=jax.jit(
            layout.step(train_step),
            in_shardings=(replicated, batch_sharding, replicated),
            out_shardings=(replicated, replicated),
            donate_argnums=(0,),
        ),
        pack=layout.pack,
        unpack=layout.unpack,
        reconstruct=reconstruct,
        schedule=make_schedule(optim, steps),
        batch_sharding=batch_sharding,
        replicated=replicated,
        flat_sum=shards > 1,
    )


def main(argv=None) -> None:
    setup_logging()

    def go():
        cfg = configlib.from_cli(sys.argv[1:] if argv is None else argv, PRESETS, "shapes")
        run(cfg)

    guard(go)


if __name__ == "__main__":
    host_malloc.reexec_with_huge_pages()
    main()

"""The end-to-end demo: data, image tokenizer, text vocabulary, transformer, every evaluation, one report.

    python -m eval.demo [preset=demo|tiny] [run_dir=runs/demo] [schedule=auto|cpu|long] [lm.steps=...] [vq.steps=...]
                        [overwrite=true]

Stages (each prints a banner and its time; finished stages are reused on the next
run unless `overwrite=true`, and an evaluation is redone when its inputs change):

  1. data        build the Shapes splits; score the judge on ground-truth pictures
  2. vq          train the image tokenizer                    -> <run_dir>/vq/
  3. vq_eval     PSNR, SSIM, codebook use, judge on reconstructions
  4. lm          tokenise the Shapes tasks once into array_record shards (and train the
                 sentencepiece vocabulary on them), then train the transformer on the shards
                 through grain                                -> <run_dir>/lm/ (tokens/ inside)
  5. caption, vqa, t2i, interleaved, perplexity   the evaluations -> <run_dir>/eval/
  6. report      <run_dir>/metrics.json (flat headline figures) and <run_dir>/report.html
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Literal

from chameleon_jax import configlib, host_malloc
from chameleon_jax.configlib import param
from chameleon_jax.data.shapes.spec import Backend as ShapesBackend
from eval import common
from eval.report import HEADLINE
from train import lm_config
from train import vqvae as train_vqvae
from train.metrics import update_headline


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """Every stage of the demo; the sections are the stage configs themselves."""

    run_dir: str = param("runs/demo", "where everything goes (stage folders, eval/, metrics.json, report.html)")
    overwrite: bool = param(False, "redo every stage instead of reusing finished ones")
    schedule: Literal["auto", "cpu", "long"] = param(
        "auto", "how long the transformer trains: `cpu` runs lm.steps as given (the demo's are sized for a 2-core "
                "laptop), `long` runs long_steps_factor times as many (its figures still climb with steps), "
                "`auto` is `long` when JAX's default backend is an accelerator and `cpu` otherwise; the demo "
                "prints which it chose")
    cpu_devices: int = param(
        2, "on a CPU: split the host into this many XLA devices, over which every stage runs data parallel "
           "(two keep both cores of a 2-core laptop busy between the matmuls: the transformer's training step is "
           "5-10% faster, the tokenizer's 13%); 0 = the devices XLA_FLAGS gives; ignored when jax has already started")
    long_steps_factor: int = param(4, "how many times lm.steps (and its eval and checkpoint intervals) the long schedule runs")
    image_size: int = param(32, "Shapes picture size (24, 32, 64 or 128); the tokenizer, the LM data and the evaluations take it. At 32 the tokenizer's 4x4 codes straddle the 3x3 layout's cells: objects cross code edges and neighbours share codes. image_size=24 vq.steps=6000 is the one-code-per-cell regime (the `shapes24` tokenizer: each code a whole cell)")
    shapes_backend: ShapesBackend = param(
        "auto", "how every stage reads Shapes: tfds builds the splits once as array_record files and reads them, "
                "generate draws the same examples on access with nothing on disk (no build), auto is tfds when "
                "tensorflow_datasets imports")
    judge_examples: int = param(1000, "ground-truth pictures per split on which the judge is scored (0 = all)")
    vq_examples: int = param(1000, "test pictures on which the image tokenizer is scored (0 = all)")
    caption_examples: int = param(200, "pictures captioned in the captioning evaluation")
    vqa_examples: int = param(100, "pictures whose every question is asked in the VQA evaluation")
    t2i_examples: int = param(100, "captions per split (test = seen pairs, heldout) drawn in text-to-image")
    interleaved_examples: int = param(50, "edit stories continued in the interleaved evaluation")
    perplexity_examples: int = param(100, "pictures whose task documents are scored for perplexity")
    vq: train_vqvae.VQTrainConfig = param(train_vqvae.PRESETS["shapes32"](), "image tokenizer training (train.vqvae)")
    lm: lm_config.LMTrainConfig = param(lm_config.PRESETS["demo"](), "transformer training (train.lm)")
    eval: common.EvalConfig = param(common.EvalConfig(), "generation settings of the evaluations")


def _demo() -> DemoConfig:
    return DemoConfig()


def _tiny() -> DemoConfig:
    """A few steps of every stage on tiny models: the end-to-end test, a minute or two on a CPU."""
    vq = train_vqvae.PRESETS["tiny"]()
    vq = dataclasses.replace(
        vq,
        model=dataclasses.replace(vq.model, image_size=32, channel_mult=(1, 2, 2, 2)),  # 4x4 = 16 codes, as in the demo
        data=dataclasses.replace(vq.data, source="shapes", num_examples=256),
    )
    lm = lm_config.PRESETS["tiny"]()
    lm = dataclasses.replace(lm, steps=6, log_interval=2, eval_interval=0, checkpoint_interval=0, progress=False)
    return DemoConfig(
        # Shapes drawn on access: the stages read a few hundred examples, so nothing is built.
        run_dir="runs/demo-tiny", image_size=32, shapes_backend="generate", judge_examples=20, vq_examples=32,
        caption_examples=4, vqa_examples=2,
        t2i_examples=2, interleaved_examples=2, perplexity_examples=2, vq=vq, lm=lm,
        eval=dataclasses.replace(common.EvalConfig(), batch_size=4, max_new_tokens=12, image_candidates=2),
    )


PRESETS = {"demo": _demo, "tiny": _tiny}


def with_schedule(cfg: DemoConfig, backend: str) -> tuple[DemoConfig, str]:
    """`cfg` with its schedule resolved for `backend` (jax.default_backend()), and the schedule's name.

    The long schedule multiplies the transformer's steps and its eval and checkpoint
    intervals, so the learning-rate schedule stretches with it; the tokenizer keeps its
    steps (its reconstructions are not what limits the figures).
    """
    if cfg.long_steps_factor < 1:
        raise ValueError(f"long_steps_factor must be >= 1, got {cfg.long_steps_factor}")
    name = cfg.schedule if cfg.schedule != "auto" else ("cpu" if backend == "cpu" else "long")
    if name == "long":
        f, lm = cfg.long_steps_factor, cfg.lm
        lm = dataclasses.replace(lm, steps=lm.steps * f, eval_interval=lm.eval_interval * f,
                                 checkpoint_interval=lm.checkpoint_interval * f)
        cfg = dataclasses.replace(cfg, lm=lm)
    return dataclasses.replace(cfg, schedule=name), name

def _banner(name: str) -> float:
    print(f"\n=== {name} " + "=" * max(0, 60 - len(name)), flush=True)
    return time.time()


class Stages:
    """Runs named stages once: a stage whose fingerprint is recorded in stages.json is skipped."""

    def __init__(self, run_dir: Path, overwrite: bool):
        self.path = run_dir / "stages.json"
        self.done: dict[str, Any] = {} if overwrite or not self.path.exists() else json.loads(self.path.read_text())
        self.figures: dict[str, Any] = {}

    def run(self, name: str, inputs: Any, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        key = hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:16]
        start = _banner(name)
        entry = self.done.get(name)
        if entry and entry["fingerprint"] == key:
            print(f"reusing the finished stage (delete {self.path} or pass overwrite=true to redo it)")
            figures = entry["figures"]
        else:
            figures = fn()
            self.done[name] = {"fingerprint": key, "figures": figures, "seconds": round(time.time() - start, 1)}
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.done, indent=2) + "\n")
            os.replace(tmp, self.path)
        print(f"[{name}] {time.time() - start:.1f} s", flush=True)
        self.figures.update(figures)
        return figures


def _scalars(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def shapes_sizes(cfg: DemoConfig) -> dict[str, int] | None:
    """Split sizes of the one Shapes build every stage reads (None = the default sizes).

    That is the transformer's training split when it asks for more examples than the default
    build holds. A stage that asks for fewer reads the first examples of the bigger build
    (`shapes.load` does), which are the same examples, so nothing is built twice.
    """
    from chameleon_jax.data.shapes import spec

    split, n = cfg.lm.data.train_split, cfg.lm.data.train_examples
    return {split: n} if n > spec.split_sizes()[split] else None


def stage_data(cfg: DemoConfig) -> dict[str, Any]:
    from chameleon_jax.data import shapes

    data_dir = cfg.eval.data_dir or None
    out, right, total = {}, 0, 0
    for split in shapes.SPLITS:
        source = shapes.load(split, cfg.image_size, data_dir, shapes_sizes(cfg), backend=cfg.shapes_backend)
        n = common.take(len(source), cfg.judge_examples)
        ok = sum(shapes.judge_matches(ex["image"], shapes.example_objects(ex)) for ex in source.examples(0, n))
        out[f"judge_accuracy_ground_truth_{split}"] = ok / n
        right, total = right + ok, total + n
        print(f"{split:>10}: {len(source)} examples; judge exact match {ok}/{n}")
    out["judge_accuracy_ground_truth"] = right / total
    return out


def stage_vq_eval(cfg: DemoConfig, vq_dir: Path, run_dir: Path) -> dict[str, Any]:
    from eval import vq as eval_vq

    from vqvae.tokenizer import load_tokenizer

    tok, data_dir = load_tokenizer(vq_dir), cfg.eval.data_dir or None
    res = eval_vq.evaluate(tok, split="test", num_examples=cfg.vq_examples, data_dir=data_dir, out_dir=vq_dir,
                           shapes_backend=cfg.shapes_backend)
    # Held-out (colour, shape) pairs: can the tokenizer write objects it never met as such?
    heldout = eval_vq.evaluate(tok, split="heldout", num_examples=cfg.vq_examples, data_dir=data_dir,
                               shapes_backend=cfg.shapes_backend)
    res["judge_accuracy_heldout"] = heldout["judge_accuracy"]
    res["psnr_heldout_db"] = heldout["psnr"]
    grid = vq_dir / "eval_vq.png"
    out_dir = run_dir / "eval"
    out_dir.mkdir(parents=True, exist_ok=True)
    record = {k: v for k, v in res.items() if k != "samples"}
    if grid.exists():
        shutil.copy(grid, out_dir / "vq_grid.png")
        record["grid"] = "eval/vq_grid.png"
    common.write_results(run_dir, "vq", record)
    renamed = {"psnr": "psnr_db"}
    return {f"vq_{renamed.get(k, k)}": v for k, v in _scalars(res).items()}


def stage_eval(name: str, module, pipe_fn, cfg: DemoConfig, n: int) -> Callable[[], dict[str, Any]]:
    def run() -> dict[str, Any]:
        ecfg = dataclasses.replace(cfg.eval, run_dir=cfg.run_dir, image_size=cfg.image_size, num_examples=n,
                                   shapes_backend=cfg.shapes_backend)
        res = module.evaluate(pipe_fn(), ecfg)
        common.write_results(cfg.run_dir, name, res)
        return common.headline_figures(name, res)

    return run


def run(cfg: DemoConfig) -> Path:
    from eval import caption, interleaved, perplexity, t2i, vqa
    from eval.report import write_report
    from train import lm as train_lm

    from chameleon_jax.host_devices import jax_started, set_cpu_devices

    if cfg.cpu_devices and not jax_started():
        set_cpu_devices(cfg.cpu_devices)
    import jax

    backend = jax.default_backend()
    cfg, schedule = with_schedule(cfg, backend)
    print(f"schedule: {schedule} (backend {backend}, {jax.device_count()} devices): the transformer trains "
          f"{cfg.lm.steps} steps", flush=True)
    run_dir = Path(cfg.run_dir)
    if cfg.overwrite and run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    configlib.save(cfg, run_dir / "config.json")
    stages = Stages(run_dir, cfg.overwrite)
    t0 = time.time()

    stages.run("data", [cfg.image_size, cfg.judge_examples, shapes_sizes(cfg), cfg.shapes_backend],
               lambda: stage_data(cfg))

    vq_cfg = dataclasses.replace(
        cfg.vq, run_dir=str(run_dir / "vq"), overwrite=cfg.overwrite,
        model=dataclasses.replace(cfg.vq.model, image_size=cfg.image_size),
        data=dataclasses.replace(cfg.vq.data, shapes_backend=cfg.shapes_backend),
    )
    _banner("vq: image tokenizer training")
    vq_dir = train_vqvae.run(vq_cfg)
    stages.run("vq_eval", [configlib.to_dict(vq_cfg), _stamp(vq_dir / "tokenizer"), cfg.vq_examples],
               lambda: stage_vq_eval(cfg, vq_dir, run_dir))

    lm_cfg = dataclasses.replace(
        cfg.lm, run_dir=str(run_dir / "lm"), vq_dir=str(vq_dir), overwrite=cfg.overwrite,
        data=dataclasses.replace(cfg.lm.data, image_size=cfg.image_size, shapes_backend=cfg.shapes_backend),
    )
    _banner("lm: tokenise the Shapes tasks, train the vocabulary and the transformer")
    lm_dir = train_lm.run(lm_cfg)
    model_dir = lm_dir / "model"

    pipe_holder: list = []

    def pipe():
        if not pipe_holder:
            from chameleon_jax.pipeline import load_pipeline

            pipe_holder.append(load_pipeline(model_dir))
        return pipe_holder[0]

    upstream = [_stamp(model_dir), configlib.to_dict(cfg.eval), cfg.image_size]
    for name, module, n in (
        ("caption", caption, cfg.caption_examples),
        ("vqa", vqa, cfg.vqa_examples),
        ("t2i", t2i, cfg.t2i_examples),
        ("interleaved", interleaved, cfg.interleaved_examples),
        ("perplexity", perplexity, cfg.perplexity_examples),
    ):
        stages.run(name, upstream + [n], stage_eval(name, module, pipe, cfg, n))

    _banner("report")
    figures = dict(stages.figures)
    figures["demo_seconds_this_run"] = round(time.time() - t0, 1)
    figures["demo_seconds_all_stages"] = round(sum(e.get("seconds", 0.0) for e in stages.done.values()), 1)
    lm_metrics = json.loads((lm_dir / "metrics.json").read_text()) if (lm_dir / "metrics.json").exists() else {}
    figures.update({f"lm_{k}" if not k.startswith("lm_") else k: v for k, v in _scalars(lm_metrics).items()})
    update_headline(run_dir / "metrics.json", figures)
    report = write_report(run_dir)
    print(common.format_table("headline figures", {k: figures[k] for k in HEADLINE if k in figures}))
    print(f"\nreport: {report}\nmetrics: {run_dir / 'metrics.json'}")
    return run_dir


def _stamp(path: Path) -> str:
    """Identifies a stage output by its files' names, sizes and modification times."""
    if not path.exists():
        return "missing"
    items = sorted((str(p.relative_to(path)), p.stat().st_size, int(p.stat().st_mtime)) for p in path.rglob("*") if p.is_file())
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()[:16]


def main(argv: list[str] | None = None) -> None:
    cfg = configlib.from_cli(sys.argv[1:] if argv is None else argv, PRESETS, "demo")
    run(cfg)


if __name__ == "__main__":
    host_malloc.reexec_with_huge_pages()
    configlib.main_guard(main)

"""What every evaluation entry point shares: its config, loading a run's pipeline, JSON + table output.

Every entry point runs on a device mesh (`mesh.*`, the training fields and rules) and
over several processes (`cluster.*`, as `train.lm`): each process generates its share
of every batch, the outputs are gathered so every process scores the same results,
and process 0 writes them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping, Sequence

from chameleon_jax.config import MeshConfig
from chameleon_jax.configlib import param
from chameleon_jax.data.shapes.spec import Backend as ShapesBackend
from chameleon_jax.generation.distributed import DistributedConfig, is_primary, maybe_initialize


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Settings shared by the evaluation entry points (`python -m eval.<task> key=value ...`)."""

    run_dir: str = param("runs/demo", "run directory: holds lm/model/ (or model/) and receives the results")
    model_dir: str = param("", "model directory to evaluate; empty = <run_dir>/lm/model, else <run_dir>/model")
    split: str = param("test", "Shapes split: train, validation, test or heldout")
    image_size: int = param(0, "Shapes image size in pixels; 0 = the image tokenizer's own size (64 without one)")
    num_examples: int = param(200, "how many examples to score (0 = the whole split)")
    batch_size: int = param(32, "prompts generated together in one batch")
    seed: int = param(0, "sampling seed")
    temperature: float = param(0.0, "text sampling temperature (0 = greedy)")
    image_temperature: float = param(
        0.0, "image-code sampling temperature (0 = greedy). Greedy by default: the judge scores exact attributes, "
             "and sampling at 1.0 scatters stray fragments (docs/experiments.md)"
    )
    image_top_k: int = param(0, "top-k for image codes (0 = off)")
    cfg_scale: float = param(
        1.5, "classifier-free guidance scale for image tokens (1 = off). Scale 3 broke the demo model's pictures "
             "into fragments (t2i seen 0.00 against 0.51 unguided after 5000 steps)"
    )
    image_candidates: int = param(
        8, "text to image: pictures drawn per prompt. Above 1 the first is drawn with the settings above, the "
           "others are sampled at candidate_temperature, and the one whose prompt the model itself reads likeliest "
           "as its caption is kept (chameleon_jax/generation/rerank.py)")
    candidate_temperature: float = param(1.0, "image-code sampling temperature of the candidate pictures after the first")
    max_new_tokens: int = param(48, "generation budget for text answers and captions")
    image_decoding: Literal["sequential", "jacobi"] = param("sequential", "image codes one per forward pass (sequential) or by speculative "
                                              "Jacobi decoding (jacobi: same distribution, fewer passes)")
    jacobi_window: int = param(16, "draft codes verified per forward pass with image_decoding=jacobi")
    data_dir: str = param("", "where the Shapes data set lives; empty = the default data directory")
    data_seed: int = param(
        0, "Shapes data seed: 0 is the data set the model is trained and scored on; another seed draws other "
           "pictures of the same splits and pairs (with shapes_backend=generate nothing is built), a set to choose "
           "decoding settings on without looking at the test or heldout split")
    shapes_backend: ShapesBackend = param("auto", "Shapes storage: auto, tfds (built array_record files) or generate (computed on access)")
    mesh: MeshConfig = param(
        MeshConfig(data=1, fsdp=1, tensor=1),
        "device mesh and rules, as in training: the sizes name how many devices (data=1 alone: one device; "
        "a -1 takes every device), e.g. mesh.data=-1 or mesh.tensor=8")
    cluster: DistributedConfig = param(DistributedConfig(), "multi-process runs (jax.distributed), as in train.lm")


def cli(name: str, evaluate, **defaults) -> None:
    """The command line of an evaluation: `python -m eval.<name> key=value ...` -> <run_dir>/eval/<name>.json,
    its figures merged into <run_dir>/metrics.json; `--help` lists every field."""
    import sys

    from chameleon_jax import configlib

    from train.metrics import update_headline

    def go():
        cfg = configlib.from_cli(sys.argv[1:], {name: lambda: dataclasses.replace(EvalConfig(), **defaults)}, name)
        maybe_initialize(cfg.cluster)
        results = evaluate(load_run_pipeline(cfg), cfg)
        if is_primary():
            write_results(cfg.run_dir, name, results)
            update_headline(Path(cfg.run_dir) / "metrics.json", headline_figures(name, results))

    configlib.main_guard(go)


def resolve_model_dir(cfg: EvalConfig) -> Path:
    if cfg.model_dir:
        return Path(cfg.model_dir)
    run = Path(cfg.run_dir)
    for candidate in (run / "lm" / "model", run / "model"):
        if (candidate / "config.json").exists():
            return candidate
    raise FileNotFoundError(f"no model directory under {run} (looked for lm/model/ and model/); set model_dir=")


def load_run_pipeline(cfg: EvalConfig):
    from chameleon_jax.pipeline import load_pipeline

    return load_pipeline(resolve_model_dir(cfg), mesh=cfg.mesh)


def batched(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def take(n_total: int, n: int) -> int:
    return n_total if n <= 0 else min(n, n_total)


def write_results(run_dir: str | os.PathLike, name: str, results: Mapping[str, Any]) -> Path:
    """Writes `<run_dir>/eval/<name>.json` atomically and prints the scalar results as a table."""
    out_dir = Path(run_dir) / "eval"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=2, sort_keys=True, default=_jsonable) + "\n")
    os.replace(tmp, path)
    print(format_table(name, results))
    return path


def headline_figures(name: str, results: Mapping[str, Any]) -> dict[str, Any]:
    """An evaluation's scalar figures as `metrics.json` names them: each carries the evaluation's name."""
    return {k if name in k else f"{name}_{k}": v for k, v in results.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _jsonable(x):
    try:
        return x.item()
    except AttributeError:
        return str(x)


def format_table(title: str, results: Mapping[str, Any]) -> str:
    rows = [(k, v) for k, v in results.items() if isinstance(v, (int, float))]
    width = max([len(k) for k, _ in rows] + [len(title)])
    lines = [title, "-" * (width + 14)]
    for k, v in rows:
        lines.append(f"{k:<{width}}  {v:>12.4f}" if isinstance(v, float) else f"{k:<{width}}  {v:>12d}")
    return "\n".join(lines)


def generate_all(pipe, prompts: Sequence[list], cfg: EvalConfig, desc: str, *, timings: list | None = None,
                 **kwargs) -> list[list]:
    """Runs `pipe.generate` over `prompts` in batches of `cfg.batch_size` with a progress bar.

    A short last batch after full ones is filled up to `cfg.batch_size` rows with copies of its
    last row, whose results are dropped, so one compiled loop serves every batch.

    With several processes each generates its contiguous share of every batch (rows keep
    their place in the batch, so the samples are the one-process ones) and every process
    gets all the results. `timings`, when given, receives one (rows, forward passes,
    seconds, shape) tuple per batch: the loop's steps with the prefill counted as one, the
    wall time of the call, and the (rows, padded prompt length) the loop was compiled for
    (the first call of a shape includes its compilation).
    """
    import jax
    from tqdm import tqdm

    from chameleon_jax.generation.placement import gather_token_lists

    results: list[list] = []
    bar = tqdm(total=len(prompts), desc=desc, unit="prompt", leave=False, disable=not is_primary())
    processes, index = jax.process_count(), jax.process_index()
    for i, chunk in enumerate(batched(list(prompts), cfg.batch_size)):
        real = len(chunk)
        # A short last batch is filled up with copies of its last prompt, on that prompt's random
        # stream (so they repeat its row exactly and are dropped): then the loop compiled for the
        # full batches serves it, where a batch of its own shape would compile the loop again
        # (seconds, against the tenths of a second the copies cost).
        chunk = list(chunk) + [chunk[-1]] * ((cfg.batch_size - real) if i > 0 else 0)
        streams = list(range(real)) + [real - 1] * (len(chunk) - real)
        per = -(-len(chunk) // processes)
        mine = list(range(index * per, min(len(chunk), (index + 1) * per)))
        ids = [pipe.encode_prompt(chunk[j]) for j in mine]
        start = time.perf_counter()
        out = pipe.generate_ids(ids, seed=cfg.seed + i, stream_ids=[streams[j] for j in mine],
                                **_with_default_budget(pipe, kwargs))
        tokens = gather_token_lists(out.tokens)[:real]
        if timings is not None:
            timings.append((real, out.steps, time.perf_counter() - start, (len(ids), out.prompt_len)))
        results.extend(pipe.segments_of_rows(tokens))
        bar.update(real)
    bar.close()
    return results


def _with_default_budget(pipe, kwargs: dict) -> dict:
    from chameleon_jax.pipeline import default_max_new_tokens

    if kwargs.get("max_new_tokens") is None:
        kwargs = {**kwargs, "max_new_tokens": default_max_new_tokens(kwargs.get("modality", "text"),
                                                                     pipe.codes_per_image)}
    return kwargs


def accuracy_by_objects(name: str, right: Sequence[bool], num_objects: Sequence[int]) -> dict[str, float]:
    """`{name}_{n}_objects`: the accuracy over the items whose picture holds n objects, for each n.

    A model that sees every object's attributes but cannot tell which belongs to which
    scores well on one-object pictures and near chance on two-object ones.
    """
    groups: dict[int, list[bool]] = {}
    for ok, n in zip(right, num_objects):
        groups.setdefault(int(n), []).append(bool(ok))
    return {f"{name}_{n}_objects": sum(v) / len(v) for n, v in sorted(groups.items())}


def text_of(segments: Sequence[Any]) -> str:
    """The generated text of a result (its str segments joined)."""
    return " ".join(s.strip() for s in segments if isinstance(s, str)).strip()


def images_of(segments: Sequence[Any]) -> list:
    """The generated images of a result, in order."""
    return [s for s in segments if not isinstance(s, str)]


def save_png(run_dir: str | os.PathLike, rel_path: str, image) -> str:
    """Saves a uint8 [H, W, 3] image under the run directory; returns the path relative to it."""
    from vqvae import viz

    if is_primary():  # one process writes
        viz.save_png(image, Path(run_dir) / rel_path)
    return rel_path


def for_pipeline(cfg: EvalConfig, pipe) -> EvalConfig:
    """`cfg` with image_size 0 replaced by the size the pipeline's image tokenizer reads (64 without one)."""
    from chameleon_jax.lm_data import tokenizer_image_size

    if cfg.image_size:
        return cfg
    return dataclasses.replace(cfg, image_size=tokenizer_image_size(getattr(pipe, "tokenizer", None)) or 64)


def load_examples(cfg: EvalConfig, split: str | None = None) -> list[dict[str, Any]]:
    """The first `cfg.num_examples` examples of a Shapes split."""
    from chameleon_jax.data import shapes

    source = shapes.load(split or cfg.split, cfg.image_size, cfg.data_dir or None, seed=cfg.data_seed,
                         backend=cfg.shapes_backend)
    return list(source.examples(0, take(len(source), cfg.num_examples)))

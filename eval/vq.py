"""Evaluate an image tokenizer on a Shapes split or on a folder of pictures.

    python -m eval.vq run_dir=runs/vq                      # the tokenizer in runs/vq/tokenizer, test split
    python -m eval.vq tokenizer_dir=/path/to/tokenizer run_dir=/tmp/out split=validation
    python -m eval.vq run_dir=runs/vq pictures=my_held_out_pictures/   # your own pictures (no judge)

Shapes is built at 24, 32, 64 and 128 px, so a tokenizer of another size is scored on
a folder: its pictures are fitted to the tokenizer's size as training fits them.

or `eval.vq.evaluate(run_dir_or_tokenizer, split="test") -> dict`. Writes
`<run_dir>/eval_vq.json` and `<run_dir>/eval_vq.png` (originals above their
reconstructions), merges the headline figures into `<run_dir>/metrics.json`
and prints a table:

    psnr                 dB, from the mean squared error over the whole split (uint8 scale)
    psnr_per_image_mean  dB, mean of per-image PSNR (perfect images capped at 100 dB)
    ssim                 Gaussian-window SSIM (11x11, sigma 1.5), mean over images
    codebook_usage       fraction of the codebook's codes used on the split
    codebook_perplexity  exp(entropy) of the split's code histogram
    judge_accuracy       fraction of reconstructions in which the Shapes judge reads exactly the true objects
    judge_accuracy_originals  the same on the original pictures (the judge's own ceiling)
    encode_images_per_s / decode_images_per_s   after compilation, at batch_size
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from chameleon_jax import configlib
from chameleon_jax.configlib import param
from chameleon_jax.data.shapes.spec import Backend as ShapesBackend


@dataclasses.dataclass(frozen=True)
class EvalVQConfig:
    """Tokenizer evaluation on Shapes."""

    run_dir: str = param("runs/vq", "run directory: its tokenizer/ is evaluated and the results are written here")
    tokenizer_dir: str = param("", "tokenizer to evaluate instead of <run_dir>/tokenizer")
    split: str = param("test", "Shapes split: train, validation, test or heldout")
    num_examples: int = param(0, "score only the first N pictures (0 = the whole split)")
    batch_size: int = param(100, "pictures encoded / decoded together")
    data_dir: str = param("", "Shapes data directory (empty = the default)")
    shapes_backend: ShapesBackend = param("auto", "Shapes storage: auto, tfds (built array_record files) or generate (computed on access)")
    judge: bool = param(True, "run the Shapes judge on the reconstructions")
    grid_size: int = param(16, "pictures shown in eval_vq.png")
    pictures: str = param("", "a folder of pictures to score instead of a Shapes split (fitted to the tokenizer's "
                              "size; the judge is off); empty = Shapes")


def _load_split(split: str, image_size: int, data_dir: str | None, limit: int, backend: str = "auto"):
    from chameleon_jax.data import shapes

    source = shapes.load(split, image_size=image_size, data_dir=data_dir, backend=backend)
    n = len(source) if limit <= 0 else min(limit, len(source))
    images = np.empty((n, image_size, image_size, 3), np.uint8)
    objects = []
    for i, rec in enumerate(source.examples(0, n)):
        images[i] = rec["image"]
        objects.append(shapes.example_objects(rec))
    return images, objects


def _timed(fn, x, batch_size: int):
    """Runs fn once on one batch (compilation), then over everything; returns (output, seconds)."""
    import jax

    jax.block_until_ready(fn(x[:batch_size], batch_size=batch_size))
    start = time.perf_counter()
    out = jax.block_until_ready(fn(x, batch_size=batch_size))
    return np.asarray(out), time.perf_counter() - start


def evaluate(
    source, split: str = "test", *, num_examples: int = 0, batch_size: int = 100, data_dir: str | None = None,
    out_dir: str | os.PathLike | None = None, judge: bool = True, grid_size: int = 16, images=None, objects=None,
    shapes_backend: ShapesBackend = "auto",
) -> dict[str, Any]:
    """Scores a tokenizer on a Shapes split and returns the figures (see the module docstring).

    source: a run directory (holding tokenizer/), a tokenizer directory, or a Tokenizer.
    out_dir: where eval_vq.json / eval_vq.png / metrics.json go; defaults to the run directory
      when `source` is a path (the tokenizer directory's parent for a tokenizer directory),
      nothing is written when it is None and `source` is a Tokenizer.
    images / objects: score these pictures (uint8 [N, S, S, 3]) and their object lists instead of
      reading the split (objects may be None when judge=False).
    shapes_backend: how the split is read (`shapes.load`'s backend: auto, tfds or generate).
    """
    from train.metrics import update_headline
    from vqvae import image_metrics, viz
    from vqvae.tokenizer import Tokenizer, is_tokenizer_dir, load_tokenizer

    if isinstance(source, Tokenizer):
        tok = source
    else:
        path = Path(source)
        tok = load_tokenizer(path)
        if out_dir is None:
            out_dir = path.parent if is_tokenizer_dir(path) and path.name == "tokenizer" else path
    if not tok.can_decode:
        raise ValueError("this tokenizer cannot decode (encoder-only import); reconstruction metrics need a decoder")
    if images is None:
        images, objects = _load_split(split, tok.image_size, data_dir, num_examples, shapes_backend)
    n = len(images)
    batch_size = min(batch_size, n)

    codes, encode_s = _timed(tok.encode, images, batch_size)
    recon, decode_s = _timed(tok.decode, codes, batch_size)

    mse = np.concatenate(
        [np.asarray(image_metrics.mse(images[i : i + 500], recon[i : i + 500])) for i in range(0, n, 500)]
    )
    ssim = np.concatenate(
        [np.asarray(image_metrics.ssim(images[i : i + 200], recon[i : i + 200])) for i in range(0, n, 200)]
    )
    counts = np.bincount(codes.reshape(-1), minlength=tok.codebook_size)
    p = counts[counts > 0] / counts.sum()
    results: dict[str, Any] = {
        "split": split,
        "num_images": n,
        "codes_per_image": tok.codes_per_image,
        "codebook_size": tok.codebook_size,
        "psnr": float(image_metrics.psnr_from_mse(mse.mean())),
        "psnr_per_image_mean": float(np.mean(np.minimum(image_metrics.psnr_from_mse(mse), 100.0))),
        "ssim": float(ssim.mean()),
        "codebook_usage": float((counts > 0).mean()),
        "codes_used": int((counts > 0).sum()),
        "codebook_perplexity": float(np.exp(-(p * np.log(p)).sum())),
        "encode_images_per_s": n / encode_s,
        "decode_images_per_s": n / decode_s,
        "batch_size": batch_size,
    }
    if judge:
        from chameleon_jax.data import shapes

        if objects is None:
            raise ValueError("judge=True needs the pictures' objects")
        results["judge_accuracy"] = float(np.mean([shapes.judge_matches(r, o) for r, o in zip(recon, objects)]))
        results["judge_accuracy_originals"] = float(
            np.mean([shapes.judge_matches(x, o) for x, o in zip(images, objects)])
        )

    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        k = min(grid_size, n)
        viz.save_png(viz.comparison_grid(images[:k], recon[:k]), out_dir / "eval_vq.png")
        results["samples"] = ["eval_vq.png"]
        tmp = out_dir / "eval_vq.json.tmp"
        tmp.write_text(json.dumps(results, indent=2) + "\n")
        os.replace(tmp, out_dir / "eval_vq.json")
        headline = {f"vq_{name}": results[name] for name in ("psnr", "ssim", "codebook_usage", "codebook_perplexity")}
        if judge:
            headline["vq_judge_accuracy"] = results["judge_accuracy"]
        update_headline(out_dir / "metrics.json", headline)
    return results


def folder_pictures(folder: str, size: int, limit: int = 0) -> np.ndarray:
    """Every picture under `folder` (the first `limit`), fitted to `size`: uint8 [N, size, size, 3]."""
    from chameleon_jax.data.picture_stream import picture_dataset

    try:
        ds = picture_dataset("folder", folder, size, limit=limit)
    except FileNotFoundError as e:
        raise configlib.ConfigError(f"pictures={folder}: {e}") from None
    return np.stack([ds[i] for i in range(len(ds))])


def _load_tokenizer_or_config_error(source: str):
    from vqvae.tokenizer import load_tokenizer

    try:
        return load_tokenizer(source)
    except FileNotFoundError as e:
        raise configlib.ConfigError(f"no tokenizer at {source}: {e}") from None


def format_results(results: dict[str, Any]) -> str:
    from eval.common import format_table

    return format_table(f"tokenizer on {results['split']} ({results['num_images']} pictures)", results)


def main(argv=None) -> None:
    from chameleon_jax.data.shapes.spec import IMAGE_SIZES

    def go():
        cfg = configlib.from_cli(sys.argv[1:] if argv is None else argv, {"default": EvalVQConfig}, "default")
        where = cfg.tokenizer_dir or cfg.run_dir
        tok = _load_tokenizer_or_config_error(where)
        split, judge, images = cfg.split, cfg.judge, None
        if cfg.pictures:
            images = folder_pictures(cfg.pictures, tok.image_size, cfg.num_examples)
            split, judge = cfg.pictures, False
        elif tok.image_size not in IMAGE_SIZES:
            raise configlib.ConfigError(
                f"the tokenizer in {where} takes {tok.image_size} px pictures and Shapes is built at "
                f"{', '.join(map(str, IMAGE_SIZES))} px: pass pictures=FOLDER to score it on your own")
        results = evaluate(
            tok, split, num_examples=cfg.num_examples, batch_size=cfg.batch_size, data_dir=cfg.data_dir or None,
            out_dir=cfg.run_dir, judge=judge, grid_size=cfg.grid_size, images=images,
            shapes_backend=cfg.shapes_backend,
        )
        print(format_results(results))

    configlib.main_guard(go)


if __name__ == "__main__":
    main()

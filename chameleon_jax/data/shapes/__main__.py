"""Build the Shapes data set and look at it.

    python -m chameleon_jax.data.shapes                          # build 64 px, print sizes and time
    python -m chameleon_jax.data.shapes image_size=32 train=2000 grid=/tmp/shapes.png
    python -m chameleon_jax.data.shapes judge=true               # also measure the judge per split
    python -m chameleon_jax.data.shapes --help                   # every option
"""

from __future__ import annotations

import dataclasses
import sys
import textwrap
import time

from chameleon_jax import configlib
from chameleon_jax.configlib import param
from chameleon_jax.data.shapes import records, spec
from chameleon_jax.data.shapes.judging import judge_matches
from chameleon_jax.data.shapes.source import load


@dataclasses.dataclass(frozen=True)
class ShapesCliConfig:
    image_size: int = param(64, "picture side in pixels: 24, 32, 64 or 128")
    data_dir: str = param("", "where to build ('' = $CHAMELEON_JAX_DATA or <repo>/data)")
    seed: int = param(0, "the data set's seed")
    train: int = param(spec.DEFAULT_SPLIT_SIZES["train"], "examples in the train split")
    validation: int = param(spec.DEFAULT_SPLIT_SIZES["validation"], "examples in the validation split")
    test: int = param(spec.DEFAULT_SPLIT_SIZES["test"], "examples in the test split")
    heldout: int = param(spec.DEFAULT_SPLIT_SIZES["heldout"], "examples in the heldout split")
    grid: str = param("", "if set, write a PNG grid of samples with their first caption to this path")
    grid_split: str = param("train", "the split the grid shows")
    grid_n: int = param(16, "pictures in the grid")
    judge: bool = param(False, "also run the judge over (up to judge_n examples of) every split and print its accuracy")
    judge_n: int = param(1000, "examples per split the judge reads (0 = all)")


PRESETS = {"default": ShapesCliConfig}


def write_grid(path: str, examples: list[dict], columns: int = 4) -> None:
    """A PNG of the examples' pictures (upscaled to at least 128 px) with their first caption below."""
    from PIL import Image, ImageDraw

    s = examples[0]["image"].shape[0]
    scale = max(1, 128 // s)
    tile, text_h = s * scale, 46
    width = max(tile, 220)
    rows = (len(examples) + columns - 1) // columns
    canvas = Image.new("RGB", (columns * width, rows * (tile + text_h)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for k, ex in enumerate(examples):
        x, y = (k % columns) * width, (k // columns) * (tile + text_h)
        canvas.paste(Image.fromarray(ex["image"]).resize((tile, tile), Image.NEAREST), (x + (width - tile) // 2, y))
        lines = textwrap.wrap(ex["captions"][0], 34)[:3]
        draw.multiline_text((x + 4, y + tile + 2), "\n".join(lines), fill=(0, 0, 0))
    canvas.save(path)


def main(argv: list[str]) -> None:
    cfg = configlib.from_cli(argv, PRESETS, "default")
    sizes = {s: getattr(cfg, s) for s in spec.SPLITS}
    data_dir = cfg.data_dir or None
    start = time.perf_counter()
    sources = {s: load(s, cfg.image_size, data_dir, sizes, seed=cfg.seed) for s in spec.SPLITS}
    print(f"Shapes {cfg.image_size}px ready in {time.perf_counter() - start:.1f}s: "
          + ", ".join(f"{s} {len(src)}" for s, src in sources.items()))
    if cfg.grid:
        src = sources[cfg.grid_split]
        write_grid(cfg.grid, list(src.examples(0, cfg.grid_n)))
        print(f"wrote {cfg.grid}")
    if cfg.judge:
        for s, src in sources.items():
            n = len(src) if cfg.judge_n <= 0 else min(cfg.judge_n, len(src))
            t = time.perf_counter()
            hits = sum(judge_matches(ex["image"], records.example_objects(ex)) for ex in src.__getitems__(range(n)))
            print(f"judge exact match on {s}: {hits}/{n} = {hits / n:.4f} ({(time.perf_counter() - t) / n * 1e3:.2f} ms/picture)")


if __name__ == "__main__":
    configlib.main_guard(lambda: main(sys.argv[1:]))

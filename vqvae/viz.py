"""Image grids for reconstruction previews, and the one PNG writer."""

from __future__ import annotations

import os

import einops
import numpy as np


def grid(rows: list[np.ndarray], pad: int = 2, fill: int = 255) -> np.ndarray:
    """Stacks rows of uint8 images [N, H, W, 3] (equal N) into one uint8 picture with `pad` px gaps."""
    tiles_rnhwc = np.stack([np.asarray(r, np.uint8) for r in rows])
    tiles_rnhwc = np.pad(tiles_rnhwc, ((0, 0), (0, 0), (0, pad), (0, pad), (0, 0)), constant_values=fill)
    picture = einops.rearrange(tiles_rnhwc, "r n h w c -> (r h) (n w) c")
    return np.pad(picture, ((pad, 0), (pad, 0), (0, 0)), constant_values=fill)


def comparison_grid(originals, reconstructions, per_row: int = 8, scale: int = 2) -> np.ndarray:
    """Pairs of rows: originals above their reconstructions, `per_row` images a row, upscaled `scale`x."""
    originals = np.asarray(originals, np.uint8)
    reconstructions = np.asarray(reconstructions, np.uint8)
    n = len(originals) - len(originals) % per_row if len(originals) >= per_row else len(originals)
    per_row = min(per_row, max(n, 1))
    rows = []
    for start in range(0, n, per_row):
        rows += [originals[start : start + per_row], reconstructions[start : start + per_row]]
    picture = grid(rows)
    return picture.repeat(scale, axis=0).repeat(scale, axis=1) if scale > 1 else picture


def save_png(image: np.ndarray, path: str | os.PathLike) -> None:
    """Writes a uint8 [H, W, 3] image as a PNG, creating the parent directories."""
    from pathlib import Path

    from PIL import Image

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(image, np.uint8)).save(path)

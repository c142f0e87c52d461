"""Image grids for reconstruction previews."""

from __future__ import annotations

import os

import numpy as np


def grid(rows: list[np.ndarray], pad: int = 2, fill: int = 255) -> np.ndarray:
    """Stacks rows of uint8 images [N, H, W, 3] (equal N) into one uint8 picture with `pad` px gaps."""
    rows = [np.asarray(r, np.uint8) for r in rows]
    n, h, w, c = rows[0].shape
    out = np.full((len(rows) * (h + pad) + pad, n * (w + pad) + pad, c), fill, np.uint8)
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            out[y : y + h, x : x + w] = img
    return out


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
    from PIL import Image

    Image.fromarray(np.asarray(image, np.uint8)).save(path)

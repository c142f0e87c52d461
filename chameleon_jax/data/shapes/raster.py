"""Rasterising objects: crisp, aliased masks sampled at pixel centres, no antialiasing.

Every shape is defined in continuous coordinates around a centre (cy, cx) with
a bounding-box side `extent`; pixel (y, x) is inside when its centre
(y + 0.5, x + 0.5) is strictly inside the shape. The judge reuses `shape_mask`
to draw the templates it compares blobs against.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from chameleon_jax.data.shapes import spec


def shape_mask(shape: int, extent: float, cy: float, cx: float, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Bool mask of `shape` (an index into spec.SHAPES) centred at (cy, cx).

    ys: [H, 1] and xs: [1, W] pixel indices (any broadcastable pair); returns bool [H, W].
    The triangle points up with its base at the bottom of the bounding box.
    """
    dy = ys + 0.5 - cy
    dx = xs + 0.5 - cx
    h = extent / 2
    name = spec.SHAPES[shape]
    if name == "square":
        return (np.abs(dx) < h) & (np.abs(dy) < h)
    if name == "circle":
        return dx * dx + dy * dy < h * h
    if name == "diamond":
        return np.abs(dx) + np.abs(dy) < h
    if name == "triangle":
        return (dy > -h) & (dy < h) & (np.abs(dx) < (dy + h) / 2)
    raise ValueError(f"unknown shape index {shape}")


def object_mask(obj: spec.ObjectAttrs, image_size: int) -> np.ndarray:
    """Bool [S, S] mask of one object placed in its grid cell."""
    lay = spec.layout(image_size)
    ys = np.arange(image_size)[:, None]
    xs = np.arange(image_size)[None, :]
    return shape_mask(obj.shape, lay.extents[obj.size], lay.centers[obj.row], lay.centers[obj.col], ys, xs)


def render(objects: Sequence[spec.ObjectAttrs], image_size: int = 64) -> np.ndarray:
    """Draws a picture: uint8 [S, S, 3], background spec.BACKGROUND_RGB, one flat colour per object.

    Raises ValueError for an invalid scene (no objects, too many, or two in one cell).
    """
    spec.check_scene(objects)
    image = np.empty((image_size, image_size, 3), np.uint8)
    image[...] = spec.BACKGROUND_RGB
    for obj in objects:
        image[object_mask(obj, image_size)] = spec.PALETTE_RGB[obj.color]
    return image

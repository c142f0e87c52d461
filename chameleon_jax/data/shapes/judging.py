"""The judge: reads every object's attributes back from a Shapes picture, with no learning.

It scores generated pictures (decoded from VQ codes, so slightly blurred and
noisy), so each step is chosen to survive that:

1. Colour by "ink" direction. A pixel p is explained as a blend of the
   background b and one palette colour c: b - p is parallel to b - c, whatever
   the blend weight. Each pixel takes the colour whose direction is closest
   (cosine), and counts as foreground when it carries at least half that
   colour's ink. A blurred edge therefore keeps its colour instead of drifting
   to a neighbouring palette entry, and the half-ink contour of a blurred
   object sits where the sharp edge was.
2. Connected components (4-neighbours) of same-colour foreground; specks
   smaller than half the smallest object are ignored.
3. Shape and size together, by template: each (shape, size) is drawn with
   raster.shape_mask so that its centroid lands on the blob's centroid, and the
   best intersection-over-union wins. A blob that matches no template well
   (IoU below MIN_IOU: two objects run together, junk) is counted in
   `num_rejected`, not reported as an object.
4. Position: the grid cell nearest to the matched template's centre.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import numpy as np

from chameleon_jax.data.shapes import raster, spec

MIN_INK = 0.5  # fraction of a colour's full ink a pixel needs to count as foreground
MIN_COSINE = 0.85  # a foreground pixel's ink must point within ~32 degrees of its colour's
MIN_IOU = 0.55  # below this a blob is not a recognisable object
SPECK_FRACTION = 0.5  # blobs smaller than this fraction of the smallest object are noise


@dataclasses.dataclass(frozen=True)
class JudgeResult:
    """What the judge read from one picture.

    objects: recognised objects in canonical (reading) order.
    scores: the template IoU of each object, in the same order (1.0 for a clean render).
    num_rejected: blobs bigger than a speck that matched no template.
    """

    objects: list[spec.ObjectAttrs]
    scores: list[float]
    num_rejected: int

    @property
    def num_found(self) -> int:
        return len(self.objects)


def _ink_directions() -> tuple[np.ndarray, np.ndarray]:
    dirs = spec.BACKGROUND_RGB.astype(np.float32)[None, :] - spec.PALETTE_RGB.astype(np.float32)  # [K, 3]
    return dirs, np.linalg.norm(dirs, axis=1)


def classify_pixels(image: np.ndarray) -> np.ndarray:
    """Per-pixel colour index into spec.COLORS, or -1 for background / unclear. int32 [H, W]."""
    background = _estimate_background(image)
    ink = background[None, None, :] - image.astype(np.float32)  # [H, W, 3]
    dirs, norms = _ink_directions()
    proj = np.einsum("hwc,kc->hwk", ink, dirs)  # [H, W, K]
    ink_norm = np.linalg.norm(ink, axis=-1, keepdims=True)
    cosine = proj / (norms[None, None, :] * np.maximum(ink_norm, 1e-6))
    best = np.argmax(cosine, axis=-1)
    best_cos = np.take_along_axis(cosine, best[..., None], axis=-1)[..., 0]
    amount = np.take_along_axis(proj, best[..., None], axis=-1)[..., 0] / (norms[best] ** 2)
    foreground = (amount >= MIN_INK) & (best_cos >= MIN_COSINE)
    return np.where(foreground, best, -1).astype(np.int32)


def _estimate_background(image: np.ndarray) -> np.ndarray:
    """The background colour: the median of the one-pixel border (objects never touch it),
    unless that is far from the nominal background (then the nominal one)."""
    border = np.concatenate([image[0], image[-1], image[1:-1, 0], image[1:-1, -1]]).astype(np.float32)
    med = np.median(border, axis=0)
    nominal = spec.BACKGROUND_RGB.astype(np.float32)
    return med if np.linalg.norm(med - nominal) < 40 else nominal


def connected_components(labels: np.ndarray) -> tuple[np.ndarray, int]:
    """4-connected components of equal, non-negative labels.

    labels: int [H, W], -1 for unlabelled pixels. Returns (ids int32 [H, W], n): -1 off
    the labelled pixels, 0..n-1 on them, numbered in raster order of first pixel.
    Vectorised min-label propagation with pointer jumping (no SciPy needed).
    """
    h, w = labels.shape
    fg = labels >= 0
    big = h * w
    ids = np.where(fg, np.arange(h * w).reshape(h, w), big)
    right = fg[:, :-1] & (labels[:, :-1] == labels[:, 1:])
    down = fg[:-1, :] & (labels[:-1, :] == labels[1:, :])
    while True:
        new = ids.copy()
        np.minimum(new[:, :-1], np.where(right, ids[:, 1:], big), out=new[:, :-1])
        np.minimum(new[:, 1:], np.where(right, ids[:, :-1], big), out=new[:, 1:])
        np.minimum(new[:-1, :], np.where(down, ids[1:, :], big), out=new[:-1, :])
        np.minimum(new[1:, :], np.where(down, ids[:-1, :], big), out=new[1:, :])
        flat = new.reshape(-1)
        for _ in range(2):  # pointer jumping: follow each pixel's id to that pixel's id
            new[fg] = flat[new[fg]]
        if np.array_equal(new, ids):
            break
        ids = new
    uniq, inverse = np.unique(ids[fg], return_inverse=True)
    out = np.full((h, w), -1, np.int32)
    out[fg] = inverse
    return out, int(uniq.size)


@functools.lru_cache(maxsize=None)
def _template_offsets(image_size: int) -> dict[tuple[int, int], tuple[float, float, int]]:
    """For each (shape, size): the pixel centroid's offset from the shape's centre, and its area."""
    lay = spec.layout(image_size)
    out = {}
    for size, extent in enumerate(lay.extents):
        c = extent + 0.5  # a pixel centre, well inside a 2*extent+1 canvas
        ys = np.arange(2 * extent + 1)[:, None]
        xs = np.arange(2 * extent + 1)[None, :]
        for shape in range(len(spec.SHAPES)):
            m = raster.shape_mask(shape, extent, c, c, ys, xs)
            yy, xx = np.nonzero(m)
            out[(shape, size)] = (float(yy.mean() + 0.5 - c), float(xx.mean() + 0.5 - c), int(m.sum()))
    return out


def _match(yy: np.ndarray, xx: np.ndarray, image_size: int) -> tuple[int, int, float, float, float]:
    """Best (shape, size, iou, centre_y, centre_x) for the blob with pixels (yy[i], xx[i])."""
    lay = spec.layout(image_size)
    pad = max(lay.extents)
    cy = yy.mean() + 0.5
    cx = xx.mean() + 0.5
    # Compare on a window that holds any template centred near the blob's centroid;
    # blob pixels outside it still count in the union through `area`.
    top, left = int(np.floor(cy)) - pad, int(np.floor(cx)) - pad
    size_w = 2 * pad + 1
    window = np.zeros((size_w, size_w), bool)
    by, bx = yy - top, xx - left
    keep = (by >= 0) & (by < size_w) & (bx >= 0) & (bx < size_w)
    window[by[keep], bx[keep]] = True
    area = yy.size
    ys = np.arange(top, top + size_w)[:, None]
    xs = np.arange(left, left + size_w)[None, :]
    best = (0, 0, -1.0, cy, cx)
    for (shape, size), (oy, ox, _) in _template_offsets(image_size).items():
        ty, tx = cy - oy, cx - ox
        t = raster.shape_mask(shape, lay.extents[size], ty, tx, ys, xs)
        inter = int((t & window).sum())
        iou = inter / (area + int(t.sum()) - inter)
        if iou > best[2]:
            best = (shape, size, iou, ty, tx)
    return best


def judge(image: np.ndarray) -> JudgeResult:
    """Reads the objects of a picture: uint8 [S, S, 3] (S >= 24; the layout follows from S).

    Never raises for a well-formed array: a blank picture, pure noise or junk
    gives few or no objects. Raises ValueError for an array of the wrong shape
    or dtype.
    """
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or image.shape[0] != image.shape[1]:
        raise ValueError(f"judge expects a square uint8 [S, S, 3] image, got {image.dtype} {image.shape}")
    size = image.shape[0]
    lay = spec.layout(size)
    labels = classify_pixels(image)
    ids, n = connected_components(labels)
    min_area = SPECK_FRACTION * min(a for _, _, a in _template_offsets(size).values())
    found, rejected = [], 0
    if n:
        areas = np.bincount(ids[ids >= 0], minlength=n)
        for k in np.nonzero(areas >= min_area)[0]:
            yy, xx = np.nonzero(ids == k)
            shape, obj_size, iou, ty, tx = _match(yy, xx, size)
            if iou < MIN_IOU:
                rejected += 1
                continue
            color = int(labels[yy[0], xx[0]])
            row = int(np.argmin([abs(ty - c) for c in lay.centers]))
            col = int(np.argmin([abs(tx - c) for c in lay.centers]))
            found.append((spec.ObjectAttrs(shape, color, obj_size, row, col), float(iou)))
    found.sort(key=lambda t: (t[0].row, t[0].col, t[0].shape, t[0].color, t[0].size))
    return JudgeResult([o for o, _ in found], [s for _, s in found], rejected)


def judge_matches(image: np.ndarray, objects: Sequence[spec.ObjectAttrs]) -> bool:
    """True when the judge reads exactly `objects` (any order) and nothing else that looks like an object."""
    result = judge(image)
    return result.num_rejected == 0 and result.objects == spec.canonical(objects)

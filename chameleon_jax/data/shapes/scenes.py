"""Sampling scenes (lists of objects) per split, and single-attribute edits of a scene.

Randomness is keyed by (seed, split, index): example i of a split does not
depend on how many examples the split has, so a small build is a prefix of a
large one, and any example can be regenerated on its own.
"""

from __future__ import annotations

import dataclasses
import zlib

import numpy as np

from chameleon_jax.data.shapes import spec

P_TWO_OBJECTS = 0.6


def split_id(split: str) -> int:
    """A stable integer for a split name (part of every random key)."""
    if split not in spec.SPLITS:
        raise ValueError(f"unknown Shapes split {split!r}; known splits: {', '.join(spec.SPLITS)}")
    return zlib.crc32(split.encode())


def example_rng(seed: int, split: str, index: int, stream: int = 0) -> np.random.Generator:
    """The generator for example `index` of `split`; `stream` separates independent uses (scene, text, edits)."""
    return np.random.default_rng(np.random.SeedSequence([seed, split_id(split), index, stream]))


def _allowed_pairs(split: str) -> tuple[tuple[int, int], ...]:
    return tuple(sorted(spec.HELDOUT_PAIR_IDS)) if split == "heldout" else spec.SEEN_PAIR_IDS


def sample_scene(rng: np.random.Generator, split: str) -> list[spec.ObjectAttrs]:
    """One or two objects in distinct cells, in canonical order.

    train / validation / test use only the (colour, shape) pairs outside
    spec.HELDOUT_PAIRS. In `heldout`, the first object drawn uses a held-out pair
    and a second one (if any) may use any pair.
    """
    n = 2 if rng.random() < P_TWO_OBJECTS else 1
    cells = rng.choice(9, size=n, replace=False)
    everything = tuple((c, s) for c in range(len(spec.COLORS)) for s in range(len(spec.SHAPES)))
    objects = []
    for i, cell in enumerate(cells):
        pool = _allowed_pairs(split) if (split != "heldout" or i == 0) else everything
        color, shape = pool[rng.integers(len(pool))]
        size = int(rng.integers(len(spec.SIZES)))
        objects.append(spec.ObjectAttrs(shape, color, size, int(cell) // 3, int(cell) % 3))
    return spec.canonical(objects)


@dataclasses.dataclass(frozen=True)
class Edit:
    """One object of a scene changes one attribute: "color" | "shape" | "size" | "position"."""

    target: int  # index of the object in the scene before the edit
    attribute: str
    before: spec.ObjectAttrs
    after: spec.ObjectAttrs


def sample_edit(
    rng: np.random.Generator, objects: list[spec.ObjectAttrs], split: str
) -> tuple[list[spec.ObjectAttrs], Edit]:
    """Changes one attribute of one object; returns the new scene (canonical order) and the edit.

    The edited object may not create a (colour, shape) pair that `split` must
    not show, and a moved object goes to an empty cell. Outside `heldout` the
    result therefore stays within the split's pairs; in `heldout` an edit never
    removes the scene's last held-out pair.
    """
    for _ in range(100):
        target = int(rng.integers(len(objects)))
        old = objects[target]
        attribute = ("color", "shape", "size", "position")[int(rng.integers(4))]
        if attribute == "color":
            new = dataclasses.replace(old, color=int((old.color + 1 + rng.integers(len(spec.COLORS) - 1)) % len(spec.COLORS)))
        elif attribute == "shape":
            new = dataclasses.replace(old, shape=int((old.shape + 1 + rng.integers(len(spec.SHAPES) - 1)) % len(spec.SHAPES)))
        elif attribute == "size":
            new = dataclasses.replace(old, size=1 - old.size)
        else:
            taken = {(o.row, o.col) for o in objects}
            free = [c for c in range(9) if (c // 3, c % 3) not in taken]
            cell = free[int(rng.integers(len(free)))]
            new = dataclasses.replace(old, row=cell // 3, col=cell % 3)
        scene = list(objects)
        scene[target] = new
        if split == "heldout":
            if not any(o.is_heldout for o in scene):
                continue
        elif new.is_heldout:
            continue
        return spec.canonical(scene), Edit(target, attribute, old, new)
    raise RuntimeError("no valid edit found")  # unreachable for valid scenes: size and position edits always fit

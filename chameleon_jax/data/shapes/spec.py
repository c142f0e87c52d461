"""What a Shapes picture may contain: attribute vocabularies, palette, layout, held-out pairs.

A picture is a plain background with one or two objects. Each object has a
shape, a colour, a size and a cell of a 3x3 grid; two objects never share a
cell, so an object is named unambiguously by its cell. Everything here is a
constant or a pure function of the image size: the renderer, the judge, the
caption writer and the caption parser all read from this one file.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Literal, Mapping, Sequence, get_args

import numpy as np

SHAPES = ("square", "circle", "triangle", "diamond")
COLORS = ("red", "green", "blue", "yellow", "cyan", "magenta")
SIZES = ("small", "large")
ROWS = ("top", "middle", "bottom")
COLS = ("left", "center", "right")
# The name of each grid cell, indexed [row][col]; the middle cell is "center".
POSITIONS = (
    ("top left", "top", "top right"),
    ("left", "center", "right"),
    ("bottom left", "bottom", "bottom right"),
)
IMAGE_SIZES = (24, 32, 64, 128)
MAX_OBJECTS = 2

# The six colours sit at the corners of the RGB cube (primaries and secondaries,
# slightly darkened) so that every pair is far apart and the "ink" direction
# from the background (see judging.py) differs by at least ~30 degrees.
PALETTE_RGB = np.array(
    [
        (220, 20, 20),  # red
        (20, 160, 20),  # green
        (20, 40, 220),  # blue
        (230, 200, 0),  # yellow
        (0, 190, 210),  # cyan
        (200, 0, 200),  # magenta
    ],
    dtype=np.uint8,
)
BACKGROUND_RGB = np.array((240, 240, 240), dtype=np.uint8)

# (colour, shape) pairs that only the `heldout` split shows. One per shape and
# never two with the same colour, so every colour and every shape still occurs
# in training, only never in these combinations.
HELDOUT_PAIRS = (
    ("red", "circle"),
    ("green", "square"),
    ("blue", "triangle"),
    ("yellow", "diamond"),
)
HELDOUT_PAIR_IDS = frozenset((COLORS.index(c), SHAPES.index(s)) for c, s in HELDOUT_PAIRS)
# Every (colour, shape) pair that the train / validation / test splits may use, in a fixed order.
SEEN_PAIR_IDS = tuple(
    (c, s) for c in range(len(COLORS)) for s in range(len(SHAPES)) if (c, s) not in HELDOUT_PAIR_IDS
)

SPLITS = ("train", "validation", "test", "heldout")

# How a stage reads Shapes (source.load): "tfds" builds the splits once as array_record files and
# reads them, "generate" draws each example on access, "auto" is "tfds" when TFDS imports.
Backend = Literal["auto", "tfds", "generate"]
BACKENDS: tuple[str, ...] = get_args(Backend)
DEFAULT_SPLIT_SIZES = {"train": 20_000, "validation": 1_000, "test": 1_000, "heldout": 1_000}


def split_sizes(sizes: Mapping[str, int] | None = None) -> dict[str, int]:
    """Examples per split: DEFAULT_SPLIT_SIZES updated with `sizes` (validated), in SPLITS order."""
    merged = dict(DEFAULT_SPLIT_SIZES)
    for split, n in (sizes or {}).items():
        if split not in merged:
            raise ValueError(f"unknown Shapes split {split!r} in sizes; known splits: {', '.join(SPLITS)}")
        if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
            raise ValueError(f"the size of split {split!r} must be a positive integer, got {n!r}")
        merged[split] = int(n)
    return {s: merged[s] for s in SPLITS}


@dataclasses.dataclass(frozen=True)
class ObjectAttrs:
    """One object of a picture, as indices into SHAPES, COLORS, SIZES and the 3x3 grid."""

    shape: int
    color: int
    size: int
    row: int
    col: int

    def __post_init__(self):
        for name, n in (("shape", len(SHAPES)), ("color", len(COLORS)), ("size", len(SIZES)), ("row", 3), ("col", 3)):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or not 0 <= v < n:
                raise ValueError(f"ObjectAttrs.{name} must be an integer in [0, {n}), got {v!r}")
            object.__setattr__(self, name, int(v))

    @property
    def shape_name(self) -> str:
        return SHAPES[self.shape]

    @property
    def color_name(self) -> str:
        return COLORS[self.color]

    @property
    def size_name(self) -> str:
        return SIZES[self.size]

    @property
    def position_name(self) -> str:
        return POSITIONS[self.row][self.col]

    def names(self) -> dict[str, str]:
        """{"shape": "circle", "color": "red", "size": "large", "position": "top left"}."""
        return {
            "shape": self.shape_name,
            "color": self.color_name,
            "size": self.size_name,
            "position": self.position_name,
        }

    def describe(self, leave_out: str | None = None) -> str:
        """"large red circle" (no position); leave_out="color" gives "large circle" and
        leave_out="shape" gives "large red shape"."""
        if leave_out == "color":
            return f"{self.size_name} {self.shape_name}"
        if leave_out == "shape":
            return f"{self.size_name} {self.color_name} shape"
        if leave_out is not None:
            raise ValueError(f"leave_out must be None, 'color' or 'shape', got {leave_out!r}")
        return f"{self.size_name} {self.color_name} {self.shape_name}"

    @property
    def pair(self) -> tuple[int, int]:
        """The (colour, shape) pair, as in HELDOUT_PAIR_IDS."""
        return (self.color, self.shape)

    @property
    def is_heldout(self) -> bool:
        return self.pair in HELDOUT_PAIR_IDS

    @classmethod
    def from_names(cls, shape: str, color: str, size: str, position: str) -> "ObjectAttrs":
        for r, row in enumerate(POSITIONS):
            if position in row:
                return cls(SHAPES.index(shape), COLORS.index(color), SIZES.index(size), r, row.index(position))
        raise ValueError(f"unknown position {position!r}; known: {[p for row in POSITIONS for p in row]}")


def canonical(objects: Iterable[ObjectAttrs]) -> list[ObjectAttrs]:
    """Objects in reading order (row, then column): the order the judge and the parser report."""
    return sorted(objects, key=lambda o: (o.row, o.col, o.shape, o.color, o.size))


def check_scene(objects: Sequence[ObjectAttrs]) -> None:
    """Raises ValueError unless `objects` is a valid picture: 1..MAX_OBJECTS objects in distinct cells."""
    if not 1 <= len(objects) <= MAX_OBJECTS:
        raise ValueError(f"a picture holds 1 to {MAX_OBJECTS} objects, got {len(objects)}")
    cells = [(o.row, o.col) for o in objects]
    if len(set(cells)) != len(cells):
        raise ValueError(f"two objects share a grid cell: {cells}")


@dataclasses.dataclass(frozen=True)
class Layout:
    """Pixel geometry for one image size.

    `centers` are the continuous pixel coordinates of the three row/column
    centres; each sits on a pixel centre (x.5), and object extents are odd, so
    every object is rasterised symmetrically and identically in every cell.
    """

    image_size: int
    centers: tuple[float, float, float]
    extents: tuple[int, int]  # bounding-box side in pixels of a small and a large object

    @property
    def spacing(self) -> float:
        return (self.centers[2] - self.centers[0]) / 2


def _odd(x: float) -> int:
    return int(2 * np.floor(x / 2) + 1)


def layout(image_size: int) -> Layout:
    """The layout of an `image_size` picture (any size >= 24; 24, 32, 64 and 128 are the built ones).

    64 px: centres 10.5 / 32.5 / 53.5, small 9 px, large 17 px (a gap of >= 4 px
    between large objects in neighbouring cells).
    24 px: cells of exactly 8 px (centres 4.5 / 12.5 / 20.5, small 5 px, large 7 px), so a
    grid of 3x3 codes of 8 px gives each cell a code of its own. Three large objects and the
    gaps between them fill the 24 px, so those of the last row and column touch the edge.
    """
    if image_size < 24:
        raise ValueError(f"Shapes pictures need at least 24 pixels a side, got {image_size}")
    cell = image_size / 3
    centers = tuple(float(np.floor((i + 0.5) * cell)) + 0.5 for i in range(3))
    return Layout(image_size, centers, (_odd(0.42 * cell + 1), _odd(0.8 * cell)))

"""Random-access sources of Shapes examples (what `shapes.load` returns), building on first use.

A source has len(), [i] -> example record (see records.make_example) and
__getitems__ for batched reads, which is the random-access protocol grain's
`MapDataset.source` / `DataLoader` consume.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from chameleon_jax.data import paths
from chameleon_jax.data.shapes import records, spec

log = logging.getLogger(__name__)


class _Source:
    split: str
    image_size: int
    # Examples worth reading together: sequential readers (`examples`) and caches that fill on a miss
    # (ShapesMixture) fetch this many at a time.
    read_block: int = 1

    def __len__(self) -> int:
        raise NotImplementedError

    def _read(self, index: int) -> dict[str, Any]:
        raise NotImplementedError

    def _index(self, index: int) -> int:
        index = int(index)
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for the {self.split!r} split of {n} examples")
        return index

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self._read(self._index(index))

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        return [self[i] for i in indices]

    def examples(self, start: int = 0, stop: int | None = None):
        """Examples start, ..., stop - 1 in order (stop None = the end), read `read_block` at a time."""
        stop = len(self) if stop is None else min(int(stop), len(self))
        for lo in range(int(start), stop, self.read_block):
            yield from self.__getitems__(range(lo, min(lo + self.read_block, stop)))

    def __iter__(self):
        return self.examples()

    def __repr__(self):
        return f"{type(self).__name__}(split={self.split!r}, image_size={self.image_size}, len={len(self)})"


class TfdsSource(_Source):
    """A built split read through `tfds` data sources (array_record, random access).

    Records are parsed by `records.parse_serialized`, which knows this builder's layout, rather
    than by TFDS's generic decoder, whose decoding would be most of the cost of reading Shapes
    (the tokenizer's data, the tokenisation of the transformer's documents, every evaluation):
    a read and parse take about a quarter of the time of a read and TFDS's decoding
    (`python -m eval.bench.records`). When the source opens, its first record is decoded both
    ways; should they ever differ (another TFDS version writing another layout), the source
    keeps TFDS's decoder and warns.
    """

    # One array_record read alone costs about 20 times its share of a batched read (365 against
    # 17 us a record).
    read_block = 256

    def __init__(self, data_source, split: str, image_size: int, length: int | None = None):
        self._source = data_source
        self.split = split
        self.image_size = image_size
        self._length = len(data_source) if length is None else min(length, len(data_source))
        # The array_record reader under TFDS's source gives the stored bytes.
        self._fast = hasattr(data_source, "data_source") and (self._length == 0 or self._fast_decoding_agrees())
        if not self._fast:
            log.warning("Shapes %s: the stored records do not parse as this builder's layout; decoding them "
                        "with TFDS's generic decoder (about four times as slow a record)", split)

    def _fast_decoding_agrees(self) -> bool:
        try:
            fast = records.parse_serialized(self._source.data_source[0], self.image_size)
        except Exception:  # noqa: BLE001 - any failure means the layout is not ours
            return False
        return records.same_record(fast, records.decode_record(self._source[0]))

    def __len__(self) -> int:
        return self._length

    def _read(self, index: int) -> dict[str, Any]:
        if not self._fast:
            return records.decode_record(self._source[index])
        return records.parse_serialized(self._source.data_source[index], self.image_size)

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        idx = [self._index(i) for i in indices]
        if not self._fast:
            return [records.decode_record(r) for r in self._source.__getitems__(idx)]
        return [records.parse_serialized(r, self.image_size) for r in self._source.data_source.__getitems__(idx)]


class GeneratedSource(_Source):
    """The same examples computed on access, with nothing stored (used where TFDS is not installed)."""

    def __init__(self, split: str, image_size: int, size: int, seed: int):
        self.split, self.image_size, self._size, self._seed = split, image_size, size, seed

    def __len__(self) -> int:
        return self._size

    def _read(self, index: int) -> dict[str, Any]:
        return records.make_example(self._seed, self.split, index, self.image_size)


@contextlib.contextmanager
def _build_lock(directory: Path, name: str):
    """Serialises builds of the same config across processes (e.g. several test or data workers)."""
    directory.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX: no cross-process lock
        yield
        return
    with open(directory / f".{name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _tfds_available() -> bool:
    try:
        import tensorflow_datasets  # noqa: F401
    except ImportError:
        return False
    return True


def _make_builder(image_size: int, root: Path, sizes: Mapping[str, int] | None, seed: int):
    from chameleon_jax.data.shapes import tfds_builder as builder_lib

    config = builder_lib.make_config(image_size, sizes, seed)
    # TFDS takes a registered config by name only; others are passed as objects.
    registered = {c.name for c in builder_lib.ChameleonShapes.BUILDER_CONFIGS}
    config_arg = config.name if config.name in registered else config
    # TFDS warns "Using custom data configuration" for every config passed as an object; a split
    # size of one's own is such a config, and the warning says nothing wrong.
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(max(level, logging.ERROR))
    try:
        return builder_lib.ChameleonShapes(config=config_arg, data_dir=str(root), file_format="array_record")
    finally:
        absl_logger.setLevel(level)


def _covering_builder(image_size: int, root: Path, split: str, n: int, seed: int):
    """A prepared build with the same image size and seed whose `split` has at least `n` examples
    (the smallest such), or None. Example i never depends on a split's size, so the first n
    examples of a bigger build are exactly the examples of an n-example build."""
    from chameleon_jax.data.shapes import tfds_builder as builder_lib

    base = root / builder_lib.ChameleonShapes.name
    if not base.is_dir():
        return None
    candidates = []
    for d in base.iterdir():
        parsed = builder_lib.parse_config_name(d.name)
        if parsed and parsed[0] == image_size and parsed[2] == seed and parsed[1][split] >= n:
            candidates.append((parsed[1][split], d.name, parsed[1]))
    for _, _, sizes in sorted(candidates):
        b = _make_builder(image_size, root, sizes, seed)
        if b.is_prepared():
            return b
    return None


def builder(image_size: int = 64, data_dir: str | os.PathLike | None = None, sizes: Mapping[str, int] | None = None,
            seed: int = 0):
    """The TFDS builder for exactly this configuration, built if it is not yet (prints progress)."""
    from chameleon_jax.data.shapes import tfds_builder as builder_lib

    config = builder_lib.make_config(image_size, sizes, seed)
    root = paths.data_dir(data_dir)
    b = _make_builder(image_size, root, sizes, seed)
    if not b.is_prepared():
        with _build_lock(root, f"{builder_lib.ChameleonShapes.name}_{config.name}"):
            b = _make_builder(image_size, root, sizes, seed)
            if not b.is_prepared():
                total = sum(n for _, n in config.split_sizes)
                print(f"building Shapes {config.name} ({total} examples) into {root} ...", file=sys.stderr, flush=True)
                start = time.perf_counter()
                b.download_and_prepare(download_dir=str(root / "downloads"))
                print(f"built Shapes {config.name} in {time.perf_counter() - start:.1f}s", file=sys.stderr, flush=True)
    return b


def load(split: str, image_size: int = 64, data_dir: str | os.PathLike | None = None,
         sizes: Mapping[str, int] | None = None, *, seed: int = 0, backend: str = "auto"):
    """A random-access source of one split: len(), [i] -> example record (records.make_example).

    sizes: examples per split, e.g. {"train": 200} (missing splits keep the defaults:
    train 20000, validation / test / heldout 1000). The data set is built under
    `data_dir` (paths.data_dir) on first use; when a bigger build of the same
    image size and seed is already there, its first examples are read instead
    (they are the same examples). backend: "tfds" reads the built
    array_record files, "generate" computes examples on access (same records,
    no TFDS, nothing on disk), "auto" is "tfds" when tensorflow_datasets imports.
    """
    if split not in spec.SPLITS:
        raise ValueError(f"unknown Shapes split {split!r}; known splits: {', '.join(spec.SPLITS)}")
    if backend not in spec.BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(spec.BACKENDS)}, got {backend!r}")
    if backend == "auto":
        backend = "tfds" if _tfds_available() else "generate"
    if backend == "generate":
        if image_size not in spec.IMAGE_SIZES:
            raise ValueError(f"Shapes is built at {spec.IMAGE_SIZES} pixels, got image_size={image_size}")
        return GeneratedSource(split, image_size, spec.split_sizes(sizes)[split], seed)
    n = spec.split_sizes(sizes)[split]
    root = paths.data_dir(data_dir)
    b = _make_builder(image_size, root, sizes, seed)
    if not b.is_prepared():
        b = _covering_builder(image_size, root, split, n, seed) or builder(image_size, root, sizes, seed)
    return TfdsSource(b.as_data_source(split=split), split, image_size, length=n)


def load_images(split: str, image_size: int = 64, data_dir: str | os.PathLike | None = None,
                sizes: Mapping[str, int] | None = None, *, seed: int = 0, backend: str = "auto",
                limit: int = 0) -> np.ndarray:
    """The pictures of a split, or its first `limit` (0 = all): uint8 [N, S, S, 3] (for training
    the image tokenizer). Only those are read (or, with backend="generate", drawn)."""
    source = load(split, image_size, data_dir, sizes, seed=seed, backend=backend)
    n = min(limit, len(source)) if limit > 0 else len(source)
    out = np.empty((n, image_size, image_size, 3), np.uint8)
    for i, record in enumerate(source.examples(0, n)):
        out[i] = record["image"]
    return out

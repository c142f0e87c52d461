"""The TFDS builder of the Shapes data set (array_record, readable without TensorFlow).

Pictures are stored as `tfds.features.Tensor` (zlib-compressed) rather than
`tfds.features.Image`, whose PNG encoding needs TensorFlow. Examples are
written in index order (shuffling disabled), so example i of a split is
`records.make_example(seed, split, i, image_size)`.

Importing this module imports tensorflow_datasets; everything else in the
package works without it.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Mapping

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from chameleon_jax.data.shapes import records, spec

DEFAULT_SEED = 0


@dataclasses.dataclass(eq=False)
class ShapesConfig(tfds.core.BuilderConfig):
    """image_size: pixels a side; split_sizes: (split, examples) for every split; seed: the data's seed."""

    image_size: int = 64
    split_sizes: tuple[tuple[str, int], ...] = tuple(spec.DEFAULT_SPLIT_SIZES.items())
    seed: int = DEFAULT_SEED


def config_name(image_size: int, split_sizes: Mapping[str, int], seed: int) -> str:
    """"64px" for the default sizes and seed; otherwise e.g. "64px_train20_validation8_test8_heldout8_seed0"."""
    if dict(split_sizes) == spec.DEFAULT_SPLIT_SIZES and seed == DEFAULT_SEED:
        return f"{image_size}px"
    parts = "_".join(f"{s}{split_sizes[s]}" for s in spec.SPLITS)
    return f"{image_size}px_{parts}_seed{seed}"


def parse_config_name(name: str) -> tuple[int, dict[str, int], int] | None:
    """(image_size, split sizes, seed) from a config_name result; None for other names."""
    m = re.fullmatch(r"(\d+)px", name)
    if m:
        return int(m.group(1)), dict(spec.DEFAULT_SPLIT_SIZES), DEFAULT_SEED
    pattern = r"(\d+)px_" + "_".join(rf"{s}(\d+)" for s in spec.SPLITS) + r"_seed(\d+)"
    m = re.fullmatch(pattern, name)
    if not m:
        return None
    values = [int(g) for g in m.groups()]
    return values[0], dict(zip(spec.SPLITS, values[1:-1])), values[-1]


def make_config(image_size: int = 64, sizes: Mapping[str, int] | None = None, seed: int = DEFAULT_SEED) -> ShapesConfig:
    """A config for `image_size` with split sizes `sizes` (missing splits keep their default size)."""
    if image_size not in spec.IMAGE_SIZES:
        raise ValueError(f"Shapes is built at {spec.IMAGE_SIZES} pixels, got image_size={image_size}")
    merged = spec.split_sizes(sizes)
    return ShapesConfig(
        name=config_name(image_size, merged, seed),
        description=f"{image_size}x{image_size} pictures, splits {merged}, seed {seed}",
        image_size=image_size,
        split_sizes=tuple(merged.items()),
        seed=seed,
    )


class ChameleonShapes(tfds.core.GeneratorBasedBuilder):
    """Synthetic pictures of one or two coloured shapes, with captions and questions."""

    name = "chameleon_shapes"
    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {"1.0.0": "First release.", "1.1.0": "Two-object captions name the objects in reading order."}
    BUILDER_CONFIGS = [make_config(s) for s in spec.IMAGE_SIZES]
    DEFAULT_CONFIG_NAME = "64px"

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # TFDS finds this from the top-level package's resources, which fails when
        # `chameleon_jax` is imported as a namespace package (some editable installs).
        return epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        s = self.builder_config.image_size
        ints = tfds.features.Tensor(shape=(None,), dtype=np.int32)
        strings = tfds.features.Sequence(tfds.features.Text())
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "index": np.int64,
                    "image": tfds.features.Tensor(shape=(s, s, 3), dtype=np.uint8, encoding=tfds.features.Encoding.ZLIB),
                    "num_objects": np.int32,
                    "objects": tfds.features.FeaturesDict(
                        {**{k: ints for k in records.OBJECT_INT_FIELDS}, **{k: strings for k in records.OBJECT_NAME_FIELDS}}
                    ),
                    "captions": strings,
                    "questions": strings,
                    "answers": strings,
                    "question_types": strings,
                }
            ),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        return {split: self._generate_examples(split, n) for split, n in self.builder_config.split_sizes}

    def _generate_examples(self, split: str, n: int):
        cfg = self.builder_config
        for i in range(n):
            yield i, records.make_example(cfg.seed, split, i, cfg.image_size)

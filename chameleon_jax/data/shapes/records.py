"""One Shapes example as a plain record: the picture, its objects, captions and questions.

`make_example` is the single definition of an example; the TFDS builder writes
exactly these records and the sources return them (strings as str).
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from chameleon_jax.data.shapes import raster, scenes, spec, text

NUM_CAPTIONS = 4
_SCENE_STREAM, _TEXT_STREAM = 0, 1
OBJECT_INT_FIELDS = ("shape", "color", "size", "row", "col")
OBJECT_NAME_FIELDS = ("shape_name", "color_name", "size_name", "position_name")


def make_example(seed: int, split: str, index: int, image_size: int) -> dict[str, Any]:
    """Example `index` of `split`, a pure function of its arguments.

    Returns {"index": int, "image": uint8 [S, S, 3], "num_objects": int,
    "objects": {shape, color, size, row, col: int32 [n]; shape_name, color_name,
    size_name, position_name: list[str] of n}, "captions": list[str],
    "questions" / "answers" / "question_types": list[str] of equal length}.
    Objects are in canonical (reading) order.
    """
    objects = scenes.sample_scene(scenes.example_rng(seed, split, index, _SCENE_STREAM), split)
    text_rng = scenes.example_rng(seed, split, index, _TEXT_STREAM)
    caps = text.captions(objects, text_rng, NUM_CAPTIONS)
    qa = text.questions(objects, text_rng)
    record_objects: dict[str, Any] = {
        name: np.array([getattr(o, name) for o in objects], np.int32) for name in OBJECT_INT_FIELDS
    }
    for name in OBJECT_NAME_FIELDS:
        record_objects[name] = [getattr(o, name) for o in objects]
    return {
        "index": index,
        "image": raster.render(objects, image_size),
        "num_objects": len(objects),
        "objects": record_objects,
        "captions": caps,
        "questions": [q for q, _, _ in qa],
        "answers": [a for _, a, _ in qa],
        "question_types": [t for _, _, t in qa],
    }


def example_objects(example: Mapping[str, Any]) -> list[spec.ObjectAttrs]:
    """The objects of an example record (from a source or make_example), in canonical order."""
    objs = example["objects"]
    n = len(objs["shape"])
    return spec.canonical(
        spec.ObjectAttrs(*(int(objs[name][i]) for name in OBJECT_INT_FIELDS)) for i in range(n)
    )


def _decode(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, dict):
        return {k: _decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v) for v in value]
    if isinstance(value, np.ndarray) and value.dtype == object:
        return [_decode(v) for v in value.tolist()]
    if isinstance(value, np.integer):
        return int(value)
    return value


def decode_record(raw: Mapping[str, Any]) -> dict[str, Any]:
    """A record as read back from TFDS (strings as bytes) in make_example's form."""
    return _decode(dict(raw))

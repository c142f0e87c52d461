"""Shapes: the embedded synthetic data set, small enough to train and judge on a laptop CPU.

Pictures (24, 32, 64 or 128 px) of one or two objects on a plain background; each
object has a shape, colour, size and 3x3 grid cell. Every picture comes with
its attribute record, captions and question-answer pairs, and a deterministic
judge reads the attributes back from any picture, so generated captions and
generated images can both be scored exactly.

    from chameleon_jax.data import shapes
    train = shapes.load("train")                  # builds on first use
    ex = train[0]                                 # {"image": uint8 [64, 64, 3], "objects": ..., "captions": ...}
    shapes.judge(ex["image"]).objects == shapes.example_objects(ex)

Splits: train, validation, test, and heldout, whose pictures each contain a
(colour, shape) pair from HELDOUT_PAIRS that no other split ever shows.
Importing this package does not import TensorFlow Datasets; only building
and reading the stored data set does.
"""

from chameleon_jax.data.shapes.judging import JudgeResult, judge, judge_matches
from chameleon_jax.data.shapes.records import example_objects, make_example
from chameleon_jax.data.shapes.raster import render
from chameleon_jax.data.shapes.source import builder, load, load_images
from chameleon_jax.data.shapes.spec import (
    COLORS,
    HELDOUT_PAIRS,
    IMAGE_SIZES,
    PALETTE_RGB,
    POSITIONS,
    SHAPES,
    SIZES,
    SPLITS,
    ObjectAttrs,
    canonical,
    layout,
)
from chameleon_jax.data.shapes.tasks import (
    caption_document,
    edit_document,
    interleaved_documents,
    t2i_document,
    t2i_prompt,
    vqa_document,
    vqa_documents,
)
from chameleon_jax.data.shapes.text import QUESTION_TYPES, parse_caption

__all__ = [
    "COLORS", "HELDOUT_PAIRS", "IMAGE_SIZES", "PALETTE_RGB", "POSITIONS", "QUESTION_TYPES", "SHAPES", "SIZES",
    "SPLITS", "JudgeResult", "ObjectAttrs", "builder", "canonical", "caption_document", "edit_document",
    "example_objects", "interleaved_documents", "judge", "judge_matches", "layout", "load", "load_images",
    "make_example", "parse_caption", "render", "t2i_document", "t2i_prompt", "vqa_document", "vqa_documents",
]

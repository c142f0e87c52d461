"""Shapes examples as Documents for each task: caption, text-to-image, VQA, interleaved edits.

Prompt parts are `is_target=False` (no loss); `meta` carries the ground truth
an evaluation needs: "objects" (the canonical list of ObjectAttrs; for
interleaved documents one such list per image), "index" (the example's index
in its split), and per task "caption", "question" / "answer" /
"question_type", or "edits".
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import numpy as np

from chameleon_jax.data.documents import Document, Segment
from chameleon_jax.data.shapes import raster, records, scenes, text

_EDIT_STREAM = 2


def caption_document(example: Mapping[str, Any], rng: np.random.Generator) -> Document:
    """[image (prompt), caption (target)]; the caption is one of the example's, picked with `rng`."""
    caption = example["captions"][int(rng.integers(len(example["captions"])))]
    return Document(
        (Segment(image=example["image"], is_target=False), Segment(text=caption)),
        task="caption",
        meta={"objects": records.example_objects(example), "caption": caption, "index": int(example["index"])},
    )


def _prompt(objects: list, rng: np.random.Generator, leave_out: tuple | None = None) -> str:
    templates = text.ONE_OBJECT_PROMPTS if len(objects) == 1 else text.TWO_OBJECT_PROMPTS
    return text.prompt(objects, int(rng.integers(len(templates))), rng, leave_out)


def t2i_prompt(example: Mapping[str, Any], rng: np.random.Generator) -> str:
    """A text-to-image prompt for the example's scene (`text.prompt`), its template picked with `rng`."""
    return _prompt(records.example_objects(example), rng)


def partial_prompt_attributes(num_objects: int, share: float, rng: np.random.Generator) -> tuple | None:
    """Which attribute each object's prompt leaves unsaid: with chance `share` an object loses its
    colour or its shape (one of the two, evenly), else nothing ("color" / "shape" / None, in
    reading order). None, drawing nothing from `rng`, when `share` is 0.

    A prompt that names a shape without its colour ("a large circle") ties the shape word to the
    object's outline alone, and one that names a colour without its shape ("a large red shape")
    ties the colour word to its ink alone: the model sees the two words do separate jobs, which a
    (colour, shape) pair it has never drawn needs.
    """
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"the partial-prompt share must lie in [0, 1], got {share}")
    if share == 0.0:
        return None
    return tuple(("color", "shape")[int(rng.integers(2))] if rng.random() < share else None
                 for _ in range(num_objects))


def t2i_document(example: Mapping[str, Any], rng: np.random.Generator, partial_share: float = 0.0) -> Document:
    """[prompt (prompt), image (target)], the prompt as `t2i_prompt` writes it; with `partial_share`
    some objects' colour or shape is left unsaid (`partial_prompt_attributes`)."""
    objects = records.example_objects(example)
    prompt = _prompt(objects, rng, partial_prompt_attributes(len(objects), partial_share, rng))
    return Document(
        (Segment(text=prompt, is_target=False), Segment(image=example["image"])),
        task="t2i",
        meta={"objects": objects, "caption": prompt, "index": int(example["index"])},
    )


def _vqa_segments(image: np.ndarray, question: str, answer: str) -> tuple[Segment, ...]:
    """[question (prompt), image (prompt), answer <eot> (target)].

    The question comes first so that the picture is read knowing what is asked: each image code
    can take in whether it lies in the cell the question names, and the answer then reads the
    codes marked so. With the picture first, the answer alone had to find the object the question
    means, and often answered about the first object when asked about the second
    (docs/experiments.md has the figures).
    """
    return (Segment(text=question, is_target=False), Segment(image=image, is_target=False),
            Segment(text=answer, end_turn=True))


def _vqa_document(example: Mapping[str, Any], objects: list, i: int) -> Document:
    """The example's question number i with its answer, laid out by `_vqa_segments`."""
    q, a, t = example["questions"][i], example["answers"][i], example["question_types"][i]
    return Document(
        _vqa_segments(example["image"], q, a), task="vqa",
        meta={"objects": objects, "question": q, "answer": a, "question_type": t, "index": int(example["index"])},
    )


def vqa_documents(example: Mapping[str, Any]) -> list[Document]:
    """One document per question of the example: the evaluation form."""
    objects = records.example_objects(example)
    return [_vqa_document(example, objects, i) for i in range(len(example["questions"]))]


def _questions_by_object(question_types: list[str]) -> list[list[int]]:
    """Question indices grouped by what they are about: the count question alone, then one group per
    object (`text.questions` asks about each object in turn, starting with its colour)."""
    groups: list[list[int]] = []
    for i, t in enumerate(question_types):
        if t in ("count", "color") or not groups:
            groups.append([i])
        else:
            groups[-1].append(i)
    return groups


COUNT_QUESTION_SHARE = 0.1  # counting is learnt in a few hundred steps; the other questions need the rows


def vqa_document(example: Mapping[str, Any], rng: np.random.Generator, position_weight: float = 1.0) -> Document:
    """The training form of VQA: one question of the example, picked with `rng`, laid out as in
    `vqa_documents`. The count question with chance COUNT_QUESTION_SHARE, else a question about an
    object picked uniformly, then one of that object's questions: a position question with
    `position_weight` times the chance of each other question (1 = uniformly)."""
    types = list(example["question_types"])
    count, *objects = _questions_by_object(types)
    if not objects or rng.random() < COUNT_QUESTION_SHARE:
        i = count[0]
    else:
        group = objects[int(rng.integers(len(objects)))]
        if position_weight == 1.0:  # the uniform draw, kept as is so that the default stream does not change
            i = group[int(rng.integers(len(group)))]
        else:
            w = np.array([position_weight if types[j] == "position" else 1.0 for j in group])
            i = group[int(rng.choice(len(group), p=w / w.sum()))]
    return _vqa_document(example, records.example_objects(example), i)


def edit_document(example: Mapping[str, Any], split: str, seed: int = 0) -> Document:
    """[image, edit sentence, image(, edit sentence, image)]: one or two single-attribute edits of the
    example's scene, each told in words ("the red circle becomes blue.") and then shown.

    Every segment is a target. Deterministic in (seed, split, example index); edits
    never introduce a (colour, shape) pair that `split` must not show.
    """
    index = int(example["index"])
    rng = scenes.example_rng(seed, split, index, _EDIT_STREAM)
    image_size = example["image"].shape[0]
    scene = records.example_objects(example)
    states, edits = [scene], []
    segments = [Segment(image=example["image"])]
    for _ in range(1 + int(rng.integers(2))):
        before = scene
        scene, edit = scenes.sample_edit(rng, before, split)
        while edits and edit.attribute == edits[-1]["attribute"] and edit.after == edits[-1]["before"]:
            scene, edit = scenes.sample_edit(rng, before, split)  # an edit that only undoes the last one says nothing
        segments.append(Segment(text=text.edit_sentence(edit, before, rng)))
        segments.append(Segment(image=raster.render(scene, image_size)))
        states.append(scene)
        edits.append({"attribute": edit.attribute, "before": edit.before, "after": edit.after})
    return Document(tuple(segments), task="interleaved", meta={"objects": states, "edits": edits, "index": index})


def interleaved_documents(split: str, image_size: int = 64, data_dir: str | os.PathLike | None = None,
                          n: int | None = None, *, sizes: Mapping[str, int] | None = None, seed: int = 0,
                          backend: str = "auto") -> list[Document]:
    """Edit documents (see edit_document) for the first `n` examples of a split (all when n is None)."""
    from chameleon_jax.data.shapes.source import load

    source = load(split, image_size, data_dir, sizes, seed=seed, backend=backend)
    count = len(source) if n is None else min(int(n), len(source))
    return [edit_document(example, split, seed) for example in source.examples(0, count)]

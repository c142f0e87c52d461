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


def t2i_document(example: Mapping[str, Any], rng: np.random.Generator) -> Document:
    """[caption (prompt), image (target)]."""
    caption = example["captions"][int(rng.integers(len(example["captions"])))]
    return Document(
        (Segment(text=caption, is_target=False), Segment(image=example["image"])),
        task="t2i",
        meta={"objects": records.example_objects(example), "caption": caption, "index": int(example["index"])},
    )


def _vqa_turn(question: str, answer: str) -> tuple[Segment, Segment]:
    """A question (prompt) and its answer (target), which ends the turn with `<eot>`."""
    return Segment(text=question, is_target=False), Segment(text=answer, end_turn=True)


def vqa_documents(example: Mapping[str, Any]) -> list[Document]:
    """One document per question: [image (prompt), question (prompt), answer <eot> (target)].

    The evaluation form; the answer ends its turn as in the training dialogues
    (`vqa_dialogue_document`), so a teacher-forced score sees the same layout.
    """
    objects = records.example_objects(example)
    docs = []
    for q, a, t in zip(example["questions"], example["answers"], example["question_types"]):
        docs.append(
            Document(
                (Segment(image=example["image"], is_target=False), *_vqa_turn(q, a)),
                task="vqa",
                meta={"objects": objects, "question": q, "answer": a, "question_type": t,
                      "index": int(example["index"])},
            )
        )
    return docs


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


def vqa_dialogue_document(example: Mapping[str, Any], rng: np.random.Generator, max_questions: int = 0) -> Document:
    """[image (prompt), q1 (prompt), a1 <eot> (target), q2 (prompt), a2 <eot> (target), ...]: the
    count question and one question about each object, in an order picked with `rng`
    (`max_questions` > 0 keeps that many of them, picked with `rng`, in the same order).

    The training form of VQA: one picture's codes serve every answer after it, so a row
    carries several answers per picture instead of one. No attribute can be read off an
    earlier turn, since each object is asked about once. (With every question of a picture
    in one dialogue, "where is the magenta diamond?" came after "which colour is the object
    in the center?"; the model learnt to copy the position from the question and answered
    position questions asked alone at chance.) Any question may come first, right after the
    picture, as in the one-question evaluation prompt; every answer ends its turn with
    `<eot>`, where generation stops.
    """
    qas = list(zip(example["questions"], example["answers"], example["question_types"]))
    groups = _questions_by_object([t for _, _, t in qas])
    order = [int(g[int(rng.integers(len(g)))]) for g in (groups[int(k)] for k in rng.permutation(len(groups)))]
    if 0 < max_questions < len(order):
        order = [order[int(k)] for k in sorted(rng.choice(len(order), max_questions, replace=False))]
    segments = [Segment(image=example["image"], is_target=False)]
    for i in order:
        q, a, _ = qas[i]
        segments += _vqa_turn(q, a)
    return Document(
        tuple(segments), task="vqa",
        meta={"objects": records.example_objects(example), "questions": [qas[i] for i in order],
              "index": int(example["index"])},
    )


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
    return [edit_document(source[i], split, seed) for i in range(count)]

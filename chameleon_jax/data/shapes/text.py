"""Words about pictures: captions, question-answer pairs, edit sentences, and the caption parser.

Every caption names each object by size, colour and shape and gives its grid
cell, so a caption determines the picture exactly and `parse_caption` can
read it back (that is how generated captions are scored).
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np

from chameleon_jax.data.shapes import spec
from chameleon_jax.data.shapes.scenes import Edit

QUESTION_TYPES = ("count", "color", "shape", "size", "position")
NUMBER_WORDS = ("zero", "one", "two", "three", "four")


def at_position(obj: spec.ObjectAttrs, rng: np.random.Generator | None = None) -> str:
    """"in the top left", "at the top", "on the left", "in the center" (the preposition varies with rng)."""
    name = obj.position_name
    if rng is not None and rng.random() < 0.3:
        return f"at the {name}"
    if name in ("left", "right"):
        return f"on the {name}"
    if name in ("top", "bottom"):
        return f"at the {name}"
    return f"in the {name}"


def _article(words: str) -> str:
    return "an" if words[0] in "aeiou" else "a"


# Caption templates. {o} is "large red circle", {p} a position phrase ("in the top left"),
# {P} a capitalisable position phrase used in front. Each list is for one object count.
ONE_OBJECT_TEMPLATES = (
    "{a} {o} {p}.",
    "there is {a} {o} {p}.",
    "a picture of {a} {o} {p}.",
    "{p}, there is {a} {o}.",
    "one shape: {a} {o} {p}.",
    "{a} {o} sits {p}.",
)
TWO_OBJECT_TEMPLATES = (
    "{a1} {o1} {p1} and {a2} {o2} {p2}.",
    "there is {a1} {o1} {p1} and {a2} {o2} {p2}.",
    "two shapes: {a1} {o1} {p1}, and {a2} {o2} {p2}.",
    "{p1}, {a1} {o1}; {p2}, {a2} {o2}.",
    "a picture of {a1} {o1} {p1} and {a2} {o2} {p2}.",
    "{a1} {o1} sits {p1}, and {a2} {o2} sits {p2}.",
)


# Text-to-image prompts. They name each object's cell before the object, so a code generated
# for a cell finds what belongs there by the cell alone: the prompt's words after the cell
# phrase. Captions keep the object first (the captioner writes the object it sees, then where).
ONE_OBJECT_PROMPTS = (
    "{p}, {a} {o}.",
    "{p}, there is {a} {o}.",
    "{p} is {a} {o}.",
    "one shape: {p}, {a} {o}.",
    "a picture with, {p}, {a} {o}.",
    "{p} sits {a} {o}.",
)
TWO_OBJECT_PROMPTS = (
    "{p1}, {a1} {o1}; {p2}, {a2} {o2}.",
    "{p1}, there is {a1} {o1}, and {p2}, {a2} {o2}.",
    "{p1} is {a1} {o1} and {p2} is {a2} {o2}.",
    "two shapes: {p1}, {a1} {o1}, and {p2}, {a2} {o2}.",
    "a picture with, {p1}, {a1} {o1} and, {p2}, {a2} {o2}.",
    "{p1} sits {a1} {o1}, and {p2} sits {a2} {o2}.",
)


def _describe(objects: Sequence[spec.ObjectAttrs], one: Sequence[str], two: Sequence[str], template: int,
              rng: np.random.Generator, leave_out: Sequence[str | None] | None = None) -> str:
    """`objects` written with template number `template` of `one` (one object) or `two` (two, in
    reading order). `leave_out[i]` ("color", "shape" or None) is the attribute left unsaid of the
    i-th object in reading order."""
    leave_out = tuple(leave_out) if leave_out is not None else (None,) * len(objects)
    if len(leave_out) != len(objects):
        raise ValueError(f"leave_out names {len(leave_out)} objects, the scene has {len(objects)}")
    if len(objects) == 1:
        (o,) = objects
        d = o.describe(leave_out[0])
        return one[template].format(a=_article(d), o=d, p=at_position(o, rng))
    if len(objects) == 2:
        first, second = spec.canonical(objects)
        d1, d2 = first.describe(leave_out[0]), second.describe(leave_out[1])
        return two[template].format(
            a1=_article(d1), o1=d1, p1=at_position(first, rng), a2=_article(d2), o2=d2, p2=at_position(second, rng)
        )
    raise ValueError(f"captions and prompts are written for 1 or 2 objects, got {len(objects)}")


def caption(objects: Sequence[spec.ObjectAttrs], template: int, rng: np.random.Generator) -> str:
    """The caption of a scene with caption template number `template`, naming the objects in
    reading order (row, then column), the order an image's codes are generated in.

    With the two objects in random order, a captioner had to pick one and keep to it across its
    size, colour and shape words; in reading order the first one named is always the one met first
    (docs/experiments.md has the figures).
    """
    return _describe(objects, ONE_OBJECT_TEMPLATES, TWO_OBJECT_TEMPLATES, template, rng)


def prompt(objects: Sequence[spec.ObjectAttrs], template: int, rng: np.random.Generator,
           leave_out: Sequence[str | None] | None = None) -> str:
    """A text-to-image prompt for a scene: prompt template number `template`, each object's cell
    named before it, the objects in reading order. `parse_caption` reads it back, unless
    `leave_out` (per object in reading order: "color", "shape" or None) leaves an attribute unsaid,
    as in "at the top, a large circle" (a partial prompt: any colour fits).

    With the cell first, each code generated for a cell finds what belongs there by the cell's
    words alone; captions keep the object first, which captioning needs. Pictures drawn from these
    prompts beat pictures drawn from captions, and captions written cell first hurt captioning
    (docs/experiments.md).
    """
    return _describe(objects, ONE_OBJECT_PROMPTS, TWO_OBJECT_PROMPTS, template, rng, leave_out)


def captions(objects: Sequence[spec.ObjectAttrs], rng: np.random.Generator, n: int = 4) -> list[str]:
    """`n` captions of one scene, each from a different template."""
    templates = ONE_OBJECT_TEMPLATES if len(objects) == 1 else TWO_OBJECT_TEMPLATES
    chosen = rng.choice(len(templates), size=min(n, len(templates)), replace=False)
    return [caption(objects, int(t), rng) for t in chosen]


def _unique_description(obj: spec.ObjectAttrs, objects: Sequence[spec.ObjectAttrs]) -> str | None:
    """The shortest of "red circle" / "large red circle" that names only `obj`; None if neither does."""
    others = [o for o in objects if o is not obj]
    if not any(o.pair == obj.pair for o in others):
        return f"{obj.color_name} {obj.shape_name}"
    if not any(o.pair == obj.pair and o.size == obj.size for o in others):
        return obj.describe()
    return None


def questions(objects: Sequence[spec.ObjectAttrs], rng: np.random.Generator) -> list[tuple[str, str, str]]:
    """(question, answer, question_type) triples: one count question, then colour / shape / size /
    position questions about each object (objects are referred to by cell, or for position
    questions by a description that is unique in the picture)."""
    count_q = ("how many shapes are there?", "how many objects are in the picture?")
    out = [(count_q[int(rng.integers(2))], NUMBER_WORDS[len(objects)], "count")]
    for obj in objects:
        p = at_position(obj, rng)
        out.append(
            (("what color is the shape {p}?", "which color is the object {p}?")[int(rng.integers(2))].format(p=p),
             obj.color_name, "color")
        )
        out.append(
            (("what shape is {p}?", "which shape is {p}?")[int(rng.integers(2))].format(p=p), obj.shape_name, "shape")
        )
        out.append(
            (("is the shape {p} small or large?", "what size is the shape {p}?")[int(rng.integers(2))].format(p=p),
             obj.size_name, "size")
        )
        desc = _unique_description(obj, objects)
        if desc is not None:
            out.append((f"where is the {desc}?", obj.position_name, "position"))
    return out


def edit_sentence(edit: Edit, scene: Sequence[spec.ObjectAttrs], rng: np.random.Generator) -> str:
    """"the red circle becomes blue." and the like, naming the object as it was in `scene` (the
    scene before the edit) by the shortest description that is unique there."""
    b, a = edit.before, edit.after
    desc = _unique_description(scene[edit.target], scene)
    who = f"the {desc}" if desc is not None else f"the {b.describe()} {at_position(b)}"
    if edit.attribute == "color":
        forms = (f"{who} becomes {a.color_name}.", f"{who} turns {a.color_name}.")
    elif edit.attribute == "shape":
        forms = (f"{who} becomes {_article(a.shape_name)} {a.shape_name}.", f"{who} turns into {_article(a.shape_name)} {a.shape_name}.")
    elif edit.attribute == "size":
        verb = "grows" if a.size > b.size else "shrinks"
        forms = (f"{who} {verb}.", f"{who} becomes {a.size_name}.")
    elif edit.attribute == "position":
        forms = (f"{who} moves to the {a.position_name}.", f"{who} moves over to the {a.position_name}.")
    else:
        raise ValueError(f"unknown edit attribute {edit.attribute!r}")
    return forms[int(rng.integers(len(forms)))]


# --- parsing -----------------------------------------------------------------------------------

_WORD = re.compile(r"[a-z]+")
_POSITION_WORDS = {"top", "bottom", "left", "right", "center", "centre", "middle"}


def _read_position(words: list[str], i: int) -> tuple[tuple[int, int] | None, int]:
    """Reads a position phrase starting at words[i]; returns ((row, col) or None, next index)."""
    w = words[i]
    nxt = words[i + 1] if i + 1 < len(words) else ""
    if w in ("top", "bottom"):
        row = 0 if w == "top" else 2
        if nxt in ("left", "right"):
            return (row, 0 if nxt == "left" else 2), i + 2
        if nxt in ("center", "centre", "middle"):  # "top center"
            return (row, 1), i + 2
        return (row, 1), i + 1
    if w in ("left", "right"):
        return (1, 0 if w == "left" else 2), i + 1
    if w in ("center", "centre", "middle"):
        if nxt in ("left", "right"):  # "middle left"
            return (1, 0 if nxt == "left" else 2), i + 2
        return (1, 1), i + 1
    return None, i + 1


def parse_caption(text: str) -> list[spec.ObjectAttrs] | None:
    """Reads the objects back from a caption, in canonical order; None if the caption is unreadable.

    An object mention is a shape word preceded (since the previous mention) by a
    size word and a colour word; positions are phrases like "top left", "left",
    "center". The i-th object is paired with the i-th position, which fits every
    template (object then position, or position then object). Unreadable: no
    object, a shape without both a size and a colour, or a different number of
    objects and positions.
    """
    if not isinstance(text, str):
        return None
    words = _WORD.findall(text.lower())
    objects: list[tuple[int, int, int]] = []
    cells: list[tuple[int, int]] = []
    size = color = None
    i = 0
    while i < len(words):
        w = words[i]
        if w in spec.SIZES:
            size = spec.SIZES.index(w)
        elif w in spec.COLORS:
            color = spec.COLORS.index(w)
        elif w in spec.SHAPES:
            if size is None or color is None:
                return None
            objects.append((spec.SHAPES.index(w), color, size))
            size = color = None
        elif w in _POSITION_WORDS:
            cell, i = _read_position(words, i)
            cells.append(cell)
            continue
        i += 1
    if not objects or len(objects) != len(cells) or size is not None or color is not None:
        return None
    return spec.canonical(spec.ObjectAttrs(s, c, z, r, k) for (s, c, z), (r, k) in zip(objects, cells))

"""The document type every consumer reads: an ordered list of text and image segments.

A document is what one training row or one prompt is made of, before
tokenisation: `Segment`s of text or of an RGB picture, each marked as a target
(the language model is trained to produce it) or as a prompt part (no loss).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np

# What a document is for; evaluation and the LM's data mixture select on it.
TASKS = ("caption", "t2i", "vqa", "interleaved", "document")


class DataError(ValueError):
    """A data file or record is malformed; the message says which file, line and field."""


@dataclasses.dataclass(frozen=True, eq=False)
class Segment:
    """Exactly one of `text` (a non-empty str) and `image` (uint8 [H, W, 3]) is set.

    is_target: False for prompt parts, on which the LM gets no loss.
    end_turn: text only: an `<eot>` follows the text (the end of one turn of a dialogue,
    where generation stops), weighted like the text.
    """

    text: str | None = None
    image: np.ndarray | None = None
    is_target: bool = True
    end_turn: bool = False

    def __post_init__(self):
        if (self.text is None) == (self.image is None):
            which = "both" if self.text is not None else "neither"
            raise ValueError(f"a Segment needs exactly one of text and image, got {which}")
        if not isinstance(self.is_target, bool):
            raise ValueError(f"Segment.is_target must be a bool, got {self.is_target!r}")
        if not isinstance(self.end_turn, bool) or (self.end_turn and self.text is None):
            raise ValueError(f"Segment.end_turn must be a bool and only set on text, got {self.end_turn!r}")
        if self.text is not None:
            if not isinstance(self.text, str):
                raise ValueError(f"Segment.text must be a str, got {type(self.text).__name__}")
            if not self.text:
                raise ValueError("Segment.text is empty")
            return
        image = self.image
        if not isinstance(image, np.ndarray):
            raise ValueError(f"Segment.image must be a numpy array, got {type(image).__name__}")
        if image.dtype != np.uint8:
            raise ValueError(f"Segment.image must have dtype uint8, got {image.dtype}")
        if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] == 0 or image.shape[1] == 0:
            raise ValueError(f"Segment.image must have shape [H, W, 3], got {list(image.shape)}")

    @property
    def kind(self) -> str:
        """"text" or "image"."""
        return "text" if self.text is not None else "image"

    def __eq__(self, other):
        if not isinstance(other, Segment):
            return NotImplemented
        if self.is_target != other.is_target or self.text != other.text:
            return False
        if self.image is None or other.image is None:
            return self.image is other.image
        return self.image.shape == other.image.shape and bool(np.array_equal(self.image, other.image))

    __hash__ = None  # holds an array

    def __repr__(self):
        body = f"text={self.text!r}" if self.text is not None else f"image=uint8{list(self.image.shape)}"
        return f"Segment({body}, is_target={self.is_target})"


@dataclasses.dataclass(frozen=True)
class Document:
    """A non-empty sequence of segments.

    task: one of TASKS. meta: free-form facts about the document (ground-truth
    objects, question type, ...) for evaluation; never shown to the model.
    """

    segments: tuple[Segment, ...]
    task: str = "document"
    meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        segments = self.segments
        if isinstance(segments, (list, tuple)):
            object.__setattr__(self, "segments", tuple(segments))
        else:
            raise ValueError(f"Document.segments must be a tuple of Segment, got {type(segments).__name__}")
        if not self.segments:
            raise ValueError("a Document needs at least one segment, got none")
        for i, s in enumerate(self.segments):
            if not isinstance(s, Segment):
                raise ValueError(f"Document.segments[{i}] is a {type(s).__name__}, not a Segment")
        if self.task not in TASKS:
            raise ValueError(f"unknown Document.task {self.task!r}; known tasks: {', '.join(TASKS)}")
        if not isinstance(self.meta, Mapping):
            raise ValueError(f"Document.meta must be a mapping, got {type(self.meta).__name__}")

    __hash__ = None  # holds arrays and a dict

    @property
    def images(self) -> list[np.ndarray]:
        return [s.image for s in self.segments if s.image is not None]

    @property
    def num_images(self) -> int:
        return sum(s.image is not None for s in self.segments)

    def text(self, targets_only: bool = False) -> str:
        """The text segments joined by spaces (only the target ones if `targets_only`)."""
        return " ".join(s.text for s in self.segments if s.text is not None and (s.is_target or not targets_only))

"""The Shapes task mixture as a document source: captioning, text-to-image, VQA and interleaved edits.

    mix = ShapesMixture("train", image_size=32, weights={"caption": 1, "t2i": 1, "vqa": 1, "interleaved": 0.5})
    doc = mix.document(7)        # a pure function of (seed, split, 7)

Document i of a split is drawn from the task weights and the split's examples with
a generator seeded by (seed, split, i), so the stream is infinite and reproducible.
"""

from __future__ import annotations

import dataclasses
import hashlib
import threading
from typing import Mapping

import numpy as np

from chameleon_jax.data.documents import Document

TASKS = ("caption", "t2i", "vqa", "interleaved")


def one_object_keep(share: float) -> float:
    """The chance of keeping a drawn one-object picture that makes two-object pictures `share` of those kept."""
    from chameleon_jax.data.shapes.scenes import P_TWO_OBJECTS as p

    if share == 0.0:
        return 1.0
    if not p <= share <= 1.0:
        raise ValueError(
            f"data.two_object_share={share} must be 0 (off) or between the split's own share {p} and 1"
        )
    return p * (1.0 - share) / (share * (1.0 - p))


class ShapesMixture:
    """An infinite, seeded stream of Shapes documents of one split (a weighted mixture of tasks).

    weights: task -> mixture weight (tasks of weight 0 never appear). examples: the split's size
    (0 = the data set's default). interleaved_docs: edit documents to draw from (0 = one per
    example). two_object_share: see `one_object_keep` (t2i and VQA only; 0 = the split's own mix).
    partial_prompt_share: chance that a t2i prompt leaves an object's colour or shape unsaid
    (`tasks.partial_prompt_attributes`; 0 = every prompt names everything). position_question_weight:
    how much likelier a VQA document asks where an object is than each other question about it
    (`tasks.vqa_document`; 1 = all alike).
    """

    def __init__(self, split: str, image_size: int, weights: Mapping[str, float], seed: int = 0,
                 examples: int = 0, backend: str = "auto", interleaved_docs: int = 2000,
                 two_object_share: float = 0.0, partial_prompt_share: float = 0.0,
                 position_question_weight: float = 1.0):
        from chameleon_jax.data import shapes

        self.shapes = shapes
        self.split = split
        self.seed = seed
        self.image_size = image_size
        unknown = sorted(set(weights) - set(TASKS))
        if unknown:
            raise ValueError(f"unknown Shapes task(s) {unknown}; known: {list(TASKS)}")
        self.tasks = [t for t in TASKS if weights.get(t, 0) > 0]
        if not self.tasks:
            raise ValueError("every Shapes task weight is 0; give at least one a positive weight")
        w = np.array([weights[t] for t in self.tasks], np.float64)
        self.probs = w / w.sum()
        self._kw = dict(sizes={split: examples} if examples else None, backend=backend)
        self.name = f"shapes-{split}-{image_size}-{examples or 'default'}"
        self.examples = shapes.load(split, image_size, **self._kw)
        # Examples read once are kept: the stream revisits every picture many times, and reading a
        # record (TFDS deserialisation, or drawing it where TFDS is absent) was most of a batch's cost.
        # A miss reads the source's whole block around it (`_fetch`).
        self._read: dict[int, dict] = {}
        self._read_lock = threading.Lock()
        self.interleaved = []
        if "interleaved" in self.tasks:  # shapes.interleaved_documents, from the examples kept here
            n = min(interleaved_docs or len(self.examples), len(self.examples))
            self.interleaved = [shapes.edit_document(self._fetch(i), split) for i in range(n)]
        self._split_code = int.from_bytes(hashlib.sha1(split.encode()).digest()[:4], "little")
        self._keep_one_object = one_object_keep(two_object_share)
        self._partial_share = float(partial_prompt_share)
        if not 0.0 <= self._partial_share <= 1.0:
            raise ValueError(f"data.partial_prompt_share={partial_prompt_share} must lie in [0, 1]")
        self._position_weight = float(position_question_weight)
        if not self._position_weight > 0.0:
            raise ValueError(f"data.position_question_weight={position_question_weight} must be positive")

    def document(self, index: int) -> Document:
        """Document `index` of the stream. Its meta["picture_keys"] name its pictures within the split
        (an example's picture recurs in many documents), so a tokeniser can encode each picture once."""
        rng = np.random.default_rng([self.seed, self._split_code, index])
        task = self.tasks[int(rng.choice(len(self.tasks), p=self.probs))]
        if task == "interleaved":
            j = int(rng.integers(len(self.interleaved)))
            doc = self.interleaved[j]
            keys = tuple(f"{self.name}/interleaved{j}/{k}" for k in range(len(doc.images)))
        else:
            example = self._example(rng, skew=task != "caption")
            if task == "t2i":
                doc = self.shapes.t2i_document(example, rng, self._partial_share)
            elif task == "vqa":
                doc = self.shapes.vqa_document(example, rng, self._position_weight)
            else:
                doc = self.shapes.caption_document(example, rng)
            keys = (f"{self.name}/{int(example['index'])}",)
        return dataclasses.replace(doc, meta={**doc.meta, "picture_keys": keys})

    def _example(self, rng: np.random.Generator, skew: bool) -> dict:
        """A uniformly drawn example; with `skew`, one-object pictures are skipped with chance 1 - keep."""
        keep = self._keep_one_object if skew else 1.0
        while True:
            i = int(rng.integers(len(self.examples)))
            example = self._read.get(i)
            if example is None:
                example = self._fetch(i)
            # keep >= 1 draws nothing more from rng, so the stream is the same as without the share.
            if keep >= 1.0 or example["num_objects"] > 1 or rng.random() < keep:
                return example

    def _fetch(self, i: int) -> dict:
        """Example i, read with the rest of its block (`read_block` examples) in one batched read; all are kept."""
        with self._read_lock:  # documents are drawn in several threads: each block is read once
            example = self._read.get(i)
            if example is None:
                lo = i - i % self.examples.read_block
                self._read.update(enumerate(self.examples.examples(lo, lo + self.examples.read_block), lo))
                example = self._read[i]
        return example

    def images(self) -> list[np.ndarray]:
        """Every image the stream can show (the split's pictures and the interleaved ones)."""
        out = list(self.shapes.load_images(self.split, self.image_size, **self._kw))
        for doc in self.interleaved:
            out.extend(doc.images)
        return out

    def texts(self, num_docs: int) -> list[str]:
        out = [s.text for i in range(num_docs) for s in self.document(i).segments if s.text]
        for doc in self.interleaved:
            out.extend(s.text for s in doc.segments if s.text)
        return out

    def forget_examples(self) -> None:
        """Drops the examples kept in memory (a long tokenisation pass reads each a few times at most)."""
        self._read.clear()


class ShapesDocuments:
    """The first `num_docs` documents of a mixture, as a `train.tokenize` source (chameleon_jax.data.sources)."""

    def __init__(self, mixture: ShapesMixture, num_docs: int):
        if num_docs <= 0:
            raise ValueError(f"the Shapes stream is endless: give a number of documents > 0, got {num_docs}")
        self.mixture = mixture
        self.num_docs = int(num_docs)
        self.name = f"{mixture.name}-seed{mixture.seed}"

    def __len__(self) -> int:
        return self.num_docs

    def __iter__(self):
        from chameleon_jax.data.sources import Item

        for i in range(self.num_docs):
            yield Item(f"{self.mixture.name}[{i}]", lambda i=i: self.mixture.document(i))

    def texts(self, num_docs: int) -> list[str]:
        return self.mixture.texts(min(num_docs, self.num_docs))

"""Document sources that `train.tokenize` reads: JSON Lines, a folder of captioned pictures, a TFDS data set.

A source is an iterable of `Item`s in a fixed order. An item is cheap (a line, a
file name, an index); `item.load()` does the expensive part (decoding pictures)
and returns a Document or raises DataError naming the file and the reason, so a
tokeniser can skip items it has already written without decoding them, and list
the ones that fail. `texts(n)` gives the text of the first n documents (to train
a vocabulary) without decoding pictures where the format allows.

Folder layout: `name.jpg` (or .jpeg, .png, .webp, .bmp, .gif) beside `name.txt`
holding its caption, in any number of sub-folders. Each pair becomes a captioning
document [picture (prompt), caption] (`pairs_as=caption`), a text-to-image one
[caption (prompt), picture] (`t2i`), or both (`both`, two documents a pair).

TFDS: any data set with a picture feature and a text feature, named by
`image_key` and `text_key` ("/"-separated for nested features, e.g.
"captions/text"; a list of texts gives its first). Read with
`builder.as_data_source`, so no TensorFlow is needed for array_record builds.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from chameleon_jax.data.documents import DataError, Document, Segment

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
PAIRS_AS = ("caption", "t2i", "both")


@dataclasses.dataclass(frozen=True)
class Item:
    """One document to be: `where` names it in reports (a file, "file:line", "name[split][i]")."""

    where: str
    load: Callable[[], Document]


def pair_documents(image: np.ndarray, caption: str, pairs_as: str, meta: dict) -> list[Document]:
    """A (picture, caption) pair as captioning and/or text-to-image documents.

    meta["picture_keys"] names the picture, so with pairs_as=both a tokeniser encodes it once."""
    out = []
    if pairs_as in ("caption", "both"):
        out.append(Document((Segment(image=image, is_target=False), Segment(text=caption)), "caption", meta))
    if pairs_as in ("t2i", "both"):
        out.append(Document((Segment(text=caption, is_target=False), Segment(image=image)), "t2i", meta))
    return out


class JsonlDocuments:
    """The documents of a JSON Lines file (chameleon_jax.data.jsonl), read a line at a time."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"JSON Lines file not found: {self.path}")
        self.name = f"jsonl:{self.path.resolve()}"

    def _lines(self) -> Iterator[tuple[int, str]]:
        with open(self.path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if line.strip():
                    yield lineno, line

    def __iter__(self) -> Iterator[Item]:
        from chameleon_jax.data.jsonl import parse_line

        base = self.path.resolve().parent
        for lineno, line in self._lines():
            where = f"{self.path}:{lineno}"
            yield Item(where, lambda line=line, where=where: parse_line(line, where, base))

    def texts(self, num_docs: int) -> list[str]:
        out = []
        for k, (_, line) in enumerate(self._lines()):
            if k >= num_docs:
                break
            try:
                segments = json.loads(line).get("segments", [])
            except (json.JSONDecodeError, AttributeError):
                continue  # reported when the document itself is read
            out += [s["text"] for s in segments if isinstance(s, dict) and isinstance(s.get("text"), str)]
        return out


class FolderPairs:
    """Pictures with a caption file of the same name beside them (see the module docstring)."""

    def __init__(self, folder: str | os.PathLike, pairs_as: str = "caption"):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise FileNotFoundError(f"picture folder not found: {self.folder}")
        if pairs_as not in PAIRS_AS:
            raise ValueError(f"pairs_as must be one of {PAIRS_AS}, got {pairs_as!r}")
        self.pairs_as = pairs_as
        self.name = f"folder:{self.folder.resolve()}"

    def pictures(self) -> list[Path]:
        return sorted(p for p in self.folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())

    def _caption(self, picture: Path) -> str:
        txt = picture.with_suffix(".txt")
        if not txt.is_file():
            raise DataError(f"{picture}: no caption file {txt.name} beside it")
        caption = txt.read_text(encoding="utf-8").strip()
        if not caption:
            raise DataError(f"{txt}: the caption is empty")
        return caption

    def __iter__(self) -> Iterator[Item]:
        for picture in self.pictures():
            for k in range(2 if self.pairs_as == "both" else 1):
                yield Item(str(picture), lambda p=picture, k=k: self._load(p)[k])

    def _load(self, picture: Path) -> list[Document]:
        from chameleon_jax.data.jsonl import read_image

        caption = self._caption(picture)
        image = read_image(picture)
        return pair_documents(image, caption, self.pairs_as, {"path": str(picture), "picture_keys": (str(picture),)})

    def texts(self, num_docs: int) -> list[str]:
        out = []
        for p in self.pictures()[:num_docs]:
            try:
                out.append(self._caption(p))
            except DataError:
                continue  # reported when the document itself is read
        return out


def _feature(example: Any, key: str, where: str) -> Any:
    value = example
    for part in key.split("/"):
        if not isinstance(value, dict) or part not in value:
            have = sorted(value) if isinstance(value, dict) else type(value).__name__
            raise DataError(f"{where}: no feature {key!r} (at {part!r}; the example has {have})")
        value = value[part]
    return value


def _text(value: Any, where: str, key: str) -> str:
    if isinstance(value, (list, tuple, np.ndarray)) and not isinstance(value, (str, bytes)):
        if len(value) == 0:
            raise DataError(f"{where}: text feature {key!r} is an empty list")
        value = value[0]
    if isinstance(value, (bytes, np.bytes_)):
        value = bytes(value).decode("utf-8")
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: text feature {key!r} is not a non-empty string ({value!r})")
    return value.strip()


def _picture(value: Any, where: str, key: str) -> np.ndarray:
    image = np.asarray(value)
    if image.ndim == 3 and image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    elif image.ndim == 3 and image.shape[2] == 4:
        image = image[..., :3]
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or 0 in image.shape:
        raise DataError(f"{where}: image feature {key!r} is {image.dtype} {list(image.shape)}, not uint8 [H, W, 3]")
    return image


class TfdsPairs:
    """(picture, text) pairs of a TFDS data set split, as `pair_documents` makes them."""

    def __init__(self, name: str, split: str = "train", image_key: str = "image", text_key: str = "caption",
                 data_dir: str = "", pairs_as: str = "caption"):
        import tensorflow_datasets as tfds

        if pairs_as not in PAIRS_AS:
            raise ValueError(f"pairs_as must be one of {PAIRS_AS}, got {pairs_as!r}")
        self.builder = tfds.builder(name, data_dir=data_dir or None)
        if not self.builder.is_prepared():
            self.builder.download_and_prepare()
        self.source = self.builder.as_data_source(split=split)
        self.split, self.image_key, self.text_key, self.pairs_as = split, image_key, text_key, pairs_as
        self.name = f"tfds:{name}[{split}]"
        if len(self.source):  # a wrong feature mapping is an error at once, not a report of every example
            first = self.source[0]
            for key, what in ((image_key, "picture"), (text_key, "text")):
                _feature(first, key, f"{self.name}: the {what} feature")

    def __len__(self) -> int:
        return len(self.source) * (2 if self.pairs_as == "both" else 1)

    def __iter__(self) -> Iterator[Item]:
        for i in range(len(self.source)):
            for k in range(2 if self.pairs_as == "both" else 1):
                yield Item(f"{self.name}[{i}]", lambda i=i, k=k: self._load(i)[k])

    def _load(self, i: int) -> list[Document]:
        where = f"{self.name}[{i}]"
        try:
            example = self.source[i]
        except Exception as e:  # a record the builder cannot decode
            raise DataError(f"{where}: cannot read the example: {e}") from None
        image = _picture(_feature(example, self.image_key, where), where, self.image_key)
        text = _text(_feature(example, self.text_key, where), where, self.text_key)
        return pair_documents(image, text, self.pairs_as, {"source": self.name, "index": i, "picture_keys": (where,)})

    def texts(self, num_docs: int) -> list[str]:
        out = []
        for i in range(min(num_docs, len(self.source))):
            try:
                out.append(_text(_feature(self.source[i], self.text_key, ""), "", self.text_key))
            except DataError:
                continue
        return out

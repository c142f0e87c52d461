"""The JSON Lines user format: one document a line.

    {"segments": [{"text": "a cat"}, {"image": "images/cat.png", "target": false}], "task": "caption"}

Keys of a document: "segments" (required, non-empty list), "task" (optional, one
of documents.TASKS, default "document") and "meta" (optional object). Keys of a
segment: exactly one of "text" (string) and "image" (a path relative to the
JSONL file's folder, or absolute), and optionally "target" (bool, default true;
false marks a prompt part); a text segment may also say "end_turn": true (an `<eot>`
follows it: the end of one turn of a dialogue). Blank lines are allowed and skipped. Anything else
raises DataError naming the file and the line: no document is ever dropped
silently.

Images are read with PIL and converted to RGB uint8 [H, W, 3] by `read_image`, the one
image reader of the project: images with transparency are composited over white first,
16-bit grayscale is scaled to 8 bits (not clipped), palette images are looked up.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import IO, Any, Iterable

import numpy as np
from PIL import Image, UnidentifiedImageError

from chameleon_jax.data.documents import TASKS, DataError, Document, Segment

_DOC_KEYS = ("segments", "task", "meta")
_SEGMENT_KEYS = ("text", "image", "target", "end_turn")


def _wide_gray_to_8bit(im: Image.Image, path: str) -> Image.Image:
    """A 16-bit (mode I;16*) or 32-bit integer (mode I) grayscale image as mode L, scaled, not clipped."""
    values = np.asarray(im).astype(np.int64)
    if im.mode == "I" and values.size and (values.min() < 0 or values.max() > 65535):
        raise DataError(f"image {path}: 32-bit integer pixels outside 0..65535; save it as 8 or 16 bits")
    if im.mode == "I" and (not values.size or values.max() <= 255):
        return Image.fromarray(values.astype(np.uint8), mode="L")
    return Image.fromarray(((values * 255 + 32767) // 65535).astype(np.uint8), mode="L")


def decode_image(source: str | os.PathLike | IO[bytes], where: str) -> np.ndarray:
    """A picture (a file path or a binary stream) as RGB uint8 [H, W, 3].

    Grayscale, 16-bit, palette and alpha pictures are converted (alpha over white).
    Raises DataError naming `where` when PIL cannot decode it.
    """
    try:
        with Image.open(source) as im:
            im.load()
            if im.mode.startswith("I"):
                im = _wide_gray_to_8bit(im, where)
            elif im.mode == "F":
                raise DataError(f"image {where} has floating-point pixels; save it with 8-bit channels")
            has_alpha = im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
                im.mode in ("P", "L", "RGB") and "transparency" in im.info
            )
            if has_alpha:
                rgba = im.convert("RGBA")
                canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                im = Image.alpha_composite(canvas, rgba)
            rgb = im.convert("RGB")
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError) as e:
        raise DataError(f"cannot decode image {where}: {' '.join(str(e).split())}") from None
    array = np.asarray(rgb, dtype=np.uint8)
    if array.ndim != 3 or array.shape[2] != 3 or 0 in array.shape:
        raise DataError(f"image {where} decoded to shape {list(array.shape)}, expected [H, W, 3]")
    return array


def read_image(path: str | os.PathLike) -> np.ndarray:
    """An image file as RGB uint8 [H, W, 3] (`decode_image`).

    Raises FileNotFoundError when missing and DataError when PIL cannot decode it.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"image not found: {path}")
    return decode_image(path, str(path))


def _segment(raw: Any, where: str, base: Path, cache: dict[Path, np.ndarray]) -> Segment:
    if not isinstance(raw, dict):
        raise DataError(f"{where}: a segment must be a JSON object, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(_SEGMENT_KEYS))
    if unknown:
        raise DataError(f"{where}: unknown segment key(s) {unknown}; allowed: {list(_SEGMENT_KEYS)}")
    has_text, has_image = "text" in raw, "image" in raw
    if has_text == has_image:
        raise DataError(f"{where}: a segment needs exactly one of 'text' and 'image', got {'both' if has_text else 'neither'}")
    target = raw.get("target", True)
    if not isinstance(target, bool):
        raise DataError(f"{where}: 'target' must be true or false, got {target!r}")
    if has_text:
        text = raw["text"]
        if not isinstance(text, str) or not text:
            raise DataError(f"{where}: 'text' must be a non-empty string, got {text!r}")
        end_turn = raw.get("end_turn", False)
        if not isinstance(end_turn, bool):
            raise DataError(f"{where}: 'end_turn' must be true or false, got {end_turn!r}")
        return Segment(text=text, is_target=target, end_turn=end_turn)
    if "end_turn" in raw:
        raise DataError(f"{where}: 'end_turn' belongs on a text segment, not an image")
    rel = raw["image"]
    if not isinstance(rel, str) or not rel:
        raise DataError(f"{where}: 'image' must be a path string, got {rel!r}")
    path = (base / rel).resolve()
    if path not in cache:
        try:
            image = read_image(path)
        except FileNotFoundError:
            raise DataError(f"{where}: image {rel!r} not found (looked for {path})") from None
        except DataError as e:
            raise DataError(f"{where}: {e}") from None
        image.flags.writeable = False  # shared by every segment that names the same file
        cache[path] = image
    return Segment(image=cache[path], is_target=target)


def parse_line(line: str, where: str, base: Path, cache: dict[Path, np.ndarray] | None = None) -> Document:
    """One JSONL line as a Document; `where` ("file:line") prefixes every error message."""
    cache = {} if cache is None else cache
    try:
        raw = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: invalid JSON: {e.msg} at column {e.colno}") from None
    if not isinstance(raw, dict):
        raise DataError(f"{where}: a document must be a JSON object, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(_DOC_KEYS))
    if unknown:
        raise DataError(f"{where}: unknown document key(s) {unknown}; allowed: {list(_DOC_KEYS)}")
    if "segments" not in raw:
        raise DataError(f"{where}: the document has no 'segments' list")
    segments = raw["segments"]
    if not isinstance(segments, list):
        raise DataError(f"{where}: 'segments' must be a list, got {type(segments).__name__}")
    if not segments:
        raise DataError(f"{where}: empty document ('segments' is an empty list)")
    task = raw.get("task", "document")
    if task not in TASKS:
        raise DataError(f"{where}: unknown task {task!r}; known tasks: {', '.join(TASKS)}")
    meta = raw.get("meta", {})
    if not isinstance(meta, dict):
        raise DataError(f"{where}: 'meta' must be a JSON object, got {type(meta).__name__}")
    parsed = tuple(_segment(s, f"{where}: segment {i}", base, cache) for i, s in enumerate(segments))
    return Document(parsed, task=task, meta=meta)


def load_jsonl(path: str | os.PathLike, one_size: bool = False) -> list[Document]:
    """Every document of a JSONL file, in file order. Raises DataError ("FILE:LINE: what") on the
    first bad line, FileNotFoundError if the file itself is missing.

    one_size: every picture of the file must have the size of its first one (a trainer's image
    tokenizer reads one size); the first that differs is named.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"JSONL file not found: {path}")
    base = path.resolve().parent
    cache: dict[Path, np.ndarray] = {}
    docs = []
    first: tuple[tuple[int, ...], str] | None = None
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                doc = parse_line(line, where, base, cache)
                if one_size:
                    for i, image in enumerate(doc.images):
                        if first is None:
                            first = (image.shape, where)
                        elif image.shape != first[0]:
                            (h, w, _), (fh, fw, _) = image.shape, first[0]
                            raise DataError(
                                f"{where}: picture {i} of the document is {w}x{h} pixels, the file's first picture "
                                f"({first[1]}) is {fw}x{fh}; every picture must have one size"
                            )
                docs.append(doc)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    return docs


def write_jsonl(documents: Iterable[Document], path: str | os.PathLike, image_dir: str = "images") -> None:
    """Writes documents as JSONL, each image as a PNG under `image_dir` (relative to the file).

    `load_jsonl(path)` reads the same documents back. Meta values must be JSON-serialisable,
    dataclasses (written as objects) or numpy values.
    """
    path = Path(path)
    (path.parent / image_dir).mkdir(parents=True, exist_ok=True)
    count = 0
    with open(path, "w", encoding="utf-8") as f:
        for d, doc in enumerate(documents):
            segments = []
            for s in doc.segments:
                if s.image is not None:
                    rel = f"{image_dir}/{d:06d}_{count:06d}.png"
                    count += 1
                    Image.fromarray(s.image).save(path.parent / rel)
                    entry = {"image": rel}
                else:
                    entry = {"text": s.text}
                if not s.is_target:
                    entry["target"] = False
                if s.end_turn:
                    entry["end_turn"] = True
                segments.append(entry)
            record = {"segments": segments}
            if doc.task != "document":
                record["task"] = doc.task
            if doc.meta:
                record["meta"] = dict(doc.meta)
            f.write(json.dumps(record, default=_jsonable) + "\n")


def _jsonable(value: Any) -> Any:
    """JSON form of meta values json cannot write itself: dataclasses (e.g. ObjectAttrs) and numpy values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"meta value of type {type(value).__name__} cannot be written as JSON")

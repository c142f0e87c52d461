"""Documents -> token sequences with loss weights, and packing of sequences into fixed rows.

One document becomes

    <bos> text ... <boi> code_0 ... code_{N-1} <eoi> text ... <eos>

with the codes of each image in row-major order. Every token carries the weight
and modality of *predicting it* from the tokens before it:

    token          modality   weight
    <bos>          text       0 (never predicted)
    text piece     text       text_weight  (0 in a prompt segment)
    <boi>          text       text_weight  (0 in a prompt): the model must learn to open images
    image code     image      image_weight (0 in a prompt)
    <eoi>          image      image_weight (0 in a prompt)
    <eot>          text       after a text segment with end_turn (a dialogue turn), as its text
    <eos>          text       text_weight if the last segment is a target, else 0

Rows are packed greedily in order: documents are appended to the current row while
they fit, the next one that does not fit opens a new row. Or, with `pack_docs` > 1,
blocks of that many documents are packed best-fit (`best_fit_rows`), which pads less
when documents are long next to the row. Inside a row every
document has its own segment id (1, 2, ...), positions restart at 0, and the
attention mask built from segment ids keeps documents apart. Padding has segment
id 0, token `pad_id` and weight 0.
"""

from __future__ import annotations

import bisect
import dataclasses
import logging
from typing import Callable, Iterable, Literal, Sequence

import numpy as np

from chameleon_jax.configlib import param
from chameleon_jax.vocab import Vocabulary

log = logging.getLogger(__name__)

TEXT, IMAGE = 0, 1
BATCH_KEYS = ("tokens", "targets", "positions", "segment_ids", "loss_weights", "modality")
BATCH_DTYPES = {"tokens": np.int32, "targets": np.int32, "positions": np.int32, "segment_ids": np.int32,
           "loss_weights": np.float32, "modality": np.int8}


@dataclasses.dataclass(frozen=True)
class SequenceConfig:
    """How documents become packed training rows."""

    seq_len: int = param(256, "tokens per packed row (input/target pairs); at most the model's max_seq_len")
    text_weight: float = param(1.0, "loss weight of text targets (including <boi> and <eos>)")
    image_weight: float = param(1.0, "loss weight of image-code targets (including <eoi>)")
    overlong: Literal["error", "split", "drop_with_warning"] = param(
        "error",
        "a document longer than a row: raise naming it, split it into row-sized pieces, or drop it with a warning",
    )
    pack_docs: int = param(
        1,
        "training documents packed together: 1 = in stream order, each row filled until the next document does "
        "not fit; N > 1 = blocks of N documents packed best-fit, longest first (less padding where documents "
        "are a sizeable part of a row)",
    )


class OverlongDocumentError(ValueError):
    """A document does not fit in one row and `overlong=error`."""


@dataclasses.dataclass(frozen=True)
class EncodedDocument:
    """One document (or one piece of a split document) as token ids.

    ids: int32 [n]; weights: float32 [n] and modality: int8 [n] describe predicting
    ids[i] from ids[:i] (entry 0 is never used as a target). A piece of n tokens
    fills n - 1 slots of a row.
    """

    name: str
    ids: np.ndarray
    weights: np.ndarray
    modality: np.ndarray

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    @property
    def slots(self) -> int:
        return len(self) - 1


def document_name(doc, index: int | None = None) -> str:
    """A human-readable name for error messages: meta id/name/source, task, stream index."""
    meta = getattr(doc, "meta", None) or {}
    parts = [str(meta[k]) for k in ("id", "name") if k in meta]
    parts += [f"{k}={meta[k]}" for k in ("source", "path", "document", "line") if k in meta]
    task = getattr(doc, "task", None)
    if task:
        parts.insert(0, f"task={task}")
    if index is not None:
        parts.append(f"index={index}")
    return "document(" + ", ".join(parts) + ")"


def encode_document(
    doc,
    vocab: Vocabulary,
    image_codes: Callable[[np.ndarray], np.ndarray],
    cfg: SequenceConfig,
    name: str | None = None,
) -> EncodedDocument:
    """A `Document` -> token ids with per-token weights and modalities (see the module table).

    `image_codes(image_hw3_uint8) -> int codes [h, w]` tokenises one image (usually a
    call of the picture encoder, or a lookup of codes computed beforehand).
    """
    ids: list[np.ndarray] = [np.array([vocab.bos_id], np.int32)]
    weights: list[np.ndarray] = [np.zeros((1,), np.float32)]
    modality: list[np.ndarray] = [np.full((1,), TEXT, np.int8)]

    def add(tok, w, m):
        tok = np.asarray(tok, np.int32).reshape(-1)
        ids.append(tok)
        weights.append(np.full(tok.shape, w, np.float32))
        modality.append(np.full(tok.shape, m, np.int8))

    segments = tuple(doc.segments)
    if not segments:
        raise ValueError(f"{name or document_name(doc)} has no segments")
    for seg in segments:
        target = bool(getattr(seg, "is_target", True))
        tw = cfg.text_weight if target else 0.0
        iw = cfg.image_weight if target else 0.0
        if seg.image is not None and seg.text is not None:
            raise ValueError(f"{name or document_name(doc)}: a segment holds both text and an image")
        if seg.image is not None:
            codes = np.asarray(image_codes(seg.image))
            add([vocab.boi_id], tw, TEXT)
            add(vocab.image_ids(codes.reshape(-1)), iw, IMAGE)
            add([vocab.eoi_id], iw, IMAGE)
        elif seg.text:
            add(vocab.encode_text(seg.text), tw, TEXT)
            if getattr(seg, "end_turn", False):
                add([vocab.eot_id], tw, TEXT)
    last_target = bool(getattr(segments[-1], "is_target", True))
    add([vocab.eos_id], cfg.text_weight if last_target else 0.0, TEXT)
    return EncodedDocument(
        name=name or document_name(doc),
        ids=np.concatenate(ids),
        weights=np.concatenate(weights),
        modality=np.concatenate(modality),
    )


def fit_to_row(enc: EncodedDocument, seq_len: int, overlong: str) -> list[EncodedDocument]:
    """The pieces of `enc` that go into rows: itself, its row-sized pieces, or none.

    A document of n tokens needs n - 1 slots. Split pieces overlap by one token (the
    last token of a piece is the first input of the next), so every target is
    trained exactly once; positions restart in each piece.
    """
    if enc.slots <= seq_len:
        return [enc]
    if overlong == "error":
        raise OverlongDocumentError(
            f"{enc.name} has {len(enc)} tokens ({enc.slots} input/target pairs), more than a row of "
            f"seq_len={seq_len}; raise seq_len, or set overlong=split or overlong=drop_with_warning"
        )
    if overlong == "drop_with_warning":
        log.warning("dropping %s: %d tokens do not fit in a row of %d", enc.name, len(enc), seq_len)
        return []
    if overlong != "split":
        raise ValueError(f"unknown overlong policy {overlong!r}")
    pieces = []
    for k, start in enumerate(range(0, enc.slots, seq_len)):
        sl = slice(start, min(start + seq_len + 1, len(enc)))
        pieces.append(EncodedDocument(f"{enc.name}[piece {k}]", enc.ids[sl], enc.weights[sl], enc.modality[sl]))
    return pieces


class RowPacker:
    """Fills one row of `seq_len` slots with pieces, first come first placed."""

    def __init__(self, seq_len: int, pad_id: int):
        self.seq_len = seq_len
        self.pad_id = pad_id
        self.reset()

    def reset(self) -> None:
        self.used = 0
        self.count = 0
        self.row = {k: np.zeros((self.seq_len,), BATCH_DTYPES[k]) for k in BATCH_KEYS}
        self.row["tokens"][:] = self.pad_id
        self.row["targets"][:] = self.pad_id

    def fits(self, piece: EncodedDocument) -> bool:
        return self.used + piece.slots <= self.seq_len

    def add(self, piece: EncodedDocument) -> None:
        if piece.slots < 1:
            return
        if not self.fits(piece):
            raise ValueError(f"{piece.name} ({piece.slots} slots) does not fit the {self.seq_len - self.used} left")
        sl = slice(self.used, self.used + piece.slots)
        self.count += 1
        self.row["tokens"][sl] = piece.ids[:-1]
        self.row["targets"][sl] = piece.ids[1:]
        self.row["loss_weights"][sl] = piece.weights[1:]
        self.row["modality"][sl] = piece.modality[1:]
        self.row["positions"][sl] = np.arange(piece.slots, dtype=np.int32)
        self.row["segment_ids"][sl] = self.count
        self.used += piece.slots

    def take(self) -> dict[str, np.ndarray]:
        row = self.row
        self.reset()
        return row


def best_fit_rows(slots: Sequence[int], seq_len: int) -> list[list[int]]:
    """Best-fit decreasing: the pieces' indices grouped into rows of at most `seq_len` slots.

    Pieces are placed longest first (ties in input order), each into the open row it
    leaves least room in, or a new row. Rows come back ordered by their earliest
    piece and list their pieces in input order, so the stream's order is roughly kept.
    The result depends only on `slots`, so a block packed again packs the same.
    """
    order = sorted(range(len(slots)), key=lambda i: (-slots[i], i))
    free: list[tuple[int, int]] = []  # (room left, row), sorted
    rows: list[list[int]] = []
    for i in order:
        need = slots[i]
        if need > seq_len:
            raise OverlongDocumentError(f"piece {i} needs {need} slots, a row has {seq_len}")
        k = bisect.bisect_left(free, (need, -1))
        if k < len(free):
            room, r = free.pop(k)
        else:
            room, r = seq_len, len(rows)
            rows.append([])
        rows[r].append(i)
        bisect.insort(free, (room - need, r))
    return sorted((sorted(r) for r in rows), key=lambda r: r[0])


def stack_rows(rows: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Rows of [T] arrays -> a batch of [B, T] arrays."""
    return {k: np.stack([r[k] for r in rows]) for k in BATCH_KEYS}


def pack(pieces: Iterable[EncodedDocument], seq_len: int, pad_id: int, num_rows: int | None = None) -> dict[str, np.ndarray]:
    """Greedy in-order packing of a finite list of pieces into rows.

    Every piece must already fit a row (see `fit_to_row`). With `num_rows` the
    batch has exactly that many rows (padding rows added) and running out of room
    is an error.
    """
    packer = RowPacker(seq_len, pad_id)
    rows = []
    for piece in pieces:
        if piece.slots > seq_len:
            raise OverlongDocumentError(f"{piece.name} needs {piece.slots} slots, a row has {seq_len}")
        if not packer.fits(piece):
            rows.append(packer.take())
        packer.add(piece)
    if packer.used:
        rows.append(packer.take())
    if num_rows is not None:
        if len(rows) > num_rows:
            raise ValueError(f"the pieces need {len(rows)} rows, only {num_rows} requested")
        rows += [packer.take() for _ in range(num_rows - len(rows))]
    return stack_rows(rows)

"""The LM input pipeline over pre-tokenised shards, in grain: shuffle, shard per process, pack, batch, prefetch.

    data = ShardData.build(cfg.data, run_dir=..., seq_len=...)        # cfg.data.source == "shards"
    it = data.train_iterator(global_batch, process_index, process_count)
    local = it.next_local()                 # this process's rows: numpy [B / P, T] per key
    state = it.state(); it.restore(state)   # grain's iterator state (JSON), kept in the checkpoint

The document stream: every shard set (chameleon_jax.data.shards) is shuffled with
the seed (a new permutation each epoch, grain's index shuffle over the whole set,
so nothing is held in memory), repeated, mixed with the other sets by weight, and
then dealt to processes (global position i goes to process i mod P): within one
pass over the mixed stream each process reads its own documents and no other's.
Documents become rows by `PackRows`, the project's packers (chameleon_jax.sequence:
greedy in stream order, or best-fit over blocks of documents) as a grain
transformation, then grain batches the rows and, with `workers > 0`, builds batches
in that many worker processes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Mapping, Sequence

import grain
import numpy as np

from chameleon_jax.data.shards import ShardError, ShardSet, decode_record
from chameleon_jax.sequence import EncodedDocument, RowPacker, best_fit_rows, fit_to_row
from chameleon_jax.vocab import Vocabulary

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- packing as a grain transformation


class _PackRowsIterator(grain.DatasetIterator):
    """Rows of greedily packed pieces. State: the parent's state before the document that holds the next
    piece, and that piece's number, so a restore re-reads one document and nothing more."""

    def __init__(self, parent: grain.DatasetIterator, seq_len: int, pad_id: int, overlong: str):
        super().__init__(parent)
        self._seq_len, self._pad_id, self._overlong = seq_len, pad_id, overlong
        self._pieces: list[EncodedDocument] | None = None
        self._piece = 0
        self._skip = 0
        self._doc_state = parent.get_state()
        self._exhausted = False

    def __next__(self) -> dict[str, np.ndarray]:
        packer = RowPacker(self._seq_len, self._pad_id)
        while True:
            if self._pieces is None:
                if self._exhausted:
                    break
                self._doc_state = self._parent.get_state()
                try:
                    doc = next(self._parent)
                except StopIteration:
                    self._exhausted = True
                    break
                self._pieces = fit_to_row(doc, self._seq_len, self._overlong)
                self._piece, self._skip = self._skip, 0
            if self._piece >= len(self._pieces):
                self._pieces = None
                continue
            piece = self._pieces[self._piece]
            if not packer.fits(piece):
                return packer.take()
            packer.add(piece)
            self._piece += 1
        if packer.used:  # a finite stream ended: its last, partly filled row
            return packer.take()
        raise StopIteration

    def get_state(self) -> dict[str, Any]:
        if self._pieces is None:
            return {"parent": self._parent.get_state(), "piece": self._skip}
        return {"parent": self._doc_state, "piece": self._piece}

    def set_state(self, state: Mapping[str, Any]) -> None:
        if "piece" not in state:
            raise ValueError("this data state was saved with data.sequence.pack_docs > 1; resume with the same setting")
        self._parent.set_state(state["parent"])
        self._pieces, self._piece, self._skip = None, 0, int(state["piece"])
        self._exhausted = False


class _BestFitRowsIterator(grain.DatasetIterator):
    """Rows of blocks of `block` documents, each block packed best-fit (sequence.best_fit_rows). State: the
    parent's state before the block and the number of its rows handed out, so a restore re-reads one block."""

    def __init__(self, parent: grain.DatasetIterator, seq_len: int, pad_id: int, overlong: str, block: int):
        super().__init__(parent)
        self._seq_len, self._pad_id, self._overlong, self._block = seq_len, pad_id, overlong, block
        self._rows: list[dict[str, np.ndarray]] | None = None
        self._next = 0
        self._block_state = parent.get_state()

    def _pack_block(self) -> None:
        self._block_state = self._parent.get_state()
        pieces: list[EncodedDocument] = []
        for _ in range(self._block):
            try:
                doc = next(self._parent)
            except StopIteration:
                break
            pieces.extend(fit_to_row(doc, self._seq_len, self._overlong))
        self._rows = []
        for members in best_fit_rows([p.slots for p in pieces], self._seq_len):
            packer = RowPacker(self._seq_len, self._pad_id)
            for i in members:
                packer.add(pieces[i])
            self._rows.append(packer.take())

    def __next__(self) -> dict[str, np.ndarray]:
        if self._rows is None:  # the rows before self._next were handed out before a restore
            self._pack_block()
        if self._next >= len(self._rows):
            if not self._rows:  # a finite stream ended
                raise StopIteration
            self._rows, self._next = None, 0
            return next(self)
        row = self._rows[self._next]
        self._next += 1
        return row

    def get_state(self) -> dict[str, Any]:
        # Until a block is packed the parent stands where _block_state says (at the start, or restored there).
        return {"parent": self._block_state, "row": self._next}

    def set_state(self, state: Mapping[str, Any]) -> None:
        if "row" not in state:
            raise ValueError("this data state was saved with data.sequence.pack_docs=1; resume with the same setting")
        self._parent.set_state(state["parent"])
        self._block_state = state["parent"]
        self._rows, self._next = None, int(state["row"])


class PackRows(grain.IterDataset):
    """EncodedDocuments -> packed rows (dicts of [seq_len] arrays, chameleon_jax.sequence.BATCH_KEYS).

    Documents longer than a row are split, dropped or refused as `overlong` says (sequence.fit_to_row).
    pack_docs = 1 fills rows in stream order; pack_docs > 1 packs blocks of that many documents best-fit."""

    def __init__(self, parent: grain.IterDataset, seq_len: int, pad_id: int, overlong: str = "error",
                 pack_docs: int = 1):
        super().__init__(parent)
        if pack_docs < 1:
            raise ValueError(f"data.sequence.pack_docs={pack_docs} must be >= 1")
        self.seq_len, self.pad_id, self.overlong, self.pack_docs = seq_len, pad_id, overlong, pack_docs

    def __iter__(self) -> grain.DatasetIterator:
        if self.pack_docs > 1:
            return _BestFitRowsIterator(self._parent.__iter__(), self.seq_len, self.pad_id, self.overlong,
                                        self.pack_docs)
        return _PackRowsIterator(self._parent.__iter__(), self.seq_len, self.pad_id, self.overlong)

    def __str__(self) -> str:
        return f"PackRows(seq_len={self.seq_len}, pack_docs={self.pack_docs})"


# --------------------------------------------------------------------------- the streams


def parse_mixture(spec: str) -> list[tuple[str, float]]:
    """"dirA:3,dirB:1" (or one folder, weight 1) -> [(folder, weight), ...]."""
    out = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        folder, weight = part, 1.0
        head, _, tail = part.rpartition(":")
        if head:
            try:
                folder, weight = head, float(tail)
            except ValueError:
                pass  # a ':' inside the path
        if weight <= 0:
            raise ValueError(f"shard set {folder!r} has weight {weight}; weights must be > 0")
        out.append((folder, weight))
    if not out:
        raise ValueError("no shard folder given (data.shards=DIR or DIR:WEIGHT,DIR:WEIGHT)")
    return out


def document_stream(sets: Sequence[ShardSet], weights: Sequence[float], seed: int, process_index: int,
                    process_count: int, shuffle: bool = True) -> grain.MapDataset:
    """The endless stream of this process's EncodedDocuments (see the module docstring)."""
    parts = []
    for k, s in enumerate(sets):
        ds = grain.MapDataset.source(s.data_source())
        if shuffle:
            ds = ds.shuffle(seed=(seed * 1009 + k) % 2**32)
        parts.append(ds.repeat())
    ds = parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, list(weights))
    return ds[process_index::process_count].map(decode_record)


def batches(docs: grain.MapDataset, seq_len: int, pad_id: int, overlong: str, rows: int,
            workers: int = 0, read_threads: int = 0, pack_docs: int = 1) -> grain.IterDataset:
    """Packed batches of `rows` rows (see PackRows for pack_docs); built in `workers` processes when > 0.

    `read_threads` > 0 reads and decodes documents ahead in that many threads. From local disk a
    document takes about 50 us to read in the packing thread and 125-140 us through grain's read-ahead
    threads (the hand-off costs more than the read), so 0 is the default; threads pay on remote storage.
    """
    ds = docs.to_iter_dataset(grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=4 * rows))
    ds = PackRows(ds, seq_len, pad_id, overlong, pack_docs).batch(rows, drop_remainder=False)
    return worker_prefetch(ds, workers)


def worker_prefetch(ds: grain.IterDataset, workers: int) -> grain.IterDataset:
    """`ds` built in `workers` processes (grain's mp_prefetch); unchanged when workers is 0."""
    if workers <= 0:
        return ds
    from absl import flags

    if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; a plain Python program has parsed none
        flags.FLAGS.mark_as_parsed()
    return ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))


class GrainBatches:
    """A grain iterator with the trainer's interface: next_local(), state(), restore(state)."""

    def __init__(self, dataset: grain.IterDataset):
        self._it = iter(dataset)

    def next_local(self) -> dict[str, np.ndarray]:
        return next(self._it)

    def state(self) -> dict[str, Any]:
        return self._it.get_state()

    def restore(self, state: Mapping[str, Any]) -> None:
        self._it.set_state(dict(state))

    def close(self) -> None:
        close = getattr(self._it, "close", None)
        if close:
            close()


def allgather_json(value: Any) -> list[Any]:
    """Every process's JSON-able `value`, in process order (one process: [value])."""
    import jax

    if jax.process_count() == 1:
        return [value]
    from jax.experimental import multihost_utils

    raw = np.frombuffer(json.dumps(value).encode(), np.uint8)
    lengths = np.asarray(multihost_utils.process_allgather(np.array([raw.size], np.int64))).reshape(-1)
    padded = np.zeros((int(lengths.max()),), np.uint8)
    padded[: raw.size] = raw
    rows = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(lengths), -1)
    return [json.loads(bytes(r[:n]).decode()) for r, n in zip(rows, lengths)]


# --------------------------------------------------------------------------- the trainer's data object


class ShardData:
    """Vocabulary, tokenizer facts and the train/eval batch streams of one or more tokenised shard sets."""

    def __init__(self, cfg, seq_len: int, vocab: Vocabulary, train_sets: list[ShardSet], weights: list[float],
                 eval_sets: list[ShardSet]):
        self.cfg = cfg
        self.seq_len = seq_len
        self.vocab = vocab
        self.train_sets, self.weights, self.eval_sets = train_sets, weights, eval_sets
        tok = train_sets[0].tokenizer
        self.tokenizer_info = tok
        self.tokenizer_dir = Path(tok["dir"]) if tok.get("dir") else None
        levels = ()  # the FSQ digit sizes of the codes, for model.image_code_digits=(-1,)
        if self.tokenizer_dir is not None and (self.tokenizer_dir / "config.json").is_file():
            from vqvae.tokenizer import code_levels

            levels = code_levels(self.tokenizer_dir)
        self.image_tokenizer = SimpleNamespace(codes_per_image=int(tok["codes_per_image"]),
                                               codebook_size=int(tok["codebook_size"]), code_levels=levels)
        if self.tokenizer_dir is None:  # the stand-in: the exported model's README names its settings
            self.cfg = dataclasses.replace(cfg, grid_cells=int(tok["grid_cells"]), grid_levels=int(tok["grid_levels"]))
        self._eval_cache: dict[tuple, list] = {}

    @classmethod
    def build(cls, cfg, *, run_dir: str | os.PathLike = "", vq_dir: str = "", seq_len: int | None = None,
              is_primary: bool = True) -> "ShardData":
        """Opens the shard sets named by cfg.shards (and cfg.eval_shards); checks they agree with each other,
        with vq_dir (when given) and with cfg.vocab_dir (when given)."""
        seq_len = int(seq_len or cfg.sequence.seq_len)
        mixture = parse_mixture(cfg.shards)
        train_sets = [ShardSet(d) for d, _ in mixture]
        eval_sets = [ShardSet(d) for d, _ in parse_mixture(cfg.eval_shards)] if cfg.eval_shards else []
        first = train_sets[0]
        for s in train_sets[1:] + eval_sets:
            for what in ("tokenizer", "vocab_fingerprint"):
                mine, theirs = getattr(first, what), getattr(s, what)
                if mine != theirs:
                    raise ShardError(f"shard sets {first.directory} and {s.directory} were tokenised with different "
                                     f"{what.replace('_', ' ')}s; tokenise them with the same tokenizer and vocabulary")
        vocab = Vocabulary.load(first.vocab_dir)
        if vocab.fingerprint() != first.vocab_fingerprint:
            raise ShardError(f"{first.vocab_dir} is not the vocabulary the shards in {first.directory} were made with")
        if cfg.vocab_dir and Vocabulary.load(cfg.vocab_dir).fingerprint() != vocab.fingerprint():
            raise ShardError(f"data.vocab_dir={cfg.vocab_dir} differs from the vocabulary of {first.directory}")
        if vq_dir:
            from chameleon_jax.lm_data import load_image_tokenizer

            _, fp, _ = load_image_tokenizer(vq_dir, cfg)
            if fp != first.tokenizer["fingerprint"]:
                raise ShardError(f"vq_dir={vq_dir} is not the image tokenizer the shards in {first.directory} were "
                                 f"made with ({first.tokenizer.get('dir') or 'the colour-grid stand-in'})")
        log.info("shards: %s (%d documents) for training, %d for evaluation",
                 ", ".join(str(s.directory) for s in train_sets), sum(len(s) for s in train_sets),
                 sum(len(s) for s in eval_sets))
        return cls(cfg, seq_len, vocab, train_sets, [w for _, w in mixture], eval_sets)

    def _batches(self, sets, weights, rows: int, process_index: int, process_count: int, shuffle: bool,
                 workers: int, pack_docs: int = 1) -> grain.IterDataset:
        docs = document_stream(sets, weights, self.cfg.seed, process_index, process_count, shuffle)
        return batches(docs, self.seq_len, self.vocab.pad_id, self.cfg.sequence.overlong, rows, workers,
                       self.cfg.read_threads, pack_docs)

    def train_iterator(self, global_rows: int, process_index: int = 0, process_count: int = 1) -> GrainBatches:
        if global_rows % process_count:
            raise ValueError(f"global batch {global_rows} does not split over {process_count} processes")
        return GrainBatches(self._batches(self.train_sets, self.weights, global_rows // process_count,
                                          process_index, process_count, True, self.cfg.workers,
                                          self.cfg.sequence.pack_docs))

    def eval_local_batches(self, global_rows: int, process_index: int = 0, process_count: int = 1) -> list:
        """The fixed validation batches (this process's rows): the first ones of the unshuffled eval sets."""
        if not self.eval_sets:
            return []
        key = (global_rows, process_index, process_count)
        if key not in self._eval_cache:
            it = GrainBatches(self._batches(self.eval_sets, [1.0] * len(self.eval_sets), global_rows // process_count,
                                            process_index, process_count, False, 0))
            self._eval_cache[key] = [it.next_local() for _ in range(self.cfg.eval_batches)]
        return self._eval_cache[key]

"""Pre-tokenised documents on disk: array_record shards, one record per document, and their manifests.

A shard folder, written by `python -m train.tokenize` (P processes, process p):

    shard-<p>-of-<P>-<k>.array_record       records of process p's k-th shard (5-digit numbers)
    shard-<p>-of-<P>-<k>.array_record.json  its counts and bad documents (written before the shard)
    manifest-<p>-of-<P>.json                process p's finished run: shards, counts, fingerprints, config
    report-<p>-of-<P>.json                  every document left out, with its file and the reason
    vocab/                                  the text vocabulary the ids belong to

A shard is written under a temporary name and renamed when complete, so a shard
file is always whole; a run that stops mid-shard leaves only the temporary file,
which the next run writes again. Readers take only the shards the manifests name,
and refuse a folder whose manifests are missing or disagree.

One record is one document: `encode_record` / `decode_record` below.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from chameleon_jax.sequence import EncodedDocument

FORMAT = "chameleon-jax-shards"
VERSION = 1
_MAGIC = b"CJD1"
_HEADER = struct.Struct("<4sII")  # magic, tokens, name bytes


class ShardError(ValueError):
    """A shard folder is missing, unfinished, or does not match what reads it."""


def encode_record(doc: EncodedDocument) -> bytes:
    """One document as bytes: a header, ids int32 [n], weights float32 [n], modality int8 [n], its name."""
    name = doc.name.encode("utf-8")
    n = len(doc)
    return b"".join((
        _HEADER.pack(_MAGIC, n, len(name)),
        np.ascontiguousarray(doc.ids, np.int32).tobytes(),
        np.ascontiguousarray(doc.weights, np.float32).tobytes(),
        np.ascontiguousarray(doc.modality, np.int8).tobytes(),
        name,
    ))


def decode_record(record: bytes) -> EncodedDocument:
    """The inverse of `encode_record`."""
    magic, n, name_len = _HEADER.unpack_from(record)
    if magic != _MAGIC:
        raise ShardError(f"not a tokenised-document record (starts with {magic!r})")
    o = _HEADER.size
    ids = np.frombuffer(record, np.int32, n, o)
    weights = np.frombuffer(record, np.float32, n, o + 4 * n)
    modality = np.frombuffer(record, np.int8, n, o + 8 * n)
    name = record[o + 9 * n: o + 9 * n + name_len].decode("utf-8")
    return EncodedDocument(name, ids, weights, modality)


def shard_name(process: int, processes: int, k: int) -> str:
    return f"shard-{process:05d}-of-{processes:05d}-{k:05d}.array_record"


def manifest_name(process: int, processes: int) -> str:
    return f"manifest-{process:05d}-of-{processes:05d}.json"


def report_name(process: int, processes: int) -> str:
    return f"report-{process:05d}-of-{processes:05d}.json"


def write_json_atomic(path: Path, value: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def shard_done(path: Path) -> dict | None:
    """The sidecar of a finished shard, or None when the shard is not (wholly) there."""
    side = path.with_name(path.name + ".json")
    if path.is_file() and side.is_file():
        return json.loads(side.read_text())
    return None


def write_shard(path: Path, records: Iterable[bytes], info: dict[str, Any]) -> None:
    """Writes records into `path` atomically: a temporary file, then the sidecar, then the rename."""
    from array_record.python.array_record_module import ArrayRecordWriter

    tmp = path.with_name(path.name + ".tmp")
    # group_size:1 keeps every record separately addressable: grain reads them in random order.
    writer = ArrayRecordWriter(str(tmp), "group_size:1")
    try:
        for r in records:
            writer.write(r)
    finally:
        writer.close()
    write_json_atomic(path.with_name(path.name + ".json"), info)
    os.replace(tmp, path)


class ShardSet:
    """The finished shards of one folder, in (process, shard) order, and what made them."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise ShardError(f"no shard folder at {self.directory}")
        manifests = sorted(self.directory.glob("manifest-*-of-*.json"))
        if not manifests:
            raise ShardError(
                f"{self.directory} holds no manifest: train.tokenize has not finished there "
                "(rerun it; finished shards are kept)"
            )
        self.manifests = [json.loads(p.read_text()) for p in manifests]
        first = self.manifests[0]
        if first.get("format") != FORMAT or first.get("version") != VERSION:
            raise ShardError(f"{manifests[0]} is not a {FORMAT} v{VERSION} manifest")
        processes = first["processes"]
        have = sorted(m["process"] for m in self.manifests)
        if have != list(range(processes)):
            missing = sorted(set(range(processes)) - set(have))
            raise ShardError(f"{self.directory}: the manifests of processes {missing} of {processes} are missing "
                             "(their train.tokenize has not finished)")
        for key in ("tokenizer", "vocab_fingerprint", "processes"):
            values = {json.dumps(m[key], sort_keys=True) for m in self.manifests}
            if len(values) > 1:
                raise ShardError(f"{self.directory}: the processes' manifests disagree on {key}: {sorted(values)}")
        self.tokenizer: dict[str, Any] = first["tokenizer"]
        self.vocab_fingerprint: str = first["vocab_fingerprint"]
        self.paths = [self.directory / s["file"] for m in self.manifests for s in m["shards"]]
        for p in self.paths:
            if not p.is_file():
                raise ShardError(f"shard {p} named by the manifest is missing")
        self.documents = sum(m["documents"] for m in self.manifests)
        self.tokens = sum(m["tokens"] for m in self.manifests)
        self.images = sum(m["images"] for m in self.manifests)

    @property
    def vocab_dir(self) -> Path:
        return self.directory / "vocab"

    def data_source(self):
        """A grain ArrayRecordDataSource over every shard (random access to raw records)."""
        import grain

        return grain.sources.ArrayRecordDataSource([str(p) for p in self.paths])

    def __len__(self) -> int:
        return self.documents


def read_records(paths: Sequence[Path]) -> list[EncodedDocument]:
    """Every document of the given shard files, in order (tests and small tools)."""
    import grain

    src = grain.sources.ArrayRecordDataSource([str(p) for p in paths])
    return [decode_record(src[i]) for i in range(len(src))]

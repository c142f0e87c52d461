"""Tokenise documents once into array_record shards that `train.lm` reads through grain.

    python -m train.tokenize source=folder input=my_pictures/ out_dir=data/tok vq_dir=runs/vq
    python -m train.tokenize source=jsonl input=docs.jsonl out_dir=data/tok vq_dir=runs/vq
    python -m train.tokenize source=tfds input=my_set tfds_image=image tfds_text=caption out_dir=...
    python -m train.tokenize source=shapes shapes_docs=200000 out_dir=data/shapes-tok vq_dir=runs/vq
    python -m train.tokenize --help

Each document becomes one record (token ids, loss weights, modality; see
chameleon_jax.data.shards for the folder layout). Pictures are decoded in threads,
resized and centre-cropped to the tokenizer's size, and encoded in jitted batches
over every local device. In a multi-process job (num_processes > 1) process p
takes documents p, p + P, ... and writes its own shards. Shards are written
atomically and a rerun skips the finished ones. A document whose picture cannot be
read is listed (file and reason) in report-*.json; the run then exits with status 1
and writes no manifest, unless skip_bad=true.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

from chameleon_jax import configlib, host_malloc
from chameleon_jax.configlib import param
from chameleon_jax.data.documents import DataError
from chameleon_jax.data.shapes.spec import Backend as ShapesBackend

log = logging.getLogger("train.tokenize")


@dataclasses.dataclass(frozen=True)
class TokenizeConfig:
    """One tokenisation job: a document source -> array_record shards of token ids and loss weights."""

    source: Literal["jsonl", "folder", "tfds", "shapes"] = param(
        "folder", "where documents come from: a JSON Lines file, a folder of picture + caption pairs, a TFDS "
                  "data set, or the Shapes task mixture")
    input: str = param("", "the JSON Lines file, the picture folder, or the TFDS data set name (name[/config])")
    out_dir: str = param("data/tokenized", "shard folder to write (a rerun continues it)")
    vq_dir: str = param("", "VQ tokenizer run folder (train.vqvae output); empty = colour-grid stand-in (smoke tests)")
    grid_cells: int = param(4, "no vq_dir: the stand-in colour-grid tokenizer's cells per side")
    grid_levels: int = param(4, "no vq_dir: the stand-in tokenizer's levels per colour channel")
    image_size: int = param(32, "no vq_dir: the picture side pictures are fitted to (a VQ tokenizer uses its own)")
    vocab_dir: str = param(
        "", "use this saved vocabulary; empty = train one on the source's text (kept in out_dir/vocab)")
    text_vocab_size: int = param(512, "upper bound on sentencepiece pieces trained from the text")
    vocab_corpus_docs: int = param(4000, "documents whose text trains the sentencepiece model")
    text_weight: float = param(1.0, "loss weight stored for text targets")
    image_weight: float = param(1.0, "loss weight stored for image-code targets")
    pairs_as: Literal["caption", "t2i", "both"] = param(
        "caption", "folder and tfds pairs become captioning documents, text-to-image ones, or both (two a pair)")
    tfds_split: str = param("train", "TFDS split to read")
    tfds_image: str = param("image", "TFDS picture feature ('/' for nested features)")
    tfds_text: str = param("caption", "TFDS text feature ('/' for nested; a list of texts gives its first)")
    tfds_data_dir: str = param("", "TFDS data folder; empty = TFDS's default")
    tfds_module: str = param("", "Python module to import first (one that registers a custom TFDS builder)")
    shapes_split: str = param("train", "Shapes split")
    shapes_docs: int = param(20000, "Shapes documents to draw from the endless task mixture")
    shapes_examples: int = param(0, "Shapes examples (pictures) in the split; 0 = the data set's default")
    shapes_backend: ShapesBackend = param("auto", "Shapes storage: auto, tfds or generate")
    caption_weight: float = param(1.0, "Shapes mixture weight: image -> caption")
    t2i_weight: float = param(1.0, "Shapes mixture weight: caption -> image")
    vqa_weight: float = param(1.0, "Shapes mixture weight: question + image -> answer")
    interleaved_weight: float = param(0.5, "Shapes mixture weight: interleaved text/image documents")
    interleaved_docs: int = param(2000, "interleaved Shapes documents to draw from; 0 = one per example")
    two_object_share: float = param(0.0, "share of t2i and VQA documents showing two objects; 0 = the split's own")
    partial_prompt_share: float = param(
        0.0, "chance that a Shapes t2i prompt leaves an object's colour or shape unsaid; 0 = never")
    position_question_weight: float = param(
        1.0, "how much likelier a Shapes VQA document asks an object's position than each other question; 1 = alike")
    seed: int = param(0, "Shapes mixture seed")
    max_docs: int = param(0, "tokenise only the first documents of the source; 0 = all")
    docs_per_shard: int = param(4096, "documents per shard (per process)")
    chunk_docs: int = param(256, "documents decoded and encoded together (bounds memory)")
    encode_batch: int = param(256, "pictures per encoder call (split over the local devices)")
    decode_threads: int = param(4, "threads decoding and resizing pictures")
    code_memo_mib: int = param(
        256, "memory for the codes of pictures that recur under one key (Shapes documents share pictures): each "
             "is encoded once while it fits; 0 = encode every occurrence")
    skip_bad: bool = param(False, "finish (exit 0, write the manifest) although some documents could not be read")
    num_processes: int = param(0, "processes of a multi-process job; 0 = jax.process_count()")
    process_id: int = param(-1, "this process's index; -1 = jax.process_index()")
    coordinator_address: str = param("", "host:port of process 0: jax.distributed.initialize() first")
    progress: bool = param(True, "show a progress bar with documents/s and pictures/s")


PRESETS = {"default": TokenizeConfig}

# Settings that change how the work is done, not the shards it writes: a folder tokenised with other
# values of these is the same data.
HOW_ONLY = frozenset({"chunk_docs", "decode_threads", "code_memo_mib", "progress"})


class BadDocumentsError(DataError):
    """Some documents could not be read (listed in the report); skip_bad=true finishes without them.

    `bad`: [{"file": where, "reason": why}, ...] for every one of them."""

    def __init__(self, message: str, bad: list[dict]):
        super().__init__(message)
        self.bad = bad


def describe_bad(bad: dict) -> str:
    """One bad document as 'where: why' (the reason often names the place already)."""
    return bad["reason"] if bad["reason"].startswith(bad["file"]) else f"{bad['file']}: {bad['reason']}"


def shapes_mixture(cfg: TokenizeConfig, image_size: int):
    """The Shapes task mixture the shapes_* and *_weight fields describe (an endless document stream)."""
    from chameleon_jax.data.shapes.mixture import ShapesMixture

    weights = {"caption": cfg.caption_weight, "t2i": cfg.t2i_weight, "vqa": cfg.vqa_weight,
               "interleaved": cfg.interleaved_weight}
    return ShapesMixture(cfg.shapes_split, image_size, weights, seed=cfg.seed, examples=cfg.shapes_examples,
                         backend=cfg.shapes_backend, interleaved_docs=cfg.interleaved_docs,
                         two_object_share=cfg.two_object_share, partial_prompt_share=cfg.partial_prompt_share,
                         position_question_weight=cfg.position_question_weight)


def open_source(cfg: TokenizeConfig, image_size: int | None):
    """The configured document source (chameleon_jax.data.sources, or the Shapes mixture)."""
    from chameleon_jax.data import sources

    if cfg.source == "shapes":
        from chameleon_jax.data.shapes.mixture import ShapesDocuments

        return ShapesDocuments(shapes_mixture(cfg, image_size), cfg.shapes_docs)
    if not cfg.input:
        raise configlib.ConfigError(f"source={cfg.source} needs input=...")
    if cfg.source == "jsonl":
        return sources.JsonlDocuments(cfg.input)
    if cfg.source == "folder":
        return sources.FolderPairs(cfg.input, cfg.pairs_as)
    if cfg.tfds_module:
        import importlib

        importlib.import_module(cfg.tfds_module)
    return sources.TfdsPairs(cfg.input, cfg.tfds_split, cfg.tfds_image, cfg.tfds_text, cfg.tfds_data_dir, cfg.pairs_as)


def image_tokenizer(cfg: TokenizeConfig) -> tuple[Any, dict[str, Any]]:
    """(tokenizer, its description for the manifest)."""
    from chameleon_jax.data.grid_tokenizer import ColourGridTokenizer
    from chameleon_jax.lm_data import tokenizer_fingerprint

    if not cfg.vq_dir:
        log.warning("no vq_dir given: pictures are tokenised by the colour-grid stand-in (smoke tests only)")
        tok = ColourGridTokenizer(cfg.grid_cells, cfg.grid_levels)
        return tok, {"fingerprint": tok.fingerprint, "dir": "", "grid_cells": cfg.grid_cells,
                     "grid_levels": cfg.grid_levels, "codebook_size": tok.codebook_size,
                     "codes_per_image": tok.codes_per_image, "image_size": cfg.image_size}
    import vqvae

    root = Path(cfg.vq_dir).absolute()
    tok_dir = root / "tokenizer" if (root / "tokenizer").is_dir() else root
    tok = vqvae.load_tokenizer(tok_dir)
    return tok, {"fingerprint": tokenizer_fingerprint(tok, tok_dir), "dir": str(tok_dir),
                 "codebook_size": int(tok.codebook_size), "codes_per_image": int(tok.codes_per_image),
                 "image_size": int(tok.image_size)}


def vocabulary(cfg: TokenizeConfig, source, out: Path, codebook: int, primary: bool):
    """The text vocabulary in out/vocab: copied from vocab_dir, kept from a previous run, or trained."""
    from chameleon_jax.vocab import Vocabulary

    target = out / "vocab"
    if (target / "vocab.json").exists():
        vocab = Vocabulary.load(target)
    elif not primary:  # process 0 writes it; the others read it from the shared folder
        deadline = time.time() + 600
        while not (target / "vocab.json").exists():
            if time.time() > deadline:
                raise RuntimeError(f"process 0 wrote no vocabulary into {target} within 10 minutes")
            time.sleep(1)
        time.sleep(1)
        vocab = Vocabulary.load(target)
    elif cfg.vocab_dir:
        vocab = Vocabulary.load(cfg.vocab_dir)
        tmp = out / "vocab.tmp"
        vocab.save(tmp)
        tmp.rename(target)
    else:
        tmp = out / "vocab.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        Vocabulary.train(source.texts(cfg.vocab_corpus_docs), tmp, cfg.text_vocab_size, codebook)
        tmp.rename(target)
        vocab = Vocabulary.load(target)
    if vocab.codebook_size != codebook:
        raise ValueError(f"the vocabulary has {vocab.codebook_size} image codes but the image tokenizer has {codebook}")
    return vocab


def _load(item, size):
    """(document, fitted pictures, None) or (None, None, the reason it cannot be read)."""
    from chameleon_jax.data.documents import DataError
    from chameleon_jax.data.picture_codes import fit_picture

    try:
        doc = item.load()
        return doc, [fit_picture(im, size) for im in doc.images], None
    except (DataError, OSError) as e:
        return None, None, str(e)


class _Progress:
    def __init__(self, cfg: TokenizeConfig, total: int | None, primary: bool):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, disable=not (cfg.progress and primary), desc="tokenize", unit="doc",
                        dynamic_ncols=True)
        self.t0, self.docs, self.images = time.perf_counter(), 0, 0

    def update(self, docs: int, images: int) -> None:
        self.docs += docs
        self.images += images
        dt = max(time.perf_counter() - self.t0, 1e-9)
        self.bar.update(docs)
        self.bar.set_postfix(docs_s=f"{self.docs / dt:.0f}", images_s=f"{self.images / dt:.0f}")

    def rates(self) -> dict[str, float]:
        dt = max(time.perf_counter() - self.t0, 1e-9)
        return {"docs_per_s": self.docs / dt, "images_per_s": self.images / dt, "seconds": dt}


def _shard_records(items, cfg, encoder, memo, vocab, seq_cfg, pool, info, progress):
    """Yields the records of one shard's items, chunk by chunk; fills `info` (counts, bad documents)."""
    from chameleon_jax.data.shards import encode_record
    from chameleon_jax.sequence import encode_document

    starts = range(0, len(items), cfg.chunk_docs)

    def submit(start):  # decoding runs in the pool while the previous chunk is encoded
        return [pool.submit(_load, it, encoder.image_size) for it in items[start: start + cfg.chunk_docs]]

    ahead = submit(0) if len(items) else []
    for n, start in enumerate(starts):
        chunk = items[start: start + cfg.chunk_docs]
        loaded = [f.result() for f in ahead]
        ahead = submit(starts[n + 1]) if n + 1 < len(starts) else []
        per_doc = memo.encode(encoder, [(doc.meta.get("picture_keys"), ims) for doc, ims, _ in loaded if doc])
        per_doc = iter(per_doc)
        n_images = 0
        for item, (doc, ims, error) in zip(chunk, loaded):
            if error is not None:
                info["bad"].append({"file": item.where, "reason": error})
                continue
            codes = iter(next(per_doc))
            enc = encode_document(doc, vocab, lambda _: next(codes), seq_cfg, name=item.where)
            info["documents"] += 1
            info["images"] += len(ims)
            info["tokens"] += len(enc)
            n_images += len(ims)
            yield encode_record(enc)
        progress.update(len(chunk), n_images)


def run(cfg: TokenizeConfig, source=None) -> Path:
    """Tokenises this process's share of the source into cfg.out_dir; returns the folder.

    source: the document source when the caller has opened it already (it must be the one `cfg` names,
    since the manifest records cfg); None = open it from cfg."""
    import jax

    from chameleon_jax.data import shards
    from chameleon_jax.data.picture_codes import CodeMemo, PictureEncoder
    from chameleon_jax.sequence import SequenceConfig

    if cfg.coordinator_address:
        jax.distributed.initialize(cfg.coordinator_address, cfg.num_processes or None,
                                   cfg.process_id if cfg.process_id >= 0 else None)
    P = cfg.num_processes or jax.process_count()
    p = cfg.process_id if cfg.process_id >= 0 else jax.process_index()
    if not 0 <= p < P:
        raise configlib.ConfigError(f"process_id={p} is not in [0, {P})")
    if cfg.docs_per_shard < 1 or cfg.chunk_docs < 1:
        raise configlib.ConfigError("docs_per_shard and chunk_docs must be >= 1")
    out = Path(cfg.out_dir).absolute()
    out.mkdir(parents=True, exist_ok=True)

    tok, tok_info = image_tokenizer(cfg)
    encoder = PictureEncoder(tok, cfg.encode_batch, cfg.image_size)
    memo = CodeMemo(cfg.code_memo_mib * 2**20)
    source = open_source(cfg, encoder.image_size) if source is None else source
    vocab = vocabulary(cfg, source, out, int(tok.codebook_size), primary=p == 0)
    seq_cfg = SequenceConfig(text_weight=cfg.text_weight, image_weight=cfg.image_weight)

    # What the shards' contents depend on; a rerun into the same folder must agree on it.
    identity = {"source": source.name, "tokenizer": tok_info["fingerprint"], "vocab": vocab.fingerprint(),
                "processes": P, "docs_per_shard": cfg.docs_per_shard, "max_docs": cfg.max_docs,
                "text_weight": cfg.text_weight, "image_weight": cfg.image_weight}
    ident_path = out / f"job-{p:05d}-of-{P:05d}.json"
    if ident_path.exists():
        import json

        before = json.loads(ident_path.read_text())
        if before != identity:
            diff = sorted(k for k in identity if before.get(k) != identity[k])
            raise shards.ShardError(f"{out} holds shards made with other settings ({', '.join(diff)}); "
                                    "use another out_dir or delete it")
    else:
        shards.write_json_atomic(ident_path, identity)

    total = len(source) if hasattr(source, "__len__") else None
    if total is not None and cfg.max_docs:
        total = min(total, cfg.max_docs)
    progress = _Progress(cfg, None if total is None else len(range(p, total, P)), p == 0)
    done: list[dict] = []

    def finish_shard(k: int, items: list) -> None:
        path = out / shards.shard_name(p, P, k)
        info = shards.shard_done(path)
        if info is None:
            info = {"file": path.name, "documents": 0, "images": 0, "tokens": 0, "bad": []}
            shards.write_shard(path, _shard_records(items, cfg, encoder, memo, vocab, seq_cfg, pool, info, progress), info)
        else:
            progress.update(len(items), 0)
        done.append(info)

    with ThreadPoolExecutor(max(1, cfg.decode_threads)) as pool:
        pending: list = []
        k = 0
        for i, item in enumerate(source):
            if cfg.max_docs and i >= cfg.max_docs:
                break
            if i % P != p:
                continue
            pending.append(item)
            if len(pending) == cfg.docs_per_shard:
                finish_shard(k, pending)
                pending, k = [], k + 1
        if pending:
            finish_shard(k, pending)
    progress.bar.close()

    bad = [b for info in done for b in info["bad"]]
    counts = {key: sum(info[key] for info in done) for key in ("documents", "images", "tokens")}
    rates = progress.rates()
    shards.write_json_atomic(out / shards.report_name(p, P), {"bad_documents": len(bad), "bad": bad, **counts})
    rates["pictures_encoded"] = memo.misses  # the rest recurred under a key and were encoded once
    log.info("process %d/%d: %d documents, %d pictures (%d encoded), %d tokens in %d shards; %.0f docs/s, "
             "%.0f pictures/s", p, P, counts["documents"], counts["images"], memo.misses, counts["tokens"], len(done),
             rates["docs_per_s"], rates["images_per_s"])
    if bad and not cfg.skip_bad:
        raise BadDocumentsError(
            f"{len(bad)} document(s) could not be read, e.g. {describe_bad(bad[0])}; all are listed in "
            f"{out / shards.report_name(p, P)}. Fix them and rerun (finished shards are kept), or rerun with "
            "skip_bad=true to finish without them", bad)
    manifest = {"format": shards.FORMAT, "version": shards.VERSION, "process": p, "processes": P,
                "shards": [{k2: info[k2] for k2 in ("file", "documents", "images", "tokens")} for info in done],
                **counts, "bad_documents": len(bad), "tokenizer": tok_info, "vocab_fingerprint": vocab.fingerprint(),
                "source": source.name, "config": configlib.to_dict(cfg), "rates": rates}
    shards.write_json_atomic(out / shards.manifest_name(p, P), manifest)
    return out


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)
    argv = sys.argv[1:] if argv is None else argv

    from chameleon_jax.data.shards import ShardError

    def go():
        cfg = configlib.from_cli(argv, PRESETS, "default")
        try:
            out = run(cfg)
        except (BadDocumentsError, FileNotFoundError, DataError, ShardError) as e:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(1) from None
        print(out)

    configlib.main_guard(go)


if __name__ == "__main__":
    host_malloc.reexec_with_huge_pages()
    main()

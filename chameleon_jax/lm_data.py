"""The language-model input pipeline: documents -> cached image codes + text ids -> packed global batches.

    data = LMData.build(cfg.data, seq_len=..., run_dir=..., vq_dir=...)
    it = data.train_iterator(global_batch)        # resumable: it.state() / it.restore(state)
    batch = it.next_global(trainer.batch_sharding)  # dict of jax arrays [B, T]

Sources (`LMDataConfig.source`):
- "shards": documents tokenised beforehand by `python -m train.tokenize`, read
  through grain (chameleon_jax.data.grain_pipeline, which `train.lm` builds instead
  for this source): the path for data sets of any size.
- "shapes": the synthetic Shapes tasks (captioning, text-to-image, VQA,
  interleaved), mixed by config weights; document i of a split is a pure
  function of (seed, split, i), so the stream is infinite and reproducible.
- "jsonl": user documents (chameleon_jax.data.jsonl), visited in a fresh
  seeded permutation every epoch.

Images are tokenised ONCE with the VQ tokenizer and cached to
`cache_dir/codes-<source>-<split>-<size>-<tokenizer fp>-<data fp>.npz`; later
runs load the file. Codes are looked up by a hash of the image's pixels.

The text vocabulary (sentencepiece) is trained from the training text on first
use and saved to `run_dir/vocab/` (or taken from `vocab_dir`).

Each process packs its own rows from its own document sub-stream (documents
p, p + P, p + 2P, ... of P processes) and the global batch is assembled with
`jax.make_array_from_process_local_data`. The iterator's state is a small dict
(next local document, next piece of it) stored in the checkpoint's extra.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from chameleon_jax.configlib import param
from chameleon_jax.sequence import (
    EncodedDocument,
    RowPacker,
    SequenceConfig,
    document_name,
    encode_document,
    fit_to_row,
    stack_rows,
)
from chameleon_jax.vocab import Vocabulary

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class LMDataConfig:
    """Where LM training documents come from and how they become rows."""

    source: str = param(
        "shapes", "document source: 'shards' (train.tokenize output read through grain), 'shapes' (synthetic tasks, "
                  "tokenised at start) or 'jsonl' (jsonl_train / jsonl_eval, tokenised at start)")
    shards: str = param("", "source=shards: shard folder(s) of train.tokenize; several mixed by weight as DIR:W,DIR:W")
    eval_shards: str = param("", "source=shards: shard folder(s) for the validation loss; empty = no evaluation")
    workers: int = param(0, "source=shards: grain worker processes building batches; 0 = in the training process")
    image_size: int = param(0, "Shapes image side in pixels; 0 = the image tokenizer's own (64 for the stand-in)")
    train_split: str = param("train", "Shapes split to train on")
    eval_split: str = param("validation", "Shapes split for the validation loss; empty = no evaluation")
    train_examples: int = param(0, "Shapes examples in the train split; 0 = the data set's default (20000)")
    eval_examples: int = param(0, "Shapes examples in the eval split; 0 = the data set's default (1000)")
    shapes_backend: str = param("auto", "Shapes storage: auto, tfds (built array_record files) or generate (computed on access)")
    caption_weight: float = param(1.0, "Shapes mixture weight: image -> caption")
    t2i_weight: float = param(1.0, "Shapes mixture weight: caption -> image")
    vqa_weight: float = param(1.0, "Shapes mixture weight: question + image -> answer")
    interleaved_weight: float = param(0.5, "Shapes mixture weight: interleaved text/image documents")
    two_object_share: float = param(
        0.0,
        "share of the training split's t2i and VQA documents drawn from two-object pictures (one-object "
        "pictures are skipped at random to reach it); captions keep the split's mix, since a captioner "
        "learns from it how many objects to name; 0 = as the split holds them (about 0.6)",
    )
    interleaved_docs: int = param(2000, "interleaved (edit) Shapes documents per split to draw from; 0 = one per example")
    jsonl_train: str = param("", "JSON Lines file of training documents (source=jsonl)")
    jsonl_eval: str = param("", "JSON Lines file of validation documents (source=jsonl); empty = no eval")
    sequence: SequenceConfig = param(SequenceConfig(), "sequence building and packing")
    text_vocab_size: int = param(512, "upper bound on sentencepiece pieces trained from the training text")
    vocab_dir: str = param("", "use this saved vocabulary instead of training one (e.g. an imported Chameleon one)")
    vocab_corpus_docs: int = param(4000, "training documents whose text trains the sentencepiece model (shapes)")
    cache_dir: str = param("", "image-code cache folder; empty = <data dir>/lm_code_cache")
    encode_batch: int = param(64, "images per VQ encode call when building the code cache")
    grid_cells: int = param(8, "no vq_dir: the stand-in colour-grid tokenizer's cells per side")
    grid_levels: int = param(4, "no vq_dir: the stand-in tokenizer's levels per colour channel")
    eval_batches: int = param(4, "validation batches per evaluation (a fixed set, same every time)")
    prefetch: int = param(
        -1, "training batches packed ahead in a background thread while the device computes; 0 = off; -1 = 2 on "
            "an accelerator, off on a CPU (where the thread takes cores from the step: 1.23 s against 1.20 s per demo step)"
    )
    seed: int = param(0, "seed of the document stream (task mixture, examples, epoch order)")


# --------------------------------------------------------------------------- image tokenizers


class ColourGridTokenizer:
    """A fixed stand-in image tokenizer for smoke tests when no VQ model is given.

    The image is cut into `cells x cells` blocks; each block's mean colour,
    quantised to `levels` per channel, is one code (levels^3 codes). Decoding
    paints the blocks. It learns nothing and exists so the LM pipeline runs
    without a trained VQ-VAE.
    """

    def __init__(self, cells: int = 8, levels: int = 4):
        self.cells, self.levels = int(cells), int(levels)
        self.codebook_size = self.levels ** 3
        self.codes_per_image = self.cells * self.cells
        self.fingerprint = f"grid{self.cells}x{self.levels}"

    def encode(self, images_bhw3: np.ndarray) -> np.ndarray:
        x = np.asarray(images_bhw3, np.float32)
        b, h, w, _ = x.shape
        c = self.cells
        if h % c or w % c:
            raise ValueError(f"image {h}x{w} does not split into {c}x{c} cells")
        mean = x.reshape(b, c, h // c, c, w // c, 3).mean(axis=(2, 4))
        q = np.clip(np.rint(mean / 255.0 * (self.levels - 1)), 0, self.levels - 1).astype(np.int32)
        return (q[..., 0] * self.levels + q[..., 1]) * self.levels + q[..., 2]

    def decode(self, codes_bhw: np.ndarray, image_size: int = 64) -> np.ndarray:
        codes = np.asarray(codes_bhw, np.int32)
        rgb = np.stack([codes // (self.levels ** 2), (codes // self.levels) % self.levels, codes % self.levels], -1)
        rgb = (rgb * (255.0 / (self.levels - 1))).astype(np.uint8)
        k = image_size // self.cells
        return rgb.repeat(k, axis=1).repeat(k, axis=2)


def tokenizer_fingerprint(tokenizer, directory: str | os.PathLike | None) -> str:
    """A short hash identifying the tokenizer's weights (cache key)."""
    fp = getattr(tokenizer, "fingerprint", None)
    if isinstance(fp, str) and fp:
        return fp
    if callable(fp):
        return str(fp())
    h = hashlib.sha1()
    root = Path(directory)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def load_image_tokenizer(vq_dir: str, cfg: LMDataConfig):
    """(tokenizer, fingerprint, tokenizer directory or None) for `vq_dir`, or the colour-grid stand-in."""
    if not vq_dir:
        log.warning("no vq_dir given: images are tokenised by a fixed colour-grid stand-in (smoke tests only)")
        tok = ColourGridTokenizer(cfg.grid_cells, cfg.grid_levels)
        return tok, tok.fingerprint, None
    import vqvae

    root = Path(vq_dir)
    tok_dir = root / "tokenizer" if (root / "tokenizer").is_dir() else root
    tok = vqvae.load_tokenizer(tok_dir)
    return tok, tokenizer_fingerprint(tok, tok_dir), tok_dir


def tokenizer_image_size(tokenizer) -> int | None:
    """The picture size an image tokenizer reads, or None where it takes any (the colour-grid stand-in)."""
    size = getattr(tokenizer, "image_size", None)
    return int(size) if size else None


def shapes_image_size(cfg: LMDataConfig, tokenizer, vq_dir: str) -> int:
    """The Shapes picture size: `cfg.image_size`, or with 0 the tokenizer's (64 for one without).

    An explicit size that differs from the tokenizer's is an error."""
    own = tokenizer_image_size(tokenizer)
    if not cfg.image_size:
        return own or 64
    if cfg.source == "shapes" and own and own != cfg.image_size:
        raise ValueError(
            f"data.image_size={cfg.image_size} but the image tokenizer in {vq_dir} reads {own} px pictures; "
            f"set data.image_size={own} or 0"
        )
    return cfg.image_size


def image_key(image: np.ndarray) -> bytes:
    """Content hash of one uint8 image (shape included)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(str(image.shape).encode())
    h.update(np.ascontiguousarray(image).tobytes())
    return h.digest()


class ImageCodeCache:
    """Image pixels -> VQ codes, computed once per (data, tokenizer) and kept on disk."""

    def __init__(self, tokenizer, keys: Sequence[bytes], codes: np.ndarray):
        self.tokenizer = tokenizer
        self.index = {k: i for i, k in enumerate(keys)}
        self.codes = codes
        self.misses = 0
        self._extra: dict[bytes, np.ndarray] = {}

    @classmethod
    def build(cls, tokenizer, images: Sequence[np.ndarray], path: Path, encode_batch: int = 64) -> "ImageCodeCache":
        """Loads `path` if present, else encodes `images` and writes it."""
        if path.exists():
            with np.load(path) as f:
                keys = [k.tobytes() for k in f["keys"]]
                codes = f["codes"]
            log.info("image codes: loaded %d from %s", len(keys), path)
            return cls(tokenizer, keys, codes)
        keys, unique = [], []
        seen = set()
        for im in images:
            k = image_key(im)
            if k not in seen:
                seen.add(k)
                keys.append(k)
                unique.append(im)
        codes = encode_images(tokenizer, unique, encode_batch)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp.npz")
        # Keys as raw uint8 rows: numpy byte strings would drop trailing zero bytes.
        key_rows = np.frombuffer(b"".join(keys), np.uint8).reshape(len(keys), -1) if keys else np.zeros((0, 16), np.uint8)
        np.savez(tmp, keys=key_rows, codes=codes)
        os.replace(tmp, path)
        log.info("image codes: encoded %d images into %s", len(keys), path)
        return cls(tokenizer, keys, codes)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        k = image_key(image)
        i = self.index.get(k)
        if i is not None:
            return self.codes[i]
        if k not in self._extra:
            # Not in the pre-built set (should not happen for the built-in sources): encode now, once.
            self.misses += 1
            if self.misses == 1:
                log.warning("an image outside the code cache was encoded on the fly")
            self._extra[k] = encode_images(self.tokenizer, [image], 1)[0]
        return self._extra[k]


def encode_images(tokenizer, images: Sequence[np.ndarray], batch: int) -> np.ndarray:
    """int32 [N, h, w] codes of equally-sized uint8 images, `batch` at a time."""
    if not images:
        return np.zeros((0, 1, 1), np.int32)
    out = []
    for i in range(0, len(images), batch):
        chunk = np.stack(images[i : i + batch]).astype(np.uint8)
        out.append(np.asarray(tokenizer.encode(chunk), np.int32))
    return np.concatenate(out)


def _data_fingerprint(images: Sequence[np.ndarray]) -> str:
    h = hashlib.sha1()
    for im in images:
        h.update(image_key(im))
    return h.hexdigest()[:12]


# --------------------------------------------------------------------------- document sources


def shapes_source(cfg: LMDataConfig, split: str, seed: int):
    """The Shapes task mixture of one split (chameleon_jax.data.shapes.mixture) configured by LMDataConfig."""
    from chameleon_jax.data.shapes.mixture import ShapesMixture

    weights = {"caption": cfg.caption_weight, "t2i": cfg.t2i_weight, "vqa": cfg.vqa_weight,
               "interleaved": cfg.interleaved_weight}
    n_examples = cfg.train_examples if split == cfg.train_split else cfg.eval_examples
    return ShapesMixture(split, cfg.image_size, weights, seed=seed, examples=n_examples,
                         backend=cfg.shapes_backend, interleaved_docs=cfg.interleaved_docs,
                         two_object_share=cfg.two_object_share if split == cfg.train_split else 0.0)


class JsonlSource:
    """User documents from a JSON Lines file, visited in a new seeded order every epoch."""

    def __init__(self, path: str, seed: int):
        from chameleon_jax.data import jsonl

        self.path = Path(path)
        self.name = "jsonl-" + hashlib.sha1(str(self.path.resolve()).encode()).hexdigest()[:8]
        self.docs = jsonl.load_jsonl(self.path, one_size=True)
        if not self.docs:
            raise ValueError(f"{self.path} holds no documents")
        self.seed = seed
        self._perm_epoch = -1
        self._perm = None

    def document(self, index: int):
        n = len(self.docs)
        epoch, i = divmod(index, n)
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(n)
            self._perm_epoch = epoch
        doc = self.docs[int(self._perm[i])]
        if "id" not in doc.meta:  # error messages name the file and the document's number in it
            doc = dataclasses.replace(doc, meta={**doc.meta, "source": str(self.path), "document": int(self._perm[i]) + 1})
        return doc

    def images(self) -> list[np.ndarray]:
        return [im for d in self.docs for im in d.images]

    def texts(self, num_docs: int) -> list[str]:
        return [s.text for d in self.docs for s in d.segments if s.text]


# --------------------------------------------------------------------------- packing iterator


class PackedIterator:
    """Packs one process's document sub-stream into rows, `rows` at a time; resumable.

    State: {"doc": k, "piece": j} = the next piece to place is piece j of this
    process's k-th document (global index k * process_count + process_index).
    """

    def __init__(
        self,
        encode: Callable[[int], EncodedDocument],
        seq_len: int,
        pad_id: int,
        overlong: str,
        rows: int,
        process_index: int = 0,
        process_count: int = 1,
    ):
        self.encode = encode
        self.seq_len = seq_len
        self.pad_id = pad_id
        self.overlong = overlong
        self.rows = rows
        self.process_index = process_index
        self.process_count = process_count
        self.doc = 0
        self.piece = 0
        self._cached: tuple[int, list[EncodedDocument]] | None = None

    def state(self) -> dict[str, int]:
        return {"doc": int(self.doc), "piece": int(self.piece)}

    def restore(self, state: Mapping[str, Any]) -> None:
        self.doc, self.piece = int(state["doc"]), int(state["piece"])
        self._cached = None

    def _pieces(self, k: int) -> list[EncodedDocument]:
        if self._cached is None or self._cached[0] != k:
            index = k * self.process_count + self.process_index
            self._cached = (k, fit_to_row(self.encode(index), self.seq_len, self.overlong))
        return self._cached[1]

    def next_local(self) -> dict[str, np.ndarray]:
        """This process's rows of the next batch: numpy arrays [rows, seq_len]."""
        packer = RowPacker(self.seq_len, self.pad_id)
        out = []
        while len(out) < self.rows:
            pieces = self._pieces(self.doc)
            if self.piece >= len(pieces):  # dropped document, or all of it placed
                self.doc, self.piece = self.doc + 1, 0
                continue
            piece = pieces[self.piece]
            if not packer.fits(piece):
                out.append(packer.take())
                continue
            packer.add(piece)
            self.piece += 1
        return stack_rows(out)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        while True:
            yield self.next_local()


def global_batch(local: Mapping[str, np.ndarray], sharding_for: Callable[[tuple], Any], global_rows: int):
    """Per-process rows -> global jax arrays [global_rows, T] laid out by `sharding_for(shape)`."""
    import jax

    out = {}
    for k, v in local.items():
        shape = (global_rows,) + v.shape[1:]
        out[k] = jax.make_array_from_process_local_data(sharding_for(shape), v, shape)
    return out


# --------------------------------------------------------------------------- the pipeline


class LMData:
    """Vocabulary, image codes, train/eval document sources and their packing iterators."""

    def __init__(self, cfg: LMDataConfig, seq_len: int, vocab: Vocabulary, image_tokenizer, tokenizer_dir,
                 train_source, eval_source, code_cache: ImageCodeCache):
        self.cfg = cfg
        self.seq_len = seq_len
        self.seq_cfg = dataclasses.replace(cfg.sequence, seq_len=seq_len)
        self.vocab = vocab
        self.image_tokenizer = image_tokenizer
        self.tokenizer_dir = tokenizer_dir
        self.train_source = train_source
        self.eval_source = eval_source
        self.codes = code_cache
        self._eval_cache: dict[tuple, list] = {}

    @classmethod
    def build(
        cls,
        cfg: LMDataConfig,
        *,
        run_dir: str | os.PathLike,
        vq_dir: str = "",
        seq_len: int | None = None,
        is_primary: bool = True,
    ) -> "LMData":
        """Loads sources, the image tokenizer and code cache; trains or loads the vocabulary.

        source=shards is read by chameleon_jax.data.grain_pipeline.ShardData (same interface)."""
        if cfg.source == "shards":
            raise ValueError("data.source=shards is read by chameleon_jax.data.grain_pipeline.ShardData.build")
        seq_len = int(seq_len or cfg.sequence.seq_len)
        run_dir = Path(run_dir)
        tokenizer, tok_fp, tok_dir = load_image_tokenizer(vq_dir, cfg)
        cfg = dataclasses.replace(cfg, image_size=shapes_image_size(cfg, tokenizer, vq_dir))
        if cfg.source == "shapes":
            train_src = shapes_source(cfg, cfg.train_split, cfg.seed)
            eval_src = shapes_source(cfg, cfg.eval_split, cfg.seed + 1) if cfg.eval_split else None
        elif cfg.source == "jsonl":
            if not cfg.jsonl_train:
                raise ValueError("source=jsonl needs data.jsonl_train")
            train_src = JsonlSource(cfg.jsonl_train, cfg.seed)
            eval_src = JsonlSource(cfg.jsonl_eval, cfg.seed + 1) if cfg.jsonl_eval else None
        else:
            raise ValueError(f"unknown data source {cfg.source!r}; expected 'shapes' or 'jsonl'")

        cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else _default_cache_dir()
        images = train_src.images() + (eval_src.images() if eval_src is not None else [])
        name = f"codes-{train_src.name}-{tok_fp}-{_data_fingerprint(images)}.npz"
        cache = ImageCodeCache.build(tokenizer, images, cache_dir / name, cfg.encode_batch)

        codebook = int(tokenizer.codebook_size)
        if cfg.vocab_dir:
            vocab = Vocabulary.load(cfg.vocab_dir)
        elif (run_dir / "vocab" / "vocab.json").exists():
            vocab = Vocabulary.load(run_dir / "vocab")
        else:
            texts = train_src.texts(cfg.vocab_corpus_docs)
            target = run_dir / "vocab" if is_primary else Path(_tempdir()) / "vocab"
            vocab = Vocabulary.train(texts, target, cfg.text_vocab_size, codebook)
        if vocab.codebook_size != codebook:
            raise ValueError(
                f"the vocabulary has {vocab.codebook_size} image codes but the image tokenizer has {codebook}"
            )
        return cls(cfg, seq_len, vocab, tokenizer, tok_dir, train_src, eval_src, cache)

    def encode(self, source, index: int) -> EncodedDocument:
        doc = source.document(index)
        return encode_document(doc, self.vocab, self.codes, self.seq_cfg, name=document_name(doc, index))

    def train_iterator(self, global_rows: int, process_index: int = 0, process_count: int = 1) -> PackedIterator:
        if global_rows % process_count:
            raise ValueError(f"global batch {global_rows} does not split over {process_count} processes")
        return PackedIterator(
            lambda i: self.encode(self.train_source, i), self.seq_len, self.vocab.pad_id,
            self.seq_cfg.overlong, global_rows // process_count, process_index, process_count,
        )

    def eval_local_batches(self, global_rows: int, process_index: int = 0, process_count: int = 1) -> list:
        """The fixed validation batches (this process's rows), built once and reused."""
        if self.eval_source is None:
            return []
        key = (global_rows, process_index, process_count)
        if key not in self._eval_cache:
            it = PackedIterator(
                lambda i: self.encode(self.eval_source, i), self.seq_len, self.vocab.pad_id,
                self.seq_cfg.overlong, global_rows // process_count, process_index, process_count,
            )
            self._eval_cache[key] = [it.next_local() for _ in range(self.cfg.eval_batches)]
        return self._eval_cache[key]


def _default_cache_dir() -> Path:
    from chameleon_jax.data.paths import data_dir

    return data_dir() / "lm_code_cache"


def _tempdir() -> str:
    import tempfile

    return tempfile.mkdtemp(prefix="chameleon_vocab_")

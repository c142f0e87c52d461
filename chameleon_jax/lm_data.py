"""What the language model reads: the data config, the image tokenizer it is tokenised with, global batches.

Training always reads pre-tokenised array_record shards through grain
(chameleon_jax.data.grain_pipeline.ShardData). `LMDataConfig.source` says where
they come from:
- "shards": folders written beforehand by `python -m train.tokenize` (the path for
  data sets of any size; several can be mixed by weight);
- "shapes" / "jsonl": `train.lm` tokenises the synthetic Shapes task mixture, or a
  JSON Lines file, into `<run_dir>/tokens/` once at start (train.lm_inputs), then
  reads those shards the same way. A resumed run reuses them.

`global_batch` assembles the global jax arrays from each process's rows.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from chameleon_jax.configlib import param
from chameleon_jax.sequence import SequenceConfig

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class LMDataConfig:
    """Where LM training documents come from and how they become rows."""

    source: str = param(
        "shapes", "document source: 'shards' (train.tokenize output), or 'shapes' (synthetic tasks) / 'jsonl' "
                  "(jsonl_train / jsonl_eval), which train.lm tokenises into <run_dir>/tokens/ at start")
    shards: str = param("", "source=shards: shard folder(s) of train.tokenize; several mixed by weight as DIR:W,DIR:W")
    eval_shards: str = param("", "source=shards: shard folder(s) for the validation loss; empty = no evaluation")
    workers: int = param(0, "grain worker processes building batches; 0 = in the training process")
    read_threads: int = param(
        0, "threads reading and decoding shard records ahead of the packer; 0 = read where the batches are built "
           "(fastest from local disk, where a thread's hand-off costs more than the read); raise for remote storage")
    image_size: int = param(0, "Shapes image side in pixels; 0 = the image tokenizer's own (64 for the stand-in)")
    train_split: str = param("train", "Shapes split to train on")
    eval_split: str = param("validation", "Shapes split for the validation loss; empty = no evaluation")
    train_examples: int = param(0, "Shapes examples in the train split; 0 = the data set's default (20000)")
    eval_examples: int = param(0, "Shapes examples in the eval split; 0 = the data set's default (1000)")
    train_docs: int = param(
        0, "Shapes documents tokenised for training; 0 = as many as `steps` read in one pass, estimated from the "
           "first documents' length (a longer run repeats them in a new order)")
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
    partial_prompt_share: float = param(
        0.0,
        "chance that a training t2i prompt leaves an object's colour or shape unsaid (\"a large circle\", "
        "\"a large red shape\"), so that colour and shape words each learn their own part of the picture; "
        "validation prompts name everything; 0 = never",
    )
    position_question_weight: float = param(
        1.0,
        "how much likelier a training VQA document asks where an object is than each other question about "
        "it (colour, shape, size), since position is the question the model learns last; validation "
        "documents keep them alike; 1 = all alike",
    )
    interleaved_docs: int = param(2000, "interleaved (edit) Shapes documents per split to draw from; 0 = one per example")
    jsonl_train: str = param("", "JSON Lines file of training documents (source=jsonl)")
    jsonl_eval: str = param("", "JSON Lines file of validation documents (source=jsonl); empty = no eval")
    sequence: SequenceConfig = param(SequenceConfig(), "sequence building and packing")
    text_vocab_size: int = param(512, "upper bound on sentencepiece pieces trained from the training text")
    vocab_dir: str = param("", "use this saved vocabulary instead of training one (e.g. an imported Chameleon one)")
    vocab_corpus_docs: int = param(4000, "training documents whose text trains the sentencepiece model")
    encode_batch: int = param(256, "pictures per VQ encode call while tokenising (source=shapes or jsonl)")
    grid_cells: int = param(8, "no vq_dir: the stand-in colour-grid tokenizer's cells per side")
    grid_levels: int = param(4, "no vq_dir: the stand-in tokenizer's levels per colour channel")
    eval_batches: int = param(4, "validation batches per evaluation (a fixed set, same every time)")
    prefetch: int = param(
        -1, "training batches packed ahead in a background thread while the device computes; 0 = off; -1 = 2 on "
            "an accelerator, off on a CPU (where the thread takes cores from the step)"
    )
    seed: int = param(0, "seed of the document stream (task mixture, examples, shuffling)")


# --------------------------------------------------------------------------- image tokenizers


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
    from chameleon_jax.data.grid_tokenizer import ColourGridTokenizer

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


def global_batch(local: Mapping[str, np.ndarray], sharding_for: Callable[[tuple], Any], global_rows: int):
    """Per-process rows -> global jax arrays [global_rows, T] laid out by `sharding_for(shape)`."""
    import jax

    out = {}
    for k, v in local.items():
        shape = (global_rows,) + v.shape[1:]
        out[k] = jax.make_array_from_process_local_data(sharding_for(shape), v, shape)
    return out

"""The shards `train.lm` reads: ready-made ones, or Shapes / JSON Lines documents tokenised at start.

    data_cfg = prepare(cfg, run_dir)    # data_cfg.source == "shards"
    data = ShardData.build(data_cfg, vq_dir=cfg.vq_dir, ...)

With data.source=shards nothing happens here. With "shapes" or "jsonl" the documents
go through `train.tokenize` once, with settings taken from the training config:

    <run_dir>/tokens/train/        the training documents, and vocab/ (trained there
                                   unless data.vocab_dir names one)
    <run_dir>/tokens/validation/   the validation documents, with the same vocabulary

The Shapes task mixture is endless, so a number of its documents is drawn:
data.train_docs, or with 0 as many as the run reads in one pass (steps x batch_size
rows of seq_len tokens, divided by the mean length of the first documents, plus a
margin; packed rows carry padding, so the run reads fewer). The validation set is
sized the same way for data.eval_batches batches.

A folder whose manifests record the same tokenisation settings is reused as it is (a
resumed or repeated run); one whose manifests record other settings is an error that
names them. An interrupted tokenisation continues where it stopped (train.tokenize
keeps finished shards). In a multi-process run every process tokenises its own share
and all wait for each other before training reads the shards.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path

import numpy as np

from chameleon_jax import configlib
from chameleon_jax.data.documents import DataError
from chameleon_jax.lm_data import LMDataConfig, shapes_image_size
from train import tokenize
from train.lm_config import LMTrainConfig

log = logging.getLogger("train.lm")

PROBE_DOCS = 256  # documents whose mean length sizes a Shapes draw
MARGIN = 1.05  # on that estimate, for the spread of a mean over PROBE_DOCS documents


def tokenize_configs(cfg: LMTrainConfig, run_dir: Path) -> tuple[tokenize.TokenizeConfig,
                                                                 tokenize.TokenizeConfig | None]:
    """The train.tokenize jobs for the training and validation documents (None: no validation set).

    Shapes draws are sized later (`_shapes_docs`); here they are 0."""
    d = cfg.data
    tokens = run_dir / "tokens"
    base = tokenize.TokenizeConfig(
        vq_dir=cfg.vq_dir, grid_cells=d.grid_cells, grid_levels=d.grid_levels, image_size=d.image_size or 64,
        text_vocab_size=d.text_vocab_size, vocab_corpus_docs=d.vocab_corpus_docs,
        text_weight=d.sequence.text_weight, image_weight=d.sequence.image_weight, encode_batch=d.encode_batch,
        progress=cfg.progress, num_processes=0, process_id=-1,
    )
    if d.source == "shapes":
        # Shapes pictures are a few KB and a document is drawn in tens of microseconds of Python, so
        # chunks of 2048 documents (a few MB) and two drawing threads keep the encoder and the threads
        # busy together: 72.6 against 87.7 s for the demo's first 120,000 documents with 256 and four.
        shapes = dataclasses.replace(
            base, source="shapes", shapes_backend=d.shapes_backend, caption_weight=d.caption_weight,
            t2i_weight=d.t2i_weight, vqa_weight=d.vqa_weight, interleaved_weight=d.interleaved_weight,
            interleaved_docs=d.interleaved_docs, shapes_docs=0, chunk_docs=2048, decode_threads=2,
        )
        train = dataclasses.replace(shapes, out_dir=str(tokens / "train"), vocab_dir=d.vocab_dir,
                                    shapes_split=d.train_split, shapes_examples=d.train_examples,
                                    two_object_share=d.two_object_share,
                                    partial_prompt_share=d.partial_prompt_share,
                                    position_question_weight=d.position_question_weight, seed=d.seed)
        val = None
        if d.eval_split:
            val = dataclasses.replace(shapes, out_dir=str(tokens / "validation"), shapes_split=d.eval_split,
                                      shapes_examples=d.eval_examples, two_object_share=0.0, seed=d.seed + 1,
                                      vocab_dir=str(tokens / "train" / "vocab"))
        return train, val
    if d.source == "jsonl":
        if not d.jsonl_train:
            raise configlib.ConfigError("data.source=jsonl needs data.jsonl_train")
        train = dataclasses.replace(base, source="jsonl", input=d.jsonl_train, out_dir=str(tokens / "train"),
                                    vocab_dir=d.vocab_dir)
        val = None
        if d.jsonl_eval:
            val = dataclasses.replace(base, source="jsonl", input=d.jsonl_eval, out_dir=str(tokens / "validation"),
                                      vocab_dir=str(tokens / "train" / "vocab"))
        return train, val
    raise configlib.ConfigError(f"unknown data.source {d.source!r}; expected 'shards', 'shapes' or 'jsonl'")


def prepare(cfg: LMTrainConfig, run_dir: Path) -> LMDataConfig:
    """cfg.data with source=shards, tokenising Shapes or JSON Lines documents into run_dir/tokens first."""
    if cfg.data.source == "shards":
        return cfg.data
    train, val = tokenize_configs(cfg, run_dir)
    rows_tokens = cfg.batch_size * cfg.data.sequence.seq_len
    _tokenise(train, cfg, "training", rows_tokens * cfg.steps, cfg.data.train_docs)
    if val is not None:
        _tokenise(val, cfg, "validation", rows_tokens * cfg.data.eval_batches)
    return dataclasses.replace(cfg.data, source="shards", shards=train.out_dir,
                               eval_shards=val.out_dir if val is not None else "")


def _tokenise(tcfg: tokenize.TokenizeConfig, cfg: LMTrainConfig, what: str, tokens_needed: int,
              docs: int = 0) -> None:
    """Runs (or reuses) one tokenisation job; a Shapes draw is `docs` documents, or sized for `tokens_needed`."""
    import jax

    out = Path(tcfg.out_dir)
    pidx, pcount = jax.process_index(), jax.process_count()
    manifest = out / f"manifest-{pidx:05d}-of-{pcount:05d}.json"
    recorded = json.loads(manifest.read_text())["config"] if manifest.exists() else None
    source = None
    if tcfg.source == "shapes":
        if recorded is not None:  # an estimated draw's size is recorded there: reuse it rather than estimate it again
            tcfg = dataclasses.replace(tcfg, shapes_docs=int(docs or recorded.get("shapes_docs", 0)))
        else:
            tcfg, source = _shapes_draw(tcfg, cfg, tokens_needed, docs)
    if recorded is not None:
        mine = configlib.to_dict(tcfg)
        differ = sorted(k for k in set(mine) | set(recorded)
                        if k not in tokenize.HOW_ONLY and mine.get(k) != recorded.get(k))
        if differ:
            raise configlib.ConfigError(
                f"{out} holds {what} documents tokenised with other settings ({', '.join(differ)}); "
                "pass overwrite=true or use another run_dir")
        log.info("reusing the tokenised %s documents in %s", what, out)
    else:
        log.info("tokenising the %s documents into %s", what, out)
        try:
            tokenize.run(tcfg, source)
        except tokenize.BadDocumentsError as e:  # the run folder (and its report) may not outlive this error
            listed = "; ".join(tokenize.describe_bad(b) for b in e.bad[:5])
            more = f" and {len(e.bad) - 5} more" if len(e.bad) > 5 else ""
            raise DataError(f"{len(e.bad)} {what} document(s) could not be read: {listed}{more}") from None
    if pcount > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"train.lm tokenised {what}")


def _shapes_draw(tcfg: tokenize.TokenizeConfig, cfg: LMTrainConfig, tokens_needed: int, docs: int):
    """(tcfg with shapes_docs set, the opened source): `docs` documents, or with 0 the estimate."""
    import jax

    from chameleon_jax.data.shapes.mixture import ShapesDocuments
    from chameleon_jax.sequence import SequenceConfig, encode_document

    tok, _ = tokenize.image_tokenizer(tcfg)
    mixture = tokenize.shapes_mixture(tcfg, shapes_image_size(cfg.data, tok, cfg.vq_dir))
    if docs:
        n = docs
    else:
        out = Path(tcfg.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        vocab = tokenize.vocabulary(tcfg, ShapesDocuments(mixture, tcfg.vocab_corpus_docs), out,
                                    int(tok.codebook_size), primary=jax.process_index() == 0)
        codes = np.zeros((int(tok.codes_per_image),), np.int32)
        seq = SequenceConfig(text_weight=tcfg.text_weight, image_weight=tcfg.image_weight)
        lengths = [len(encode_document(mixture.document(i), vocab, lambda _: codes, seq)) for i in range(PROBE_DOCS)]
        n = max(PROBE_DOCS, math.ceil(tokens_needed / float(np.mean(lengths)) * MARGIN))
        log.info("drawing %d Shapes %s documents (mean length %.1f tokens over the first %d; %d tokens to read)",
                 n, tcfg.shapes_split, float(np.mean(lengths)), PROBE_DOCS, tokens_needed)
    tcfg = dataclasses.replace(tcfg, shapes_docs=int(n))
    return tcfg, ShapesDocuments(mixture, int(n))

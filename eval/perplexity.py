"""Perplexity per modality on a Shapes split: text targets and image-code targets separately.

Documents are the four tasks of each picture (caption, text-to-image, every VQA
question, and an edit story), tokenised exactly as in training, packed into
rows of the model's context and scored with teacher forcing. Only target
tokens count (prompts carry no weight), as in the training loss.

`python -m eval.perplexity run_dir=runs/demo` writes `<run_dir>/eval/perplexity.json`.
On a mesh (`mesh.*`) the rows are split over the data axes like a training batch
(every process builds the same rows and places the ones its devices hold).
"""

from __future__ import annotations

import math

import jax
import numpy as np
from flax import nnx

from chameleon_jax.data import shapes
from chameleon_jax.generation.placement import Placement, fetch
from chameleon_jax.losses import lm_loss_sums
from chameleon_jax.sequence import SequenceConfig, encode_document, fit_to_row, pack
from chameleon_jax.sharding import use_mesh
from eval import common


def task_documents(examples: list, split: str) -> list:
    rng = np.random.default_rng(0)
    docs = []
    for ex in examples:
        docs += [shapes.caption_document(ex, rng), shapes.t2i_document(ex, rng), *shapes.vqa_documents(ex),
                 shapes.edit_document(ex, split)]
    return docs


def evaluate(pipe, cfg: common.EvalConfig) -> dict:
    cfg = common.for_pipeline(cfg, pipe)
    model, vocab = pipe.model, pipe.vocab
    seq_len = int(model.cfg.max_seq_len)
    seq_cfg = SequenceConfig(seq_len=seq_len, overlong="split")
    codes_of = lambda img: pipe.encode_images(img[None])[0]  # noqa: E731
    pieces = []
    for doc in task_documents(common.load_examples(cfg), cfg.split):
        pieces += fit_to_row(encode_document(doc, vocab, codes_of, seq_cfg), seq_len, "split")
    batch = pack(pieces, seq_len, vocab.pad_id)

    graphdef, state = nnx.split(model)
    placement = None if getattr(pipe, "mesh", None) is None else Placement.of(pipe.mesh, pipe.rules)
    batch_size = cfg.batch_size
    if placement is not None:  # whole rows per data shard
        batch_size = placement.row_shards * -(-batch_size // placement.row_shards)

    def loss_sums(state, rows):
        logits = nnx.merge(graphdef, state)(rows["tokens"], rows["positions"], rows["segment_ids"])
        return lm_loss_sums(logits, rows["targets"], rows["loss_weights"], rows["modality"], 0.0)

    sums = jax.jit(loss_sums)
    total: dict[str, float] = {}
    n_rows = batch["tokens"].shape[0]
    for i in range(0, n_rows, batch_size):
        rows = {k: v[i : i + batch_size] for k, v in batch.items()}
        pad = batch_size - rows["tokens"].shape[0]
        if pad:  # keep one compiled shape: padding rows carry zero weight
            rows = {k: np.concatenate([v, np.zeros((pad, *v.shape[1:]), v.dtype)]) for k, v in rows.items()}
        if placement is not None:
            rows = {k: jax.make_array_from_callback(v.shape, placement.rows(v.shape), lambda idx, v=v: v[idx])
                    for k, v in rows.items()}
            with use_mesh(placement.mesh, placement.rules):  # the model's activation constraints apply
                out = sums(state, rows)
        else:
            out = sums(state, rows)
        for k, v in out.items():
            total[k] = total.get(k, 0.0) + float(fetch(v))
    text_nll = total["text_ce_sum"] / max(total["text_weight_sum"], 1e-9)
    image_nll = total["image_ce_sum"] / max(total["image_weight_sum"], 1e-9)
    return {
        "text_perplexity": math.exp(text_nll),
        "image_perplexity": math.exp(image_nll),
        "text_nll": text_nll,
        "image_nll": image_nll,
        "target_tokens": int(total["weight_sum"]),
        "num_rows": n_rows,
    }


if __name__ == "__main__":
    common.cli("perplexity", evaluate, num_examples=100, batch_size=8)

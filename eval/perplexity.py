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

import numpy as np

from chameleon_jax.data import shapes
from chameleon_jax.losses import lm_loss_sums
from chameleon_jax.scoring import score_rows
from chameleon_jax.sequence import SequenceConfig, encode_document, fit_to_row, pack
from eval import common


def task_documents(examples: list, split: str) -> list:
    rng = np.random.default_rng(0)
    docs = []
    for ex in examples:
        docs += [shapes.caption_document(ex, rng), shapes.t2i_document(ex, rng), *shapes.vqa_documents(ex),
                 shapes.edit_document(ex, split)]
    return docs


def _loss_sums(logits, rows):
    return lm_loss_sums(logits, rows["targets"], rows["loss_weights"], rows["modality"], 0.0)


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

    total: dict[str, float] = {}
    for out in score_rows(pipe, batch, cfg.batch_size, _loss_sums):
        for k, v in out.items():
            total[k] = total.get(k, 0.0) + float(v)
    n_rows = batch["tokens"].shape[0]
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

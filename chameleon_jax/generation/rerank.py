"""Best of n pictures, judged by the model itself: keep the picture whose prompt it reads likeliest as a caption.

A text-to-image model that was also trained to caption can score its own drawings: for
each candidate picture of a prompt, the negative log-likelihood of the prompt's text
written as the picture's caption ([picture] -> text, the captioning documents' layout,
loss on the text and its end only). The candidate with the lowest is kept. Reading is
easier than writing: on the Shapes demo a model that draws a held-out (colour, shape)
pair right less than half the time still prefers the right picture of that pair over the
same colour in another shape about nine times in ten (docs/experiments.md).

This module only scores and chooses; the caller draws the candidates with the usual
decoding (`eval.t2i.draw_best_of`: the first with its own settings, greedy by default,
the others sampled, so choosing only adds pictures and never drops the greedy one).
"""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
import numpy as np

from chameleon_jax.data.documents import Document, Segment
from chameleon_jax.losses import token_cross_entropy
from chameleon_jax.scoring import score_rows
from chameleon_jax.sequence import SequenceConfig, encode_document, pack, stack_rows


def caption_nll(pipe, images: Sequence[np.ndarray | None], texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
    """float64 [n]: the NLL of `texts[i]` as the caption of `images[i]` (inf where the image is None).

    Each (picture, text) pair is one row of its own, the picture read through the pipeline's
    image tokenizer as captioning reads it. Rows share one length (the longest pair rounded
    up to a multiple of 16), so a batch of pairs compiles once.
    """
    if len(images) != len(texts):
        raise ValueError(f"caption_nll: {len(images)} images but {len(texts)} texts")
    keep = [i for i, img in enumerate(images) if img is not None]
    out = np.full(len(images), np.inf)
    if not keep:
        return out
    codes = pipe.encode_images(np.stack([images[i] for i in keep]))
    code_of = {i: c for i, c in zip(keep, codes)}
    seq_cfg = SequenceConfig(seq_len=int(pipe.model.cfg.max_seq_len), overlong="error")
    pieces = [
        encode_document(Document((Segment(image=images[i], is_target=False), Segment(text=texts[i])), task="caption"),
                        pipe.vocab, lambda _img, i=i: code_of[i], seq_cfg)
        for i in keep
    ]
    longest = max(p.slots for p in pieces)
    row_len = min(seq_cfg.seq_len, -(-longest // 16) * 16)
    batch = stack_rows([_one_row(p, row_len, pipe.vocab.pad_id) for p in pieces])
    sums = np.concatenate(score_rows(pipe, batch, batch_size, _row_sums))[: len(keep)]
    out[keep] = sums
    return out


def _row_sums(logits, rows):
    """float32 [B]: each row's summed, loss-weighted cross-entropy (module level: one compiled program)."""
    ce_bt, _ = token_cross_entropy(logits, rows["targets"])
    return jnp.sum(ce_bt * rows["loss_weights"].astype(jnp.float32), axis=-1)


def _one_row(piece, row_len: int, pad_id: int) -> dict[str, np.ndarray]:
    row = pack([piece], row_len, pad_id, num_rows=1)
    return {k: v[0] for k, v in row.items()}


def choose(nll_kn: np.ndarray) -> np.ndarray:
    """int [n]: for each prompt, the candidate (row of `nll_kn` [k, n]) with the lowest NLL; ties keep the earliest."""
    return np.argmin(np.asarray(nll_kn), axis=0)

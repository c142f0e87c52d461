"""Image codes that share parameters through their digits: an option, off in Chameleon.

An FSQ tokenizer's code is a tuple of digits, one per latent channel (levels 8, 8, 8
make 512 codes; code = d0 + 8 d1 + 64 d2). Codes that share a digit share a value of
one latent channel, so they look alike in some way (a hue, an edge, a size). The
transformer's own tables give every code an independent row, and a code it rarely
saw in some context (a held-out colour-and-shape pair draws codes it has seen mostly
elsewhere) has a row trained for other contexts only.

With `ModelConfig.image_code_digits = levels`, each image code also gets, added to
its input embedding and to its output weights, the sum of one learned row per digit:
[sum(levels), embed] tables in, [embed, sum(levels)] out. A code's logit is then its
own term plus one term per digit value, and what the model learns about a digit value
holds for every code that carries it. Text ids and the specials get nothing added.

The image codes must be one contiguous block of ids starting at
`ModelConfig.image_code_offset` (as in the vocabularies this project trains; train.lm
fills both fields from the vocabulary and the tokenizer).
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from chameleon_jax.layers import make_param, normal
from vqvae.quantizers import fsq_digits


def digit_matrix(levels: Sequence[int], offset: int, vocab_size: int) -> np.ndarray:
    """float32 [vocab_size, sum(levels)]: row `offset + c` has a one at each digit value of
    code c (digit j of c in the j-th block of columns); every other row is zero."""
    levels = tuple(int(n) for n in levels)
    codes = math.prod(levels)
    if offset < 0 or offset + codes > vocab_size:
        raise ValueError(f"image codes [{offset}, {offset + codes}) of levels {levels} do not fit a vocabulary of "
                         f"{vocab_size} ids")
    out = np.zeros((vocab_size, sum(levels)), np.float32)
    column_bd = fsq_digits(np.arange(codes), levels) + np.cumsum((0,) + tuple(levels)[:-1])  # digit j's value -> column
    np.put_along_axis(out[offset:offset + codes], column_bd, 1.0, axis=1)
    return out


def own_column_mask(levels: Sequence[int], offset: int, vocab_size: int) -> np.ndarray:
    """float32 [vocab_size]: 0 at the image codes' ids, 1 elsewhere (which output columns a
    digits-only head keeps)."""
    keep = np.ones((vocab_size,), np.float32)
    keep[offset:offset + math.prod(levels)] = 0.0
    return keep


class CodeDigitEmbed(nnx.Module):
    """Per-digit rows added to the image codes' rows of the embedding table
    (`embedding_table`) and columns of the output projection (`head_weight`).

    With `own_logits=False` an image code's own output column is dropped: its logit is
    the sum of its digit terms alone, so the distribution over codes factorises into one
    distribution per digit and nothing the head learns belongs to a single code.
    """

    def __init__(self, levels: Sequence[int], offset: int, vocab_size: int, dim: int, *, init_std: float,
                 param_dtype, rngs: nnx.Rngs, own_logits: bool = True):
        self.levels = tuple(int(n) for n in levels)
        self.offset = int(offset)
        self.vocab_size = int(vocab_size)
        self.own_logits = bool(own_logits)
        digit_matrix(self.levels, self.offset, self.vocab_size)  # checks the block fits the vocabulary
        width = sum(self.levels)
        self.input_ld = make_param(rngs, normal(init_std), (width, dim), ("code_digits", "embed"), param_dtype)
        self.output_dl = make_param(rngs, normal(init_std), (dim, width), ("embed", "code_digits"), param_dtype)

    def embedding_table(self, table_vd: jax.Array) -> jax.Array:
        """The token embedding table with each image code's digit rows added."""
        return fold_embedding(table_vd, self.input_ld[...], self.levels, self.offset)

    def head_weight(self, w_dv: jax.Array) -> jax.Array:
        """The output projection with each image code's digit columns added (and, without
        own logits, the codes' own columns zeroed first; they then get no gradient)."""
        return fold_head(w_dv, self.output_dl[...], self.levels, self.offset, self.own_logits)


# The digit terms are linear in the tables, so the model adds them to its embedding table
# and output projection (weight-sized work, once a call) rather than to every token's
# embedding and logits: the per-token form is two products with 24-wide operands, which
# run far below a CPU's matmul speed, plus a pass over the [tokens, vocab] logits.


def fold_embedding(table_vd, input_ld, levels: Sequence[int], offset: int):
    """table [vocab, embed] + the digit rows of every image code, in float32, as table's dtype."""
    table_vd = jnp.asarray(table_vd)
    m_vl = jnp.asarray(digit_matrix(levels, offset, table_vd.shape[0]))
    rows_vd = jnp.matmul(m_vl, jnp.asarray(input_ld, jnp.float32), precision=jax.lax.Precision.HIGHEST)
    return (table_vd.astype(jnp.float32) + rows_vd).astype(table_vd.dtype)


def fold_head(w_dv, output_dl, levels: Sequence[int], offset: int, own_logits: bool = True):
    """w [embed, vocab] + the digit columns of every image code (with `own_logits=False`
    the codes' own columns of w dropped first), in float32, as w's dtype."""
    w_dv = jnp.asarray(w_dv)
    vocab_size = w_dv.shape[1]
    m_vl = jnp.asarray(digit_matrix(levels, offset, vocab_size))
    w32 = w_dv.astype(jnp.float32)
    if not own_logits:
        w32 = w32 * jnp.asarray(own_column_mask(levels, offset, vocab_size))
    cols_dv = jnp.matmul(jnp.asarray(output_dl, jnp.float32), m_vl.T, precision=jax.lax.Precision.HIGHEST)
    return (w32 + cols_dv).astype(w_dv.dtype)


def fold(levels: Sequence[int], offset: int, params: dict, own_logits: bool = True) -> dict:
    """The same model without the digit tables: a copy of a pure-dict parameter tree whose
    token embedding and output projection include the digit rows, and no `code_digits`.

    The digit terms are linear in the tables, so folding them in gives the same logits;
    the result is a plain Chameleon parameter tree (for export to other implementations).
    `own_logits=False` (a digits-only head) drops the image codes' own output columns first.
    """
    params = dict(params)
    digits = params.pop("code_digits")
    embed, head = dict(params["embed"]), dict(params["lm_head"])
    table, w = np.asarray(embed["embedding_vd"]), np.asarray(head["w_dv"])
    embed["embedding_vd"] = np.asarray(fold_embedding(table.astype(np.float32), digits["input_ld"], levels,
                                                      offset)).astype(table.dtype)
    head["w_dv"] = np.asarray(fold_head(w.astype(np.float32), digits["output_dl"], levels, offset,
                                        own_logits)).astype(w.dtype)
    params["embed"], params["lm_head"] = embed, head
    return params

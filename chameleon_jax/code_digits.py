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

from chameleon_jax.layers import dense, make_param, normal
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
    """Per-digit rows added to the image codes' embeddings (`embed`) and logits (`logits`).

    With `own_logits=False` an image code's own output column is dropped: its logit is
    the sum of its digit terms alone, so the distribution over codes factorises into one
    distribution per digit and nothing the head learns belongs to a single code.
    """

    def __init__(self, levels: Sequence[int], offset: int, vocab_size: int, dim: int, *, init_std: float, dtype,
                 param_dtype, rngs: nnx.Rngs, own_logits: bool = True, matmul_dtype=None):
        self.levels = tuple(int(n) for n in levels)
        self.offset = int(offset)
        self.vocab_size = int(vocab_size)
        self.own_logits = bool(own_logits)
        self.dtype = dtype
        self.matmul_dtype = matmul_dtype
        digit_matrix(self.levels, self.offset, self.vocab_size)  # checks the block fits the vocabulary
        width = sum(self.levels)
        self.input_ld = make_param(rngs, normal(init_std), (width, dim), ("code_digits", "embed"), param_dtype)
        self.output_dl = make_param(rngs, normal(init_std), (dim, width), ("embed", "code_digits"), param_dtype)

    def _matrix(self) -> jax.Array:
        # A trace-time constant: XLA folds the gathers and products with it.
        return jnp.asarray(digit_matrix(self.levels, self.offset, self.vocab_size))

    def embed(self, tokens_bt: jax.Array) -> jax.Array:
        """[B, T, embed]: the sum of each image code's digit rows; zero for every other id."""
        onehot_btl = jnp.take(self._matrix(), tokens_bt, axis=0)
        return dense(onehot_btl.astype(self.dtype), self.input_ld[...].astype(self.dtype),
                     operand_dtype=self.matmul_dtype)

    def logits(self, x_btd: jax.Array) -> jax.Array:
        """float32 [B, T, vocab]: each image code's digit terms x . w_j[d_j(code)]; zero for other ids."""
        per_digit_btl = dense(x_btd.astype(self.dtype), self.output_dl[...].astype(self.dtype), jnp.float32,
                              self.matmul_dtype)
        return per_digit_btl @ self._matrix().T

    def add_to(self, head_logits_btv: jax.Array, x_btd: jax.Array) -> jax.Array:
        """The output head's logits with the digit terms added (and, without own logits,
        the image codes' own columns zeroed first; they then get no gradient)."""
        if not self.own_logits:
            keep_v = jnp.asarray(own_column_mask(self.levels, self.offset, self.vocab_size))
            head_logits_btv = head_logits_btv * keep_v.astype(head_logits_btv.dtype)
        return head_logits_btv + self.logits(x_btd)


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
    m_vl = digit_matrix(levels, offset, np.shape(embed["embedding_vd"])[0])
    input_ld, output_dl = np.asarray(digits["input_ld"], np.float32), np.asarray(digits["output_dl"], np.float32)
    table, w = np.asarray(embed["embedding_vd"]), np.asarray(head["w_dv"])
    embed["embedding_vd"] = (table.astype(np.float32) + m_vl @ input_ld).astype(table.dtype)
    if not own_logits:
        w = w * own_column_mask(levels, offset, w.shape[1]).astype(w.dtype)
    head["w_dv"] = (w.astype(np.float32) + output_dl @ m_vl.T).astype(w.dtype)
    params["embed"], params["lm_head"] = embed, head
    return params

"""Learned positions of image codes within their image: an option, off in Chameleon.

Chameleon gives every token one RoPE position in the sequence and nothing else.
A text token asking about "the shape in the top left" must then find the codes
of that corner by their distance from itself, and that distance changes with
every prompt. With `ModelConfig.image_positions = n`, each token between `<boi>`
and `<eoi>` also gets row `i` of a learned [n, embed] table added to its token
embedding, where `i` is its index in the image (0 for the first code): the
code's cell on the tokenizer's grid, the same in every document. RoPE is
unchanged; text tokens, `<boi>` and `<eoi>` get nothing added.

The index is read from the tokens themselves (`image_index`), so training,
evaluation and prefill need no extra input; the decode loop passes the index of
the one token it feeds (it already counts the codes of the open image).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from chameleon_jax.layers import make_param, normal


def image_index(tokens_bt: jax.Array, *, boi_id: int, eoi_id: int,
                segment_ids_bt: jax.Array | None = None) -> jax.Array:
    """int32 [B, T]: each token's index in the image it lies in (0 = the code right after
    `<boi>`), -1 outside images (text, `<boi>`, `<eoi>`, padding).

    A token lies in an image when the last `<boi>` before it in its row comes after
    the last `<eoi>`, and (with packing) belongs to the same segment. An image cut
    off by the start of the row has no `<boi>` in it, so its codes get -1.
    """
    t = tokens_bt.shape[1]
    pos_bt = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), tokens_bt.shape)
    last_boi_bt = jax.lax.cummax(jnp.where(tokens_bt == boi_id, pos_bt, -1), axis=1)
    last_eoi_bt = jax.lax.cummax(jnp.where(tokens_bt == eoi_id, pos_bt, -1), axis=1)
    inside_bt = (last_boi_bt > last_eoi_bt) & (pos_bt > last_boi_bt)
    if segment_ids_bt is not None:
        opener_segment_bt = jnp.take_along_axis(segment_ids_bt, jnp.maximum(last_boi_bt, 0), axis=1)
        inside_bt &= opener_segment_bt == segment_ids_bt
    return jnp.where(inside_bt, pos_bt - last_boi_bt - 1, -1).astype(jnp.int32)


class ImagePositionEmbed(nnx.Module):
    """Table [image_positions, embed]; row i is added to the i-th code of every image."""

    def __init__(self, rows: int, dim: int, *, init_std: float, dtype, param_dtype, rngs: nnx.Rngs):
        self.rows = rows
        self.dtype = dtype
        self.embedding_nd = make_param(rngs, normal(init_std), (rows, dim), ("image_positions", "embed"), param_dtype)

    def __call__(self, index_bt: jax.Array) -> jax.Array:
        """[B, T, embed]: the rows of index_bt, zero where it is negative or past the table."""
        valid_bt = (index_bt >= 0) & (index_bt < self.rows)
        rows_btd = jnp.take(self.embedding_nd[...], jnp.clip(index_bt, 0, self.rows - 1), axis=0)
        return jnp.where(valid_bt[..., None], rows_btd, 0).astype(self.dtype)

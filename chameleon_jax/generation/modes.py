"""The per-row text/image state machine that runs inside the compiled decode loop.

Each batch row is in text mode or image mode and carries how many image codes
it still owes. At every step the machine says which tokens the row may emit
(`allowed_tokens`), which token it must emit (`forced_tokens`), and moves on
once the token is chosen (`advance`):

- text mode: text tokens (the vocabulary's text mask, which holds `<eos>` and
  end-of-turn); `<boi>` only while a whole image (`<boi>`, codes_per_image
  codes, `<eoi>`) still fits in the steps left; a stop token ends the row.
- image mode: image codes only; after exactly codes_per_image of them `<eoi>`
  is forced and the row returns to text mode.
- modality "image": the first token is `<boi>` and the row ends after its
  `<eoi>`; "text": `<boi>` is never allowed; "any": the model chooses.
- a finished row emits `<pad>` until the loop ends.

Everything here is jnp on [B] arrays; the ids come from the Vocabulary via
`token_tables`, so no id arithmetic happens in the loop.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

TEXT = 0
IMAGE = 1
MODALITIES = ("text", "image", "any")


class TokenTables(NamedTuple):
    """The vocabulary's layout as device arrays over the model's (possibly padded) vocabulary."""

    text_v: jax.Array  # bool [V]: ids text mode may emit (no <boi>/<eoi>/<pad>/<bos>/image codes)
    image_v: jax.Array  # bool [V]: image-code ids
    stop_v: jax.Array  # bool [V]: ids that end a row in text mode (<eos>, and end-of-turn if asked)
    pad_id: jax.Array  # int32 scalars from here on
    bos_id: jax.Array
    boi_id: jax.Array
    eoi_id: jax.Array


def token_tables(vocab, model_vocab_size: int, *, stop_at_eot: bool = True, ignore_eos: bool = False) -> TokenTables:
    """Builds the tables from a Vocabulary; ids past vocab.size (model padding) are never allowed.

    ignore_eos drops the stop tokens from what text mode may emit, so rows run
    to max_new_tokens (benchmarks).
    """
    if model_vocab_size < vocab.size:
        raise ValueError(f"the model's vocab_size {model_vocab_size} is smaller than the vocabulary's {vocab.size}")

    def widen(mask):
        out = np.zeros([model_vocab_size], bool)
        out[: vocab.size] = np.asarray(mask, bool)
        return out

    text_v = widen(vocab.text_token_mask)
    image_v = widen(vocab.image_token_mask)
    stop_v = np.zeros([model_vocab_size], bool)
    stop_v[vocab.eos_id] = True
    eot_id = getattr(vocab, "eot_id", None)
    if stop_at_eot and eot_id is not None and eot_id >= 0:
        stop_v[eot_id] = True
    for special in (vocab.pad_id, vocab.bos_id, vocab.boi_id, vocab.eoi_id):
        text_v[special] = False
    text_v &= ~image_v
    if ignore_eos:
        text_v &= ~stop_v
    if not text_v.any():
        raise ValueError("the vocabulary leaves no token that text mode may emit")
    i32 = lambda x: jnp.asarray(x, jnp.int32)
    return TokenTables(
        jnp.asarray(text_v), jnp.asarray(image_v), jnp.asarray(stop_v),
        i32(vocab.pad_id), i32(vocab.bos_id), i32(vocab.boi_id), i32(vocab.eoi_id),
    )


class RowState(NamedTuple):
    mode_b: jax.Array  # int32 [B]: TEXT or IMAGE
    codes_left_b: jax.Array  # int32 [B]: image codes still to emit in the current image
    done_b: jax.Array  # bool [B]
    num_images_b: jax.Array  # int32 [B]: images started so far


def init_state(batch: int) -> RowState:
    zeros = jnp.zeros([batch], jnp.int32)
    return RowState(zeros + TEXT, zeros, jnp.zeros([batch], bool), zeros)


def _onehot(token_id: jax.Array, vocab: int) -> jax.Array:
    return jnp.arange(vocab, dtype=jnp.int32) == token_id


def boi_allowed(step: jax.Array, *, limit: int, codes_per_image: int, modality: str) -> jax.Array:
    """Whether a row in text mode may open an image at generated-token index `step`.

    The image needs 1 + codes_per_image + 1 tokens from this one on, and only
    `limit - step` remain (limit = max new tokens, already cut to the context).
    """
    if modality == "text" or codes_per_image <= 0:
        return jnp.asarray(False)
    return (limit - step) >= codes_per_image + 2


def allowed_tokens(state: RowState, tables: TokenTables, step: jax.Array, *, limit: int, codes_per_image: int,
                   modality: str) -> jax.Array:
    """bool [B, V]: what each row may emit as generated token number `step` (0-based)."""
    vocab = tables.text_v.shape[0]
    boi_v = _onehot(tables.boi_id, vocab)
    boi_ok = boi_allowed(step, limit=limit, codes_per_image=codes_per_image, modality=modality)
    if modality == "image":
        text_v = boi_v & boi_ok
    else:
        text_v = tables.text_v | (boi_v & boi_ok)
    image_bv = jnp.where((state.codes_left_b > 0)[:, None], tables.image_v[None], _onehot(tables.eoi_id, vocab)[None])
    allowed_bv = jnp.where((state.mode_b == IMAGE)[:, None], image_bv, text_v[None])
    return jnp.where(state.done_b[:, None], _onehot(tables.pad_id, vocab)[None], allowed_bv)


def forced_tokens(state: RowState, tables: TokenTables, step: jax.Array, *, modality: str) -> jax.Array:
    """int32 [B]: the token a row must emit regardless of its logits, or -1 where it may choose."""
    forced_b = jnp.full(state.mode_b.shape, -1, jnp.int32)
    if modality == "image":
        forced_b = jnp.where((state.mode_b == TEXT) & (step == 0), tables.boi_id, forced_b)
    forced_b = jnp.where((state.mode_b == IMAGE) & (state.codes_left_b <= 0), tables.eoi_id, forced_b)
    return jnp.where(state.done_b, tables.pad_id, forced_b)


def code_index(state: RowState, token_b: jax.Array, tables: TokenTables, *, codes_per_image: int) -> jax.Array:
    """int32 [B]: the index in its image of token_b, which `advance` has already counted into
    `state` (0 for an image's first code), or -1 where it is no code (text, <boi>, <eoi>, <pad>)."""
    is_code_b = (state.mode_b == IMAGE) & tables.image_v[token_b]
    return jnp.where(is_code_b, codes_per_image - state.codes_left_b - 1, -1)


def advance(state: RowState, token_b: jax.Array, tables: TokenTables, step: jax.Array, *, limit: int,
            codes_per_image: int, modality: str) -> RowState:
    """The state after each row emitted token_b as generated token number `step`."""
    live_b = ~state.done_b
    in_text_b = live_b & (state.mode_b == TEXT)
    in_image_b = live_b & (state.mode_b == IMAGE)
    opens_b = in_text_b & (token_b == tables.boi_id)
    stops_b = in_text_b & tables.stop_v[token_b]
    is_code_b = in_image_b & tables.image_v[token_b]
    closes_b = in_image_b & (token_b == tables.eoi_id)
    mode_b = jnp.where(opens_b, IMAGE, jnp.where(closes_b, TEXT, state.mode_b))
    codes_left_b = jnp.where(opens_b, codes_per_image, state.codes_left_b - is_code_b.astype(jnp.int32))
    done_b = state.done_b | stops_b | (step + 1 >= limit)
    if modality == "image":
        done_b = done_b | closes_b
    return RowState(mode_b, codes_left_b, done_b, state.num_images_b + opens_b.astype(jnp.int32))

"""Small models and vocabularies the generation tests share, plus checks of the fixtures themselves."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from chameleon_jax.config import ModelConfig
from chameleon_jax.transformer import Transformer
from chameleon_jax.vocab import Vocabulary

ALPHABET = "abcdefghijklmnopqrstuvwxyz .,!?"
CODEBOOK = 27  # image codes in the toy vocabulary (3 levels per colour channel)
CODES_PER_IMAGE = 9  # a 3x3 code grid per image
PAD, BOS, EOS, BOI, EOI, EOT = range(6)


class CharText:
    """A character-level text backend: one id per character of ALPHABET."""

    def __init__(self, offset: int):
        self.offset = offset

    def encode(self, text: str) -> list[int]:
        return [self.offset + ALPHABET.index(c) for c in text.lower() if c in ALPHABET]

    def decode(self, ids) -> str:
        return "".join(ALPHABET[int(i) - self.offset] for i in ids)


def toy_vocab() -> Vocabulary:
    """Six specials, the alphabet, then CODEBOOK image codes (in reverse order, so code != id - offset)."""
    text_end = 6 + len(ALPHABET)
    size = text_end + CODEBOOK
    piece_mask = np.zeros([size], bool)
    piece_mask[6:text_end] = True
    return Vocabulary(
        kind="toy", size=size, specials=dict(pad=PAD, bos=BOS, eos=EOS, boi=BOI, eoi=EOI, eot=EOT),
        code_to_id=np.arange(size - 1, text_end - 1, -1, dtype=np.int32), text_piece_mask=piece_mask,
        text_backend=CharText(6),
    )


class PatchTokenizer:
    """A fixed toy image tokenizer: 12 px images, a 3x3 grid of 4x4 patches, each patch's mean
    colour quantised to 3 levels per channel (27 codes). Decoding paints the patches."""

    image_size = 12
    grid = (3, 3)
    codes_per_image = CODES_PER_IMAGE
    codebook_size = CODEBOOK

    def __init__(self, can_decode: bool = True):
        self.can_decode = can_decode

    def encode(self, images_bhwc):
        x = np.asarray(images_bhwc, np.float32).reshape(-1, 3, 4, 3, 4, 3).mean(axis=(2, 4))
        q = np.clip(np.rint(x / 127.5), 0, 2).astype(np.int32)
        return (q[..., 0] * 3 + q[..., 1]) * 3 + q[..., 2]

    def decode(self, codes_bhw):
        if not self.can_decode:
            raise ValueError("no decoder")
        c = np.asarray(codes_bhw, np.int32)
        rgb = np.stack([c // 9, (c // 3) % 3, c % 3], -1) * 127.5
        return np.clip(rgb, 0, 255).astype(np.uint8).repeat(4, axis=1).repeat(4, axis=2)


def tiny_model(seed: int = 0, **overrides) -> Transformer:
    """A random 2-layer Transformer over a 64-id vocabulary (the toy vocabulary uses 61)."""
    cfg = ModelConfig(vocab_size=64, hidden_dim=32, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16,
                      ffn_dim=64, max_seq_len=96, initializer_range=0.5)
    cfg = dataclasses.replace(cfg, **overrides)
    return Transformer(cfg, rngs=nnx.Rngs(seed))


class Biased(nnx.Module):
    """Wraps a model and adds `bias_fn(predicted_position_bt) -> [B, T, V]` to its logits.

    The predicted position is the position of the token the logits choose
    (fed position + 1), so a test can steer what is generated where.
    """

    def __init__(self, inner, bias_fn):
        self.inner = inner
        self.cfg = inner.cfg
        self.bias_fn = bias_fn

    def __call__(self, tokens_bt, positions_bt=None, segment_ids_bt=None, *, deterministic=True):
        if positions_bt is None:
            positions_bt = jnp.broadcast_to(jnp.arange(tokens_bt.shape[1]), tokens_bt.shape)
        return self.inner(tokens_bt, positions_bt) + self.bias_fn(positions_bt + 1)

    def init_cache(self, batch, max_len=None):
        return self.inner.init_cache(batch, max_len)

    def decode(self, tokens_bt, positions_bt, cache, write_index, kv_mask_bs, *image_index):
        logits_btv, cache = self.inner.decode(tokens_bt, positions_bt, cache, write_index, kv_mask_bs, *image_index)
        return logits_btv + self.bias_fn(positions_bt + 1), cache


def bias_at(vocab_size: int, schedule: dict[int, int], default: int | None = None, strength: float = 50.0):
    """bias_fn: at predicted position q, push token schedule[q] (else `default`, if given)."""

    def bias_fn(q_bt):
        out = jnp.zeros(q_bt.shape + (vocab_size,), jnp.float32)
        if default is not None:
            out = out.at[..., default].add(strength / 5)
        for q, tok in schedule.items():
            out = out + jnp.where(q_bt[..., None] == q, jax.nn.one_hot(tok, vocab_size) * strength, 0.0)
        return out

    return bias_fn


def full_logits(model, ids) -> np.ndarray:
    """Logits [T, V] of one unpadded sequence, recomputed without a cache."""
    return np.asarray(model(jnp.asarray([ids], jnp.int32))[0])


def test_toy_vocabulary_round_trips_text_and_maps_codes_by_table():
    vocab = toy_vocab()
    assert vocab.decode_text(vocab.encode_text("hi there")) == "hi there"
    assert vocab.image_token_mask.sum() == CODEBOOK and not vocab.text_token_mask[vocab.image_token_mask].any()
    assert vocab.id_to_code[vocab.code_to_id[5]] == 5 and vocab.code_to_id[0] == vocab.size - 1


def test_biased_model_pushes_the_scheduled_token():
    vocab = toy_vocab()
    model = Biased(tiny_model(), bias_at(64, {3: BOI}, default=vocab.encode_text("z")[0]))
    logits = full_logits(model, [BOS, 7, 8])
    assert logits[2].argmax() == BOI and logits[0].argmax() == vocab.encode_text("z")[0]

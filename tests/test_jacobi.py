"""Speculative Jacobi decoding of images: greedy equals sequential, sampling keeps the distribution,
every picture has exactly codes_per_image codes."""

from __future__ import annotations

import dataclasses
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from chameleon_jax.generation import jacobi
from chameleon_jax.generation.decode import generate_tokens
from chameleon_jax.generation.guidance import Guidance
from chameleon_jax.generation.sampling import SamplingParams
from chameleon_jax.vocab import Vocabulary
from tests.test_generation_fixtures import (
    ALPHABET, BOI, BOS, CODES_PER_IMAGE as K, EOI, EOS, EOT, PAD, Biased, CharText, bias_at, tiny_model, toy_vocab,
)

VOCAB = toy_vocab()
GREEDY = SamplingParams(temperature=0.0)
HOT = SamplingParams(temperature=1.5)


def ids(text: str, vocab=VOCAB) -> list[int]:
    return [BOS] + vocab.encode_text(text)


def images_of(tokens: list[int], vocab=VOCAB, codes=K) -> list[list[int]]:
    """The code runs of a generated row; asserts each `<boi>` has exactly `codes` codes and then `<eoi>`."""
    out, i = [], 0
    while i < len(tokens):
        if tokens[i] == BOI:
            body = tokens[i + 1 : i + 1 + codes]
            assert len(body) == codes and all(vocab.image_token_mask[t] for t in body), tokens
            assert tokens[i + 1 + codes] == EOI, tokens
            out.append(body)
            i += codes + 2
        else:
            assert tokens[i] != EOI and not vocab.image_token_mask[tokens[i]], tokens
            i += 1
    return out


def steered_model(**overrides):
    """A random model pushed to open an image at absolute position 9 and to stop at 24: rows with
    prompts of other lengths switch modes at other steps."""
    text = VOCAB.encode_text("q")[0]
    return Biased(tiny_model(**overrides), bias_at(64, {9: BOI, 9 + K + 2 + 3: EOS}, default=text, strength=60.0))


PROMPTS = [ids("a long prompt"), ids("hi"), ids("mid")]


@pytest.mark.parametrize("guidance,positions,window", [
    (Guidance(), False, 16), (Guidance("three", image_scale=2.0, text_scale=1.5), True, 4),
], ids=["unguided_window_past_the_picture", "three_stream_learned_positions"])
def test_greedy_jacobi_gives_the_sequential_tokens_around_and_inside_the_picture(guidance, positions, window):
    extra = dict(image_positions=K, boi_id=BOI, eoi_id=EOI) if positions else {}
    model = steered_model(**extra)
    kw = dict(modality="any", max_new_tokens=30, text=GREEDY, image=GREEDY, codes_per_image=K, guidance=guidance)
    sequential = generate_tokens(model, VOCAB, PROMPTS, **kw)
    parallel = generate_tokens(model, VOCAB, PROMPTS, image_decoding="jacobi", jacobi_window=window, **kw)
    assert parallel.tokens == sequential.tokens
    assert [len(images_of(t)) for t in parallel.tokens] == [0, 1, 1]  # the long prompt starts past position 9
    assert all(t[-1] == EOS and t.index(BOI) > 0 for t in parallel.tokens[1:])  # text before and after
    assert parallel.steps <= sequential.steps


def test_every_picture_has_exactly_codes_per_image_codes_then_eoi():
    """Sampled codes, a window that does not divide the picture, rows that open their pictures at
    different steps, and rows that draw two pictures."""
    text = VOCAB.encode_text("q")[0]
    model = Biased(tiny_model(seed=1), bias_at(64, {6: BOI, 6 + K + 4: BOI}, default=text, strength=60.0))
    out = generate_tokens(model, VOCAB, [ids("abcd"), ids("a"), ids("abcdefghijklmnopqrstu")], modality="any",
                          max_new_tokens=2 * K + 12, text=GREEDY, image=HOT, codes_per_image=K, ignore_eos=True,
                          image_decoding="jacobi", jacobi_window=4, jacobi_init="left", seed=3)
    assert [len(images_of(t)) for t in out.tokens] == [2, 2, 0]
    assert all(len(t) == 2 * K + 12 for t in out.tokens)


def test_a_prompts_jacobi_samples_follow_its_stream_id_not_its_batch_position():
    kw = dict(modality="image", max_new_tokens=K + 2, image=HOT, codes_per_image=K, seed=5, image_decoding="jacobi",
              jacobi_window=4, guidance=Guidance("two", scale=2.0))
    model = tiny_model(seed=2)
    both = generate_tokens(model, VOCAB, [ids("a cat"), ids("a dog")], **kw).tokens
    alone = generate_tokens(model, VOCAB, [ids("a dog")], stream_ids=[1], **kw).tokens
    assert alone[0] == both[1]
    assert len(images_of(both[1])) == 1


# ----------------------------------------------------------------- lossless sampling

CODES = 6  # a small codebook, so that the joint law of the first codes can be counted
PER_IMAGE = 5
SAMPLES = 3000
SMALL_IMAGE = SamplingParams(temperature=1.3, top_k=4)  # acceptance must use the processed distribution


def small_codebook_vocab() -> Vocabulary:
    text_end = 6 + len(ALPHABET)
    size = text_end + CODES
    piece_mask = np.zeros([size], bool)
    piece_mask[6:text_end] = True
    return Vocabulary(
        kind="toy", size=size, specials=dict(pad=PAD, bos=BOS, eos=EOS, boi=BOI, eoi=EOI, eot=EOT),
        code_to_id=np.arange(text_end, size, dtype=np.int32), text_piece_mask=piece_mask, text_backend=CharText(6),
    )


SMALL = small_codebook_vocab()


def sample_pictures(image_decoding: str) -> np.ndarray:
    """int [SAMPLES, PER_IMAGE]: the codes of SAMPLES pictures of one prompt, all rows of one call
    (each row draws from its own keys)."""
    model = tiny_model(seed=7, initializer_range=0.3, num_layers=1)
    prompt = ids("draw", SMALL)
    out = generate_tokens(model, SMALL, [prompt] * SAMPLES, modality="image", max_new_tokens=PER_IMAGE + 2,
                          image=SMALL_IMAGE, codes_per_image=PER_IMAGE, seed=11, image_decoding=image_decoding,
                          jacobi_window=3)
    tokens = np.asarray(out.tokens)
    assert tokens.shape == (SAMPLES, PER_IMAGE + 2) and (tokens[:, -1] == EOI).all()
    return SMALL.id_to_code[tokens[:, 1:-1]]


def chi_square_excess(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample chi-square statistic of the joint law of the rows of a and b (same count each),
    divided by its 0.999 quantile under equal laws (Wilson-Hilferty): > 1 rejects at 1e-3."""
    cells_a = np.ravel_multi_index(a.T, (CODES,) * a.shape[1])
    cells_b = np.ravel_multi_index(b.T, (CODES,) * b.shape[1])
    na = np.bincount(cells_a, minlength=CODES ** a.shape[1])
    nb = np.bincount(cells_b, minlength=CODES ** b.shape[1])
    seen = (na + nb) > 0
    stat = float((((na - nb) ** 2)[seen] / (na + nb)[seen]).sum())
    df = int(seen.sum()) - 1
    z = 3.0902  # standard normal 0.999 quantile
    quantile = df * (1 - 2 / (9 * df) + z * np.sqrt(2 / (9 * df))) ** 3
    return stat / quantile


@pytest.fixture(scope="module")
def sequential_pictures():
    codes = sample_pictures("sequential")
    first = np.bincount(codes[:, 0], minlength=CODES) / SAMPLES
    assert first.max() < 0.9 and (first > 0).sum() >= 3  # the test needs a law worth matching
    return codes


@pytest.mark.slow
def test_jacobi_sampling_draws_pictures_with_the_sequential_law(sequential_pictures):
    parallel = sample_pictures("jacobi")
    assert chi_square_excess(sequential_pictures[:, :3], parallel[:, :3]) < 1  # the first three codes jointly
    for i in range(3, PER_IMAGE):
        assert chi_square_excess(sequential_pictures[:, i : i + 1], parallel[:, i : i + 1]) < 1
    assert not (parallel == sequential_pictures).all(axis=1).all()  # other draws, the same law


@pytest.mark.slow
def test_the_check_catches_a_rule_that_keeps_every_draft(sequential_pictures, monkeypatch):
    monkeypatch.setattr(jacobi, "accept_drafts", lambda u, p_x, q_x: jnp.ones(u.shape, bool))
    jax.clear_caches()  # the loop must be traced again with the wrong rule
    try:
        wrong = sample_pictures("jacobi")
    finally:
        jax.clear_caches()
    assert chi_square_excess(sequential_pictures[:, :3], wrong[:, :3]) > 3


@pytest.mark.parametrize("stacked", [False, True])
def test_write_layer_puts_each_rows_entries_at_its_own_slots(stacked):
    from chameleon_jax.kv_cache import KVCache, write_layer

    cache = KVCache.zeros(2, 3, 10, 1, 2, jnp.float32, stacked=stacked)
    new_btkh = jnp.broadcast_to(100.0 + jnp.arange(3, dtype=jnp.float32)[None, :, None, None], (3, 3, 1, 2))
    k, v = cache.layer(1)
    k, v = write_layer(k, v, jnp.asarray([0, 2, 7]), new_btkh, -new_btkh, layer=1 if stacked else None)
    for layer_k, layer_v, written in ((k[1], v[1], True), (k[0], v[0], False)) if stacked else ((k, v, True),):
        slots = np.asarray(layer_k[:, 0, :, 0])  # [rows, slots]
        if not written:
            assert not slots.any()
            continue
        assert slots[0].tolist() == [100, 101, 102, 0, 0, 0, 0, 0, 0, 0]
        assert slots[1].tolist() == [0, 0, 100, 101, 102, 0, 0, 0, 0, 0]
        assert slots[2].tolist() == [0, 0, 0, 0, 0, 0, 0, 100, 101, 102]
        np.testing.assert_array_equal(np.asarray(layer_v[:, 0, :, 0]), -slots)


def test_a_window_written_at_each_rows_own_slot_gives_the_logits_of_one_step_at_a_time():
    """decode with an int32 [B] write index: T tokens per row at that row's slots (rows at
    different lengths) give the logits and cache of feeding them one by one at a shared slot."""
    from chameleon_jax.config import MODEL_PRESETS
    from chameleon_jax.kv_cache import KVCache
    from chameleon_jax.transformer import Transformer
    from flax import nnx

    cfg = dataclasses.replace(MODEL_PRESETS["tiny"](), max_seq_len=32)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    b, s, t = 2, 16, 3
    lengths = np.asarray([4, 7])  # tokens already in each row's cache
    history = jnp.asarray(rng.integers(5, cfg.vocab_size, (b, 7)), jnp.int32)
    window = jnp.asarray(rng.integers(5, cfg.vocab_size, (b, t)), jnp.int32)
    slots = np.arange(s)

    def fresh():
        cache = KVCache.zeros(cfg.num_layers, b, s, cfg.num_kv_heads, cfg.head_dim, jnp.float32)
        _, cache = model.decode(history, jnp.arange(7)[None].repeat(b, 0), cache, 0, jnp.ones((b, s), bool))
        return cache

    # One call, each row writing at its own length.
    mask = jnp.asarray(slots[None] < lengths[:, None] + t)
    positions = jnp.asarray(lengths[:, None] + np.arange(t))
    logits, cache = model.decode(window, positions, fresh(), jnp.asarray(lengths, jnp.int32), mask)
    # Row by row, token by token, at a shared slot.
    for row in range(b):
        ref_cache = jax.tree.map(lambda a: a[row:row + 1], fresh())
        for j in range(t):
            at = int(lengths[row]) + j
            ref, ref_cache = model.decode(window[row:row + 1, j:j + 1], jnp.asarray([[at]]), ref_cache, at,
                                          jnp.asarray(slots[None] <= at))
            np.testing.assert_allclose(logits[row, j], ref[0, 0], atol=1e-5)
        for got, want in zip(jax.tree.leaves(cache), jax.tree.leaves(ref_cache)):
            n = int(lengths[row]) + t
            np.testing.assert_allclose(got[row, :, :n], want[0, :, :n], atol=1e-6)


@pytest.mark.parametrize("decoding", ["sequential", "jacobi"])
def test_the_compiled_loop_never_copies_a_whole_layer_of_the_cache(decoding, monkeypatch):
    """XLA updates the KV cache in place: the optimised loop holds no copy of a [rows, K, S, H]
    layer array (a copy there costs the whole cache on every step)."""
    import re

    from chameleon_jax.generation import decode

    calls = []
    original = decode._decode_loop

    def record(*args, **kwargs):
        calls.append((args, kwargs))
        return original(*args, **kwargs)

    monkeypatch.setattr(decode, "_decode_loop", record)
    model = tiny_model()
    out = generate_tokens(model, VOCAB, PROMPTS[:2], modality="image", max_new_tokens=K + 2, text=GREEDY,
                          image=HOT, codes_per_image=K, guidance=Guidance("two", scale=2.0),
                          image_decoding=decoding, jacobi_window=4)
    assert calls and all(len(images_of(t)) == 1 for t in out.tokens)
    args, kwargs = calls[0]
    hlo = original.lower(*args, **kwargs).compile().as_text()
    cfg = model.cfg
    layer = rf"\w+\[{2 * 2},{cfg.num_kv_heads},{out.cache_len},{cfg.head_dim}\]"  # 2 prompts x 2 streams
    assert re.search(layer, hlo), "the cache's shape is not where the test looks for it"
    copies = re.findall(layer + r"\{[0-9,]*\} copy\(", hlo)
    assert not copies, f"{len(copies)} copies of a whole cache layer in the {decoding} loop"

"""The compiled decode loop: cache correctness, the text/image state machine, guidance, batching, seeds."""

from __future__ import annotations

import numpy as np
import pytest

from chameleon_jax.generation import decode as decode_lib
from chameleon_jax.generation.decode import generate_tokens
from chameleon_jax.generation.guidance import Guidance
from chameleon_jax.generation.sampling import SamplingParams
from tests.test_generation_fixtures import (
    BOI, BOS, CODES_PER_IMAGE as K, EOI, EOS, EOT, PAD, Biased, bias_at, full_logits, tiny_model, toy_vocab,
)

VOCAB = toy_vocab()
GREEDY = SamplingParams(temperature=0.0)
HOT = SamplingParams(temperature=1.5)


def ids(text: str) -> list[int]:
    return [BOS] + VOCAB.encode_text(text)


def is_code(tok: int) -> bool:
    return bool(VOCAB.image_token_mask[tok])


def check_images_well_formed(tokens: list[int]) -> int:
    """Every <boi> is followed by exactly K codes and <eoi>; no code outside an image. Returns #images."""
    i, images = 0, 0
    while i < len(tokens):
        tok = tokens[i]
        assert tok != EOI and not is_code(tok), f"stray {tok} at {i} in {tokens}"
        if tok == BOI:
            body = tokens[i + 1 : i + 1 + K]
            assert len(body) == K and all(is_code(t) for t in body), tokens
            assert tokens[i + 1 + K] == EOI, tokens
            i += K + 2
            images += 1
        else:
            i += 1
    return images


@pytest.mark.parametrize("scan_layers", [False, True])
def test_cached_greedy_decoding_matches_full_recomputation(scan_layers):
    model = tiny_model(scan_layers=scan_layers)
    prompts = [ids("the cat sat"), ids("hi")]
    out = generate_tokens(model, VOCAB, prompts, max_new_tokens=12, text=GREEDY, ignore_eos=True, return_logits=True)
    for b, prompt in enumerate(prompts):
        gen = out.tokens[b]
        assert len(gen) == 12
        ref = full_logits(model, prompt + gen[:-1])[len(prompt) - 1 :]
        np.testing.assert_allclose(out.logits[b], ref, atol=1e-4, rtol=1e-4)
        # Greedy: each token is the best allowed one under the recomputed logits.
        masked = np.where(VOCAB.text_token_mask & ~np.isin(np.arange(VOCAB.size), [EOS, EOT]), ref[:, : VOCAB.size], -np.inf)
        assert gen == masked.argmax(-1).tolist()


def test_image_mode_yields_exactly_codes_per_image_then_eoi():
    out = generate_tokens(tiny_model(), VOCAB, [ids("draw"), ids("a red square")], modality="image",
                          max_new_tokens=40, image=HOT, codes_per_image=K, seed=1)
    for toks in out.tokens:
        assert toks[0] == BOI and toks[-1] == EOI and len(toks) == K + 2
        assert all(is_code(t) for t in toks[1:-1])
    assert out.steps == K + 2  # the loop stopped once both rows closed their image


def test_text_mode_never_yields_an_image_code():
    # A model that would rather emit image codes and <boi> than text.
    code_bias = np.zeros(64, np.float32)
    code_bias[np.flatnonzero(VOCAB.image_token_mask)] = 30.0
    code_bias[[BOI, EOI]] = 30.0
    model = Biased(tiny_model(), lambda q: np.broadcast_to(code_bias, q.shape + (64,)))
    out = generate_tokens(model, VOCAB, [ids("abc"), ids("x")], modality="text", max_new_tokens=30, text=HOT,
                          codes_per_image=K, ignore_eos=True)
    for toks in out.tokens:
        assert len(toks) == 30 and all(VOCAB.text_token_mask[t] for t in toks)


def test_boi_only_while_a_whole_image_fits():
    model = Biased(tiny_model(), bias_at(64, {}, default=BOI, strength=500.0))
    short = generate_tokens(model, VOCAB, [ids("a")], modality="any", max_new_tokens=K + 1, text=GREEDY,
                            codes_per_image=K, ignore_eos=True)
    assert BOI not in short.tokens[0] and len(short.tokens[0]) == K + 1
    room = 2 * (K + 2) + 3
    out = generate_tokens(model, VOCAB, [ids("a")], modality="any", max_new_tokens=room, text=GREEDY,
                          codes_per_image=K, ignore_eos=True)
    assert check_images_well_formed(out.tokens[0]) == 2
    assert out.tokens[0][: 2 * (K + 2)].count(BOI) == 2 and BOI not in out.tokens[0][2 * (K + 2):]


def test_one_call_writes_text_then_an_image_then_text():
    vocab_a = VOCAB.encode_text("a")[0]
    prompt = ids("go")
    p = len(prompt)  # the first generated token sits at position p
    schedule = {p + 3: BOI, p + 3 + K + 2 + 2: EOS}
    model = Biased(tiny_model(), bias_at(64, schedule, default=vocab_a))
    out = generate_tokens(model, VOCAB, [prompt], modality="any", max_new_tokens=40, text=GREEDY, image=HOT,
                          codes_per_image=K)
    toks = out.tokens[0]
    assert toks[:3] == [vocab_a] * 3 and toks[3] == BOI and toks[4 + K] == EOI
    assert toks[5 + K :] == [vocab_a, vocab_a, EOS]
    assert check_images_well_formed(toks) == 1


def test_a_batch_gives_the_same_tokens_as_each_row_alone():
    vocab_a = VOCAB.encode_text("q")[0]
    model = Biased(tiny_model(), bias_at(64, {6: BOI, 12: BOI}, default=vocab_a, strength=60.0))
    prompts = [ids("a much longer prompt here"), ids("hi"), ids("mid size")]
    kw = dict(modality="any", max_new_tokens=30, text=GREEDY, image=GREEDY, codes_per_image=K)
    together = generate_tokens(model, VOCAB, prompts, **kw).tokens
    alone = [generate_tokens(model, VOCAB, [p], **kw).tokens[0] for p in prompts]
    assert together == alone
    assert [BOI in t for t in together] == [False, True, True]  # two rows switched modes


def test_guided_rows_match_alone_too():
    prompts = [ids("a much longer prompt"), ids("hi")]
    kw = dict(modality="image", max_new_tokens=K + 2, image=GREEDY, codes_per_image=K,
              guidance=Guidance("two", scale=3.0))
    model = tiny_model()
    together = generate_tokens(model, VOCAB, prompts, **kw).tokens
    assert together == [generate_tokens(model, VOCAB, [p], **kw).tokens[0] for p in prompts]


@pytest.mark.parametrize("form,scales,stream", [
    ("two", dict(scale=0.0), "uncond"), ("two", dict(scale=1.0), "cond"),
    ("three", dict(image_scale=0.0, text_scale=0.0), "uncond"),
    ("three", dict(image_scale=1.0, text_scale=0.0), "image_only"),
    ("three", dict(image_scale=1.0, text_scale=1.0), "cond"),
])
def test_guidance_scales_pick_out_each_stream(form, scales, stream):
    """Image logits at the corner scales are one stream's own distribution, recomputed without a cache."""
    model = tiny_model(seed=3)
    image_codes = [int(VOCAB.code_to_id[c]) for c in (1, 2, 3)]
    prompt = ids("see") + [BOI] + image_codes + [EOI] + VOCAB.encode_text("now draw")
    out = generate_tokens(model, VOCAB, [prompt], modality="image", max_new_tokens=K + 2, image=HOT, seed=5,
                          codes_per_image=K, guidance=Guidance(form, **scales), return_logits=True)
    toks = out.tokens[0]
    context = {"cond": prompt, "uncond": [BOS], "image_only": [BOS, BOI] + image_codes + [EOI]}[stream]
    ref = full_logits(model, context + toks[:K])[len(context):]  # ref[i - 1]: the logits choosing toks[i]
    np.testing.assert_allclose(out.logits[0, 1 : K + 1], ref, atol=1e-4, rtol=1e-4)  # the steps choosing codes


def test_unconditional_stream_starts_afresh_at_each_image():
    prompt = ids("two pictures")
    p = len(prompt)
    schedule = {p: BOI, p + K + 2 + 1: BOI, p + 2 * (K + 2) + 2: EOS}
    model = Biased(tiny_model(seed=2), bias_at(64, schedule, default=VOCAB.encode_text("k")[0]))
    out = generate_tokens(model, VOCAB, [prompt], modality="any", max_new_tokens=60, image=HOT, text=GREEDY,
                          seed=4, codes_per_image=K, guidance=Guidance("two", scale=0.0), return_logits=True)
    toks = out.tokens[0]
    assert check_images_well_formed(toks) == 2
    second = K + 3  # index of the second <boi>
    assert toks[second] == BOI
    ref = full_logits(model, [BOS] + toks[second : second + K])[1:]  # context: <bos> + this image so far
    np.testing.assert_allclose(out.logits[0, second + 1 : second + 1 + K], ref, atol=1e-4, rtol=1e-4)


def test_same_seed_same_output_and_another_seed_differs():
    model = tiny_model()
    kw = dict(modality="any", max_new_tokens=24, text=HOT, image=HOT, codes_per_image=K, ignore_eos=True)
    a = generate_tokens(model, VOCAB, [ids("x"), ids("yz")], seed=7, **kw).tokens
    b = generate_tokens(model, VOCAB, [ids("x"), ids("yz")], seed=7, **kw).tokens
    c = generate_tokens(model, VOCAB, [ids("x"), ids("yz")], seed=8, **kw).tokens
    assert a == b and a != c


def test_finished_rows_stop_and_the_loop_ends_when_all_are_done():
    prompt = ids("stop")
    model = Biased(tiny_model(), bias_at(64, {len(prompt) + 2: EOS}, default=VOCAB.encode_text("o")[0]))
    out = generate_tokens(model, VOCAB, [prompt, ids("spot")], max_new_tokens=50, text=GREEDY)
    assert [t[-1] for t in out.tokens] == [EOS, EOS] and [len(t) for t in out.tokens] == [3, 3]
    assert PAD not in out.tokens[0] and out.steps == 3


def test_generation_stops_when_the_context_is_full():
    model = tiny_model()  # max_seq_len 96
    prompt = ids("a" * 80)
    out = generate_tokens(model, VOCAB, [prompt], max_new_tokens=50, text=GREEDY, ignore_eos=True)
    assert len(out.tokens[0]) == 96 - len(prompt) and out.cache_len == 96


def test_a_prompt_that_does_not_fit_names_its_index_and_lengths():
    model = tiny_model()
    with pytest.raises(ValueError, match=r"prompt 1 has 97 tokens .* context of 96"):
        generate_tokens(model, VOCAB, [ids("ok"), ids("b" * 96)], max_new_tokens=4)
    with pytest.raises(ValueError, match=r"prompt 0 has 90 tokens .*room for an image"):
        generate_tokens(model, VOCAB, [ids("c" * 89)], modality="image", codes_per_image=K, max_new_tokens=K + 2)


def test_repeated_calls_of_one_shape_compile_once():
    model = tiny_model()
    kw = dict(max_new_tokens=8, text=HOT, codes_per_image=K, modality="any")
    generate_tokens(model, VOCAB, [ids("abc")], seed=0, **kw)
    before = decode_lib._decode_loop._cache_size()
    generate_tokens(model, VOCAB, [ids("abcdef")], seed=1, text=SamplingParams(0.7), **{k: v for k, v in kw.items() if k != "text"})
    assert decode_lib._decode_loop._cache_size() == before

"""The public Pipeline: prompts of text and images in, segments of text and images out."""

from __future__ import annotations

import numpy as np
import pytest

from chameleon_jax.pipeline import ImageCodes, Pipeline
from tests.test_generation_fixtures import (
    BOI, BOS, CODES_PER_IMAGE as K, EOI, EOS, Biased, PatchTokenizer, bias_at, tiny_model, toy_vocab,
)

VOCAB = toy_vocab()
RED = np.zeros([12, 12, 3], np.uint8) + np.array([255, 0, 0], np.uint8)


def text_image_text_model(prompt_len: int):
    """Generates 'aaa', an image, 'aa', then <eos> after a prompt of prompt_len ids."""
    a = VOCAB.encode_text("a")[0]
    schedule = {prompt_len + 3: BOI, prompt_len + 3 + K + 2 + 2: EOS}
    return Biased(tiny_model(), bias_at(64, schedule, default=a))


def test_prompt_segments_become_bos_text_and_image_codes():
    pipe = Pipeline.from_parts(tiny_model(), VOCAB, PatchTokenizer())
    ids = pipe.encode_prompt(["hi", RED, "ok"])
    codes = PatchTokenizer().encode(RED[None])[0].reshape(-1)
    assert ids == [BOS, *VOCAB.encode_text("hi"), BOI, *VOCAB.code_to_id[codes].tolist(), EOI,
                   *VOCAB.encode_text("ok")]
    # Images of another size are resized to the tokenizer's.
    big = np.zeros([48, 48, 3], np.uint8) + np.array([255, 0, 0], np.uint8)
    np.testing.assert_array_equal(pipe.encode_images([big]), pipe.encode_images([RED]))


def test_generate_returns_text_then_an_image_then_text():
    prompt = ["draw", RED]
    n = len(Pipeline.from_parts(tiny_model(), VOCAB, PatchTokenizer()).encode_prompt(prompt))
    pipe = Pipeline.from_parts(text_image_text_model(n), VOCAB, PatchTokenizer())
    [result] = pipe.generate([prompt], modality="any", max_new_tokens=40)
    assert len(result) == 3 and result[0] == "aaa" and result[2] == "aa"
    assert result[1].dtype == np.uint8 and result[1].shape == (12, 12, 3)


def test_image_modality_returns_one_decoded_image_per_prompt():
    pipe = Pipeline.from_parts(tiny_model(), VOCAB, PatchTokenizer())
    results = pipe.generate(["a red square", ["now", RED, "again"]], modality="image", cfg_scale=2.0, seed=3)
    for result in results:
        assert len(result) == 1 and result[0].shape == (12, 12, 3)
    assert pipe.generate(["a red square"], modality="image", cfg_scale=2.0, seed=3)[0][0].tolist() == results[0][0].tolist()


def test_an_encoder_only_tokenizer_returns_generated_images_as_codes():
    pipe = Pipeline.from_parts(tiny_model(), VOCAB, PatchTokenizer(can_decode=False))
    [[image]] = pipe.generate(["x"], modality="image")
    assert isinstance(image, ImageCodes) and image.codes.shape == (3, 3)
    with pytest.raises(ValueError, match="no decoder"):
        pipe.decode_images(image.codes[None])


def test_without_an_image_tokenizer_text_still_generates():
    pipe = Pipeline.from_parts(Biased(tiny_model(), bias_at(64, {}, default=BOI)), VOCAB, None)
    [result] = pipe.generate(["hello"], modality="any", max_new_tokens=20, temperature=1.0)
    assert all(isinstance(s, str) for s in result) and result
    with pytest.raises(ValueError, match="needs an image tokenizer"):
        pipe.generate(["hello"], modality="image")
    with pytest.raises(ValueError, match="needs an image tokenizer"):
        pipe.generate([["look", RED]])


def test_bad_prompt_images_and_oversized_prompts_are_named():
    pipe = Pipeline.from_parts(tiny_model(), VOCAB, PatchTokenizer())
    with pytest.raises(ValueError, match=r"prompt 1: image 0 must be a uint8 array"):
        pipe.generate(["fine", ["bad", RED.astype(np.float32)]])
    with pytest.raises(ValueError, match=r"prompt 1 has \d+ tokens"):
        pipe.generate(["fine", "z" * 200])


def test_the_pipeline_split_follows_weights_and_model_changes():
    import jax
    from flax import nnx

    from tests.test_generation_fixtures import tiny_model

    pipe = Pipeline(tiny_model(0), VOCAB)
    prompt = [[BOS] + VOCAB.encode_text("a")]
    run = lambda p: p.generate_ids(prompt, max_new_tokens=8, ignore_eos=True).tokens
    first = run(pipe)
    other = run(Pipeline(tiny_model(1), VOCAB))
    assert other != first
    # Weights put in place are used by the split the pipeline keeps.
    nnx.update(pipe.model, jax.tree.map(lambda x: x, nnx.state(tiny_model(1))))
    assert run(pipe) == other
    pipe.refresh()
    assert run(pipe) == other
    pipe.model = tiny_model(0)  # assigning a model takes a new split
    assert run(pipe) == first

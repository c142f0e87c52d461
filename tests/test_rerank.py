"""Best of n pictures by the model's own reading (`generation/rerank.py`, `eval.t2i.draw_best_of`)."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from chameleon_jax.config import MeshConfig
from chameleon_jax.configlib import ConfigError
from chameleon_jax.generation import rerank
from chameleon_jax.pipeline import Pipeline
from eval import common, t2i
from tests.test_generation_fixtures import BOI, BOS, EOI, EOS, PatchTokenizer, full_logits, tiny_model, toy_vocab

VOCAB = toy_vocab()
TEXTS = ["a red dot.", "two blue squares, side by side.", "x"]


def pictures(n: int, seed: int = 0) -> list[np.ndarray]:
    return list(np.random.default_rng(seed).integers(0, 256, (n, 12, 12, 3), np.uint8))


def by_hand(model, image, text) -> float:
    """The text's NLL after [bos, boi, codes, eoi], its end included, from full logits."""
    codes = PatchTokenizer().encode(image[None])[0].reshape(-1)
    prompt = [BOS, BOI, *VOCAB.image_ids(codes).tolist(), EOI]
    target = VOCAB.encode_text(text) + [EOS]
    ids = prompt + target
    logits = full_logits(model, ids[:-1]).astype(np.float64)
    log_p = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
    return float(-sum(log_p[len(prompt) - 1 + j, t] for j, t in enumerate(target)))


def test_caption_nll_is_the_texts_loss_after_the_picture():
    model = tiny_model()
    pipe = Pipeline.from_parts(model, VOCAB, PatchTokenizer())
    images = pictures(3)
    got = rerank.caption_nll(pipe, images, TEXTS, batch_size=2)  # two chunks, the second padded
    want = [by_hand(model, img, txt) for img, txt in zip(images, TEXTS)]
    np.testing.assert_allclose(got, want, rtol=2e-4)
    # Each pair is scored on its own: another picture beside it or another batch size changes nothing.
    alone = rerank.caption_nll(pipe, images[1:2], TEXTS[1:2])
    np.testing.assert_allclose(alone, got[1:2], rtol=1e-5)


def test_a_missing_picture_scores_infinity_and_is_never_chosen():
    pipe = Pipeline.from_parts(tiny_model(), VOCAB, PatchTokenizer())
    images = pictures(2)
    nll = rerank.caption_nll(pipe, [images[0], None, images[1]], TEXTS)
    assert np.isinf(nll[1]) and np.all(np.isfinite(nll[[0, 2]]))
    assert np.all(np.isinf(rerank.caption_nll(pipe, [None], ["a"])))
    assert rerank.choose(np.array([[np.inf, 1.0], [2.0, np.inf]])).tolist() == [1, 0]


def test_choose_keeps_the_lowest_and_the_earliest_of_a_tie():
    nll = np.array([[3.0, 1.0, 2.0], [1.0, 1.0, 5.0], [1.0, 4.0, 2.0]])
    assert rerank.choose(nll).tolist() == [1, 0, 0]


def test_pictures_and_texts_must_pair_up():
    pipe = Pipeline.from_parts(tiny_model(), VOCAB, PatchTokenizer())
    with pytest.raises(ValueError, match="2 images but 1 texts"):
        rerank.caption_nll(pipe, pictures(2), ["a"])


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")
def test_a_mesh_scores_what_one_device_scores():
    images = pictures(3, seed=1)
    one = rerank.caption_nll(Pipeline.from_parts(tiny_model(num_heads=4, num_kv_heads=2), VOCAB, PatchTokenizer()),
                             images, TEXTS)
    mesh = Pipeline.from_parts(tiny_model(num_heads=4, num_kv_heads=2), VOCAB, PatchTokenizer(),
                               mesh=MeshConfig(data=2, tensor=4))
    np.testing.assert_allclose(rerank.caption_nll(mesh, images, TEXTS), one, rtol=1e-4)


# --------------------------------------------------------------------------- eval.t2i


class Recorder:
    """Stands in for `generate_images` (candidate k draws picture "k<prompt>") and `caption_nll`."""

    def __init__(self, nll_of):
        self.calls, self.nll_of = [], nll_of

    def generate(self, pipe, prompts, cfg, cfg_scale, desc, timings=None):
        k = len(self.calls)
        self.calls.append((cfg.seed, cfg.image_temperature, cfg_scale, timings is not None))
        return [f"{k}{p}" for p in prompts]

    def nll(self, pipe, images, texts, batch_size=64):
        return np.array([self.nll_of(img) for img in images], float)


def test_best_of_n_keeps_the_candidate_the_model_reads_likeliest(monkeypatch):
    # Prompt "a" reads best on candidate 2, prompt "b" on candidate 0 (the plain decoding).
    best = {"a": "2a", "b": "0b"}
    rec = Recorder(lambda img: 0.0 if best[img[1:]] == img else 1.0 + int(img[0]))
    monkeypatch.setattr(t2i, "generate_images", rec.generate)
    monkeypatch.setattr(rerank, "caption_nll", rec.nll)
    cfg = dataclasses.replace(common.EvalConfig(), image_candidates=3, candidate_temperature=0.8, seed=5)
    kept, candidates = t2i.draw_best_of(None, ["a", "b"], cfg, 1.5, "t2i", timings=[])
    assert kept == ["2a", "0b"]
    assert candidates == [["0a", "0b"], ["1a", "1b"], ["2a", "2b"]]
    # The first candidate is the configured decoding (greedy, timed); the others are sampled, each its own seed.
    assert rec.calls[0] == (5, 0.0, 1.5, True)
    assert [c[1:] for c in rec.calls[1:]] == [(0.8, 1.5, False)] * 2
    assert len({c[0] for c in rec.calls}) == 3


def test_one_candidate_is_the_plain_decoding(monkeypatch):
    rec = Recorder(lambda img: pytest.fail("one candidate needs no scoring"))
    monkeypatch.setattr(t2i, "generate_images", rec.generate)
    monkeypatch.setattr(rerank, "caption_nll", rec.nll)
    cfg = dataclasses.replace(common.EvalConfig(), image_candidates=1)
    assert t2i.draw_best_of(None, ["a"], cfg, 1.5, "t2i") == (["0a"], [["0a"]])


@pytest.mark.parametrize("field, value, message", [
    ("image_candidates", 0, "image_candidates must be at least 1"),
    ("candidate_temperature", 0.0, "candidate_temperature must be above 0"),
])
def test_settings_that_cannot_draw_candidates_are_refused(monkeypatch, field, value, message):
    monkeypatch.setattr(t2i, "generate_images", Recorder(lambda img: 0.0).generate)
    cfg = dataclasses.replace(common.EvalConfig(), **{"image_candidates": 4, field: value})
    with pytest.raises(ConfigError, match=message):
        t2i.draw_best_of(None, ["a"], cfg, 1.5, "t2i")

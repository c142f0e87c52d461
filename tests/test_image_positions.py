"""Learned image-code positions (`ModelConfig.image_positions`): the index, the model, decoding, config."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from chameleon_jax.configlib import ConfigError
from chameleon_jax.generation.decode import generate_tokens
from chameleon_jax.generation.guidance import Guidance
from chameleon_jax.generation.sampling import SamplingParams
from chameleon_jax.image_positions import image_index
from chameleon_jax.transformer import count_params
from tests.test_generation_fixtures import (
    BOI, BOS, CODES_PER_IMAGE as K, EOI, PAD, Biased, bias_at, full_logits, tiny_model, toy_vocab,
)
from train import lm as train_lm
from train.lm_config import PRESETS

VOCAB = toy_vocab()
GREEDY = SamplingParams(temperature=0.0)
C = 40  # some image code id of the toy vocabulary
T = 10  # some text id


def positioned_model(seed=0, **overrides):
    return tiny_model(seed, image_positions=K, boi_id=BOI, eoi_id=EOI, **overrides)


def test_index_counts_codes_from_each_boi_and_is_minus_one_elsewhere():
    row = [PAD, BOS, T, BOI, C, C, C, EOI, T, BOI, C, C]
    got = np.asarray(image_index(jnp.asarray([row]), boi_id=BOI, eoi_id=EOI))[0].tolist()
    assert got == [-1, -1, -1, -1, 0, 1, 2, -1, -1, -1, 0, 1]


def test_index_restarts_at_a_packed_document_boundary():
    # Document 1 is cut off inside its image; document 2's text must not count on from it.
    row = [BOS, BOI, C, C, BOS, T, T, BOI, C]
    seg = [1, 1, 1, 1, 2, 2, 2, 2, 2]
    got = np.asarray(image_index(jnp.asarray([row]), boi_id=BOI, eoi_id=EOI, segment_ids_bt=jnp.asarray([seg])))
    assert got[0].tolist() == [-1, -1, 0, 1, -1, -1, -1, -1, 0]
    # A row that starts inside an image (no <boi> in the row) gives its codes no index.
    got = np.asarray(image_index(jnp.asarray([[C, C, EOI, T]]), boi_id=BOI, eoi_id=EOI))
    assert got[0].tolist() == [-1, -1, -1, -1]


def test_a_table_row_moves_only_the_logits_from_its_code_on():
    model = positioned_model()
    row = [BOS, T, BOI] + [C] * K + [EOI, T, T]
    before = full_logits(model, row)
    table = model.image_pos.embedding_nd
    table[...] = table[...].at[4].add(1.0)
    after = full_logits(model, row)
    changed = np.abs(after - before).max(axis=-1) > 1e-4
    first = 3 + 4  # the fifth code of the image sits at position 7
    assert not changed[:first].any() and changed[first:].all()


def test_parameter_count_includes_the_table():
    model = positioned_model()
    actual = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert count_params(model.cfg) == actual == count_params(tiny_model().cfg) + K * model.cfg.hidden_dim


def test_cached_decoding_with_images_in_prompt_and_output_matches_full_recomputation():
    vocab_a = VOCAB.encode_text("a")[0]
    prompt = [BOS, T, BOI] + [C + i % 3 for i in range(K)] + [EOI, T]
    p = len(prompt)
    model = Biased(positioned_model(), bias_at(64, {p + 2: BOI}, default=vocab_a))
    out = generate_tokens(model, VOCAB, [prompt, [BOS, T]], modality="any", max_new_tokens=K + 8, text=GREEDY,
                          image=GREEDY, codes_per_image=K, ignore_eos=True, return_logits=True)
    gen = out.tokens[0]
    assert gen[2] == BOI and gen[3 + K] == EOI  # an image was generated after two text tokens
    ref = full_logits(model, prompt + gen[:-1])[p - 1:]
    np.testing.assert_allclose(out.logits[0], ref, atol=1e-4, rtol=1e-4)


def test_guided_positioned_rows_match_alone():
    model = positioned_model(seed=3)
    prompts = [[BOS, T, T, T, T], [BOS, T]]
    kw = dict(modality="image", max_new_tokens=K + 2, image=GREEDY, codes_per_image=K, guidance=Guidance("two", 2.0))
    together = generate_tokens(model, VOCAB, prompts, **kw).tokens
    assert together == [generate_tokens(model, VOCAB, [p], **kw).tokens[0] for p in prompts]
    # The table is used: the same model with it zeroed decodes otherwise.
    zeroed = positioned_model(seed=3)
    zeroed.image_pos.embedding_nd[...] = jnp.zeros_like(zeroed.image_pos.embedding_nd[...])
    assert generate_tokens(zeroed, VOCAB, prompts, **kw).tokens != together


def test_model_refuses_missing_ids_and_unresolved_rows():
    with pytest.raises(ValueError, match="boi_id and model.eoi_id"):
        tiny_model(image_positions=K)
    with pytest.raises(ValueError, match="-1"):
        tiny_model(image_positions=-1, boi_id=BOI, eoi_id=EOI)


def test_train_config_takes_rows_and_ids_from_the_tokenizer_and_vocabulary():
    cfg = PRESETS["tiny"]()
    auto = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, image_positions=-1))
    model = train_lm.resolve_config(auto, VOCAB, codes_per_image=K).model
    assert (model.image_positions, model.boi_id, model.eoi_id) == (K, BOI, EOI)
    few = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, image_positions=K - 1))
    with pytest.raises(ConfigError, match="fewer than the image tokenizer's 9 codes"):
        train_lm.resolve_config(few, VOCAB, codes_per_image=K)
    off = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, image_positions=0))
    assert train_lm.resolve_config(off, VOCAB, codes_per_image=K).model.image_positions == 0

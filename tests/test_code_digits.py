"""Image codes sharing per-digit rows (`ModelConfig.image_code_digits`): the table, the model, folding, config."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from chameleon_jax import code_digits
from chameleon_jax.config import MeshConfig
from chameleon_jax.configlib import ConfigError
from chameleon_jax.sharding import build_mesh, use_mesh
from chameleon_jax.transformer import Transformer, count_params, create_sharded_model
from chameleon_jax.vocab import Vocabulary
from tests.test_generation_fixtures import ALPHABET, BOI, BOS, EOI, CharText, full_logits, tiny_model, toy_vocab
from train import lm as train_lm
from train.lm_config import PRESETS

LEVELS = (3, 3, 3)  # 27 codes: the toy codebook's size
TEXT_END = 6 + len(ALPHABET)  # the first image id when the codes follow the text in code order


def digit_model(seed=0, **overrides):
    return tiny_model(seed, image_code_digits=LEVELS, image_code_offset=TEXT_END, **overrides)


def test_digit_matrix_marks_each_codes_digits_and_nothing_else():
    m = code_digits.digit_matrix((2, 3), offset=4, vocab_size=12)
    assert m.shape == (12, 5)
    assert not m[:4].any() and not m[10:].any()
    for c in range(6):
        want = np.zeros(5)
        want[c % 2] = 1
        want[2 + c // 2] = 1
        np.testing.assert_array_equal(m[4 + c], want)
    with pytest.raises(ValueError, match="do not fit"):
        code_digits.digit_matrix((2, 3), offset=8, vocab_size=12)


def test_a_digit_row_moves_the_codes_carrying_that_digit_and_nothing_else():
    model = digit_model()
    ids = jnp.arange(64)[None]
    before_in = np.asarray(model._embed(ids))[0]
    head_weight = lambda: np.asarray(model.code_digits.head_weight(model.lm_head.w_dv[...]))  # noqa: E731
    before_out = head_weight()[:, :64]
    # Digit 1 (the middle one) taking value 2: codes c with (c // 3) % 3 == 2.
    model.code_digits.input_ld[...] = model.code_digits.input_ld[...].at[3 + 2].add(1.0)
    model.code_digits.output_dl[...] = model.code_digits.output_dl[...].at[:, 3 + 2].add(1.0)
    moved_in = np.abs(np.asarray(model._embed(ids))[0] - before_in).max(-1) > 1e-6
    moved_out = np.abs(head_weight()[:, :64] - before_out).max(0) > 1e-6
    want = np.zeros(64, bool)
    want[[TEXT_END + c for c in range(27) if (c // 3) % 3 == 2]] = True
    np.testing.assert_array_equal(moved_in, want)
    np.testing.assert_array_equal(moved_out, want)


def test_folding_the_digit_rows_into_the_tables_gives_the_same_logits():
    model = digit_model()
    row = [BOS, 10, 11, BOI] + [TEXT_END + c for c in (0, 5, 26, 13)] + [EOI, 12]
    want = full_logits(model, row)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    folded = code_digits.fold(LEVELS, TEXT_END, jax.tree.map(np.asarray, params))
    assert "code_digits" not in folded
    plain = tiny_model(1)
    nnx.update(plain, folded)
    np.testing.assert_allclose(full_logits(plain, row), want, rtol=1e-5, atol=1e-5)
    # The digit rows do change the model (the check above is not vacuous).
    assert np.abs(full_logits(tiny_model(0), row) - want).max() > 1e-2


def test_a_digits_only_head_factorises_the_code_distribution_and_folds():
    model = digit_model(image_code_own_logits=False)
    row = [BOS, 10, 11, BOI] + [TEXT_END + c for c in (0, 5, 26, 13)] + [EOI, 12]
    want = full_logits(model, row)
    # The codes' logits are additive in the digit values (no interaction term), so the
    # distribution over codes is a product of one distribution per digit.
    codes_tc = want[:, TEXT_END:TEXT_END + 27].reshape(-1, 3, 3, 3)  # [t, d2, d1, d0]: code = d0 + 3 d1 + 9 d2
    additive = (codes_tc[:, :, :, :1] + codes_tc[:, :, :1, :] + codes_tc[:, :1, :, :]
                - codes_tc[:, :1, :, :1] - codes_tc[:, :1, :1, :] - codes_tc[:, :, :1, :1] + codes_tc[:, :1, :1, :1])
    np.testing.assert_allclose(codes_tc, additive, rtol=1e-5, atol=1e-5)
    # The same parameters with own columns give other code logits (the own columns are live there).
    own = digit_model()
    nnx.update(own, nnx.state(model, nnx.Param))
    own_tc = full_logits(own, row)[:, TEXT_END:TEXT_END + 27].reshape(-1, 3, 3, 3)
    assert np.abs(own_tc - codes_tc).max() > 1e-3
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    folded = code_digits.fold(LEVELS, TEXT_END, jax.tree.map(np.asarray, params), own_logits=False)
    plain = tiny_model(1)
    nnx.update(plain, folded)
    np.testing.assert_allclose(full_logits(plain, row), want, rtol=1e-5, atol=1e-5)


def test_decoding_with_the_cache_gives_the_full_forward_logits():
    model = digit_model()
    row = [BOS, 10, BOI] + [TEXT_END + c for c in (3, 7, 20)] + [EOI]
    want = full_logits(model, row)
    n = len(row)
    cache = model.init_cache(1, 16)
    mask = jnp.zeros((1, 16), bool).at[:, :n].set(True)
    got = []
    for t, tok in enumerate(row):
        logits, cache = model.decode(jnp.asarray([[tok]]), jnp.asarray([[t]]), cache, t, mask)
        got.append(np.asarray(logits)[0, 0])
    np.testing.assert_allclose(np.stack(got), want, rtol=1e-4, atol=1e-4)


def test_a_mesh_gives_the_single_device_logits():
    cfg = digit_model().cfg
    row = jnp.asarray([[BOS, 10, BOI] + [TEXT_END + c for c in range(8)] + [EOI]] * 4)
    want = np.asarray(Transformer(cfg, rngs=nnx.Rngs(0))(row))
    mesh_cfg = MeshConfig(data=2, fsdp=2, tensor=2)
    mesh = build_mesh(mesh_cfg)
    model = create_sharded_model(cfg, mesh, mesh_cfg.rules, seed=0)
    assert model.code_digits.input_ld[...].sharding.spec == P(None, "fsdp")
    with use_mesh(mesh, mesh_cfg.rules):
        got = nnx.jit(lambda m, x: m(x))(model, row)
        assert got.sharding.spec == P(("data", "fsdp"), None, "tensor")
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)


def test_parameter_count_includes_the_digit_tables():
    model = digit_model()
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert count_params(model.cfg) == n == count_params(tiny_model().cfg) + 2 * sum(LEVELS) * 32


def _ordered_vocab() -> Vocabulary:
    """The toy vocabulary with its image codes in code order after the text."""
    toy = toy_vocab()
    piece_mask = np.zeros([toy.size], bool)
    piece_mask[6:TEXT_END] = True
    specials = {n: getattr(toy, f"{n}_id") for n in ("pad", "bos", "eos", "boi", "eoi", "eot")}
    return Vocabulary(kind="toy", size=toy.size, specials=specials, text_piece_mask=piece_mask,
                      code_to_id=np.arange(TEXT_END, toy.size, dtype=np.int32), text_backend=CharText(6))


def test_train_config_takes_the_digits_from_the_tokenizer_and_the_offset_from_the_vocabulary():
    cfg = PRESETS["tiny"]()
    auto = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, image_code_digits=(-1,)))
    model = train_lm.resolve_config(auto, _ordered_vocab(), 9, image_code_levels=LEVELS).model
    assert (model.image_code_digits, model.image_code_offset) == (LEVELS, TEXT_END)
    with pytest.raises(ConfigError, match="tokenizer has none"):
        train_lm.resolve_config(auto, _ordered_vocab(), 9, image_code_levels=())
    wrong = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, image_code_digits=(4, 4)))
    with pytest.raises(ConfigError, match="make 16 codes, the vocabulary has 27"):
        train_lm.resolve_config(wrong, _ordered_vocab(), 9)
    with pytest.raises(ConfigError, match="one block of ids in code order"):
        train_lm.resolve_config(auto, toy_vocab(), 9, image_code_levels=LEVELS)
    off = train_lm.resolve_config(cfg, _ordered_vocab(), 9, image_code_levels=LEVELS).model
    assert off.image_code_digits == () and off.image_code_offset == -1


def test_model_refuses_an_unresolved_offset():
    with pytest.raises(ValueError, match="image_code_offset"):
        tiny_model(image_code_digits=LEVELS)


def test_a_tokenizer_folder_gives_its_fsq_levels_and_a_codebook_none(tmp_path):
    import json

    from vqvae.tokenizer import code_levels

    (tmp_path / "fsq").mkdir()
    (tmp_path / "fsq" / "config.json").write_text(json.dumps({"quantizer": "fsq", "fsq_levels": [8, 5, 5]}))
    (tmp_path / "vq").mkdir()
    (tmp_path / "vq" / "config.json").write_text(json.dumps({"quantizer": "vq", "fsq_levels": [8, 5, 5]}))
    assert code_levels(tmp_path / "fsq") == (8, 5, 5)
    assert code_levels(tmp_path / "vq") == ()

"""The transformer: cached decoding, packing, layer scanning, remat, dropout, checkpoints."""

from __future__ import annotations

import dataclasses
import json
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from chameleon_jax.checkpoint import CheckpointError, load_model, save_model
from chameleon_jax.config import MODEL_PRESETS, ModelConfig
from chameleon_jax.transformer import Transformer, count_params, flops_per_token, unstack_layers


def tiny(**kw) -> ModelConfig:
    return dataclasses.replace(ModelConfig(), **{"num_kv_heads": 2, "max_seq_len": 32, **kw})


def make(cfg: ModelConfig, seed: int = 0) -> Transformer:
    model = Transformer(cfg, rngs=nnx.Rngs(seed))
    # Non-trivial norms, so a mix-up of norm parameters would show in the logits.
    for path, var in nnx.iter_graph(model):
        name = str(path[-1]) if path else ""
        if isinstance(var, nnx.Param) and name.startswith(("scale", "bias")):
            key = jax.random.fold_in(jax.random.key(seed), zlib.crc32("/".join(map(str, path)).encode()))
            base = 1.0 if name.startswith("scale") else 0.0
            var[...] = base + 0.3 * jax.random.normal(key, var.shape, var.dtype)
    return model


def tokens(shape, seed=0, vocab=512):
    return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, shape), jnp.int32)


@nnx.jit
def forward(model, toks, positions=None, segments=None):
    return model(toks, positions, segments)


@nnx.jit
def decode(model, toks, positions, cache, write_index, kv_mask):
    return model.decode(toks, positions, cache, write_index, kv_mask)


# --------------------------------------------------------------------------- decoding


@pytest.mark.parametrize("scan", [False, True], ids=["loop", "scan"])
def test_cached_decode_matches_full_forward_with_left_padding(scan):
    cfg = tiny(scan_layers=scan)
    model = make(cfg)
    seq = tokens((2, 10), seed=1)
    # Row 0 has a 6-token prompt; row 1 a 4-token prompt, left-padded by 2 slots.
    pad = np.array([0, 2])
    prompt_len = 6
    full0 = forward(model, seq[:1])[0]
    full1 = forward(model, seq[1:2, : 10 - 2])[0]  # row 1's tokens without padding

    rows = jnp.stack([seq[0], jnp.concatenate([jnp.zeros(2, jnp.int32), seq[1, :8]])])
    slots = np.arange(10)
    positions = jnp.asarray(np.maximum(slots[None] - pad[:, None], 0), jnp.int32)
    kv_mask = (slots[None] >= pad[:, None]) & (slots[None] < prompt_len)
    kv_mask = jnp.asarray(np.pad(kv_mask, ((0, 0), (0, cfg.max_seq_len - 10))))

    cache = model.init_cache(2)
    layer_shape = (2, cfg.num_kv_heads, cfg.max_seq_len, cfg.head_dim)
    if scan:
        assert cache.k.shape == cache.v.shape == (cfg.num_layers, *layer_shape)
    else:
        assert len(cache.k) == len(cache.v) == cfg.num_layers
        assert all(a.shape == layer_shape for a in (*cache.k, *cache.v))
    assert (cache.num_layers, cache.batch_size, cache.max_len) == (cfg.num_layers, 2, cfg.max_seq_len)
    logits, cache = decode(model, rows[:, :prompt_len], positions[:, :prompt_len], cache, 0, kv_mask)
    np.testing.assert_allclose(logits[0], full0[:prompt_len], atol=1e-4)
    np.testing.assert_allclose(logits[1, 2:], full1[:4], atol=1e-4)
    for t in range(prompt_len, 10):
        kv_mask = kv_mask.at[:, t].set(True)
        step, cache = decode(model, rows[:, t:t + 1], positions[:, t:t + 1], cache, jnp.int32(t), kv_mask)
        np.testing.assert_allclose(step[0, 0], full0[t], atol=1e-4)
        np.testing.assert_allclose(step[1, 0], full1[t - 2], atol=1e-4)


@pytest.mark.parametrize("scan", [False, True], ids=["loop", "scan"])
def test_decode_step_writes_only_its_slot_in_every_layer(scan):
    cfg = tiny(scan_layers=scan)
    model = make(cfg)
    seq = tokens((2, 4), seed=5)
    mask = jnp.zeros((2, cfg.max_seq_len), bool).at[:, :4].set(True)
    _, before = decode(model, seq[:, :3], jnp.broadcast_to(jnp.arange(3), (2, 3)), model.init_cache(2), 0, mask)
    _, after = decode(model, seq[:, 3:], jnp.full((2, 1), 3), before, jnp.int32(3), mask)
    for old, new in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
        old, new = np.asarray(old), np.asarray(new)
        changed_s = np.any(old != new, axis=tuple(i for i in range(old.ndim) if i != old.ndim - 2))
        np.testing.assert_array_equal(changed_s, np.arange(cfg.max_seq_len) == 3)
        assert np.all(old[..., :3, :] != 0) and np.all(old[..., 4:, :] == 0)


def test_kv_mask_hides_stale_slots():
    """A stream whose context is masked out behaves as if it had never seen it."""
    cfg = tiny()
    model = make(cfg)
    seq = tokens((1, 8), seed=2)
    fresh = forward(model, seq[:, 4:])[0]
    cache = model.init_cache(1)
    mask = jnp.zeros((1, cfg.max_seq_len), bool).at[:, :4].set(True)
    _, cache = decode(model, seq[:, :4], jnp.arange(4)[None], cache, 0, mask)
    mask = jnp.zeros((1, cfg.max_seq_len), bool).at[:, 4:8].set(True)  # forget slots 0..3
    logits, _ = decode(model, seq[:, 4:], jnp.arange(4)[None], cache, 4, mask)
    np.testing.assert_allclose(logits[0], fresh, atol=1e-4)


def test_packed_documents_match_documents_alone():
    cfg = tiny()
    model = make(cfg)
    a, b = tokens((1, 5), seed=3), tokens((1, 7), seed=4)
    packed = jnp.concatenate([a, b], axis=1)
    segments = jnp.asarray([[1] * 5 + [2] * 7])
    positions = jnp.asarray([list(range(5)) + list(range(7))])
    out = forward(model, packed, positions, segments)[0]
    np.testing.assert_allclose(out[:5], forward(model, a)[0], atol=1e-5)
    np.testing.assert_allclose(out[5:], forward(model, b)[0], atol=1e-5)
    # Without segment ids document b would see document a: the mask is doing the work.
    leaky = forward(model, packed, positions)[0]
    assert float(jnp.abs(leaky[5:] - out[5:]).max()) > 1e-3


# --------------------------------------------------------------------------- layer stacking, remat, dropout


def stack_blocks(params: dict, num_layers: int) -> dict:
    params = dict(params)
    blocks = params.pop("blocks")
    params["blocks"] = jax.tree.map(lambda *xs: jnp.stack(xs), *[blocks[i] for i in range(num_layers)])
    return params


def test_scanned_layers_give_the_same_logits_for_the_same_weights():
    loop_cfg = tiny(num_layers=3)
    loop = make(loop_cfg)
    scan = Transformer(dataclasses.replace(loop_cfg, scan_layers=True), rngs=nnx.Rngs(1))
    state = nnx.state(scan, nnx.Param)
    nnx.replace_by_pure_dict(state, stack_blocks(nnx.to_pure_dict(nnx.state(loop, nnx.Param)), 3))
    nnx.update(scan, state)
    x = tokens((2, 9), seed=5)
    np.testing.assert_allclose(forward(scan, x), forward(loop, x), atol=1e-5)


def test_unstack_layers_holds_each_layer_of_the_stack_and_gives_the_same_logits():
    scan = make(tiny(num_layers=3, scan_layers=True))
    loop = unstack_layers(scan)
    assert not loop.cfg.scan_layers and len(loop.blocks) == 3 and unstack_layers(loop) is loop
    stacked = nnx.to_pure_dict(nnx.state(scan, nnx.Param))["blocks"]
    for i in range(3):
        one = nnx.to_pure_dict(nnx.state(loop.blocks[i], nnx.Param))
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b[i]), one, stacked)
    x = tokens((2, 9), seed=5)
    np.testing.assert_allclose(forward(loop, x), forward(scan, x), atol=1e-5)


def loss_and_grads(model, x):
    def loss(m):
        logits = m(x[:, :-1])
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), x[:, 1:, None], -1))

    return nnx.jit(lambda m: nnx.value_and_grad(loss)(m))(model)


@pytest.mark.parametrize("scan", [False, True], ids=["loop", "scan"])
def test_remat_policies_give_the_same_gradients(scan):
    x = tokens((2, 8), seed=6)
    ref_loss, ref_grads = loss_and_grads(make(tiny(scan_layers=scan)), x)
    for policy in ("full", "save_dots", "save_names"):
        loss, grads = loss_and_grads(make(tiny(scan_layers=scan, remat_policy=policy)), x)
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
        for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
            np.testing.assert_allclose(g, r, atol=1e-6)


@pytest.mark.parametrize("scan", [False, True], ids=["loop", "scan"])
def test_dropout_is_active_only_when_not_deterministic(scan):
    model = make(tiny(scan_layers=scan, dropout=0.5))
    x = tokens((2, 8), seed=7)

    @nnx.jit
    def train_forward(m, x):
        return m(x, deterministic=False)

    a, b = train_forward(model, x), train_forward(model, x)
    eval_out = forward(model, x)
    assert float(jnp.abs(a - b).max()) > 1e-3  # the stream advances between calls
    assert float(jnp.abs(a - eval_out).max()) > 1e-3
    np.testing.assert_array_equal(forward(model, x), eval_out)


def test_bfloat16_compute_with_float32_params():
    cfg32 = tiny()
    cfg16 = tiny(dtype="bfloat16")
    m32, m16 = make(cfg32), make(cfg16)
    assert m16.embed.embedding_vd[...].dtype == jnp.float32
    x = tokens((2, 8), seed=8)
    out16 = forward(m16, x)
    assert out16.dtype == jnp.float32
    cache = m16.init_cache(2)
    assert all(a.dtype == jnp.bfloat16 for a in jax.tree.leaves(cache))
    err = float(jnp.abs(out16 - forward(m32, x)).max())
    assert 0 < err < 0.1 * float(jnp.abs(forward(m32, x)).max())


def test_parameter_count_and_flops():
    for cfg in (tiny(), tiny(qk_norm="shared"), tiny(qk_norm="none", scan_layers=True)):
        model = Transformer(cfg, rngs=nnx.Rngs(0))
        actual = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
        assert count_params(cfg) == actual
    assert 6.9e9 < count_params(MODEL_PRESETS["chameleon-7b"]()) < 7.2e9
    assert 33e9 < count_params(MODEL_PRESETS["chameleon-34b"]()) < 35e9
    cfg = MODEL_PRESETS["chameleon-7b"]()
    n = count_params(cfg, include_embedding=False)
    assert flops_per_token(cfg, 4096) == 6 * n + 12 * 32 * 32 * 128 * 4096


# --------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("scan", [False, True], ids=["loop", "scan"])
def test_checkpoint_round_trip(tmp_path, scan):
    cfg = tiny(scan_layers=scan, qk_norm="shared")
    model = make(cfg)
    (tmp_path / "vocab").mkdir()
    (tmp_path / "vocab" / "keep.txt").write_text("other owners' files survive")
    save_model(tmp_path, model, cfg)
    loaded = load_model(tmp_path)
    assert loaded.cfg == cfg
    x = tokens((2, 7), seed=9)
    np.testing.assert_array_equal(forward(loaded, x), forward(model, x))
    assert (tmp_path / "vocab" / "keep.txt").read_text() == "other owners' files survive"
    bf16 = load_model(tmp_path, overrides={"dtype": "bfloat16", "param_dtype": "bfloat16"})
    assert bf16.lm_head.w_dv[...].dtype == jnp.bfloat16


def test_checkpoint_with_wrong_shape_names_the_tensor(tmp_path):
    cfg = tiny()
    save_model(tmp_path, make(cfg), cfg)
    data = json.loads((tmp_path / "config.json").read_text())
    data["ffn_dim"] = 128
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=r"blocks\.0\.mlp\.w1_df has shape \(64, 192\)"):
        load_model(tmp_path)
    data["ffn_dim"], data["qk_norm"] = 192, "shared"
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=r"missing tensor blocks\.0\.attn\.q_norm\.scale_h"):
        load_model(tmp_path)


def test_directory_without_config_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        load_model(tmp_path)
    with pytest.raises(CheckpointError, match="cannot override num_layers"):
        cfg = tiny()
        save_model(tmp_path / "m", make(cfg), cfg)
        load_model(tmp_path / "m", overrides={"num_layers": 3})


def test_scanned_model_decodes_inside_a_while_loop_it_was_not_built_in():
    cfg = tiny(scan_layers=True, max_seq_len=8)
    model = make(cfg)
    seq = tokens((1, 5), seed=10)
    full = forward(model, seq)[0]

    @nnx.jit
    def run(m, seq):
        mask = jnp.ones((1, cfg.max_seq_len), bool)

        def body(carry):
            i, cache, out = carry
            logits, cache = m.decode(jax.lax.dynamic_slice_in_dim(seq, i, 1, axis=1), i[None, None], cache, i, mask)
            return i + 1, cache, out.at[i].set(logits[0, 0])

        init = (jnp.int32(0), m.init_cache(1), jnp.zeros((5, cfg.vocab_size)))
        return jax.lax.while_loop(lambda c: c[0] < 5, body, init)[2]

    np.testing.assert_allclose(run(model, seq), full, atol=1e-4)

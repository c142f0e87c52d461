"""Logits processing and guidance arithmetic, on small hand-made arrays."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from chameleon_jax.generation.guidance import Guidance, combine, image_only_prompt, resolve_guidance
from chameleon_jax.generation.sampling import SamplingParams, choose_tokens, filter_logits, mask_logits

PROBS = np.array([0.05, 0.5, 0.15, 0.3], np.float32)
LOGITS = jnp.log(jnp.asarray(PROBS))[None]


def kept(logits, **kw) -> list[int]:
    args = dict(temperature_b=jnp.ones([1]), top_k_b=jnp.zeros([1], jnp.int32), top_p_b=jnp.ones([1]))
    args.update({k: jnp.asarray([v]) for k, v in kw.items() if k.endswith("_b")})
    out = filter_logits(logits, args["temperature_b"], args["top_k_b"], args["top_p_b"],
                        use_top_k=kw.get("use_top_k", True), use_top_p=kw.get("use_top_p", True))
    return np.flatnonzero(np.isfinite(np.asarray(out[0]))).tolist()


def test_top_k_keeps_the_k_most_likely():
    assert kept(LOGITS, top_k_b=2) == [1, 3]
    assert kept(LOGITS, top_k_b=0) == [0, 1, 2, 3]  # 0 = off


@pytest.mark.parametrize("p,expected", [(0.5, [1]), (0.7, [1, 3]), (0.9, [1, 2, 3]), (1.0, [0, 1, 2, 3])])
def test_top_p_keeps_the_smallest_set_reaching_p(p, expected):
    assert kept(LOGITS, top_p_b=p) == expected


def test_top_k_then_top_p_and_masks_compose():
    assert kept(LOGITS, top_k_b=3, top_p_b=0.9) == [1, 2, 3]
    masked = mask_logits(LOGITS, jnp.asarray([[True, False, True, True]]))
    assert kept(masked, top_p_b=0.7) == [2, 3]  # renormalised over what is allowed


def test_temperature_zero_is_argmax_and_ignores_filters():
    logits = jnp.asarray([[0.1, 2.0, 1.0], [3.0, 0.0, 1.0]])
    t = jnp.zeros([2])
    out = filter_logits(logits, t, jnp.asarray([1, 1]), jnp.asarray([0.1, 0.1]), use_top_k=True, use_top_p=True)
    assert choose_tokens(jax.random.key(0), jnp.arange(2), out, t).tolist() == [1, 0]


def test_sampling_follows_the_distribution_and_the_seed():
    logits = jnp.broadcast_to(LOGITS, (4000, 4))
    t = jnp.ones([4000])
    draws = np.asarray(choose_tokens(jax.random.key(1), jnp.arange(4000), logits, t))
    np.testing.assert_allclose(np.bincount(draws, minlength=4) / 4000, PROBS, atol=0.03)
    again = np.asarray(choose_tokens(jax.random.key(1), jnp.arange(4000), logits, t))
    assert (draws == again).all()


def test_sampling_params_reject_bad_values():
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1.0)


def test_guidance_forms_from_user_knobs():
    assert resolve_guidance().form == "none" and resolve_guidance(1.0).form == "none"
    assert resolve_guidance(3.0) == Guidance("two", scale=3.0)
    assert resolve_guidance(cfg_image_scale=1.2, cfg_text_scale=3.0) == Guidance("three", image_scale=1.2, text_scale=3.0)
    assert resolve_guidance(cfg_text_scale=3.0).image_scale == 1.0
    with pytest.raises(ValueError, match="not both"):
        resolve_guidance(2.0, cfg_image_scale=1.5)


def test_guidance_arithmetic():
    rng = np.random.default_rng(0)
    f, u, i = (rng.normal(size=(2, 5)).astype(np.float32) for _ in range(3))
    scales = jnp.asarray([2.5, 1.2, 3.0])
    rows = lambda *streams: jnp.asarray(np.stack(streams, axis=1).reshape(-1, 5))  # a prompt's streams adjacent
    np.testing.assert_allclose(combine(rows(f, u), scales, form="two"), u + 2.5 * (f - u), rtol=1e-6)
    np.testing.assert_allclose(combine(rows(f, u, i), scales, form="three"),
                               u + 1.2 * (i - u) + 3.0 * (f - i), rtol=1e-5, atol=1e-6)


def test_image_only_prompt_keeps_whole_images_and_drops_text():
    bos, boi, eoi = 0, 8, 9
    assert image_only_prompt([bos, 5, boi, 20, 21, eoi, 6, boi, 22, eoi, 7], bos_id=bos, boi_id=boi, eoi_id=eoi) == [
        bos, boi, 20, 21, eoi, boi, 22, eoi]


def test_first_argmax_and_the_gumbel_draw_match_jax():
    from chameleon_jax.generation.sampling import first_argmax

    logits = jax.random.normal(jax.random.key(1), (6, 300)) * 3
    logits = logits.at[:, 40:].set(-jnp.inf).at[0].set(-jnp.inf).at[1, 7].set(9.0).at[1, 3].set(9.0)
    np.testing.assert_array_equal(first_argmax(logits), jnp.argmax(logits, axis=-1))  # ties: first index
    rows = jnp.arange(6)
    for seed in range(5):
        key = jax.random.key(seed)
        want = jax.vmap(jax.random.categorical)(jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, rows), logits)
        np.testing.assert_array_equal(choose_tokens(key, rows, logits, jnp.ones(6)), want)


def test_only_the_modalities_a_call_can_sample_shape_the_compiled_step():
    from chameleon_jax.generation.decode import decode_spec

    greedy, sampled = SamplingParams(0.0), SamplingParams(1.0, top_k=5, top_p=0.9)

    def spec(modality, text, image, codes=64):
        return decode_spec(limit=8, codes_per_image=codes, modality=modality, form="none", text=text, image=image,
                           return_logits=False)

    # Greedy text with sampled image settings: no random draws, no sort.
    s = spec("text", greedy, sampled)
    assert (s.use_sampling, s.use_top_k, s.use_top_p) == (False, False, False)
    s = spec("any", greedy, sampled, codes=0)  # no image tokenizer: images never open
    assert not s.use_sampling
    # modality="image" never samples text (the <boi> is forced, the row ends at <eoi>).
    s = spec("image", sampled, greedy)
    assert (s.use_sampling, s.use_top_k, s.use_top_p) == (False, False, False)
    s = spec("any", greedy, sampled)
    assert (s.use_sampling, s.use_top_k, s.use_top_p) == (True, True, True)
    assert spec("text", sampled, greedy).use_sampling

"""Logits processing and token choice: masking, temperature, top-k, top-p, greedy.

Every knob is a per-row array, so rows in different modes (text or image)
use their own settings in the same compiled step, and changing a value never
recompiles. Whether top-k / top-p run at all is static (they need a sort over
the vocabulary, which the loop skips when neither is asked for).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

NEG_INF = float("-inf")


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How one modality's tokens are chosen."""

    temperature: float = 1.0  # 0 = greedy (argmax)
    top_k: int = 0  # keep the k most likely tokens; 0 = off
    top_p: float = 1.0  # keep the smallest set whose probability reaches p; 1 = off

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def uses_top_k(self) -> bool:
        return self.top_k > 0 and self.temperature > 0

    @property
    def uses_top_p(self) -> bool:
        return self.top_p < 1.0 and self.temperature > 0


def mask_logits(logits_bv: jax.Array, allowed_bv: jax.Array) -> jax.Array:
    """Disallowed tokens get -inf. Every row must allow at least one token."""
    return jnp.where(allowed_bv, logits_bv.astype(jnp.float32), NEG_INF)


def filter_logits(
    logits_bv: jax.Array,
    temperature_b: jax.Array,
    top_k_b: jax.Array,
    top_p_b: jax.Array,
    *,
    use_top_k: bool,
    use_top_p: bool,
) -> jax.Array:
    """Temperature, then top-k, then top-p (the order Hugging Face and Meta's reference use).

    logits_bv: float32 [B, V] with -inf on disallowed tokens. Rows with
    temperature 0 are returned unscaled (they are decoded greedily). Returns
    float32 [B, V]; tokens cut by top-k / top-p are -inf.
    """
    greedy_b = temperature_b <= 0
    safe_t_b = jnp.where(greedy_b, 1.0, temperature_b)
    scaled_bv = logits_bv / safe_t_b[:, None]
    if not (use_top_k or use_top_p):
        return scaled_bv
    vocab = scaled_bv.shape[-1]
    sorted_bv = -jnp.sort(-scaled_bv, axis=-1)  # descending
    keep_from_b = jnp.full(scaled_bv.shape[:1], NEG_INF, jnp.float32)
    if use_top_k:
        k_b = jnp.clip(top_k_b, 1, vocab)
        kth_b = jnp.take_along_axis(sorted_bv, (k_b - 1)[:, None], axis=-1)[:, 0]
        keep_from_b = jnp.where(top_k_b > 0, kth_b, keep_from_b)
        sorted_bv = jnp.where(sorted_bv >= keep_from_b[:, None], sorted_bv, NEG_INF)
    if use_top_p:
        probs_bv = jax.nn.softmax(sorted_bv, axis=-1)
        mass_before_bv = jnp.cumsum(probs_bv, axis=-1) - probs_bv
        # The most likely token is always kept (its mass_before is 0).
        kept_bv = (mass_before_bv < top_p_b[:, None]) & (sorted_bv > NEG_INF)
        pth_b = jnp.min(jnp.where(kept_bv, sorted_bv, jnp.inf), axis=-1)
        keep_from_b = jnp.where(top_p_b < 1.0, jnp.maximum(keep_from_b, pth_b), keep_from_b)
    keep_from_b = jnp.where(greedy_b, NEG_INF, keep_from_b)
    return jnp.where(scaled_bv >= keep_from_b[:, None], scaled_bv, NEG_INF)


def first_argmax(x_bv: jax.Array) -> jax.Array:
    """int32 [B]: the first index of each row's maximum, as `jnp.argmax` gives it.

    Two plain reductions (max, then the smallest index holding it): XLA's CPU
    argmax reduces (value, index) pairs and takes about 4x as long over a
    2048-token vocabulary, once or twice per decode step. A row with a NaN
    (never a valid logit here) gets the last index.
    """
    vocab = x_bv.shape[-1]
    top_b1 = jnp.max(x_bv, axis=-1, keepdims=True)
    index_bv = jnp.where(x_bv == top_b1, jnp.arange(vocab, dtype=jnp.int32), vocab - 1)
    return jnp.min(index_bv, axis=-1)


def choose_tokens(key: jax.Array, row_ids_b: jax.Array, logits_bv: jax.Array, temperature_b: jax.Array) -> jax.Array:
    """Samples one token per row from filtered logits; argmax where temperature is 0.

    Each row draws from its own key `fold_in(key, row_id)`, so a row's samples
    depend on the seed, the step and its index, not on the other rows.
    Returns int32 [B].
    """
    greedy_b = first_argmax(logits_bv)
    row_keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, row_ids_b)
    # The Gumbel-max draw jax.random.categorical makes (the same noise, so the same samples).
    gumbel_bv = jax.vmap(lambda k: jax.random.gumbel(k, logits_bv.shape[-1:], logits_bv.dtype))(row_keys)
    sampled_b = first_argmax(logits_bv + gumbel_bv)
    return jnp.where(temperature_b <= 0, greedy_b, sampled_b)

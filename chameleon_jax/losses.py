"""Weighted next-token cross entropy with z-loss, reported per modality.

The functions return *sums* (weighted loss, total weight, per-modality sums), not
means: gradient accumulation and data parallelism then divide once by the weight
of the whole global batch, so a batch gives the same loss whether it is split
into microbatches or not.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from chameleon_jax.sequence import IMAGE, TEXT

SUM_KEYS = ("loss_sum", "ce_sum", "z_sum", "weight_sum", "text_ce_sum", "text_weight_sum",
            "image_ce_sum", "image_weight_sum", "correct_sum")


def token_cross_entropy(logits_btv: jax.Array, targets_bt: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-token cross entropy and log-partition, both float32 [B, T]."""
    ce_bt, log_z_bt, _ = _cross_entropy_parts(logits_btv, targets_bt)
    return ce_bt, log_z_bt


def _cross_entropy_parts(logits_btv, targets_bt):
    logits_btv = logits_btv.astype(jnp.float32)
    log_z_bt = jax.nn.logsumexp(logits_btv, axis=-1)
    # A masked sum, not take_along_axis: its gradient is a select that fuses with the
    # softmax's, where take_along_axis's is a scatter into a [B, T, V] zero array.
    is_target_btv = jnp.arange(logits_btv.shape[-1], dtype=jnp.int32) == targets_bt[..., None].astype(jnp.int32)
    target_logit_bt = jnp.sum(jnp.where(is_target_btv, logits_btv, 0.0), axis=-1)
    # "The target has the top logit" without an argmax pass (argmax is slow on CPU); ties count as correct.
    correct_bt = (target_logit_bt >= jnp.max(logits_btv, axis=-1)).astype(jnp.float32)
    return log_z_bt - target_logit_bt, log_z_bt, correct_bt


def lm_loss_sums(
    logits_btv: jax.Array,
    targets_bt: jax.Array,
    weights_bt: jax.Array,
    modality_bt: jax.Array,
    z_loss: float,
) -> dict[str, jax.Array]:
    """Weighted sums over a batch (float32 scalars, keys `SUM_KEYS`).

    loss_sum = sum_t w_t * (ce_t + z_loss * log(Z_t)^2); dividing by weight_sum gives
    the training loss. text/image sums split the (unweighted-by-z) cross entropy by
    the target's modality, for reporting.
    """
    ce_bt, log_z_bt, correct_bt = _cross_entropy_parts(logits_btv, targets_bt)
    w_bt = weights_bt.astype(jnp.float32)
    z_bt = z_loss * jnp.square(log_z_bt)
    text_w = w_bt * (modality_bt == TEXT)
    image_w = w_bt * (modality_bt == IMAGE)
    return {
        "loss_sum": jnp.sum(w_bt * (ce_bt + z_bt)),
        "ce_sum": jnp.sum(w_bt * ce_bt),
        "z_sum": jnp.sum(w_bt * z_bt),
        "weight_sum": jnp.sum(w_bt),
        "text_ce_sum": jnp.sum(text_w * ce_bt),
        "text_weight_sum": jnp.sum(text_w),
        "image_ce_sum": jnp.sum(image_w * ce_bt),
        "image_weight_sum": jnp.sum(image_w),
        "correct_sum": jnp.sum(w_bt * correct_bt),
    }


def means_from_sums(sums: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """loss, ce, z_loss, text_loss, image_loss, accuracy (means; NaN where a modality has no weight)."""

    def div(a, b):
        return jnp.where(b > 0, a / jnp.maximum(b, 1e-30), jnp.nan)

    w = sums["weight_sum"]
    return {
        "loss": div(sums["loss_sum"], w),
        "ce": div(sums["ce_sum"], w),
        "z_loss": div(sums["z_sum"], w),
        "text_loss": div(sums["text_ce_sum"], sums["text_weight_sum"]),
        "image_loss": div(sums["image_ce_sum"], sums["image_weight_sum"]),
        "accuracy": div(sums["correct_sum"], w),
        "loss_weight": w,
    }

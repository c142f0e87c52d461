"""Pallas splash attention (TPU), for causal training rows with packed segments.

`splash_attention(q, k, v, segment_ids)` wraps
`jax.experimental.pallas.ops.tpu.splash_attention`: causal mask, segment ids for packed
rows, grouped-query attention as it is (the kernel reads each KV head for its N/K query
heads; nothing is repeated), forward and backward kernels. It never forms the
[B, N, T, T] scores: it keeps the output and a [N, T] log-sum-exp per row.

The kernel works on blocks of 128 lanes, so a length that is not a multiple of 128 is
padded at the end and the padding cut off again: padded keys lie in every real query's
future, so causality hides them; padded queries are discarded. Block sizes follow the
padded length (`block_sizes`). Off TPU the kernel runs in Pallas interpret mode: exact,
slow, for tests on a CPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

LANES = 128  # the kernel's tile width: block sizes, and so padded lengths, are multiples of it
MAX_BLOCK = 512


def padded_length(t: int) -> int:
    return -(-t // LANES) * LANES


def block_size(t_padded: int) -> int:
    """The largest of 512, 256, 128 that divides the padded length (bigger blocks, fewer grid steps)."""
    for b in (MAX_BLOCK, 256, LANES):
        if t_padded % b == 0:
            return b
    raise ValueError(f"splash attention length {t_padded} is not a multiple of {LANES}")


@functools.lru_cache(maxsize=32)
def _kernel(num_heads: int, t: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    b = block_size(t)
    sizes = sk.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b,
                          block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
    mask = sm.MultiHeadMask([sm.CausalMask((t, t)) for _ in range(num_heads)])
    return sk.make_splash_mha_single_device(mask, block_sizes=sizes, interpret=interpret)


def splash_attention(q_btnh, k_btkh, v_btkh, segment_ids_bt=None, *, interpret: bool | None = None) -> jax.Array:
    """Causal attention [B, T, N, H] of q [B, T, N, H] over k, v [B, T, K, H] (N a multiple of K).

    segment_ids_bt: int [B, T]; a query sees only keys of its own segment. interpret:
    run the Pallas interpreter (default: whenever the backend is not a TPU).
    """
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk

    b, t, n, h = q_btnh.shape
    if k_btkh.shape[1] != t:
        raise ValueError(f"splash attention is causal self-attention: {t} queries but {k_btkh.shape[1]} keys")
    if n % k_btkh.shape[2]:
        raise ValueError(f"splash attention: {n} query heads are not a multiple of {k_btkh.shape[2]} kv heads")
    if interpret is None:
        interpret = jax.default_backend() != "tpu"
    tp = padded_length(t)
    pad = [(0, 0), (0, tp - t), (0, 0), (0, 0)]
    # The kernel does not scale the logits and wants heads first: [N, T, H] per row.
    q_bnth = jnp.pad(q_btnh * jnp.asarray(h ** -0.5, q_btnh.dtype), pad).transpose(0, 2, 1, 3)
    k_bkth, v_bkth = (jnp.pad(a, pad).transpose(0, 2, 1, 3) for a in (k_btkh, v_btkh))
    kernel = _kernel(n, tp, interpret)
    if segment_ids_bt is None:
        out_bnth = jax.vmap(kernel)(q_bnth, k_bkth, v_bkth)
    else:
        seg_bt = jnp.pad(segment_ids_bt.astype(jnp.int32), [(0, 0), (0, tp - t)])
        out_bnth = jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=sk.SegmentIds(s, s)))(
            q_bnth, k_bkth, v_bkth, seg_bt)
    return out_bnth.transpose(0, 2, 1, 3)[:, :t]

"""Ring attention: causal self-attention over a token dimension split across a mesh axis.

Each device holds one contiguous block of T/S tokens (S devices on the ring). Its
queries stay put; the key, value and segment-id blocks travel around the ring with
`ppermute`, one hop per step, and the softmax is accumulated online (running max,
running sum, running weighted values), so no device ever holds more than its own
block of keys or a [T/S, T/S] block of scores. After S - 1 hops every query has met
every key block. The backward pass keeps, per step, the key/value block and the running
statistics, and rebuilds that step's scores (`jax.checkpoint`).

Causal schedule: at step i, device d holds the keys of device (d - i) mod S. For
i > 0 that block lies wholly in the future of d's queries when d < i, so the device
skips the block's arithmetic (`lax.cond`) and only forwards it. Segment ids travel
with the keys, so packed documents never see each other.

All of it runs under `shard_map` on the active mesh; the batch and head dimensions
keep whatever sharding the rules give them, the ring only splits tokens.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec


def _ring_block_attention(q_btnh, k_btkh, v_btkh, seg_q_bt, *, axis, size: int, mesh_axes: tuple) -> jax.Array:
    """The per-device body: this device's queries against every key block of the ring."""
    b, t, n, h = q_btnh.shape
    kv = k_btkh.shape[2]
    g = n // kv
    me = jax.lax.axis_index(axis)
    q_btkgh = q_btnh.reshape(b, t, kv, g, h) * jnp.asarray(h ** -0.5, q_btnh.dtype)
    q_pos_t = me * t + jnp.arange(t)
    neg = jnp.finfo(jnp.float32).min
    ring = [(j, (j + 1) % size) for j in range(size)]

    # Rematerialised: the backward pass rebuilds each block's [T/S, T/S] scores from the key
    # block and the running statistics instead of keeping S blocks of scores per layer.
    @jax.checkpoint
    def attend(src, k_btkh, v_btkh, seg_k_bt, carry):
        m_bkgt, l_bkgt, acc_bkgth = carry
        logits = jnp.einsum("btkgh,bskh->bkgts", q_btkgh, k_btkh, preferred_element_type=jnp.float32)
        k_pos_s = src * t + jnp.arange(t)
        allowed_bts = (k_pos_s[None, None, :] <= q_pos_t[None, :, None]) & (
            seg_q_bt[:, :, None] == seg_k_bt[:, None, :])
        logits = jnp.where(allowed_bts[:, None, None], logits, neg)
        # The running max only keeps exp() in range; the result does not depend on it.
        m_new = jax.lax.stop_gradient(jnp.maximum(m_bkgt, jnp.max(logits, axis=-1)))
        weights = jnp.exp(logits - m_new[..., None])
        rescale = jnp.exp(m_bkgt - m_new)
        pv = jnp.einsum("bkgts,bskh->bkgth", weights.astype(v_btkh.dtype), v_btkh,
                        preferred_element_type=jnp.float32)
        return m_new, l_bkgt * rescale + jnp.sum(weights, axis=-1), acc_bkgth * rescale[..., None] + pv

    def step(carry, i):
        acc, (k_cur, v_cur, seg_cur) = carry
        # At step i this device holds the block of device me - i: wholly in the past when
        # me >= i, wholly in the future otherwise (skipped). Step 0 is the diagonal block.
        src = (me - i) % size
        acc = jax.lax.cond(me >= i, functools.partial(attend, src, k_cur, v_cur, seg_cur), lambda c: c, acc)
        return (acc, tuple(jax.lax.ppermute(a, axis, ring) for a in (k_cur, v_cur, seg_cur))), None

    acc = (jnp.full((b, kv, g, t), neg, jnp.float32), jnp.zeros((b, kv, g, t), jnp.float32),
           jnp.zeros((b, kv, g, t, h), jnp.float32))
    acc = jax.lax.pcast(acc, mesh_axes, to="varying")  # per-device values, like what `attend` returns
    # The last hop would bring the blocks home again: the final step runs outside the scan without it.
    (acc, (k_last, v_last, seg_last)), _ = jax.lax.scan(step, (acc, (k_btkh, v_btkh, seg_q_bt)), jnp.arange(size - 1))
    carry = jax.lax.cond(me >= size - 1, functools.partial(attend, (me + 1) % size, k_last, v_last, seg_last),
                         lambda c: c, acc)
    _, l_bkgt, acc_bkgth = carry
    out_bkgth = acc_bkgth / l_bkgt[..., None]
    return jnp.einsum("bkgth->btkgh", out_bkgth).reshape(b, t, n, h).astype(q_btnh.dtype)


def ring_attention(q_btnh, k_btkh, v_btkh, segment_ids_bt, *, mesh: Mesh, q_spec: PartitionSpec,
                   kv_spec: PartitionSpec, segment_spec: PartitionSpec) -> jax.Array:
    """Causal attention [B, T, N, H] with the tokens split over the mesh axis (or axes) in q_spec[1].

    q [B, T, N, H], k and v [B, T, K, H] (N a multiple of K), segment ids int [B, T] (a query
    sees keys of its own segment only); the specs say how each is sharded, and T must be
    split the same way in all of them. With the query heads split over an axis, the key
    heads must be split over the same axis so each device holds whole groups.
    """
    axis = q_spec[1]
    if axis is None or kv_spec[1] != axis or segment_spec[1] != axis:
        raise ValueError(f"ring attention needs the token dimension split alike: q {q_spec}, kv {kv_spec}, "
                         f"segments {segment_spec}")
    if q_spec[2] != kv_spec[2]:
        raise ValueError(f"ring attention: query heads ({q_spec[2]}) and kv heads ({kv_spec[2]}) must be split alike")
    names = axis if isinstance(axis, tuple) else (axis,)
    size = 1
    for a in names:
        size *= mesh.shape[a]
    body = functools.partial(_ring_block_attention, axis=axis, size=size, mesh_axes=tuple(mesh.axis_names))
    fn = jax.shard_map(body, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, segment_spec), out_specs=q_spec)
    return fn(q_btnh, k_btkh, v_btkh, segment_ids_bt.astype(jnp.int32))

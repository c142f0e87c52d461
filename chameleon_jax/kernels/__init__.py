"""Attention kernels and the one rule that picks among them.

One file per kernel, each taking grouped-query attention as it is (N query heads
against K key/value heads, the keys never repeated):

- `reference.naive_attention`: an explicit einsum softmax, the readable reference;
- `chunked.chunked_attention`: query blocks that skip the keys causality hides (CPU);
- `splash.splash_attention`: Pallas splash attention (TPU; interpret mode elsewhere);
- `ring.ring_attention`: tokens split over a mesh axis, keys passed around the ring;
- `decode.decode_step_attention`: a decode step's few queries per row against the KV cache;
- XLA's `jax.nn.dot_product_attention` (`xla`, or `cudnn` flash attention on GPU).

`dot_product_attention` dispatches: ring attention wherever the rules table splits
the token dimension over the active mesh, else the kernel `resolve_implementation`
names (splash per device under `shard_map`, with batch and heads split as the rules say). Splash and ring take causal masks and segment ids only, so a call with any
other mask (a decode prefill against the cache) goes to the dense-mask kernels.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from chameleon_jax.kernels.chunked import CHUNK, chunked_attention
from chameleon_jax.kernels.decode import decode_step_attention
from chameleon_jax.kernels.reference import naive_attention
from chameleon_jax.kernels.ring import ring_attention
from chameleon_jax.kernels.splash import splash_attention
from chameleon_jax.sharding import active_mesh, logical_to_spec
from jax.sharding import PartitionSpec

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "chunked", "naive", "splash")
Q_AXES = ("activation_batch", "activation_length", "activation_heads", None)
KV_AXES = ("activation_batch", "activation_length", "activation_kv_heads", None)
SEGMENT_AXES = ("activation_batch", "activation_length")

__all__ = ["CHUNK", "IMPLEMENTATIONS", "chunked_attention", "decode_step_attention", "dot_product_attention",
           "naive_attention", "resolve_implementation", "ring_attention", "splash_attention"]


def resolve_implementation(impl: str, dtype, head_dim: int, backend: str | None = None, *,
                           segments_only: bool = True) -> str:
    """The kernel `impl` stands for on this backend.

    `auto` picks splash attention on TPU (head_dim a multiple of 128, the kernel's lane
    width), cuDNN flash attention on GPU when it can run (half precision, head_dim a
    multiple of 8 up to 128), `chunked` on CPU, and XLA otherwise. `segments_only`: the
    call's mask is causality plus segment ids; when False (a dense mask, as in a decode
    prefill), `splash` stands for `xla`, the kernel that takes any mask.
    """
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation must be one of {IMPLEMENTATIONS}, got {impl!r}")
    if impl == "auto":
        backend = backend or jax.default_backend()
        half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
        cudnn_ok = half and head_dim % 8 == 0 and head_dim <= 128
        if backend == "cpu":
            impl = "chunked"
        elif backend == "tpu" and head_dim % 128 == 0:
            impl = "splash"
        else:
            impl = "cudnn" if backend == "gpu" and cudnn_ok else "xla"
    if impl == "splash" and not segments_only:
        return "xla"
    return impl


def attention_specs(q_shape, kv_shape) -> tuple | None:
    """(mesh, q spec, kv spec, segment spec) of a self-attention call under the active rules; None without a mesh."""
    active = active_mesh()
    if active is None:
        return None
    mesh, rules = active
    q_spec = logical_to_spec(Q_AXES, rules, q_shape, mesh)
    kv_spec = logical_to_spec(KV_AXES, rules, kv_shape, mesh)
    if q_spec[2] != kv_spec[2]:  # query heads split where kv heads cannot be: keep whole groups per device
        q_spec = PartitionSpec(q_spec[0], q_spec[1], kv_spec[2], None)
    return mesh, q_spec, kv_spec, logical_to_spec(SEGMENT_AXES, rules, q_shape[:2], mesh)


def sequence_split(q_shape, kv_shape) -> tuple | None:
    """`attention_specs` when the active rules split the token dimension over more than one device, else None."""
    specs = attention_specs(q_shape, kv_shape)
    if specs is None or specs[1][1] is None:
        return None
    mesh, axes = specs[0], specs[1][1]
    return specs if math.prod(mesh.shape[a] for a in (axes if isinstance(axes, tuple) else (axes,))) > 1 else None


def _splash_sharded(q_btnh, k_btkh, v_btkh, segment_ids_bt) -> jax.Array:
    """Splash attention per device under shard_map (a Pallas kernel is not partitioned by XLA itself)."""
    specs = attention_specs(q_btnh.shape, k_btkh.shape)
    if specs is None:
        return splash_attention(q_btnh, k_btkh, v_btkh, segment_ids_bt)
    mesh, q_spec, kv_spec, segment_spec = specs
    if segment_ids_bt is None:
        segment_ids_bt = jnp.zeros(q_btnh.shape[:2], jnp.int32)
    fn = jax.shard_map(splash_attention, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, segment_spec),
                       out_specs=q_spec, check_vma=False)
    return fn(q_btnh, k_btkh, v_btkh, segment_ids_bt)


def dot_product_attention(
    q_btnh: jax.Array,
    k_bskh: jax.Array,
    v_bskh: jax.Array,
    mask_b1ts: jax.Array | None = None,
    *,
    is_causal: bool = False,
    implementation: str = "xla",
    segment_ids_bt: jax.Array | None = None,
) -> jax.Array:
    """Attention output [B, T, N, H]. `is_causal` assumes queries and keys are aligned (T == S).

    segment_ids_bt: int [B, T], given when `mask_b1ts` is exactly `segment_mask` of these
    ids; the kernels that read ids instead of a dense mask (splash, ring) need them.
    """
    segments_only = is_causal and (mask_b1ts is None or segment_ids_bt is not None)
    if segments_only:
        split = sequence_split(q_btnh.shape, k_bskh.shape)
        if split is not None:
            mesh, q_spec, kv_spec, segment_spec = split
            if segment_ids_bt is None:
                segment_ids_bt = jnp.zeros(q_btnh.shape[:2], jnp.int32)
            return ring_attention(q_btnh, k_bskh, v_bskh, segment_ids_bt, mesh=mesh, q_spec=q_spec,
                                  kv_spec=kv_spec, segment_spec=segment_spec)
    impl = resolve_implementation(implementation, q_btnh.dtype, q_btnh.shape[-1], segments_only=segments_only)
    if impl == "naive":
        return naive_attention(q_btnh, k_bskh, v_bskh, mask_b1ts, is_causal=is_causal)
    if impl == "chunked":
        return chunked_attention(q_btnh, k_bskh, v_bskh, mask_b1ts, is_causal=is_causal)
    if impl == "splash":
        return _splash_sharded(q_btnh, k_bskh, v_bskh, segment_ids_bt)
    return jax.nn.dot_product_attention(
        q_btnh, k_bskh, v_bskh, mask=mask_b1ts, is_causal=is_causal, implementation=impl
    )

"""Building blocks of the Chameleon decoder: the projection matmul, norms, embeddings, SwiGLU, RoPE.

Every parameter is an `nnx.Param` carrying logical axis names in its `out_sharding`
metadata (`embed`, `mlp`, `heads`, ...). The names are mapped to mesh axes by the
rules table in `MeshConfig` (see `chameleon_jax.sharding`); the layers never name
mesh axes. Parameters are stored in `param_dtype` and cast to the compute `dtype`
where they are used; norms always compute their statistics in float32.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from chameleon_jax.config import ModelConfig
from chameleon_jax.sharding import constrain

Initializer = Callable[[jax.Array, Sequence[int], jnp.dtype], jax.Array]


def matmul_dtype_of(cfg: ModelConfig) -> jnp.dtype | None:
    """The projections' operand dtype (see `dense`); None = the compute dtype they are cast to."""
    return dtype_of(cfg.matmul_dtype) if cfg.matmul_dtype else None


def dtype_of(name: str) -> jnp.dtype:
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[name]


def make_param(
    rngs: nnx.Rngs, init: Initializer, shape: Sequence[int], logical_axes: Sequence[str], param_dtype
) -> nnx.Param:
    """An `nnx.Param` tagged with logical axis names (one per dimension).

    Eager sharding is off: the names are logical, so they only become a placement
    once a rules table maps them (`sharding.state_shardings`).
    """
    if len(logical_axes) != len(shape):
        raise ValueError(f"{len(shape)}-d parameter needs {len(shape)} logical axes, got {logical_axes}")
    value = init(rngs.params(), tuple(shape), param_dtype)
    return nnx.Param(value, out_sharding=tuple(logical_axes), eager_sharding=False)


DENSE_NAME = "dense_out"  # the checkpoint name of every projection's output (see transformer.remat_policy)


def dense(x: jax.Array, w: jax.Array, out_dtype=None, operand_dtype=None) -> jax.Array:
    """x [..., D] contracted with w [D, *out]: [..., *out] (a projection with no bias).

    The same product as `jnp.einsum("...d,d...->...", x, w)`, with its own backward
    pass. The weight gradient contracts the token dimensions of x and dy, and XLA's
    CPU matmuls want the left operand's contracted dimension innermost, so the left
    operand gets copied transposed. JAX's generic rule always puts dy on the left:
    for the [tokens, vocab] logits gradient and the [tokens, ffn] SwiGLU ones that
    is the wide side. Here the narrower of x and dy goes on the left (x^T dy, or
    (dy^T x)^T with a small transpose of the result). On the `small` preset this
    takes about a tenth off a CPU training step.

    operand_dtype: the dtype x, w (and in the backward pass dy) are rounded to for the
    products; None = as they come. Operands narrower than float32 accumulate in
    float32: XLA's CPU backend runs bf16 x bf16 -> f32 on its fast (AMX) path and
    bf16 x bf16 -> bf16 on a slow one, and TPUs and GPUs accumulate so anyway. The
    result has out_dtype (float32 logits from bfloat16 inputs), else x's dtype; dx
    and dw have x's and w's dtypes.
    """
    dtypes = (jnp.dtype(out_dtype or x.dtype), None if operand_dtype is None else jnp.dtype(operand_dtype),
              jnp.dtype(x.dtype), jnp.dtype(w.dtype))
    y = _dense(x, w, dtypes)
    # Remat policies look for dot_general, which the custom rule hides: name it instead.
    return checkpoint_name(y, DENSE_NAME)


def _dot(a, b, dims, out_dtype):
    """dot_general in float32 accumulation when an operand is narrower, cast to out_dtype."""
    narrow = any(jnp.dtype(v.dtype).itemsize < 4 for v in (a, b))
    y = jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32 if narrow else None)
    return y.astype(out_dtype)


def _round(v, dtype):
    return v if dtype is None else v.astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _dense(x, w, dtypes):
    return _dense_fwd(x, w, dtypes)[0]


def _dense_fwd(x, w, dtypes):
    """dtypes: (result, operands or None, x's, w's). The residuals are the rounded operands."""
    out_dtype, op_dtype = dtypes[:2]
    x, w = _round(x, op_dtype), _round(w, op_dtype)
    return _dot(x, w, (((x.ndim - 1,), (0,)), ((), ())), out_dtype), (x, w)


def _dense_bwd(dtypes, residuals, dy):
    _, op_dtype, x_dtype, w_dtype = dtypes
    x, w = residuals
    dy = _round(dy, op_dtype)
    out_axes = tuple(range(x.ndim - 1, dy.ndim))
    dx = _dot(dy, w, ((out_axes, tuple(range(1, w.ndim))), ((), ())), x_dtype)
    lead = tuple(range(x.ndim - 1))
    if x.shape[-1] <= w.size // w.shape[0]:
        dw = _dot(x, dy, ((lead, lead), ((), ())), w_dtype)
    else:  # dy is the narrower one: form dw^T = dy^T x and transpose the (small) result
        # The barrier keeps XLA from folding the transpose back into the product, which
        # would contract the wide x on the left; on a CPU its bf16 x bf16 -> f32 form of
        # that product also has no kernel.
        dw_t = jax.lax.optimization_barrier(_dot(dy, x, ((lead, lead), ((), ())), w_dtype))
        dw = jnp.moveaxis(dw_t, -1, 0)
    return dx, dw


_dense.defvjp(_dense_fwd, _dense_bwd)


def normal(stddev: float) -> Initializer:
    return jax.nn.initializers.normal(stddev)


ones = jax.nn.initializers.ones
zeros = jax.nn.initializers.zeros


class RMSNorm(nnx.Module):
    """y = x / sqrt(mean(x^2) + eps) * scale, statistics in float32."""

    def __init__(self, dim: int, *, eps: float, dtype, param_dtype, rngs: nnx.Rngs):
        self.eps = eps
        self.dtype = dtype
        self.scale_d = make_param(rngs, ones, (dim,), ("norm",), param_dtype)

    def __call__(self, x_btd: jax.Array) -> jax.Array:
        x32 = x_btd.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * self.scale_d[...].astype(jnp.float32)).astype(self.dtype)


class QKNorm(nnx.Module):
    """Chameleon's QK-norm: a LayerNorm over head_dim, applied to every head separately.

    `shared`: one (scale, bias) of shape [head_dim] for all heads (Meta's 7B release).
    `per_head`: one row per head, [heads, head_dim] (the Hugging Face layout; the 34B
    release, trained with 4-way model parallelism, has one set per parallel shard).
    Statistics are taken over head_dim only, in float32.
    """

    def __init__(self, num_heads: int, head_dim: int, mode: str, heads_axis: str, *, eps: float, dtype,
                 param_dtype, rngs: nnx.Rngs):
        if mode not in ("shared", "per_head"):
            raise ValueError(f"QKNorm mode must be 'shared' or 'per_head', got {mode!r}")
        self.mode = mode
        self.eps = eps
        self.dtype = dtype
        if mode == "shared":
            self.scale_h = make_param(rngs, ones, (head_dim,), ("head_dim",), param_dtype)
            self.bias_h = make_param(rngs, zeros, (head_dim,), ("head_dim",), param_dtype)
        else:
            self.scale_nh = make_param(rngs, ones, (num_heads, head_dim), (heads_axis, "head_dim"), param_dtype)
            self.bias_nh = make_param(rngs, zeros, (num_heads, head_dim), (heads_axis, "head_dim"), param_dtype)

    def __call__(self, x_btnh: jax.Array) -> jax.Array:
        x32 = x_btnh.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        centred = x32 - mean
        var = jnp.mean(centred * centred, axis=-1, keepdims=True)
        y = centred * jax.lax.rsqrt(var + self.eps)
        if self.mode == "shared":
            scale, bias = self.scale_h[...], self.bias_h[...]
        else:
            scale, bias = self.scale_nh[...], self.bias_nh[...]
        y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
        return y.astype(self.dtype)


class Embed(nnx.Module):
    """Token embedding table [vocab, embed]."""

    def __init__(self, vocab_size: int, dim: int, *, init_std: float, dtype, param_dtype, rngs: nnx.Rngs):
        self.dtype = dtype
        self.embedding_vd = make_param(rngs, normal(init_std), (vocab_size, dim), ("vocab", "embed"), param_dtype)

    def __call__(self, tokens_bt: jax.Array, table_vd: jax.Array | None = None) -> jax.Array:
        """The tokens' rows of the table, or of `table_vd` (a table derived from it)."""
        table_vd = self.embedding_vd[...] if table_vd is None else table_vd
        return jnp.take(table_vd, tokens_bt, axis=0).astype(self.dtype)


class Unembed(nnx.Module):
    """Output projection [embed, vocab] (untied from the embedding); logits in float32."""

    def __init__(self, dim: int, vocab_size: int, *, init_std: float, dtype, param_dtype, rngs: nnx.Rngs,
                 matmul_dtype=None):
        self.dtype = dtype
        self.matmul_dtype = matmul_dtype
        self.w_dv = make_param(rngs, normal(init_std), (dim, vocab_size), ("embed", "vocab"), param_dtype)

    def __call__(self, x_btd: jax.Array, w_dv: jax.Array | None = None) -> jax.Array:
        """Logits from the projection, or from `w_dv` (a weight derived from it)."""
        w_dv = self.w_dv[...] if w_dv is None else w_dv
        logits_btv = dense(x_btd.astype(self.dtype), w_dv.astype(self.dtype), jnp.float32, self.matmul_dtype)
        return constrain(logits_btv, ("activation_batch", "activation_length", "activation_vocab"))


class SwiGLU(nnx.Module):
    """w2(silu(w1 x) * w3 x), no biases."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, f = cfg.hidden_dim, cfg.ffn_dim
        dtype, pdtype = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
        init = normal(cfg.initializer_range)
        self.dtype = dtype
        self.matmul_dtype = matmul_dtype_of(cfg)
        self.w1_df = make_param(rngs, init, (d, f), ("embed", "mlp"), pdtype)
        self.w3_df = make_param(rngs, init, (d, f), ("embed", "mlp"), pdtype)
        self.w2_fd = make_param(rngs, init, (f, d), ("mlp", "embed"), pdtype)

    def __call__(self, x_btd: jax.Array) -> jax.Array:
        dt = self.dtype
        gate_btf = dense(x_btd, self.w1_df[...].astype(dt), operand_dtype=self.matmul_dtype)
        up_btf = dense(x_btd, self.w3_df[...].astype(dt), operand_dtype=self.matmul_dtype)
        h_btf = jax.nn.silu(gate_btf) * up_btf
        h_btf = constrain(h_btf, ("activation_batch", "activation_length", "activation_mlp"))
        h_btf = checkpoint_name(h_btf, "mlp_hidden")
        return dense(h_btf, self.w2_fd[...].astype(dt), operand_dtype=self.matmul_dtype)


def rope_frequencies(head_dim: int, theta: float) -> jax.Array:
    """Inverse frequencies theta^(-2i/head_dim), i = 0 .. head_dim/2 - 1 (float32)."""
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    return 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))


def apply_rope(x_btnh: jax.Array, positions_bt: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding in the split-half layout: dimension i pairs with i + head_dim/2.

    (Meta's raw weights rotate interleaved pairs (2i, 2i+1); the Meta importer permutes
    the q/k projection rows so that this one layout serves every checkpoint.)
    """
    half = x_btnh.shape[-1] // 2
    inv_freq_h = rope_frequencies(x_btnh.shape[-1], theta)
    angles_bth = positions_bt.astype(jnp.float32)[..., None] * inv_freq_h
    cos = jnp.cos(angles_bth)[:, :, None, :]
    sin = jnp.sin(angles_bth)[:, :, None, :]
    x32 = x_btnh.astype(jnp.float32)
    x1, x2 = x32[..., :half], x32[..., half:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_btnh.dtype)

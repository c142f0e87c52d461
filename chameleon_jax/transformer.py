"""The Chameleon decoder-only transformer (Flax NNX).

Llama-2 blocks plus Chameleon's stability changes: QK-norm and, for the 34B
model, the swin-norm block `h = x + norm(attn(x)); out = h + norm(ffn(h))`.

    model = Transformer(cfg, rngs=nnx.Rngs(0))
    logits_btv = model(tokens_bt)                              # training / scoring
    cache = model.init_cache(batch)
    logits_btv, cache = model.decode(prompt_bt, pos_bt, cache, 0, kv_mask_bs)   # prefill
    logits_btv, cache = model.decode(next_b1, pos_b1, cache, t, kv_mask_bs)      # one step

With `cfg.scan_layers` the blocks are stacked (built with `nnx.vmap`, parameters get a
leading `layers` axis) and run under one scan, so a deep model compiles one block, not L;
its KV cache is stacked too and travels in the scan's carry.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from chameleon_jax.attention import Attention, decode_mask, segment_mask
from chameleon_jax.code_digits import CodeDigitEmbed
from chameleon_jax.config import ModelConfig
from chameleon_jax.image_positions import ImagePositionEmbed, image_index
from chameleon_jax.kv_cache import CACHE_AXES, STACKED_CACHE_AXES, KVCache
from chameleon_jax.layers import DENSE_NAME, Embed, RMSNorm, SwiGLU, Unembed, dtype_of, matmul_dtype_of
from chameleon_jax.sharding import constrain, create_sharded

ACTIVATION_AXES = ("activation_batch", "activation_length", "activation_embed")


def remat_policy(cfg: ModelConfig):
    """The `jax.checkpoint` policy for one block, or None for no rematerialisation."""
    match cfg.remat_policy:
        case "none":
            return None
        case "full":
            return jax.checkpoint_policies.nothing_saveable
        case "save_dots":
            # The projections' matmuls (layers.dense, named) and any other dot without batch dims.
            return jax.checkpoint_policies.save_from_both_policies(
                jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
                jax.checkpoint_policies.save_only_these_names(DENSE_NAME),
            )
        case "save_names":
            return jax.checkpoint_policies.save_only_these_names(*cfg.remat_names)
    raise ValueError(f"unknown remat_policy {cfg.remat_policy!r}")


class Block(nnx.Module):
    """One decoder block: attention then SwiGLU, pre-norm or swin-norm, dropout on both outputs."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        dtype, pdtype = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
        norm = dict(eps=cfg.norm_eps, dtype=dtype, param_dtype=pdtype, rngs=rngs)
        self.swin_norm = cfg.swin_norm
        self.attn_norm = RMSNorm(cfg.hidden_dim, **norm)
        self.attn = Attention(cfg, rngs=rngs)
        self.ffn_norm = RMSNorm(cfg.hidden_dim, **norm)
        self.mlp = SwiGLU(cfg, rngs=rngs)
        self.dropout = nnx.Dropout(cfg.dropout)

    def __call__(
        self,
        x_btd: jax.Array,
        positions_bt: jax.Array,
        *,
        mask_b1ts: jax.Array | None,
        is_causal: bool,
        deterministic: bool,
        dropout_key: jax.Array | None = None,
        segment_ids_bt: jax.Array | None = None,
        cache: tuple[jax.Array, jax.Array] | None = None,
        layer=None,
        write_index=None,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        """The block's output [B, T, D] and the updated cache pair (see `Attention.__call__`)."""
        attn_key = ffn_key = None
        if dropout_key is not None:
            attn_key, ffn_key = jax.random.split(dropout_key)
        attn = dict(mask_b1ts=mask_b1ts, is_causal=is_causal, segment_ids_bt=segment_ids_bt, cache=cache, layer=layer,
                    write_index=write_index)

        if self.swin_norm:
            a_btd, cache = self.attn(x_btd, positions_bt, **attn)
            a_btd = self.attn_norm(a_btd)
        else:
            a_btd, cache = self.attn(self.attn_norm(x_btd), positions_bt, **attn)
        a_btd = self.dropout(a_btd, deterministic=deterministic, rngs=attn_key)
        a_btd = checkpoint_name(a_btd, "attn_out")
        h_btd = constrain(x_btd + a_btd, ACTIVATION_AXES)

        if self.swin_norm:
            f_btd = self.ffn_norm(self.mlp(h_btd))
        else:
            f_btd = self.mlp(self.ffn_norm(h_btd))
        f_btd = self.dropout(f_btd, deterministic=deterministic, rngs=ffn_key)
        f_btd = checkpoint_name(f_btd, "mlp_out")
        out_btd = constrain(h_btd + f_btd, ACTIVATION_AXES)
        return checkpoint_name(out_btd, "block_out"), cache


def _stacked_blocks(cfg: ModelConfig, rngs: nnx.Rngs) -> Block:
    """cfg.num_layers blocks with their parameters stacked on a leading `layers` axis."""

    @nnx.split_rngs(splits=cfg.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(rngs: nnx.Rngs) -> Block:
        return Block(cfg, rngs=rngs)

    return make(rngs)


def _image_position_embed(cfg: ModelConfig, dtype, param_dtype, rngs: nnx.Rngs) -> ImagePositionEmbed | None:
    """The learned image-position table of `cfg.image_positions` rows, or None when it is 0."""
    if not cfg.image_positions:
        return None
    if cfg.image_positions < 0:
        raise ValueError(f"model.image_positions={cfg.image_positions}: the model needs a row count "
                         "(train.lm resolves -1 to the tokenizer's codes per image)")
    if cfg.boi_id < 0 or cfg.eoi_id < 0 or cfg.boi_id >= cfg.vocab_size or cfg.eoi_id >= cfg.vocab_size:
        raise ValueError(f"model.image_positions={cfg.image_positions} needs model.boi_id and model.eoi_id inside the "
                         f"vocabulary of {cfg.vocab_size}, got {cfg.boi_id} and {cfg.eoi_id}")
    return ImagePositionEmbed(cfg.image_positions, cfg.hidden_dim, init_std=cfg.initializer_range, dtype=dtype,
                              param_dtype=param_dtype, rngs=rngs)


def _code_digit_embed(cfg: ModelConfig, param_dtype, rngs: nnx.Rngs) -> CodeDigitEmbed | None:
    """The image codes' per-digit rows of `cfg.image_code_digits`, or None when it is empty."""
    if not cfg.image_code_digits:
        return None
    if any(n < 2 for n in cfg.image_code_digits) or cfg.image_code_offset < 0:
        raise ValueError(f"model.image_code_digits={cfg.image_code_digits} needs digit sizes of at least 2 and "
                         f"model.image_code_offset (got {cfg.image_code_offset}); train.lm resolves (-1,) from the "
                         "image tokenizer and the vocabulary")
    return CodeDigitEmbed(cfg.image_code_digits, cfg.image_code_offset, cfg.vocab_size, cfg.hidden_dim,
                          init_std=cfg.initializer_range, param_dtype=param_dtype, rngs=rngs,
                          own_logits=cfg.image_code_own_logits)


class Transformer(nnx.Module):
    """Embedding, `num_layers` blocks, final RMSNorm, untied output projection; float32 logits."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        dtype, pdtype = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
        self.cfg = cfg
        self.embed = Embed(cfg.vocab_size, cfg.hidden_dim, init_std=cfg.initializer_range, dtype=dtype,
                           param_dtype=pdtype, rngs=rngs)
        self.image_pos = _image_position_embed(cfg, dtype, pdtype, rngs)
        self.code_digits = _code_digit_embed(cfg, pdtype, rngs)
        if cfg.scan_layers:
            self.blocks = _stacked_blocks(cfg, rngs)
        else:
            self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
        self.final_norm = RMSNorm(cfg.hidden_dim, eps=cfg.norm_eps, dtype=dtype, param_dtype=pdtype, rngs=rngs)
        self.lm_head = Unembed(cfg.hidden_dim, cfg.vocab_size, init_std=cfg.initializer_range, dtype=dtype,
                               param_dtype=pdtype, rngs=rngs, matmul_dtype=matmul_dtype_of(cfg))
        # Dropout draws from the model's own stream, so `model(x, deterministic=False)` needs no key argument.
        try:
            stream = rngs.dropout  # the "dropout" stream, else "default"
        except AttributeError:
            stream = rngs.params
        self.dropout_rngs = stream.fork()

    # ------------------------------------------------------------------ public API

    def __call__(
        self,
        tokens_bt: jax.Array,
        positions_bt: jax.Array | None = None,
        segment_ids_bt: jax.Array | None = None,
        *,
        deterministic: bool = True,
    ) -> jax.Array:
        """Causal logits [B, T, V] (float32).

        positions_bt: RoPE positions, default arange(T) for every row (packed rows restart
          them per document). segment_ids_bt: with packing, a token attends only to earlier
          tokens carrying the same segment id.
        """
        _, t = tokens_bt.shape
        if positions_bt is None:
            positions_bt = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), tokens_bt.shape)
        mask_b1ts = None if segment_ids_bt is None else segment_mask(segment_ids_bt)
        x_btd = self._embed(tokens_bt, segment_ids_bt=segment_ids_bt)
        x_btd, _ = self._blocks(x_btd, positions_bt, mask_b1ts=mask_b1ts, is_causal=True, deterministic=deterministic,
                                segment_ids_bt=segment_ids_bt)
        return self._logits(x_btd)

    def init_cache(self, batch: int, max_len: int | None = None) -> KVCache:
        """An all-zero cache in cfg.dtype: per layer, k and v of shape [batch, kv_heads, max_len, head_dim]
        (with `scan_layers`, stacked into [layers, batch, kv_heads, max_len, head_dim])."""
        cfg = self.cfg
        cache = KVCache.zeros(cfg.num_layers, batch, max_len or cfg.max_seq_len, cfg.num_kv_heads, cfg.head_dim,
                              dtype_of(cfg.dtype), stacked=cfg.scan_layers)
        return jax.tree.map(lambda a: constrain(a, STACKED_CACHE_AXES if cfg.scan_layers else CACHE_AXES), cache)

    def decode(
        self,
        tokens_bt: jax.Array,
        positions_bt: jax.Array,
        cache: KVCache,
        write_index: jax.Array | int,
        kv_mask_bs: jax.Array,
        image_index_bt: jax.Array | None = None,
    ) -> tuple[jax.Array, KVCache]:
        """Runs T new tokens against the cache; returns their logits [B, T, V] and the new cache.

        Their keys and values (rotated at positions_bt) go to slots [write_index, write_index+T)
        of every row, or with an int32 [B] write_index to each row's own slots. Query t of row
        b sees slot s iff kv_mask_bs[b, s] and s <= write_index + t, so kv_mask_bs must
        already be True at the new tokens' slots. Prefill is T = prompt length with
        write_index 0; a step is T = 1.

        image_index_bt: with `image_positions`, each new token's index in its image
        (`image_positions.image_index`; -1 outside images). Default: read from tokens_bt
        alone, which is right only when every image they touch opens inside them.
        """
        _, t = tokens_bt.shape
        mask_b1ts = decode_mask(kv_mask_bs, write_index, t)
        x_btd = self._embed(tokens_bt, image_index_bt=image_index_bt)
        x_btd, cache = self._blocks(
            x_btd, positions_bt, mask_b1ts=mask_b1ts, is_causal=False, deterministic=True,
            cache=cache, write_index=jnp.asarray(write_index, jnp.int32),
        )
        return self._logits(x_btd), cache

    # ------------------------------------------------------------------ layers

    def _embed(self, tokens_bt, *, segment_ids_bt=None, image_index_bt=None):
        table_vd = None if self.code_digits is None else self.code_digits.embedding_table(self.embed.embedding_vd[...])
        x_btd = self.embed(tokens_bt, table_vd)
        if self.image_pos is not None:
            if image_index_bt is None:
                image_index_bt = image_index(tokens_bt, boi_id=self.cfg.boi_id, eoi_id=self.cfg.eoi_id,
                                             segment_ids_bt=segment_ids_bt)
            x_btd = x_btd + self.image_pos(image_index_bt)
        return constrain(x_btd, ACTIVATION_AXES)

    def _logits(self, x_btd):
        h_btd = self.final_norm(x_btd)
        w_dv = None if self.code_digits is None else self.code_digits.head_weight(self.lm_head.w_dv[...])
        return self.lm_head(h_btd, w_dv)

    def _blocks(self, x_btd, positions_bt, *, mask_b1ts, is_causal, deterministic, cache=None, write_index=None,
                segment_ids_bt=None):
        cfg = self.cfg
        keys = None
        if not deterministic and cfg.dropout > 0:
            keys = jax.random.split(self.dropout_rngs(), cfg.num_layers)

        def run(block, x_btd, key, layer_cache, layer=None):
            return block(x_btd, positions_bt, mask_b1ts=mask_b1ts, is_causal=is_causal, deterministic=deterministic,
                         dropout_key=key, segment_ids_bt=segment_ids_bt, cache=layer_cache, layer=layer,
                         write_index=write_index)

        policy = remat_policy(cfg)
        if cache is None and cfg.remat_policy != "none":
            inner = run

            def run(block, x_btd, key, layer_cache, layer=None):
                return nnx.remat(lambda b, x, k: inner(b, x, k, None), policy=policy)(block, x_btd, key)

        if cfg.scan_layers:
            # A plain lax.scan over the stacked block state (rebuilt into a Block per step), so the
            # model also runs inside loops traced after it was built (a decode while_loop). The
            # stacked cache rides in the carry, where each layer's write is an in-place update.
            graphdef, stacked = nnx.split(self.blocks)

            def body(carry, xs):
                x_btd, kv = carry
                state, key, layer = xs
                return run(nnx.merge(graphdef, state), x_btd, key, kv, layer), None

            layers = jnp.arange(cfg.num_layers, dtype=jnp.int32)
            kv = None if cache is None else (cache.k, cache.v)
            (x_btd, kv), _ = jax.lax.scan(body, (x_btd, kv), (stacked, keys, layers))
            return x_btd, None if cache is None else KVCache(*kv)

        new_k, new_v = [], []
        for i, block in enumerate(self.blocks):
            x_btd, kv = run(block, x_btd, None if keys is None else keys[i], None if cache is None else cache.layer(i))
            if kv is not None:
                new_k.append(kv[0])
                new_v.append(kv[1])
        return x_btd, None if cache is None else KVCache(tuple(new_k), tuple(new_v))


def unstack_layers(model: "Transformer") -> "Transformer":
    """The same model with its blocks held one by one (`scan_layers=False`); `model` itself if they already are.

    For decoding: inside a loop over stacked layers, each layer's weights are sliced out of
    the [layers, ...] stack as a copy on every step (measured on the CPU, `small` preset:
    942 tokens/s stacked against 3,099 unrolled). The returned model holds new arrays (each
    block's slice of the stack); training keeps the stacked form, which compiles faster.
    """
    cfg = model.cfg
    if not cfg.scan_layers:
        return model
    flat_cfg = dataclasses.replace(cfg, scan_layers=False)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Transformer(flat_cfg, rngs=nnx.Rngs(0))))
    values = nnx.to_pure_dict(nnx.state(model))
    stacked = values.pop("blocks")
    values["blocks"] = {i: jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(cfg.num_layers)}
    nnx.replace_by_pure_dict(abstract, values)
    return nnx.merge(graphdef, abstract)


# --------------------------------------------------------------------------- accounting


def create_sharded_model(cfg: ModelConfig, mesh, rules, seed: int = 0) -> Transformer:
    """A `Transformer` whose parameters are born sharded over `mesh` by the logical `rules`."""
    return create_sharded(lambda: Transformer(cfg, rngs=nnx.Rngs(seed)), mesh, rules)


def count_params(cfg: ModelConfig, *, include_embedding: bool = True) -> int:
    """Number of parameters of `Transformer(cfg)` (computed from the config, no allocation)."""
    d, n, k, h, f, v = cfg.hidden_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.ffn_dim, cfg.vocab_size
    attn = d * n * h + 2 * d * k * h + n * h * d
    qk_norm = {"none": 0, "shared": 4 * h, "per_head": 2 * (n + k) * h}[cfg.qk_norm]
    block = attn + qk_norm + 3 * d * f + 2 * d
    total = cfg.num_layers * block + d + d * v  # blocks, final norm, output projection
    if include_embedding:
        total += (v + cfg.image_positions) * d  # token and image-position lookup tables
    if cfg.image_code_digits:
        total += sum(cfg.image_code_digits) * d * (2 if include_embedding else 1)  # digit rows in, digit columns out
    return total


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward): 6 N + 12 L n_heads head_dim T.

    N excludes the input embedding (a lookup, not a matmul); the attention term is the
    PaLM convention, not discounted for the causal mask.
    """
    n = count_params(cfg, include_embedding=False)
    return 6.0 * n + 12.0 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq_len

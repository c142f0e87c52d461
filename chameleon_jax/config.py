"""Model and mesh configuration, with presets from `tiny` to the released shapes."""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

from chameleon_jax.configlib import param


def chameleon_ffn_dim(hidden_dim: int, multiple_of: int = 256) -> int:
    """Llama/Chameleon FFN width: int(2 * 4 * dim / 3) rounded up to `multiple_of` (7B: 11008)."""
    d = int(2 * 4 * hidden_dim / 3)
    return multiple_of * math.ceil(d / multiple_of)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The Chameleon decoder-only transformer."""

    vocab_size: int = param(512, "size of the unified (text + special + image code) vocabulary")
    hidden_dim: int = param(64, "model width (d_model)")
    num_layers: int = param(2, "number of transformer blocks")
    num_heads: int = param(4, "query heads")
    num_kv_heads: int = param(4, "key/value heads (fewer than num_heads = grouped-query attention)")
    head_dim: int = param(16, "width of one attention head")
    ffn_dim: int = param(192, "SwiGLU hidden width")
    max_seq_len: int = param(256, "context length (KV cache size and the longest training row)")
    rope_theta: float = param(10_000.0, "RoPE base frequency")
    norm_eps: float = param(1e-5, "RMSNorm and QK-norm epsilon")
    qk_norm: Literal["none", "shared", "per_head"] = param(
        "per_head", "QK LayerNorm over head_dim: one set shared by all heads (Meta 7B) or one per head (HF)"
    )
    swin_norm: bool = param(False, "Chameleon-34B block: h = x + norm(attn(x)); out = h + norm(ffn(h))")
    dropout: float = param(0.0, "dropout rate on attention output and FFN output (training only)")
    z_loss: float = param(1e-5, "weight of the log(Z)^2 auxiliary loss")
    dtype: Literal["float32", "bfloat16"] = param("float32", "compute dtype of activations and matmuls")
    param_dtype: Literal["float32", "bfloat16"] = param("float32", "storage dtype of parameters")
    matmul_dtype: Literal["", "float32", "bfloat16"] = param(
        "", "dtype the projections' operands are rounded to, accumulating in float32 ('' = the compute dtype). "
            "bfloat16 with dtype=float32 keeps norms, residuals, attention scores and the loss in float32 and "
            "multiplies in bf16, as a TPU's default matmul precision does with float32 inputs; on CPUs with AMX "
            "those matmuls run 4-5 times faster than float32 ones"
    )
    scan_layers: bool = param(False, "stack the blocks and run them with nnx.scan (faster compiles for deep models)")
    remat_policy: Literal["none", "full", "save_dots", "save_names"] = param(
        "none", "activation rematerialisation of each block: none, recompute all, keep matmul outputs, keep named outputs"
    )
    attention_impl: Literal["auto", "xla", "cudnn", "chunked", "naive", "splash"] = param(
        "auto", "attention kernel: auto picks splash on TPU, cudnn flash attention on GPU, chunked on CPU, else xla "
        "(a sequence mesh axis runs ring attention whatever this says)"
    )
    initializer_range: float = param(0.02, "stddev of the normal initialiser for weights")
    qk_norm_eps: float = param(1e-5, "QK LayerNorm epsilon (the released models use 1e-5 whatever norm_eps is)")
    remat_names: tuple[str, ...] = param(
        ("attn_out", "mlp_out"),
        "with remat_policy=save_names: block activations kept for the backward pass "
        "(names: qkv_proj, attn_out, mlp_hidden, mlp_out, block_out; dense_out is every projection's output)",
    )
    image_positions: int = param(
        0,
        "rows of a learned embedding added to each image code by its index in the image (see "
        "chameleon_jax.image_positions); 0 = off, as in Chameleon; train.lm reads -1 as the tokenizer's codes per image",
    )
    image_code_digits: tuple[int, ...] = param(
        (),
        "digit sizes of the image codes (an FSQ tokenizer's levels, least significant first): each image code also "
        "gets one learned row per digit added to its embedding and output weights, so codes sharing a digit share "
        "parameters (see chameleon_jax.code_digits); () = off, as in Chameleon; train.lm reads (-1,) as the "
        "image tokenizer's FSQ levels",
    )
    image_code_own_logits: bool = param(
        True,
        "with image_code_digits: true = an image code's logit is its own output column plus its digit terms; false "
        "= its digit terms only, so the model's distribution over codes is a product of one distribution per digit",
    )
    image_code_offset: int = param(-1, "id of image code 0, read by image_code_digits (train.lm sets it from the vocabulary)")
    boi_id: int = param(-1, "<boi> token id, read by image_positions (train.lm sets it from the vocabulary)")
    eoi_id: int = param(-1, "<eoi> token id, read by image_positions (train.lm sets it from the vocabulary)")


def _tiny() -> ModelConfig:
    return ModelConfig()


def _small() -> ModelConfig:
    return ModelConfig(
        vocab_size=2048, hidden_dim=256, num_layers=4, num_heads=8, num_kv_heads=8, head_dim=32,
        ffn_dim=768, max_seq_len=384,
    )


def _chameleon_7b() -> ModelConfig:
    return ModelConfig(
        vocab_size=65536, hidden_dim=4096, num_layers=32, num_heads=32, num_kv_heads=32, head_dim=128,
        ffn_dim=chameleon_ffn_dim(4096), max_seq_len=4096, qk_norm="shared", swin_norm=False, dropout=0.1,
        dtype="bfloat16", scan_layers=True, remat_policy="save_dots",
    )


def _chameleon_34b() -> ModelConfig:
    return ModelConfig(
        vocab_size=65536, hidden_dim=8192, num_layers=48, num_heads=64, num_kv_heads=8, head_dim=128,
        # The release was saved over several model-parallel ranks, each with its own QK-norm for its heads.
        ffn_dim=22016, max_seq_len=4096, qk_norm="per_head", swin_norm=True, dropout=0.1,
        dtype="bfloat16", scan_layers=True, remat_policy="save_dots",
    )


MODEL_PRESETS = {
    "tiny": _tiny,
    "small": _small,
    "chameleon-7b": _chameleon_7b,
    "chameleon-34b": _chameleon_34b,
}


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """The device mesh ('data', 'fsdp', 'sequence', 'tensor') and the logical-to-mesh rules table."""

    data: int = param(-1, "data-parallel size within a slice; -1 takes the devices left over")
    fsdp: int = param(1, "fully-sharded (parameter + optimizer state) size within a slice")
    sequence: int = param(1, "context-parallel size within a slice: splits each row's tokens (ring attention)")
    tensor: int = param(1, "tensor-parallel size within a slice")
    dcn_data: int = param(1, "data-parallel size across slices (multi-slice pods)")
    dcn_fsdp: int = param(1, "fsdp size across slices")
    dcn_tensor: int = param(1, "tensor-parallel size across slices")
    rules: tuple[tuple[str, str], ...] = param(
        (
            ("activation_batch", "data+fsdp"),
            ("activation_length", "sequence"),
            ("activation_embed", ""),
            ("activation_heads", "tensor"),
            ("activation_kv_heads", "tensor"),
            ("activation_mlp", "tensor"),
            ("activation_vocab", "tensor"),
            ("embed", "fsdp"),
            ("mlp", "tensor"),
            ("heads", "tensor"),
            ("kv_heads", "tensor"),
            ("head_dim", ""),
            ("vocab", "tensor"),
            ("image_positions", ""),
            ("code_digits", ""),
            ("layers", ""),
            ("norm", ""),
            ("cache_batch", "data+fsdp"),
            ("cache_length", ""),
            ("cache_kv_heads", "tensor"),
        ),
        "logical axis -> mesh axes ('a+b' for several, '' for replicated); the model names logical axes only",
    )

"""Import a Hugging Face `ChameleonForConditionalGeneration` directory.

Reads config.json and the *.safetensors files (one file, or shards listed by
model.safetensors.index.json) one tensor at a time. HF's q/k projections are already
permuted for split-half RoPE, which is the layout this model uses, and HF stores the
QK-norm per head ([heads, head_dim]), so the import is transposes and reshapes only.
The image tokenizer (`model.vqmodel.*`) is not part of the transformer and is skipped.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from chameleon_jax.config import ModelConfig
from chameleon_jax.convert import ConversionError, ParamWriter, copy_tokenizer, write_model_dir

INDEX_FILE = "model.safetensors.index.json"
_SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float32", "F64": "float32"}


class SafetensorsReader(contextlib.ExitStack):
    """Tensors of a (possibly sharded) safetensors checkpoint, read one at a time."""

    def __init__(self, src: Path):
        super().__init__()
        self.src = Path(src)
        index = self.src / INDEX_FILE
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in self.src.glob("*.safetensors"))
            weight_map = None
        if not files:
            raise ConversionError(f"{self.src} holds no *.safetensors files")
        self._files = files
        self._handles: dict[str, Any] = {}
        self._where: dict[str, str] = {}
        if weight_map is not None:
            self._where = dict(weight_map)
        else:
            for f in files:
                for name in self._handle(f).keys():
                    self._where[name] = f

    def _handle(self, file: str):
        if file not in self._handles:
            from safetensors import safe_open

            # The flax framework reads bfloat16 (numpy cannot); arrays are placed on the host CPU.
            self._handles[file] = self.enter_context(safe_open(str(self.src / file), framework="flax"))
        return self._handles[file]

    def names(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(self._where[name]).get_slice(name).get_shape())

    def dtype(self, name: str) -> str:
        return self._handle(self._where[name]).get_slice(name).get_dtype()

    def get(self, name: str) -> np.ndarray:
        import jax

        with jax.default_device(jax.devices("cpu")[0]):
            return np.asarray(self._handle(self._where[name]).get_tensor(name))


def config_from_hf(
    hf: dict, *, param_dtype: str = "float32", dtype: str | None = None, scan_layers: bool = True
) -> ModelConfig:
    """The ModelConfig equivalent to an HF ChameleonConfig (as a dict from its config.json)."""
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag):
            raise ConversionError(f"HF config sets {flag}=true; Chameleon blocks have no biases")
    if hf.get("hidden_act", "silu") != "silu":
        raise ConversionError(f"HF config uses hidden_act={hf['hidden_act']!r}; only silu (SwiGLU) is supported")
    if hf.get("tie_word_embeddings"):
        raise ConversionError("HF config ties the output projection to the embedding; Chameleon's are untied")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise ConversionError(f"HF config uses RoPE scaling {rope}; only plain RoPE is supported")
    theta = rope.get("rope_theta", hf.get("rope_theta", 10_000.0))
    heads = hf["num_attention_heads"]
    hidden = hf["hidden_size"]
    if hidden % heads:
        raise ConversionError(f"hidden_size {hidden} is not a multiple of num_attention_heads {heads}")
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        hidden_dim=hidden,
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hidden // heads,
        ffn_dim=hf["intermediate_size"],
        max_seq_len=hf.get("max_position_embeddings", 4096),
        rope_theta=float(theta),
        norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
        qk_norm="per_head",
        qk_norm_eps=1e-5,  # HF's ChameleonLayerNorm hard-codes it
        swin_norm=bool(hf.get("swin_norm", False)),
        initializer_range=float(hf.get("initializer_range", 0.02)),
        param_dtype=param_dtype,
        dtype=dtype or param_dtype,
        scan_layers=scan_layers,
    )


def hf_to_ours(w: np.ndarray, transposed: bool, our_shape: tuple) -> np.ndarray:
    """An HF tensor in our layout: torch Linear weights are [out, in]; ours are [in, ...out] split by head."""
    return w.T.reshape(our_shape) if transposed else w


def ours_to_hf(w: np.ndarray, transposed: bool, hf_shape: tuple) -> np.ndarray:
    """The inverse of `hf_to_ours`."""
    return np.ascontiguousarray(w.reshape(hf_shape[::-1]).T) if transposed else w.reshape(hf_shape)


def layer_table(cfg: ModelConfig, i: int):
    """(HF name, HF shape, our block key, our shape, transposed) for block i: the one name map
    that both the import and the export (`chameleon_jax.convert.export_hf`) read."""
    d, n, k, h, f = cfg.hidden_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.ffn_dim
    p = f"model.layers.{i}."
    return [
        (p + "self_attn.q_proj.weight", (n * h, d), ("attn", "wq_dnh"), (d, n, h), True),
        (p + "self_attn.k_proj.weight", (k * h, d), ("attn", "wk_dkh"), (d, k, h), True),
        (p + "self_attn.v_proj.weight", (k * h, d), ("attn", "wv_dkh"), (d, k, h), True),
        (p + "self_attn.o_proj.weight", (d, n * h), ("attn", "wo_nhd"), (n, h, d), True),
        (p + "self_attn.q_norm.weight", (n, h), ("attn", "q_norm", "scale_nh"), (n, h), False),
        (p + "self_attn.q_norm.bias", (n, h), ("attn", "q_norm", "bias_nh"), (n, h), False),
        (p + "self_attn.k_norm.weight", (k, h), ("attn", "k_norm", "scale_nh"), (k, h), False),
        (p + "self_attn.k_norm.bias", (k, h), ("attn", "k_norm", "bias_nh"), (k, h), False),
        (p + "mlp.gate_proj.weight", (f, d), ("mlp", "w1_df"), (d, f), True),
        (p + "mlp.up_proj.weight", (f, d), ("mlp", "w3_df"), (d, f), True),
        (p + "mlp.down_proj.weight", (d, f), ("mlp", "w2_fd"), (f, d), True),
        (p + "input_layernorm.weight", (d,), ("attn_norm", "scale_d"), (d,), False),
        (p + "post_attention_layernorm.weight", (d,), ("ffn_norm", "scale_d"), (d,), False),
    ]


def top_table(cfg: ModelConfig):
    """(HF name, HF shape, our key, our shape, transposed) for the tensors outside the blocks."""
    d, v = cfg.hidden_dim, cfg.vocab_size
    return [
        ("model.embed_tokens.weight", (v, d), ("embed", "embedding_vd"), (v, d), False),
        ("model.norm.weight", (d,), ("final_norm", "scale_d"), (d,), False),
        ("lm_head.weight", (v, d), ("lm_head", "w_dv"), (d, v), True),
    ]


def _read(reader: SafetensorsReader, writer: ParamWriter, name: str, shape: tuple, transposed: bool, ours: tuple):
    if name not in reader:
        writer.problem(f"missing tensor {name} (expected shape {shape})")
        return None
    got = reader.shape(name)
    if got != tuple(shape):
        writer.problem(f"tensor {name} has shape {got}, the config implies {tuple(shape)}")
        return None
    return hf_to_ours(reader.get(name), transposed, ours)


def import_hf(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    param_dtype: str = "auto",
    dtype: str | None = None,
    scan_layers: bool = True,
) -> ModelConfig:
    """Converts HF directory `src` into model directory `dst`; returns the written config.

    param_dtype: storage dtype of the imported parameters; "auto" keeps the checkpoint's
    (bfloat16 for the released weights). dtype: compute dtype, default = param_dtype.
    """
    src, dst = Path(src), Path(dst)
    config_path = src / "config.json"
    if not config_path.is_file():
        raise ConversionError(f"{src} has no config.json: not a Hugging Face model directory")
    hf = json.loads(config_path.read_text())
    with SafetensorsReader(src) as reader:
        if param_dtype == "auto":
            name = "model.embed_tokens.weight"
            param_dtype = _SAFETENSORS_DTYPES.get(reader.dtype(name), "float32") if name in reader else "float32"
        cfg = config_from_hf(hf, param_dtype=param_dtype, dtype=dtype, scan_layers=scan_layers)
        writer = ParamWriter(cfg)
        used = set()
        for i in range(cfg.num_layers):
            for name, shape, key, ours, transposed in layer_table(cfg, i):
                used.add(name)
                value = _read(reader, writer, name, shape, transposed, ours)
                if value is not None:
                    writer.put_layer(i, key, value, name)
        for name, shape, key, ours, transposed in top_table(cfg):
            used.add(name)
            value = _read(reader, writer, name, shape, transposed, ours)
            if value is not None:
                writer.put(key, value, name)
        params = writer.finish()
        ignored = [n for n in reader.names() if n not in used and not n.startswith("model.vqmodel.")
                   and not n.endswith("rotary_emb.inv_freq")]
    if ignored:
        warnings.warn(f"ignored {len(ignored)} tensor(s) the model does not use, e.g. {ignored[:5]}")
    write_model_dir(dst, cfg, params)
    copy_tokenizer([src / "tokenizer.json"], dst)
    return cfg

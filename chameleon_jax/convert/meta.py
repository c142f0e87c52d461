"""Import Meta's Chameleon release: params.json + consolidated.pth (or consolidated.NN.pth shards).

Facts about the format that the import handles:
- q and k projection rows rotate interleaved pairs (2i, 2i+1); this model rotates the
  split halves (i, i + head_dim/2), so rows are permuted within every head. QK-norm acts
  on the same vectors before RoPE, so its weight and bias get the same permutation.
- q/k/v may be stored separately (wq, wk, wv) or fused (wqkv); w1/w3 likewise (w13).
- A release saved with model parallelism has one file per rank, each holding its slice of
  the heads, the FFN and the embedding, and its own QK-norm set for its heads: one shard
  gives a shared QK-norm, several (differing) shards give a per-head one.

torch is needed only here (to read .pth files), and is imported on use.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from chameleon_jax.config import ModelConfig
from chameleon_jax.convert import ConversionError, ParamWriter, copy_tokenizer, write_model_dir


def _torch():
    try:
        import torch
    except ImportError:
        raise ImportError(
            "reading Meta's .pth checkpoints needs PyTorch, an optional dependency: "
            "pip install torch  (or pip install 'chameleon-jax[hf]')"
        ) from None
    return torch


def to_numpy(t) -> np.ndarray:
    """A torch tensor as a numpy array (bfloat16 via ml_dtypes, without a float32 detour)."""
    torch = _torch()
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        import ml_dtypes

        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def interleaved_to_split_half(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Reorders each head's rows of the leading (heads * head_dim) axis from interleaved
    pairs (x0, y0, x1, y1, ...) to halves (x0, x1, ..., y0, y1, ...)."""
    rest = w.shape[1:]
    head_dim = w.shape[0] // num_heads
    w = w.reshape((num_heads, head_dim // 2, 2) + rest)
    return np.swapaxes(w, 1, 2).reshape((num_heads * head_dim,) + rest)


def read_params(src: Path) -> dict[str, Any]:
    path = src / "params.json"
    if not path.is_file():
        raise ConversionError(f"{src} has no params.json: not a Meta Chameleon checkpoint directory")
    params = json.loads(path.read_text())
    extra = src / "consolidate_params.json"
    if extra.is_file():
        params = {**params, **json.loads(extra.read_text())}
    if isinstance(params.get("model"), dict):
        params = {**params, **params["model"]}
    return params


def shard_files(src: Path) -> list[Path]:
    single = src / "consolidated.pth"
    if single.is_file():
        return [single]
    shards = sorted(src.glob("consolidated.*.pth"), key=lambda p: int(re.findall(r"\d+", p.name)[-1]))
    if not shards:
        raise ConversionError(f"{src} has no consolidated.pth or consolidated.NN.pth")
    return shards


def config_from_meta(
    params: dict[str, Any], *, vocab_size: int, qk_norm: str, param_dtype: str, dtype: str | None,
    scan_layers: bool,
) -> ModelConfig:
    dim, heads = params["dim"], params["n_heads"]
    if dim % heads:
        raise ConversionError(f"dim {dim} is not a multiple of n_heads {heads}")
    multiple_of = params.get("multiple_of", 256)
    mult = params.get("ffn_dim_multiplier")
    ffn = int(2 * 4 * dim / 3)
    if mult is not None:
        ffn = int(mult * ffn)
    ffn = multiple_of * ((ffn + multiple_of - 1) // multiple_of)
    return ModelConfig(
        vocab_size=vocab_size,
        hidden_dim=dim,
        num_layers=params["n_layers"],
        num_heads=heads,
        num_kv_heads=params.get("n_kv_heads") or heads,
        head_dim=dim // heads,
        ffn_dim=ffn,
        max_seq_len=params.get("max_seq_len", 4096),
        rope_theta=float(params.get("rope_theta", 10_000.0)),
        norm_eps=float(params.get("norm_eps", 1e-5)),
        # Meta's ModelArgs default qk_normalization to false: a params.json without the key has no QK-norm.
        qk_norm=qk_norm if params.get("qk_normalization", False) else "none",
        swin_norm=bool(params.get("swin_norm", False)),
        param_dtype=param_dtype,
        dtype=dtype or param_dtype,
        scan_layers=scan_layers,
    )


class _Shards:
    """The rank files of one checkpoint, memory-mapped, with problems collected by name."""

    def __init__(self, files: list[Path]):
        torch = _torch()
        self.files = files
        self.dicts = [torch.load(str(f), map_location="cpu", weights_only=True, mmap=True) for f in files]
        self.problems: list[str] = []

    def __len__(self):
        return len(self.dicts)

    def has(self, name: str) -> bool:
        return all(name in d for d in self.dicts)

    def get(self, name: str, shape: tuple[int, ...]) -> list[np.ndarray] | None:
        """The tensor from every rank, each checked against the per-rank `shape`."""
        out = []
        for f, d in zip(self.files, self.dicts):
            if name not in d:
                self.problems.append(f"missing tensor {name} in {f.name} (expected shape {shape})")
                return None
            got = tuple(d[name].shape)
            if got != tuple(shape):
                self.problems.append(f"tensor {name} in {f.name} has shape {got}, params.json implies {tuple(shape)}")
                return None
            out.append(to_numpy(d[name]))
        return out


def import_meta(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    param_dtype: str = "auto",
    dtype: str | None = None,
    scan_layers: bool = True,
    tokenizer: str | os.PathLike | None = None,
) -> ModelConfig:
    """Converts Meta checkpoint directory `src` into model directory `dst`; returns the written config."""
    src, dst = Path(src), Path(dst)
    params = read_params(src)
    shards = _Shards(shard_files(src))
    mp = len(shards)
    first = shards.dicts[0]
    if "tok_embeddings.weight" not in first:
        raise ConversionError(f"{shards.files[0].name} has no tok_embeddings.weight")
    emb = first["tok_embeddings.weight"]
    vocab = params.get("vocab_size", -1)
    vocab = vocab if vocab and vocab > 0 else emb.shape[0]
    if param_dtype == "auto":
        param_dtype = "bfloat16" if str(emb.dtype) == "torch.bfloat16" else "float32"

    # One QK-norm for all heads unless the ranks disagree (then each rank's set covers its heads).
    n_layers = params["n_layers"]
    qk_names = [f"layers.{i}.attention.{w}_normalization.{p}" for i in range(n_layers) for w in "qk"
                for p in ("weight", "bias")]
    differs = mp > 1 and any(
        name in first and any(not bool((d[name] == first[name]).all()) for d in shards.dicts[1:]) for name in qk_names
    )
    cfg = config_from_meta(params, vocab_size=vocab, qk_norm="per_head" if differs else "shared",
                           param_dtype=param_dtype, dtype=dtype, scan_layers=scan_layers)
    d, n, k, h, f, v = cfg.hidden_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.ffn_dim, cfg.vocab_size
    for what, size in (("n_heads", n), ("n_kv_heads", k), ("ffn dim", f), ("dim", d), ("vocab", v)):
        if size % mp:
            raise ConversionError(f"{what} {size} is not divisible by the {mp} checkpoint shards")
    nl, kl, fl = n // mp, k // mp, f // mp
    writer = ParamWriter(cfg)

    def cat(parts, axis):
        return None if parts is None else np.concatenate(parts, axis=axis)

    for i in range(n_layers):
        p = f"layers.{i}."
        if shards.has(p + "attention.wqkv.weight"):
            fused = shards.get(p + "attention.wqkv.weight", ((nl + 2 * kl) * h, d))
            if fused is None:
                wq = wk = wv = None
            else:
                wq = cat([x[: nl * h] for x in fused], 0)
                wk = cat([x[nl * h: (nl + kl) * h] for x in fused], 0)
                wv = cat([x[(nl + kl) * h:] for x in fused], 0)
        else:
            wq = cat(shards.get(p + "attention.wq.weight", (nl * h, d)), 0)
            wk = cat(shards.get(p + "attention.wk.weight", (kl * h, d)), 0)
            wv = cat(shards.get(p + "attention.wv.weight", (kl * h, d)), 0)
        if wq is not None:
            wq = interleaved_to_split_half(wq, n)
            writer.put_layer(i, ("attn", "wq_dnh"), wq.T.reshape(d, n, h), p + "attention.wq")
        if wk is not None:
            wk = interleaved_to_split_half(wk, k)
            writer.put_layer(i, ("attn", "wk_dkh"), wk.T.reshape(d, k, h), p + "attention.wk")
        if wv is not None:
            writer.put_layer(i, ("attn", "wv_dkh"), wv.T.reshape(d, k, h), p + "attention.wv")
        wo = cat(shards.get(p + "attention.wo.weight", (d, nl * h)), 1)
        if wo is not None:
            writer.put_layer(i, ("attn", "wo_nhd"), wo.T.reshape(n, h, d), p + "attention.wo.weight")

        if cfg.qk_norm != "none":
            for which, heads_total, local in (("q", n, nl), ("k", k, kl)):
                for meta_name, ours in (("weight", "scale"), ("bias", "bias")):
                    name = f"{p}attention.{which}_normalization.{meta_name}"
                    parts = shards.get(name, (h,))
                    if parts is None:
                        continue
                    parts = [interleaved_to_split_half(x, 1) for x in parts]
                    if cfg.qk_norm == "shared":
                        writer.put_layer(i, ("attn", f"{which}_norm", f"{ours}_h"), parts[0], name)
                    else:
                        rows = np.concatenate([np.repeat(x[None], local, axis=0) for x in parts], axis=0)
                        writer.put_layer(i, ("attn", f"{which}_norm", f"{ours}_nh"), rows, name)

        if shards.has(p + "feed_forward.w13.weight"):
            fused = shards.get(p + "feed_forward.w13.weight", (2 * fl, d))
            w1 = None if fused is None else cat([x[:fl] for x in fused], 0)
            w3 = None if fused is None else cat([x[fl:] for x in fused], 0)
        else:
            w1 = cat(shards.get(p + "feed_forward.w1.weight", (fl, d)), 0)
            w3 = cat(shards.get(p + "feed_forward.w3.weight", (fl, d)), 0)
        w2 = cat(shards.get(p + "feed_forward.w2.weight", (d, fl)), 1)
        for key, w, name in ((("mlp", "w1_df"), w1, "w1"), (("mlp", "w3_df"), w3, "w3"), (("mlp", "w2_fd"), w2, "w2")):
            if w is not None:
                writer.put_layer(i, key, w.T, p + "feed_forward." + name)

        for meta_name, ours in (("attention_norm", "attn_norm"), ("ffn_norm", "ffn_norm")):
            parts = shards.get(p + meta_name + ".weight", (d,))
            if parts is not None:
                # Replicated on every rank; averaging also irons out any drift between copies.
                writer.put_layer(i, (ours, "scale_d"), np.mean([x.astype(np.float32) for x in parts], axis=0),
                                 p + meta_name + ".weight")

    embedding = cat(shards.get("tok_embeddings.weight", (v, d // mp)), 1)
    if embedding is not None:
        writer.put(("embed", "embedding_vd"), embedding, "tok_embeddings.weight")
    output = cat(shards.get("output.weight", (v // mp, d)), 0)
    if output is not None:
        writer.put(("lm_head", "w_dv"), output.T, "output.weight")
    norm = shards.get("norm.weight", (d,))
    if norm is not None:
        writer.put(("final_norm", "scale_d"), np.mean([x.astype(np.float32) for x in norm], axis=0), "norm.weight")

    writer.problems[:0] = shards.problems
    params_tree = writer.finish()
    del shards
    write_model_dir(dst, cfg, params_tree)
    candidates = [Path(tokenizer)] if tokenizer else []
    # Meta's release keeps the tokenizer two levels up: data/models/7b/ and data/tokenizer/.
    for root in (src, src.parent, src.parent.parent):
        candidates.append(root / "tokenizer" / "text_tokenizer.json")
    candidates.append(src / "text_tokenizer.json")
    copy_tokenizer(candidates, dst)
    return cfg

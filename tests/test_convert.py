"""Weight import: Hugging Face and Meta checkpoints give the reference model's logits."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402

from chameleon_jax.checkpoint import load_model  # noqa: E402
from chameleon_jax.convert import TOKENIZER_FILE, ConversionError  # noqa: E402
from chameleon_jax.convert.__main__ import main as convert_main  # noqa: E402

VOCAB = 96
HIDDEN = 32
HEADS = 4


def tiny_hf_model(num_kv_heads: int, swin_norm: bool, *, seed: int = 0, num_layers: int = 2, qk_groups: int | None = None):
    """A random tiny ChameleonForConditionalGeneration with non-trivial norms.

    qk_groups: make the QK-norm rows identical within `qk_groups` equal groups of heads
    (1 = one set shared by all heads, as in Meta's single-file release).
    """
    from transformers import ChameleonConfig, ChameleonForConditionalGeneration

    vocab_map = {"<s>": 0, "<pad>": 1, "</s>": 2, "<image>": 3}
    vocab_map.update({f"IMGIMG{chr(ord('A') + i)}Z": 4 + i for i in range(8)})
    cfg = ChameleonConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=num_layers,
        num_attention_heads=HEADS, num_key_value_heads=num_kv_heads, max_position_embeddings=64,
        swin_norm=swin_norm, vocabulary_map=vocab_map,
        vq_config=dict(embed_dim=4, num_embeddings=8, latent_channels=32, base_channels=32, channel_multiplier=[1],
                       num_res_blocks=1, resolution=8, attn_resolutions=[]),
    )
    torch.manual_seed(seed)
    model = ChameleonForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "vqmodel" in name:
                continue
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.3 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.25)
        if qk_groups is not None:
            for layer in model.model.layers:
                for norm in (layer.self_attn.q_norm, layer.self_attn.k_norm):
                    for t in (norm.weight, norm.bias):
                        rows = t.shape[0] // qk_groups
                        for g in range(qk_groups):
                            t[g * rows:(g + 1) * rows] = t[g * rows].clone()
    return model


def hf_logits(model, ids: np.ndarray) -> np.ndarray:
    """Logits straight from lm_head (HF's forward overwrites image-token logits with -inf)."""
    with torch.no_grad():
        hidden = model.model(input_ids=torch.as_tensor(ids)).last_hidden_state
        return model.lm_head(hidden).float().numpy()


def sample_ids(seed=1, shape=(2, 11)):
    return np.random.default_rng(seed).integers(0, VOCAB, shape)


@pytest.mark.hf
@pytest.mark.parametrize(
    "num_kv_heads,swin_norm,scan",
    [(4, False, True), (2, True, True), (1, False, False), (2, False, False), (4, True, False)],
    ids=["mha-prenorm-scan", "gqa-swin-scan", "mqa-prenorm", "gqa-prenorm", "mha-swin"],
)
def test_hf_import_matches_hf_logits(tmp_path, num_kv_heads, swin_norm, scan):
    hf = tiny_hf_model(num_kv_heads, swin_norm)
    # Small shards for the scanned cases: the importer must follow model.safetensors.index.json.
    hf.save_pretrained(tmp_path / "hf", max_shard_size="40KB" if scan else "1GB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file() == scan
    (tmp_path / "hf" / "tokenizer.json").write_text('{"model": {"vocab": {}}}')
    args = ["hf", str(tmp_path / "hf"), str(tmp_path / "out")] + ([] if scan else ["--no-scan-layers"])
    assert convert_main(args) == 0

    model = load_model(tmp_path / "out")
    assert model.cfg.num_kv_heads == num_kv_heads and model.cfg.swin_norm == swin_norm
    assert model.cfg.scan_layers == scan and model.cfg.qk_norm == "per_head"
    assert (tmp_path / "out" / TOKENIZER_FILE).is_file()
    ids = sample_ids()
    ours = np.asarray(model(jnp.asarray(ids)))
    ref = hf_logits(hf, ids)
    diff = float(np.abs(ours - ref).max())
    print(f"HF parity kv_heads={num_kv_heads} swin_norm={swin_norm} scan={scan}: max |logit diff| = {diff:.2e}")
    assert np.abs(ref).max() > 1.0  # the comparison is not between near-zero logits
    assert diff <= 1e-4


@pytest.mark.hf
def test_hf_import_names_missing_and_misshapen_tensors(tmp_path):
    from safetensors.torch import save_file

    hf = tiny_hf_model(2, False)
    hf.save_pretrained(tmp_path / "hf")
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    del state["model.layers.1.mlp.up_proj.weight"]
    state["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(12, HIDDEN)
    for f in (tmp_path / "hf").glob("*.safetensors"):
        f.unlink()
    save_file(state, str(tmp_path / "hf" / "model.safetensors"))
    with pytest.raises(ConversionError) as err:
        from chameleon_jax.convert.hf import import_hf

        import_hf(tmp_path / "hf", tmp_path / "out")
    assert "model.layers.1.mlp.up_proj.weight" in str(err.value)
    assert "model.layers.0.self_attn.k_proj.weight" in str(err.value)
    assert not (tmp_path / "out" / "config.json").exists()


# --------------------------------------------------------------------------- Meta layout


def split_half_to_interleaved(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo HF's RoPE permutation of q/k rows (per head: halves -> interleaved pairs)."""
    rest = w.shape[1:]
    head_dim = w.shape[0] // num_heads
    return w.reshape(num_heads, 2, head_dim // 2, *rest).transpose(1, 2).reshape(num_heads * head_dim, *rest)


def write_meta_checkpoint(hf, path, shards: int, fused: bool):
    """Meta's release layout (per-rank files, interleaved RoPE rows) built from an HF model."""
    c = hf.config
    n, k, d = c.num_attention_heads, c.num_key_value_heads, c.hidden_size
    h = d // n
    sd = hf.state_dict()
    rank_dicts = [dict() for _ in range(shards)]

    def split(t, dim):
        return list(torch.chunk(t, shards, dim=dim))

    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        q = split_half_to_interleaved(sd[p + "self_attn.q_proj.weight"], n)
        kk = split_half_to_interleaved(sd[p + "self_attn.k_proj.weight"], k)
        v = sd[p + "self_attn.v_proj.weight"]
        for r, (qr, kr, vr) in enumerate(zip(split(q, 0), split(kk, 0), split(v, 0))):
            m = f"layers.{i}."
            rd = rank_dicts[r]
            if fused:
                rd[m + "attention.wqkv.weight"] = torch.cat([qr, kr, vr]).clone()
            else:
                rd[m + "attention.wq.weight"], rd[m + "attention.wk.weight"] = qr.clone(), kr.clone()
                rd[m + "attention.wv.weight"] = vr.clone()
            rd[m + "attention.wo.weight"] = split(sd[p + "self_attn.o_proj.weight"], 1)[r].clone()
            for which, heads in (("q", n), ("k", k)):
                for hf_name, meta_name in (("weight", "weight"), ("bias", "bias")):
                    rows = sd[p + f"self_attn.{which}_norm.{hf_name}"]
                    row = rows[r * (heads // shards)]  # this rank's heads share one set
                    rd[m + f"attention.{which}_normalization.{meta_name}"] = split_half_to_interleaved(row, 1).clone()
            w1, w3 = split(sd[p + "mlp.gate_proj.weight"], 0)[r], split(sd[p + "mlp.up_proj.weight"], 0)[r]
            if fused:
                rd[m + "feed_forward.w13.weight"] = torch.cat([w1, w3]).clone()
            else:
                rd[m + "feed_forward.w1.weight"], rd[m + "feed_forward.w3.weight"] = w1.clone(), w3.clone()
            rd[m + "feed_forward.w2.weight"] = split(sd[p + "mlp.down_proj.weight"], 1)[r].clone()
            rd[m + "attention_norm.weight"] = sd[p + "input_layernorm.weight"].clone()
            rd[m + "ffn_norm.weight"] = sd[p + "post_attention_layernorm.weight"].clone()
    for r in range(shards):
        rank_dicts[r]["tok_embeddings.weight"] = split(sd["model.embed_tokens.weight"], 1)[r].clone()
        rank_dicts[r]["output.weight"] = split(sd["lm_head.weight"], 0)[r].clone()
        rank_dicts[r]["norm.weight"] = sd["model.norm.weight"].clone()
        rank_dicts[r]["rope.freqs"] = torch.zeros(h // 2)
    path.mkdir(parents=True)
    if shards == 1:
        torch.save(rank_dicts[0], path / "consolidated.pth")
    else:
        for r, rd in enumerate(rank_dicts):
            torch.save(rd, path / f"consolidated.{r:02d}.pth")
    # Meta derives the FFN width: int(8 * 32 / 3) = 85, * 0.75 = 63, rounded up to a multiple of 64 = 64.
    assert c.intermediate_size == 64 and d == 32
    params = {"model": {"dim": d, "n_layers": c.num_hidden_layers, "n_heads": n, "n_kv_heads": k,
                        "vocab_size": c.vocab_size, "multiple_of": 64, "ffn_dim_multiplier": 0.75, "norm_eps": 1e-5,
                        "rope_theta": 10000.0, "qk_normalization": True, "swin_norm": c.swin_norm}}
    (path / "params.json").write_text(json.dumps(params))


@pytest.mark.hf
@pytest.mark.parametrize(
    "shards,fused,swin_norm,num_kv_heads",
    [(1, False, False, 4), (2, True, True, 2)],
    ids=["single-file-shared-qknorm", "two-ranks-fused-per-rank-qknorm"],
)
def test_meta_import_matches_hf_logits(tmp_path, shards, fused, swin_norm, num_kv_heads):
    hf = tiny_hf_model(num_kv_heads, swin_norm, seed=3, qk_groups=shards)
    assert hf.config.intermediate_size == 64
    src = tmp_path / "models" / "7b"
    write_meta_checkpoint(hf, src, shards, fused)
    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "tokenizer" / "text_tokenizer.json").write_text("{}")
    assert convert_main(["meta", str(src), str(tmp_path / "out")]) == 0

    model = load_model(tmp_path / "out")
    assert model.cfg.qk_norm == ("shared" if shards == 1 else "per_head")
    assert model.cfg.ffn_dim == 64 and model.cfg.swin_norm == swin_norm
    assert (tmp_path / "out" / TOKENIZER_FILE).is_file()
    ids = sample_ids(seed=4)
    diff = float(np.abs(np.asarray(model(jnp.asarray(ids))) - hf_logits(hf, ids)).max())
    print(f"Meta layout shards={shards} fused={fused} swin_norm={swin_norm}: max |logit diff| = {diff:.2e}")
    assert diff <= 1e-4


@pytest.mark.hf
def test_meta_import_names_misshapen_tensor(tmp_path):
    hf = tiny_hf_model(4, False, qk_groups=1)
    src = tmp_path / "meta"
    write_meta_checkpoint(hf, src, 1, False)
    sd = torch.load(src / "consolidated.pth", weights_only=True)
    sd["layers.1.feed_forward.w2.weight"] = torch.zeros(HIDDEN, 63)
    del sd["layers.0.attention.k_normalization.bias"]
    torch.save(sd, src / "consolidated.pth")
    from chameleon_jax.convert.meta import import_meta

    with pytest.raises(ConversionError) as err:
        import_meta(src, tmp_path / "out")
    assert "layers.1.feed_forward.w2.weight" in str(err.value)
    assert "layers.0.attention.k_normalization.bias" in str(err.value)

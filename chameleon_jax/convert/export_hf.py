"""Export a model directory to Hugging Face: `ChameleonForConditionalGeneration.from_pretrained(DST)` loads it.

    python -m chameleon_jax.convert export-hf SRC DST [--dtype float32|bfloat16]

SRC is a model directory (a trained run's `model/`, or an import). DST receives

    config.json, model.safetensors    the transformer, plus `model.vqmodel.*` (the image tokenizer's
                                      encoder and codebook) when SRC/tokenizer/ has an HF equivalent
    tokenizer.json, tokenizer_config.json, special_tokens_map.json
                                      the text tokenizer, ids equal to ours
    preprocessor_config.json, processor_config.json
                                      `ChameleonProcessor` settings (with an exported image tokenizer)
    vqgan.ckpt                        the whole VQGAN, decoder included, in the taming layout
                                      (`{"state_dict": ...}`, as Meta's Chameleon reads it)

The tensor names come from the importer's table (`hf.layer_table`, `hf.top_table`), read
backwards. Our q/k projections already rotate split halves, the layout HF's weights use,
so no RoPE permutation is needed; a QK-norm shared by all heads is written once per head,
as HF stores it.

Vocabulary: HF finds image tokens by name (`IMGIMG` + the code in letters A-J + one
character) in `config.vocabulary_map`, and masks them out of its logits. An imported
Chameleon vocabulary keeps its own tokenizer.json. An own vocabulary (specials, then
sentencepiece pieces, then the image-code block) becomes a tokenizer.json whose BPE or
unigram model is the sentencepiece model at the same ids, with the specials and
`IMGIMG...` names for the image block as added tokens, and `<image>` (the placeholder
HF's processor expands) on the first embedding row no token uses, when there is one.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from chameleon_jax import code_digits
from chameleon_jax.config import ModelConfig
from chameleon_jax.convert import ConversionError, TOKENIZER_FILE
from chameleon_jax.convert.hf import layer_table, ours_to_hf, top_table
from chameleon_jax.vocab import Vocabulary, chameleon_image_token_name

IMAGE_PLACEHOLDER = "<image>"


def check_exportable(cfg: ModelConfig) -> None:
    """Raises ConversionError naming each setting HF's Chameleon cannot express."""
    problems = []
    if cfg.qk_norm == "none":
        problems.append("qk_norm='none': HF's Chameleon always applies the QK LayerNorm")
    if cfg.qk_norm_eps != 1e-5:
        problems.append(f"qk_norm_eps={cfg.qk_norm_eps}: HF hard-codes 1e-5")
    if cfg.head_dim * cfg.num_heads != cfg.hidden_dim:
        problems.append(f"head_dim {cfg.head_dim} x num_heads {cfg.num_heads} != hidden_dim {cfg.hidden_dim}")
    if cfg.image_positions:
        problems.append(f"image_positions={cfg.image_positions}: HF has no learned image-code positions")
    if problems:
        raise ConversionError("cannot export to Hugging Face:\n  " + "\n  ".join(problems))


def transformer_tensors(cfg: ModelConfig, params: dict, dtype: np.dtype) -> dict[str, np.ndarray]:
    """HF name -> tensor for every transformer parameter (a pure-dict tree as `load_model` holds it).
    Per-digit image-code rows (`image_code_digits`) are folded into the embedding and output tables."""
    if cfg.image_code_digits:
        params = code_digits.fold(cfg.image_code_digits, cfg.image_code_offset, params, cfg.image_code_own_logits)
    out = {}
    for name, hf_shape, key, _, transposed in top_table(cfg):
        out[name] = ours_to_hf(_get(params, key), transposed, hf_shape)
    for i in range(cfg.num_layers):
        block = params["blocks"][i] if not cfg.scan_layers else None
        for name, hf_shape, key, _, transposed in layer_table(cfg, i):
            if cfg.qk_norm == "shared" and key[1] in ("q_norm", "k_norm"):
                key = key[:-1] + (key[-1].replace("_nh", "_h"),)
            value = _get(block, key) if block is not None else _get(params["blocks"], key)[i]
            if key[1] in ("q_norm", "k_norm"):
                value = np.broadcast_to(value, hf_shape)  # a shared set, once per head
            out[name] = ours_to_hf(value, transposed, hf_shape)
    return {k: np.ascontiguousarray(np.asarray(v, np.float32).astype(dtype)) for k, v in out.items()}


def _get(tree, key):
    for k in key:
        tree = tree[k]
    return np.asarray(tree)


def hf_config(cfg: ModelConfig, vocab_map: dict[str, int], specials: dict[str, int], vq_config: dict | None,
              dtype: str) -> dict:
    """The ChameleonConfig dict for `cfg` (the inverse of `hf.config_from_hf`)."""
    out = {
        "architectures": ["ChameleonForConditionalGeneration"],
        "model_type": "chameleon",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_dim,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "initializer_range": cfg.initializer_range,
        "rms_norm_eps": cfg.norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "model_parallel_size": 1,
        "swin_norm": cfg.swin_norm,
        "tie_word_embeddings": False,
        "bos_token_id": specials["bos"],
        "eos_token_id": specials["eos"],
        "pad_token_id": specials["pad"],
        "vocabulary_map": vocab_map,
        "dtype": dtype,
    }
    # Without an exported image tokenizer HF still builds one (randomly initialised, reported
    # missing when loading): the smallest it allows, rather than its 512 px default.
    out["vq_config"] = vq_config if vq_config is not None else {
        "model_type": "chameleon_vqgan", "embed_dim": 32, "num_embeddings": 32,
        "latent_channels": 32, "resolution": 32, "base_channels": 32, "channel_multiplier": [1],
        "num_res_blocks": 1, "attn_resolutions": [], "attn_type": "none"}
    return out


# --------------------------------------------------------------------------- text tokenizer


def own_tokenizer_json(vocab_dir: Path, vocab: Vocabulary, embedding_rows: int) -> tuple[str, dict[str, int]]:
    """An own vocabulary as a `tokenizers` tokenizer.json (ids equal ours), and its name -> id map."""
    try:
        from sentencepiece import sentencepiece_model_pb2
        from tokenizers import Tokenizer, processors
        from transformers.convert_slow_tokenizer import SpmConverter
    except ImportError as e:
        raise ImportError(f"exporting a sentencepiece vocabulary needs tokenizers and transformers >= 5 ({e})") from None
    if not hasattr(SpmConverter, "build_tokenizer_from_spm_proto"):
        raise ImportError("exporting a sentencepiece vocabulary needs transformers >= 5")
    layout = json.loads((vocab_dir / "vocab.json").read_text())
    offset = int(layout["text_offset"])
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString((vocab_dir / "spm.model").read_bytes())
    pieces = [p.piece for p in proto.pieces]
    if proto.trainer_spec.model_type == sentencepiece_model_pb2.TrainerSpec.BPE:
        sp_vocab = {p: i for i, p in enumerate(pieces)}
    else:
        sp_vocab = [(p.piece, p.score) for p in proto.pieces]
    base = SpmConverter.build_tokenizer_from_spm_proto(proto, sp_vocab)
    if base is None:
        raise ConversionError(f"{vocab_dir / 'spm.model'}: sentencepiece model type {proto.trainer_spec.model_type} "
                              "has no tokenizers equivalent")
    spec = json.loads(base.to_str())
    piece_names = dict(zip(("pad", "bos", "eos", "boi", "eoi", "eot"), ("<pad>", "<s>", "</s>", "<boi>", "<eoi>", "<eot>")))
    added = {piece_names[n]: i for n, i in vocab.special_ids.items()}
    added.update({chameleon_image_token_name(c): int(i) for c, i in enumerate(vocab.code_to_id)})
    if vocab.size < embedding_rows:
        added[IMAGE_PLACEHOLDER] = vocab.size
    names = {p: offset + i for i, p in enumerate(pieces)}
    clash = sorted(set(added) & set(names))
    if clash:
        raise ConversionError(f"sentencepiece pieces {clash[:5]} collide with special or image token names")
    names.update(added)
    if len(set(names.values())) != len(names):
        raise ConversionError(f"{vocab_dir}: two tokens share an id")
    # The model holds every id (the sentencepiece ids shifted past the specials); the specials,
    # image codes and <image> are also added tokens, so text never splits into or across them.
    model = spec["model"]
    if model["type"] == "BPE":
        model["vocab"] = dict(names)
    else:
        scores = {p.piece: p.score for p in proto.pieces}
        by_id = sorted(names.items(), key=lambda kv: kv[1])
        if [i for _, i in by_id] != list(range(len(by_id))):
            raise ConversionError(f"{vocab_dir}: the ids of a unigram vocabulary must be contiguous")
        model["vocab"] = [[n, scores.get(n, 0.0)] for n, _ in by_id]
        model["unk_id"] = offset + model["unk_id"]
    spec["added_tokens"] = [
        {"id": i, "content": n, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
         "special": True} for n, i in sorted(added.items(), key=lambda kv: kv[1])]
    spec["post_processor"] = None
    tok = Tokenizer.from_str(json.dumps(spec))
    bos = vocab.bos_id
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    for n, i in names.items():
        if tok.token_to_id(n) != i:
            raise ConversionError(f"the written tokenizer puts {n!r} at {tok.token_to_id(n)}, ours at {i}")
    return tok.to_str(pretty=False), names


def chameleon_vocab_map(tokenizer_json: Path) -> dict[str, int]:
    data = json.loads(tokenizer_json.read_text())
    out = dict(data.get("model", {}).get("vocab", {}))
    out.update({t["content"]: int(t["id"]) for t in data.get("added_tokens", [])})
    return out


def write_tokenizer_files(dst: Path, tokenizer_json: str, vocab: Vocabulary, names: dict[str, int],
                          max_len: int) -> None:
    id_to_name = {i: n for n, i in names.items()}
    special = {"bos_token": id_to_name[vocab.bos_id], "eos_token": id_to_name[vocab.eos_id],
               "pad_token": id_to_name[vocab.pad_id], "sep_token": id_to_name[vocab.eot_id]}
    if "<unk>" in names:
        special["unk_token"] = "<unk>"
    (dst / "tokenizer.json").write_text(tokenizer_json)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_len, **special,
              "boi_token": id_to_name[vocab.boi_id], "eoi_token": id_to_name[vocab.eoi_id]}
    if IMAGE_PLACEHOLDER in names:
        config["image_token"] = IMAGE_PLACEHOLDER
    (dst / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (dst / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


# --------------------------------------------------------------------------- the export


def export_hf(src: str | os.PathLike, dst: str | os.PathLike, *, dtype: str = "auto") -> dict:
    """Writes model directory `src` as a Hugging Face Chameleon directory `dst`; returns a summary.

    dtype: storage dtype of the written tensors (auto: the model's param_dtype).
    """
    import ml_dtypes
    from flax import nnx

    from chameleon_jax.checkpoint import load_config, load_model

    src, dst = Path(src), Path(dst)
    cfg = load_config(src)
    check_exportable(cfg)
    dtype = cfg.param_dtype if dtype == "auto" else dtype
    np_dtype = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}[dtype]

    if (src / "vocab" / "vocab.json").is_file():
        vocab = Vocabulary.load(src / "vocab")
        tokenizer_json, names = own_tokenizer_json(src / "vocab", vocab, cfg.vocab_size)
    elif (src / TOKENIZER_FILE).is_file():
        vocab = Vocabulary.from_chameleon_tokenizer(src / TOKENIZER_FILE)
        tokenizer_json, names = (src / TOKENIZER_FILE).read_text(), chameleon_vocab_map(src / TOKENIZER_FILE)
    else:
        raise ConversionError(f"{src} has no vocabulary (vocab/vocab.json or {TOKENIZER_FILE})")
    if vocab.size > cfg.vocab_size:
        raise ConversionError(f"the vocabulary has {vocab.size} ids but the model only {cfg.vocab_size} rows")

    params = nnx.to_pure_dict(nnx.state(load_model(src), nnx.Param))
    tensors = transformer_tensors(cfg, params, np_dtype)
    del params

    vq_config, image_tok, vq_note, taming = None, None, "none in SRC/tokenizer/", False
    if (src / "tokenizer" / "tokenizer.json").is_file():
        import vqvae
        from vqvae.convert import ConversionError as VQConversionError
        from vqvae.convert import exportable, hf_vq_config, to_hf_state_dict

        image_tok = vqvae.load_tokenizer(src / "tokenizer")
        try:
            exportable(image_tok.config)
            taming = image_tok.can_decode
            vq_config = hf_vq_config(image_tok.config)
            tensors.update({k: np.ascontiguousarray(v, np_dtype) for k, v in to_hf_state_dict(image_tok.model).items()})
            vq_note = "encoder exported"
        except VQConversionError as e:
            vq_note = f"not exported to the HF layout: {e}"

    if dst.exists() and any(dst.iterdir()):
        raise ConversionError(f"{dst} exists and is not empty; choose a new directory")
    tmp = dst.with_name(dst.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        _write(tmp, cfg, tensors, names, vocab, tokenizer_json, vq_config, image_tok, dtype)
        if taming:
            from vqvae.convert import write_taming

            write_taming(image_tok.model, tmp / "vqgan.ckpt")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if dst.exists():
        dst.rmdir()
    os.replace(tmp, dst)
    return {"tensors": len(tensors), "dtype": dtype, "vocab": vocab.size, "image_tokenizer": vq_note,
            "vqgan": "vqgan.ckpt" if taming else "none"}


def _write(tmp: Path, cfg, tensors, names, vocab, tokenizer_json, vq_config, image_tok, dtype) -> None:
    from safetensors.numpy import save_file

    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(
        hf_config(cfg, names, vocab.special_ids, vq_config, dtype), indent=2) + "\n")
    write_tokenizer_files(tmp, tokenizer_json, vocab, names, cfg.max_seq_len)
    if vq_config is None:
        return
    size = image_tok.image_size
    (tmp / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "ChameleonImageProcessor", "size": {"shortest_edge": size},
        "crop_size": {"height": size, "width": size}, "do_resize": True, "do_center_crop": True,
        "do_rescale": True, "rescale_factor": 1 / 127.5, "do_normalize": True,
        "image_mean": [1.0, 1.0, 1.0], "image_std": [1.0, 1.0, 1.0], "do_convert_rgb": True, "resample": 1,
    }, indent=2) + "\n")
    (tmp / "processor_config.json").write_text(json.dumps({
        "processor_class": "ChameleonProcessor", "image_seq_length": image_tok.codes_per_image,
        "image_token": IMAGE_PLACEHOLDER,
    }, indent=2) + "\n")

"""Export to Hugging Face: a model trained here loads in transformers with the same logits,
ids and image tokens; the VQGAN exports in the taming layout and imports back unchanged."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from flax import nnx  # noqa: E402

from chameleon_jax.checkpoint import save_model  # noqa: E402
from chameleon_jax.config import ModelConfig  # noqa: E402
from chameleon_jax.convert.__main__ import main as convert_main  # noqa: E402
from chameleon_jax.transformer import Transformer  # noqa: E402
from chameleon_jax.vocab import Vocabulary  # noqa: E402

pytestmark = pytest.mark.hf

TEXTS = ["a red square at the top left.", "two blue circles, one small", "where is the green triangle?",
         "the  answer is 42 ,  not 7!", "  leading spaces and trailing ", "caf\u00e9 na\u00efve \u00bd"]


def vq_config():
    from vqvae import VQConfig

    # GroupNorm(32) as Hugging Face hard-codes it; 8 px -> 4x4 codes of 32, attention at 4 px.
    return VQConfig(image_size=8, base_channels=32, channel_mult=(1, 1), num_res_blocks=1,
                    attn_resolutions=(4,), norm_groups=32, z_channels=32, embed_dim=8, quantizer="vq",
                    codebook_size=32)


def random_params(module_fn, seed: int):
    """The module built by `module_fn`, with random numpy values (nothing compiled): norms
    that are not the identity, so a misplaced norm tensor shows in the outputs."""
    rng = np.random.default_rng(seed)
    graphdef, state = nnx.split(nnx.eval_shape(module_fn))
    for path, var in nnx.to_flat_state(state):
        name = str(path[-1])
        noise = rng.standard_normal(var.shape).astype(np.float32)
        if name.startswith("scale"):
            var.set_value(1.0 + 0.3 * noise)
        elif name.startswith(("bias", "codebook")):
            var.set_value(0.3 * noise)
        elif name == "ema_count":
            var.set_value(np.ones(var.shape, np.float32))
        else:
            var.set_value(noise / np.sqrt(np.prod(var.shape[:-1])))  # fan-in scaled
    return nnx.merge(graphdef, state)


def random_model(cfg: ModelConfig, seed: int) -> Transformer:
    return random_params(lambda: Transformer(cfg, rngs=nnx.Rngs(0)), seed)


def random_vq(cfg, seed: int):
    from vqvae.model import VQModel

    model = random_params(lambda: VQModel(cfg, rngs=nnx.Rngs(0)), seed)
    if cfg.quantizer == "l2_ema":
        cb = model.quantize.codebook[...]
        model.quantize.codebook.set_value(cb / np.linalg.norm(cb, axis=1, keepdims=True))
    return model


@pytest.fixture(scope="module", params=[("shared", True, False, ()), ("per_head", False, True, ()),
                                        ("shared", False, False, (2, 4, 4))],
                ids=["shared-qknorm-scan", "per-head-qknorm-swin", "digits-only-head-folded"])
def exported(request, tmp_path_factory):
    from vqvae.tokenizer import save_tokenizer

    qk_norm, scan, swin, digits = request.param
    root = tmp_path_factory.mktemp("export")
    src = root / "model"
    vocab = Vocabulary.train(TEXTS * 20, src / "vocab", text_vocab_size=64, codebook_size=32)
    cfg = ModelConfig(vocab_size=vocab.padded_size(16), hidden_dim=32, num_layers=2, num_heads=4, num_kv_heads=2,
                      head_dim=8, ffn_dim=64, max_seq_len=64, qk_norm=qk_norm, swin_norm=swin, scan_layers=scan,
                      image_code_digits=digits, image_code_offset=int(vocab.code_to_id[0]) if digits else -1,
                      image_code_own_logits=not digits)  # the demo's head: image codes scored by their digits alone
    model = random_model(cfg, seed=3)
    save_model(src, model, cfg)
    save_tokenizer(random_vq(vq_config(), seed=4), src / "tokenizer")
    assert convert_main(["export-hf", str(src), str(root / "hf")]) == 0
    return model, vocab, src, root / "hf"


@pytest.fixture(scope="module")
def exported_in_transformers(exported):
    """The exported directory loaded by transformers (once per exported model), and its loading info."""
    from transformers import ChameleonForConditionalGeneration

    hf, info = ChameleonForConditionalGeneration.from_pretrained(exported[3], output_loading_info=True)
    return hf.eval(), info


def hf_logits(hf, ids: np.ndarray) -> np.ndarray:
    """Logits straight from lm_head (HF's forward overwrites image-token logits)."""
    with torch.no_grad():
        return hf.lm_head(hf.model(input_ids=torch.as_tensor(ids)).last_hidden_state).float().numpy()


def test_exported_model_gives_our_logits_in_transformers(exported, exported_in_transformers):
    model, vocab, _, _ = exported
    hf, info = exported_in_transformers
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    # Text, specials and image codes together.
    ids = np.random.default_rng(0).integers(0, vocab.size, (2, 13))
    ours = np.asarray(model(ids))
    theirs = hf_logits(hf, ids)
    assert ours.shape == theirs.shape
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)
    # HF masks exactly our image-code ids out of its generation logits.
    with torch.no_grad():
        masked = hf(input_ids=torch.as_tensor(ids)).logits.numpy()
    is_min = (masked == np.finfo(np.float32).min).all(axis=(0, 1))
    assert np.array_equal(np.flatnonzero(is_min), np.sort(vocab.code_to_id))


def test_exported_tokenizer_gives_our_ids(exported):
    from transformers import AutoTokenizer

    _, vocab, _, hf_dir = exported
    tok = AutoTokenizer.from_pretrained(hf_dir)
    for text in TEXTS:
        assert tok(text)["input_ids"] == [vocab.bos_id] + vocab.encode_text(text), text
        assert tok.decode(vocab.encode_text(text)) == vocab.decode_text(vocab.encode_text(text))
    assert tok.convert_tokens_to_ids(["<s>", "</s>", "<pad>"]) == [vocab.bos_id, vocab.eos_id, vocab.pad_id]
    config = json.loads((hf_dir / "config.json").read_text())
    assert config["vocabulary_map"]["<image>"] == vocab.size  # the first embedding row no token uses


def test_exported_image_encoder_gives_our_image_tokens(exported, exported_in_transformers):
    import vqvae

    _, vocab, src, _ = exported
    hf, _ = exported_in_transformers
    images = np.random.default_rng(1).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    codes = np.asarray(vqvae.load_tokenizer(src / "tokenizer").encode(images)).reshape(3, -1)
    pixels = torch.as_tensor(images.astype(np.float32) / 127.5 - 1.0).permute(0, 3, 1, 2)
    with torch.no_grad():
        hf_ids = hf.model.get_image_tokens(pixels).numpy()
    assert len(np.unique(codes)) > 1
    np.testing.assert_array_equal(hf_ids.reshape(3, -1), vocab.image_ids(codes))


def test_taming_export_imports_back_to_the_same_codes_and_pictures(exported, tmp_path):
    import vqvae
    from vqvae.convert import main as vq_main

    _, _, src, hf_dir = exported
    vq_main(["taming", str(hf_dir / "vqgan.ckpt"), str(tmp_path / "back"), "image_size=8"])
    ours, back = vqvae.load_tokenizer(src / "tokenizer"), vqvae.load_tokenizer(tmp_path / "back")
    images = np.random.default_rng(2).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    codes = np.asarray(ours.encode(images))
    np.testing.assert_array_equal(np.asarray(back.encode(images)), codes)
    np.testing.assert_array_equal(np.asarray(back.decode(codes)), np.asarray(ours.decode(codes)))


def test_l2_codebook_exports_as_a_plain_one(tmp_path):
    import dataclasses

    import vqvae
    from vqvae.convert import export_taming
    from vqvae.tokenizer import save_tokenizer

    cfg = dataclasses.replace(vq_config(), quantizer="l2_ema")
    save_tokenizer(random_vq(cfg, seed=5), tmp_path / "l2")
    export_taming(tmp_path / "l2", tmp_path / "l2.safetensors")
    from vqvae.convert import convert_taming

    convert_taming(tmp_path / "l2.safetensors", tmp_path / "back", ["image_size=8"])
    ours, back = vqvae.load_tokenizer(tmp_path / "l2"), vqvae.load_tokenizer(tmp_path / "back")
    images = np.random.default_rng(3).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    codes = np.asarray(ours.encode(images))
    np.testing.assert_array_equal(np.asarray(back.encode(images)), codes)
    np.testing.assert_allclose(np.asarray(back.decode(codes)), np.asarray(ours.decode(codes)), atol=1)


def test_hf_import_then_export_gives_back_the_same_tensors(tmp_path):
    from safetensors.numpy import load_file

    from eval.bench.decode import save_random_hf_chameleon

    cfg = ModelConfig(vocab_size=128, hidden_dim=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                      ffn_dim=64, max_seq_len=64)
    save_random_hf_chameleon(cfg, tmp_path / "hf", codebook_size=32, seed=1)
    assert convert_main(["hf", str(tmp_path / "hf"), str(tmp_path / "ours")]) == 0
    assert convert_main(["export-hf", str(tmp_path / "ours"), str(tmp_path / "back")]) == 0
    before = {k: v for k, v in load_file(str(tmp_path / "hf" / "model.safetensors")).items()
              if not k.startswith("model.vqmodel.")}
    after = load_file(str(tmp_path / "back" / "model.safetensors"))
    assert sorted(after) == sorted(before)
    for name, value in before.items():
        np.testing.assert_array_equal(after[name], value, err_msg=name)
    assert (tmp_path / "back" / "tokenizer.json").read_text() == (tmp_path / "hf" / "tokenizer.json").read_text()
    hf_cfg = json.loads((tmp_path / "back" / "config.json").read_text())
    assert hf_cfg["vocabulary_map"] == json.loads((tmp_path / "hf" / "config.json").read_text())["vocabulary_map"]


def test_export_refuses_what_hugging_face_cannot_express(tmp_path, capsys):
    cfg = ModelConfig(vocab_size=64, hidden_dim=32, num_layers=1, num_heads=4, num_kv_heads=4, head_dim=8,
                      ffn_dim=64, qk_norm="none", image_positions=4, boi_id=1, eoi_id=2)
    save_model(tmp_path / "m", random_model(cfg, 0), cfg)
    assert convert_main(["export-hf", str(tmp_path / "m"), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "qk_norm='none'" in err and "image_positions=4" in err
    assert not (tmp_path / "out").exists()

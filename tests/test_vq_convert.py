"""Importing taming-layout VQGAN weights: round trips through safetensors and torch checkpoints, clear errors."""

import dataclasses

import numpy as np
import pytest

from vqvae import VQ_PRESETS, Tokenizer, load_tokenizer
from vqvae.convert import (
    ConversionError,
    convert_taming,
    infer_taming_config,
    main,
    read_safetensors,
    to_taming_state_dict,
)
from vqvae.model import create_model

# Level attention at 8 px and the middle attention: every kind of block is named and converted.
CFG = dataclasses.replace(VQ_PRESETS["tiny"](), attn_resolutions=(8,))


def _images(n, size, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def source():
    model = create_model(CFG, 7)
    # A codebook spread like the latents, so the codes of random pictures are varied.
    x = _images(8, 16, seed=1) / 127.5 - 1
    z = np.asarray(model.latents(x)).reshape(-1, CFG.embed_dim)
    model.quantize.codebook[...] = z[np.random.default_rng(2).choice(len(z), CFG.codebook_size, replace=False)]
    return model


def _save_safetensors(sd, path):
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in sd.items()}, str(path))


def test_taming_round_trip_gives_the_same_codes_and_pictures(source, tmp_path):
    sd = to_taming_state_dict(source)
    assert sd["encoder.conv_in.weight"].shape == (8, 3, 3, 3)  # torch OIHW
    assert "encoder.down.1.attn.0.q.weight" in sd and "decoder.up.1.upsample.conv.weight" in sd
    assert sd["quantize.embedding.weight"].shape == (64, 8)
    sd["loss.discriminator.main.0.weight"] = np.zeros((4, 3, 4, 4), np.float32)  # not part of the tokenizer
    _save_safetensors(sd, tmp_path / "vq.safetensors")
    # Taming fixes GroupNorm at 32 groups; this tiny model has fewer channels, so the test says 4.
    assert dataclasses.replace(infer_taming_config(sd, image_size=16), norm_groups=4) == CFG
    out = convert_taming(tmp_path / "vq.safetensors", tmp_path / "tok", ["image_size=16", "norm_groups=4"])
    tok, ref = load_tokenizer(out), Tokenizer(source)
    x = _images(4, 16, seed=3)
    codes = ref.encode(x)
    assert len(np.unique(np.asarray(codes))) > 4
    np.testing.assert_array_equal(tok.encode(x), codes)
    np.testing.assert_array_equal(tok.decode(codes), ref.decode(codes))
    assert tok.meta["source"] == "taming:vq.safetensors"


def test_taming_torch_checkpoint(source, tmp_path):
    torch = pytest.importorskip("torch")
    sd = {k: torch.from_numpy(np.array(v)) for k, v in to_taming_state_dict(source).items()}
    torch.save({"state_dict": sd, "global_step": 10}, tmp_path / "last.ckpt")
    main(["taming", str(tmp_path / "last.ckpt"), str(tmp_path / "tok"), "image_size=16", "norm_groups=4"])
    x = _images(2, 16, seed=4)
    np.testing.assert_array_equal(load_tokenizer(tmp_path / "tok").encode(x), Tokenizer(source).encode(x))


def test_missing_or_misshapen_tensor_is_named(source, tmp_path):
    sd = to_taming_state_dict(source)
    del sd["decoder.mid.attn_1.k.bias"]
    sd["encoder.down.0.block.0.conv2.weight"] = np.zeros((8, 8, 1, 1), np.float32)
    _save_safetensors(sd, tmp_path / "bad.safetensors")
    with pytest.raises(ConversionError) as e:
        convert_taming(tmp_path / "bad.safetensors", tmp_path / "tok", ["image_size=16", "norm_groups=4"])
    assert "missing tensor decoder.mid.attn_1.k.bias" in str(e.value)
    assert "encoder.down.0.block.0.conv2.weight: expected (8, 8, 3, 3), got (8, 8, 1, 1)" in str(e.value)
    with pytest.raises(ConversionError, match="missing tensor quant_conv.weight"):
        infer_taming_config({k: v for k, v in sd.items() if not k.startswith("quant_conv")})


def test_safetensors_reader_handles_bfloat16(tmp_path):
    import ml_dtypes
    from safetensors.numpy import save_file

    a = np.arange(6, dtype=np.float32).reshape(2, 3) / 4
    save_file({"a": a.astype(ml_dtypes.bfloat16), "b": a}, str(tmp_path / "x.safetensors"))
    got = read_safetensors(tmp_path / "x.safetensors")
    np.testing.assert_array_equal(got["a"], a)
    assert got["a"].dtype == np.float32
    assert set(read_safetensors(tmp_path / "x.safetensors", keep=lambda n: n == "b")) == {"b"}

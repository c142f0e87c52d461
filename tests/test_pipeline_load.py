"""load_pipeline on a trained model's directory layout, and the generation CLI that writes a page."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from flax import nnx

from chameleon_jax.config import ModelConfig


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """DIR/config.json + params/ (tiny random Transformer), vocab/ (sentencepiece), tokenizer/ (tiny VQ)."""
    import vqvae
    from chameleon_jax.checkpoint import save_model
    from chameleon_jax.transformer import Transformer
    from chameleon_jax.vocab import Vocabulary

    root = tmp_path_factory.mktemp("model")
    texts = ["a red circle on the left", "two blue squares", "the green triangle becomes red"] * 20
    vq_cfg = vqvae.VQ_PRESETS["tiny"]()
    vocab = Vocabulary.train(texts, root / "vocab", text_vocab_size=48, codebook_size=vq_cfg.codebook_size)
    vqvae.save_tokenizer(vqvae.VQModel(vq_cfg, rngs=nnx.Rngs(0)), root / "tokenizer")
    cfg = ModelConfig(vocab_size=vocab.padded_size(16), hidden_dim=32, num_layers=2, num_heads=2, num_kv_heads=2,
                      head_dim=16, ffn_dim=64, max_seq_len=96)
    save_model(root, Transformer(cfg, rngs=nnx.Rngs(0)))
    return root


def test_load_pipeline_reads_model_vocab_and_image_tokenizer(model_dir):
    import chameleon_jax

    pipe = chameleon_jax.load_pipeline(model_dir)
    assert pipe.codes_per_image == 16 and pipe.can_decode_images
    image = np.zeros([16, 16, 3], np.uint8)
    [result] = pipe.generate([["a red circle", image]], modality="image", cfg_scale=2.0, seed=0)
    assert len(result) == 1 and result[0].shape == (16, 16, 3) and result[0].dtype == np.uint8
    codes = pipe.encode_images([result[0]])
    assert codes.shape == (1, 4, 4) and pipe.decode_images(codes).shape == (1, 16, 16, 3)


def test_generate_cli_writes_html_and_markdown_with_pngs(model_dir, tmp_path):
    from PIL import Image

    from chameleon_jax.generate import main

    Image.fromarray(np.full([20, 20, 3], 200, np.uint8)).save(tmp_path / "in.png")
    out = tmp_path / "page"
    main([f"path={model_dir}", "prompt=what is <image> here", f"image={tmp_path / 'in.png'}", "modality=image",
          "cfg_scale=3", "num_samples=2", f"out={out}"])
    html, md = (out / "index.html").read_text(), (out / "page.md").read_text()
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["prompt_1.png", "sample1_0.png", "sample2_0.png"]
    for name in pngs:
        assert name in html and name in md
    assert "what is" in html and "here" in md


def test_generate_cli_reports_config_errors_clearly(model_dir, capsys):
    from chameleon_jax import configlib
    from chameleon_jax.generate import main

    with pytest.raises(SystemExit) as exit_info:
        configlib.main_guard(lambda: main([f"path={model_dir}", "prompt=two <image> <image>", "image=x.png"]))
    assert exit_info.value.code == 2 and "does not exist" in capsys.readouterr().err


def test_the_jacobi_bench_times_both_decodings_and_checks_greedy_jacobi_draws_the_sequential_pictures(
        model_dir, tmp_path):
    import json

    from eval.bench import jacobi as bench_jacobi

    rows = bench_jacobi.main([f"model_dir={model_dir}", "prompts=a red circle,two blue squares", "windows=4,16",
                              "inits=uniform", "cfg_scales=1.0,2.0", "rounds=2", f"out={tmp_path / 'j.json'}"])
    assert [(r["cfg_scale"], r["decoding"], r["window"]) for r in rows] == [
        (s, d, w) for s in (1.0, 2.0) for d, w in (("sequential", 0), ("jacobi", 4), ("jacobi", 16))]
    for r in rows:
        assert r["same_tokens"], r
        assert r["passes"] <= 16 + 2 and r["ms_per_pass"] > 0 and r["speed"] > 0
        sequential = next(s for s in rows if s["cfg_scale"] == r["cfg_scale"] and s["decoding"] == "sequential")
        assert r["break_even_passes"] == pytest.approx(sequential["passes"] / r["pass_cost"])
    assert [r for r in rows if r["decoding"] == "sequential"][0]["passes"] == 16 + 2  # prefill, 16 codes, <eoi>
    assert json.loads((tmp_path / "j.json").read_text())["rows"] == json.loads(json.dumps(rows))

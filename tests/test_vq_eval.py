"""Tokenizer evaluation: PSNR / SSIM, and the figures, files and judge of eval.vq on pictures made here."""

import dataclasses
import json

import numpy as np
import pytest

from chameleon_jax.data import shapes
from chameleon_jax.data.shapes.records import make_example
from eval import vq as eval_vq
from vqvae import VQ_PRESETS, Tokenizer
from vqvae.image_metrics import mse, psnr_from_mse, ssim
from vqvae.model import create_model


def test_evaluate_writes_figures_grid_and_headline(tmp_path):
    cfg = dataclasses.replace(VQ_PRESETS["tiny"](), image_size=32)  # the judge needs >= 24 px
    tok = Tokenizer(create_model(cfg, 0))
    examples = [make_example(0, "test", i, 32) for i in range(12)]
    images = np.stack([ex["image"] for ex in examples])
    objects = [shapes.example_objects(ex) for ex in examples]
    tok.save(tmp_path / "run" / "tokenizer")

    results = eval_vq.evaluate(tmp_path / "run", images=images, objects=objects, batch_size=5)
    for key in ("psnr", "ssim", "codebook_usage", "codebook_perplexity", "judge_accuracy",
                "encode_images_per_s", "decode_images_per_s"):
        assert np.isfinite(results[key]), key
    assert results["num_images"] == 12 and results["codes_per_image"] == 64
    assert results["judge_accuracy_originals"] == 1.0  # the judge reads every original picture
    assert 0 < results["codebook_usage"] <= 1 and 1 <= results["codebook_perplexity"] <= 64
    codes = np.asarray(tok.encode(images))
    assert results["codes_used"] == len(np.unique(codes))
    recon = np.asarray(tok.decode(codes))
    mse = np.mean((images.astype(np.float64) - recon) ** 2)
    np.testing.assert_allclose(results["psnr"], 10 * np.log10(255**2 / mse), rtol=1e-5)

    saved = json.loads((tmp_path / "run" / "eval_vq.json").read_text())
    assert saved["psnr"] == results["psnr"] and saved["samples"] == ["eval_vq.png"]
    assert (tmp_path / "run" / "eval_vq.png").stat().st_size > 500
    headline = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert headline["vq_psnr"] == results["psnr"]
    assert "psnr" in eval_vq.format_results(results)


def test_perfect_reconstruction_scores_full_marks():
    """A tokenizer stand-in that returns its input: infinite PSNR, SSIM 1, judge 100%."""

    class Echo(Tokenizer):
        image_size, codes_per_image, codebook_size, can_decode = 32, 1, 4, True

        def __init__(self):  # no model: codes are row numbers, decode hands the pictures back
            self._images = None

        def encode(self, images, batch_size=None):
            self._images = images
            return np.arange(len(images)).reshape(-1, 1, 1) % 4

        def decode(self, codes, batch_size=None):
            return self._images[: len(codes)]

    examples = [make_example(0, "validation", i, 32) for i in range(6)]
    images = np.stack([ex["image"] for ex in examples])
    results = eval_vq.evaluate(Echo(), images=images, objects=[shapes.example_objects(e) for e in examples],
                               batch_size=6)
    assert np.isinf(results["psnr"]) and abs(results["ssim"] - 1) < 1e-6
    assert results["judge_accuracy"] == 1.0 and results["codebook_usage"] == 1.0


def test_psnr_and_ssim():
    a = np.random.default_rng(5).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    assert np.isinf(psnr_from_mse(mse(a, a))).all()
    np.testing.assert_allclose(ssim(a, a), 1.0, atol=1e-5)
    noisy = np.clip(a.astype(int) + np.random.default_rng(6).integers(-20, 21, a.shape), 0, 255).astype(np.uint8)
    m = np.asarray(mse(a, noisy))
    np.testing.assert_allclose(psnr_from_mse(m), 10 * np.log10(255**2 / m), rtol=1e-6)
    # Brute force: the Gaussian-weighted statistics of every valid 11x11 window.
    x, y = a[:1].astype(np.float64), noisy[:1].astype(np.float64)
    g = np.exp(-((np.arange(11) - 5) ** 2) / (2 * 1.5**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    vals = []
    for i in range(32 - 10):
        for j in range(32 - 10):
            for c in range(3):
                px, py = x[0, i : i + 11, j : j + 11, c], y[0, i : i + 11, j : j + 11, c]
                mx, my = (w * px).sum(), (w * py).sum()
                vx, vy = (w * px * px).sum() - mx * mx, (w * py * py).sum() - my * my
                cxy = (w * px * py).sum() - mx * my
                vals.append((2 * mx * my + c1) * (2 * cxy + c2) / ((mx * mx + my * my + c1) * (vx + vy + c2)))
    np.testing.assert_allclose(float(ssim(a[:1], noisy[:1])[0]), np.mean(vals), rtol=1e-4)


def test_the_command_scores_a_folder_of_pictures_at_any_size(tmp_path, capsys):
    """A 40 px tokenizer (no Shapes build at that size) is scored on the user's own pictures."""
    from PIL import Image

    tok = Tokenizer(create_model(dataclasses.replace(VQ_PRESETS["tiny"](), image_size=40), 0))
    tok.save(tmp_path / "run" / "tokenizer")
    pics = tmp_path / "pics" / "sub"
    pics.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(5):  # other sizes and aspects: fitted to 40 px as training fits them
        Image.fromarray(rng.integers(0, 256, (48 + 8 * i, 60, 3), np.uint8)).save(pics / f"{i}.png")

    eval_vq.main([f"run_dir={tmp_path / 'run'}", f"pictures={tmp_path / 'pics'}", "batch_size=2"])
    saved = json.loads((tmp_path / "run" / "eval_vq.json").read_text())
    assert saved["num_images"] == 5 and np.isfinite(saved["psnr"]) and "judge_accuracy" not in saved

    with pytest.raises(SystemExit) as stop:  # on Shapes, which has no 40 px build: one line, status 2
        eval_vq.main([f"run_dir={tmp_path / 'run'}"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "40 px" in err and "pictures=FOLDER" in err and "Traceback" not in err

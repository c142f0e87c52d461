"""Parity with Hugging Face's ChameleonVQVAE: imported weights give the same latents and codes."""

import numpy as np
import pytest

from vqvae import load_tokenizer
from vqvae.convert import convert_hf


def _images(n, size, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


@pytest.mark.hf
def test_hugging_face_chameleon_vqvae_gives_the_same_codes(tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from transformers import ChameleonVQVAE, ChameleonVQVAEConfig

    torch.manual_seed(0)
    hf_cfg = ChameleonVQVAEConfig(
        embed_dim=16, num_embeddings=64, latent_channels=32, resolution=32, base_channels=32,
        channel_multiplier=[1, 2], num_res_blocks=1, attn_resolutions=[16],
    )
    hf = ChameleonVQVAE(hf_cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():  # non-trivial norms and biases too
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.normal_(0, 0.05)
    x = _images(4, 32, seed=5)
    pixels = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        latents = hf.quant_conv(hf.encoder(pixels)).permute(0, 2, 3, 1).reshape(-1, 16)
        pick = torch.from_numpy(np.random.default_rng(6).choice(len(latents), 64, replace=False))
        hf.quantize.embedding.weight.copy_(latents[pick] + 1e-3 * torch.randn(64, 16))
        hf_codes = hf.encode(pixels).image_tokens.reshape(4, 16, 16).numpy()
    hf.save_pretrained(tmp_path / "hf")

    out = convert_hf(tmp_path / "hf", tmp_path / "tok")
    tok = load_tokenizer(out)
    assert tok.grid == (16, 16) and tok.codebook_size == 64 and not tok.can_decode
    assert tok.config.attn_resolutions == (16,) and tok.config.mid_attention
    ours = np.asarray(tok.model.latents(x / 127.5 - 1)).reshape(-1, 16)
    np.testing.assert_allclose(ours, latents.numpy(), rtol=1e-4, atol=1e-4)
    assert len(np.unique(hf_codes)) > 8
    np.testing.assert_array_equal(np.asarray(tok.encode(x)), hf_codes)
    with pytest.raises(ValueError, match="no decoder"):
        tok.decode(tok.encode(x))

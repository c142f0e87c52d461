"""A checkpoint imported from Hugging Face (no image decoder) loads as a Pipeline and generates text."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from chameleon_jax.config import ModelConfig

pytestmark = pytest.mark.hf


@pytest.fixture(scope="module")
def hf_and_ours(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    from eval.bench.decode import save_random_hf_chameleon

    root = tmp_path_factory.mktemp("hf_import")
    cfg = ModelConfig(vocab_size=128, hidden_dim=32, num_layers=2, num_heads=2, num_kv_heads=2, head_dim=16,
                      ffn_dim=64, max_seq_len=64, initializer_range=0.2)
    save_random_hf_chameleon(cfg, root / "hf", codebook_size=32, seed=1)
    done = subprocess.run([sys.executable, "-m", "chameleon_jax.convert", "hf", str(root / "hf"), str(root / "ours")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return root / "hf", root / "ours"


def test_hf_import_loads_and_generates_text_greedily_like_the_hf_model(hf_and_ours):
    import torch
    from transformers import ChameleonForConditionalGeneration

    import chameleon_jax

    hf_dir, our_dir = hf_and_ours
    pipe = chameleon_jax.load_pipeline(our_dir)
    assert pipe.tokenizer is None and pipe.codes_per_image == 0
    results = pipe.generate(["hello world", "abc"], max_new_tokens=12)
    assert [all(isinstance(s, str) for s in r) for r in results] == [True, True]
    assert "".join(results[0])  # some text came out

    # Each greedy token is the HF model's best text token given everything before it.
    prompt = pipe.encode_prompt("hello world")
    out = pipe.generate_ids([prompt], max_new_tokens=12)
    seq = prompt + out.tokens[0]
    hf = ChameleonForConditionalGeneration.from_pretrained(hf_dir).eval()
    with torch.inference_mode():
        logits = hf(torch.tensor([seq[:-1]])).logits[0, len(prompt) - 1 :].numpy()
    allowed = np.zeros(logits.shape[-1], bool)
    allowed[: pipe.vocab.size] = pipe.vocab.text_token_mask
    assert np.where(allowed, logits, -np.inf).argmax(-1).tolist() == out.tokens[0]


def test_hf_import_without_image_tokenizer_refuses_image_generation(hf_and_ours):
    from chameleon_jax.pipeline import load_pipeline

    pipe = load_pipeline(hf_and_ours[1])
    with pytest.raises(ValueError, match="needs an image tokenizer"):
        pipe.generate(["a picture"], modality="image")
    [result] = pipe.generate(["a picture"], modality="any", max_new_tokens=8, temperature=1.0, seed=2)
    assert all(isinstance(s, str) for s in result)

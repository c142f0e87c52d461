"""Image tokenizers: uint8 images <-> discrete codes.

    import vqvae
    tok = vqvae.load_tokenizer("runs/vq/tokenizer")   # or a run directory holding tokenizer/
    codes = tok.encode(images)                          # uint8 [B, S, S, 3] -> int32 [B, h, w]
    images = tok.decode(codes)                          # -> uint8 [B, S, S, 3]

`tok.codes_per_image`, `tok.codebook_size`, `tok.image_size`, `tok.grid` describe it.
Train one with `python -m train.vqvae`, evaluate with `python -m eval.vq`, import
released weights with `python -m vqvae.convert {taming,hf} SRC DST`.
"""

from vqvae.config import VQ_PRESETS, VQConfig
from vqvae.model import VQModel
from vqvae.tokenizer import Tokenizer, load_tokenizer, save_tokenizer

__all__ = ["VQConfig", "VQ_PRESETS", "VQModel", "Tokenizer", "load_tokenizer", "save_tokenizer"]

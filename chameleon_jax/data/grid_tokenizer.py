"""The colour-grid stand-in image tokenizer: pipelines run without a trained VQ model (smoke tests, benchmarks)."""

from __future__ import annotations

import numpy as np


class ColourGridTokenizer:
    """A fixed stand-in image tokenizer for smoke tests when no VQ model is given.

    The image is cut into `cells x cells` blocks; each block's mean colour,
    quantised to `levels` per channel, is one code (levels^3 codes). Decoding
    paints the blocks. It learns nothing and exists so the LM pipeline runs
    without a trained VQ-VAE.
    """

    def __init__(self, cells: int = 8, levels: int = 4):
        self.cells, self.levels = int(cells), int(levels)
        self.codebook_size = self.levels ** 3
        self.codes_per_image = self.cells * self.cells
        self.fingerprint = f"grid{self.cells}x{self.levels}"

    def encode(self, images_bhw3: np.ndarray) -> np.ndarray:
        x = np.asarray(images_bhw3, np.float32)
        b, h, w, _ = x.shape
        c = self.cells
        if h % c or w % c:
            raise ValueError(f"image {h}x{w} does not split into {c}x{c} cells")
        mean = x.reshape(b, c, h // c, c, w // c, 3).mean(axis=(2, 4))
        q = np.clip(np.rint(mean / 255.0 * (self.levels - 1)), 0, self.levels - 1).astype(np.int32)
        return (q[..., 0] * self.levels + q[..., 1]) * self.levels + q[..., 2]

    def decode(self, codes_bhw: np.ndarray, image_size: int = 64) -> np.ndarray:
        codes = np.asarray(codes_bhw, np.int32)
        rgb = np.stack([codes // (self.levels ** 2), (codes // self.levels) % self.levels, codes % self.levels], -1)
        rgb = (rgb * (255.0 / (self.levels - 1))).astype(np.uint8)
        k = image_size // self.cells
        return rgb.repeat(k, axis=1).repeat(k, axis=2)

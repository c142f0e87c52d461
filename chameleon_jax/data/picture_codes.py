"""Pictures -> image codes for tokenisation: fit to the tokenizer's size, encode in batches on every local device.

    encoder = PictureEncoder(tokenizer, batch=256)
    codes = encoder.encode([fit_picture(im, encoder.image_size) for im in pictures])   # int32 [N, h, w]

A VQ tokenizer (vqvae.Tokenizer) runs as one jitted program whose batch is split
over this process's devices (data parallel, parameters replicated); every call
has the same batch shape (the last one padded), so it compiles once. The
colour-grid stand-in (no VQ model) encodes in numpy.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image


def fit_picture(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 [H, W, 3] -> [size, size, 3]: the shorter side resized to `size` (bicubic), the centre cropped."""
    h, w = image.shape[:2]
    if h == size and w == size:
        return image
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    resized = np.asarray(Image.fromarray(image).resize((nw, nh), Image.BICUBIC), np.uint8)
    top, left = (nh - size) // 2, (nw - size) // 2
    return np.ascontiguousarray(resized[top: top + size, left: left + size])


class PictureEncoder:
    """Equally sized uint8 pictures -> int32 codes [N, h, w], `batch` at a time over the local devices."""

    def __init__(self, tokenizer, batch: int = 256, image_size: int = 64):
        """image_size: the picture side for a tokenizer without one of its own (the stand-in)."""
        self.tokenizer = tokenizer
        size = getattr(tokenizer, "image_size", None)
        self.image_size = int(size) if size else int(image_size)
        self._jitted = None
        self.batch = int(batch)
        if hasattr(tokenizer, "model"):  # a VQ model: jit over the local devices
            import jax
            from flax import nnx
            from jax.sharding import Mesh, NamedSharding, PartitionSpec

            from vqvae.model import pixels_from_uint8

            devices = jax.local_devices()
            self.batch = -(-self.batch // len(devices)) * len(devices)
            mesh = Mesh(np.array(devices), ("data",))
            self._in_sharding = NamedSharding(mesh, PartitionSpec("data"))
            graphdef, state = nnx.split(tokenizer.model)
            self._state = jax.device_put(state, NamedSharding(mesh, PartitionSpec()))

            def encode(state, images_bhwc):
                return nnx.merge(graphdef, state, copy=True).encode(pixels_from_uint8(images_bhwc))

            self._jitted = jax.jit(encode, out_shardings=self._in_sharding)

    def encode(self, images: Sequence[np.ndarray]) -> np.ndarray:
        if not len(images):
            return np.zeros((0, 1, 1), np.int32)
        out = []
        for start in range(0, len(images), self.batch):
            chunk = np.stack(images[start: start + self.batch]).astype(np.uint8, copy=False)
            out.append(self._encode_chunk(chunk))
        return np.concatenate(out)

    def _encode_chunk(self, chunk: np.ndarray) -> np.ndarray:
        if self._jitted is None:
            return np.asarray(self.tokenizer.encode(chunk), np.int32)
        import jax

        m = chunk.shape[0]
        if m < self.batch:  # one batch shape for every call: one compilation
            chunk = np.concatenate([chunk, np.zeros((self.batch - m,) + chunk.shape[1:], np.uint8)])
        self.tokenizer.check_images(chunk)
        codes = self._jitted(self._state, jax.device_put(chunk, self._in_sharding))
        return np.asarray(jax.device_get(codes), np.int32)[:m]

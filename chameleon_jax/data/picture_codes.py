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


class CodeMemo:
    """Codes of pictures a source names by key, kept up to a byte budget (least recently used dropped first).

    A source whose documents share pictures (the Shapes tasks ask several questions of one
    picture) names them in `Document.meta["picture_keys"]`, one key per picture, so each
    is encoded once while it stays in the memo. Pictures without keys are always encoded.
    """

    def __init__(self, budget_bytes: int):
        from collections import OrderedDict

        self.budget = int(budget_bytes)
        self._codes: "OrderedDict[str, np.ndarray]" = OrderedDict()
        self._bytes = 0
        self.hits = self.misses = 0

    def get(self, key: str) -> np.ndarray | None:
        codes = self._codes.get(key)
        if codes is not None:
            self._codes.move_to_end(key)
        return codes

    def put(self, key: str, codes: np.ndarray) -> None:
        if self.budget <= 0 or key in self._codes:
            return
        self._codes[key] = codes
        self._bytes += codes.nbytes
        while self._bytes > self.budget:
            _, old = self._codes.popitem(last=False)
            self._bytes -= old.nbytes

    def encode(self, encoder: "PictureEncoder", docs_pictures: Sequence[tuple[Sequence[str] | None, list]]) -> list:
        """[(keys or None, pictures)] per document -> [codes of each picture] per document; each picture not in
        the memo is encoded once, in one encoder call for the whole list."""
        todo: list[np.ndarray] = []
        where: dict[str, int] = {}  # key -> its row in `todo`
        plan: list[list] = []
        for keys, pictures in docs_pictures:
            if keys is None or len(keys) != len(pictures) or self.budget <= 0:
                keys = [None] * len(pictures)
            slots = []
            for key, picture in zip(keys, pictures):
                known = self.get(key) if key is not None else None
                if known is not None:
                    slots.append(known)
                    self.hits += 1
                elif key is not None and key in where:
                    slots.append(where[key])
                    self.hits += 1
                else:
                    if key is not None:
                        where[key] = len(todo)
                    slots.append(len(todo))
                    todo.append(picture)
                    self.misses += 1
            plan.append(slots)
        codes = encoder.encode(todo) if todo else None
        for key, row in where.items():
            self.put(key, codes[row])
        return [[codes[s] if isinstance(s, int) else s for s in slots] for slots in plan]

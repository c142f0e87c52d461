"""The tokenizer interface every image tokenizer offers, and its directory format.

    tok = vqvae.load_tokenizer("runs/vq/tokenizer")
    codes = tok.encode(images_u8)        # uint8 [B, S, S, 3] -> int32 [B, h, w]
    images = tok.decode(codes)           # int [B, h, w] (or [B, h*w]) -> uint8 [B, S, S, 3]

A tokenizer directory holds

    config.json      the VQConfig (vqvae.configlib JSON; unknown keys are errors)
    params/          every model variable (parameters and EMA codebook state) as an orbax
                     StandardCheckpoint of the model's pure-dict state
    tokenizer.json   {"format": "chameleon-jax/vq-tokenizer", "version": 1, "source": ..., "step": ...,
                      "image_size", "grid", "codebook_size", "can_decode"}; written last, so a
                     directory with it is complete

Both methods are jitted (one compilation per input shape) and run the whole batch at
once unless `batch_size` is given, in which case they run fixed-size chunks (the last
one padded) and compile once.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vqvae import configlib
from vqvae.config import VQConfig
from vqvae.model import VQModel, pixels_from_uint8, uint8_from_pixels

FORMAT = "chameleon-jax/vq-tokenizer"
VERSION = 1


class Tokenizer:
    """Images <-> discrete codes with a VQModel. Holds a snapshot of the model's state."""

    def __init__(self, model: VQModel, meta: dict[str, Any] | None = None):
        self.model = model
        self.config: VQConfig = model.cfg
        self.meta = dict(meta or {})
        self._graphdef, self._state = nnx.split(model)

    @property
    def image_size(self) -> int:
        return self.config.image_size

    @property
    def grid(self) -> tuple[int, int]:
        return self.config.grid

    @property
    def codes_per_image(self) -> int:
        return self.config.codes_per_image

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    @property
    def can_decode(self) -> bool:
        return self.config.decoder

    def encode(self, images, batch_size: int | None = None) -> jax.Array:
        """uint8 [B, S, S, 3] -> int32 codes [B, h, w] (row-major grid)."""
        images = self.check_images(images)
        return _chunked(lambda x: _encode(self._graphdef, self._state, x), images, batch_size)

    def decode(self, codes, batch_size: int | None = None) -> jax.Array:
        """int codes [B, h, w] or [B, h*w] -> uint8 images [B, S, S, 3]."""
        if not self.can_decode:
            raise ValueError(
                "this tokenizer has no decoder (it was imported encoder-only, e.g. from Hugging Face's "
                "ChameleonVQVAE, which ships no decoder weights); it can encode but not decode"
            )
        codes = self.check_codes(codes)
        return _chunked(lambda c: _decode(self._graphdef, self._state, c), codes, batch_size)

    def check_images(self, images):
        s = self.image_size
        want = f"uint8 images [B, {s}, {s}, 3]"
        if not hasattr(images, "dtype") or not hasattr(images, "shape"):
            images = np.asarray(images)
        if images.dtype != np.uint8:
            raise ValueError(f"expected {want}, got dtype {images.dtype}")
        if images.ndim != 4:
            raise ValueError(f"expected {want}, got shape {tuple(images.shape)} ({images.ndim} dimensions)")
        if images.shape[-1] != 3:
            raise ValueError(f"expected {want}: 3 channels (RGB), got {images.shape[-1]} channels")
        if tuple(images.shape[1:3]) != (s, s):
            raise ValueError(f"expected {want}: {s}x{s} pixels, got {images.shape[1]}x{images.shape[2]}")
        return images

    def check_codes(self, codes):
        h, w = self.grid
        want = f"integer codes [B, {h}, {w}] or [B, {h * w}] in [0, {self.codebook_size})"
        if not hasattr(codes, "dtype") or not hasattr(codes, "shape"):
            codes = np.asarray(codes)
        if not jnp.issubdtype(codes.dtype, jnp.integer):
            raise ValueError(f"expected {want}, got dtype {codes.dtype}")
        if codes.ndim == 2 and codes.shape[1] == h * w:
            codes = codes.reshape(codes.shape[0], h, w)
        if codes.ndim != 3 or tuple(codes.shape[1:]) != (h, w):
            raise ValueError(f"expected {want}, got shape {tuple(codes.shape)}")
        if not isinstance(codes, jax.core.Tracer) and codes.size:
            lo, hi = int(codes.min()), int(codes.max())
            if lo < 0 or hi >= self.codebook_size:
                raise ValueError(f"expected {want}, got values in [{lo}, {hi}]")
        return codes.astype(jnp.int32) if isinstance(codes, jax.Array) else np.asarray(codes, np.int32)

    def save(self, directory: str | os.PathLike, **meta: Any) -> Path:
        """Writes the tokenizer directory (replacing one that is there); returns its path."""
        return save_tokenizer(self.model, directory, **{**self.meta, **meta})


# Module-level so that every tokenizer of one architecture shares the compiled programs.
@functools.partial(jax.jit, static_argnums=0)
def _encode(graphdef, state, images_bhwc):
    return nnx.merge(graphdef, state, copy=True).encode(pixels_from_uint8(images_bhwc))


@functools.partial(jax.jit, static_argnums=0)
def _decode(graphdef, state, codes_bhw):
    return uint8_from_pixels(nnx.merge(graphdef, state, copy=True).decode(codes_bhw))


def _chunked(fn, x, batch_size: int | None):
    n = x.shape[0]
    if batch_size is None or n <= batch_size:
        return fn(x)
    outs = []
    for start in range(0, n, batch_size):
        part = x[start : start + batch_size]
        m = part.shape[0]
        if m < batch_size:  # pad so every chunk has one shape (one compilation)
            pad = np.zeros((batch_size - m,) + tuple(part.shape[1:]), part.dtype)
            part = jnp.concatenate([jnp.asarray(part), jnp.asarray(pad)])
        outs.append(fn(part)[:m])
    return jnp.concatenate(outs)


def save_tokenizer(model: VQModel, directory: str | os.PathLike, **meta: Any) -> Path:
    """Writes `model` as a tokenizer directory. Written beside the target, then renamed into place."""
    import orbax.checkpoint as ocp

    directory = Path(directory).absolute()
    tmp = directory.with_name(directory.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    configlib.save(model.cfg, tmp / "config.json")
    state = jax.device_get(nnx.to_pure_dict(nnx.state(model)))
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(tmp / "params", state)
    ckptr.wait_until_finished()
    ckptr.close()
    cfg = model.cfg
    info = {
        "format": FORMAT,
        "version": VERSION,
        "image_size": cfg.image_size,
        "grid": list(cfg.grid),
        "codebook_size": cfg.codebook_size,
        "can_decode": cfg.decoder,
        **meta,
    }
    (tmp / "tokenizer.json").write_text(json.dumps(info, indent=2) + "\n")
    if directory.exists():
        shutil.rmtree(directory)
    os.replace(tmp, directory)
    return directory


def is_tokenizer_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / "tokenizer.json").exists()


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    return json.loads((Path(path) / "tokenizer.json").read_text())


def code_levels(path: str | os.PathLike) -> tuple[int, ...]:
    """The digit sizes of a tokenizer directory's codes: its FSQ levels (least significant
    first), or () when its quantizer is a codebook, whose codes have no digits."""
    cfg = configlib.load(VQConfig, Path(path) / "config.json")
    return tuple(cfg.fsq_levels) if cfg.quantizer == "fsq" else ()


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Loads a tokenizer directory (or a run directory holding `tokenizer/`)."""
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    if not is_tokenizer_dir(path) and is_tokenizer_dir(path / "tokenizer"):
        path = path / "tokenizer"
    if not is_tokenizer_dir(path):
        raise FileNotFoundError(f"no tokenizer at {path} (expected {path}/tokenizer.json, config.json, params/)")
    meta = read_meta(path)
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ValueError(
            f"{path} holds format {meta.get('format')!r} version {meta.get('version')!r}; "
            f"this code reads {FORMAT!r} version {VERSION}"
        )
    cfg = configlib.load(VQConfig, path / "config.json")
    abstract = nnx.eval_shape(lambda: VQModel(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    target = nnx.to_pure_dict(state)
    ckptr = ocp.StandardCheckpointer()
    restored = ckptr.restore(path / "params", target)
    ckptr.close()
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, restored))  # device arrays, not host copies
    return Tokenizer(nnx.merge(graphdef, state), meta)

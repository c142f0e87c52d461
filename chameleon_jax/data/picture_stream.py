"""Pictures streamed for tokenizer training: a folder, a TFDS data set or array_record files, read lazily.

    pics = picture_dataset("folder", "my_pictures/", size=64)          # grain.MapDataset of uint8 [64, 64, 3]
    pics = picture_dataset("tfds", "my_set", size=64, image_key="image")
    pics = picture_dataset("array_record", "data/pics-*.array_record", size=64)   # records = PNG/JPEG bytes
    batches = augment(pics.shuffle(seed=0).repeat(), size, crop=True, flip=True).batch(32)

Only the list of files (or the data source) is held; a picture is decoded when
grain asks for it (in its reader threads or worker processes). Decoding fits the
picture to `size` (shorter side resized, centre cropped) unless random crops are
wanted, in which case `augment` crops a random square instead.
"""

from __future__ import annotations

import glob
import io
import os
from pathlib import Path

import grain
import numpy as np
from PIL import Image

from chameleon_jax.data.jsonl import decode_image, read_image
from chameleon_jax.data.picture_codes import fit_picture
from chameleon_jax.data.sources import IMAGE_SUFFIXES

KINDS = ("folder", "tfds", "array_record")


def _decode_bytes(data: bytes, where: str) -> np.ndarray:
    return decode_image(io.BytesIO(data), where)


def _shorter_side(image: np.ndarray, size: int) -> np.ndarray:
    """The picture with its shorter side resized to `size` (aspect kept): random crops are taken from it."""
    h, w = image.shape[:2]
    if min(h, w) == size:
        return image
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    return np.asarray(Image.fromarray(image).resize((nw, nh), Image.BICUBIC), np.uint8)


def picture_dataset(kind: str, location: str, size: int, *, image_key: str = "image", split: str = "train",
                    data_dir: str = "", random_crop: bool = False, limit: int = 0) -> grain.MapDataset:
    """A lazily decoded grain.MapDataset of RGB uint8 pictures.

    Pictures are [size, size, 3] (fitted), or with `random_crop` resized so the shorter side is `size`
    (for `augment` to crop). `limit` keeps the first pictures only."""
    prepare = (lambda im: _shorter_side(im, size)) if random_crop else (lambda im: fit_picture(im, size))
    if kind == "folder":
        if not location:
            raise ValueError("a picture folder is needed (data.data_dir)")
        files = sorted(str(p) for p in Path(location).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise FileNotFoundError(f"no pictures ({', '.join(IMAGE_SUFFIXES)}) under {location}")
        ds = grain.MapDataset.source(files).map(lambda f: prepare(read_image(f)))
    elif kind == "array_record":
        files = sorted(glob.glob(os.path.expanduser(location)))
        if not files:
            raise FileNotFoundError(f"no array_record files match {location}")
        src = grain.MapDataset.source(grain.sources.ArrayRecordDataSource(files))
        ds = src.map_with_index(lambda i, data: prepare(_decode_bytes(data, f"{location}[{i}]")))
    elif kind == "tfds":
        import tensorflow_datasets as tfds

        from chameleon_jax.data.sources import _feature, _picture

        builder = tfds.builder(location, data_dir=data_dir or None)
        source = builder.as_data_source(split=split)
        where = f"tfds:{location}[{split}]"
        if len(source):
            _feature(source[0], image_key, f"{where}: the picture feature")

        def read(example):
            return prepare(_picture(_feature(example, image_key, where), where, image_key))

        ds = grain.MapDataset.source(source).map(read)
    else:
        raise ValueError(f"unknown picture source {kind!r}; expected one of {KINDS}")
    return ds[:limit] if limit else ds


def augment(ds: grain.MapDataset, size: int, crop: bool = False, flip: bool = False, seed: int = 0) -> grain.MapDataset:
    """Random size x size crops (of pictures whose shorter side is `size`) and horizontal flips, seeded per element."""
    if not (crop or flip):
        return ds

    def fn(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if crop:
            h, w = image.shape[:2]
            top, left = int(rng.integers(h - size + 1)), int(rng.integers(w - size + 1))
            image = image[top: top + size, left: left + size]
        if flip and rng.random() < 0.5:
            image = image[:, ::-1]
        return np.ascontiguousarray(image)

    return ds.random_map(fn, seed=seed)

"""Pictures streamed for tokenizer training: folder, array_record and TFDS sources, random crops and flips."""

import io

import numpy as np
import pytest
from PIL import Image

from chameleon_jax import configlib
from chameleon_jax.data.picture_stream import augment, picture_dataset
from tests.test_tokenize import _tiny_tfds_builder
from train import vqvae as train_vq


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def _pictures(n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (24 + 4 * i, 32, 3), dtype=np.uint8) for i in range(n)]


def test_folder_pictures_are_decoded_on_access_and_augmented_per_epoch(tmp_path):
    for i, pic in enumerate(_pictures(5)):
        Image.fromarray(pic).save(tmp_path / f"{i}.png")
    fitted = picture_dataset("folder", str(tmp_path), 16)
    assert len(fitted) == 5 and fitted[2].shape == (16, 16, 3) and fitted[2].dtype == np.uint8
    raw = picture_dataset("folder", str(tmp_path), 16, random_crop=True)
    assert min(raw[4].shape[:2]) == 16 and raw[4].shape[0] > 16  # shorter side fitted, the rest left to crop
    aug = augment(raw.repeat(), 16, crop=True, flip=True, seed=1)
    first, second = [aug[i] for i in range(5)], [aug[i] for i in range(5, 10)]
    assert all(x.shape == (16, 16, 3) for x in first + second)
    assert any(not np.array_equal(a, b) for a, b in zip(first, second))  # new crops and flips each epoch
    again = augment(raw.repeat(), 16, crop=True, flip=True, seed=1)
    assert all(np.array_equal(again[i], first[i]) for i in range(5))  # seeded


def test_array_record_pictures_and_a_corrupt_record_named(tmp_path):
    from array_record.python.array_record_module import ArrayRecordWriter

    w = ArrayRecordWriter(str(tmp_path / "pics-0.array_record"), "group_size:1")
    for pic in _pictures(3):
        w.write(_png(pic))
    w.write(b"garbage")
    w.close()
    ds = picture_dataset("array_record", str(tmp_path / "pics-*.array_record"), 16)
    assert len(ds) == 4 and ds[0].shape == (16, 16, 3)
    with pytest.raises(ValueError, match=r"cannot decode image .*pics-\*\.array_record\[3\]"):
        ds[3]


def test_tfds_pictures_stream(tmp_path):
    builder = _tiny_tfds_builder()(data_dir=str(tmp_path), file_format="array_record")
    builder.download_and_prepare()
    ds = picture_dataset("tfds", "tiny_pairs", 16, image_key="picture", data_dir=str(tmp_path))
    assert len(ds) == 6 and ds[3].shape == (16, 16, 3) and int(ds[3][0, 0, 0]) == 120


@pytest.mark.slow
def test_vq_training_streams_a_folder_with_random_crops(tmp_path):
    for i, pic in enumerate(_pictures(8)):
        Image.fromarray(pic).save(tmp_path / f"{i}.jpg")
    cfg = configlib.apply_overrides(train_vq.PRESETS["tiny"](), [
        "optim.decay_steps=100", "tensorboard=false", f"run_dir={tmp_path / 'run'}", "steps=2", "batch_size=8",
        "data.source=folder", f"data.data_dir={tmp_path}", "data.random_crop=true", "data.flip=true",
        "progress=false",
    ])
    run = train_vq.run(cfg)
    assert (run / "tokenizer" / "tokenizer.json").exists()

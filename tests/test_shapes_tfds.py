"""Building Shapes with TFDS (array_record, no TensorFlow) and reading it back with random access."""

import pickle

import numpy as np
import pytest

from chameleon_jax.data import paths, shapes
from chameleon_jax.data.shapes import records, spec

pytest.importorskip("tensorflow_datasets")

TINY = {"train": 24, "validation": 6, "test": 6, "heldout": 6}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes_data")
    shapes.load("train", data_dir=root, sizes=TINY)  # builds every split
    return root


def _same_record(a, b):
    assert records.same_record(a, b), (a, b)


@pytest.mark.parametrize("split", spec.SPLITS)
def test_built_split_reads_back_exactly_the_generated_examples(built, split):
    src = shapes.load(split, data_dir=built, sizes=TINY)
    assert len(src) == TINY[split]
    for i in (0, 3, len(src) - 1):
        rec = src[i]
        assert isinstance(rec["captions"][0], str) and isinstance(rec["question_types"][0], str)
        _same_record(rec, shapes.make_example(0, split, i, 64))
    _same_record(src[-1], src[len(src) - 1])
    _same_record(pickle.loads(pickle.dumps(src))[1], src[1])  # grain workers receive it pickled
    with pytest.raises(IndexError):
        src[len(src)]


@pytest.mark.parametrize("split", spec.SPLITS)
def test_fast_parser_reads_every_stored_record_as_tfds_decodes_it(built, split):
    src = shapes.load(split, data_dir=built, sizes=TINY)
    assert src._fast
    stored = src._source
    for i in range(len(src)):
        _same_record(records.parse_serialized(stored.data_source[i], 64), records.decode_record(stored[i]))


def test_records_differing_in_a_value_a_dtype_or_a_field_are_not_the_same():
    a = shapes.make_example(0, "train", 0, 32)
    assert records.same_record(a, shapes.make_example(0, "train", 0, 32))
    assert not records.same_record(a, shapes.make_example(0, "train", 1, 32))
    other_dtype = {**a, "objects": {**a["objects"], "shape": a["objects"]["shape"].astype(np.int64)}}
    assert not records.same_record(a, other_dtype)
    assert not records.same_record(a, {**a, "index": float(a["index"])})
    assert not records.same_record(a, {k: v for k, v in a.items() if k != "answers"})


def test_a_layout_the_fast_parser_does_not_know_is_read_by_tfds_decoder_with_a_warning(built, monkeypatch, caplog):
    real = records.parse_serialized
    monkeypatch.setattr(records, "parse_serialized", lambda raw, size: {**real(raw, size), "extra": 1})
    with caplog.at_level("WARNING"):
        src = shapes.load("test", data_dir=built, sizes=TINY)
    assert not src._fast
    assert "generic decoder" in caplog.text
    for i in (0, len(src) - 1):
        _same_record(src[i], shapes.make_example(0, "test", i, 64))
    _same_record(src.__getitems__([2])[0], shapes.make_example(0, "test", 2, 64))


def test_generate_backend_matches_the_stored_data(built):
    stored = shapes.load("heldout", data_dir=built, sizes=TINY)
    generated = shapes.load("heldout", sizes=TINY, backend="generate")
    assert len(stored) == len(generated)
    for a, b in zip(stored, generated):
        _same_record(a, b)


def test_second_load_does_not_rebuild(built, capfd):
    shapes.load("validation", data_dir=built, sizes=TINY)
    assert "building" not in capfd.readouterr().err


def test_smaller_request_reads_a_prefix_of_an_existing_build(built, capfd):
    before = sorted(p.name for p in (built / "chameleon_shapes").iterdir())
    src = shapes.load("train", data_dir=built, sizes={"train": 10})
    assert len(src) == 10 and "building" not in capfd.readouterr().err
    assert sorted(p.name for p in (built / "chameleon_shapes").iterdir()) == before
    _same_record(src[9], shapes.make_example(0, "train", 9, 64))
    with pytest.raises(IndexError):
        src[10]
    assert shapes.load_images("train", data_dir=built, sizes={"train": 10}).shape[0] == 10


def test_config_names_round_trip():
    from chameleon_jax.data.shapes import tfds_builder

    for size, sizes, seed in [(64, spec.DEFAULT_SPLIT_SIZES, 0), (32, TINY, 3)]:
        name = tfds_builder.config_name(size, sizes, seed)
        assert tfds_builder.parse_config_name(name) == (size, dict(sizes), seed)
    assert tfds_builder.parse_config_name("downloads") is None


def test_same_seed_builds_identical_bytes(built, tmp_path):
    shapes.load("train", data_dir=tmp_path, sizes=TINY)
    files = sorted(p.relative_to(built) for p in built.rglob("*.array_record*"))
    assert len(files) == 4
    for f in files:
        assert (built / f).read_bytes() == (tmp_path / f).read_bytes(), f


def test_load_images(built):
    imgs = shapes.load_images("test", data_dir=built, sizes=TINY)
    assert imgs.shape == (TINY["test"], 64, 64, 3) and imgs.dtype == np.uint8
    src = shapes.load("test", data_dir=built, sizes=TINY)
    for i in range(len(src)):
        np.testing.assert_array_equal(imgs[i], src[i]["image"])


def test_load_images_reads_only_the_first_limit(built):
    src = shapes.load("test", data_dir=built, sizes=TINY)
    first = shapes.load_images("test", data_dir=built, sizes=TINY, limit=3)
    assert first.shape == (3, 64, 64, 3)
    for i in range(3):
        np.testing.assert_array_equal(first[i], src[i]["image"])
    assert len(shapes.load_images("test", data_dir=built, sizes=TINY, limit=10**6)) == TINY["test"]
    drawn = shapes.load_images("test", sizes=TINY, backend="generate", limit=3)  # same pictures, nothing read
    np.testing.assert_array_equal(drawn, first)


def test_examples_read_in_blocks_match_single_reads(built, monkeypatch):
    src = shapes.load("train", data_dir=built, sizes=TINY)
    monkeypatch.setattr(type(src), "read_block", 5)  # blocks of 5 over 24 examples: a ragged last block
    calls = []
    real = type(src).__getitems__
    monkeypatch.setattr(type(src), "__getitems__", lambda self, idx: calls.append(list(idx)) or real(self, idx))
    got = list(src.examples(3, 20))
    assert [len(c) for c in calls] == [5, 5, 5, 2] and calls[0] == [3, 4, 5, 6, 7]
    assert [r["index"] for r in got] == list(range(3, 20))
    for i, rec in zip(range(3, 20), got):
        _same_record(rec, src[i])
    assert len(list(src.examples(20, 10**6))) == 4 and list(src.examples(30)) == []
    assert [r["index"] for r in src] == list(range(len(src)))


def test_mixture_on_stored_blocks_draws_the_documents_it_draws_from_generated_examples(built, monkeypatch):
    from chameleon_jax.data.shapes import source as source_lib
    from chameleon_jax.data.shapes.mixture import ShapesMixture

    monkeypatch.setattr(source_lib.TfdsSource, "read_block", 5)
    monkeypatch.setenv(paths.ENV_VAR, str(built))
    weights = {"caption": 1, "t2i": 1, "vqa": 1, "interleaved": 1}
    kw = dict(examples=TINY["train"], interleaved_docs=7, two_object_share=0.8)
    stored = ShapesMixture("train", 64, weights, backend="tfds", **kw)
    drawn = ShapesMixture("train", 64, weights, backend="generate", **kw)
    assert isinstance(stored.examples, source_lib.TfdsSource)
    for i in range(60):
        a, b = stored.document(i), drawn.document(i)
        assert a.task == b.task and a.meta["picture_keys"] == b.meta["picture_keys"]
        assert [s.text for s in a.segments] == [s.text for s in b.segments]
        assert [s.image.tobytes() for s in a.segments if s.image is not None] == \
            [s.image.tobytes() for s in b.segments if s.image is not None]
    blocks = [set(range(lo, min(lo + 5, TINY["train"]))) for lo in range(0, TINY["train"], 5)]
    assert all(b <= set(stored._read) or not b & set(stored._read) for b in blocks)  # whole blocks are read


def test_other_image_size_is_its_own_config(tmp_path):
    sizes = {"train": 4, "validation": 2, "test": 2, "heldout": 2}
    src = shapes.load("validation", image_size=32, data_dir=tmp_path, sizes=sizes)
    assert src[0]["image"].shape == (32, 32, 3)
    assert shapes.judge_matches(src[1]["image"], shapes.example_objects(src[1]))
    assert (tmp_path / "chameleon_shapes" / "32px_train4_validation2_test2_heldout2_seed0").is_dir()


def test_grain_reads_the_source(built):
    grain = pytest.importorskip("grain")
    src = shapes.load("train", data_dir=built, sizes=TINY)
    ds = grain.MapDataset.source(src).map(lambda r: r["image"].astype(np.float32) / 255.0).batch(8)
    first = ds[0]
    assert first.shape == (8, 64, 64, 3)
    np.testing.assert_allclose(first[2], src[2]["image"] / 255.0, rtol=1e-6)


def test_bad_arguments_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown Shapes split 'dev'"):
        shapes.load("dev", data_dir=tmp_path)
    with pytest.raises(ValueError, match="built at"):
        shapes.load("train", image_size=48, data_dir=tmp_path, sizes=TINY)
    with pytest.raises(ValueError, match="positive integer"):
        shapes.load("train", data_dir=tmp_path, sizes={"train": 0})
    with pytest.raises(ValueError, match="unknown Shapes split 'val'"):
        shapes.load("train", data_dir=tmp_path, sizes={"val": 3})


def test_data_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv(paths.ENV_VAR, str(tmp_path / "env"))
    assert paths.data_dir() == tmp_path / "env"
    assert paths.data_dir(tmp_path / "x") == tmp_path / "x"
    monkeypatch.delenv(paths.ENV_VAR)
    assert paths.data_dir().name == "data"


def test_cli_builds_and_writes_a_grid(built, tmp_path, capsys):
    from chameleon_jax.data.shapes.__main__ import main

    grid = tmp_path / "grid.png"
    main([f"data_dir={built}", "grid=" + str(grid), "grid_n=6", "judge=true"]
         + [f"{s}={n}" for s, n in TINY.items()])
    out = capsys.readouterr().out
    assert "train 24" in out and "judge exact match on heldout: 6/6" in out
    from PIL import Image

    assert Image.open(grid).size[0] > 0


def test_own_split_sizes_load_without_the_custom_config_warning(built, caplog):
    with caplog.at_level("WARNING", logger="absl"):
        shapes.load("test", data_dir=built, sizes=TINY)
    assert not [r for r in caplog.records if "custom data configuration" in r.getMessage()]

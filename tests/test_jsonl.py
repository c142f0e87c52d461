"""The JSON Lines user format: good files load exactly; every bad line is an error naming file and line."""

import json
import re

import numpy as np
import pytest
from PIL import Image

from chameleon_jax.data import DataError, Document, Segment, load_jsonl, write_jsonl


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "img").mkdir()
    rgb = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)
    Image.fromarray(rgb).save(tmp_path / "img" / "rgb.png")
    Image.fromarray(np.full((3, 3), 100, np.uint8), mode="L").save(tmp_path / "img" / "gray.png")
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (10, 20, 30, 255)  # opaque pixel keeps its colour; transparent ones become white
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "img" / "rgba.png")
    (tmp_path / "img" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    return tmp_path


def _write(path, lines):
    path.write_text("".join((l if isinstance(l, str) else json.dumps(l)) + "\n" for l in lines))
    return path


def test_loads_text_and_images_relative_to_the_file(folder):
    f = _write(
        folder / "data.jsonl",
        [
            {"segments": [{"text": "a picture"}, {"image": "img/rgb.png"}]},
            "",
            {"segments": [{"image": "img/gray.png", "target": False}, {"text": "gray"}], "task": "caption",
             "meta": {"id": 7}},
            {"segments": [{"image": "img/rgba.png"}]},
        ],
    )
    docs = load_jsonl(f)
    assert len(docs) == 3  # the blank line is not a document
    a, b, c = docs
    assert a.task == "document" and a.segments[0] == Segment(text="a picture")
    np.testing.assert_array_equal(a.segments[1].image, np.arange(72, dtype=np.uint8).reshape(4, 6, 3))
    assert b.task == "caption" and b.meta == {"id": 7} and b.segments[0].is_target is False
    assert b.segments[0].image.shape == (3, 3, 3) and b.segments[0].image.dtype == np.uint8
    assert (b.segments[0].image == 100).all()
    assert c.segments[0].image.shape == (2, 2, 3)
    assert tuple(c.segments[0].image[0, 0]) == (10, 20, 30)
    assert tuple(c.segments[0].image[1, 1]) == (255, 255, 255)


def _error(folder, bad_line, good_lines=1):
    lines = [{"segments": [{"text": "fine"}]}] * good_lines + [bad_line]
    f = _write(folder / "bad.jsonl", lines)
    with pytest.raises(DataError) as info:
        load_jsonl(f)
    message = str(info.value)
    assert f"{f}:{good_lines + 1}:" in message, message  # names the file and the 1-based line
    return message


@pytest.mark.parametrize(
    "bad, expected",
    [
        ({"segments": [{"image": "img/missing.png"}]}, "not found"),
        ({"segments": [{"text": "x"}, {"image": "img/corrupt.png"}]}, "cannot decode image"),
        ({"segments": [{"txt": "x"}]}, "unknown segment key"),
        ({"segments": [{"text": "x", "image": "img/rgb.png"}]}, "exactly one of"),
        ({"segments": [{}]}, "exactly one of"),
        ({"segments": []}, "empty document"),
        ({"text": "x"}, "unknown document key"),
        ({"task": "caption"}, "no 'segments'"),
        ({"segments": [{"text": "x"}], "task": "chat"}, "unknown task"),
        ({"segments": [{"text": "x", "target": "no"}]}, "'target' must be true or false"),
        ({"segments": [{"text": ""}]}, "non-empty string"),
        ({"segments": "text"}, "must be a list"),
        ('{"segments": [{"text": "x"}', "invalid JSON"),
        ("[1, 2]", "must be a JSON object"),
    ],
)
def test_bad_line_raises_with_file_and_line(folder, bad, expected):
    message = _error(folder, bad, good_lines=2)
    assert expected in message, message


def test_error_names_the_segment(folder):
    message = _error(folder, {"segments": [{"text": "x"}, {"text": "y"}, {"image": "img/missing.png"}]})
    assert "segment 2" in message and "missing.png" in message


def test_missing_file_is_a_file_not_found_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_jsonl(tmp_path / "nope.jsonl")


def test_write_then_load_round_trips(tmp_path):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (8, 9, 3), dtype=np.uint8)
    docs = [
        Document((Segment(image=img, is_target=False), Segment(text="a caption")), task="caption", meta={"k": [1, 2]}),
        Document((Segment(text="before"), Segment(image=img[::-1].copy()), Segment(text="after"))),
    ]
    path = tmp_path / "out" / "docs.jsonl"
    path.parent.mkdir()
    write_jsonl(docs, path)
    assert load_jsonl(path) == docs
    first = json.loads(path.read_text().splitlines()[0])
    assert first["segments"][0]["target"] is False and re.match(r"images/.*\.png", first["segments"][0]["image"])


def test_shapes_documents_export_to_jsonl(tmp_path):
    from chameleon_jax.data import shapes

    ex = shapes.make_example(0, "train", 0, 64)
    docs = [shapes.caption_document(ex, np.random.default_rng(0))] + shapes.vqa_documents(ex)[:2]
    write_jsonl(docs, tmp_path / "shapes.jsonl")
    back = load_jsonl(tmp_path / "shapes.jsonl")
    assert [d.segments for d in back] == [d.segments for d in docs]
    assert back[0].meta["objects"][0]["color"] == docs[0].meta["objects"][0].color

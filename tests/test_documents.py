"""The Document / Segment types: what they accept, and the error each malformed input gets."""

import numpy as np
import pytest

from chameleon_jax.data import TASKS, DataError, Document, Segment


def _img(h=4, w=5):
    return np.zeros((h, w, 3), np.uint8)


def test_text_and_image_segments_are_accepted():
    t = Segment(text="hello")
    i = Segment(image=_img(), is_target=False)
    assert (t.kind, t.is_target) == ("text", True)
    assert (i.kind, i.is_target) == ("image", False)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({}, "neither"),
        ({"text": "a", "image": _img()}, "both"),
        ({"text": ""}, "empty"),
        ({"text": 3}, "str"),
        ({"image": np.zeros((4, 5, 3), np.float32)}, "uint8"),
        ({"image": np.zeros((4, 5), np.uint8)}, "[H, W, 3]"),
        ({"image": np.zeros((4, 5, 4), np.uint8)}, "[H, W, 3]"),
        ({"image": np.zeros((0, 5, 3), np.uint8)}, "[H, W, 3]"),
        ({"image": [[[0, 0, 0]]]}, "numpy array"),
        ({"text": "a", "is_target": 1}, "bool"),
    ],
)
def test_malformed_segment_raises_naming_the_problem(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        Segment(**kwargs)


def test_document_requires_segments_and_a_known_task():
    with pytest.raises(ValueError, match="at least one segment"):
        Document(())
    with pytest.raises(ValueError, match="not a Segment"):
        Document(("text",))
    with pytest.raises(ValueError, match="unknown Document.task 'chat'"):
        Document((Segment(text="a"),), task="chat")
    with pytest.raises(ValueError, match="meta"):
        Document((Segment(text="a"),), meta=[1])


def test_document_normalises_a_list_to_a_tuple_and_has_its_own_meta():
    a = Document([Segment(text="a")])
    b = Document([Segment(text="b")])
    assert isinstance(a.segments, tuple)
    assert a.meta == {} and a.meta is not b.meta
    assert set(TASKS) >= {"caption", "t2i", "vqa", "interleaved", "document"}


def test_equality_compares_image_contents():
    x = _img()
    y = x.copy()
    assert Segment(image=x) == Segment(image=y)
    y[0, 0, 0] = 1
    assert Segment(image=x) != Segment(image=y)
    assert Segment(image=x) != Segment(image=x, is_target=False)
    assert Segment(text="a") != Segment(image=x)
    assert Document((Segment(text="a"), Segment(image=x))) == Document((Segment(text="a"), Segment(image=x.copy())))


def test_convenience_accessors():
    d = Document((Segment(image=_img(), is_target=False), Segment(text="q", is_target=False), Segment(text="ans")))
    assert d.num_images == 1 and d.images[0].shape == (4, 5, 3)
    assert d.text() == "q ans"
    assert d.text(targets_only=True) == "ans"


def test_data_error_is_a_value_error():
    assert issubclass(DataError, ValueError)

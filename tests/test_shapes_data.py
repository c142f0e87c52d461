"""The Shapes examples themselves: determinism, held-out pairs, layout, captions, questions, documents.

Nothing here needs TensorFlow Datasets; the TFDS build is tested in test_shapes_tfds.py.
"""

import collections
import itertools
import re

import numpy as np
import pytest

from chameleon_jax.data import Document
from chameleon_jax.data import shapes
from chameleon_jax.data.shapes import raster, scenes, spec, text

N = 300  # examples per split in the statistical checks


def _examples(split, n=N, image_size=64, seed=0):
    return [shapes.make_example(seed, split, i, image_size) for i in range(n)]


def test_same_seed_gives_identical_examples_and_other_seeds_or_splits_differ():
    a = shapes.make_example(0, "train", 5, 64)
    b = shapes.make_example(0, "train", 5, 64)
    assert a["image"].tobytes() == b["image"].tobytes()
    assert a["captions"] == b["captions"] and a["questions"] == b["questions"]
    firsts = {s: [shapes.make_example(0, s, i, 64)["image"].tobytes() for i in range(20)] for s in spec.SPLITS}
    for s, t in itertools.combinations(spec.SPLITS, 2):
        assert firsts[s] != firsts[t], (s, t)
    other_seed = [shapes.make_example(1, "train", i, 64)["image"].tobytes() for i in range(20)]
    assert other_seed != firsts["train"]


def test_public_constants():
    assert len(shapes.SHAPES) >= 4 and len(shapes.COLORS) == 6 and shapes.SIZES == ("small", "large")
    assert 4 <= len(shapes.HELDOUT_PAIRS) <= 6
    for color, shape in shapes.HELDOUT_PAIRS:
        assert color in shapes.COLORS and shape in shapes.SHAPES
    # Every colour and every shape still occurs in training, in other combinations.
    seen = spec.SEEN_PAIR_IDS
    assert {c for c, _ in seen} == set(range(len(spec.COLORS)))
    assert {s for _, s in seen} == set(range(len(spec.SHAPES)))
    # The palette is well separated.
    pal = spec.PALETTE_RGB.astype(float)
    d = np.linalg.norm(pal[:, None] - pal[None], axis=-1) + np.eye(len(pal)) * 1e9
    assert d.min() > 120


@pytest.mark.parametrize("split", ["train", "validation", "test"])
def test_regular_splits_never_show_a_heldout_pair(split):
    for ex in _examples(split):
        for o in shapes.example_objects(ex):
            assert (o.color_name, o.shape_name) not in shapes.HELDOUT_PAIRS


def test_every_heldout_picture_shows_a_heldout_pair_and_all_pairs_occur():
    pairs = set()
    for ex in _examples("heldout"):
        objs = shapes.example_objects(ex)
        assert any((o.color_name, o.shape_name) in shapes.HELDOUT_PAIRS for o in objs)
        pairs |= {(o.color_name, o.shape_name) for o in objs if o.is_heldout}
    assert pairs == set(shapes.HELDOUT_PAIRS)


def test_attribute_coverage_in_train():
    objs = [o for ex in _examples("train") for o in shapes.example_objects(ex)]
    assert {o.shape for o in objs} == set(range(len(spec.SHAPES)))
    assert {o.color for o in objs} == set(range(len(spec.COLORS)))
    assert {o.size for o in objs} == {0, 1}
    assert {(o.row, o.col) for o in objs} == set(itertools.product(range(3), range(3)))
    counts = {n: sum(ex["num_objects"] == n for ex in _examples("train")) for n in (1, 2)}
    assert counts[1] > 0.2 * N and counts[2] > 0.4 * N


@pytest.mark.parametrize("image_size", spec.IMAGE_SIZES)
def test_objects_never_touch_each_other_or_the_border(image_size):
    """Large objects in every pair of neighbouring cells keep a gap; nothing touches the image edge
    (at 24 px, the bottom and right edges excepted: see spec.layout)."""
    big = {(r, c): raster.object_mask(spec.ObjectAttrs(0, 0, 1, r, c), image_size) for r in range(3) for c in range(3)}
    for (a, ma), (b, mb) in itertools.combinations(big.items(), 2):
        grown = ma.copy()  # 4-neighbour dilation: touching masks would overlap after it
        grown[1:] |= ma[:-1]
        grown[:-1] |= ma[1:]
        grown[:, 1:] |= ma[:, :-1]
        grown[:, :-1] |= ma[:, 1:]
        assert not (grown & mb).any(), (a, b)
    for m in big.values():
        assert not (m[0].any() or m[:, 0].any())
        if image_size > 24:
            assert not (m[-1].any() or m[:, -1].any())


@pytest.mark.parametrize("image_size", spec.IMAGE_SIZES)
def test_render_uses_only_palette_and_background_colours(image_size):
    ex = shapes.make_example(0, "train", 1, image_size)
    img = ex["image"]
    assert img.shape == (image_size, image_size, 3) and img.dtype == np.uint8
    colours = {tuple(c) for c in img.reshape(-1, 3)}
    allowed = {tuple(spec.BACKGROUND_RGB)} | {tuple(spec.PALETTE_RGB[o.color]) for o in shapes.example_objects(ex)}
    assert colours == allowed


def test_render_rejects_invalid_scenes():
    o = spec.ObjectAttrs(0, 0, 0, 1, 1)
    with pytest.raises(ValueError, match="share a grid cell"):
        raster.render([o, spec.ObjectAttrs(1, 1, 1, 1, 1)])
    with pytest.raises(ValueError, match="1 to 2 objects"):
        raster.render([])
    with pytest.raises(ValueError, match="color"):
        spec.ObjectAttrs(0, 6, 0, 0, 0)


def test_object_names():
    o = spec.ObjectAttrs.from_names("circle", "red", "large", "top left")
    assert (o.row, o.col) == (0, 0)
    assert o.names() == {"shape": "circle", "color": "red", "size": "large", "position": "top left"}
    assert o.is_heldout and o.describe() == "large red circle"


def _all_objects():
    return [spec.ObjectAttrs(s, c, z, r, k) for s in range(len(spec.SHAPES)) for c in (0, 3) for z in (0, 1)
            for r in range(3) for k in range(3)]


def test_parse_caption_round_trips_every_template_position_and_preposition():
    objs = _all_objects()
    rng = np.random.default_rng(0)
    for t in range(len(text.ONE_OBJECT_TEMPLATES)):
        for o in objs:
            for _ in range(2):  # both preposition choices and orders come from rng
                cap = text.caption([o], t, rng)
                assert shapes.parse_caption(cap) == [o], cap
    pairs = [(a, b) for a, b in zip(objs, objs[7:] + objs[:7]) if (a.row, a.col) != (b.row, b.col)]
    for t in range(len(text.TWO_OBJECT_TEMPLATES)):
        for a, b in pairs:
            cap = text.caption(spec.canonical([a, b]), t, rng)
            assert shapes.parse_caption(cap) == spec.canonical([a, b]), cap


def test_parse_caption_reads_every_t2i_prompt_template():
    objs = _all_objects()
    rng = np.random.default_rng(1)
    for t in range(len(text.ONE_OBJECT_PROMPTS)):
        for o in objs:
            assert shapes.parse_caption(text.prompt([o], t, rng)) == [o]
    pairs = [(a, b) for a, b in zip(objs, objs[5:] + objs[:5]) if (a.row, a.col) != (b.row, b.col)]
    for t in range(len(text.TWO_OBJECT_PROMPTS)):
        for a, b in pairs:
            p = text.prompt([b, a], t, rng)
            assert shapes.parse_caption(p) == spec.canonical([a, b]), p


def test_t2i_prompts_name_each_cell_before_its_object_and_captions_after():
    a, b = spec.ObjectAttrs(0, 1, 1, 2, 2), spec.ObjectAttrs(1, 2, 0, 0, 1)  # bottom right; top (first)
    rng = np.random.default_rng(0)

    def cells_first(t: str, objects) -> bool:
        start = 0
        for o in spec.canonical(objects):
            cell = t.index(o.position_name, start)
            start = t.index(o.describe(), start)
            if cell > start:
                return False
        return True

    for objects in ([a], [a, b]):
        for t in range(6):
            for _ in range(4):
                assert cells_first(text.prompt(objects, t, rng), objects)
    # Five of the six caption templates put the object first.
    firsts = [cells_first(text.caption([a, b], t, rng), [a, b]) for t in range(len(text.TWO_OBJECT_TEMPLATES))]
    assert sum(firsts) == 1, firsts


def test_parse_caption_reads_the_stored_captions_of_every_split():
    for split in spec.SPLITS:
        for ex in _examples(split, 100):
            assert len(ex["captions"]) == 4 and len(set(ex["captions"])) == 4
            for cap in ex["captions"]:
                assert shapes.parse_caption(cap) == shapes.example_objects(ex), cap


def test_two_object_captions_name_the_objects_in_reading_order():
    a, b = spec.ObjectAttrs(0, 1, 1, 2, 2), spec.ObjectAttrs(1, 2, 0, 0, 1)  # b comes first in reading order
    rng = np.random.default_rng(0)
    for t in range(len(text.TWO_OBJECT_TEMPLATES)):
        for _ in range(4):
            cap = text.caption([a, b], t, rng)
            assert cap.index(b.describe()) < cap.index(a.describe()), cap
    seen = 0
    for ex in _examples("train", 100):
        first, second = shapes.example_objects(ex) if ex["num_objects"] == 2 else (None, None)
        for cap in ex["captions"] if first else ():
            start = cap.index(first.describe())
            assert cap.index(second.describe(), start + 1) > start, cap
            seen += 1
    assert seen > 100


@pytest.mark.parametrize(
    "caption",
    ["", "hello world", "a red circle in the top left.", "a large red circle.", "in the top left.",
     "a large red circle in the top left and a small blue square.", "a large red in the top left."],
)
def test_parse_caption_returns_none_for_unreadable_text(caption):
    assert shapes.parse_caption(caption) is None


def test_parse_caption_tolerates_case_and_punctuation():
    got = shapes.parse_caption("A LARGE Red circle, top-left!")
    assert got == [spec.ObjectAttrs.from_names("circle", "red", "large", "top left")]
    got = shapes.parse_caption("a small blue square in the top center and a large green diamond, middle right")
    assert got == [spec.ObjectAttrs.from_names("square", "blue", "small", "top"),
                   spec.ObjectAttrs.from_names("diamond", "green", "large", "right")]


def test_questions_have_correct_answers_and_types():
    for ex in _examples("validation", 100):
        objs = shapes.example_objects(ex)
        qs, ans, types = ex["questions"], ex["answers"], ex["question_types"]
        assert len(qs) == len(ans) == len(types) and set(types) <= set(shapes.QUESTION_TYPES)
        assert ans[types.index("count")] == ("one", "two")[len(objs) - 1]
        for q, a, t in zip(qs, ans, types):
            if t in ("color", "shape", "size"):  # these refer to the object by its cell
                (o,) = [o for o in objs if re.search(rf"\bthe {o.position_name}\b(?! left| right)", q)]
                assert a == {"color": o.color_name, "shape": o.shape_name, "size": o.size_name}[t], (q, a)
            if t == "position":
                assert a in [o.position_name for o in objs]
                (o,) = [o for o in objs if o.position_name == a]
                assert o.color_name in q and o.shape_name in q
        assert types.count("color") == len(objs)


def test_task_documents():
    ex = shapes.make_example(0, "test", 3, 64)
    objs = shapes.example_objects(ex)
    rng = np.random.default_rng(0)
    cap = shapes.caption_document(ex, rng)
    assert cap.task == "caption" and [s.kind for s in cap.segments] == ["image", "text"]
    assert [s.is_target for s in cap.segments] == [False, True]
    assert cap.segments[1].text in ex["captions"] and cap.meta["objects"] == objs
    t2i = shapes.t2i_document(ex, rng)
    assert t2i.task == "t2i" and [s.kind for s in t2i.segments] == ["text", "image"]
    assert shapes.parse_caption(t2i.segments[0].text) == objs and t2i.meta["caption"] == t2i.segments[0].text
    assert [s.is_target for s in t2i.segments] == [False, True]
    np.testing.assert_array_equal(t2i.segments[1].image, ex["image"])
    vqa = shapes.vqa_documents(ex)
    assert len(vqa) == len(ex["questions"])
    for d, q, a, t in zip(vqa, ex["questions"], ex["answers"], ex["question_types"]):
        assert d.task == "vqa" and [s.kind for s in d.segments] == ["text", "image", "text"]
        assert [s.is_target for s in d.segments] == [False, False, True]
        assert d.segments[0].text == q and d.segments[2].text == a and d.segments[2].end_turn
        np.testing.assert_array_equal(d.segments[1].image, ex["image"])
        assert d.meta["question_type"] == t and d.meta["answer"] == a


def test_partial_prompts_leave_one_attribute_of_an_object_unsaid_and_share_zero_changes_nothing():
    ex = shapes.make_example(0, "test", 3, 64)
    objs = spec.canonical(shapes.example_objects(ex))
    # share 0 draws nothing more: the same prompt, and the stream goes on as before.
    a, b = np.random.default_rng(5), np.random.default_rng(5)
    assert shapes.t2i_document(ex, a).segments[0].text == shapes.t2i_document(ex, b, 0.0).segments[0].text
    assert a.integers(1 << 30) == b.integers(1 << 30)
    # share 1: each object loses its colour word or its shape word, never both, never its size or cell.
    left_out = []
    for seed in range(60):
        text = shapes.t2i_document(ex, np.random.default_rng(seed), 1.0).segments[0].text
        assert shapes.parse_caption(text) is None  # not a full description any more
        for o in objs:
            assert o.size_name in text and o.position_name in text
            has_colour, has_shape = o.color_name in text, o.shape_name in text
            assert has_colour != has_shape, text
            left_out.append("shape" if has_colour else "color")
            said = f"{o.size_name} {o.color_name} shape" if has_colour else f"{o.size_name} {o.shape_name}"
            assert said in text, (said, text)
    assert 0.3 < left_out.count("color") / len(left_out) < 0.7
    with pytest.raises(ValueError, match="leave_out"):
        objs[0].describe("size")
    with pytest.raises(ValueError, match="partial-prompt share"):
        shapes.t2i_document(ex, np.random.default_rng(0), 1.5)


def test_vqa_training_documents_ask_one_question_of_every_kind_and_few_counts():
    """The training form has the evaluation's layout, one question per document."""
    src = shapes.load("train", 64, backend="generate", sizes={"train": 60})
    kinds = collections.Counter()
    for i in range(60):
        ex = src[i]
        asked = dict(zip(ex["questions"], zip(ex["answers"], ex["question_types"])))
        for seed in range(5):
            doc = shapes.vqa_document(ex, np.random.default_rng([i, seed]))
            q, image, a = doc.segments
            assert doc.task == "vqa" and (q.kind, image.kind, a.kind) == ("text", "image", "text")
            assert not q.is_target and not image.is_target and a.is_target and a.end_turn
            assert asked[q.text] == (a.text, doc.meta["question_type"])
            kinds[doc.meta["question_type"]] += 1
    assert set(kinds) == {"count", "color", "shape", "size", "position"}
    assert kinds["count"] < 0.2 * sum(kinds.values())


@pytest.mark.parametrize("split", spec.SPLITS)
def test_interleaved_documents_show_what_their_text_says(split):
    docs = shapes.interleaved_documents(split, n=40, sizes={split: 40}, backend="generate")
    assert len(docs) == 40
    again = shapes.interleaved_documents(split, n=40, sizes={split: 40}, backend="generate")
    for d, e in zip(docs, again):
        assert isinstance(d, Document) and d.task == "interleaved" and d == e
        kinds = [s.kind for s in d.segments]
        assert kinds[0] == "image" and kinds[-1] == "image" and d.num_images >= 2
        assert all(k != kinds[i + 1] for i, k in enumerate(kinds[:-1]))  # image, text, image, ...
        states = d.meta["objects"]
        for img, objs in zip(d.images, states):
            assert shapes.judge_matches(img, objs)
        for before, after, edit, sentence in zip(states, states[1:], d.meta["edits"], d.segments[1::2]):
            changed = [o for o in before if o not in after]
            assert changed == [edit["before"]] and edit["after"] in after
            assert edit["before"].color_name in sentence.text and edit["before"].shape_name in sentence.text
            new = getattr(edit["after"], {"color": "color_name", "shape": "shape_name", "size": "size_name",
                                          "position": "position_name"}[edit["attribute"]])
            assert new in sentence.text or edit["attribute"] == "size"
        if split == "heldout":
            assert all(any(o.is_heldout for o in objs) for objs in states)
        else:
            assert not any(o.is_heldout for objs in states for o in objs)


def test_example_rng_is_independent_of_split_size():
    """Example i is the same whatever the split's size: small builds are prefixes of big ones."""
    a = scenes.example_rng(0, "train", 17).integers(1 << 30)
    b = scenes.example_rng(0, "train", 17).integers(1 << 30)
    c = scenes.example_rng(0, "train", 18).integers(1 << 30)
    assert a == b != c

"""The judge reads back every attribute of ground-truth pictures, survives mild noise and blur,
and never crashes on junk."""

import collections

import numpy as np
import pytest

from chameleon_jax.data import shapes
from chameleon_jax.data.shapes import judging, spec


def _blur(img, sigma):
    """Separable Gaussian blur (edge padding), float output."""
    r = int(np.ceil(3 * sigma))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    x = np.pad(img.astype(np.float32), ((r, r), (r, r), (0, 0)), mode="edge")
    x = sum(k[i] * x[i : i + img.shape[0]] for i in range(2 * r + 1))
    return sum(k[i] * x[:, i : i + img.shape[1]] for i in range(2 * r + 1))


def _accuracy(split, n, image_size, perturb=None):
    hits, misses = 0, collections.Counter()
    for i in range(n):
        ex = shapes.make_example(0, split, i, image_size)
        img = ex["image"] if perturb is None else perturb(ex["image"], i)
        objs = shapes.example_objects(ex)
        if shapes.judge_matches(img, objs):
            hits += 1
        else:
            misses[tuple(o.describe() for o in objs)] += 1
    return hits / n, misses


@pytest.mark.parametrize("split", spec.SPLITS)
def test_exact_match_on_ground_truth_renders_of_every_split(split):
    acc, misses = _accuracy(split, 250, 64)
    assert acc >= 0.995, misses


@pytest.mark.parametrize("image_size", [32, 128])
def test_exact_match_at_the_other_image_sizes(image_size):
    acc, misses = _accuracy("test", 120, image_size)
    assert acc >= 0.995, misses


def test_judge_reports_objects_in_canonical_order_with_count_and_scores():
    for i in range(20):
        ex = shapes.make_example(0, "train", i, 64)
        r = shapes.judge(ex["image"])
        assert r.objects == shapes.example_objects(ex)
        assert r.num_found == ex["num_objects"] and r.num_rejected == 0
        assert all(s > 0.99 for s in r.scores)


def _noisy(sigma_noise, sigma_blur):
    def perturb(img, i):
        rng = np.random.default_rng(i)
        x = _blur(img, sigma_blur) if sigma_blur else img.astype(np.float32)
        return np.clip(np.round(x + rng.normal(0, sigma_noise, x.shape)), 0, 255).astype(np.uint8)

    return perturb


@pytest.mark.parametrize(
    "sigma_noise, sigma_blur",
    [(8, 0), (0, 0.7), (8, 0.7), (8, 1.0)],
)
def test_robust_to_mild_noise_and_blur(sigma_noise, sigma_blur):
    acc, misses = _accuracy("validation", 150, 64, _noisy(sigma_noise, sigma_blur))
    assert acc >= 0.99, misses


def test_robust_to_a_shifted_background_and_one_pixel_offsets():
    for i in range(40):
        ex = shapes.make_example(0, "test", i, 64)
        img = ex["image"].astype(np.int16)
        img[(img == spec.BACKGROUND_RGB).all(-1)] -= 12  # a slightly darker background
        shifted = np.roll(np.clip(img, 0, 255).astype(np.uint8), shift=(1, -1), axis=(0, 1))
        assert shapes.judge_matches(shifted, shapes.example_objects(ex))


@pytest.mark.parametrize("image_size", spec.IMAGE_SIZES)
def test_never_crashes_on_blank_noise_or_junk(image_size):
    rng = np.random.default_rng(0)
    s = image_size
    pictures = {
        "blank": np.full((s, s, 3), spec.BACKGROUND_RGB, np.uint8),
        "black": np.zeros((s, s, 3), np.uint8),
        "white": np.full((s, s, 3), 255, np.uint8),
        "uniform noise": rng.integers(0, 256, (s, s, 3), dtype=np.uint8),
        "gaussian noise": np.clip(240 + rng.normal(0, 60, (s, s, 3)), 0, 255).astype(np.uint8),
        "one colour": np.tile(spec.PALETTE_RGB[2], (s, s, 1)),
        "blocks": np.kron(rng.integers(0, 256, (s // 8, s // 8, 3)), np.ones((8, 8, 1))).astype(np.uint8),
    }
    for name, img in pictures.items():
        r = shapes.judge(img)
        assert r.num_found == len(r.objects) == len(r.scores), name
        for o in r.objects:
            assert isinstance(o, shapes.ObjectAttrs)
    assert shapes.judge(pictures["blank"]).num_found == 0
    assert shapes.judge(pictures["white"]).num_found == 0
    assert shapes.judge(pictures["gaussian noise"]).num_found == 0
    whole = shapes.judge(pictures["one colour"])  # one blob the size of the picture is not an object
    assert whole.num_found == 0 and whole.num_rejected == 1
    assert not shapes.judge_matches(pictures["blank"], [spec.ObjectAttrs(0, 0, 0, 0, 0)])


def test_merged_or_extra_blobs_fail_the_exact_match():
    ex = shapes.make_example(0, "train", 0, 64)
    objs = shapes.example_objects(ex)
    img = ex["image"].copy()
    img[2:6, 2:6] = spec.PALETTE_RGB[1]  # an extra 4x4 green square: a speck, ignored
    assert shapes.judge_matches(img, objs) == all((o.row, o.col) != (0, 0) for o in objs)
    junk = np.full((64, 64, 3), spec.BACKGROUND_RGB, np.uint8)
    junk[20:44, 2:62] = spec.PALETTE_RGB[0]  # a long bar across three cells
    r = shapes.judge(junk)
    assert r.num_found == 0 and r.num_rejected == 1


def test_wrong_attributes_do_not_match():
    ex = shapes.make_example(0, "train", 2, 64)
    objs = shapes.example_objects(ex)
    o = objs[0]
    for change in ({"color": (o.color + 1) % 6}, {"shape": (o.shape + 1) % len(spec.SHAPES)}, {"size": 1 - o.size}):
        wrong = [spec.ObjectAttrs(**{**o.__dict__, **change})] + objs[1:]
        assert not shapes.judge_matches(ex["image"], wrong)


def test_rejects_arrays_that_are_not_pictures():
    with pytest.raises(ValueError, match="uint8"):
        shapes.judge(np.zeros((64, 64, 3), np.float32))
    with pytest.raises(ValueError, match="square"):
        shapes.judge(np.zeros((64, 32, 3), np.uint8))


def _reference_components(labels):
    """Breadth-first search labelling, for checking the vectorised one."""
    h, w = labels.shape
    out = -np.ones((h, w), int)
    n = 0
    for y in range(h):
        for x in range(w):
            if labels[y, x] < 0 or out[y, x] >= 0:
                continue
            stack = [(y, x)]
            out[y, x] = n
            while stack:
                cy, cx = stack.pop()
                for ny, nx in ((cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)):
                    if 0 <= ny < h and 0 <= nx < w and out[ny, nx] < 0 and labels[ny, nx] == labels[cy, cx]:
                        out[ny, nx] = n
                        stack.append((ny, nx))
            n += 1
    return out, n


def test_connected_components_match_a_reference():
    rng = np.random.default_rng(0)
    for density in (0.3, 0.6, 0.9):
        labels = np.where(rng.random((24, 31)) < density, rng.integers(0, 3, (24, 31)), -1)
        ids, n = judging.connected_components(labels)
        ref, n_ref = _reference_components(labels)
        assert n == n_ref
        # Same partition: a bijection between the two labellings.
        pairs = {(a, b) for a, b in zip(ids.ravel(), ref.ravel())}
        assert len(pairs) == n + int((labels < 0).any())
        assert ((ids < 0) == (labels < 0)).all()

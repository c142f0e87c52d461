"""Evaluation figures split by how many objects a picture holds."""

import pytest

from eval.common import accuracy_by_objects


def test_accuracy_by_objects_groups_by_count():
    got = accuracy_by_objects("vqa_accuracy", [True, True, False, True, False, False], [1, 2, 2, 1, 2, 3])
    assert got == {"vqa_accuracy_1_objects": 1.0, "vqa_accuracy_2_objects": pytest.approx(1 / 3),
                   "vqa_accuracy_3_objects": 0.0}
    assert accuracy_by_objects("x", [], []) == {}


def test_t2i_scores_each_asked_for_object_at_its_cell():
    import dataclasses

    from chameleon_jax.data import shapes
    from chameleon_jax.data.shapes import raster, spec
    from eval.t2i import score

    ex = next(shapes.make_example(0, "test", i, 64) for i in range(50)
              if shapes.make_example(0, "test", i, 64)["num_objects"] == 2)
    first, second = spec.canonical(shapes.example_objects(ex))
    # The first object keeps its shape in another colour; the second moves to a free cell.
    recoloured = dataclasses.replace(first, color=(first.color + 1) % len(spec.COLORS))
    taken = {(first.row, first.col), (second.row, second.col)}
    free = next((r, c) for r in range(3) for c in range(3) if (r, c) not in taken)
    moved = dataclasses.replace(second, row=free[0], col=free[1])
    images = [ex["image"], raster.render([recoloured, moved], 64), None]
    exact, count, per_object = score(images, [ex, ex, ex])
    assert exact == [True, False, False] and count == [True, True, False]
    assert per_object["cell"] == [True, True, True, False, False, False]
    assert per_object["color"] == [True, True, False, False, False, False]
    assert per_object["shape"] == [True, True, True, False, False, False]
    assert per_object["size"] == [True, True, True, False, False, False]

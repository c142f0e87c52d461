"""Evaluation figures split by how many objects a picture holds."""

import pytest

from eval.common import accuracy_by_objects


def test_accuracy_by_objects_groups_by_count():
    got = accuracy_by_objects("vqa_accuracy", [True, True, False, True, False, False], [1, 2, 2, 1, 2, 3])
    assert got == {"vqa_accuracy_1_objects": 1.0, "vqa_accuracy_2_objects": pytest.approx(1 / 3),
                   "vqa_accuracy_3_objects": 0.0}
    assert accuracy_by_objects("x", [], []) == {}

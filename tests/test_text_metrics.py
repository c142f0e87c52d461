import pytest

from eval.text_metrics import bleu4, cider_d, tokenize

REFS = [
    ["a large red circle in the top left.", "there is a big red circle at the top left."],
    ["a small blue square at the center.", "one small blue square in the middle."],
    ["a green triangle at the bottom right.", "the bottom right holds a green triangle."],
]


def test_tokenize_splits_punctuation_and_lowercases():
    assert tokenize("A Red circle, top-left.") == ["a", "red", "circle", "top", "-", "left"]


def test_identical_candidates_score_perfect_bleu():
    cands = [r[0] for r in REFS]
    assert bleu4(cands, REFS) == pytest.approx(1.0)


def test_wrong_candidates_score_lower():
    good = [r[0] for r in REFS]
    bad = ["a small green square at the bottom left."] * 3
    assert bleu4(bad, REFS) < bleu4(good, REFS)
    assert cider_d(bad, REFS) < cider_d(good, REFS)


def test_cider_rewards_the_specific_over_the_generic():
    generic = ["a shape in the image."] * 3
    exact = [r[0] for r in REFS]
    assert cider_d(exact, REFS) > 1.0 > cider_d(generic, REFS)


def test_length_penalty_lowers_cider_for_padded_candidates():
    exact = [r[0] for r in REFS]
    padded = [r[0] + " and the rest of the picture is plain and empty everywhere" for r in REFS]
    assert cider_d(padded, REFS) < cider_d(exact, REFS)


def test_mismatched_inputs_are_errors():
    with pytest.raises(ValueError, match="2 candidates but 3"):
        bleu4(["a", "b"], REFS)
    with pytest.raises(ValueError, match="no references"):
        cider_d(["a"], [[]])

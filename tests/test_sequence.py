import logging

import numpy as np
import pytest

from chameleon_jax.data.documents import Document, Segment
from chameleon_jax.data.grid_tokenizer import ColourGridTokenizer
from chameleon_jax.sequence import (
    IMAGE,
    TEXT,
    OverlongDocumentError,
    SequenceConfig,
    encode_document,
    fit_to_row,
    pack,
)
from chameleon_jax.vocab import Vocabulary

K = 16


@pytest.fixture(scope="module")
def vocab(tmp_path_factory):
    texts = ["a red circle", "a blue square on the left", "what colour is it? green", "two stars"] * 10
    return Vocabulary.train(texts, tmp_path_factory.mktemp("v"), text_vocab_size=48, codebook_size=K)


def _image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (4, 6, 3), dtype=np.uint8)


def _codes(image: np.ndarray) -> np.ndarray:
    """A toy tokenizer: 2x3 codes, row-major order is visible in the values."""
    return (image[::2, ::2, 0].astype(np.int32) % K)


CFG = SequenceConfig(seq_len=64, text_weight=1.0, image_weight=0.5)


def test_text_to_image_layout_and_weights(vocab):
    img = _image(0)
    doc = Document((Segment(text="a red circle", is_target=False), Segment(image=img)), task="t2i")
    enc = encode_document(doc, vocab, _codes, CFG)
    text = vocab.encode_text("a red circle")
    codes = vocab.image_ids(_codes(img).reshape(-1))
    expected = [vocab.bos_id, *text, vocab.boi_id, *codes, vocab.eoi_id, vocab.eos_id]
    assert enc.ids.tolist() == expected
    n = len(text)
    # bos and the prompt carry no loss; <boi> opens a target image, so it is trained (text modality).
    assert enc.weights[: 1 + n].tolist() == [0.0] * (1 + n)
    assert enc.weights[1 + n] == 1.0 and enc.modality[1 + n] == TEXT
    assert enc.weights[2 + n : 2 + n + 6].tolist() == [0.5] * 6
    assert (enc.modality[2 + n : 2 + n + 6] == IMAGE).all()
    assert enc.weights[-2] == 0.5 and enc.modality[-2] == IMAGE  # <eoi>
    assert enc.weights[-1] == 1.0 and enc.modality[-1] == TEXT  # <eos>


def test_prompt_image_and_question_get_no_loss(vocab):
    img = _image(1)
    doc = Document(
        (Segment(image=img, is_target=False), Segment(text="what colour is it?", is_target=False),
         Segment(text="green")),
        task="vqa",
    )
    enc = encode_document(doc, vocab, _codes, CFG)
    answer = vocab.encode_text("green")
    assert enc.ids[-1 - len(answer) : -1].tolist() == answer
    assert (enc.weights[: -1 - len(answer)] == 0).all()
    assert (enc.weights[-1 - len(answer) :] == 1.0).all()
    boi = enc.ids.tolist().index(vocab.boi_id)
    assert enc.ids[boi + 7] == vocab.eoi_id and enc.weights[boi] == 0 and enc.weights[boi + 7] == 0


def test_dialogue_turns_end_with_a_trained_eot(vocab):
    doc = Document(
        (Segment(image=_image(1), is_target=False), Segment(text="what colour is it?", is_target=False),
         Segment(text="green", end_turn=True), Segment(text="two stars", is_target=False),
         Segment(text="a red circle", end_turn=True)),
        task="vqa",
    )
    enc = encode_document(doc, vocab, _codes, CFG)
    ids = enc.ids.tolist()
    first, second = vocab.encode_text("green"), vocab.encode_text("a red circle")
    assert ids[-2 - len(second):] == [*second, vocab.eot_id, vocab.eos_id]
    eots = [i for i, t in enumerate(ids) if t == vocab.eot_id]
    assert len(eots) == 2 and ids[eots[0] - len(first): eots[0]] == first
    assert enc.weights[eots].tolist() == [1.0, 1.0]  # the model learns where a turn ends
    asked = eots[0] + 1
    assert (enc.weights[asked: asked + len(vocab.encode_text("two stars"))] == 0).all()
    with pytest.raises(ValueError, match="end_turn"):
        Segment(image=_image(0), end_turn=True)


def test_packing_segments_positions_targets_and_padding(vocab):
    docs = [
        Document((Segment(text="a red circle"),)),
        Document((Segment(image=_image(2), is_target=False), Segment(text="two stars"))),
        Document((Segment(text="a blue square on the left"),)),
    ]
    encs = [encode_document(d, vocab, _codes, CFG) for d in docs]
    seq_len = encs[0].slots + encs[1].slots + 3  # the third does not fit the first row
    batch = pack(encs, seq_len, vocab.pad_id, num_rows=3)
    assert set(batch) == {"tokens", "targets", "positions", "segment_ids", "loss_weights", "modality"}
    assert batch["tokens"].dtype == np.int32 and batch["loss_weights"].dtype == np.float32
    assert batch["modality"].dtype == np.int8 and batch["tokens"].shape == (3, seq_len)
    a, b = encs[0].slots, encs[1].slots
    seg = batch["segment_ids"][0]
    assert seg.tolist() == [1] * a + [2] * b + [0] * 3
    assert batch["positions"][0].tolist() == list(range(a)) + list(range(b)) + [0] * 3
    # Targets are the next token of the same document; nothing crosses a boundary.
    assert batch["tokens"][0, :a].tolist() == encs[0].ids[:-1].tolist()
    assert batch["targets"][0, :a].tolist() == encs[0].ids[1:].tolist()
    assert batch["targets"][0, a - 1] == vocab.eos_id and batch["tokens"][0, a] == vocab.bos_id
    assert (batch["tokens"][0, a + b :] == vocab.pad_id).all()
    assert (batch["loss_weights"][0, a + b :] == 0).all()
    assert batch["segment_ids"][1].tolist()[: encs[2].slots] == [1] * encs[2].slots
    assert (batch["segment_ids"][2] == 0).all() and (batch["loss_weights"][2] == 0).all()
    np.testing.assert_array_equal(batch["loss_weights"][0, :a], encs[0].weights[1:])


def test_overlong_document_error_names_it(vocab):
    doc = Document((Segment(text="a blue square on the left " * 8),), meta={"id": "doc-42"})
    enc = encode_document(doc, vocab, _codes, CFG)
    with pytest.raises(OverlongDocumentError, match=r"doc-42.*seq_len=16"):
        fit_to_row(enc, 16, "error")


def test_overlong_split_trains_every_target_once(vocab):
    doc = Document((Segment(text="a blue square on the left " * 8),), meta={"id": "long"})
    enc = encode_document(doc, vocab, _codes, CFG)
    pieces = fit_to_row(enc, 16, "split")
    assert len(pieces) == -(-enc.slots // 16) and all(p.slots <= 16 for p in pieces)
    targets = np.concatenate([p.ids[1:] for p in pieces])
    np.testing.assert_array_equal(targets, enc.ids[1:])
    batch = pack(pieces, 16, vocab.pad_id)
    assert batch["positions"][1, 0] == 0 and batch["tokens"][1, 0] == pieces[0].ids[-1]


def test_overlong_drop_warns(vocab, caplog):
    enc = encode_document(Document((Segment(text="two stars " * 30),), meta={"id": "dropme"}), vocab, _codes, CFG)
    with caplog.at_level(logging.WARNING):
        assert fit_to_row(enc, 16, "drop_with_warning") == []
    assert "dropme" in caplog.text


def test_grid_tokenizer_codes_block_colours_and_paints_them_back():
    tok = ColourGridTokenizer(cells=4, levels=4)
    images = np.stack([np.full((16, 16, 3), c, np.uint8) for c in (0, 85, 170, 255)])
    codes = tok.encode(images)
    assert codes.shape == (4, 4, 4) and tok.codebook_size == 64 and tok.codes_per_image == 16
    assert [int(c[0, 0]) for c in codes] == [0, 21, 42, 63]  # grey level g is code (g * 4 + g) * 4 + g
    np.testing.assert_array_equal(tok.decode(codes, 16), images)
    with pytest.raises(ValueError, match="does not split into 4x4 cells"):
        tok.encode(np.zeros((1, 10, 10, 3), np.uint8))

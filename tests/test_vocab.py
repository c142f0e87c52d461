import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from chameleon_jax.vocab import Vocabulary, VocabularyError, chameleon_code_from_name

CORPUS = [
    "a red circle at the top left",
    "a blue square in the middle",
    "two green triangles below a yellow star",
    "what colour is the circle? red",
    "how many squares are there? 3",
] * 20


@pytest.fixture(scope="module")
def own_vocab(tmp_path_factory):
    return Vocabulary.train(CORPUS, tmp_path_factory.mktemp("vocab"), text_vocab_size=64, codebook_size=32)


def test_own_layout_specials_then_pieces_then_one_block_of_codes(own_vocab):
    v = own_vocab
    specials = sorted(v.special_ids.values())
    assert specials == list(range(6))
    image_ids = np.flatnonzero(v.image_token_mask)
    assert len(image_ids) == 32 and np.all(np.diff(image_ids) == 1) and image_ids[-1] == v.size - 1
    text_ids = np.flatnonzero(v.text_token_mask)
    assert not (v.text_token_mask & v.image_token_mask).any()
    for name in ("pad", "bos", "boi", "eoi"):
        assert not v.text_token_mask[getattr(v, f"{name}_id")]
    assert v.text_token_mask[v.eos_id] and v.text_token_mask[v.eot_id]
    assert text_ids.max() < image_ids.min()
    assert v.padded_size(128) % 128 == 0 and v.padded_size(128) >= v.size


def test_own_text_round_trip_skips_special_and_image_ids(own_vocab):
    v = own_vocab
    ids = v.encode_text("a red circle below a blue star")
    assert all(v.text_token_mask[i] for i in ids)
    noisy = [v.bos_id] + ids[:3] + [v.boi_id, int(v.image_ids(5)), v.eoi_id] + ids[3:] + [v.eos_id, v.pad_id]
    assert v.decode_text(noisy) == "a red circle below a blue star"


def test_code_maps_on_numpy_and_jax(own_vocab):
    v = own_vocab
    codes = np.arange(32, dtype=np.int32).reshape(4, 8)
    ids = v.image_ids(codes)
    assert ids.shape == (4, 8) and v.image_token_mask[ids].all()
    np.testing.assert_array_equal(v.codes_from_ids(ids), codes)
    jit_ids = jax.jit(v.image_ids)(jnp.asarray(codes))
    np.testing.assert_array_equal(np.asarray(jit_ids), ids)
    back = jax.jit(v.codes_from_ids)(jnp.asarray([v.bos_id, int(ids[0, 3]), v.size + 7]))
    np.testing.assert_array_equal(np.asarray(back), [-1, 3, -1])
    assert v.codes_from_ids(np.array([v.eos_id, v.size + 3])).tolist() == [-1, -1]
    with pytest.raises(IndexError):
        v.image_ids(np.array([32]))


def test_own_vocabulary_save_load_round_trip(own_vocab, tmp_path):
    own_vocab.save(tmp_path / "v")
    back = Vocabulary.load(tmp_path / "v")
    assert back.size == own_vocab.size and back.special_ids == own_vocab.special_ids
    np.testing.assert_array_equal(back.code_to_id, own_vocab.code_to_id)
    np.testing.assert_array_equal(back.text_token_mask, own_vocab.text_token_mask)
    assert back.encode_text("a green star") == own_vocab.encode_text("a green star")
    assert back.fingerprint() == own_vocab.fingerprint()


def test_training_is_deterministic(own_vocab, tmp_path):
    again = Vocabulary.train(CORPUS, tmp_path, text_vocab_size=64, codebook_size=32)
    assert again.fingerprint() == own_vocab.fingerprint()


def test_load_missing_directory_is_clear(tmp_path):
    with pytest.raises(VocabularyError, match="vocab.json missing"):
        Vocabulary.load(tmp_path)


# ----------------------------------------------------------- Chameleon layout
K = 16


def _code_name(code: int) -> str:
    return "IMGIMG" + "".join(chr(ord("A") + int(d)) for d in str(code)) + "Z"


def _synthetic_chameleon_tokenizer(path):
    """A small BPE tokenizer.json laid out like Chameleon's, image codes deliberately shuffled."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    rng = np.random.default_rng(0)
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    perm = rng.permutation(K)
    assert not np.array_equal(perm, np.arange(K))
    for slot, code in enumerate(perm):  # code `code` sits at id 4 + slot, not 4 + code
        vocab[_code_name(int(code))] = 4 + slot
    nxt = 4 + K
    for name in ("<eoss>", "<racm3:break>", "<reserved00001>", "<reserved08706>"):
        vocab[name] = nxt
        nxt += 1
    for piece in ["▁"] + list("abcdefghijklmnopqrstuvwxyz") + ["▁a", "re", "▁re", "▁red"]:
        vocab[piece] = nxt
        nxt += 1
    merges = [("▁", "a"), ("r", "e"), ("▁", "re"), ("▁re", "d")]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.save(str(path))
    data = json.loads(path.read_text())
    data["added_tokens"] = [
        {"id": vocab[n], "content": n, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True}
        for n in ("<s>", "<pad>", "</s>", "<unk>", "<eoss>", "<racm3:break>", "<reserved00001>", "<reserved08706>")
    ]
    path.write_text(json.dumps(data))
    return vocab, perm


def test_chameleon_code_names():
    assert chameleon_code_from_name("IMGIMGAZ") == 0
    assert chameleon_code_from_name("IMGIMGBAZ") == 10
    assert chameleon_code_from_name("IMGIMGIBJCZ") == 8192
    assert chameleon_code_from_name(_code_name(4321)) == 4321


def test_chameleon_tokenizer_maps_codes_by_name_not_by_offset(tmp_path):
    names, perm = _synthetic_chameleon_tokenizer(tmp_path / "tokenizer.json")
    v = Vocabulary.from_chameleon_tokenizer(tmp_path / "tokenizer.json")
    assert v.size == len(names) and v.codebook_size == K
    assert (v.bos_id, v.pad_id, v.eos_id) == (0, 1, 2)
    assert v.boi_id == names["<racm3:break>"] and v.eoi_id == names["<eoss>"]
    assert v.eot_id == names["<reserved08706>"]
    for code in range(K):
        assert v.code_to_id[code] == names[_code_name(code)]
        assert v.id_to_code[names[_code_name(code)]] == code
    assert not np.array_equal(v.code_to_id, np.arange(K) + 4)
    assert not (v.text_token_mask & v.image_token_mask).any()
    for i in (v.pad_id, v.bos_id, v.boi_id, v.eoi_id, names["<unk>"], names["<reserved00001>"]):
        assert not v.text_token_mask[i]
    assert v.text_token_mask[v.eos_id] and v.text_token_mask[v.eot_id]
    assert v.text_token_mask[names["▁red"]]

    ids = v.encode_text("a red bed")
    assert names["▁red"] in ids and all(v.text_token_mask[i] for i in ids)
    mixed = [v.bos_id] + ids + [v.boi_id] + v.image_ids(np.array([3, 9])).tolist() + [v.eoi_id, v.eos_id]
    assert v.decode_text(mixed) == "a red bed"

    v.save(tmp_path / "saved")
    back = Vocabulary.load(tmp_path / "saved")
    np.testing.assert_array_equal(back.code_to_id, v.code_to_id)
    assert back.special_ids == v.special_ids and back.encode_text("a red bed") == ids

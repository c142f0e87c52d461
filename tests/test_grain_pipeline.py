"""The grain pipeline over tokenised shards: order, processes, packing, resume, mixing."""

import dataclasses
from collections import Counter

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from chameleon_jax import configlib
from chameleon_jax.config import ModelConfig
from chameleon_jax.data import Document, Segment, write_jsonl
from chameleon_jax.data.grain_pipeline import (
    GrainBatches, ShardData, batches, document_stream, parse_mixture,
)
from chameleon_jax.data.shards import ShardSet
from chameleon_jax.lm_data import LMDataConfig
from chameleon_jax.sequence import pack
from chameleon_jax.transformer import Transformer
from train.tokenize import TokenizeConfig, run

WORDS = "red green blue circle square star left right top bottom small big".split()


def _tokenise(root, n: int, name: str, long_every: int = 0):
    """n text documents "doc <name> <i> ..." (every `long_every`-th one long) -> a shard folder."""
    rng = np.random.default_rng(n)
    docs = []
    for i in range(n):
        words = " ".join(rng.choice(WORDS, 3 + (40 if long_every and i % long_every == 0 else int(rng.integers(8)))))
        docs.append(Document((Segment(text=f"doc {name} {i} {words}"),)))
    write_jsonl(docs, root / f"{name}.jsonl")
    out = root / f"tok-{name}"
    run(configlib.from_dict(TokenizeConfig, {"source": "jsonl", "input": str(root / f"{name}.jsonl"),
                                             "out_dir": str(out), "progress": False, "docs_per_shard": 16,
                                             "text_vocab_size": 64}))
    return ShardSet(out)


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    return {"a": _tokenise(root, 40, "a", long_every=7)}


def _names(ds, n):
    return [ds[i].name for i in range(n)]


def test_same_seed_same_order_other_seed_other_order_and_every_epoch_reshuffled(sets):
    s = sets["a"]
    first = _names(document_stream([s], [1], 0, 0, 1), 80)
    assert first == _names(document_stream([s], [1], 0, 0, 1), 80)
    assert first != _names(document_stream([s], [1], 1, 0, 1), 80)
    assert sorted(first[:40]) == sorted(first[40:]) and first[:40] != first[40:]
    assert len(set(first[:40])) == 40


def test_two_processes_read_disjoint_documents_whose_union_is_the_set_each_epoch(sets):
    s = sets["a"]
    p0 = _names(document_stream([s], [1], 5, 0, 2), 40)
    p1 = _names(document_stream([s], [1], 5, 1, 2), 40)
    for epoch in range(2):
        mine, theirs = p0[20 * epoch: 20 * epoch + 20], p1[20 * epoch: 20 * epoch + 20]
        assert not set(mine) & set(theirs)
        assert sorted(mine + theirs) == sorted(_names(document_stream([s], [1], 5, 0, 1), 40))


def _resumes_at_every_batch(stream, straight, inside: str) -> int:
    """Restores `stream` after each of the first batches of `straight` and checks the next two batches; returns
    how many of those states had `inside` > 0 (a resume inside a document or a block)."""
    inside_count = 0
    for k in range(1, len(straight) - 1):
        it = GrainBatches(stream)
        for _ in range(k):
            it.next_local()
        state = it.state()
        inside_count += state[inside] > 0
        again = GrainBatches(stream)
        again.restore(state)
        for want in straight[k:k + 2]:
            got = again.next_local()
            for key in want:
                np.testing.assert_array_equal(got[key], want[key])
    return inside_count


def test_pack_rows_gives_the_packers_rows_and_resumes_mid_document(sets):
    s = sets["a"]
    docs = document_stream([s], [1], 3, 0, 1)
    stream = batches(docs, 32, 0, "split", 3)
    it = GrainBatches(stream)
    straight = [it.next_local() for _ in range(12)]
    # The same rows as sequence.pack over the same pieces (overlong documents split).
    from chameleon_jax.sequence import fit_to_row

    pieces = [p for i in range(60) for p in fit_to_row(docs[i], 32, "split")]
    expected = pack(pieces, 32, 0)
    got = np.concatenate([b["tokens"] for b in straight])
    assert len(expected["tokens"]) > len(got)
    for key in ("tokens", "targets", "positions", "segment_ids", "loss_weights"):
        np.testing.assert_array_equal(np.concatenate([b[key] for b in straight]), expected[key][: len(got)])
    # Restore at every batch boundary: some fall inside a split document.
    assert _resumes_at_every_batch(stream, straight, "piece") > 0  # the resume inside a document was exercised


def test_best_fit_blocks_hold_every_piece_once_and_resume_mid_block(sets):
    s = sets["a"]
    docs = document_stream([s], [1], 3, 0, 1)
    from chameleon_jax.sequence import RowPacker, best_fit_rows, fit_to_row

    block, seq_len = 10, 32
    stream = batches(docs, seq_len, 0, "split", 3, pack_docs=block)
    it = GrainBatches(stream)
    straight = [it.next_local() for _ in range(12)]
    flat = {k: np.concatenate([b[k] for b in straight]) for k in ("tokens", "targets", "segment_ids", "positions")}
    # The rows are each block's pieces, grouped as best_fit_rows says, block after block.
    expected, start = [], 0
    while len(expected) < len(flat["tokens"]):
        pieces = [p for i in range(start, start + block) for p in fit_to_row(docs[i], seq_len, "split")]
        for members in best_fit_rows([p.slots for p in pieces], seq_len):
            packer = RowPacker(seq_len, 0)
            for i in members:
                packer.add(pieces[i])
            expected.append(packer.take())
        start += block
    for key in flat:
        np.testing.assert_array_equal(flat[key], np.stack([r[key] for r in expected[: len(flat[key])]]))
    # Restore at every batch boundary (inside blocks and at their ends) gives the same next batches.
    assert _resumes_at_every_batch(stream, straight, "row") > 0  # a resume inside a block was exercised


def test_a_data_state_resumes_only_with_the_packing_it_was_saved_with(sets):
    docs = document_stream([sets["a"]], [1], 3, 0, 1)
    greedy, blocks = (GrainBatches(batches(docs, 32, 0, "split", 3, pack_docs=n)) for n in (1, 10))
    greedy.next_local()
    blocks.next_local()
    with pytest.raises(ValueError, match="pack_docs=1; resume with the same setting"):
        GrainBatches(batches(docs, 32, 0, "split", 3, pack_docs=10)).restore(greedy.state())
    with pytest.raises(ValueError, match="pack_docs > 1; resume with the same setting"):
        GrainBatches(batches(docs, 32, 0, "split", 3)).restore(blocks.state())


def test_best_fit_rows_fill_tighter_than_greedy_and_keep_rows_within_seq_len():
    from chameleon_jax.sequence import best_fit_rows

    rng = np.random.default_rng(0)
    slots = rng.integers(20, 60, size=200).tolist()
    rows = best_fit_rows(slots, 128)
    assert sorted(i for r in rows for i in r) == list(range(200))
    assert all(sum(slots[i] for i in r) <= 128 for r in rows)
    assert [r[0] for r in rows] == sorted(r[0] for r in rows) and all(r == sorted(r) for r in rows)
    greedy, used = 1, 0
    for n in slots:
        if used + n > 128:
            greedy, used = greedy + 1, 0
        used += n
    assert len(rows) < greedy
    assert best_fit_rows(slots, 128) == rows


def test_a_document_packed_beside_others_gives_the_logits_it_gives_alone(sets):
    s = sets["a"]
    row = GrainBatches(batches(document_stream([s], [1], 0, 0, 1), 48, 0, "split", 1)).next_local()
    seg = row["segment_ids"][0]
    assert seg.max() >= 2
    cfg = dataclasses.replace(ModelConfig(), num_kv_heads=2, max_seq_len=48, vocab_size=128)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    forward = nnx.jit(lambda m, t, p, s: m(t, p, s))
    packed = forward(model, *(jnp.asarray(row[k]) for k in ("tokens", "positions", "segment_ids")))[0]
    for k in range(1, int(seg.max()) + 1):
        where = np.flatnonzero(seg == k)
        n = len(where)
        # The document alone at the start of an otherwise empty row (causal: what follows cannot matter).
        alone = np.zeros_like(row["tokens"])
        alone[0, :n] = row["tokens"][0, where]
        ids = (np.arange(48) < n).astype(np.int32)[None]
        positions = np.arange(48, dtype=np.int32)[None] * ids
        out = forward(model, jnp.asarray(alone), jnp.asarray(positions), jnp.asarray(ids))[0]
        np.testing.assert_allclose(packed[where], out[:n], atol=1e-5)


def test_sets_mix_by_weight(tmp_path, sets):
    b = _tokenise(tmp_path, 40, "b")
    a = sets["a"]
    with pytest.raises(Exception, match="different vocab"):
        ShardData.build(LMDataConfig(source="shards", shards=f"{a.directory}:3,{b.directory}:1"))
    # Tokenised with one vocabulary, the two sets mix 3 : 1.
    run(configlib.from_dict(TokenizeConfig, {"source": "jsonl", "input": str(tmp_path / "b.jsonl"),
                                             "out_dir": str(tmp_path / "b2"), "progress": False,
                                             "vocab_dir": str(a.vocab_dir)}))
    b2 = ShardSet(tmp_path / "b2")
    names = _names(document_stream([a, b2], [3, 1], 0, 0, 1), 400)
    share = Counter(n.split(":")[0].endswith("a.jsonl") for n in names)[True] / 400
    assert 0.7 < share < 0.8
    assert parse_mixture(f"{a.directory}:3,{b2.directory}") == [(str(a.directory), 3.0), (str(b2.directory), 1.0)]


def test_shard_data_rows_split_over_processes(sets):
    data = ShardData.build(LMDataConfig(source="shards", shards=str(sets["a"].directory),
                                        eval_shards=str(sets["a"].directory), eval_batches=2,
                                        sequence=dataclasses.replace(LMDataConfig().sequence, seq_len=64,
                                                                     overlong="split")))
    local = data.train_iterator(4, 1, 2).next_local()
    assert local["tokens"].shape == (2, 64) and data.image_tokenizer.codes_per_image == 16
    ev = data.eval_local_batches(4)
    assert len(ev) == 2 and ev[0]["tokens"].shape == (4, 64)
    with pytest.raises(ValueError, match="does not split"):
        data.train_iterator(3, 0, 2)

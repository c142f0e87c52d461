"""train.tokenize: every source to array_record shards; bad pictures reported; atomic shards; restarts; processes."""

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from chameleon_jax import configlib
from chameleon_jax.data import DataError, Document, Segment, write_jsonl
from chameleon_jax.data.shards import ShardError, ShardSet, read_records
from chameleon_jax.sequence import IMAGE
from chameleon_jax.vocab import Vocabulary
from train.tokenize import BadDocumentsError, TokenizeConfig, run

REPO = Path(__file__).resolve().parents[1]


def _cfg(**kw) -> TokenizeConfig:
    base = {"progress": False, "image_size": 32, "grid_cells": 4, "text_vocab_size": 64, "docs_per_shard": 4}
    return configlib.from_dict(TokenizeConfig, {**base, **kw})


def _picture_folder(root: Path, n: int, bad: bool = False) -> Path:
    rng = np.random.default_rng(0)
    (root / "sub").mkdir(parents=True)
    for i in range(n):
        folder = root / "sub" if i % 2 else root
        Image.fromarray(rng.integers(0, 256, (40 + i, 50, 3), dtype=np.uint8)).save(folder / f"p{i:02d}.png")
        (folder / f"p{i:02d}.txt").write_text(f"picture {i} of coloured noise\n")
    if bad:
        (root / "broken.jpg").write_bytes(b"not a jpeg at all")
        (root / "broken.txt").write_text("a broken picture")
    return root


def _texts(shard_set: ShardSet, vocab: Vocabulary) -> list[str]:
    docs = read_records(shard_set.paths)
    return [vocab.decode_text([i for i in d.ids if not vocab.image_token_mask[i]]) for d in docs]


def test_folder_pairs_tokenise_and_a_corrupt_picture_is_reported_by_name(tmp_path):
    folder = _picture_folder(tmp_path / "pics", 6, bad=True)
    out = tmp_path / "tok"
    with pytest.raises(BadDocumentsError, match="broken.jpg"):
        run(_cfg(source="folder", input=str(folder), out_dir=str(out)))
    report = json.loads((out / "report-00000-of-00001.json").read_text())
    assert report["bad_documents"] == 1 and report["documents"] == 6
    assert report["bad"][0]["file"].endswith("broken.jpg") and "cannot decode" in report["bad"][0]["reason"]
    with pytest.raises(ShardError, match="no manifest"):
        ShardSet(out)  # an unfinished folder is never read

    run(_cfg(source="folder", input=str(folder), out_dir=str(out), skip_bad=True))
    shards = ShardSet(out)
    assert len(shards) == 6 and shards.images == 6 and len(shards.paths) == 2
    vocab = Vocabulary.load(shards.vocab_dir)
    docs = read_records(shards.paths)
    assert sorted(Path(d.name).name for d in docs) == [f"p{i:02d}.png" for i in range(6)]
    for d in docs:  # captioning: <bos> <boi> 16 codes <eoi> caption <eos>, the picture a prompt
        assert d.ids[1] == vocab.boi_id and d.ids[18] == vocab.eoi_id and (d.modality[2:19] == IMAGE).all()
        assert (d.weights[:19] == 0).all() and (d.weights[19:] == 1).all()
    assert sorted(_texts(shards, vocab)) == sorted(f"picture {i} of coloured noise" for i in range(6))


def test_jsonl_documents_tokenise_with_prompt_weights(tmp_path):
    rng = np.random.default_rng(1)
    docs = [
        Document((Segment(text="draw a square", is_target=False),
                  Segment(image=rng.integers(0, 256, (32, 32, 3), np.uint8))), "t2i"),
        Document((Segment(text="just some text"),)),
        Document((Segment(image=rng.integers(0, 256, (64, 48, 3), np.uint8), is_target=False), Segment(text="noise"))),
    ]
    write_jsonl(docs, tmp_path / "d" / "docs.jsonl")
    run(_cfg(source="jsonl", input=str(tmp_path / "d" / "docs.jsonl"), out_dir=str(tmp_path / "tok")))
    shards = ShardSet(tmp_path / "tok")
    recs = read_records(shards.paths)
    assert [r.name.rsplit(":", 1)[1] for r in recs] == ["1", "2", "3"]
    vocab = Vocabulary.load(shards.vocab_dir)
    t2i = recs[0]
    assert (t2i.weights[vocab.image_token_mask[t2i.ids]] == 1).all()  # the picture is the target
    assert shards.images == 2 and _texts(shards, vocab)[1] == "just some text"


@functools.cache  # TFDS registers a builder class by name, once per process
def _tiny_tfds_builder():
    import tensorflow_datasets as tfds

    class TinyPairs(tfds.core.GeneratorBasedBuilder):
        """Six 20x30 pictures with captions (array_record, readable without TensorFlow)."""

        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "picture": tfds.features.Tensor(shape=(20, 30, 3), dtype=np.uint8),
                "meta": tfds.features.FeaturesDict({"captions": tfds.features.Sequence(tfds.features.Text())}),
            }), disable_shuffling=True)

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i in range(6):
                image = np.full((20, 30, 3), 40 * i, np.uint8)
                yield i, {"picture": image, "meta": {"captions": [f"grey level {i}", "unused"]}}

    return TinyPairs


def test_tfds_pairs_tokenise_with_a_nested_text_feature(tmp_path):
    builder = _tiny_tfds_builder()(data_dir=str(tmp_path / "tfds"), file_format="array_record")
    builder.download_and_prepare()
    run(_cfg(source="tfds", input="tiny_pairs", tfds_data_dir=str(tmp_path / "tfds"), tfds_image="picture",
             tfds_text="meta/captions", pairs_as="both", out_dir=str(tmp_path / "tok")))
    shards = ShardSet(tmp_path / "tok")
    assert len(shards) == 12 and shards.images == 12  # a caption and a text-to-image document each
    manifest = json.loads((tmp_path / "tok" / "manifest-00000-of-00001.json").read_text())
    assert manifest["rates"]["pictures_encoded"] == 6  # each picture once for its two documents
    texts = _texts(shards, Vocabulary.load(shards.vocab_dir))
    assert sorted(set(texts)) == sorted(f"grey level {i}" for i in range(6))
    with pytest.raises(DataError, match=r"picture feature: no feature 'image' .*\['meta', 'picture'\]"):
        run(_cfg(source="tfds", input="tiny_pairs", tfds_data_dir=str(tmp_path / "tfds"), out_dir=str(tmp_path / "t2")))


def test_shapes_mixture_tokenises_as_one_source(tmp_path):
    run(_cfg(source="shapes", shapes_docs=12, shapes_examples=16, shapes_backend="generate", interleaved_docs=4,
             out_dir=str(tmp_path / "tok")))
    shards = ShardSet(tmp_path / "tok")
    assert len(shards) == 12 and len(shards.paths) == 3 and shards.images >= 12
    manifest = json.loads((tmp_path / "tok" / "manifest-00000-of-00001.json").read_text())
    assert manifest["source"].startswith("shapes-train-32-16") and manifest["tokenizer"]["fingerprint"] == "grid4x4"


def test_shapes_pictures_shared_by_documents_are_encoded_once_and_give_the_same_records(tmp_path):
    kw = dict(source="shapes", shapes_docs=60, shapes_examples=8, shapes_backend="generate", interleaved_docs=2)
    run(_cfg(**kw, out_dir=str(tmp_path / "memo")))
    run(_cfg(**kw, out_dir=str(tmp_path / "plain"), code_memo_mib=0))
    memo = json.loads((tmp_path / "memo" / "manifest-00000-of-00001.json").read_text())
    plain = json.loads((tmp_path / "plain" / "manifest-00000-of-00001.json").read_text())
    assert plain["rates"]["pictures_encoded"] == plain["images"] == memo["images"]
    # 8 example pictures and the 2 interleaved documents' pictures, each encoded once.
    assert memo["rates"]["pictures_encoded"] < memo["images"] and memo["rates"]["pictures_encoded"] <= 8 + 2 * 8
    for a, b in zip(read_records(ShardSet(tmp_path / "memo").paths), read_records(ShardSet(tmp_path / "plain").paths)):
        np.testing.assert_array_equal(a.ids, b.ids)
        np.testing.assert_array_equal(a.weights, b.weights)


def test_code_memo_drops_the_least_recently_used_codes_past_its_budget():
    from chameleon_jax.data.picture_codes import CodeMemo

    memo = CodeMemo(budget_bytes=2 * 16)  # two pictures of 4 int32 codes
    a, b, c = (np.full((2, 2), v, np.int32) for v in (1, 2, 3))
    memo.put("a", a), memo.put("b", b)
    assert memo.get("a") is a  # "a" is now the most recent
    memo.put("c", c)
    assert memo.get("b") is None and memo.get("a") is a and memo.get("c") is c


def test_processes_write_disjoint_shards_whose_union_is_the_source(tmp_path):
    folder = _picture_folder(tmp_path / "pics", 7)
    for p in (0, 1):
        run(_cfg(source="folder", input=str(folder), out_dir=str(tmp_path / "tok"), num_processes=2, process_id=p,
                 docs_per_shard=2))
    shards = ShardSet(tmp_path / "tok")
    names = [Path(d.name).name for d in read_records(shards.paths)]
    assert sorted(names) == [f"p{i:02d}.png" for i in range(7)] and len(shards) == 7
    mine = [Path(d.name).name for d in read_records([p for p in shards.paths if "-00001-of-" in p.name])]
    assert len(mine) == 3  # documents 1, 3, 5 of the (sorted) source


def test_a_shard_killed_mid_write_is_redone_and_finished_ones_are_kept(tmp_path):
    folder = _picture_folder(tmp_path / "pics", 10)
    out = tmp_path / "tok"
    # A child process that dies (no cleanup, like a kill) after the 2nd record of the second shard.
    script = f"""
import os, train.tokenize as t
from chameleon_jax.data import shards
real, n = shards.encode_record, [0]
def dying(doc):
    n[0] += 1
    if n[0] == 6:
        os._exit(9)
    return real(doc)
shards.encode_record = dying
t.main(["source=folder", "input={folder}", "out_dir={out}", "progress=false", "image_size=32", "grid_cells=4",
        "text_vocab_size=64", "docs_per_shard=4"])
"""
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 9, proc.stderr[-2000:]
    first, second = out / "shard-00000-of-00001-00000.array_record", out / "shard-00000-of-00001-00001.array_record"
    assert first.is_file() and not second.exists()
    assert second.with_name(second.name + ".tmp").exists()  # the half-written file, under its temporary name
    with pytest.raises(ShardError):
        ShardSet(out)
    before = first.stat().st_mtime_ns

    run(_cfg(source="folder", input=str(folder), out_dir=str(out)))
    assert first.stat().st_mtime_ns == before  # the finished shard was kept as it was
    shards = ShardSet(out)
    names = sorted(Path(d.name).name for d in read_records(shards.paths))
    assert names == [f"p{i:02d}.png" for i in range(10)]
    assert not list(out.glob("*.tmp"))

    with pytest.raises(ShardError, match="other settings"):
        run(_cfg(source="folder", input=str(folder), out_dir=str(out), docs_per_shard=5))


def test_pictures_encode_split_over_every_local_device_as_one_call_does(tmp_path):
    import jax
    from flax import nnx

    import vqvae
    from chameleon_jax.data.picture_codes import PictureEncoder, fit_picture

    tok = vqvae.Tokenizer(vqvae.VQModel(vqvae.VQ_PRESETS["tiny"](), rngs=nnx.Rngs(0)))
    enc = PictureEncoder(tok, batch=5)
    assert enc.batch % jax.local_device_count() == 0 and enc.image_size == 16
    rng = np.random.default_rng(0)
    pictures = [fit_picture(rng.integers(0, 256, (20, 30 + i, 3), dtype=np.uint8), 16) for i in range(11)]
    codes = enc.encode(pictures)
    assert codes.shape == (11, 4, 4) and codes.dtype == np.int32
    np.testing.assert_array_equal(codes, np.asarray(tok.encode(np.stack(pictures))))

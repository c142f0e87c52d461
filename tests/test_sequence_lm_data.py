"""The LM input pipeline end to end on data: Shapes and JSON Lines sources, vocabulary, code cache."""

import json

import numpy as np
import pytest
from PIL import Image

from chameleon_jax import configlib
from chameleon_jax.lm_data import LMData, LMDataConfig
from chameleon_jax.sequence import IMAGE, TEXT, OverlongDocumentError


def _shapes_cfg(tmp_path, **kw):
    cfg = configlib.from_dict(LMDataConfig, {
        "shapes_backend": "generate", "train_examples": 32, "eval_examples": 16, "interleaved_docs": 8,
        "vocab_corpus_docs": 200, "grid_cells": 4, "cache_dir": str(tmp_path / "cache"), "eval_batches": 1,
    })
    return configlib.from_dict(LMDataConfig, {**configlib.to_dict(cfg), **kw})


def test_shapes_pipeline_builds_vocab_caches_codes_and_packs(tmp_path):
    cfg = _shapes_cfg(tmp_path, sequence={"seq_len": 128, "overlong": "split"})
    data = LMData.build(cfg, run_dir=tmp_path / "run")
    v = data.vocab
    assert (tmp_path / "run" / "vocab" / "vocab.json").exists()
    assert v.codebook_size == 4 ** 3
    caches = list((tmp_path / "cache").glob("codes-*.npz"))
    assert len(caches) == 1

    batch = data.train_iterator(4).next_local()
    assert batch["tokens"].shape == (4, 128)
    toks, w, mod = batch["tokens"], batch["loss_weights"], batch["modality"]
    image_targets = batch["targets"][mod == IMAGE]  # codes and the closing <eoi>
    assert (v.image_token_mask[image_targets] | (image_targets == v.eoi_id)).all()
    assert not v.image_token_mask[batch["targets"][(mod == TEXT) & (batch["segment_ids"] > 0)]].any()
    assert (toks == v.boi_id).any() and (w > 0).any() and (w == 0).any()
    assert data.codes.misses == 0

    # A second build reuses the vocabulary and the code cache (same ids, no re-encoding).
    again = LMData.build(cfg, run_dir=tmp_path / "run")
    assert again.vocab.fingerprint() == v.fingerprint()
    assert list((tmp_path / "cache").glob("codes-*.npz")) == caches
    np.testing.assert_array_equal(again.train_iterator(4).next_local()["tokens"], toks)
    assert len(again.eval_local_batches(4)) == 1


def test_jsonl_pipeline_masks_prompts_and_names_overlong_documents(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    for i, colour in enumerate([(255, 0, 0), (0, 0, 255)]):
        Image.new("RGB", (16, 16), colour).save(folder / f"im{i}.png")
    lines = [
        {"segments": [{"image": "im0.png", "target": False}, {"text": "a red picture"}], "task": "caption"},
        {"segments": [{"text": "draw blue", "target": False}, {"image": "im1.png"}], "task": "t2i"},
        {"segments": [{"text": "a blue picture " * 40}]},
    ]
    (folder / "train.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    cfg = configlib.from_dict(LMDataConfig, {
        "source": "jsonl", "jsonl_train": str(folder / "train.jsonl"), "grid_cells": 2,
        "cache_dir": str(tmp_path / "cache"), "sequence": {"seq_len": 48, "overlong": "error"},
    })
    data = LMData.build(cfg, run_dir=tmp_path / "run")
    it = data.train_iterator(2)
    with pytest.raises(OverlongDocumentError, match=r"train\.jsonl.*document=3"):
        for _ in range(3):
            it.next_local()

    enc = data.encode(data.train_source, [i for i in range(3) if data.train_source.document(i).task == "caption"][0])
    v = data.vocab
    boi = enc.ids.tolist().index(v.boi_id)
    assert (enc.weights[: boi + 6] == 0).all()  # <bos>, the prompt picture (2x2 codes) and its markers
    assert enc.ids[boi + 5] == v.eoi_id and (enc.weights[boi + 6 :] == 1).all()


def test_two_object_share_reweights_training_t2i_and_vqa_only(tmp_path):
    from chameleon_jax.lm_data import shapes_source

    def share(cfg, split, tasks=("t2i", "vqa")):
        src = shapes_source(cfg, split, seed=0)
        docs = [src.document(i) for i in range(600)]
        return np.mean([len(d.meta["objects"]) == 2 for d in docs if d.task in tasks])

    kw = dict(train_examples=200, interleaved_weight=0.0, image_size=32)
    base = _shapes_cfg(tmp_path, **kw)
    skewed = _shapes_cfg(tmp_path, **kw, two_object_share=0.9)
    assert 0.5 < share(base, "train") < 0.7
    assert share(skewed, "train") > 0.85
    assert share(skewed, "validation") < 0.75  # the eval split keeps its own mix
    assert 0.5 < share(skewed, "train", tasks=("caption",)) < 0.7  # and so do captions
    only_two = _shapes_cfg(tmp_path, **kw, two_object_share=1.0)
    assert share(only_two, "train") == 1.0
    with pytest.raises(ValueError, match="two_object_share=0.3"):
        shapes_source(_shapes_cfg(tmp_path, **kw, two_object_share=0.3), "train", seed=0)


def test_shapes_image_size_follows_the_tokenizer_and_names_a_mismatch(tmp_path):
    from types import SimpleNamespace

    from chameleon_jax.lm_data import ColourGridTokenizer, shapes_image_size

    tok32 = SimpleNamespace(image_size=32)
    assert shapes_image_size(_shapes_cfg(tmp_path), tok32, "runs/vq") == 32
    assert shapes_image_size(_shapes_cfg(tmp_path, image_size=32), tok32, "runs/vq") == 32
    assert shapes_image_size(_shapes_cfg(tmp_path), ColourGridTokenizer(), "") == 64
    with pytest.raises(ValueError, match=r"data.image_size=64 .* runs/vq reads 32 px"):
        shapes_image_size(_shapes_cfg(tmp_path, image_size=64), tok32, "runs/vq")

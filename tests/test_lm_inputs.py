"""What train.lm reads: Shapes and JSON Lines documents tokenised into the run once, then packed through grain."""

import json

import numpy as np
import pytest
from PIL import Image

from chameleon_jax import configlib
from chameleon_jax.data.grain_pipeline import ShardData
from chameleon_jax.data.shards import decode_record
from chameleon_jax.data import shapes
from chameleon_jax.lm_data import LMDataConfig
from chameleon_jax.sequence import IMAGE, TEXT, OverlongDocumentError
from train import lm_config
from train.lm_inputs import prepare


def _train_cfg(tmp_path, steps=4, **data):
    base = {"shapes_backend": "generate", "train_examples": 32, "eval_examples": 16, "interleaved_docs": 8,
            "vocab_corpus_docs": 200, "grid_cells": 4, "eval_batches": 1}
    cfg = lm_config.tiny()
    cfg = configlib.from_dict(type(cfg), {**configlib.to_dict(cfg), "steps": steps, "batch_size": 4,
                                          "run_dir": str(tmp_path / "run"), "progress": False})
    d = configlib.from_dict(LMDataConfig, {**configlib.to_dict(cfg.data), **base, **data})
    return configlib.from_dict(type(cfg), {**configlib.to_dict(cfg), "data": configlib.to_dict(d)})


def _shard_data(cfg, run):
    return ShardData.build(prepare(cfg, run), vq_dir=cfg.vq_dir)


def test_shapes_documents_are_tokenised_into_the_run_once_and_packed(tmp_path):
    cfg = _train_cfg(tmp_path, sequence={"seq_len": 128, "overlong": "split"})
    run = tmp_path / "run"
    data_cfg = prepare(cfg, run)
    assert data_cfg.source == "shards" and data_cfg.shards == str(run / "tokens" / "train")
    assert (run / "tokens" / "train" / "vocab" / "vocab.json").exists()
    data = ShardData.build(data_cfg)
    v = data.vocab
    assert v.codebook_size == 4 ** 3
    # The draw covers one pass of the run: steps x batch rows of seq_len tokens.
    manifest = json.loads((run / "tokens" / "train" / "manifest-00000-of-00001.json").read_text())
    assert manifest["tokens"] >= cfg.steps * cfg.batch_size * 128

    batch = data.train_iterator(4).next_local()
    assert batch["tokens"].shape == (4, 128)
    toks, w, mod = batch["tokens"], batch["loss_weights"], batch["modality"]
    image_targets = batch["targets"][mod == IMAGE]  # codes and the closing <eoi>
    assert (v.image_token_mask[image_targets] | (image_targets == v.eoi_id)).all()
    assert not v.image_token_mask[batch["targets"][(mod == TEXT) & (batch["segment_ids"] > 0)]].any()
    assert (toks == v.boi_id).any() and (w > 0).any() and (w == 0).any()
    assert len(data.eval_local_batches(4)) == 1

    # A second run over the same folder reuses the shards (nothing rewritten): same vocabulary, same batches.
    shard = next((run / "tokens" / "train").glob("shard-*.array_record"))
    written = shard.stat().st_mtime_ns
    again = _shard_data(cfg, run)
    assert shard.stat().st_mtime_ns == written
    assert again.vocab.fingerprint() == v.fingerprint()
    np.testing.assert_array_equal(again.train_iterator(4).next_local()["tokens"], toks)
    # Settings of how the work is done (tokenize.HOW_ONLY) do not make it other data.
    path = run / "tokens" / "train" / "manifest-00000-of-00001.json"
    manifest["config"].update(chunk_docs=256, decode_threads=4)
    path.write_text(json.dumps(manifest))
    prepare(configlib.apply_overrides(cfg, ["progress=true"]), run)
    assert shard.stat().st_mtime_ns == written
    # A longer run over the same folder keeps the tokenised set (and reads it again in a new order).
    assert _shard_data(configlib.apply_overrides(cfg, ["steps=40"]), run).train_sets[0].directory == shard.parent


def test_a_run_folder_tokenised_with_other_settings_is_named_not_reused(tmp_path):
    cfg = _train_cfg(tmp_path)
    prepare(cfg, tmp_path / "run")
    other = configlib.apply_overrides(cfg, ["data.caption_weight=3.0"])
    with pytest.raises(configlib.ConfigError, match=r"tokens/train holds training documents .*caption_weight"):
        prepare(other, tmp_path / "run")


def test_jsonl_documents_mask_prompts_and_an_overlong_one_is_named(tmp_path):
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
    cfg = _train_cfg(tmp_path, source="jsonl", jsonl_train=str(folder / "train.jsonl"), grid_cells=2,
                     sequence={"seq_len": 48, "overlong": "error"})
    data = _shard_data(cfg, tmp_path / "run")
    source = data.train_sets[0].data_source()
    docs = {d.name: d for d in (decode_record(source[i]) for i in range(3))}
    assert len(docs) == 3 and not data.eval_sets
    caption = next(d for name, d in docs.items() if name.endswith(":1"))
    v = data.vocab
    boi = caption.ids.tolist().index(v.boi_id)
    assert (caption.weights[: boi + 6] == 0).all()  # <bos>, the prompt picture (2x2 codes) and its markers
    assert caption.ids[boi + 5] == v.eoi_id and (caption.weights[boi + 6:] == 1).all()
    it = data.train_iterator(2)
    with pytest.raises(OverlongDocumentError, match=r"train\.jsonl:3"):
        for _ in range(3):
            it.next_local()


def test_two_object_share_reweights_training_t2i_and_vqa_only():
    from chameleon_jax.data.shapes.mixture import ShapesMixture

    def share(split, two_object_share=0.0, tasks=("t2i", "vqa")):
        src = ShapesMixture(split, 32, {"caption": 1, "t2i": 1, "vqa": 1}, examples=200, backend="generate",
                            two_object_share=two_object_share)
        docs = [src.document(i) for i in range(600)]
        return np.mean([len(d.meta["objects"]) == 2 for d in docs if d.task in tasks])

    assert 0.5 < share("train") < 0.7
    assert share("train", 0.9) > 0.85
    assert 0.5 < share("train", 0.9, tasks=("caption",)) < 0.7  # captions keep the split's mix
    assert share("train", 1.0) == 1.0
    with pytest.raises(ValueError, match="two_object_share=0.3"):
        share("train", 0.3)


def test_partial_prompt_share_reaches_training_t2i_prompts_only(tmp_path):
    from chameleon_jax.data.shapes.mixture import ShapesMixture
    from train.lm_inputs import tokenize_configs
    from train.tokenize import shapes_mixture

    def partial(share):
        src = ShapesMixture("train", 32, {"caption": 1, "t2i": 1, "vqa": 1}, examples=200, backend="generate",
                            partial_prompt_share=share)
        docs = [src.document(i) for i in range(300)]
        t2i = [shapes.parse_caption(d.segments[0].text) is None for d in docs if d.task == "t2i"]
        captions = [shapes.parse_caption(d.segments[1].text) is None for d in docs if d.task == "caption"]
        assert t2i and captions and not any(captions)  # captions always name everything
        return np.mean(t2i)

    assert partial(0.0) == 0.0
    assert 0.3 < partial(0.3) < 0.65  # a two-object prompt is partial when either object is
    assert partial(1.0) == 1.0
    train, val = tokenize_configs(_train_cfg(tmp_path, partial_prompt_share=0.3), tmp_path / "run")
    assert train.partial_prompt_share == 0.3 and val.partial_prompt_share == 0.0
    assert shapes_mixture(train, 32)._partial_share == 0.3


def test_validation_documents_keep_their_split_mix_and_share_the_vocabulary(tmp_path):
    from train.lm_inputs import tokenize_configs

    cfg = _train_cfg(tmp_path, two_object_share=0.9)
    train, val = tokenize_configs(cfg, tmp_path / "run")
    assert train.two_object_share == 0.9 and val.two_object_share == 0.0
    assert val.shapes_split == "validation" and val.seed == train.seed + 1
    assert val.vocab_dir == str(tmp_path / "run" / "tokens" / "train" / "vocab")


def test_shapes_image_size_follows_the_tokenizer_and_names_a_mismatch():
    from types import SimpleNamespace

    from chameleon_jax.data.grid_tokenizer import ColourGridTokenizer
    from chameleon_jax.lm_data import shapes_image_size

    tok32 = SimpleNamespace(image_size=32)
    assert shapes_image_size(LMDataConfig(), tok32, "runs/vq") == 32
    assert shapes_image_size(LMDataConfig(image_size=32), tok32, "runs/vq") == 32
    assert shapes_image_size(LMDataConfig(), ColourGridTokenizer(), "") == 64
    with pytest.raises(ValueError, match=r"data.image_size=64 .* runs/vq reads 32 px"):
        shapes_image_size(LMDataConfig(image_size=64), tok32, "runs/vq")


def test_position_question_weight_reaches_training_vqa_only(tmp_path):
    from chameleon_jax.data.shapes.mixture import ShapesMixture
    from train.lm_inputs import tokenize_configs
    from train.tokenize import shapes_mixture

    def position_share(weight):
        src = ShapesMixture("train", 32, {"caption": 1, "vqa": 3}, examples=200, backend="generate",
                            position_question_weight=weight)
        docs = [src.document(i) for i in range(400)]
        types = [d.meta["question_type"] for d in docs if d.task == "vqa"]
        return np.mean([t == "position" for t in types]), docs

    uniform, docs = position_share(1.0)
    default = ShapesMixture("train", 32, {"caption": 1, "vqa": 3}, examples=200, backend="generate")
    assert [d.segments[0].text for d in docs[:50]] == [default.document(i).segments[0].text for i in range(50)]
    assert 0.15 < uniform < 0.3  # one of an object's four questions, after the count question's tenth
    assert position_share(3.0)[0] > uniform + 0.2  # 3/6 of an object's questions: about 0.45
    with pytest.raises(ValueError, match="position_question_weight=0"):
        position_share(0.0)
    train, val = tokenize_configs(_train_cfg(tmp_path, position_question_weight=3.0), tmp_path / "run")
    assert train.position_question_weight == 3.0 and val.position_question_weight == 1.0
    assert shapes_mixture(train, 32)._position_weight == 3.0

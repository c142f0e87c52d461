"""Bad input to the trainers: one line on stderr naming what is wrong, exit status 2, no traceback, nothing written."""

import json

import jax
import numpy as np
import pytest
from PIL import Image

from train import lm as train_lm
from train import vqvae as train_vq

LM_SMALL = ["preset=tiny", "batch_size=8", "data.sequence.seq_len=128", "data.eval_split=", "peak_flops=1e12",
            "progress=false", "data.train_examples=64", "data.interleaved_docs=16", "data.vocab_corpus_docs=200"]


def _fails(main, argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith(("error:", "config error:"))]
    assert len(lines) == 1, err
    return lines[0]


def test_lm_refuses_steps_below_one(tmp_path, capsys):
    line = _fails(train_lm.main, [*LM_SMALL, f"run_dir={tmp_path / 'run'}", "steps=-5"], capsys)
    assert "steps must be >= 1, got -5" in line
    assert not (tmp_path / "run").exists()


def test_lm_refuses_a_batch_the_data_axes_cannot_split(tmp_path, capsys):
    assert jax.device_count() == 8
    mesh = ["mesh.data=2", "mesh.fsdp=1", "mesh.tensor=-1"]
    line = _fails(train_lm.main, [*LM_SMALL, *mesh, f"run_dir={tmp_path / 'run'}", "batch_size=7"], capsys)
    assert "batch_size=7 does not split over the data axes data=2" in line and "multiple of 2" in line
    assert not (tmp_path / "run").exists()


def test_lm_shards_without_a_manifest_are_one_line(tmp_path, capsys):
    (tmp_path / "tok").mkdir()
    argv = [*LM_SMALL, f"run_dir={tmp_path / 'run'}", "data.source=shards", f"data.shards={tmp_path / 'tok'}"]
    line = _fails(train_lm.main, argv, capsys)
    assert str(tmp_path / "tok") in line and "manifest" in line
    assert not (tmp_path / "run").exists()


def _picture(path, h=16, w=16):
    Image.fromarray(np.full((h, w, 3), 100, np.uint8)).save(path)


def _write_jsonl(folder, case):
    _picture(folder / "ok.png")
    docs = [{"segments": [{"text": "a red square"}, {"image": "ok.png"}]}]
    if case == "missing image":
        docs.append({"segments": [{"text": "x"}, {"image": "nope.png"}]})
    elif case == "corrupt image":
        (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
        docs.append({"segments": [{"image": "broken.png"}]})
    elif case == "wrong key":
        docs.append({"segments": [{"txt": "x"}]})
    lines = [json.dumps(d) for d in docs]
    if case == "malformed JSON":
        lines.append('{"segments": [{"text": "x"}]')
    (folder / "docs.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "docs.jsonl"


@pytest.mark.parametrize("case, message", [
    ("missing image", r"docs\.jsonl:2: segment 1: image 'nope\.png' not found"),
    ("corrupt image", r"docs\.jsonl:2: segment 0: cannot decode image .*broken\.png"),
    ("wrong key", r"docs\.jsonl:2: segment 0: unknown segment key\(s\) \['txt'\]"),
    ("malformed JSON", r"docs\.jsonl:2: invalid JSON"),
    ("missing file", r"JSON Lines file not found: .*absent\.jsonl"),
])
def test_lm_data_errors_name_the_file_and_line(tmp_path, capsys, case, message):
    path = tmp_path / "absent.jsonl" if case == "missing file" else _write_jsonl(tmp_path, case)
    argv = [*LM_SMALL, f"run_dir={tmp_path / 'run'}", "data.source=jsonl", f"data.jsonl_train={path}",
            "steps=2"]
    line = _fails(train_lm.main, argv, capsys)
    assert line.startswith("error: ") and __import__("re").search(message, line), line
    assert not (tmp_path / "run").exists()


VQ_SMALL = ["preset=tiny", "tensorboard=false", "progress=false"]


def test_vqvae_refuses_steps_below_one(tmp_path, capsys):
    line = _fails(train_vq.main, [*VQ_SMALL, f"run_dir={tmp_path / 'run'}", "steps=0"], capsys)
    assert "steps must be >= 1, got 0" in line and not (tmp_path / "run").exists()


def test_vqvae_missing_picture_folder(tmp_path, capsys):
    argv = [*VQ_SMALL, f"run_dir={tmp_path / 'run'}", "data.source=folder", f"data.data_dir={tmp_path / 'none'}"]
    line = _fails(train_vq.main, argv, capsys)
    assert "no pictures" in line and f"under {tmp_path / 'none'}" in line and not (tmp_path / "run").exists()


def test_vqvae_corrupt_picture_is_named(tmp_path, capsys):
    pics = tmp_path / "pics"
    pics.mkdir()
    _picture(pics / "a.png")
    (pics / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    argv = [*VQ_SMALL, f"run_dir={tmp_path / 'run'}", "data.source=folder", f"data.data_dir={pics}"]
    line = _fails(train_vq.main, argv, capsys)
    assert f"cannot decode image {pics / 'b.png'}" in line and not (tmp_path / "run").exists()


def test_loading_a_missing_or_truncated_model_is_one_clear_error(tmp_path):
    from flax import nnx

    from chameleon_jax.checkpoint import CheckpointError, load_model, save_model
    from chameleon_jax.config import MODEL_PRESETS
    from chameleon_jax.pipeline import load_pipeline
    from chameleon_jax.transformer import Transformer

    with pytest.raises(FileNotFoundError, match=f"model folder {tmp_path / 'absent'} does not exist"):
        load_pipeline(tmp_path / "absent")
    cfg = MODEL_PRESETS["tiny"]()
    save_model(tmp_path / "model", Transformer(cfg, rngs=nnx.Rngs(0)), cfg)
    files = [p for p in (tmp_path / "model" / "params").rglob("d/*") if p.is_file()]
    biggest = max(files, key=lambda p: p.stat().st_size)
    with open(biggest, "r+b") as f:
        f.truncate(biggest.stat().st_size // 2)
    with pytest.raises(CheckpointError, match=f"cannot read the parameters in {tmp_path / 'model' / 'params'}"):
        load_model(tmp_path / "model")

"""What both trainers share: the run lock, crash-safe metrics, checkpoint fallback past damaged steps,
exit statuses; and the one image reader."""

import json
import logging
import os
import shutil
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from chameleon_jax.checkpoint import CheckpointError
from chameleon_jax.data import DataError, load_jsonl, read_image
from train import run as run_lib
from train.checkpointing import Checkpointer
from train.metrics import MetricsWriter, read_metrics, truncate_metrics
from train.runlock import LOCK_FILE, RunLock, RunLockedError


# --------------------------------------------------------------------------- lock


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_second_lock_on_a_folder_is_refused_naming_the_holder(tmp_path):
    with RunLock(tmp_path / "run"):
        with pytest.raises(RunLockedError, match=rf"in use by another training run \(process {os.getpid()} on host "
                                                 rf"{socket.gethostname()}, started"):
            RunLock(tmp_path / "run").acquire()
        holder = json.loads((tmp_path / "run" / LOCK_FILE).read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname() and holder["started"] > 0
    assert not (tmp_path / "run" / LOCK_FILE).exists()  # released at the end
    RunLock(tmp_path / "run").acquire().release()


def test_stale_lock_of_a_dead_process_is_taken_over_with_a_warning(tmp_path, caplog):
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": _dead_pid(), "host": socket.gethostname(), "started": 1.0}))
    with caplog.at_level(logging.WARNING, logger="train.run"):
        lock = RunLock(tmp_path).acquire()
    assert "taking over the stale lock" in caplog.text
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()
    # Another host's lock cannot be checked from here: it is respected.
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": _dead_pid(), "host": "elsewhere", "started": 1.0}))
    with pytest.raises(RunLockedError, match="on host elsewhere"):
        RunLock(tmp_path).acquire()


# --------------------------------------------------------------------------- metrics


def test_metrics_rows_after_the_restored_step_and_a_torn_line_are_dropped(tmp_path, caplog):
    with MetricsWriter(tmp_path, tensorboard=False) as w:
        for step in (1, 2, 3, 4):
            w.write(step, {"loss": float(step)})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "lo')  # killed inside a write
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4]  # readers skip the torn line
    with caplog.at_level(logging.WARNING, logger="train.run"):
        truncate_metrics(tmp_path, 2)
    assert "cut 1 torn" in caplog.text
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 2.0}\n'
    # A fresh start (no checkpoint yet: resume_step=0) forgets the rows of a run killed before its first checkpoint.
    with MetricsWriter(tmp_path, tensorboard=False, resume_step=0) as w:
        w.write(1, {"loss": 9.0})
    assert read_metrics(tmp_path) == [{"step": 1, "loss": 9.0}]


# --------------------------------------------------------------------------- checkpoints


def _abstract():
    return {"w": jax.ShapeDtypeStruct((32, 32), jnp.float32), "n": jax.ShapeDtypeStruct((), jnp.int32)}


def _two_steps(directory):
    ckpt = Checkpointer(directory, keep=3)
    for step in (2, 4):
        ckpt.save(step, {"w": jnp.full((32, 32), float(step)), "n": jnp.int32(step)}, {"data": {"pos": step}})
    ckpt.close()


def _truncate_data_file(step_dir):
    biggest = max((p for p in (step_dir / "state").rglob("d/*") if p.is_file()), key=lambda p: p.stat().st_size)
    with open(biggest, "r+b") as f:
        f.truncate(biggest.stat().st_size // 2)
    return "state/"


@pytest.mark.parametrize("damage", ["truncated data file", "missing metadata", "missing iterator state"])
def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog, damage):
    root = tmp_path / "checkpoints"
    _two_steps(root)
    if damage == "truncated data file":
        named = _truncate_data_file(root / "4")
    elif damage == "missing metadata":
        (root / "4" / "state" / "_METADATA").unlink()
        named = "state/_METADATA"
    else:
        shutil.rmtree(root / "4" / "extra")
        named = "extra/metadata"
    ckpt = Checkpointer(root)
    with caplog.at_level(logging.WARNING, logger="train.run"):
        step, state, extra = ckpt.restore_latest(_abstract(), required_extra=("data",))
    assert step == 2 and int(state["n"]) == 2 and extra == {"data": {"pos": 2}}
    line = next(r.getMessage() for r in caplog.records if "damaged" in r.getMessage())
    assert f"checkpoint step 4 is damaged: {root / '4' / named}" in line and "falling back to step 2" in line
    # The damaged step is moved aside, so the run can write step 4 again.
    assert ckpt.all_steps() == [2] and (tmp_path / "checkpoints.damaged" / "4").is_dir()
    ckpt.save(4, {"w": jnp.zeros((32, 32)), "n": jnp.int32(4)}, {"data": {"pos": 4}})
    ckpt.close()


def test_no_intact_checkpoint_is_one_clear_error(tmp_path):
    root = tmp_path / "checkpoints"
    _two_steps(root)
    (root / "4" / "state" / "_METADATA").unlink()
    shutil.rmtree(root / "2" / "extra")
    with pytest.raises(CheckpointError, match=r"no intact checkpoint in .*step 4 is damaged.*step 2 is damaged"):
        Checkpointer(root).restore_latest(_abstract(), required_extra=("data",))


def test_checkpoint_of_another_shape_is_an_error_not_a_fallback(tmp_path):
    root = tmp_path / "checkpoints"
    _two_steps(root)
    wrong = {"w": jax.ShapeDtypeStruct((16, 32), jnp.float32), "n": jax.ShapeDtypeStruct((), jnp.int32)}
    with pytest.raises(CheckpointError, match=r"checkpoint .*/4: tensor 'w' has shape \(32, 32\), the model expects \(16, 32\)"):
        Checkpointer(root).restore_latest(wrong)
    assert sorted(os.listdir(root)) == ["2", "4"]  # nothing moved aside


# --------------------------------------------------------------------------- exit statuses


@pytest.mark.parametrize("error, status", [
    (run_lib.TrainingDivergedError("diverged"), 1),
    (DataError("f.jsonl:3: invalid JSON"), 2),
    (CheckpointError("cannot read the parameters\n in x"), 2),
    (FileNotFoundError("model folder x does not exist"), 2),
    (RunLockedError("in use"), 3),
])
def test_command_line_failures_are_one_line_and_a_documented_status(capsys, error, status):
    def fail():
        raise error

    with pytest.raises(SystemExit) as exit_info:
        run_lib.guard(fail)
    assert exit_info.value.code == status
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


# --------------------------------------------------------------------------- images


def test_sixteen_bit_and_palette_pngs_decode_to_their_8_bit_values(tmp_path):
    gray16 = (np.arange(16, dtype=np.uint16) * 257 * 17).reshape(4, 4)  # 8-bit value v stored as v * 257
    Image.fromarray(gray16).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    np.testing.assert_array_equal(read_image(tmp_path / "g16.png")[..., 1], (gray16 // 257).astype(np.uint8))

    rgb = np.random.default_rng(0).integers(0, 256, (6, 6, 3)).astype(np.uint8)
    pal = Image.fromarray(rgb).quantize(colors=8)
    pal.save(tmp_path / "pal.png")
    np.testing.assert_array_equal(read_image(tmp_path / "pal.png"), np.asarray(pal.convert("RGB")))

    pal.info["transparency"] = 0  # palette entry 0 transparent: composited over white
    pal.save(tmp_path / "pal_t.png", transparency=0)
    got = read_image(tmp_path / "pal_t.png")
    idx = np.asarray(pal)
    assert (got[idx == 0] == 255).all() and (got[idx != 0] == np.asarray(pal.convert("RGB"))[idx != 0]).all()

    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not a picture")
    with pytest.raises(DataError, match=r"cannot decode image .*bad\.png"):
        read_image(tmp_path / "bad.png")


def test_mixed_picture_sizes_name_the_file_and_line(tmp_path):
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.zeros((8, 12, 3), np.uint8)).save(tmp_path / "b.png")
    lines = [{"segments": [{"image": "a.png"}, {"text": "x"}]}, {"segments": [{"text": "y"}, {"image": "b.png"}]}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert len(load_jsonl(tmp_path / "d.jsonl")) == 2  # the format itself allows any size
    with pytest.raises(DataError, match=r"d\.jsonl:2: picture 0 of the document is 12x8 pixels.*d\.jsonl:1\) is 8x8"):
        load_jsonl(tmp_path / "d.jsonl", one_size=True)

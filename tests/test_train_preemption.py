"""Stop signals end a run cleanly: SIGTERM between two periodic checkpoints saves that step and the resumed
run equals an uninterrupted one; two runs on one folder: exactly one trains; a second signal exits at once."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from chameleon_jax import configlib
from train import lm as train_lm
from train import vqvae as train_vq
from train.checkpointing import Checkpointer
from train.lm_config import tiny
from train.metrics import read_metrics
from train.runlock import LOCK_FILE

REPO = Path(__file__).resolve().parents[1]


def _start(module: str, args: list[str]) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    return subprocess.Popen([sys.executable, "-m", module, *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_rows(proc: subprocess.Popen, run_dir: Path, n: int, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while len(read_metrics(run_dir)) < n:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the run did not start training in time"
        time.sleep(0.05)


def _losses(run_dir: Path) -> dict[int, float]:
    rows = [r for r in read_metrics(run_dir) if "loss" in r]
    steps = [r["step"] for r in rows]
    assert len(steps) == len(set(steps)), f"steps logged more than once: {steps}"
    return {r["step"]: r["loss"] for r in rows}


def _final_tensors(run_dir: Path, step: int) -> list[np.ndarray]:
    import jax
    import orbax.checkpoint as ocp

    tree = ocp.StandardCheckpointer().restore((run_dir / "checkpoints" / str(step) / "state").absolute())
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _stop_with_sigterm(module: str, args: list[str], run_dir: Path, interval: int) -> int:
    """Starts the trainer, sends SIGTERM once it trains; checks the exit and the saved step, returns that step."""
    proc = _start(module, args)
    _wait_for_rows(proc, run_dir, 3)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 75, err[-3000:]
    assert "Traceback" not in err
    match = re.search(r"stopped by SIGTERM after step (\d+); checkpoint (\S+) written", err)
    assert match, err[-3000:]
    step = int(match.group(1))
    assert step % interval != 0  # between two periodic checkpoints
    assert Path(match.group(2)) == run_dir / "checkpoints" / str(step)
    ckpt = Checkpointer(run_dir / "checkpoints")
    assert ckpt.latest_step() == step
    ckpt.close()
    assert max(r["step"] for r in read_metrics(run_dir)) <= step
    assert not (run_dir / LOCK_FILE).exists()  # released on the way out
    return step


def _compare(straight: Path, resumed: Path, steps: int) -> None:
    a, b = _losses(straight), _losses(resumed)
    assert sorted(b) == list(range(1, steps + 1))
    assert [a[s] for s in sorted(a)] == [b[s] for s in sorted(b)]
    for x, y in zip(_final_tensors(straight, steps), _final_tensors(resumed, steps), strict=True):
        np.testing.assert_array_equal(x, y)


def _lm_args(run_dir, steps):
    return [f"run_dir={run_dir}", "batch_size=8", "data.sequence.seq_len=128",
            "log_interval=1", "checkpoint_interval=25", "eval_interval=0", "data.eval_split=", "peak_flops=1e12",
            "progress=false", "optim.warmup_steps=1", "optim.decay_steps=100", "data.train_examples=64",
            "data.interleaved_docs=16", "data.vocab_corpus_docs=200", f"steps={steps}"]


@pytest.mark.slow
def test_lm_sigterm_saves_the_step_in_flight_and_the_resumed_run_equals_an_uninterrupted_one(tmp_path):
    steps = 30
    resumed = tmp_path / "resumed"
    _stop_with_sigterm("train.lm", _lm_args(resumed, steps), resumed, interval=25)
    train_lm.run(configlib.apply_overrides(tiny(), _lm_args(resumed, steps)))
    straight = train_lm.run(configlib.apply_overrides(tiny(), _lm_args(tmp_path / "straight", steps)))
    _compare(straight, resumed, steps)


def _vq_args(run_dir, steps, *more):
    return ["preset=tiny", f"run_dir={run_dir}", f"steps={steps}", "checkpoint_every=25", "log_every=1",
            "tensorboard=false", "optim.decay_steps=100", "progress=false", *more]


def _vq_cfg(args):
    return configlib.from_cli(args, train_vq.PRESETS, "tiny")


def test_vqvae_sigterm_saves_the_step_in_flight_and_the_resumed_run_equals_an_uninterrupted_one(tmp_path):
    steps = 30
    resumed = tmp_path / "resumed"
    _stop_with_sigterm("train.vqvae", _vq_args(resumed, steps), resumed, interval=25)
    train_vq.run(_vq_cfg(_vq_args(resumed, steps)))
    straight = train_vq.run(_vq_cfg(_vq_args(tmp_path / "straight", steps)))
    _compare(straight, resumed, steps)


def test_two_runs_on_one_folder_only_one_trains_and_a_second_signal_exits_at_once(tmp_path, caplog):
    run_dir = tmp_path / "run"
    first = _start("train.vqvae", _vq_args(run_dir, 5000, "checkpoint_every=4000"))
    _wait_for_rows(first, run_dir, 2)
    second = _start("train.vqvae", _vq_args(run_dir, 5000))
    _, err = second.communicate(timeout=240)
    assert second.returncode == 3 and "Traceback" not in err
    assert f"is in use by another training run (process {first.pid} on host" in err
    assert first.poll() is None  # the first run trains on

    first.send_signal(signal.SIGTERM)
    first.send_signal(signal.SIGINT)
    _, err = first.communicate(timeout=240)
    assert first.returncode in (128 + signal.SIGINT, 128 + signal.SIGTERM), err[-3000:]
    assert "again: exiting at once without saving" in err
    assert not (run_dir / "checkpoints").exists() or not os.listdir(run_dir / "checkpoints")
    steps = [r["step"] for r in read_metrics(run_dir)]
    assert len(steps) == len(set(steps))  # one writer: each step once

    # The killed run left its lock behind: the next run on this host takes it over and starts afresh.
    assert (run_dir / LOCK_FILE).exists()
    with caplog.at_level("WARNING", logger="train.run"):
        train_vq.run(_vq_cfg(_vq_args(run_dir, 3)))
    assert f"taking over the stale lock {run_dir / LOCK_FILE} of process {first.pid}" in caplog.text
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3]

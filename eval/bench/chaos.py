"""Kill a training run at random moments and check that it ends as an uninterrupted one.

    python -m eval.bench.chaos trainer=vqvae kills=6
    python -m eval.bench.chaos trainer=lm kills=6 seed=1

Runs the trainer's `tiny` preset once straight through, then in a second folder starts
it, SIGKILLs it at a random moment (after 1-4 new metric rows, plus up to 0.3 s), and
restarts it, `kills` times; checkpoints are written every step, so most kills land
while one is being written. Then it lets the run finish and compares:

    kills_survived          restarts that resumed and went on
    kills_during_write      kills that left a checkpoint write unfinished
    losses_identical        every step's loss equal to the straight run's (bitwise)
    params_identical        the final checkpoint's tensors equal (bitwise)
    duplicate_rows          metric rows of a step logged more than once (must be 0)
    missing_rows            steps with no loss row (must be 0)

and prints them as JSON (also written to `out` when given).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Literal

import numpy as np

from chameleon_jax import configlib
from chameleon_jax.configlib import param

REPO = Path(__file__).resolve().parents[2]


@dataclasses.dataclass(frozen=True)
class ChaosConfig:
    """A kill -9 test of one trainer."""

    trainer: Literal["vqvae", "lm"] = param("vqvae", "which trainer: train.vqvae or train.lm (tiny presets)")
    kills: int = param(4, "how many times the run is killed before it may finish")
    steps: int = param(40, "training steps of the run")
    seed: int = param(0, "seed of the kill moments")
    work_dir: str = param("", "folder for the two runs (empty = a temporary folder, removed afterwards)")
    out: str = param("", "also write the figures to this JSON file")


def _args(trainer: str, run_dir: Path, cache: Path, steps: int) -> list[str]:
    common = [f"run_dir={run_dir}", f"steps={steps}", f"compilation_cache_dir={cache / 'xla'}", "progress=false"]
    if trainer == "vqvae":
        return ["preset=tiny", "checkpoint_every=1", "keep_checkpoints=2", "log_every=1", "tensorboard=false",
                "optim.decay_steps=100", *common]
    return ["preset=tiny", "checkpoint_interval=1", "keep_checkpoints=2", "log_interval=1", "eval_interval=0",
            "batch_size=8", "data.sequence.seq_len=128", "data.eval_split=", "peak_flops=1e12",
            "optim.warmup_steps=1", "optim.decay_steps=100", "data.train_examples=64", "data.interleaved_docs=16",
            "data.vocab_corpus_docs=200", *common]


def _start(trainer: str, args: list[str], log_path: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.setdefault("JAX_PLATFORMS", "cpu")
    log = open(log_path, "ab")
    return subprocess.Popen([sys.executable, "-m", f"train.{trainer}", *args], cwd=REPO, env=env,
                            stdout=log, stderr=subprocess.STDOUT)


def _rows(run_dir: Path) -> list[dict]:
    from train.metrics import read_metrics

    return read_metrics(run_dir)


def _losses(run_dir: Path) -> dict[int, list[float]]:
    out: dict[int, list[float]] = {}
    for r in _rows(run_dir):
        if "loss" in r:
            out.setdefault(int(r["step"]), []).append(r["loss"])
    return out


def _final_state(run_dir: Path, step: int) -> list[np.ndarray]:
    import jax
    import orbax.checkpoint as ocp

    tree = ocp.StandardCheckpointer().restore((run_dir / "checkpoints" / str(step) / "state").absolute())
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _writing(run_dir: Path) -> bool:
    """True when a checkpoint write was left unfinished (orbax's temporary folder, or a step without commit)."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return False
    return any("tmp" in p.name for p in root.iterdir())


def chaos(cfg: ChaosConfig) -> dict:
    work = Path(cfg.work_dir) if cfg.work_dir else Path(tempfile.mkdtemp(prefix="chaos-"))
    work.mkdir(parents=True, exist_ok=True)
    cache, straight, killed = work / "cache", work / "straight", work / "killed"
    rng = random.Random(cfg.seed)
    log = work / "log.txt"

    proc = _start(cfg.trainer, _args(cfg.trainer, straight, cache, cfg.steps), log)
    if proc.wait() != 0:
        raise RuntimeError(f"the straight run failed (exit {proc.returncode}); see {log}")

    survived = during_write = 0
    args = _args(cfg.trainer, killed, cache, cfg.steps)
    for _ in range(cfg.kills):
        before = len(_rows(killed))
        proc = _start(cfg.trainer, args, log)
        wanted = before + rng.randint(1, 4)
        while proc.poll() is None and len(_rows(killed)) < wanted:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.3))
        if proc.poll() is not None:  # finished (or failed) before the kill
            if proc.returncode != 0:
                raise RuntimeError(f"a restarted run failed (exit {proc.returncode}); see {log}")
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        survived += 1
        during_write += _writing(killed)
    proc = _start(cfg.trainer, args, log)
    if proc.wait() != 0:
        raise RuntimeError(f"the final restart failed (exit {proc.returncode}); see {log}")

    a, b = _losses(straight), _losses(killed)
    steps = range(1, cfg.steps + 1)
    sa, sb = _final_state(straight, cfg.steps), _final_state(killed, cfg.steps)
    figures = {
        "trainer": cfg.trainer,
        "steps": cfg.steps,
        "kills_survived": survived,
        "kills_during_write": during_write,
        "losses_identical": all(a.get(s) == b.get(s) and len(b.get(s, [])) == 1 for s in steps),
        "params_identical": len(sa) == len(sb) and all(np.array_equal(x, y) for x, y in zip(sa, sb)),
        "duplicate_rows": sum(len(v) - 1 for v in b.values() if len(v) > 1),
        "missing_rows": sum(1 for s in steps if s not in b),
        "work_dir": str(work),
    }
    if cfg.out:
        Path(cfg.out).write_text(json.dumps(figures, indent=2) + "\n")
    if not cfg.work_dir:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return figures


def main(argv=None) -> None:
    def go():
        cfg = configlib.from_cli(sys.argv[1:] if argv is None else argv, {"default": ChaosConfig}, "default")
        print(json.dumps(chaos(cfg), indent=2))

    configlib.main_guard(go)


if __name__ == "__main__":
    main()

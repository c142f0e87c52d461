"""Two processes with 4 CPU devices each train exactly like one process with 8.

The worker (tests/multiprocess_worker.py) trains the `tiny` LM preset with the project's
data pipeline, Trainer and distributed setup on a data=2, fsdp=2, tensor=2 mesh. The
processes join with `jax.distributed.initialize` (gloo collectives) and each reads only
its own data shard; the one-process run reads both shards. Collectives over gloo may
sum in another order than in-process ones, hence a float32 tolerance, not bit equality.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

WORKER = Path(__file__).with_name("multiprocess_worker.py")
TIMEOUT_S = 420


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # the worker sets its own device count
    env["JAX_PLATFORMS"] = "cpu"
    env["CHAMELEON_JAX_DATA"] = str(tmp_path / "data")
    env["PYTHONPATH"] = str(WORKER.parent.parent) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _start(tmp_path: Path, tag: str, extra: list[str]) -> tuple[subprocess.Popen, Path, Path]:
    out = tmp_path / f"{tag}.json"
    log = tmp_path / f"{tag}.log"
    cmd = [sys.executable, str(WORKER), "--out", str(out), "--steps", "3", "--run-dir", str(tmp_path / "run"), *extra]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=_env(tmp_path), cwd=tmp_path)
    return proc, out, log


def _finish(procs) -> list[dict]:
    """Waits for every worker; on failure or timeout kills the rest and shows each log's tail."""
    results, failed = [], []
    for proc, out, log in procs:
        try:
            rc = proc.wait(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            rc = "timeout"
        if rc != 0:
            failed.append((proc, log, rc))
        else:
            results.append(json.loads(out.read_text()))
    if failed:
        for proc, _, _ in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        report = "\n\n".join(
            f"--- worker {' '.join(p.args[2:])} exited with {rc}; log tail:\n{log.read_text()[-3000:]}"
            for p, log, rc in failed
        )
        pytest.fail(report)
    return results


@pytest.mark.slow
def test_two_processes_train_like_one_process_with_the_same_devices(tmp_path):
    # Runs first and alone: it also tokenises the documents (and trains the vocabulary) the others read.
    single = _finish([_start(tmp_path, "single", ["--num-processes", "1", "--local-devices", "8"])])[0]

    port = _free_port()
    procs = [
        _start(tmp_path, f"proc{i}", ["--num-processes", "2", "--process-id", str(i), "--port", str(port),
                                      "--local-devices", "4", "--tokenised"])
        for i in range(2)
    ]
    multi = _finish(procs)

    assert single["global_devices"] == 8 and single["process_count"] == 1
    assert single["mesh"] == {"data": 2, "fsdp": 2, "sequence": 1, "tensor": 2}
    for r in multi:
        assert r["process_count"] == 2 and r["global_devices"] == 8 and r["mesh"] == single["mesh"]
    # Each process holds (and read) its own half of the batch rows.
    assert sorted(tuple(r["rows"]) for r in multi) == [(0, 4), (4, 8)]
    assert len(single["losses"]) == 3 and np.all(np.isfinite(single["losses"]))
    assert single["losses"][-1] < single["losses"][0]  # it trains
    # Every process sees the same global figures, and they match the one-process run.
    for key in ("losses", "grad_norms", "param_norm"):
        np.testing.assert_allclose(multi[0][key], multi[1][key], rtol=0, atol=1e-6, err_msg=key)
        np.testing.assert_allclose(multi[0][key], single[key], rtol=1e-5, atol=1e-5, err_msg=key)

"""Two processes with 4 CPU devices each train exactly like one process with 8.

The processes join with `jax.distributed.initialize` (gloo collectives), build one
mesh over all 8 devices, and each reads only its own rows of every global batch.
Collectives over gloo may sum in another order than in-process ones, hence the
float32 tolerance rather than bit equality.
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


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # the worker sets its own device count
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = str(WORKER.parent.parent) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _start(tmp_path: Path, tag: str, extra: list[str]) -> tuple[subprocess.Popen, Path, Path]:
    out = tmp_path / f"{tag}.json"
    log = tmp_path / f"{tag}.log"
    cmd = [sys.executable, str(WORKER), "--out", str(out), "--steps", "3", *extra]
    proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=_env(), cwd=tmp_path)
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
    single = _finish([_start(tmp_path, "single", ["--num-processes", "1", "--local-devices", "8"])])[0]

    port = _free_port()
    procs = [
        _start(tmp_path, f"proc{i}", ["--num-processes", "2", "--process-id", str(i), "--port", str(port),
                                      "--local-devices", "4"])
        for i in range(2)
    ]
    multi = _finish(procs)

    assert single["global_devices"] == 8 and single["process_count"] == 1
    for r in multi:
        assert r["process_count"] == 2 and r["global_devices"] == 8
    assert sorted(r["process_index"] for r in multi) == [0, 1]
    # Every process sees the same global loss, and it matches the one-process run.
    np.testing.assert_allclose(multi[0]["losses"], multi[1]["losses"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(multi[0]["losses"], single["losses"], rtol=1e-5, atol=1e-5)
    assert len(single["losses"]) == 3 and np.all(np.isfinite(single["losses"]))

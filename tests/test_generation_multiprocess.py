"""Two processes (gloo, 4 CPU devices each) generate what one process with 8 devices generates.

Each process passes only its own prompts (3 and 2 of 5); the global batch is assembled
from the processes' rows and sampled with each prompt's global stream id, so the
outputs must equal the one-process run's token for token. The one-process run is this
test process itself (it has 8 CPU devices, see conftest.py), computed while the two
workers run.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.generate_worker import generate_share
from tests.test_multiprocess import _env, _finish, _free_port

WORKER = Path(__file__).with_name("generate_worker.py")


def _start(tmp_path: Path, tag: str, extra: list[str]):
    out, log = tmp_path / f"{tag}.json", tmp_path / f"{tag}.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, str(WORKER), "--out", str(out), *extra], stdout=f,
                                stderr=subprocess.STDOUT, env=_env(tmp_path), cwd=tmp_path)
    return proc, out, log


@pytest.mark.slow
def test_two_processes_generate_like_one_process_with_the_same_devices(tmp_path):
    port = _free_port()
    procs = [_start(tmp_path, f"proc{i}", ["--num-processes", "2", "--process-id", str(i), "--port", str(port),
                                           "--local-devices", "4"]) for i in range(2)]
    try:
        single = generate_share()
    except BaseException:
        for proc, _, _ in procs:
            proc.kill()
            proc.wait()
        raise
    multi = _finish(procs)

    assert single["process_count"] == 1 and single["devices"] == 8
    assert all(r["process_count"] == 2 and r["devices"] == 8 for r in multi)
    for call in ("mixed", "image"):
        assert len(single["local"][call]) == 5
        # Each process got its own prompts' outputs back, and every process sees all of them.
        assert multi[0]["local"][call] + multi[1]["local"][call] == single["local"][call]
        assert multi[0]["gathered"][call] == multi[1]["gathered"][call] == single["local"][call]

"""eval.bench.synthetic: the packed random batch the tools time, and fake CPU devices asked for after
`import jax` (which every project module does) but before jax's first device query."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from eval.bench import plan_common
from eval.bench.synthetic import synthetic_batch

REPO = Path(__file__).resolve().parent.parent


def test_synthetic_batch_packs_documents_with_restarting_positions():
    b = synthetic_batch(3, 10, vocab=40, docs_per_row=3, seed=1)
    assert {k: v.shape for k, v in b.items()} == {k: (3, 10) for k in
                                                  ("tokens", "targets", "positions", "segment_ids", "loss_weights",
                                                   "modality")}
    np.testing.assert_array_equal(b["segment_ids"][0], [1, 1, 1, 2, 2, 2, 3, 3, 3, 3])
    np.testing.assert_array_equal(b["positions"][2], [0, 1, 2, 0, 1, 2, 0, 1, 2, 3])
    np.testing.assert_array_equal(b["tokens"][:, 1:], b["targets"][:, :-1])  # targets are the next tokens
    assert b["tokens"].dtype == np.int32 and b["modality"].dtype == np.int8 and (b["loss_weights"] == 1).all()
    assert 0 <= b["tokens"].min() and b["tokens"].max() < 40
    again = synthetic_batch(3, 10, vocab=40, docs_per_row=3, seed=1)
    assert all(np.array_equal(b[k], again[k]) for k in b)


def _run(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # one CPU device unless the code asks for more
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)


def test_plan_compile_gets_the_cpu_devices_its_mesh_needs_after_jax_is_imported():
    r = _run("import sys\n"
             "from eval.bench import plan\n"
             "from chameleon_jax.host_devices import jax_started, set_cpu_devices\n"
             "assert 'jax' in sys.modules and not jax_started()\n"
             "plan.main(['--preset', 'tiny', '--mesh', 'data=2', '--batch', '2', '--seq', '16', '--compile', "
             "'--json'])\n"
             "try:\n"
             "    set_cpu_devices(3)\n"
             "except Exception as e:\n"
             "    print(type(e).__name__)\n")
    assert r.returncode == 0, r.stderr[-2000:]
    *_, plan_json, error = r.stdout.strip().splitlines()
    out = json.loads(plan_json)
    assert out["devices"] == 2 and out["xla"]["backend"] == "cpu" and out["xla"]["peak_bytes"] > 0
    assert error == "ConfigError"  # a started backend cannot be asked for another count


def test_mesh_sizes_parse_with_commas_or_spaces():
    assert plan_common.parse_mesh("data=2,tensor=4") == plan_common.parse_mesh(" data=2  tensor=4 ")
    assert plan_common.mesh_sizes(plan_common.parse_mesh("data=2 tensor=4"), None) == {
        "data": 2, "fsdp": 1, "sequence": 1, "tensor": 4}

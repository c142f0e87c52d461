"""kill -9 at random moments, during checkpoint writes too: the run ends exactly as an uninterrupted one."""

import pytest

from eval.bench.chaos import ChaosConfig, chaos


@pytest.mark.slow
def test_killed_and_restarted_run_equals_an_uninterrupted_one(tmp_path):
    figures = chaos(ChaosConfig(trainer="vqvae", kills=2, steps=20, seed=0, work_dir=str(tmp_path)))
    assert figures["kills_survived"] == 2
    assert figures["losses_identical"] and figures["params_identical"]
    assert figures["duplicate_rows"] == 0 and figures["missing_rows"] == 0

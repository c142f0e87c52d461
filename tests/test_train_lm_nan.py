"""A non-finite loss stops training with a clear error and leaves the last good checkpoint intact."""

import re

import jax
import numpy as np
import pytest

from chameleon_jax import configlib
from chameleon_jax.sharding import build_mesh
from train import lm
from train.checkpointing import Checkpointer
from train.lm_config import LMTrainConfig


def test_divergence_exits_nonzero_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    run_dir = tmp_path / "run"
    argv = [
        "preset=tiny", f"run_dir={run_dir}", "batch_size=8",
        "data.sequence.seq_len=128", "steps=12", "log_interval=1", "checkpoint_interval=1", "data.eval_split=",
        "peak_flops=1e12", "progress=false", "data.train_examples=64", "data.interleaved_docs=16",
        "data.vocab_corpus_docs=200", "optim.lr=1e30", "optim.warmup_steps=0",
    ]
    with pytest.raises(SystemExit) as exit_info:
        lm.main(argv)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    match = re.search(r"training diverged at step (\d+): the (loss|parameters after the update) became non-finite", err)
    assert match, err
    bad_step = int(match.group(1))
    assert bad_step >= 2 and "last good checkpoint is step" in err

    ckpt = Checkpointer(run_dir / "checkpoints")
    good = ckpt.latest_step()
    ckpt.close()
    assert good == bad_step - 1 and f"step {good} in" in err
    assert not (run_dir / "model").exists()  # nothing exported from a diverged run

    # The last checkpoint restores into finite parameters and the data position of that step.
    cfg = configlib.load(LMTrainConfig, run_dir / "config.json")
    trainer = lm.get_trainer(cfg, build_mesh(cfg.mesh))
    tree, extra = Checkpointer(run_dir / "checkpoints").restore(trainer.abstract_checkpoint_tree())
    state = trainer.state_from_checkpoint(tree)
    assert int(state["step"]) == good
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state["params"]))
    assert extra["data"][0]["parent"]["next_index"] > 0  # documents read by the packer up to that step

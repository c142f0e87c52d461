"""train.lm on tokenised shards (data.source=shards): a run resumed from its checkpoint equals one straight run."""

import numpy as np

from chameleon_jax import configlib
from chameleon_jax.data.grain_pipeline import ShardData
from train.lm import run
from train.lm_config import tiny
from train.metrics import read_metrics
from tests.test_grain_pipeline import _tokenise


def _run_cfg(run_dir, shards, *overrides):
    return configlib.apply_overrides(tiny(), [
        f"run_dir={run_dir}", "data.source=shards", f"data.shards={shards}", "batch_size=8",
        "data.sequence.seq_len=64", "data.sequence.overlong=split", "log_interval=1", "checkpoint_interval=2",
        "eval_interval=0", "peak_flops=1e12", "progress=false", "optim.warmup_steps=1", "optim.decay_steps=4",
        "async_checkpoint=false", *overrides,
    ])


def test_resume_mid_epoch_gives_the_same_batches_and_losses(tmp_path):
    shards = _tokenise(tmp_path, 30, "a", long_every=5).directory  # about 3 batches an epoch
    straight = run(_run_cfg(tmp_path / "straight", shards, "steps=4"))
    resumed = tmp_path / "resumed"
    run(_run_cfg(resumed, shards, "steps=2"))
    run(_run_cfg(resumed, shards, "steps=4"))

    def losses(d):
        return [r["loss"] for r in read_metrics(d) if "loss" in r]

    assert len(losses(straight)) == 4
    np.testing.assert_array_equal(losses(straight), losses(resumed))

    # The batches themselves: the iterator restored from step 2's checkpoint yields batches 3 and 4.
    cfg = _run_cfg(tmp_path / "x", shards)
    data = ShardData.build(cfg.data)
    it = data.train_iterator(8)
    want = [it.next_local() for _ in range(4)][2:]
    extra = _extra(resumed / "checkpoints", 2)
    again = data.train_iterator(8)
    again.restore(extra["data"][0])
    for w in want:
        got = again.next_local()
        for k in w:
            np.testing.assert_array_equal(got[k], w[k])


def _extra(directory, step):
    """The JSON part of a checkpoint (the data iterators' states), read with orbax alone."""
    import orbax.checkpoint as ocp

    manager = ocp.CheckpointManager(directory)
    restored = manager.restore(step, args=ocp.args.Composite(extra=ocp.args.JsonRestore()))
    manager.close()
    return dict(restored["extra"])

"""Resuming from a checkpoint continues exactly where the run stopped (model, optimizer and data)."""

import json

import numpy as np

from chameleon_jax import configlib
from train.checkpointing import Checkpointer
from train.lm import run
from train.lm_config import tiny
from train.metrics import read_metrics


def small_run(run_dir, *overrides):
    """A few-second LM run: tiny model, 4 rows of 128 tokens, no validation split."""
    return configlib.apply_overrides(tiny(), [
        f"run_dir={run_dir}", "batch_size=8", "data.sequence.seq_len=128",
        "log_interval=1", "checkpoint_interval=2", "data.eval_split=", "peak_flops=1e12", "progress=false",
        "optim.warmup_steps=1", "optim.decay_steps=4", "data.train_examples=64", "data.interleaved_docs=16",
        "data.vocab_corpus_docs=200", *overrides,
    ])


def _losses(run_dir):
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def test_resume_gives_the_same_losses_as_an_uninterrupted_run(tmp_path):
    straight = run(small_run(tmp_path / "straight", "steps=4"))
    resumed_dir = tmp_path / "resumed"
    run(small_run(resumed_dir, "steps=2"))
    ckpt = Checkpointer(resumed_dir / "checkpoints")
    assert ckpt.latest_step() == 2
    ckpt.close()
    with open(resumed_dir / "metrics.jsonl", "a") as f:  # as if a crashed run had logged past its checkpoint
        f.write(json.dumps({"step": 3, "loss": 99.0}) + "\n")
    run(small_run(resumed_dir, "steps=4"))  # a fresh Trainer and iterator, restored from disk

    a, b = _losses(straight), _losses(resumed_dir)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    assert [r["step"] for r in read_metrics(resumed_dir) if "loss" in r] == [1, 2, 3, 4]
    np.testing.assert_array_equal([a[s] for s in range(1, 5)], [b[s] for s in range(1, 5)])

    # The finished run exported a loadable model directory with its vocabulary.
    model_dir = straight / "model"
    assert (model_dir / "config.json").exists() and (model_dir / "vocab" / "vocab.json").exists()
    assert (model_dir / "tokenizer").is_dir() and (straight / "loss_curve.png").exists()
    from chameleon_jax.checkpoint import load_model
    from chameleon_jax.vocab import Vocabulary

    model = load_model(model_dir)
    vocab = Vocabulary.load(model_dir / "vocab")
    assert model.cfg.vocab_size == vocab.padded_size(128) and model.cfg.vocab_size >= vocab.size
    saved = json.loads((straight / "config.json").read_text())
    assert saved["model"]["vocab_size"] == model.cfg.vocab_size

    # A finished run is reused, not retrained.
    lines = (straight / "metrics.jsonl").read_text()
    assert run(small_run(straight, "steps=4")) == straight
    assert (straight / "metrics.jsonl").read_text() == lines


def test_resume_with_batches_prefetched_in_a_thread_gives_the_same_losses(tmp_path):
    """The prefetch thread builds batches ahead; the checkpoint holds the data state of the last one trained on."""
    straight = run(small_run(tmp_path / "straight", "steps=4", "data.prefetch=0"))
    ahead = tmp_path / "ahead"
    run(small_run(ahead, "steps=2", "data.prefetch=3"))
    run(small_run(ahead, "steps=4", "data.prefetch=3"))
    a, b = _losses(straight), _losses(ahead)
    assert sorted(b) == [1, 2, 3, 4]
    np.testing.assert_array_equal([a[s] for s in range(1, 5)], [b[s] for s in range(1, 5)])

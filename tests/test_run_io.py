import jax
import jax.numpy as jnp
import pytest

from train.checkpointing import CheckpointError, Checkpointer
from train.metrics import MetricsWriter, plot_curves, read_metrics, update_headline


def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def test_checkpoint_round_trip_keeps_extra_and_latest(tmp_path):
    ckpt = Checkpointer(tmp_path / "ck", keep=2)
    for step in (1, 2, 3):
        ckpt.save(step, {"w": jnp.full((2, 3), float(step)), "n": jnp.int32(step)}, {"pos": step * 10})
    ckpt.wait()
    assert ckpt.latest_step() == 3 and ckpt.all_steps() == [2, 3]
    state, extra = ckpt.restore(_abstract({"w": jnp.zeros((2, 3)), "n": jnp.int32(0)}))
    assert float(state["w"][0, 0]) == 3.0 and extra == {"pos": 30}
    ckpt.close()


def test_checkpoint_of_wrong_shape_names_the_tensor(tmp_path):
    ckpt = Checkpointer(tmp_path / "ck")
    ckpt.save(1, {"w": jnp.ones((2, 3))})
    ckpt.wait()
    with pytest.raises(CheckpointError, match=r"'w'.*\(2, 3\).*\(4, 3\)"):
        ckpt.restore({"w": jax.ShapeDtypeStruct((4, 3), jnp.float32)})
    ckpt.close()


def test_restore_without_checkpoint_is_clear(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        Checkpointer(tmp_path / "empty").restore({"w": jax.ShapeDtypeStruct((1,), jnp.float32)})


def test_metrics_jsonl_headline_and_plot(tmp_path):
    with MetricsWriter(tmp_path) as w:
        w.write(1, {"loss": jnp.float32(2.0)})
        w.write(2, {"loss": 1.0, "note": "x"})
    rows = read_metrics(tmp_path)
    assert [r["loss"] for r in rows] == [2.0, 1.0]
    update_headline(tmp_path / "metrics.json", {"a": 1})
    assert update_headline(tmp_path / "metrics.json", {"b": 0.5}) == {"a": 1, "b": 0.5}
    assert plot_curves(tmp_path, ["loss"], tmp_path / "loss.png")
    assert (tmp_path / "loss.png").stat().st_size > 1000
    assert not plot_curves(tmp_path, ["missing"], tmp_path / "none.png")

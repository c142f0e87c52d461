"""Orbax checkpoints for training runs: async saves, keep-N, resume with the data iterator's state."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
    """A checkpoint is missing, or does not match the state it is restored into."""


class Checkpointer:
    """`run_dir/checkpoints/<step>/{state, extra}`.

    `state` is any pytree of arrays (parameters, optimizer state, step); `extra` is
    a JSON-able dict (the data iterator's position, RNG seeds, ...). Saves are
    asynchronous; `wait()` blocks until the last one is on disk. A save that was
    interrupted never becomes the latest step (orbax commits atomically).
    """

    def __init__(self, directory: str | os.PathLike, keep: int = 3, async_save: bool = True):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, extra: dict[str, Any] | None = None, force: bool = False) -> None:
        self._manager.save(
            int(step),
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), extra=ocp.args.JsonSave(extra or {})),
            force=force,
        )

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
        """Restores into the structure, shapes, dtypes and shardings of `abstract_state`.

        `abstract_state` may hold jax.ShapeDtypeStruct leaves with `.sharding` set, so
        arrays land directly in their sharded layout without a host gather.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        _check_shapes(self._manager, step, abstract_state, self.directory)
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), extra=ocp.args.JsonRestore()
            ),
        )
        return restored["state"], dict(restored["extra"] or {})

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def _check_shapes(manager, step: int, abstract_state: Any, directory: Path) -> None:
    """Compares stored array shapes with the target's, naming the first tensor that differs."""
    try:
        meta = manager.item_metadata(step)["state"]
    except Exception:  # metadata unavailable: orbax's own checks still apply
        return
    if meta is None:
        return
    stored = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(meta)}
    for path, leaf in jax.tree_util.tree_leaves_with_path(abstract_state):
        name = jax.tree_util.keystr(path)
        if name not in stored:
            raise CheckpointError(f"checkpoint {directory}/{step} has no tensor {name}")
        want = tuple(getattr(leaf, "shape", ()))
        have = tuple(getattr(stored[name], "shape", want))
        if want != have:
            raise CheckpointError(
                f"checkpoint {directory}/{step}: tensor {name} has shape {have}, the model expects {want}"
            )

"""Orbax checkpoints for training runs: async saves, keep-N, resume with the data iterator's state.

On resume the newest checkpoint that reads back whole is used. A damaged one (a data file
that cannot be read, a missing `_METADATA`, a missing `extra` record holding the data
iterator's state) is reported in one line naming the step and the file, moved aside to
`<checkpoints>.damaged/<step>`, and the previous one is tried. A checkpoint whose tensors
have other shapes than the model's is not damaged but a different model: that is an error,
never a fallback.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any, Iterable

import jax
import orbax.checkpoint as ocp

from chameleon_jax.checkpoint import CheckpointError, error_line, path_str

log = logging.getLogger("train.run")

__all__ = ["CheckpointError", "Checkpointer", "DamagedCheckpointError"]


class DamagedCheckpointError(CheckpointError):
    """One checkpoint step cannot be read back whole."""

    def __init__(self, step: int, file: Path, what: str):
        self.step, self.file = step, file
        super().__init__(f"checkpoint step {step} is damaged: {file}: {what}")


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
        # Handlers named up front, so the tensor metadata of a step reads back before any restore.
        handlers = {"state": ocp.StandardCheckpointHandler(), "extra": ocp.JsonCheckpointHandler()}
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

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

    def save_now(self, step: int, state: Any, extra: dict[str, Any] | None = None) -> Path:
        """Saves `step` (unless it is already being saved) and waits until it is on disk; returns the folder."""
        if self.latest_step() != int(step):
            self.save(step, state, extra, force=True)
        self.wait()
        return self.directory

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
        """Restores into the structure, shapes, dtypes and shardings of `abstract_state`.

        `abstract_state` may hold jax.ShapeDtypeStruct leaves with `.sharding` set, so
        arrays land directly in their sharded layout without a host gather. Raises
        DamagedCheckpointError when the step cannot be read back whole.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        folder = self.directory / str(step)
        for rel in ("state/_METADATA", "extra/metadata"):
            if not (folder / rel).is_file():
                raise DamagedCheckpointError(step, folder / rel, "missing")
        _check_shapes(self._manager, step, abstract_state, folder)
        try:
            restored = self._manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state), extra=ocp.args.JsonRestore()
                ),
            )
        except Exception as e:  # orbax / tensorstore read errors of every kind
            raise DamagedCheckpointError(step, _named_file(e, folder), error_line(e)) from e
        return restored["state"], dict(restored["extra"] or {})

    def restore_latest(
        self, abstract_state: Any, required_extra: Iterable[str] = (), primary: bool = True
    ) -> tuple[int, Any, dict[str, Any]] | None:
        """(step, state, extra) of the newest intact checkpoint, or None when there is none at all.

        Damaged newer steps are reported and moved aside (by the primary process). `extra`
        must hold every key of `required_extra`. Raises CheckpointError when every step is damaged.
        """
        steps = sorted(self.all_steps(), reverse=True)
        damaged: list[DamagedCheckpointError] = []
        for step in steps:
            try:
                state, extra = self.restore(abstract_state, step)
                missing = [k for k in required_extra if k not in extra]
                if missing:
                    raise DamagedCheckpointError(
                        step, self.directory / str(step) / "extra" / "metadata",
                        f"no {', '.join(missing)} (the data iterator's state)",
                    )
            except DamagedCheckpointError as e:
                older = [s for s in steps if s < step]
                log.warning("%s; %s", e, f"falling back to step {older[0]}" if older else "no older checkpoint")
                damaged.append(e)
                continue
            if damaged:
                self._set_aside([e.step for e in damaged], primary)
            return step, state, extra
        if damaged:
            raise CheckpointError(
                f"no intact checkpoint in {self.directory}: " + "; ".join(str(e) for e in damaged)
                + ". Move the folder away to start afresh, or pass overwrite=true"
            )
        return None

    def _set_aside(self, steps: list[int], primary: bool) -> None:
        """Moves damaged steps out of the checkpoint folder, so the run can save those steps again."""
        self.wait()
        if primary:
            aside = self.directory.with_name(self.directory.name + ".damaged")
            aside.mkdir(exist_ok=True)
            for step in steps:
                target = aside / str(step)
                if target.exists():
                    shutil.rmtree(target)
                os.replace(self.directory / str(step), target)
                log.warning("moved the damaged checkpoint step %d to %s", step, target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("checkpoints set aside")
        self._manager.reload()

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def _named_file(e: BaseException, folder: Path) -> Path:
    """The file of `folder` that an orbax/tensorstore error message names, else the folder itself."""
    import re

    text = " ".join(str(x) for x in (e, e.__cause__, e.__context__) if x is not None)
    for match in re.findall(r"[\w./-]+", text):
        if match.startswith(str(folder)) and Path(match).is_file():
            return Path(match)
    return folder


def _check_shapes(manager, step: int, abstract_state: Any, folder: Path) -> None:
    """Compares stored array shapes with the target's, naming the first tensor that differs."""
    try:
        meta = manager.item_metadata(step)["state"]
    except Exception as e:
        raise DamagedCheckpointError(step, _named_file(e, folder / "state"), f"unreadable: {error_line(e)}") from e
    if meta is None:
        raise DamagedCheckpointError(step, folder / "state" / "_METADATA", "holds no tensor metadata")
    # Names as dotted paths: a saved namedtuple field (`.count`) reads back as a dict key (`['count']`).
    stored = {path_str(k): v for k, v in jax.tree_util.tree_leaves_with_path(meta)}
    for path, leaf in jax.tree_util.tree_leaves_with_path(abstract_state):
        name = path_str(path)
        if name not in stored:
            raise CheckpointError(f"checkpoint {folder} has no tensor '{name}'")
        want = tuple(getattr(leaf, "shape", ()))
        have = tuple(getattr(stored[name], "shape", want))
        if want != have:
            raise CheckpointError(
                f"checkpoint {folder}: tensor '{name}' has shape {have}, the model expects {want}"
            )

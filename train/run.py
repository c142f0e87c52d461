"""The life of a training run, shared by `train.lm` and `train.vqvae`.

    with RunSession(run_dir, primary=...) as session:   # lock + SIGTERM/SIGINT handling
        ...restore or init...
        for step in ...:
            ...train one step...
            if session.stop.should_stop(done):           # a signal arrived: save `done`, then
                session.stopped(done, save)              #   raise TrainingStopped

Exit statuses of the trainers' command lines (`guard`), documented in docs/failures.md:

    0   the run finished (or a finished run was reused)
    1   training diverged (non-finite loss or parameters)
    2   bad configuration or input: config, data, missing folder, unusable checkpoint
    3   the run directory is in use by another run
    75  stopped by SIGTERM/SIGINT after saving a checkpoint; rerun the same command to resume
    128+N  a second signal N: exited at once without saving
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Callable, Iterable

from train.preemption import StopRequest
from train.runlock import LOCK_FILE, RunLock, RunLockedError

log = logging.getLogger("train.run")

EXIT_DIVERGED = 1
EXIT_BAD_INPUT = 2
EXIT_LOCKED = 3
EXIT_STOPPED = 75


class TrainingDivergedError(RuntimeError):
    """The loss or the parameters became NaN or infinite."""


class TrainingStopped(Exception):
    """A stop signal ended the run after a checkpoint of `step` was written."""

    def __init__(self, step: int, signal_name: str, checkpoint_dir: Path):
        self.step = step
        super().__init__(
            f"stopped by {signal_name} after step {step}; checkpoint {checkpoint_dir / str(step)} written. "
            "Rerun the same command to resume."
        )


def setup_logging() -> None:
    """INFO lines with time and module on stderr (the trainers' command lines)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)


def enable_compilation_cache(directory: str) -> None:
    """A persistent XLA compilation cache (faster restarts). Only effective before the first compilation."""
    if directory:
        import jax

        jax.config.update("jax_compilation_cache_dir", str(Path(directory).expanduser()))


def clear_run(run_dir: Path, names: Iterable[str] | None = None) -> None:
    """Removes what a run wrote: the listed entries of `run_dir`, or all of it (`names=None`); never the lock."""
    if not run_dir.is_dir():
        return
    entries = [run_dir / n for n in names] if names is not None else list(run_dir.iterdir())
    for p in entries:
        if p.name == LOCK_FILE:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()


def _bad_input_errors() -> tuple[type, ...]:
    from chameleon_jax.checkpoint import CheckpointError
    from chameleon_jax.configlib import ConfigError
    from chameleon_jax.data.documents import DataError
    from chameleon_jax.data.shards import ShardError
    from chameleon_jax.vocab import VocabularyError

    return ConfigError, DataError, ShardError, CheckpointError, VocabularyError, FileNotFoundError, NotADirectoryError


class RunSession:
    """Holds the run directory's lock (primary process) and the stop-signal handlers for the run's life.

    A first start that fails on bad input before its first checkpoint removes the folder it created,
    so nothing half-written stays.
    """

    def __init__(self, run_dir: str | os.PathLike, primary: bool = True):
        self.run_dir = Path(run_dir)
        self.primary = primary
        self.lock = RunLock(self.run_dir) if primary else None
        self.stop = StopRequest()
        self._created = False

    def __enter__(self) -> "RunSession":
        self._created = self.primary and not self.run_dir.exists()
        if self.lock is not None:
            self.lock.acquire()
        self.stop.install()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.stop.uninstall()
        if self.lock is not None:
            self.lock.release()
        if self._created and exc_type is not None and issubclass(exc_type, _bad_input_errors()) \
                and not any((self.run_dir / "checkpoints").glob("*")):
            shutil.rmtree(self.run_dir, ignore_errors=True)

    def stopped(self, step: int, save: Callable[[], Path]) -> None:
        """Writes the checkpoint of `step` (`save` returns the checkpoint folder) and raises TrainingStopped."""
        checkpoint_dir = save()
        log.warning("%s: saved step %d in %s", self.stop.name, step, checkpoint_dir)
        raise TrainingStopped(step, self.stop.name, checkpoint_dir)


def guard(fn: Callable[[], object]) -> None:
    """Runs a trainer's command line: failures become one line on stderr and an exit status (see above)."""
    try:
        fn()
    except TrainingStopped as e:
        print(str(e), file=sys.stderr)
        raise SystemExit(EXIT_STOPPED) from None
    except TrainingDivergedError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(EXIT_DIVERGED) from None
    except RunLockedError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(EXIT_LOCKED) from None
    except _bad_input_errors() as e:
        from chameleon_jax.configlib import ConfigError

        kind = "config error" if isinstance(e, ConfigError) else "error"
        print(f"{kind}: {_one_line(e)}", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT) from None


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__

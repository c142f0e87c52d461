"""Stop requests: SIGTERM (a preempted machine) or SIGINT (Ctrl-C) end a run cleanly at a step boundary.

The first signal only sets a flag: the step in flight finishes, the trainer writes a
checkpoint of that step synchronously and stops (`TrainingStopped`, exit status 75).
A second signal exits the process at once with status 128 + the signal number.

Several processes must save the same step. There JAX's preemption service decides:
`jax.distributed.initialize` installs its own SIGTERM notifier, which tells every
process, and `multihost_utils.reached_preemption_sync_point(step)` turns True on all of
them at one common step. A SIGINT is handed to that service as a SIGTERM to this process.
Once the sync point is reached this module takes SIGTERM over too, so a second signal
during the save still exits at once. With the preemption service turned off
(`jax_enable_preemption_service=false`) the processes agree through a small all-gather
of the stop flag at every step instead.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading

log = logging.getLogger("train.run")

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _preemption_service() -> bool:
    """True when this is a multi-process JAX job with JAX's preemption sync manager running."""
    import jax

    if jax.process_count() == 1:
        return False
    try:
        from jax._src import distributed  # where jax keeps the manager; no public accessor

        return distributed.global_state.preemption_sync_manager is not None
    except (ImportError, AttributeError):
        return False


class StopRequest:
    """Installs the handlers on `install()` (main thread only), puts the old ones back on `uninstall()`."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}
        self._shared = False

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else "a stop request"

    def install(self) -> "StopRequest":
        if threading.current_thread() is not threading.main_thread():
            log.warning("not on the main thread: SIGTERM/SIGINT will not stop this run cleanly")
            return self
        self._shared = _preemption_service()
        for sig in _SIGNALS:
            if self._shared and sig == signal.SIGTERM:
                continue  # JAX's preemption notifier owns SIGTERM until the sync point
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            sys.stderr.write(f"\n{signal.Signals(signum).name} again: exiting at once without saving\n")
            sys.stderr.flush()
            os._exit(128 + signum)
        self.signum = signum
        log.warning("%s received: finishing this step, then saving a checkpoint (send it again to exit at once)",
                    signal.Signals(signum).name)
        if self._shared:
            os.kill(os.getpid(), signal.SIGTERM)  # to JAX's notifier, which tells the other processes

    def should_stop(self, step: int) -> bool:
        """Called once per step by every process, with the number of steps done; True = save `step` and stop."""
        import jax
        from jax.experimental import multihost_utils

        if not self._shared:
            if jax.process_count() == 1:
                return self.signum is not None
            # Several processes without JAX's preemption service: agree through a small all-gather each step.
            import numpy as np

            return bool(np.asarray(multihost_utils.process_allgather(np.int32(self.signum is not None))).any())

        if not multihost_utils.reached_preemption_sync_point(step):
            return False
        if self.signum is None:
            self.signum = signal.SIGTERM  # the notice came through JAX's service
        if signal.SIGTERM not in self._previous and threading.current_thread() is threading.main_thread():
            self._previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._handle)
        return True

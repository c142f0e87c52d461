"""One writer per run directory: a lock file held for the life of a training run.

`run_dir/train.lock` is a JSON object {"pid", "host", "started", "command"}. It is
created complete or not at all (written to a private file, then hard-linked into
place, which fails if a lock is already there), so a reader never sees half a lock.

A second run on the same folder is refused at once with a message naming the holder.
A lock whose process is gone (same host, pid no longer alive) is stale: it is taken
over with a warning. A lock of another host cannot be checked from here and is
always respected; delete the file by hand if that host's run is known to be dead.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
from pathlib import Path

log = logging.getLogger("train.run")

LOCK_FILE = "train.lock"


class RunLockedError(RuntimeError):
    """Another live process holds the run directory's lock."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _describe(holder: dict) -> str:
    started = holder.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else "?"
    return f"process {holder.get('pid', '?')} on host {holder.get('host', '?')}, started {when}"


class RunLock:
    """Exclusive ownership of `run_dir` while `acquire()`d; `release()` (or the context exit) frees it."""

    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / LOCK_FILE
        self.held = False

    def _read(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "command": " ".join(sys.argv)}
        private = self.path.with_name(f"{LOCK_FILE}.{me['host']}.{me['pid']}")
        private.write_text(json.dumps(me) + "\n")
        try:
            for _ in range(2):  # a second try after taking over a stale lock
                try:
                    os.link(private, self.path)
                    self.held = True
                    return self
                except FileExistsError:
                    holder = self._read()
                    if holder is None:
                        continue  # released meanwhile
                    if holder.get("host") == me["host"] and isinstance(holder.get("pid"), int) \
                            and not _alive(holder["pid"]):
                        log.warning("taking over the stale lock %s of %s (that process is gone)",
                                    self.path, _describe(holder))
                        self.path.unlink(missing_ok=True)
                        continue
                    raise RunLockedError(
                        f"{self.path.parent} is in use by another training run ({_describe(holder)}; lock file "
                        f"{self.path}); wait for it to end or choose another run_dir"
                    )
            raise RunLockedError(f"could not take the lock {self.path}: another run keeps taking it")
        finally:
            private.unlink(missing_ok=True)

    def release(self) -> None:
        if self.held:
            holder = self._read()
            if holder and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
                self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

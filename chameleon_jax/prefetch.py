"""Builds the next host batches in a background thread while the device trains.

A training step on an accelerator takes a few milliseconds; packing a batch of
documents in Python takes tens. `Prefetcher` keeps up to `depth` batches ready
so the two overlap. It wraps any resumable iterator with `next_local()`,
`state()` and `restore(state)` (such as `grain_pipeline.GrainBatches`) and keeps its
contract: `state()` is the state after the last batch *handed out*, not after
the last one built, so a checkpoint taken mid-run resumes at exactly the next
batch the training loop would have seen. The batches are the same, in the same
order, with or without prefetching.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Mapping


class Prefetcher:
    def __init__(self, source: Any, depth: int = 2):
        if depth < 1:
            raise ValueError(f"prefetch depth must be >= 1, got {depth}")
        self.source = source
        self.depth = depth
        self._state = source.state()
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._stop: threading.Event | None = None

    def state(self) -> dict[str, Any]:
        return dict(self._state)

    def restore(self, state: Mapping[str, Any]) -> None:
        self.close()
        self.source.restore(state)
        self._state = self.source.state()

    def _work(self, out: queue.Queue, stop: threading.Event) -> None:
        def put(item) -> None:
            while not stop.is_set():
                try:
                    out.put(item, timeout=0.1)
                    return
                except queue.Full:
                    continue

        try:
            while not stop.is_set():
                put((self.source.next_local(), self.source.state(), None))
        except BaseException as e:  # handed to the consumer, raised there
            put((None, None, e))

    def _start(self) -> None:
        self._stop = threading.Event()
        self._queue = queue.Queue(maxsize=self.depth)
        self._thread = threading.Thread(target=self._work, args=(self._queue, self._stop), daemon=True,
                                        name="batch-prefetch")
        self._thread.start()

    def next_local(self):
        if self._thread is None:
            self._start()
        batch, state, error = self._queue.get()
        if error is not None:
            self.close()
            raise error
        self._state = state
        return batch

    def close(self) -> None:
        """Stops the worker; batches built ahead are dropped and the source is left at `state()`."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread, self._queue = None, None
            self.source.restore(self._state)

    def __iter__(self):
        while True:
            yield self.next_local()

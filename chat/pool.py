"""A bounded pool of worker threads for CPU-heavy work (bcrypt) off the I/O threads.

Theory of operation: `submit` never blocks. When every worker is busy and the queue is
full, it raises ServerBusy at once, so a login storm is answered quickly instead of piling
up memory and latency; chat traffic never waits here because it never enters this pool.
"""

from __future__ import annotations

import logging
import os
import queue
import sys
import threading
from collections.abc import Callable

from chat.errors import ServerBusy

log = logging.getLogger(__name__)

_STOP = object()


class BoundedPool:
    def __init__(self, workers: int, queue_size: int, name: str = "worker",
                 nice: int = 0) -> None:
        self._queue: queue.Queue[object] = queue.Queue(maxsize=queue_size)
        self._nice = nice
        self._threads = [
            threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True)
            for i in range(max(1, workers))
        ]
        self._closed = False

    @property
    def waiting(self) -> int:
        """Work submitted and not started yet (approximate, from any thread)."""
        return self._queue.qsize()

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def submit(self, fn: Callable[[], None]) -> None:
        if self._closed:
            raise ServerBusy("the server is shutting down")
        try:
            self._queue.put_nowait(fn)
        except queue.Full:
            raise ServerBusy() from None

    def stop(self) -> None:
        """Let queued work finish, then end the workers."""
        self._closed = True
        for _ in self._threads:
            self._queue.put(_STOP)
        for t in self._threads:
            t.join()

    def _work(self) -> None:
        if self._nice:
            _lower_priority(self._nice)
        while True:
            fn = self._queue.get()
            if fn is _STOP:
                return
            try:
                fn()  # type: ignore[operator]
            except Exception:
                log.exception("worker task failed")
            # Not kept while waiting for the next: its closure holds a connection.
            del fn


def _lower_priority(nice: int) -> None:
    """Lower the calling thread's priority: on Linux, nice applies to one thread (its id)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + nice)
    except OSError as exc:
        log.warning("could not lower the priority of %s: %s",
                    threading.current_thread().name, exc)

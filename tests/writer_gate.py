"""Test helpers for ordering races on the store's writer, shared by the review tests."""

from __future__ import annotations

import threading
import time
from typing import Any

from conftest import TIMEOUT

from chat.store import Job


class WriterGate:
    """Holds the store's writer on a job of ours, so that what is submitted meanwhile
    is decided afterwards in one batch, in submission order."""

    def __init__(self, server: Any) -> None:
        self.store = server.store
        self.started, self.release = threading.Event(), threading.Event()

        def run(db: Any) -> None:
            self.started.set()
            self.release.wait(TIMEOUT)
            return None

        self.store.submit(Job(run, lambda exc: None))
        assert self.started.wait(TIMEOUT)

    def wait_queued(self, n: int) -> None:
        deadline = time.monotonic() + TIMEOUT
        while self.store.backlog < n:
            assert time.monotonic() < deadline, f"only {self.store.backlog} jobs queued"
            time.sleep(0.005)

    def open(self) -> None:
        self.release.set()


def reply_to(client: Any, rid: Any) -> dict[str, Any]:
    while True:
        frame = client.recv()
        if frame.get("re") == rid:
            return frame

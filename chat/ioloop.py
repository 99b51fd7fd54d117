"""A selector thread that owns many connections' sockets.

Theory of operation
-------------------
Each `IOLoop` is one OS thread with one selector. A connection is created on, and
belongs to, exactly one loop for its whole life: only that thread ever calls into its
SSLSocket (handshake, recv, send, close), which is what OpenSSL requires.

Other threads (the store writer, the bcrypt workers, the acceptor) never touch a socket;
they hand work to the loop with `call_soon`, which queues a callable and wakes the
selector through a socketpair. The wake-up byte is written only when the loop is not
already due to wake, so a burst of fan-out costs one syscall, not one per frame.

A periodic sweep (`tick`) enforces deadlines (handshake, login, idle) on every
connection; at 10,000 connections it is a cheap loop once a second.
"""

from __future__ import annotations

import collections
import logging
import selectors
import socket
import threading
import time
from collections.abc import Callable
from typing import Protocol

log = logging.getLogger(__name__)

SWEEP_INTERVAL = 1.0


class Handler(Protocol):
    def on_io(self, mask: int) -> None: ...
    def tick(self, now: float) -> None: ...


class IOLoop:
    def __init__(self, name: str) -> None:
        self.name = name
        self.selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._calls: collections.deque[tuple[Callable[..., None], tuple[object, ...]]] = (
            collections.deque()
        )
        self._woken = False
        self._running = True
        self.handlers: set[Handler] = set()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    @property
    def thread(self) -> threading.Thread:
        return self._thread

    def start(self) -> None:
        self._thread.start()

    def in_loop(self) -> bool:
        return threading.current_thread() is self._thread

    def call_soon(self, fn: Callable[..., None], *args: object) -> None:
        """Run fn(*args) on the loop thread; safe from any thread, never blocks."""
        self._calls.append((fn, args))
        if not self._woken:
            self._woken = True
            try:
                self._wake_w.send(b"\0")
            except (BlockingIOError, OSError):
                pass  # the pipe is full, so the loop is awake anyway

    def stop(self) -> None:
        self._running = False
        self.call_soon(lambda: None)

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    # --- the loop -----------------------------------------------------------------
    def _run(self) -> None:
        next_sweep = time.monotonic() + SWEEP_INTERVAL
        while self._running:
            timeout = 0 if self._calls else max(0.0, next_sweep - time.monotonic())
            try:
                events = self.selector.select(timeout)
            except OSError:
                log.exception("%s: select failed", self.name)
                continue
            for key, mask in events:
                handler = key.data
                if handler is None:
                    self._drain_wakeups()
                    continue
                try:
                    handler.on_io(mask)
                except Exception:
                    log.exception("%s: unhandled error in connection I/O", self.name)
            self._run_calls()
            now = time.monotonic()
            if now >= next_sweep:
                next_sweep = now + SWEEP_INTERVAL
                for handler in list(self.handlers):
                    try:
                        handler.tick(now)
                    except Exception:
                        log.exception("%s: unhandled error in a deadline check", self.name)
        self._run_calls()
        self.selector.close()
        self._wake_r.close()
        self._wake_w.close()

    def _drain_wakeups(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def _run_calls(self) -> None:
        # Clear the flag before draining: a producer that appends after this point sends
        # a fresh wake-up byte, one that appended before is drained below.
        self._woken = False
        calls = self._calls
        # Only the calls present now: ones they schedule run on the next pass, after a
        # select that lets other connections' I/O in.
        for _ in range(len(calls)):
            fn, args = calls.popleft()
            try:
                fn(*args)
            except Exception:
                log.exception("%s: unhandled error in a scheduled call", self.name)

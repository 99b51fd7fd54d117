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

Deadlines (handshake, login, idle, closing) are timers in a heap: a handler asks to be
`tick`ed at a time, and `tick` returns when it next wants to be, or None. A timer may be
early (an idle connection that heard from its client since is simply looked at again
later), so nothing has to touch the heap when bytes arrive. At 10,000 idle connections
that is a few checks a second, where a sweep of all of them each second cost 7% of a
core here.

A timer may also be late, by up to the loop's slack: times are rounded up to a multiple
of it, so the deadlines of a whole second come due together. That matters for the
keepalive. 10,000 idle connections make over a hundred pings a second; each alone woke
the loop twice (the timer, then the pong) and ran cold, at about 300 µs of CPU per
round trip here against 25 µs measured warm. Pinged in batches once a second, they
cost 80 µs each (bench (c), 10,000 idle connections at the defaults: 5.9% of a core
before this and the ping at 3/4 of the idle timeout, 0.67% after).
"""

from __future__ import annotations

import collections
import heapq
import itertools
import logging
import math
import selectors
import socket
import threading
import time
from collections.abc import Callable
from typing import Protocol

log = logging.getLogger(__name__)

# Deadlines are checked at most this late; it also bounds how long select waits.
SWEEP_INTERVAL = 1.0


class Handler(Protocol):
    def on_io(self, mask: int) -> None: ...
    def tick(self, now: float) -> float | None: ...


class IOLoop:
    def __init__(self, name: str, timer_slack: float = 0.0) -> None:
        self.name = name
        self.timer_slack = timer_slack
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
        # Loop thread only: the heap, and each handler's one live entry in it. An entry
        # holds its handler through a one-item list, which `cancel` empties, so that a
        # closed connection is not kept alive by a deadline minutes away.
        self._timers: list[tuple[float, int, list[Handler | None]]] = []
        self._timer_at: dict[Handler, tuple[float, list[Handler | None]]] = {}
        self._timer_seq = itertools.count()
        # Exact one-shot calls (no slack), e.g. a connection resuming after its rate wait.
        self._later: list[tuple[float, int, Callable[..., None], tuple[object, ...]]] = []
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

    def schedule(self, handler: Handler, when: float) -> None:
        """Tick `handler` at `when` (monotonic), up to the slack later; loop thread only."""
        if self.timer_slack:
            # One grid for every loop and handler, so what falls due together runs together.
            when = math.ceil(when / self.timer_slack) * self.timer_slack
        current = self._timer_at.get(handler)
        if current is not None:
            if current[0] <= when:
                return  # an earlier tick is due anyway, and it will ask again
            current[1][0] = None  # superseded
        ref: list[Handler | None] = [handler]
        self._timer_at[handler] = (when, ref)
        heapq.heappush(self._timers, (when, next(self._timer_seq), ref))

    def cancel(self, handler: Handler) -> None:
        """Forget the handler's deadline and drop the heap's reference to it; loop thread."""
        current = self._timer_at.pop(handler, None)
        if current is not None:
            current[1][0] = None

    def call_later(self, delay: float, fn: Callable[..., None], *args: object) -> None:
        """Run fn(*args) on the loop thread after `delay` seconds, exactly; loop thread only."""
        heapq.heappush(self._later, (time.monotonic() + delay, next(self._timer_seq), fn, args))

    def stop(self) -> None:
        self._running = False
        self.call_soon(lambda: None)

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    # --- the loop -----------------------------------------------------------------
    def _run(self) -> None:
        while self._running:
            if self._calls:
                timeout = 0.0
            else:
                due = min(self._timers[0][0] if self._timers else math.inf,
                          self._later[0][0] if self._later else math.inf)
                timeout = min(SWEEP_INTERVAL, max(0.0, due - time.monotonic()))
            try:
                events = self.selector.select(timeout)
            except OSError:
                log.exception("%s: select failed", self.name)
                continue
            self._dispatch(events)
            del events  # a closed connection must not live on in this frame till the next
            self._run_calls()
            if self._later and self._later[0][0] <= time.monotonic():
                self._run_later()
            if self._timers and self._timers[0][0] <= time.monotonic():
                self._run_timers()
        self._run_calls()
        self.selector.close()
        self._wake_r.close()
        self._wake_w.close()

    def _run_timers(self) -> None:
        now = time.monotonic()
        timers, timer_at = self._timers, self._timer_at
        while timers and timers[0][0] <= now:
            _when, _, ref = heapq.heappop(timers)
            handler = ref[0]
            if handler is None:
                continue  # cancelled, or superseded by an earlier one
            del timer_at[handler]
            if handler not in self.handlers:
                continue  # closed since
            try:
                again = handler.tick(now)
            except Exception:
                log.exception("%s: unhandled error in a deadline check", self.name)
                again = now + SWEEP_INTERVAL
            if again is not None:
                self.schedule(handler, max(again, now + 0.001))

    def _dispatch(self, events: list[tuple[selectors.SelectorKey, int]]) -> None:
        for key, mask in events:
            handler = key.data
            if handler is None:
                self._drain_wakeups()
                continue
            try:
                handler.on_io(mask)
            except Exception:
                log.exception("%s: unhandled error in connection I/O", self.name)

    def _run_later(self) -> None:
        now = time.monotonic()
        later = self._later
        while later and later[0][0] <= now:
            _when, _, fn, args = heapq.heappop(later)
            try:
                fn(*args)
            except Exception:
                log.exception("%s: unhandled error in a delayed call", self.name)

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

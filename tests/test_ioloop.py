"""The loop's deadline timers: never before what was asked, at most the slack after it,
re-armed by `tick`."""

from __future__ import annotations

import threading
import time

from chat.ioloop import IOLoop


class Ticker:
    def __init__(self, answers: list[float | None]) -> None:
        self.answers = answers
        self.calls: list[float] = []
        self.done = threading.Event()

    def on_io(self, mask: int) -> None:
        pass

    def tick(self, now: float) -> float | None:
        self.calls.append(now)
        if not self.answers:
            self.done.set()
            return None
        return self.answers.pop(0)


def _loop() -> IOLoop:
    loop = IOLoop("test-loop")
    loop.start()
    return loop


def test_tick_comes_at_its_time_and_again_when_asked() -> None:
    loop = _loop()
    try:
        t0 = time.monotonic()
        h = Ticker([t0 + 0.4])
        loop.handlers.add(h)
        loop.call_soon(loop.schedule, h, t0 + 0.2)
        assert h.done.wait(20)
        assert len(h.calls) == 2
        assert h.calls[0] >= t0 + 0.2 and h.calls[1] >= t0 + 0.4
        time.sleep(0.3)
        assert len(h.calls) == 2  # None: not ticked again
    finally:
        loop.stop()
        loop.join(5)


def test_an_earlier_timer_replaces_a_later_one_and_a_later_one_is_ignored() -> None:
    loop = _loop()
    try:
        t0 = time.monotonic()
        h = Ticker([])
        loop.handlers.add(h)

        def arm() -> None:
            loop.schedule(h, t0 + 0.5)
            loop.schedule(h, t0 + 0.1)  # earlier: replaces
            loop.schedule(h, t0 + 0.6)  # later than the live one: nothing

        loop.call_soon(arm)
        assert h.done.wait(20)
        time.sleep(max(0.0, t0 + 1.0 - time.monotonic()))
        assert len(h.calls) == 1  # the replaced entries did not fire as well
    finally:
        loop.stop()
        loop.join(5)


def test_a_closed_handler_is_not_ticked() -> None:
    loop = _loop()
    try:
        h = Ticker([])
        loop.call_soon(loop.schedule, h, time.monotonic() + 0.1)  # never added
        marker = Ticker([])
        loop.handlers.add(marker)
        loop.call_soon(loop.schedule, marker, time.monotonic() + 0.3)
        assert marker.done.wait(20)
        assert h.calls == []
    finally:
        loop.stop()
        loop.join(5)


def test_slack_makes_nearby_deadlines_come_due_together() -> None:
    loop = IOLoop("test-loop", timer_slack=0.5)
    loop.start()
    try:
        t0 = time.monotonic()
        # Two deadlines within one half-second step of the grid.
        base = (int(t0 / 0.5) + 2) * 0.5
        a, b = Ticker([]), Ticker([])
        loop.handlers.update((a, b))

        def arm() -> None:
            loop.schedule(a, base + 0.05)
            loop.schedule(b, base + 0.45)

        loop.call_soon(arm)
        assert a.done.wait(20) and b.done.wait(20)
        # Neither early, both moved to the step's end, and run by one pass of the timers
        # (a pass hands every tick the same `now`).
        assert a.calls[0] >= base + 0.5
        assert a.calls == b.calls
    finally:
        loop.stop()
        loop.join(5)

"""Presence for people: a burst of joins or departures becomes one line.

A server restart brings everyone back at once, and each comer is announced in every room
they share with us; shown one by one, that is a screen of `joined` lines hiding the
conversation. `PresenceBatch` holds presence frames for up to `PRESENCE_WINDOW` after the
first, then gives them back grouped: one group per kind (came online, went offline, joined
#room, left #room), each listing its names once, in the order they came. For one person and
one kind the latest event wins (online then offline within the window: offline), and coming
online is one event whichever rooms it was announced in.

Theory of operation
-------------------
Only the printer thread uses a batch (no lock). It holds presence frames with `add`, waits
for the next frame no longer than `time_left`, and calls `take` when that time is up or when
it is about to show anything else, so no line ever overtakes a presence that came before it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from chat.client.errors import Frame

# Seconds a presence waits for others of its kind: a restart's reconnections (which the
# server already sends in batches of about a second) fall within it, and a lone join still
# shows while it is news.
PRESENCE_WINDOW = 2.0


@dataclass(frozen=True)
class PresenceGroup:
    """Several presence events of one kind: `event` join/leave, `cause` connection/room."""

    event: str
    cause: str
    room: str | None  # None for the connection kind: it is about the person, not a room
    names: tuple[str, ...]
    ts: object  # the first one's time stamp, if the server gave one


def _kind(frame: Frame) -> tuple[str, str, str | None]:
    # A server without `cause` only ever sent explicit joins and leaves.
    cause = "connection" if frame.get("cause") == "connection" else "room"
    room = frame.get("room")
    where = None if cause == "connection" else (room.lower() if isinstance(room, str) else "?")
    return str(frame.get("event")), cause, where


class PresenceBatch:
    """Presence frames held for at most `window` seconds, then taken as groups."""

    def __init__(
        self, window: float = PRESENCE_WINDOW, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._window = window
        self._clock = clock
        self._held: dict[tuple[str, str, str | None], Frame] = {}  # (name, cause, room)
        self._since: float | None = None

    def add(self, frame: Frame) -> None:
        name = str(frame.get("username", "?"))
        _event, cause, room = _kind(frame)
        key = (name.casefold(), cause, room)
        self._held[key] = frame  # the latest event for this person wins, in the first's place
        if self._since is None:
            self._since = self._clock()

    def time_left(self) -> float | None:
        """Seconds until the held frames are due (0: now); None if none is held."""
        if self._since is None:
            return None
        return max(0.0, self._since + self._window - self._clock())

    def take(self) -> list[PresenceGroup]:
        """The held frames as groups (in the order each kind first came); none held after."""
        groups: dict[tuple[str, str, str | None], list[Frame]] = {}
        for frame in self._held.values():
            groups.setdefault(_kind(frame), []).append(frame)
        self._held.clear()
        self._since = None
        return [
            PresenceGroup(event, cause, room,
                          tuple(str(f.get("username", "?")) for f in frames), frames[0].get("ts"))
            for (event, cause, room), frames in groups.items()
        ]

"""chat.client.presence: a burst of presence becomes one line per kind, on a fake clock."""

from __future__ import annotations

from typing import Any

from chat.client.presence import PresenceBatch, PresenceGroup


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def presence(name: str, event: str = "join", cause: str | None = "connection",
             room: str = "general") -> dict[str, Any]:
    frame = {"type": "presence", "room": room, "username": name, "event": event}
    if cause is not None:
        frame["cause"] = cause
    return frame


def test_nothing_held_nothing_due() -> None:
    batch = PresenceBatch(2.0, Clock())
    assert batch.time_left() is None
    assert batch.take() == []


def test_the_window_runs_from_the_first_frame_held() -> None:
    clock = Clock()
    batch = PresenceBatch(2.0, clock)
    batch.add(presence("alice"))
    assert batch.time_left() == 2.0
    clock.now += 1.5
    batch.add(presence("bob"))
    assert batch.time_left() == 0.5  # a later frame does not extend it
    clock.now += 1.0
    assert batch.time_left() == 0.0
    assert batch.take() == [PresenceGroup("join", "connection", None, ("alice", "bob"), None)]
    assert batch.time_left() is None


def test_coming_online_is_one_event_whatever_the_rooms() -> None:
    batch = PresenceBatch(2.0, Clock())
    for room in ("general", "dev", "ops"):
        batch.add(presence("carol", room=room))
    batch.add(presence("dave", room="dev"))
    assert batch.take() == [PresenceGroup("join", "connection", None, ("carol", "dave"), None)]


def test_kinds_are_kept_apart_and_rooms_too() -> None:
    batch = PresenceBatch(2.0, Clock())
    batch.add(presence("alice", "join", "room", "dev"))
    batch.add(presence("bob", "leave", "connection"))
    batch.add(presence("carol", "join", "room", "Ops"))
    batch.add(presence("dave", "join", None, "dev"))  # an older server: no cause, a room join
    assert batch.take() == [
        PresenceGroup("join", "room", "dev", ("alice", "dave"), None),
        PresenceGroup("leave", "connection", None, ("bob",), None),
        PresenceGroup("join", "room", "ops", ("carol",), None),
    ]


def test_for_one_person_and_kind_the_latest_event_wins() -> None:
    batch = PresenceBatch(2.0, Clock())
    batch.add(presence("alice", "join"))
    batch.add(presence("Alice", "leave"))
    assert batch.take() == [PresenceGroup("leave", "connection", None, ("Alice",), None)]


def test_any_frame_shape_is_held_and_taken() -> None:
    batch = PresenceBatch(2.0, Clock())
    batch.add({"type": "presence"})
    batch.add({"type": "presence", "username": 5, "room": ["x"], "event": None, "cause": 3})
    groups = batch.take()
    assert [g.names for g in groups] == [("?", "5")]

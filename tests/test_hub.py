"""The hub alone, with fake sessions and a fake clock: presence is coalesced, and what a
user's membership changes can cost everyone else is bounded per flush."""

from __future__ import annotations

import json

import pytest

from chat.hub import LocalHub, Session


class Out:
    def __init__(self) -> None:
        self.writes: list[bytes] = []

    def deliver(self, data: bytes) -> bool:
        self.writes.append(data)
        return True

    def accepting(self) -> bool:
        return True

    def end(self, reason: str) -> None:
        pass

    def frames(self) -> list[dict]:
        return [json.loads(line) for w in self.writes for line in w.splitlines()]


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def hub() -> LocalHub:
    return LocalHub(presence_interval=1.0, clock=Clock())


def online(hub: LocalHub, name: str, rooms: list[str], uid: int = 0) -> Session:
    s = Session(uid or abs(hash(name)) % 10000, name.lower(), name, "sid", out=Out())
    assert hub.attach(s, rooms, [])
    return s


def flush(hub: LocalHub) -> None:
    hub._clock.now += hub.presence_interval  # type: ignore[attr-defined]
    assert hub.presence_due() == 0.0
    hub.flush_presence()


def presence(session: Session) -> list[tuple[str, str, str, str]]:
    return [(f["room"], f["username"], f["event"], f["cause"])
            for f in session.out.frames() if f["type"] == "presence"]  # type: ignore[attr-defined]


def test_joins_and_leaves_within_an_interval_cancel_out(hub):
    watchers = [online(hub, f"w{i}", ["lobby"]) for i in range(50)]
    toggler = online(hub, "tog", ["general"])
    flush(hub)
    for w in watchers:
        w.out.writes.clear()  # type: ignore[attr-defined]
    user = toggler.user
    assert user is not None
    for _ in range(10):  # ten toggles, an even number: nothing changed in the end
        user.rooms.add("lobby")
        hub.joined(user, "lobby")
        user.rooms.discard("lobby")
        hub.left(user, "lobby")
    flush(hub)
    assert all(w.out.writes == [] for w in watchers)  # type: ignore[attr-defined]


def test_each_session_gets_one_write_per_flush_whatever_the_number_of_changes(hub):
    watchers = [online(hub, f"w{i}", ["lobby"]) for i in range(20)]
    flush(hub)
    for w in watchers:
        w.out.writes.clear()  # type: ignore[attr-defined]
    togglers = [online(hub, f"t{i}", ["general"]) for i in range(16)]
    for t in togglers:
        assert t.user is not None
        t.user.rooms.add("lobby")
        hub.joined(t.user, "lobby")
    flush(hub)
    for w in watchers:
        assert len(w.out.writes) == 1  # type: ignore[attr-defined]
        assert sorted(p[1] for p in presence(w)) == sorted(f"t{i}" for i in range(16))
        assert {p[2:] for p in presence(w)} == {("join", "room")}


def test_a_net_change_is_sent_once_with_the_latest_cause(hub):
    bob = online(hub, "bob", ["lobby"])
    flush(hub)
    carol = online(hub, "carol", ["lobby"])  # came online
    assert carol.user is not None
    carol.user.rooms.discard("lobby")
    hub.left(carol.user, "lobby")  # and left the room, before the flush
    flush(hub)
    assert presence(bob) == []  # was not there, is not there
    carol.user.rooms.add("lobby")
    hub.joined(carol.user, "lobby")
    hub.detach(carol)  # joined, then went offline
    flush(hub)
    assert presence(bob) == []


def test_online_and_offline_are_not_sent_to_the_users_own_sessions(hub):
    a1 = online(hub, "alice", ["lobby"])
    flush(hub)
    a2 = online(hub, "alice", ["lobby"])  # a second session: no change
    bob = online(hub, "bob", ["lobby"])
    flush(hub)
    assert presence(a1) == [("lobby", "bob", "join", "connection")]
    assert presence(bob) == []  # alice was there before bob; bob's own is not his news
    assert presence(a2) == [("lobby", "bob", "join", "connection")]


def test_a_leave_reaches_the_users_other_sessions(hub):
    a1 = online(hub, "alice", ["lobby", "general"])
    a2 = online(hub, "alice", ["lobby", "general"])
    bob = online(hub, "bob", ["lobby"])
    flush(hub)
    for s in (a1, a2, bob):
        s.out.writes.clear()  # type: ignore[attr-defined]
    user = a1.user
    assert user is not None
    user.rooms.discard("lobby")
    hub.left(user, "lobby")
    flush(hub)
    for s in (a1, a2, bob):
        assert presence(s) == [("lobby", "alice", "leave", "room")]
    assert hub.who("lobby") == ["bob"]


def test_the_first_change_after_a_quiet_interval_goes_out_at_once(hub):
    bob = online(hub, "bob", ["lobby"])
    flush(hub)
    online(hub, "carol", ["lobby"])
    assert hub.presence_due() == 1.0  # within the interval: coalesced
    hub._clock.now += 5  # a quiet while later
    online(hub, "dave", ["lobby"])
    assert hub.presence_due() == 0.0
    hub.flush_presence()
    assert [p[1] for p in presence(bob)] == ["carol", "dave"]


def test_online_and_offline_are_not_told_in_a_very_full_room(hub):
    hub.presence_room_limit = 5
    crowd = [online(hub, f"c{i}", ["general", "lobby"] if i < 3 else ["general"])
             for i in range(6)]
    flush(hub)
    for c in crowd:
        c.out.writes.clear()  # type: ignore[attr-defined]
    late = online(hub, "late", ["general", "lobby"])
    assert late.user is not None
    late.user.rooms.add("dev")
    hub.joined(late.user, "dev")
    flush(hub)
    # general has 7 sessions, over the limit: no online; lobby has 4: told.
    assert presence(crowd[0]) == [("lobby", "late", "join", "connection")]
    assert presence(crowd[4]) == []
    crowd[0].user.rooms.add("dev")  # type: ignore[union-attr]
    hub.joined(crowd[0].user, "dev")  # type: ignore[arg-type]
    crowd[0].user.rooms.discard("general")  # type: ignore[union-attr]
    hub.left(crowd[0].user, "general")  # type: ignore[arg-type]
    flush(hub)
    assert ("general", "c0", "leave", "room") in presence(crowd[5])  # a leave still is


def test_who_is_kept_until_the_room_changes(hub):
    online(hub, "bob", ["lobby"])
    first = hub.who("lobby")
    assert first == ["bob"] and hub.who("lobby") is first  # not built again
    carol = online(hub, "Carol", ["lobby"])
    assert hub.who("lobby") == ["bob", "Carol"]
    hub.detach(carol)
    assert hub.who("lobby") == ["bob"]

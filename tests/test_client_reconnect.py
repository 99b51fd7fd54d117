"""chat.client.reconnect: the backoff schedule, catch-up and dedupe, with a fake client."""

from __future__ import annotations

import itertools
import threading
from typing import Any
from unittest import mock

import pytest

from chat.client.commands import ChatState
from chat.client.errors import ConnectFailed, ConnectionClosed
from chat.client.reconnect import (
    CATCH_UP_LIMIT,
    GaveUp,
    Link,
    Seen,
    backoff_delays,
    reconnect,
    should_reconnect,
)


def message(msg_id: int, room: str | None = "general", sender: str = "bob",
            to: str | None = None) -> dict[str, Any]:
    frame: dict[str, Any] = {"type": "message", "msg_id": msg_id, "username": sender,
                             "message": f"m{msg_id}"}
    if to is not None:
        frame["to"] = to
    else:
        frame["room"] = room
    return frame


def test_the_backoff_doubles_from_1_to_60_seconds() -> None:
    delays = list(itertools.islice(backoff_delays(lambda lo, hi: 1.0), 9))
    assert delays == [1, 2, 4, 8, 16, 32, 60, 60, 60]


def test_the_jitter_stays_within_20_percent() -> None:
    low = list(itertools.islice(backoff_delays(lambda lo, hi: lo), 3))
    high = list(itertools.islice(backoff_delays(lambda lo, hi: hi), 3))
    assert low == pytest.approx([0.8, 1.6, 3.2]) and high == pytest.approx([1.2, 2.4, 4.8])
    for delay, nominal in zip(itertools.islice(backoff_delays(), 12),
                              [1, 2, 4, 8, 16, 32, 60, 60, 60, 60, 60, 60], strict=True):
        assert 0.8 * nominal <= delay <= 1.2 * nominal


def test_when_to_reconnect() -> None:
    assert should_reconnect(None) and should_reconnect("shutdown") and should_reconnect("idle")
    assert not should_reconnect("quit") and not should_reconnect("too_many_errors")


def test_seen_dedupes_by_msg_id_and_tracks_marks() -> None:
    seen = Seen("alice")
    assert seen.fresh(message(5)) and not seen.fresh(message(5))
    assert seen.fresh(message(9, room="Dev"))
    assert seen.fresh(message(7, sender="alice", to="carol"))
    assert seen.fresh(message(8, sender="dave", to="alice"))
    assert seen.fresh({"type": "presence"}) and seen.fresh({"type": "presence"})
    assert seen.rooms == {"general": 5, "dev": 9}
    assert seen.peers == {"carol": 7, "dave": 8}
    assert seen.catch_up_requests({"general", "dev", "ops"}, None) == [
        {"type": "history", "room": "dev", "after": 9},
        {"type": "history", "room": "general", "after": 5},
        {"type": "history", "room": "ops", "after": 9},
        {"type": "history", "with": "carol", "after": 7},
        {"type": "history", "with": "dave", "after": 8},
    ]
    assert Seen("alice").catch_up_requests({"general"}, None) == []


def test_with_a_position_every_room_and_the_direct_messages_are_caught_up_from_it() -> None:
    # Nothing shown at all (logged in with --recent 0, say): the position alone decides.
    assert Seen("alice").catch_up_requests({"general", "dev"}, 40) == [
        {"type": "history", "room": "dev", "after": 40},
        {"type": "history", "room": "general", "after": 40},
        {"type": "history", "direct": True, "after": 40},
    ]


def test_over_several_nodes_each_conversation_is_caught_up_from_its_own_position() -> None:
    """Ids commit in order only within a conversation there: den's 95 may be stored after
    general's 100 was received. The welcome's `positions` and what came in each
    conversation say where each stands; a room joined since, the welcome's last_msg_id."""
    from chat.client.positions import Positions

    positions = Positions.from_welcome({"rooms": {"General": 90, "den": 80}, "direct": 70},
                                       last_msg_id=92)
    assert positions is not None
    for frame in (message(100, "general"), message(99, "ops"),
                  message(93, None, "carol", to="alice"), {"type": "message", "msg_id": True}):
        positions.note(frame)
    assert positions.room("general") == 100 and positions.room("den") == 80
    assert positions.room("ops") == 99 and positions.room("new") == 92
    assert positions.direct == 93
    assert Seen("alice").catch_up_requests({"general", "den", "new"}, 100,
                                           positions=positions) == [
        {"type": "history", "room": "den", "after": 80},
        {"type": "history", "room": "general", "after": 100},
        {"type": "history", "room": "new", "after": 92},
        {"type": "history", "direct": True, "after": 93},
    ]
    # A backlog cut short still starts the direct messages before its first.
    assert Seen("alice").catch_up_requests({"den"}, 100, 9, positions)[-1] == \
        {"type": "history", "direct": True, "after": 9}


@pytest.mark.parametrize("said", [None, "x", {"rooms": []}, {"rooms": {}, "direct": "1"}])
def test_a_welcome_without_positions_leaves_the_one_node_rule(said: Any) -> None:
    from chat.client.positions import Positions

    assert Positions.from_welcome(said, 5) is None


def test_seen_forgets_old_ids_beyond_its_capacity() -> None:
    seen = Seen(capacity=2)
    for msg_id in (1, 2, 3):
        assert seen.fresh(message(msg_id))
    assert seen.fresh(message(1)) and not seen.fresh(message(3))


class FakeClient:
    """Answers login, join and history from a store of messages; records requests."""

    def __init__(self, store: list[dict[str, Any]], rooms: list[str],
                 login_reply: dict[str, Any] | None = None, *, page: int | None = None,
                 direct: bool = True) -> None:
        self.store = store
        self.rooms = rooms
        self.login_reply = login_reply
        self.page = page  # a page this long at most, whatever the limit (the byte limit)
        self.direct = direct  # False: a server that refuses `history direct`
        self.requests: list[dict[str, Any]] = []
        self.username: str | None = None
        self.closed = False

    def request(self, frame: dict[str, Any], timeout: float = 10, *, quiet: bool = False
                ) -> dict[str, Any]:
        assert quiet
        self.requests.append(frame)
        if frame["type"] == "login":
            return self.login_reply or {"type": "welcome", "username": "alice",
                                        "rooms": self.rooms}
        if frame["type"] == "join":
            return {"type": "ok", "op": "join", "room": frame["room"]}
        assert frame["type"] == "history"
        if "room" in frame:
            found = [m for m in self.store if m.get("room") == frame["room"]]
        elif frame.get("direct"):
            if not self.direct:
                return {"type": "error", "code": "invalid_field", "message": "direct?"}
            found = [m for m in self.store if "to" in m]
        else:
            found = [m for m in self.store if frame["with"] in (m.get("to"), m["username"])
                     and "to" in m]
        found = [m for m in found if m["msg_id"] > frame["after"]][:frame["limit"]]
        return {"type": "history", "messages": found[:self.page]}

    def close(self, timeout: float = 10) -> None:
        self.closed = True


def test_reconnect_backs_off_logs_in_and_catches_up_without_repeats() -> None:
    seen = Seen("alice")
    for frame in (message(1), message(2, room="dev"), message(3, sender="carol", to="alice")):
        seen.fresh(frame)
    store = [message(1), message(2, room="dev"), message(3, sender="carol", to="alice"),
             *(message(i, room="dev") for i in range(10, 10 + CATCH_UP_LIMIT + 5)),
             message(400), message(401, sender="alice", to="carol")]
    fake = FakeClient(store, rooms=["dev", "general"])
    attempts = iter([ConnectFailed("refused"), ConnectFailed("refused"), fake])

    def connect() -> FakeClient:
        outcome = next(attempts)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    slept: list[float] = []
    notes: list[str] = []
    state = ChatState.start("dev", ["general", "dev"])
    client, missed = reconnect(
        connect, "alice", lambda: "the password", state, seen, notify=notes.append,
        timeout=5, sleep=slept.append, delays=iter([1.0, 2.0, 4.0]),
    )
    assert client is fake and fake.username == "alice"
    assert slept == [1.0, 2.0, 4.0]
    # One line a wait, saying why the last attempt failed.
    assert notes == ["connection lost; reconnecting in 1 s",
                     "reconnect failed: refused; trying again in 2 s",
                     "reconnect failed: refused; trying again in 4 s",
                     "reconnected as alice"]
    assert fake.requests[0]["password"] == "the password"
    assert not [r for r in fake.requests if r["type"] == "join"]
    shown = [m["msg_id"] for m in missed if seen.fresh(m)]
    assert shown == [*range(10, 10 + CATCH_UP_LIMIT + 5), 400, 401]
    assert [m["msg_id"] for m in missed if seen.fresh(m)] == []  # a second pass shows none


def test_the_servers_rooms_are_adopted_never_rejoined_and_the_changes_said() -> None:
    # While the connection was down, another session left #dev (the current room) and
    # joined #ops: the server's list is the truth, and #ops is caught up too.
    store = [message(41, room="dev"), message(42, room="ops"), message(43)]
    fake = FakeClient(store, rooms=["general", "ops"])
    state = ChatState.start("dev", ["general", "dev"])
    notes: list[str] = []
    _, missed = reconnect(
        lambda: fake, "alice", lambda: "pw", state, Seen("alice"), notify=notes.append,
        timeout=5, sleep=lambda _: None, delays=iter([0.0]), position=40,
    )
    assert not [r for r in fake.requests if r["type"] == "join"]
    assert sorted(m["msg_id"] for m in missed) == [42, 43]
    assert state.rooms == {"general", "ops"} and state.room == "general"
    assert notes[1:] == [
        "reconnected as alice",
        "while you were away you stopped being in #dev; now talking in #general",
        "while you were away you joined #ops (in another session)",
    ]


def test_a_reconnect_with_the_same_rooms_says_nothing_of_them() -> None:
    fake = FakeClient([], rooms=["dev", "general"])
    state = ChatState.start("dev", ["general"])
    notes: list[str] = []
    reconnect(lambda: fake, "alice", lambda: "pw", state, Seen("alice"), notify=notes.append,
              timeout=5, sleep=lambda _: None, delays=iter([0.0]), position=40)
    assert notes[1:] == ["reconnected as alice"] and state.room == "dev"


def test_adopting_the_servers_rooms() -> None:
    state = ChatState.start("ops", ["general", "ops", "dev"])
    assert state.adopt(["general", "ops", "dev"]) == []
    assert state.adopt(["GENERAL", "ops"]) == [
        "while you were away you stopped being in #dev"]
    assert state.room == "ops"
    assert state.adopt(["dev", "qa"]) == [
        "while you were away you stopped being in #general, #ops; "
        "now talking in #dev",
        "while you were away you joined #dev, #qa (in another session)",
    ]
    assert state.room == "dev" and state.rooms == {"dev", "qa"}
    assert state.adopt([]) == [
        "while you were away you stopped being in #dev, #qa; "
        "you are in no room; /join one"]
    assert state.room is None


def test_the_catch_up_starts_at_the_position_whatever_was_shown() -> None:
    seen = Seen("alice")  # nothing shown: --recent 0 and a quiet room
    store = [message(5), message(41), message(42, room="dev"),
             message(43, sender="carol", to="alice"), message(44, sender="alice", to="dave"),
             *(message(i) for i in range(50, 60))]
    fake = FakeClient(store, rooms=["general", "dev"], page=3)  # pages cut short
    _, missed = reconnect(
        lambda: fake, "alice", lambda: "pw", ChatState.start("general", ["dev"]), seen,
        notify=lambda _: None, timeout=5, sleep=lambda _: None, delays=iter([0.0]),
        position=40,
    )
    assert sorted(m["msg_id"] for m in missed) == [41, 42, 43, 44, *range(50, 60)]
    assert all(m["type"] == "message" for m in missed)


def test_a_server_without_history_direct_is_asked_peer_by_peer() -> None:
    seen = Seen("alice")
    seen.fresh(message(3, sender="carol", to="alice"))
    store = [message(3, sender="carol", to="alice"), message(45, sender="carol", to="alice")]
    fake = FakeClient(store, rooms=["general"], direct=False)
    _, missed = reconnect(
        lambda: fake, "alice", lambda: "pw", ChatState.start("general"), seen,
        notify=lambda _: None, timeout=5, sleep=lambda _: None, delays=iter([0.0]),
        position=40,
    )
    assert [m["msg_id"] for m in missed] == [45]
    assert {"type": "history", "with": "carol", "after": 40, "limit": CATCH_UP_LIMIT} in (
        fake.requests)


def test_a_catch_up_past_its_page_bound_says_so() -> None:
    store = [message(i) for i in range(1, 200)]
    fake = FakeClient(store, rooms=["general"], page=1)
    notes: list[str] = []
    with mock.patch("chat.client.reconnect.MAX_CATCH_UP_PAGES", 5):
        _, missed = reconnect(
            lambda: fake, "alice", lambda: "pw", ChatState.start("general"), Seen(),
            notify=notes.append, timeout=5, sleep=lambda _: None, delays=iter([0.0]),
            position=0,
        )
    assert [m["msg_id"] for m in missed] == [1, 2, 3, 4, 5]
    assert any("more was missed in #general" in note for note in notes)


def test_reconnect_gives_up_when_the_password_is_refused() -> None:
    fake = FakeClient([], [], login_reply={"type": "error", "code": "invalid_credentials"})
    with pytest.raises(GaveUp):
        reconnect(lambda: fake, "alice", lambda: "pw", ChatState.start("general"), Seen(),
                  notify=lambda _: None, timeout=5, sleep=lambda _: None,
                  delays=iter([1.0, 1.0]))
    assert fake.closed


def test_reconnect_gives_up_after_max_attempts() -> None:
    def connect() -> FakeClient:
        raise ConnectFailed("refused")

    with pytest.raises(GaveUp):
        reconnect(connect, "alice", lambda: "pw", ChatState.start("general"), Seen(),
                  notify=lambda _: None, timeout=5, sleep=lambda _: None,
                  delays=iter([1.0] * 10), max_attempts=3)


class Ended:
    """A client whose connection has ended, with `bye_reason`."""

    def __init__(self, bye_reason: str | None = None, last_msg_id: int | None = None,
                 direct_position: int | None = None) -> None:
        self.username = "alice"
        self.bye_reason = bye_reason
        self.last_msg_id = last_msg_id
        self.direct_position = direct_position
        self.closed = True


def test_a_link_does_not_reconnect_when_off_or_after_a_quit() -> None:
    for connect, reason in ((None, None), (lambda: pytest.fail("connected"), "quit")):
        old = Ended(reason)
        link = Link(old, ChatState.start("general"), connect=connect, password=lambda: "pw",
                    timeout=5)
        assert not link.resume(lambda _: pytest.fail("shown"), lambda _: pytest.fail("said"))
        assert link.ended and link.next_client(old) is None and link.current() is old


def test_a_link_reconnects_with_the_kept_password_and_shows_missed_messages_once() -> None:
    fake = FakeClient([message(1), message(2), message(3)], rooms=["general"])
    password = ["old"]
    link = Link(Ended("shutdown"), ChatState.start("general"), connect=lambda: fake,
                password=lambda: password[0], timeout=5, delays=lambda: iter([0.0]))
    assert link.seen.fresh(message(1))
    password[0] = "new"  # as after a /passwd
    shown: list[Any] = []
    notes: list[str] = []
    assert link.resume(shown.append, notes.append)
    assert link.client is fake and link.current(wait=False) is fake and not link.ended
    assert fake.requests[0]["password"] == "new"
    assert [m["msg_id"] for m in shown] == [2, 3]
    assert notes == ["connection lost; reconnecting in 0 s", "reconnected as alice"]
    assert not link.seen.fresh(message(3))  # the same message live: not shown again


def test_a_link_gives_up_on_a_refused_password() -> None:
    fake = FakeClient([], [], login_reply={"type": "error", "code": "invalid_credentials"})
    link = Link(Ended(), ChatState.start("general"), connect=lambda: fake,
                password=lambda: "pw", timeout=5, delays=lambda: iter([0.0]))
    notes: list[str] = []
    assert not link.resume(lambda _: None, notes.append)
    assert link.ended and fake.closed and "password was refused" in notes[-1]


def test_a_backlog_cut_short_is_caught_up_from_before_its_first_message() -> None:
    assert Seen("alice").catch_up_requests({"general"}, 40, 9) == [
        {"type": "history", "room": "general", "after": 40},
        {"type": "history", "direct": True, "after": 9},
    ]
    # Stored direct messages 10..12 were announced; 10 came and was shown, 11 and 12 were
    # lost with the connection. They are older than the position (40).
    store = [message(n, sender="carol", to="alice") for n in (10, 11, 12)]
    fake = FakeClient([*store, message(41)], rooms=["general"])
    link = Link(Ended(last_msg_id=40, direct_position=9), ChatState.start("general"),
                connect=lambda: fake, password=lambda: "pw", timeout=5,
                delays=lambda: iter([0.0]))
    assert link.seen.fresh(store[0])
    shown: list[Any] = []
    assert link.resume(shown.append, lambda _: None)
    assert sorted(m["msg_id"] for m in shown) == [11, 12, 41]


def test_stopping_a_link_ends_the_backoff_wait_at_once() -> None:
    link = Link(Ended(), ChatState.start("general"), connect=lambda: pytest.fail("connected"),
                password=lambda: "pw", timeout=5, delays=lambda: iter([60.0]))
    result: list[bool] = []
    notes: list[str] = []
    started = threading.Event()

    def note(text: str) -> None:
        notes.append(text)
        started.set()

    thread = threading.Thread(target=lambda: result.append(link.resume(lambda _: None, note)))
    thread.start()
    assert started.wait(5)
    assert link.current(wait=False) is None  # reconnecting: commands are not sent
    link.stop()
    thread.join(5)
    assert result == [False] and link.ended
    assert notes == ["connection lost; reconnecting in 60 s"]


class Blocking(FakeClient):
    """Logs in, then blocks in the first history request until it is closed."""

    def __init__(self) -> None:
        super().__init__([], rooms=["general"])
        self.asked = threading.Event()
        self.shut = threading.Event()

    def request(self, frame: dict[str, Any], timeout: float = 10, *, quiet: bool = False
                ) -> dict[str, Any]:
        if frame["type"] != "history":
            return super().request(frame, timeout, quiet=quiet)
        self.requests.append(frame)
        self.asked.set()
        assert self.shut.wait(timeout)
        raise ConnectionClosed("the connection is closed")

    def close(self, timeout: float = 10) -> None:
        super().close(timeout)
        self.shut.set()


def test_stopping_a_link_cancels_a_catch_up_under_way_and_says_the_user_quit() -> None:
    fake = Blocking()
    link = Link(Ended(last_msg_id=7), ChatState.start("general"), connect=lambda: fake,
                password=lambda: "pw", timeout=5, delays=lambda: iter([0.0, 0.0]))
    notes: list[str] = []
    result: list[bool] = []
    thread = threading.Thread(target=lambda: result.append(link.resume(lambda _: None,
                                                                        notes.append)))
    thread.start()
    assert fake.asked.wait(5)
    link.stop()
    thread.join(5)
    assert result == [False] and link.ended and link.interrupted and fake.closed
    assert fake.requests[1] == {"type": "history", "room": "general", "after": 7,
                                "limit": CATCH_UP_LIMIT}
    assert notes == ["connection lost; reconnecting in 0 s"]  # no "failed" on the way out


def test_stopping_a_live_link_is_not_an_interruption() -> None:
    live = Ended()
    live.closed = False
    link = Link(live, ChatState.start("general"), connect=lambda: live, password=lambda: "pw",
                timeout=5)
    link.stop()
    assert not link.interrupted
    ended = Link(Ended("too_many_errors"), ChatState.start("general"), connect=lambda: live,
                 password=lambda: "pw", timeout=5)
    ended.stop()  # the server ended it for good: no reconnection was going to happen
    assert not ended.interrupted

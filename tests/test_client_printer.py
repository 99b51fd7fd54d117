"""chat.client.printer: what the printer thread shows, in which order, with a fake connection.

The fake answers `who` and `history` from tables and hands out the events it was given; at
their end the connection counts as closed (and there is no reconnecting), so `Printer.run`
returns and every test reads the lines shown, in order. The presence window runs on a clock
that never moves: held presence is shown when something else is, or at the end.
"""

from __future__ import annotations

import queue
from collections.abc import Sequence
from typing import Any

from chat.client.commands import ChatState
from chat.client.completion import Roster
from chat.client.errors import ConnectionClosed, Frame, TimedOut
from chat.client.limits import ServerLimits
from chat.client.presence import PresenceBatch
from chat.client.printer import HINT, Handled, Printer
from chat.client.reconnect import Link

TS = "2026-11-23T19:50:16.123Z"


class FakeClient:
    def __init__(self, *, held: Sequence[Frame] = (), events: Sequence[Frame] = (),
                 who: dict[str, list[str]] | None = None,
                 history: dict[str, list[Frame]] | None = None,
                 roles: dict[str, str | None] | None = None) -> None:
        self.username = "me"
        self.hello: Frame = {}
        self.limits = ServerLimits()
        self.bye_reason: str | None = None
        self.closed = False
        self.asked: list[Frame] = []
        self._held = list(held)
        self._events: queue.SimpleQueue[Frame] = queue.SimpleQueue()
        for frame in events:
            self._events.put(frame)
        self._who = who or {}
        self._history = history or {}
        self._roles = roles or {}  # v1.1: the user's role in each room (None: invited)

    def request(self, frame: Frame, timeout: float = 10, *, quiet: bool = False) -> Frame:
        assert quiet, frame  # the printer's own requests are never events
        self.asked.append(frame)
        if frame["type"] == "list_rooms":
            return {"type": "rooms", "rooms": [
                {"room": r, "topic": "", "members": 1, "visibility": "private", "role": x}
                for r, x in sorted(self._roles.items())]}
        room = frame["room"]
        if frame["type"] == "room_info":
            return {"type": "room", "room": room, "visibility": "public", "history": "shared",
                    "topic": "", "role": self._roles.get(room), "members": 1}
        if frame["type"] == "who":
            return {"type": "who", "room": room, "users": self._who.get(room, [])}
        return {"type": "history", "room": room, "messages": self._history.get(room, [])}

    def pending_events(self) -> list[Frame]:
        held, self._held = self._held, []
        return held

    def next_event(self, timeout: float | None = None) -> Frame:
        try:
            return self._events.get_nowait()
        except queue.Empty:
            if timeout == 0:
                raise TimedOut("due") from None
            self.closed = True
            raise ConnectionClosed("the end") from None

    def close(self, timeout: float = 10) -> None:
        self.closed = True


def message(n: int, room: str = "general", text: str = "hi", **extra: Any) -> Frame:
    return {"type": "message", "msg_id": n, "ts": TS, "username": "bob", "room": room,
            "message": text, **extra}


def direct(n: int, text: str) -> Frame:
    return {"type": "message", "msg_id": n, "ts": TS, "username": "bob", "to": "me",
            "message": text}


def presence(name: str, event: str = "join", cause: str = "connection",
             room: str = "general") -> Frame:
    return {"type": "presence", "room": room, "username": name, "event": event,
            "cause": cause}


WELCOME = {"type": "welcome", "username": "me", "rooms": ["general"], "session": "s"}


class Frozen:
    def __call__(self) -> float:
        return 0.0


def run(client: FakeClient, backlog: Sequence[Frame | str] = (),
        state: ChatState | None = None, recent: int = 20) -> tuple[list[str], Printer]:
    state = state or ChatState.start("general", ["general"])
    shown: list[str] = []
    link = Link(client, state, connect=None, password=lambda: "", timeout=5)
    printer = Printer(link, state, Roster(), shown.append, color=False, recent=recent,
                      batch=PresenceBatch(2.0, Frozen()))
    printer.run(list(backlog))
    return [line[8:] if line.startswith("[") else line for line in shown], printer


def test_the_banner_comes_whole_and_live_presence_after_it() -> None:
    client = FakeClient(
        held=[presence("carol"), message(9, text="while logging in")],
        events=[message(10, text="live")],
        who={"general": ["me", "bob", "carol"]},
    )
    backlog: list[Frame | str] = [WELCOME, presence("dave"), "last messages in #general",
                                  message(8, text="older")]
    lines, _ = run(client, backlog)
    assert lines == [
        "-- logged in as me; rooms: #general",
        "-- last messages in #general",
        "#general bob: older",
        "-- online in #general: bob, carol",
        f"-- {HINT}",
        "-- 2 people came online: dave, carol",
        "#general bob: while logging in",
        "#general bob: live",
    ]


def test_with_recent_0_the_welcome_still_leads_and_what_came_while_away_is_grouped() -> None:
    client = FakeClient(
        held=[WELCOME, direct(3, "psst"), presence("carol"), direct(4, "still there?")],
        who={"general": ["me"]},
    )
    lines, _ = run(client, [], recent=0)
    assert lines == [
        "-- logged in as me; rooms: #general",
        "-- while you were away",
        "(dm) bob -> me: psst",
        "(dm) bob -> me: still there?",
        "-- nobody else is online in #general",
        f"-- {HINT}",
        "-- carol is online",
    ]


def test_a_burst_of_presence_is_one_line_and_never_overtakes_a_message() -> None:
    client = FakeClient(events=[
        presence("a"), presence("b"), presence("a", room="dev"), presence("c"),
        message(5, text="hello all"),
        presence("d", "leave"), presence("e", "leave", "room", "general"),
    ])
    lines, _ = run(client)
    assert lines[lines.index(f"-- {HINT}") + 1:] == [
        "-- 3 people came online: a, b, c",
        "#general bob: hello all",
        "-- d went offline",
        "-- e left #general",
    ]


def test_a_join_of_ours_shows_the_rooms_last_messages_and_who_is_there() -> None:
    ok = {"type": "ok", "op": "join", "room": "dev", "re": 7}
    client = FakeClient(
        events=[ok, presence("me", "join", "room", "dev"), message(21, "dev", "new")],
        who={"dev": ["alice", "bob", "me"]},
        history={"dev": [{k: v for k, v in message(20, "dev", "old").items() if k != "type"},
                         message(21, "dev", "new")]},
    )
    state = ChatState.start("general", ["general"])
    lines, printer = run(client, state=state, recent=5)
    assert lines[lines.index(f"-- {HINT}") + 1:] == [
        "-- ok: join #dev",
        "-- last messages in #dev",
        "#dev bob: old",
        "#dev bob: new",
        "-- online in #dev: alice, bob",
    ]  # our own presence says nothing; the live copy of `new` is not shown twice
    assert {"type": "history", "room": "dev", "limit": 5} in client.asked
    assert (state.room, state.rooms) == ("dev", {"general", "dev"})
    assert printer.handled.wait(client, 7, 0)


def test_another_session_leaving_the_current_room_switches_and_says_so() -> None:
    state = ChatState.start("dev", ["general", "dev"])
    client = FakeClient(events=[presence("me", "leave", "room", "dev")])
    lines, _ = run(client, state=state)
    assert lines[-1] == "-- you left #dev in another session; now talking in #general"
    assert state.room == "general"


def test_the_other_rooms_are_asked_who_is_there_for_completion() -> None:
    state = ChatState.start("general", ["general", "dev", "ops"])
    client = FakeClient(who={"general": ["me"], "dev": ["dana"], "ops": ["otto"]})
    shown: list[str] = []
    roster = Roster()
    link = Link(client, state, connect=None, password=lambda: "", timeout=5)
    printer = Printer(link, state, roster, shown.append, color=False)
    printer._ask_who(client, ["dev", "ops"])  # what the roster thread runs
    assert roster.users() == {"dana", "otto"}


def test_waiting_for_a_reply_ends_when_the_printer_does() -> None:
    handled = Handled()
    client = object()
    assert not handled.wait(client, 1, 0)
    handled.mark(client, 1)
    assert handled.wait(client, 1, 0)
    assert not handled.wait(object(), 1, 0)  # another connection's reply 1
    handled.close()
    assert handled.wait(client, 2, 0)


# -- version 1.1 --------------------------------------------------------------------------------


def test_roles_come_from_list_rooms_at_login_and_room_info_on_join() -> None:
    ok = {"type": "ok", "op": "join", "room": "ops", "re": 3}
    client = FakeClient(events=[ok], roles={"general": "member", "dev": "moderator",
                                            "ops": "owner", "secret": None})
    state = ChatState.start("dev", ["general", "dev"])
    roster = Roster()
    link = Link(client, state, connect=None, password=lambda: "", timeout=5)
    printer = Printer(link, state, roster, lambda line: None, color=False, recent=0)
    printer.run([])
    assert {"type": "list_rooms"} in client.asked
    assert {"type": "room_info", "room": "ops"} in client.asked
    assert state.roles == {"general": "member", "dev": "moderator", "ops": "owner"}
    assert state.prompt == "[ops owner]> "
    assert state.switch("dev") is None and state.prompt == "[dev moderator]> "
    assert state.switch("general") is None and state.prompt == "[general]> "
    assert "secret" in roster.rooms()  # an invitation: Tab offers it to /join


def test_being_kicked_from_the_current_room_switches_and_says_who_and_why() -> None:
    state = ChatState.start("dev", ["general", "dev"])
    removed = {"type": "removed", "room": "dev", "by": "alice", "how": "kick",
               "reason": "too loud"}
    client = FakeClient(events=[removed])
    lines, _ = run(client, state=state)
    assert lines[-2:] == ["-- alice kicked you from #dev: too loud", "-- now talking in #general"]
    assert (state.room, state.rooms) == ("general", {"general"})


def test_a_ban_elsewhere_forgets_the_room_and_its_role_quietly() -> None:
    state = ChatState.start("general", ["general", "dev"])
    state.set_role("dev", "moderator")
    removed = {"type": "removed", "room": "dev", "by": "alice", "how": "ban", "reason": ""}
    role = {"type": "role", "room": "general", "username": "me", "role": "moderator",
            "by": "root"}
    client = FakeClient(events=[removed, role])
    lines, _ = run(client, state=state)
    assert lines[-2:] == [
        "-- alice banned you from #dev (you cannot rejoin until unbanned)",
        "-- root made you moderator in #general",
    ]
    assert (state.room, state.rooms) == ("general", {"general"})
    assert state.roles == {"general": "moderator"}
    assert state.prompt == "[general moderator]> "

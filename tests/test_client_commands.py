"""chat.client.commands: /rooms, /switch, /me, /passwd and /help, without a terminal.

The line-mode end-to-end test runs the real CLI against the `chat_server` fixture.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from chat.client.commands import (
    CANNOT_LEAVE_DEFAULT,
    COMMAND_NAMES,
    HELP,
    HELP_KEYS,
    INTERACTIVE_ONLY,
    NO_ROOM,
    ChatState,
    Invalid,
    Notice,
    Passwd,
    Request,
    Switch,
    explain,
    normalize_room,
    parse_command,
    run_local,
)
from chat.client.format import format_event
from chat.client.ui import change_password_frame
from tests.test_client_cli import PASSWORD, new_name, run_cli, server_args

TS = "2026-11-23T19:50:16.123Z"


def test_help_lists_every_command() -> None:
    for name in COMMAND_NAMES:
        assert f"/{name}" in HELP, name
    assert '"/me ACTION"' in HELP


def test_help_fits_an_80_column_terminal_and_names_the_keys() -> None:
    for line in [*HELP.splitlines(), *HELP_KEYS.splitlines()]:
        assert len(line) < 80, line
    for key in ("Tab", "Up", "Ctrl-C", "Ctrl-D"):
        assert key in HELP_KEYS
    assert "/history more" in HELP


def test_rooms_asks_the_server_and_marks_the_current_one() -> None:
    state = ChatState.start("dev", ["general", "dev", "ops"])
    assert parse_command("/rooms", state.room) == Request({"type": "list_rooms"})
    assert isinstance(parse_command("/rooms extra", state.room), Invalid)
    listed = {"type": "rooms", "re": 1, "rooms": [
        {"room": "dev", "topic": "", "members": 2, "visibility": "public", "role": "owner"},
        {"room": "general", "topic": "", "members": 9, "visibility": "public", "role": "member"},
        {"room": "ops", "topic": "", "members": 1, "visibility": "private", "role": "member"},
    ]}
    text = format_event(listed, current=state.room)
    assert text is not None and text.splitlines()[0] == "-- rooms: *#dev #general #ops (* current)"


def test_switch_changes_the_current_room_among_joined_ones() -> None:
    state = ChatState.start("general", ["general", "dev"])
    action = parse_command("/switch Dev", state.room)
    assert action == Switch("Dev")
    assert run_local(Switch("Dev"), state) == "-- now talking in #dev"
    assert state.room == "dev"
    assert parse_command("hi", state.room) == Request(
        {"type": "send", "room": "dev", "message": "hi"})


def test_switch_to_a_room_not_joined_is_refused() -> None:
    state = ChatState.start("general", ["general"])
    assert run_local(Switch("ops"), state) == "! you are not in #ops; /join it first"
    assert state.room == "general"
    assert isinstance(parse_command("/switch", "general"), Invalid)
    assert isinstance(parse_command("/switch a b", "general"), Invalid)


def test_me_sends_the_text_with_its_prefix() -> None:
    assert parse_command("/me waves", "dev") == Request(
        {"type": "send", "room": "dev", "message": "/me waves"})
    assert isinstance(parse_command("/me", "dev"), Invalid)
    assert isinstance(parse_command("/me waves", None), Notice)


def test_me_messages_are_shown_as_actions() -> None:
    frame = {"type": "message", "msg_id": 1, "ts": TS, "username": "alice",
             "room": "general", "message": "/me waves"}
    assert format_event(frame, tz=None).endswith(" #general * alice waves")
    dm = {**frame, "to": "bob"}
    del dm["room"]
    assert format_event(dm).endswith(" (dm) -> bob * alice waves")
    plain = {**frame, "message": "/meh not an action"}
    assert format_event(plain).endswith(" #general alice: /meh not an action")


def test_passwd_takes_no_arguments() -> None:
    assert parse_command("/passwd", "general") == Passwd()
    refused = parse_command("/passwd old-secret new-secret", "general")
    assert isinstance(refused, Invalid)
    assert "old-secret" not in refused.message


def test_change_password_frame_asks_three_times() -> None:
    answers = iter(["old one", "new one", "new one"])
    assert change_password_frame(lambda _: next(answers)) == {
        "type": "passwd", "old": "old one", "new": "new one"}
    differ = iter(["old one", "new one", "other"])
    assert "differ" in str(change_password_frame(lambda _: next(differ)))
    empty = iter([""])
    assert "empty" in str(change_password_frame(lambda _: next(empty)))


@pytest.mark.parametrize("line", ["/passwd", "/passwd a b"])
def test_line_mode_refuses_passwd_and_runs_rooms_switch_me(
    chat_server: Any, tmp_path: Path, line: str
) -> None:
    name = new_name()
    chat_server.register(name, PASSWORD)
    script = "\n".join([line, "/join dev", "/rooms", "/switch general", "/me waves",
                        "/switch nowhere", ""])
    result = run_cli("login", *server_args(chat_server, name), input=script)
    assert result.returncode == 0, result.stderr
    if line == "/passwd":
        assert INTERACTIVE_ONLY in result.stderr
    else:
        assert "takes no arguments" in result.stderr
    lines = result.stdout.splitlines()
    assert "-- rooms: *#dev #general (* current)" in lines
    assert "-- now talking in #general" in lines
    assert any(x.endswith(f"#general * {name} waves") for x in lines)
    assert "you are not in #nowhere" in result.stderr


# -- rooms as users type them -------------------------------------------------------------------


def test_a_room_may_be_typed_with_its_hash() -> None:
    assert normalize_room("#dev") == "dev"
    assert normalize_room("  dev ") == "dev"
    assert normalize_room("#Dev") == "Dev"  # case is for the server to fold
    assert parse_command("/join #random", "general") == Request(
        {"type": "join", "room": "random"})
    assert parse_command("/leave #dev", "general") == Request({"type": "leave", "room": "dev"})
    assert parse_command("/who #dev", "general") == Request({"type": "who", "room": "dev"})
    assert parse_command("/switch #dev", "general") == Switch("dev")
    assert parse_command("/history #dev", "general") == Request(
        {"type": "history", "room": "dev"})
    for line in ("/join #", "/join # dev", "/leave #a b", "/who #a b"):
        assert isinstance(parse_command(line, "general"), Invalid), line
    state = ChatState.start("general", ["general", "dev"])
    assert run_local(Switch("#DEV"), state) == "-- now talking in #dev"


def test_general_cannot_be_left_and_nothing_is_sent() -> None:
    assert parse_command("/leave general", "dev") == Invalid(CANNOT_LEAVE_DEFAULT)
    assert parse_command("/leave #General", "dev") == Invalid(CANNOT_LEAVE_DEFAULT)
    assert parse_command("/leave", "general") == Invalid(CANNOT_LEAVE_DEFAULT)


# -- /history -----------------------------------------------------------------------------------


def test_history_of_the_room_of_a_room_or_with_a_user() -> None:
    state = ChatState.start("general", ["general", "dev"])

    def parsed(line: str) -> object:
        return parse_command(line, state.room, state=state)

    assert parsed("/history") == Request({"type": "history", "room": "general"})
    assert parsed("/history 5") == Request({"type": "history", "room": "general", "limit": 5})
    assert parsed("/history #ops 7") == Request({"type": "history", "room": "ops", "limit": 7})
    assert parsed("/history dev") == Request({"type": "history", "room": "dev"})  # one of ours
    assert parsed("/history bob") == Request({"type": "history", "with": "bob"})
    assert parsed("/history Bob 3") == Request({"type": "history", "with": "Bob", "limit": 3})
    # Too short for a user name: a room, not a usage error (the server says if not in it).
    assert parsed("/history qa 3") == Request({"type": "history", "room": "qa", "limit": 3})
    for line in ("/history 0", "/history bob 0", "/history a b", "/history a!b", "/history #"):
        assert isinstance(parsed(line), Invalid), line
    assert parse_command("/history bob", None) == Request({"type": "history", "with": "bob"})
    assert parse_command("/history", None) == Notice(NO_ROOM)


def test_a_history_of_a_user_that_is_not_there_hints_at_the_room() -> None:
    refused = {"type": "error", "code": "no_such_user", "message": "no such user"}
    assert explain({"type": "history", "with": "Dev"}, refused) == (
        "/history Dev is for your direct messages with a user; for the room, write "
        "/history #dev")
    assert explain({"type": "history", "with": "bob.smith"}, refused) is None  # no room name
    assert explain({"type": "send", "to": "dev", "message": "hi"}, refused) is None
    assert explain({"type": "history", "with": "dev"}, {"type": "history"}) is None


def _page(*ids: int) -> dict[str, Any]:
    return {"type": "history", "room": "dev",
            "messages": [{"msg_id": n, "ts": TS, "username": "a", "room": "dev",
                          "message": "m"} for n in ids]}


def test_history_more_pages_back_from_the_last_page_shown() -> None:
    state = ChatState.start("dev", ["general", "dev"])
    more = parse_command("/history more", state.room, state=state)
    assert isinstance(more, Notice) and "/history first" in more.message
    asked = {"type": "history", "room": "dev", "limit": 3}
    state.follow(asked, _page(7, 8, 9))
    more = parse_command("/history more", state.room, state=state)
    assert more == Request({"type": "history", "room": "dev", "before": 7, "limit": 3})
    assert isinstance(more, Request)
    state.follow(more.frame, _page(4, 5, 6))
    assert parse_command("/history more", "general", state=state) == Request(
        {"type": "history", "room": "dev", "before": 4, "limit": 3})
    state.follow({"type": "history", "with": "bob"}, {"type": "history", "with": "bob",
                                                      "messages": [{"msg_id": 30}]})
    assert parse_command("/history more", "dev", state=state) == Request(
        {"type": "history", "with": "bob", "before": 30, "limit": 50})
    # Line mode without the state cannot page; it says so rather than sending anything.
    assert isinstance(parse_command("/history more", "dev"), Notice)


# -- following the user's other sessions --------------------------------------------------------


def own(event: str, room: str, cause: str | None = "room", name: str = "Me") -> dict[str, Any]:
    frame = {"type": "presence", "room": room, "username": name, "event": event}
    if cause is not None:
        frame["cause"] = cause
    return frame


def test_another_sessions_join_and_leave_are_followed() -> None:
    state = ChatState.start("dev", ["general", "dev"])
    assert state.observe(own("join", "ops"), "me") == ["you joined #ops in another session"]
    assert (state.room, state.rooms) == ("dev", {"general", "dev", "ops"})
    assert state.observe(own("join", "ops"), "me") == []  # known: this session's own join
    assert state.observe(own("leave", "ops", cause=None), "me") == [
        "you left #ops in another session"]
    assert state.observe(own("leave", "dev"), "me") == [
        "you left #dev in another session; now talking in #general"]
    assert (state.room, state.rooms) == ("general", {"general"})
    assert state.observe(own("leave", "dev"), "me") == []  # this session's own, followed already
    # Someone else's presence, or the connection kind, changes nothing.
    assert state.observe(own("leave", "general", name="bob"), "me") == []
    assert state.observe(own("leave", "general", cause="connection"), "me") == []
    assert state.rooms == {"general"}


def test_this_sessions_own_join_and_leave_follow_their_ok() -> None:
    state = ChatState.start("general", ["general"])
    assert state.observe({"type": "ok", "op": "join", "room": "dev", "re": 3}, "me") == []
    assert (state.room, state.rooms) == ("dev", {"general", "dev"})
    assert state.observe({"type": "ok", "op": "leave", "room": "dev", "re": 4}, "me") == [
        "now talking in #general"]
    assert (state.room, state.rooms) == ("general", {"general"})


def test_a_message_from_a_room_not_known_means_another_session_joined_it() -> None:
    state = ChatState.start("general", ["general"])
    message = {"type": "message", "msg_id": 3, "ts": TS, "username": "bob", "room": "Ops",
               "message": "hi"}
    assert state.observe(message, "me") == ["you are in #ops: joined in another session"]
    assert state.rooms == {"general", "ops"} and state.room == "general"
    assert state.observe(message, "me") == []
    direct = {"type": "message", "msg_id": 4, "ts": TS, "username": "bob", "to": "me",
              "message": "psst"}
    assert state.observe(direct, "me") == []


def test_not_in_room_for_a_room_we_thought_we_were_in_corrects_the_state() -> None:
    state = ChatState.start("dev", ["general", "dev"])
    assert state.lost("dev") == (
        "you are no longer in #dev; now talking in #general")
    assert state.rooms == {"general"}
    assert state.lost("dev") is None  # not thought to be in it: nothing to correct


def test_the_state_can_be_read_while_another_thread_changes_it() -> None:
    import threading

    state = ChatState.start("general", ["general"])
    stop = threading.Event()

    def churn() -> None:
        n = 0
        while not stop.is_set():
            state.added(f"r{n % 50}")
            state.left(f"r{(n + 25) % 50}")
            n += 1

    thread = threading.Thread(target=churn)
    thread.start()
    try:
        for _ in range(2000):
            rooms = state.rooms
            assert sorted(rooms) == sorted(set(rooms))  # iterating never fails mid-change
            assert "general" in state.rooms
    finally:
        stop.set()
        thread.join()

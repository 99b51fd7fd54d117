"""chat.client.commands: /rooms, /switch, /me, /passwd and /help, without a terminal.

The line-mode end-to-end test runs the real CLI against the `chat_server` fixture.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from chat.client.commands import (
    COMMAND_NAMES,
    HELP,
    INTERACTIVE_ONLY,
    ChatState,
    Invalid,
    Notice,
    Passwd,
    Request,
    Rooms,
    Switch,
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


def test_rooms_lists_them_with_the_current_one_marked() -> None:
    state = ChatState.start("dev", ["general", "dev", "ops"])
    assert parse_command("/rooms", state.room) == Rooms()
    assert run_local(Rooms(), state) == "-- rooms: *#dev #general #ops"
    assert isinstance(parse_command("/rooms extra", state.room), Invalid)


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
    assert "-- rooms: *#dev #general" in lines
    assert "-- now talking in #general" in lines
    assert any(x.endswith(f"#general * {name} waves") for x in lines)
    assert "you are not in #nowhere" in result.stderr

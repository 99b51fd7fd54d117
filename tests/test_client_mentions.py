"""Mentions: a message naming you is highlighted (with colour) and rings the bell."""

from __future__ import annotations

import pytest

from chat.client.format import format_event, is_mention, mentions
from chat.client.printer import BELL, with_bell

TS = "2026-11-23T19:50:16.123Z"


def message(text: str, sender: str = "bob") -> dict[str, object]:
    return {"type": "message", "msg_id": 3, "ts": TS, "username": sender, "room": "general",
            "message": text}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("alice: lunch?", True), ("hi Alice.", True), ("@ALICE look", True),
        ("(alice)", True), ("/me pokes alice", True), ("line one\nalice", True),
        ("malice aforethought", False), ("alice_2 is not you", False),
        ("alice.smith is someone else", False), ("alice-b", False), ("nothing here", False),
    ],
)
def test_mentions_are_whole_words_in_any_case(text: str, expected: bool) -> None:
    assert mentions(text, "alice") is expected


def test_own_messages_and_other_frames_are_not_mentions() -> None:
    assert is_mention(message("hi alice"), "alice")
    assert not is_mention(message("hi alice", sender="Alice"), "alice")
    assert not is_mention(message("hi alice"), None)
    assert not is_mention({"type": "history", "messages": [message("alice")]}, "alice")


def test_a_mention_is_highlighted_only_with_colour() -> None:
    frame = message("alice: lunch?")
    plain = format_event(frame, me="alice")
    assert plain is not None and plain.endswith("#general bob: alice: lunch?")
    assert "\x1b" not in plain
    painted = format_event(frame, me="alice", color=True)
    assert painted is not None and "\x1b[1;7malice: lunch?\x1b[0m" in painted
    other = format_event(message("hello"), me="alice", color=True)
    assert other is not None and "\x1b[1;7m" not in other


def test_the_bell_rings_for_mentions_unless_turned_off() -> None:
    assert with_bell("x", message("alice!"), "alice", True) == BELL + "x"
    assert with_bell("x", message("alice!"), "alice", False) == "x"
    assert with_bell("x", message("bob!"), "alice", True) == "x"

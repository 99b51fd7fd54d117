"""chat.client.format: frames to terminal text; nothing a peer sends reaches the terminal raw."""

from __future__ import annotations

import io
import re
from datetime import UTC, datetime, timedelta, timezone

from hypothesis import given
from hypothesis import strategies as st

from chat.client.format import (
    INDENT,
    format_event,
    name_color,
    parse_ts,
    presence_text,
    sanitize,
    should_color,
    who_summary,
)

TS = "2026-11-23T19:50:16.123Z"
PLUS_ONE = timezone(timedelta(hours=1))
MINUS_FIVE_30 = timezone(-timedelta(hours=5, minutes=30))
ESC = "\x1b"
# What a terminal acts on: C0 but tab/newline, DEL, C1, bidi controls, separators, surrogates.
UNSAFE = re.compile(
    "[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069\u2028\u2029\ud800-\udfff]"
)


def room_message(text: str = "hello", **extra: object) -> dict[str, object]:
    return {
        "type": "message", "msg_id": 7, "ts": TS, "username": "alice", "room": "general",
        "message": text, **extra,
    }


def direct_message(text: str = "hi") -> dict[str, object]:
    return {"type": "message", "msg_id": 8, "ts": TS, "username": "alice", "to": "bob",
            "message": text}


# -- time ---------------------------------------------------------------------------------------


def test_time_is_shown_in_the_given_zone() -> None:
    assert format_event(room_message(), tz=UTC) == "[19:50] #general alice: hello"
    assert format_event(room_message(), tz=PLUS_ONE) == "[20:50] #general alice: hello"
    assert format_event(room_message(), tz=MINUS_FIVE_30).startswith("[14:20] ")


def test_time_crosses_midnight_in_local_time() -> None:
    late = room_message(ts="2026-11-23T23:30:00.000Z")
    assert format_event(late, tz=PLUS_ONE).startswith("[00:30] ")


def test_a_frame_without_ts_uses_now() -> None:
    presence = {"type": "presence", "room": "general", "username": "bob", "event": "join"}
    now = datetime(2026, 1, 2, 8, 5, tzinfo=UTC)
    assert format_event(presence, tz=UTC, now=now) == "[08:05] -- bob joined #general"


def test_an_unreadable_ts_does_not_break_formatting() -> None:
    now = datetime(2026, 1, 2, 8, 5, tzinfo=UTC)
    assert format_event(room_message(ts="yesterday"), tz=UTC, now=now).startswith("[08:05] ")
    assert parse_ts("2026-11-23T19:50:16.123Z") == datetime(
        2026, 11, 23, 19, 50, 16, 123000, tzinfo=UTC
    )
    assert parse_ts(12) is None


# -- layout -------------------------------------------------------------------------------------


def test_direct_messages_look_different_from_room_messages() -> None:
    room = format_event(room_message("hi"), tz=UTC)
    dm = format_event(direct_message("hi"), tz=UTC)
    assert dm == "[19:50] (dm) alice -> bob: hi"
    assert room is not None and "(dm)" not in room and "->" not in room


def test_continuation_lines_are_indented_under_the_header() -> None:
    text = format_event(room_message("one\ntwo\n\nfour"), tz=UTC)
    assert text == (
        "[19:50] #general alice: one\n"
        f"{INDENT}two\n"
        f"{INDENT}\n"
        f"{INDENT}four"
    )
    assert " " * len("[19:50] ") == INDENT


def test_presence_error_and_bye() -> None:
    now = datetime(2026, 1, 2, 8, 5, tzinfo=UTC)
    leave = {"type": "presence", "room": "dev", "username": "bob", "event": "leave"}
    assert format_event(leave, tz=UTC, now=now) == "[08:05] -- bob left #dev"
    error = {"type": "error", "code": "invalid_field", "message": "bad room", "re": 3}
    assert format_event(error) == "! error invalid_field: bad room"
    limited = {"type": "error", "code": "rate_limited", "message": "slow", "retry_after": 5}
    assert format_event(limited) == "! error rate_limited: slow (retry after 5 s)"
    assert format_event({"type": "bye", "reason": "quit"}) == "-- bye"
    assert format_event({"type": "bye", "reason": "idle"}) == "-- disconnected: idle for too long"
    assert format_event({"type": "bye", "reason": "odd"}) == "-- disconnected: odd"


def test_presence_says_online_and_offline_apart_from_joined_and_left() -> None:
    now = datetime(2026, 1, 2, 8, 5, tzinfo=UTC)

    def shown(event: str, cause: str) -> str | None:
        frame = {"type": "presence", "room": "dev", "username": "carol", "event": event,
                 "cause": cause}
        return format_event(frame, tz=UTC, now=now)

    assert shown("join", "connection") == "[08:05] -- carol is online"
    assert shown("leave", "connection") == "[08:05] -- carol went offline"
    assert shown("join", "room") == "[08:05] -- carol joined #dev"
    assert shown("leave", "room") == "[08:05] -- carol left #dev"
    assert shown("leave", "a newer cause") == "[08:05] -- carol left #dev"


def test_a_coalesced_presence_line_names_everyone_up_to_a_point() -> None:
    now = datetime(2026, 1, 2, 8, 5, tzinfo=UTC)
    names = [f"user{n}" for n in range(12)]
    assert presence_text("join", "connection", None, names[:3], tz=UTC, now=now) == (
        "[08:05] -- 3 people came online: user0, user1, user2")
    assert presence_text("leave", "room", "dev", names[:2], tz=UTC, now=now) == (
        "[08:05] -- 2 people left #dev: user0, user1")
    assert presence_text("join", "connection", None, names, tz=UTC, now=now) == (
        "[08:05] -- 12 people came online: user0, user1, user2, user3, user4, user5, user6, "
        "user7 and 4 others")
    assert presence_text("leave", "connection", None, names[:9], tz=UTC, now=now).endswith(
        "user7 and 1 other")


def test_the_who_summary_is_short_and_leaves_out_oneself() -> None:
    who = {"type": "who", "room": "dev", "users": ["alice", "Bob", "carol"]}
    assert who_summary(who, me="bob") == "-- online in #dev: alice, carol"
    many = {**who, "users": [f"u{n}" for n in range(8)]}
    assert who_summary(many) == "-- online in #dev: u0, u1, u2, u3, u4 and 3 others"
    assert who_summary({**who, "users": ["bob"]}, me="bob") == (
        "-- nobody else is online in #dev")
    assert who_summary({"type": "who", "room": "x", "users": 5}) == (
        "-- nobody else is online in #x")


def test_any_error_code_is_shown_with_its_text() -> None:
    forbidden = {"type": "error", "code": "forbidden", "message": "everyone is in general"}
    assert format_event(forbidden) == "! error forbidden: everyone is in general"
    novel = {"type": "error", "code": "brand_new_code", "message": "something new", "re": 4}
    assert format_event(novel) == "! error brand_new_code: something new"
    assert format_event({"type": "error", "code": "terse"}) == "! error terse"
    assert format_event({"type": "error", "code": 7, "message": "odd"}) == (
        "! error unknown: odd")
    assert format_event({"type": "error"}) == "! error unknown"


def test_who_history_welcome_ok() -> None:
    who = {"type": "who", "room": "general", "users": ["alice", "bob"]}
    assert format_event(who) == "-- online in #general: alice, bob"
    assert format_event({"type": "who", "room": "x", "users": []}) == "-- nobody online in #x"
    history = {"type": "history", "room": "general",
               "messages": [room_message("a"), room_message("b\nc")]}
    assert format_event(history, tz=UTC) == (
        "-- history #general: 2 messages\n"
        "[19:50] #general alice: a\n"
        f"[19:50] #general alice: b\n{INDENT}c"
    )
    dms = {"type": "history", "with": "bob", "messages": [direct_message()]}
    assert format_event(dms, tz=UTC) == (
        "-- history with bob: 1 message\n[19:50] (dm) alice -> bob: hi"
    )
    welcome = {"type": "welcome", "username": "alice", "rooms": ["general", "dev"], "session": "s"}
    assert format_event(welcome) == "-- logged in as alice; rooms: #general, #dev"
    assert format_event({"type": "ok", "op": "join", "room": "dev"}) == "-- ok: join #dev"


def test_ping_shows_nothing_and_unknown_frames_show_safely() -> None:
    assert format_event({"type": "ping"}) is None
    text = format_event({"type": "shiny", "x": "\x1b[2J\x7f"})
    assert text is not None and text.startswith("-- shiny: ")
    assert not UNSAFE.search(text)


# -- sanitising ---------------------------------------------------------------------------------


def test_escape_sequences_become_visible_text() -> None:
    assert sanitize("a\x1b[2Jb") == "a\\x1b[2Jb"
    assert sanitize("\x1b]0;pwned\x07") == "\\x1b]0;pwned\\x07"
    assert sanitize("over\rwrite\x08") == "over\\x0dwrite\\x08"
    assert sanitize("del\x7f") == "del\\x7f"


def test_c1_controls_are_escaped() -> None:
    # U+009B is a one-character CSI on terminals that honour 8-bit controls.
    assert sanitize("\x9b31m\x85\x9d") == "\\x9b31m\\x85\\x9d"


def test_bidi_controls_are_escaped() -> None:
    text = "abc\u202edcba\u2066x\u2069\u202a\u202c"
    assert sanitize(text) == "abc\\u202edcba\\u2066x\\u2069\\u202a\\u202c"


def test_tab_and_newline_survive_in_text_but_not_in_one_line_fields() -> None:
    assert sanitize("a\tb\nc") == "a\tb\nc"
    assert sanitize("a\tb\nc", multiline=False) == "a\\x09b\\x0ac"


def test_ordinary_unicode_is_untouched() -> None:
    text = "héllo wörld, 你好, emoji 👍🏽, zwj 👩‍💻, arabic مرحبا"
    assert sanitize(text) == text


def test_a_peer_cannot_smuggle_controls_through_any_field() -> None:
    evil = "\x1b[31m\x9b2J\u202e\r"
    frame = {"type": "message", "ts": TS, "username": evil, "room": evil, "message": evil}
    for color in (False, True):
        text = format_event(frame, tz=UTC, color=color)
        assert text is not None
        without_ours = re.sub(r"\x1b\[[0-9;]*m", "", text) if color else text
        assert not UNSAFE.search(without_ours)
        assert "\\x1b[31m" in without_ours  # shown, not acted on


@given(st.text())
def test_sanitize_never_lets_a_control_through(text: str) -> None:
    out = sanitize(text)
    assert not UNSAFE.search(out)
    assert set(out) & {"\n", "\t"} == set(text) & {"\n", "\t"}
    one_line = sanitize(text, multiline=False)
    assert not UNSAFE.search(one_line)
    assert "\n" not in one_line and "\t" not in one_line


@given(st.dictionaries(st.sampled_from(["username", "room", "to", "message", "ts"]), st.text()))
def test_format_event_output_is_always_safe(fields: dict[str, str]) -> None:
    for kind in ("message", "presence", "error", "who", "bye", "shiny"):
        text = format_event({**fields, "type": kind}, tz=UTC)
        assert text is not None
        assert not UNSAFE.search(text)
        assert ESC not in text


# Every shape a frame from a broken or hostile server can take once it parsed as a JSON object.
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12,
)
FIELDS = [
    "type", "username", "room", "to", "with", "message", "messages", "ts", "code", "reason",
    "retry_after", "users", "rooms", "op", "event", "server", "protocol", "re", "msg_id",
]
KINDS = ["message", "presence", "error", "bye", "who", "history", "welcome", "hello", "ok",
         "pong", "ping", "shiny"]
TIMES = st.sampled_from([
    TS, "0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00", "2026-02-30T00:00:00Z",
]) | st.text()


@given(
    st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=8), JSON, max_size=8),
    st.sampled_from(KINDS) | JSON,
    TIMES,
    st.lists(st.dictionaries(st.sampled_from(FIELDS), JSON, max_size=6), max_size=3),
    st.booleans(),
)
def test_format_event_takes_any_frame_shape(
    fields: dict[str, object], kind: object, ts: str, messages: list[object], color: bool
) -> None:
    for frame in (
        {**fields, "type": kind},
        {**fields, "type": kind, "ts": ts},
        {**fields, "type": "history", "messages": [*messages, {"type": "message", "ts": ts}]},
    ):
        for tz in (UTC, None):
            text = format_event(frame, tz=tz, me="alice", color=color)
            assert text is None or isinstance(text, str)
            if text is not None:
                without_ours = re.sub(r"\x1b\[[0-9;]*m", "", text)
                assert not UNSAFE.search(without_ours)


def test_format_event_survives_the_shapes_that_used_to_break_it() -> None:
    now = datetime(2026, 1, 2, 8, 5, tzinfo=UTC)
    assert format_event({"type": "who", "room": "x", "users": 5}) == "-- nobody online in #x"
    assert format_event({"type": "history", "room": "x", "messages": 3}) == (
        "-- history #x: 0 messages"
    )
    assert format_event({"type": "welcome", "username": "a", "rooms": 1}) == (
        "-- logged in as a; rooms: "
    )
    for retry_after in (10**400, float("nan"), float("inf"), -3, True, "5"):
        frame = {"type": "error", "code": "c", "message": "m", "retry_after": retry_after}
        assert format_event(frame) == "! error c: m"
    early = room_message(ts="0001-01-01T00:00:00+01:00")  # before year 1 in UTC
    assert format_event(early, tz=UTC, now=now) == "[08:05] #general alice: hello"


# -- colour -------------------------------------------------------------------------------------


def test_no_colour_means_no_escape_codes_at_all() -> None:
    frames = [
        room_message(), direct_message(),
        {"type": "presence", "room": "general", "username": "bob", "event": "join"},
        {"type": "error", "code": "x", "message": "y"},
        {"type": "who", "room": "general", "users": ["a"]},
        {"type": "welcome", "username": "alice", "rooms": ["general"]},
    ]
    for frame in frames:
        text = format_event(frame, tz=UTC, me="alice", color=False)
        assert text is not None and ESC not in text


def test_colour_keeps_the_text_and_adds_only_sgr_codes() -> None:
    plain = format_event(room_message(), tz=UTC, me="alice")
    colored = format_event(room_message(), tz=UTC, me="alice", color=True)
    assert colored is not None and ESC in colored
    assert re.sub(r"\x1b\[[0-9;]*m", "", colored) == plain


def test_a_name_has_the_same_colour_every_time() -> None:
    # CRC-32 of "alice", not hash(): the same in every process, on every machine.
    assert name_color("alice") == name_color("alice") == name_color("ALICE")
    assert name_color("alice") == 96
    assert len({name_color(f"user{n}") for n in range(100)}) > 6  # names are spread out
    a = format_event(room_message(), tz=UTC, color=True)
    b = format_event(room_message("other text"), tz=UTC, color=True)
    assert a is not None and b is not None
    assert f"\x1b[{name_color('alice')}malice" in a and f"\x1b[{name_color('alice')}malice" in b


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_colour_only_on_a_terminal_without_no_color() -> None:
    assert should_color(_Tty(), {}) is True
    assert should_color(_Tty(), {"NO_COLOR": "1"}) is False
    assert should_color(_Tty(), {"NO_COLOR": ""}) is True  # no-color.org: set and non-empty
    assert should_color(io.StringIO(), {}) is False

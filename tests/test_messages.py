"""Tests for chat.messages: request ids, request parsing and the protocol's field rules."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chat import messages as m
from chat.errors import InvalidField, UnknownType

PROPERTY = settings(
    deadline=None, max_examples=200, suppress_health_check=[HealthCheck.too_slow]
)
PASSWORD = "correct horse battery staple 42"
FORBIDDEN = [chr(c) for c in [*range(0x00, 0x09), *range(0x0B, 0x20), *range(0x7F, 0xA0)]]


def parse(**frame: Any) -> m.Request:
    return m.parse_request(frame)


def invalid(**frame: Any) -> InvalidField:
    with pytest.raises(InvalidField) as info:
        m.parse_request(frame)
    assert info.value.code == "invalid_field"
    return info.value


# --- request ids -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "rid",
    ["", "a", "x" * 64, "\u00e9" * 64, "\U0001f600" * 64, 0, 1, -1, 2**53 - 1, -(2**53 - 1)],
)
def test_valid_ids(rid: Any) -> None:
    assert m.request_id({"type": "ping", "id": rid}) == rid


def test_absent_or_null_id_is_none() -> None:
    assert m.request_id({"type": "ping"}) is None
    assert m.request_id({"type": "ping", "id": None}) is None


@pytest.mark.parametrize(
    "rid",
    [
        pytest.param("x" * 65, id="string-65"),
        pytest.param(2**53, id="int-2**53"),
        pytest.param(-(2**53), id="int-minus-2**53"),
        pytest.param(10**100, id="int-huge"),
        pytest.param(True, id="true"),
        pytest.param(False, id="false"),
        pytest.param(1.0, id="float-1.0"),
        pytest.param(1.5, id="float-1.5"),
        pytest.param("\ud800", id="lone-surrogate"),
        pytest.param("ok\udfff", id="lone-low-surrogate"),
        pytest.param([1], id="list"),
        pytest.param({"a": 1}, id="object"),
    ],
)
def test_invalid_ids(rid: Any) -> None:
    with pytest.raises(InvalidField):
        m.request_id({"type": "ping", "id": rid})


def test_parse_request_carries_the_id_it_is_given() -> None:
    assert m.parse_request({"type": "ping"}, "r1") == m.Ping("r1")
    assert m.parse_request({"type": "ping"}).id is None


# --- every request type ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("frame", "expected"),
    [
        ({"type": "ping"}, m.Ping(7)),
        ({"type": "pong"}, m.Pong(7)),
        ({"type": "quit"}, m.Quit(7)),
        ({"type": "register", "username": "alice", "password": PASSWORD},
         m.Register(7, "alice", PASSWORD)),
        ({"type": "login", "username": "Alice", "password": PASSWORD},
         m.Login(7, "Alice", PASSWORD)),
        ({"type": "send", "room": "General", "message": "hi"}, m.Send(7, "general", None, "hi")),
        ({"type": "send", "to": "Bob", "message": "hi"}, m.Send(7, None, "Bob", "hi")),
        ({"type": "join", "room": "Dev-Ops_2"}, m.Join(7, "dev-ops_2")),
        ({"type": "leave", "room": "general"}, m.Leave(7, "general")),
        ({"type": "who", "room": "GENERAL"}, m.Who(7, "general")),
        ({"type": "history", "room": "general"}, m.History(7, "general", None, None, None, 50)),
        ({"type": "history", "with": "bob", "after": 3, "limit": 10},
         m.History(7, None, "bob", None, 3, 10)),
        ({"type": "passwd", "old": PASSWORD, "new": PASSWORD + "!"},
         m.Passwd(7, PASSWORD, PASSWORD + "!", False)),
    ],
)
def test_every_request_type_parses(frame: dict[str, Any], expected: m.Request) -> None:
    req = m.parse_request(frame, 7)
    assert req == expected
    assert type(req) is type(expected)


def test_unknown_extra_fields_are_ignored() -> None:
    req = parse(type="send", room="general", message="hi", username="mallory", extra=[1])
    assert req == m.Send(None, "general", None, "hi")


def test_requests_are_frozen() -> None:
    req = parse(type="join", room="general")
    with pytest.raises(AttributeError):
        req.room = "other"  # type: ignore[misc]


@pytest.mark.parametrize("type_", ["nope", "", "PING", "Ping", "message", "welcome", "error"])
def test_unknown_type(type_: str) -> None:
    with pytest.raises(UnknownType) as info:
        m.parse_request({"type": type_})
    assert info.value.code == "unknown_type"


def test_unknown_type_message_is_bounded() -> None:
    with pytest.raises(UnknownType) as info:
        m.parse_request({"type": "x" * 10_000})
    assert len(info.value.message) < 100


# --- credentials -----------------------------------------------------------------------


@pytest.mark.parametrize("type_", ["register", "login"])
@pytest.mark.parametrize(
    "fields",
    [
        {"password": PASSWORD},
        {"username": "alice"},
        {"username": 5, "password": PASSWORD},
        {"username": "alice", "password": None},
        {"username": "alice", "password": ["x"]},
        {"username": "alice", "password": "\ud800" + PASSWORD},
        {"username": "alice", "password": "x" * (4 * m.MAX_PASSWORD_CHARS + 1)},
    ],
)
def test_bad_credentials_fields(type_: str, fields: dict[str, Any]) -> None:
    invalid(type=type_, **fields)


@pytest.mark.parametrize("type_", ["register", "login"])
def test_long_password_left_to_the_strength_rules(type_: str) -> None:
    # Over 256 characters is weak_password's business (chat.auth), not a framing error.
    req = parse(type=type_, username="alice", password="x" * (4 * m.MAX_PASSWORD_CHARS))
    assert len(req.password) == 4 * m.MAX_PASSWORD_CHARS  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "frame",
    [
        {"type": "register", "username": "alice", "password": "s3cret-Register-pw"},
        {"type": "login", "username": "alice", "password": "s3cret-Login-pw"},
        {"type": "passwd", "old": "s3cret-Old-pw", "new": "s3cret-New-pw"},
    ],
)
def test_passwords_never_appear_in_repr(frame: dict[str, Any]) -> None:
    req = m.parse_request(frame, "id-1")
    secrets = [v for k, v in frame.items() if k in ("password", "old", "new")]
    for text in (repr(req), str(req), f"{req!r}", repr([req]), repr({"r": req})):
        for secret in secrets:
            assert secret not in text
            assert secret[2:-2] not in text
    assert "id-1" in repr(req)
    # The value itself is intact for the code that needs it.
    for name in ("password", "old", "new"):
        if name in frame:
            value = getattr(req, name)
            assert value == frame[name]
            assert isinstance(value, str)


# --- send ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"room": "general", "to": "bob"},
        {"room": None, "to": None},
    ],
)
def test_send_needs_exactly_one_of_room_or_to(fields: dict[str, Any]) -> None:
    invalid(type="send", message="hi", **fields)


def test_send_null_target_counts_as_absent() -> None:
    assert parse(type="send", room="general", to=None, message="hi").room == "general"
    assert parse(type="send", room=None, to="bob", message="hi").to == "bob"


@pytest.mark.parametrize("to", [5, ["bob"], "\ud800bob"])
def test_send_to_must_be_a_string(to: Any) -> None:
    invalid(type="send", to=to, message="hi")


@pytest.mark.parametrize("room", ["", "a b", "x" * 33, 5])
def test_send_room_must_be_valid(room: Any) -> None:
    invalid(type="send", room=room, message="hi")


def test_send_without_message() -> None:
    invalid(type="send", room="general")
    invalid(type="send", room="general", message=None)
    invalid(type="send", room="general", message=42)


# --- message text ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "a",
        "hello world",
        "line one\nline two",
        "col\tcol",
        "  padded  ",
        "\n\tx\n",
        "x" * m.MAX_MESSAGE_CHARS,
        "\U0001f600" * m.MAX_MESSAGE_CHARS,  # characters, not bytes or UTF-16 units
        "\u00e9\u4e2d\u0627",
        "\u00a0x",
    ],
)
def test_message_text_accepted(text: str) -> None:
    assert m.message_text(text) == text
    assert parse(type="send", room="general", message=text).message == text  # type: ignore


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("", id="empty"),
        pytest.param("x" * (m.MAX_MESSAGE_CHARS + 1), id="too-long"),
        pytest.param(" ", id="space"),
        pytest.param(" \n\t \n", id="white-space"),
        pytest.param("\u00a0\u3000\u2028", id="unicode-white-space"),
        pytest.param("\ud800", id="lone-surrogate"),
        pytest.param("ok \udc00 ok", id="lone-low-surrogate"),
        pytest.param(b"bytes", id="bytes"),
        pytest.param(None, id="none"),
        pytest.param(["x"], id="list"),
    ],
)
def test_message_text_refused(text: Any) -> None:
    with pytest.raises(InvalidField):
        m.message_text(text)


@pytest.mark.parametrize("char", FORBIDDEN, ids=[f"U+{ord(c):04X}" for c in FORBIDDEN])
def test_every_control_character_refused(char: str) -> None:
    for text in (char, f"hello{char}", f"{char}hello", f"a{char}b"):
        with pytest.raises(InvalidField):
            m.message_text(text)
    invalid(type="send", to="bob", message=f"x{char}y")


def test_forbidden_set_is_c0_del_and_c1_minus_tab_and_newline() -> None:
    assert len(FORBIDDEN) == 32 - 2 + 1 + 32
    assert "\x1b" in FORBIDDEN and "\r" in FORBIDDEN and "\x85" in FORBIDDEN
    assert "\x9b" in FORBIDDEN  # the 8-bit CSI: an escape sequence without ESC
    assert "\t" not in FORBIDDEN and "\n" not in FORBIDDEN and "\xa0" not in FORBIDDEN


allowed_chars = st.characters(
    blacklist_categories=("Cs",), blacklist_characters="".join(FORBIDDEN)
)
visible_chars = st.characters(whitelist_categories=("L", "N", "P", "S"))


@PROPERTY
@given(
    before=st.text(allowed_chars, max_size=60),
    core=visible_chars,
    after=st.text(allowed_chars, max_size=60),
    repeat=st.integers(min_value=1, max_value=m.MAX_MESSAGE_CHARS),
)
def test_message_text_accepts_any_allowed_text_of_valid_length(
    before: str, core: str, after: str, repeat: int
) -> None:
    text = (before + core + after)[: m.MAX_MESSAGE_CHARS]
    if core not in text:  # cut off by the length limit: keep one visible character
        text = core + text[1:]
    if repeat > 1:
        text = (text * repeat)[: m.MAX_MESSAGE_CHARS]
    assert 1 <= len(text) <= m.MAX_MESSAGE_CHARS
    assert m.message_text(text) == text


@PROPERTY
@given(
    text=st.text(allowed_chars, max_size=200),
    bad=st.sampled_from(FORBIDDEN),
    at=st.integers(min_value=0),
)
def test_message_text_refuses_any_forbidden_control_char(text: str, bad: str, at: int) -> None:
    at %= len(text) + 1
    with pytest.raises(InvalidField):
        m.message_text(text[:at] + bad + text[at:])


@PROPERTY
@given(text=st.text(allowed_chars, max_size=40))
def test_message_text_of_only_white_space_refused(text: str) -> None:
    spaces = "".join(c for c in text if c.isspace())
    with pytest.raises(InvalidField):
        m.message_text(spaces or " ")


# --- rooms -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "canonical"),
    [
        ("general", "general"),
        ("General", "general"),
        ("a", "a"),
        ("A", "a"),
        ("0", "0"),
        ("_", "_"),
        ("-", "-"),
        ("Dev-Ops_2026", "dev-ops_2026"),
        ("X" * 32, "x" * 32),
    ],
)
def test_room_names(name: str, canonical: str) -> None:
    assert m.room_name(name) == canonical
    assert parse(type="join", room=name) == m.Join(None, canonical)


@pytest.mark.parametrize(
    "name",
    [
        pytest.param("", id="empty"),
        pytest.param("x" * 33, id="33-chars"),
        pytest.param("a b", id="space"),
        pytest.param("a.b", id="dot"),
        pytest.param("#general", id="hash"),
        pytest.param("general\n", id="trailing-newline"),
        pytest.param("\ngeneral", id="leading-newline"),
        pytest.param("caf\u00e9", id="accent"),
        pytest.param("\u212a", id="kelvin-sign"),  # lower()s to ASCII 'k'
        pytest.param("\u0661", id="arabic-digit"),
        pytest.param("\uff41", id="fullwidth-a"),
        pytest.param("\ud800", id="lone-surrogate"),
        pytest.param(None, id="none"),
        pytest.param(5, id="int"),
        pytest.param(["general"], id="list"),
    ],
)
def test_bad_room_names(name: Any) -> None:
    with pytest.raises(InvalidField):
        m.room_name(name)
    for type_ in ("join", "leave", "who"):
        invalid(type=type_, room=name)


@pytest.mark.parametrize("type_", ["join", "leave", "who"])
def test_room_required(type_: str) -> None:
    invalid(type=type_)


@PROPERTY
@given(st.from_regex(r"[A-Za-z0-9_-]{1,32}", fullmatch=True))
def test_any_valid_room_name_is_canonical_lower_case(name: str) -> None:
    canonical = m.room_name(name)
    assert canonical == name.lower()
    assert m.room_name(canonical) == canonical
    assert m.room_name(name.upper()) == canonical


# --- usernames (the shape; uniqueness is the store's) ----------------------------------


@pytest.mark.parametrize("name", ["abc", "Alice", "a.b", "a_b", "a-b", "0ab", "x" * 32])
def test_valid_usernames(name: str) -> None:
    assert m.valid_username(name)


@pytest.mark.parametrize(
    "name", ["", "ab", "x" * 33, ".abc", "_abc", "-abc", "a b", "abc\n", "al\u00efce", "abc!"]
)
def test_invalid_usernames(name: str) -> None:
    assert not m.valid_username(name)


# --- history ---------------------------------------------------------------------------


def test_history_defaults() -> None:
    assert parse(type="history", room="General") == m.History(
        None, "general", None, None, None, m.DEFAULT_HISTORY_LIMIT
    )
    assert m.DEFAULT_HISTORY_LIMIT == 50
    assert parse(type="history", **{"with": "Bob"}) == m.History(None, None, "Bob", None, None, 50)


@pytest.mark.parametrize(
    ("fields", "before", "after"),
    [
        ({"before": 10}, 10, None),
        ({"after": 10}, None, 10),
        ({"before": 0}, 0, None),
        ({"after": 0}, None, 0),
        ({"before": None, "after": 5}, None, 5),
        ({"before": 2**53 - 1}, 2**53 - 1, None),
    ],
)
def test_history_before_or_after(fields: dict[str, Any], before: Any, after: Any) -> None:
    req = parse(type="history", room="general", **fields)
    assert isinstance(req, m.History)
    assert (req.before, req.after) == (before, after)


@pytest.mark.parametrize(
    "fields",
    [
        pytest.param({"room": "general", "with": "bob"}, id="room-and-with"),
        pytest.param({}, id="neither"),
        pytest.param({"room": None, "with": None}, id="both-null"),
        pytest.param({"room": "general", "before": 5, "after": 1}, id="before-and-after"),
        pytest.param({"room": "general", "before": -1}, id="negative-before"),
        pytest.param({"room": "general", "after": -1}, id="negative-after"),
        pytest.param({"room": "general", "before": True}, id="bool-before"),
        pytest.param({"room": "general", "before": 1.0}, id="float-before"),
        pytest.param({"room": "general", "after": "3"}, id="string-after"),
        pytest.param({"room": "general", "before": 2**53}, id="huge-before"),
        pytest.param({"room": "bad room"}, id="bad-room"),
        pytest.param({"with": 5}, id="with-not-string"),
        pytest.param({"with": "\ud800"}, id="with-lone-surrogate"),
    ],
)
def test_bad_history(fields: dict[str, Any]) -> None:
    invalid(type="history", **fields)


@pytest.mark.parametrize(
    ("limit", "expected"), [(1, 1), (49, 49), (50, 50), (199, 199), (200, 200), (201, 200),
                            (10**9, 200)]
)
def test_history_limit_clamped(limit: int, expected: int) -> None:
    req = parse(type="history", room="general", limit=limit)
    assert isinstance(req, m.History) and req.limit == expected
    assert m.MAX_HISTORY_LIMIT == 200


@pytest.mark.parametrize("limit", [0, -1, -200, True, False, 1.0, 10.5, "10", None, [10]])
def test_history_bad_limit(limit: Any) -> None:
    invalid(type="history", room="general", limit=limit)


# --- passwd ----------------------------------------------------------------------------


@pytest.mark.parametrize("value", [True, False])
def test_passwd_logout_others(value: bool) -> None:
    req = parse(type="passwd", old=PASSWORD, new=PASSWORD + "x", logout_others=value)
    assert isinstance(req, m.Passwd) and req.logout_others is value


@pytest.mark.parametrize("value", [1, 0, "true", "false", "", None, [True]])
def test_passwd_logout_others_must_be_bool(value: Any) -> None:
    invalid(type="passwd", old=PASSWORD, new=PASSWORD + "x", logout_others=value)


@pytest.mark.parametrize(
    "fields",
    [
        {"new": PASSWORD},
        {"old": PASSWORD},
        {"old": 1, "new": PASSWORD},
        {"old": PASSWORD, "new": "\udc80" + PASSWORD},
        {"old": "x" * (4 * m.MAX_PASSWORD_CHARS + 1), "new": PASSWORD},
        {"old": PASSWORD, "new": "x" * (4 * m.MAX_PASSWORD_CHARS + 1)},
    ],
)
def test_bad_passwd(fields: dict[str, Any]) -> None:
    invalid(type="passwd", **fields)


# --- helpers ---------------------------------------------------------------------------


def test_normalize_password_is_nfkc() -> None:
    assert m.normalize_password("\ufb01ne") == "fine"
    assert m.normalize_password("\uff50\uff57") == "pw"
    assert m.normalize_password("e\u0301") == "\u00e9"

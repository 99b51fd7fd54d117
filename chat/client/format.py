"""Frames to terminal text: pure functions, no I/O.

Everything a peer (or the server) chose goes through `sanitize` before it reaches the
terminal, so no one can move the cursor, recolour the screen or reorder text with bidi
controls. The only escape sequences in the output are our own colours, and only when the
caller asks for colour (`should_color` says when: stdout is a terminal and NO_COLOR unset).
"""

from __future__ import annotations

import json
import os
import re
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, tzinfo
from typing import Any, TextIO

# C0 controls but tab and newline, DEL, C1 controls; the bidi embeddings, overrides and
# isolates (the "Trojan Source" characters); the line and paragraph separators (some
# renderers break lines on them); lone surrogates (JSON can carry them, a UTF-8 terminal
# cannot print them).
_UNSAFE = (
    r"\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069\u2028\u2029\ud800-\udfff"
)
_UNSAFE_IN_TEXT = re.compile(f"[{_UNSAFE}]")
_UNSAFE_IN_LINE = re.compile(f"[\\t\\n{_UNSAFE}]")  # one-line fields: names, codes

# A `retry_after` above this (about 30 years) is a broken server, not advice worth showing.
MAX_SHOWN_SECONDS = 10**9

# A message whose text starts with this is an action (`/me waves`): "* alice waves". The
# text itself is sent as typed, so other clients still show something sensible.
ME_PREFIX = "/me "

INDENT = " " * len("[HH:MM] ")  # continuation lines of a message start under its text

# Readable on dark and light backgrounds alike: the six normal and six bright colours.
_PALETTE = (31, 32, 33, 34, 35, 36, 91, 92, 93, 94, 95, 96)
_DIM, _BOLD, _RED, _MENTION = "2", "1", "1;31", "1;7"  # mention: bold, reverse video

# Characters a user name may hold: a mention is the name not touching one of them (a
# trailing "." is punctuation unless a name character follows it).
_NAME_CHAR = "A-Za-z0-9_.-"

_BYE_REASONS = {
    "quit": "bye",
    "idle": "disconnected: idle for too long",
    "login_timeout": "disconnected: did not log in in time",
    "too_many_errors": "disconnected: too many protocol errors",
    "slow_consumer": "disconnected: not reading fast enough",
    "shutdown": "disconnected: the server is shutting down",
    "account_disabled": "disconnected: your account has been disabled by the server's operator",
    "logged_out": "disconnected: this session was logged out by the server (log in again)",
}


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def sanitize(text: str, *, multiline: bool = True) -> str:
    """Make `text` safe to print: every control character becomes a visible \\xNN escape.

    Tab and newline are kept when `multiline` (they cannot move the cursor anywhere a line
    of text could not), else escaped as well.
    """
    pattern = _UNSAFE_IN_TEXT if multiline else _UNSAFE_IN_LINE
    return pattern.sub(_escape, text)


def name_color(name: str) -> int:
    """The ANSI colour of a user name: stable across runs and machines (CRC-32, not hash())."""
    return _PALETTE[zlib.crc32(name.casefold().encode("utf-8")) % len(_PALETTE)]


def should_color(stream: TextIO, environ: Mapping[str, str] = os.environ) -> bool:
    """Colour only on a terminal, and never when NO_COLOR is set (https://no-color.org)."""
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty()) and not environ.get("NO_COLOR")


def parse_ts(ts: object) -> datetime | None:
    """The server's RFC 3339 UTC time stamp as an aware datetime, or None if unreadable."""
    if not isinstance(ts, str):
        return None
    try:
        when = datetime.fromisoformat(ts)
    except ValueError:
        return None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


@dataclass(frozen=True)
class _Style:
    me: str | None
    color: bool
    tz: tzinfo | None
    now: datetime | None
    current: str | None = None  # the current room, marked `*` in a `rooms` list
    changed: frozenset[str] | None = None  # what a `room` event changed, where known

    def paint(self, text: str, sgr: str) -> str:
        return f"\x1b[{sgr}m{text}\x1b[0m" if self.color else text

    def clock(self, ts: object) -> str:
        now = self.now or datetime.now(UTC)
        try:
            # astimezone(None) converts to the machine's local time zone.
            local = (parse_ts(ts) or now).astimezone(self.tz)
        except (OverflowError, ValueError, OSError):  # e.g. year 1 moved back past year 1
            local = now.astimezone(self.tz)
        return self.paint(local.strftime("[%H:%M]"), _DIM)

    def name(self, value: object) -> str:
        name = _field(value)
        sgr = str(name_color(name))
        if self.me is not None and name.casefold() == self.me.casefold():
            sgr = f"{_BOLD};{sgr}"
        return self.paint(name, sgr)

    def room(self, value: object) -> str:
        return self.paint(f"#{_field(value)}", _DIM)

    def note(self, text: str) -> str:
        return self.paint(f"-- {text}", _DIM)

    def who(self, value: object) -> str:
        """A user name, `you` when it is the user's own."""
        me = self.me
        if me is not None and isinstance(value, str) and value.casefold() == me.casefold():
            return "you"
        return self.name(value)


def _field(value: object) -> str:
    return sanitize(str(value), multiline=False)


def _items(value: object) -> list[Any]:
    """A field that should be a JSON array, as a list; anything else counts as empty."""
    return value if isinstance(value, list) else []


def seconds(value: object) -> str | None:
    """A `retry_after` as text ("5", "2.5"), or None if it is not a sane number of seconds."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if not 0 <= value <= MAX_SHOWN_SECONDS:  # also false for NaN
        return None
    return f"{value:g}" if isinstance(value, float) else str(value)


def mentions(text: str, me: str) -> bool:
    """Whether `text` names `me` as a word, case-insensitively ("@alice," and "Alice." do)."""
    pattern = rf"(?<![{_NAME_CHAR}]){re.escape(me)}(?![A-Za-z0-9_-])(?!\.[{_NAME_CHAR}])"
    return re.search(pattern, text, re.IGNORECASE) is not None


def is_mention(frame: Mapping[str, Any], me: str | None) -> bool:
    """A `message` frame from someone else whose text mentions `me`."""
    if me is None or frame.get("type") != "message":
        return False
    sender = frame.get("username")
    if isinstance(sender, str) and sender.casefold() == me.casefold():
        return False
    text = frame.get("message")
    return isinstance(text, str) and mentions(text, me)


# How an end-to-end encrypted message is marked after its sender (chat.client.secure):
# a verified sending device, an unverified one, and a direct message sent in clear.
E2E_VERIFIED, E2E_UNVERIFIED, E2E_PLAINTEXT = "[e2e]", "[e2e, unverified]", "(not encrypted)"


def _e2e_marks(frame: Mapping[str, Any], style: _Style) -> tuple[str, str | None]:
    """The mark after the sender, and the warning that stands instead of the text (a
    message that could not be decrypted, or was refused, is never shown as written)."""
    e2e = frame.get("e2e")
    if not isinstance(e2e, Mapping):
        return "", None
    status, reason = e2e.get("status"), _field(e2e.get("reason", ""))
    if status == "ok":
        mark = E2E_VERIFIED if e2e.get("verified") else E2E_UNVERIFIED
        if e2e.get("late"):  # its key came after it: shown again, now with its text
            mark = mark[:-1] + ", decrypted late]"
        return " " + style.paint(mark, _DIM), None
    if status == "pending":
        return "", style.paint(f"! [cannot decrypt: {reason}]", _RED)
    if status == "plaintext":
        mark = " " + style.paint(E2E_PLAINTEXT, _DIM)
        return (mark, None) if not reason else (mark + style.paint(f" ! {reason}", _RED), None)
    return "", style.paint(f"! [REFUSED, not shown: {reason}]", _RED)


def _message(frame: Mapping[str, Any], style: _Style) -> str:
    sender = style.name(frame.get("username", "?"))
    mark, warning = _e2e_marks(frame, style)
    sender += mark
    text = str(frame.get("message", ""))
    if warning is not None:
        return f"{style.clock(frame.get('ts'))} {_where(frame, style, sender)}: {warning}"
    action = text.startswith(ME_PREFIX) and bool(text[len(ME_PREFIX):].strip())
    if action:  # the /me convention: "[12:00] #room * alice waves"
        text = text[len(ME_PREFIX):]
    if "to" in frame:
        dm = style.paint("(dm)", _DIM)
        if action:
            where = f"{dm} -> {style.name(frame['to'])} * {sender}"
        else:
            where = f"{dm} {sender} -> {style.name(frame['to'])}"
    else:
        where = f"{style.room(frame.get('room', '?'))} {'* ' if action else ''}{sender}"
    lines = sanitize(text).split("\n")
    if style.color and is_mention(frame, style.me):
        lines = [style.paint(line, _MENTION) for line in lines]
    separator = " " if action else ": "
    return f"{style.clock(frame.get('ts'))} {where}{separator}" + f"\n{INDENT}".join(lines)


def _where(frame: Mapping[str, Any], style: _Style, sender: str) -> str:
    if "to" in frame:
        return f"{style.paint('(dm)', _DIM)} {sender} -> {style.name(frame['to'])}"
    return f"{style.room(frame.get('room', '?'))} {sender}"


def _e2e(frame: Mapping[str, Any], style: _Style) -> str:
    """News of the end-to-end layer: loud ones (a changed key, a refused message) in red."""
    text = sanitize(str(frame.get("text", "")))
    if frame.get("loud"):
        return style.paint(f"!! {text}", _RED)
    return style.note(text)


# Presence as a person reads it: `cause` "connection" is someone coming online or going
# offline (one line, whichever rooms they are in), "room" an explicit join or leave. A
# server that sends no `cause` (before it was added) only ever meant joins and leaves.
_ONLINE_VERBS = {"join": ("is online", "came online"), "leave": ("went offline", "went offline")}
_ROOM_VERBS = {"join": "joined", "leave": "left"}
NAMES_IN_SUMMARY = 8  # names listed in a coalesced presence line; "and N others" for the rest
NAMES_IN_WHO_SUMMARY = 5  # on login and /join; /who lists every name


def presence_text(
    event: str, cause: str, room: object, names: list[str], *, me: str | None = None,
    color: bool = False, ts: object = None, tz: tzinfo | None = None,
    now: datetime | None = None,
) -> str:
    """One presence line for one name or several (coalesced), e.g. `-- 3 people came online`."""
    style = _Style(me=me, color=color, tz=tz, now=now)
    if cause == "connection" and event in _ONLINE_VERBS:
        one, many = _ONLINE_VERBS[event]
        where = ""
    else:
        one = many = _ROOM_VERBS.get(event, "is in")
        where = " " + style.room(room if room is not None else "?")
    if len(names) == 1:
        line = f"{style.name(names[0])} {one}{where}"
    else:
        line = f"{len(names)} people {many}{where}: {_some_names(names, style, NAMES_IN_SUMMARY)}"
    return f"{style.clock(ts)} -- {line}"


def _some_names(names: list[Any], style: _Style, shown: int) -> str:
    """`a, b, c` or, past `shown` names, `a, b and 4 others`."""
    listed = ", ".join(style.name(n) for n in names[:shown])
    rest = len(names) - shown
    if rest <= 0:
        return listed
    return f"{listed} and {rest} other{'' if rest == 1 else 's'}"


def _presence(frame: Mapping[str, Any], style: _Style) -> str:
    return presence_text(
        str(frame.get("event")), str(frame.get("cause", "room")), frame.get("room", "?"),
        [frame.get("username", "?")], me=style.me, color=style.color, ts=frame.get("ts"),
        tz=style.tz, now=style.now,
    )


def who_summary(
    frame: Mapping[str, Any], *, me: str | None = None, color: bool = False
) -> str:
    """A `who` reply in one short line: `-- online in #dev: alice, bob and 3 others`."""
    style = _Style(me=me, color=color, tz=None, now=None)
    room = style.room(frame.get("room", "?"))
    mine = (me or "").casefold()
    others = [u for u in _items(frame.get("users")) if str(u).casefold() != mine]
    if not others:
        return style.note(f"nobody else is online in {room}")
    return style.note(f"online in {room}: ") + _some_names(others, style, NAMES_IN_WHO_SUMMARY)


def _error(frame: Mapping[str, Any], style: _Style) -> str:
    # Any code is shown as it came, with its text, so a code this client does not know yet
    # (`forbidden`, or a newer server's) still says what went wrong.
    code = frame.get("code")
    text = f"! error {_field(code) if isinstance(code, str) and code else 'unknown'}"
    message = frame.get("message")
    if message not in (None, ""):
        text += f": {_field(message)}"
    retry_after = seconds(frame.get("retry_after"))
    if retry_after is not None:
        text += f" (retry after {retry_after} s)"
    return style.paint(text, _RED)


# The `bye` reasons (v1.1) that end the session for good: logging in again is refused, or
# the operator meant the session to end. The client says so and does not reconnect.
ENDING_BYES = frozenset({"account_disabled", "logged_out"})


def bye_text(reason: object) -> str:
    """What a `bye` reason means to the user: `disconnected: ...`, or `bye` for our quit."""
    shown = _field(reason if reason is not None else "")
    return _BYE_REASONS.get(shown, f"disconnected: {shown}")


def _bye(frame: Mapping[str, Any], style: _Style) -> str:
    return style.note(bye_text(frame.get("reason", "")))


def _who(frame: Mapping[str, Any], style: _Style) -> str:
    users = _items(frame.get("users"))
    room = style.room(frame.get("room", "?"))
    if not users:
        return style.note(f"nobody online in {room}")
    return style.note(f"online in {room}: ") + ", ".join(style.name(u) for u in users)


def _history(frame: Mapping[str, Any], style: _Style) -> str:
    if "with" in frame:
        what = f"with {style.name(frame['with'])}"
    else:
        what = style.room(frame.get("room", "?"))
    messages = [m for m in _items(frame.get("messages")) if isinstance(m, Mapping)]
    count = f"{len(messages)} message{'' if len(messages) == 1 else 's'}"
    header = style.note(f"history {what}: {count}")
    return "\n".join([header, *(_message(m, style) for m in messages)])


def _welcome(frame: Mapping[str, Any], style: _Style) -> str:
    rooms = ", ".join(style.room(r) for r in _items(frame.get("rooms")))
    return style.note(f"logged in as {style.name(frame.get('username', '?'))}; rooms: {rooms}")


def _hello(frame: Mapping[str, Any], style: _Style) -> str:
    server = _field(frame.get("server", "?"))
    return style.note(f"connected to {server} (protocol {_field(frame.get('protocol'))})")


def created_note(room: object) -> str:
    """Said after a /join (or --room) that made the room: a typo makes a room silently."""
    name = f"#{_field(room)}"
    return (f"{name} did not exist: you made it, a public room you own "
            f"(/leave {name} if that was a typo)")


# The `ok` of a v1.1 request said as a sentence (the reply names the room and the user
# where it matters); `{room}` and `{user}` are filled in already sanitized. An `ok` whose
# event said it all already (a topic, a role) is not shown at all (ChatState.echoed).
_OK_SENTENCES = {
    "create": "you made {room}; you own it",
    "invite": "invitation to {room} sent",
    "kick": "you kicked {user} from {room}",
    "ban": "you banned {user} from {room}",
    "unban": "{user} is not banned from {room}",
    "set_role": "{user} is {role} in {room}",  # unchanged: no `role` event came
    "block": "you blocked {user}: no direct messages or invitations from them",
    "unblock": "you unblocked {user}",
    "passwd": "password changed; your other sessions stay logged in",
}


def _ok(frame: Mapping[str, Any], style: _Style) -> str:
    sentence = _OK_SENTENCES.get(str(frame.get("op")))
    if sentence is not None and frame.get("op") == "create" and frame.get("encrypted"):
        sentence = ("you made {room}, private and end-to-end encrypted (for good); you own "
                    "it")
    if sentence is not None:
        try:
            return style.note(sentence.format(
                room=style.room(frame["room"]) if "{room}" in sentence else "",
                user=style.name(frame["username"]) if "{user}" in sentence else "",
                role=_field(frame["role"]) if "{role}" in sentence else ""))
        except KeyError:
            pass  # a reply without the fields the sentence needs: said as it came
    parts = [_field(frame.get("op", "done"))]
    if "room" in frame:
        parts.append(style.room(frame["room"]))
    if "username" in frame:  # kick, ban, set_role, block, ...: whom it was done to
        parts.append(style.name(frame["username"]))
    if isinstance(frame.get("role"), str):
        parts.append(_field(frame["role"]))
    return style.note("ok: " + " ".join(parts))


# -- version 1.1: rooms with access control ---------------------------------------------------

_HISTORY_MEANS = {"shared": "members read all of it",
                  "joined": "members read only what came after they joined"}


def _invited(frame: Mapping[str, Any], style: _Style) -> str:
    room = style.room(frame.get("room", "?"))
    return style.note(f"{style.name(frame.get('by', '?'))} invited you to {room}: "
                      f"/join {room} to accept")


def _removed(frame: Mapping[str, Any], style: _Style) -> str:
    how = "banned" if frame.get("how") == "ban" else "kicked"
    line = f"{style.name(frame.get('by', '?'))} {how} you from {style.room(frame.get('room', '?'))}"
    reason = frame.get("reason")
    if isinstance(reason, str) and reason.strip():
        line += f": {_field(reason)}"
    if how == "banned":
        line += " (you cannot rejoin until unbanned)"
    return style.paint(f"-- {line}", _BOLD)


def _role(frame: Mapping[str, Any], style: _Style) -> str:
    by, user = frame.get("by", "?"), frame.get("username", "?")
    role, room = _field(frame.get("role", "?")), style.room(frame.get("room", "?"))
    if isinstance(by, str) and isinstance(user, str) and by.casefold() == user.casefold():
        # Only an owner changes roles, and only downwards for themselves.
        return style.note(f"{style.who(user)} stepped down to {role} in {room}")
    return style.note(f"{style.who(by)} made {style.who(user)} {role} in {room}")


def _topic(frame: Mapping[str, Any]) -> str:
    topic = frame.get("topic")
    return f"topic: {_field(topic)}" if isinstance(topic, str) and topic else "no topic"


OPERATOR = "operator"  # who the server names as `by` for chat-admin's changes


def _changer(by: object, style: _Style) -> str:
    return "the operator" if by == OPERATOR else style.who(by)


def _room_change(frame: Mapping[str, Any], style: _Style, changed: frozenset[str] | None
                 ) -> str:
    """An unasked `room` frame: a topic or history change, said as what changed and by whom
    where that is known (`changed`: the fields that differ from before; `by`: v1.1 servers
    since it was added), else what the room is now."""
    room = style.room(frame.get("room", "?"))
    history = _field(frame.get("history", "?"))
    means = f"({_HISTORY_MEANS.get(history, '?')})"
    by = frame.get("by")
    if by is None or changed is None or len(changed) != 1:
        who = "" if by is None else f"{_changer(by, style)} changed {room}; "
        return style.note(f"{who}{room} is now: {_topic(frame)}; history {history} {means}")
    if "history" in changed:
        return style.note(f"{_changer(by, style)} made {room}'s history {history} {means}")
    topic = frame.get("topic")
    if isinstance(topic, str) and topic:
        return style.note(f"{_changer(by, style)} set the topic of {room}: {_field(topic)}")
    return style.note(f"{_changer(by, style)} cleared the topic of {room}")


def _room_info(frame: Mapping[str, Any], style: _Style) -> str:
    """A `room` frame: the reply to /info in full; unasked (a change), what changed."""
    room = style.room(frame.get("room", "?"))
    history = _field(frame.get("history", "?"))
    if "re" not in frame:  # a moderator changed the topic or the history setting
        return _room_change(frame, style, style.changed)
    count = frame.get("members")
    role = frame.get("role")
    visibility = _field(frame.get("visibility", "?"))
    if frame.get("encrypted"):
        visibility += ", end-to-end encrypted"
    head = (f"{room}: {visibility}, history {history} "
            f"({_HISTORY_MEANS.get(history, '?')}), {_field(count)} member"
            f"{'' if count == 1 else 's'}")
    if isinstance(role, str):
        head += f", you are {_field(role)}"
    lines = [style.note(head), style.note(_topic(frame))]
    bans = frame.get("bans")
    if isinstance(bans, list):  # shown to moderators and owners
        names = ", ".join(style.name(b) for b in bans if isinstance(b, str))
        lines.append(style.note(f"banned: {names}" if names else "nobody is banned"))
    return "\n".join(lines)


def _rooms(frame: Mapping[str, Any], style: _Style) -> str:
    listed = [r for r in _items(frame.get("rooms")) if isinstance(r, Mapping)]
    current = (style.current or "").lower()
    mine = [r for r in listed if r.get("role") is not None]
    marked = [str(r.get("room")).lower() == current for r in mine]
    names = [("*" if m else "") + style.room(r.get("room"))
             for r, m in zip(mine, marked, strict=True)]
    key = " (* current)" if any(marked) else ""
    lines = [style.note("rooms: " + (" ".join(names) + key or "none of yours"))]
    # Each column padded to its widest entry, measured before colouring (the colour's
    # escape codes take no room on the screen).
    rows = []
    for r in listed:
        role = r.get("role")
        if role is None:
            role = "invited" if r.get("visibility") == "private" else "-"
        count = r.get("members")
        rows.append((f"#{_field(r.get('room'))}", _field(role),
                     _field(r.get("visibility", "?"))
                     + (" encrypted" if r.get("encrypted") else ""), _field(count),
                     f"member{'' if count == 1 else 's'}",
                     _field(r.get("topic")) if r.get("topic") else ""))
    widths = [max((len(row[i]) for row in rows), default=0) for i in range(5)]
    for name, role, visibility, count, members, topic in rows:
        line = (f"   {style.paint(name, _DIM)}{' ' * (widths[0] - len(name))}  "
                f"{role:<{widths[1]}}  {visibility:<{widths[2]}}  {count:>{widths[3]}} "
                f"{members:<{widths[4]}}")
        lines.append(f"{line}  {topic}" if topic else line.rstrip())
    if any(r.get("role") is None and r.get("visibility") == "private" for r in listed):
        lines.append(style.note("invited: /join ROOM to accept"))
    if frame.get("more") is True:
        lines.append(style.note("more public rooms than listed: the fullest are shown"))
    return "\n".join(lines)


def _members(frame: Mapping[str, Any], style: _Style) -> str:
    listed = [m for m in _items(frame.get("members")) if isinstance(m, Mapping)]
    online = sum(1 for m in listed if m.get("online") is True)
    lines = [style.note(f"members of {style.room(frame.get('room', '?'))}: {len(listed)}, "
                        f"{online} online")]
    for m in listed:
        here = " (online)" if m.get("online") is True else ""
        name = style.name(m.get("username", "?"))
        lines.append(f"   {_field(m.get('role', '?')):<9} {name}{here}")
    return "\n".join(lines)


def _pong(frame: Mapping[str, Any], style: _Style) -> str:
    return style.note("pong")


_RENDERERS: dict[str, Callable[[Mapping[str, Any], _Style], str]] = {
    "message": _message,
    "presence": _presence,
    "error": _error,
    "bye": _bye,
    "who": _who,
    "history": _history,
    "welcome": _welcome,
    "hello": _hello,
    "ok": _ok,
    "pong": _pong,
    "invited": _invited,
    "removed": _removed,
    "role": _role,
    "room": _room_info,
    "rooms": _rooms,
    "members": _members,
    "e2e": _e2e,
}


def format_event(
    frame: Mapping[str, Any],
    *,
    me: str | None = None,
    color: bool = False,
    tz: tzinfo | None = None,
    now: datetime | None = None,
    current: str | None = None,
    changed: frozenset[str] | None = None,
) -> str | None:
    """One received frame as terminal text (maybe several lines), or None if not worth showing.

    Times are shown in `tz` (None: the machine's local zone); frames without a `ts` are
    stamped with `now` (default: the current time). `me` is drawn in bold when colouring,
    and a message from someone else that mentions `me` in bold reverse video.
    A server `ping` gives None: the client answers it, there is nothing to show.
    `current` (the current room) is marked with `*` in a `rooms` list. `changed` says which
    of `topic` and `history` a `room` event changed (ChatState.changes), where known.
    """
    kind = str(frame.get("type"))
    if kind == "ping":
        return None
    style = _Style(me=me, color=color, tz=tz, now=now, current=current, changed=changed)
    render = _RENDERERS.get(kind)
    if render is None:
        return style.note(_field(f"{kind}: {json.dumps(dict(frame), default=str)}"))
    return render(frame, style)

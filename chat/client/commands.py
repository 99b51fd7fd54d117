"""Slash commands, shared by line mode and the terminal UI: one typed line, one action.

`parse_command` is pure (a line, the current room and optionally the state in, an action
out), so it is tested without a server; `perform` is the one place a command's request is
sent. `ChatState` follows the rooms the user is in: the `welcome`'s rooms to start with,
then every successful /join and /leave (`follow`, from the replies), what the user's other
sessions do (`observe`, from the frames received: the user's own `presence` of cause
`room`, a `message` in a room it did not know), a `not_in_room` refusal for a room it
thought it was in (`lost`), and after a reconnect the new `welcome`'s rooms (`adopt`: the
server's membership is the truth, whatever changed while the connection was down).
Leaving the current room, here or elsewhere, makes another room the user is still in
current (#general if possible), or none: then a plain line is not sent, the user is told
to /join a room instead.

Theory of operation
-------------------
Two threads use one ChatState, in the terminal UI and in line mode alike: the command
thread reads it for every line, and the printer thread changes the rooms as frames
arrive. Every change happens under `_lock`; `rooms` is never changed in place but replaced
by a new set, so a reader that took `state.rooms` (the completer, the reconnecting
printer) holds a set no one changes under it.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from chat.client import roomcommands
from chat.client.connection import DEFAULT_TIMEOUT, ChatClient
from chat.client.errors import Frame
from chat.client.format import ME_PREFIX, created_note, sanitize
from chat.client.roomcommands import NO_ROOM, NoRoom

DEFAULT_ROOM = "general"  # every user is in it from registration on
OWNER, MEMBER = "owner", "member"  # the roles the client treats apart (prompt, create)
DEFAULT_HISTORY = 50  # the server's own default; said here so /help can name it
CANNOT_LEAVE_DEFAULT = f"everyone is in #{DEFAULT_ROOM}: it cannot be left"
MORE = "more"  # `/history more`: the page before the one last shown


HELP = f"""\
commands (a ROOM may be written #dev or dev; left out, it is the current room):
  TEXT            send TEXT to the current room (// at its start sends a /);
                  a text longer than the server takes is sent in several parts
  /me ACTION      send an action: "/me ACTION", shown as "* you ACTION"
  /join ROOM      join ROOM (or accept an invitation), now current
  /leave [ROOM]   leave ROOM (never #{DEFAULT_ROOM})
  /switch ROOM    make ROOM, one you are in, the current room
  /rooms          the public rooms and yours: topic, members, your role;
                  * marks the current one
  /create ROOM [public|private] [shared|joined] [encrypted]
                  make a room and own it (default public; history shared,
                  or joined: members read only what came after they joined;
                  encrypted: private, end-to-end encrypted for good)
  /info [ROOM]    a room's visibility, history, topic, members, your role
  /members [ROOM] everyone in a room, with their roles
  /topic [#ROOM] [TEXT | -]
                  set the topic (moderators); -: clear it; no TEXT: show it
  /invite USER [ROOM]            invite USER (needed for a private room)
  /kick USER [#ROOM] [REASON]    remove USER; they may come back
  /ban USER [#ROOM] [REASON]     remove USER for good; /unban USER [ROOM]
  /role USER owner|moderator|member [ROOM]
                  change a role (owners); owners may step down themselves
  /sethistory shared|joined [ROOM]
                  what members may read: all, or since they joined (owners)
  /block USER     refuse USER's direct messages and invitations; /unblock USER
  /msg USER TEXT  send USER a direct message
  /who [ROOM]     who is online in ROOM (default: the current room)
  /history [WHERE] [N]
                  the last N messages (default {DEFAULT_HISTORY}) of WHERE: the current
                  room, #ROOM, or USER (your direct messages with USER)
  /history more   the messages before those /history showed last
  /fingerprint    this device's key, to compare out loud
  /devices USER   USER's devices and whether you verified them
  /verify USER [DEVICE]
                  verify a device (emoji to compare), then /verify confirm
                  if they match or /verify cancel if not
  /passwd         change your password (asked without echo, at the prompt only)
  /help           this text
  /quit           leave (so does the end of input)"""

# Frames whose notes (from `ChatState.observe`) are shown after them, not before: an `ok`
# the notes follow from, a `removed` whose "now talking in ..." follows from it.
NOTES_AFTER = frozenset({"ok", "removed"})

# Only the interactive prompt has keys; line mode's /help leaves this out.
HELP_KEYS = """\
keys:
  Tab             complete a command, room or name ("name: " first in a line)
  Up, Down        recall the lines typed before
  Ctrl-C          clear the line; on an empty line, leave
  Ctrl-D          leave (on an empty line)"""


@dataclass(frozen=True)
class Request:
    """A frame to send as a request."""

    frame: Frame


@dataclass(frozen=True)
class Quit:
    pass


@dataclass(frozen=True)
class Help:
    pass


@dataclass(frozen=True)
class Invalid:
    """A line that is not a valid command; `message` says how to write it."""

    message: str


@dataclass(frozen=True)
class Notice:
    """A line that cannot be carried out now (nothing is sent); `message` says why."""

    message: str


@dataclass(frozen=True)
class Switch:
    """Make `room`, one the user is in, the current room (nothing is sent)."""

    room: str


@dataclass(frozen=True)
class Passwd:
    """Change the password: the UI asks for the old and new ones without echo."""


ASK_NOT_ARGS = (
    "/passwd takes no arguments: it asks for the passwords without echo "
    "(never put a password on a command line)"
)
INTERACTIVE_ONLY = (
    "/passwd works only at the interactive prompt, which asks without echo; "
    "line mode does not read passwords from its input"
)

Action = Request | Quit | Help | Invalid | Notice | Switch | Passwd


def normalize_room(text: str) -> str:
    """A room as a user may type it: `#dev` and ` dev ` are `dev` (case is the server's)."""
    return text.strip().removeprefix("#")


def _shown(room: str) -> str:
    return "#" + sanitize(room, multiline=False)


@dataclass(frozen=True)
class HistoryPage:
    """The last history page shown: what it was of (`room` or `with`), where it began."""

    target: Frame  # {"room": R} or {"with": U}
    oldest: int  # the smallest msg_id in it: `/history more` asks `before` this
    limit: int


@dataclass
class ChatState:
    """What the commands remember between lines: the rooms the user is in, the current one.

    Room names are kept in lower case, as the server answers with them. `room` is None
    when the user is in no room (or left the current one and is in no other).
    """

    room: str | None = DEFAULT_ROOM
    rooms: set[str] = field(default_factory=set)  # replaced on change, never changed in place
    history: HistoryPage | None = None  # for `/history more`
    # The user's role in each room where the server said it (room_info, list_rooms, a
    # `role` event about the user, a create): for the prompt. Replaced, never changed.
    roles: dict[str, str] = field(default_factory=dict)
    # Each room's topic and history setting as last seen (room_info, `room` events, a
    # `rooms` list's topics), so that a `room` event can say which of them changed.
    settings: dict[str, dict[str, object]] = field(default_factory=dict)
    # This session's topic, set_history and set_role requests until their `ok`, in order,
    # each with whether its event has come (see `asking`): the event says it in a sentence,
    # and the `ok` after it then shows nothing more.
    _asked: dict[tuple[str, ...], bool] = field(default_factory=dict, repr=False,
                                               compare=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def __post_init__(self) -> None:
        rooms = {r.lower() for r in self.rooms}
        if self.room is not None:
            self.room = self.room.lower()
            rooms.add(self.room)
        self.rooms = rooms

    @classmethod
    def start(cls, room: str | None, rooms: Iterable[object] = ()) -> ChatState:
        """The state after login: the `welcome`'s `rooms` (non-names ignored), `room` current."""
        return cls(room, {r for r in rooms if isinstance(r, str)})

    @property
    def prompt(self) -> str:
        """The interactive prompt: the current room, or `-` for none, and the user's role
        there unless it is plain `member` (or not known): `[dev owner]> `."""
        room = self.room
        role = self.roles.get(room) if room is not None else None
        shown = sanitize(room or "-", multiline=False)
        if role is not None and role != MEMBER:
            shown += " " + sanitize(role, multiline=False)
        return f"[{shown}]> "

    def set_role(self, room: str, role: object) -> None:
        """The user's role in `room` is `role` (None or not a str: not known / not in it)."""
        room = room.lower()
        with self._lock:
            roles = {r: x for r, x in self.roles.items() if r != room}
            if isinstance(role, str) and role:
                roles[room] = role
            self.roles = roles

    def joined(self, room: str) -> None:
        """This session joined `room`: it is in it, and it becomes the current room."""
        with self._lock:
            self.rooms = self.rooms | {room.lower()}
            self.room = room.lower()

    def added(self, room: str) -> bool:
        """Another session joined `room`: in it, the current room unchanged; False if known."""
        room = room.lower()
        with self._lock:
            if room in self.rooms:
                return False
            self.rooms = self.rooms | {room}
            return True

    def left(self, room: str) -> bool:
        """Out of `room`; True if it was the current one (another one is current now)."""
        return self._drop(room)[1]

    def _drop(self, room: str) -> tuple[bool, bool]:
        """Out of `room`, in one step: (the user was in it, it was the current one)."""
        room = room.lower()
        with self._lock:
            was_in = room in self.rooms
            self.rooms = self.rooms - {room}
            if room in self.roles:
                self.roles = {r: x for r, x in self.roles.items() if r != room}
            if self.room != room:
                return was_in, False
            # Talk on in #general if still there, else in another room.
            rooms = self.rooms
            self.room = DEFAULT_ROOM if DEFAULT_ROOM in rooms else min(rooms, default=None)
            return was_in, True

    def _now_in(self) -> str:
        return f"now talking in {_shown(self.room)}" if self.room else NO_ROOM

    def switch(self, room: str) -> str | None:
        """Make `room` current; None if done, else why not (the user is not in it)."""
        room = normalize_room(room).lower()
        with self._lock:
            if room not in self.rooms:
                return f"you are not in {_shown(room)}; /join it first"
            self.room = room
            return None

    def follow(self, frame: Frame, reply: Frame) -> None:
        """Note what a successful request changed: a join, a leave, a history page."""
        if reply.get("type") == "history" and frame.get("type") == "history":
            self._follow_history(frame, reply)
            return
        op = reply.get("op")
        if reply.get("type") != "ok" or op != frame.get("type"):
            return
        room = reply.get("room", frame.get("room"))  # the server's (lower-case) name
        if not isinstance(room, str) or not room:
            return
        if op in ("join", "create"):
            self.joined(room)
            if op == "create":
                self.set_role(room, OWNER)  # whoever makes a room owns it
        elif op == "leave":
            self.left(room)

    def _follow_history(self, frame: Frame, reply: Frame) -> None:
        listed = reply.get("messages")
        ids = [m["msg_id"] for m in (listed if isinstance(listed, list) else [])
               if isinstance(m, dict) and type(m.get("msg_id")) is int]
        target = {k: frame[k] for k in ("room", "with") if k in frame}
        limit = frame.get("limit", DEFAULT_HISTORY)
        with self._lock:
            if ids and target:
                self.history = HistoryPage(target, min(ids), limit)
            elif "before" not in frame:
                self.history = None  # an empty room: nothing to page back from

    def more_history(self) -> Frame | str:
        """The request for the page before the last one shown, or why there is none."""
        page = self.history
        if page is None:
            return "no history shown yet to page back from: /history first"
        return {"type": "history", **page.target, "before": page.oldest, "limit": page.limit}

    def observe(self, frame: Frame, me: str | None) -> list[str]:
        """Follow the rooms from one received frame (the printer's); notes to show.

        An `ok` to this session's own join or leave; the user's own `presence` of cause
        `room`, which is how another session's join or leave shows (this session's own
        join or leave has been followed from its `ok` already, so it changes nothing and
        says nothing); a room `message` from a room not known, which means another
        session joined it (its presence may come later, or never).

        And the user's standing in rooms (v1.1): the role a `room` frame, a `rooms` list or
        a `role` event about the user gives; a `removed` (kicked or banned) takes the room
        away at once, as a leave does, so nothing is sent there or caught up from it.
        """
        kind, room = frame.get("type"), frame.get("room")
        if kind == "rooms":
            self._note_listed(frame.get("rooms"))
            return []
        if not isinstance(room, str) or not room:
            return []
        if kind == "removed":
            was_in, current = self._drop(room)
            return [self._now_in()] if was_in and current else []
        mine = kind == "role" and _is_me(frame.get("username"), me)
        if kind == "room":
            self._note_settings(room, frame)
        if (kind == "room" and "role" in frame) or mine:
            self.set_role(room, frame.get("role"))
        elif kind == "ok" and frame.get("op") in ("join", "create"):
            self.joined(room)
            if frame.get("op") == "create":
                self.set_role(room, OWNER)
            if frame.get("created") is True:  # a join that made the room: a typo, maybe
                return [created_note(room)]
        elif kind == "ok" and frame.get("op") == "leave":
            if self.left(room):
                return [self._now_in()]
        elif kind == "message" and "to" not in frame:
            if self.added(room):
                return [f"you are in {_shown(room.lower())}: joined in another session"]
        elif kind == "presence" and _is_me(frame.get("username"), me):
            if frame.get("cause", "room") != "room":
                return []  # not sent to one's own sessions; a broken server's, ignored
            if frame.get("event") == "join" and self.added(room):
                return [f"you joined {_shown(room.lower())} in another session"]
            if frame.get("event") == "leave":
                was_in, current = self._drop(room)
                if was_in:
                    note = f"you left {_shown(room.lower())} in another session"
                    return [f"{note}; {self._now_in()}" if current else note]
        return []

    def asking(self, frame: Frame) -> None:
        """This session is sending `frame`: if its change comes back as an event (a topic,
        a history setting, a role), that event's sentence is all that is shown of it."""
        key = _asked_key(frame)
        if key is not None:
            with self._lock:
                self._asked = {k: v for k, v in self._asked.items() if k != key} | {key: False}

    def forget(self, frame: Frame) -> None:
        """`frame` was refused (or its reply lost): no event will answer it."""
        key = _asked_key(frame)
        with self._lock:
            self._asked = {k: v for k, v in self._asked.items() if k != key}

    def changes(self, frame: Frame, me: str | None) -> frozenset[str] | None:
        """For a `room` event (a change, not a reply): which of `topic` and `history`
        changed, or None if not known. Call it before `observe`, which keeps the new ones.

        This session's own request says it; else the room's settings as last seen.
        """
        room = frame.get("room")
        if frame.get("type") != "room" or "re" in frame or not isinstance(room, str):
            return None
        room = room.lower()
        by = frame.get("by")
        with self._lock:
            if by is None or _is_me(by, me):
                for key, seen in self._asked.items():
                    if not seen and key[0] in ("topic", "set_history") and key[1] == room:
                        self._asked = {**self._asked, key: True}
                        return frozenset({"topic" if key[0] == "topic" else "history"})
            known = self.settings.get(room, {})
        fields = ("topic", "history")
        differ = frozenset(f for f in fields if f in known and known[f] != frame.get(f))
        if differ:
            return differ
        unknown = frozenset(f for f in fields if f not in known)
        return unknown if len(unknown) == 1 else None  # one not known: that one, surely

    def echoed(self, frame: Frame, me: str | None) -> bool:
        """Whether `frame` need not be shown: the `ok` of a request whose event (shown just
        before it) said the same. Also notes a `role` event answering this session."""
        if frame.get("type") == "role" and _is_me(frame.get("by"), me):
            key = _asked_key({**frame, "type": "set_role"})
            with self._lock:
                if key in self._asked:
                    self._asked = {**self._asked, key: True}
            return False
        if frame.get("type") != "ok" or frame.get("op") not in _ANNOUNCED:
            return False
        key = _asked_key({**frame, "type": frame.get("op")})
        with self._lock:
            seen = self._asked.get(key, False) if key is not None else False
            self._asked = {k: v for k, v in self._asked.items() if k != key}
        return seen

    def _note_settings(self, room: str, frame: Frame) -> None:
        known = {f: frame[f] for f in ("topic", "history") if isinstance(frame.get(f), str)}
        with self._lock:
            self.settings = {**self.settings, room.lower(): {
                **self.settings.get(room.lower(), {}), **known}}

    def _note_listed(self, listed: object) -> None:
        """A `list_rooms` reply: the user's role in each room listed with one."""
        for entry in listed if isinstance(listed, list) else []:
            if not (isinstance(entry, dict) and isinstance(entry.get("room"), str)):
                continue
            if entry.get("role") is not None:
                self._note_settings(entry["room"], {"topic": entry.get("topic")})
            if entry.get("role") is not None or entry["room"].lower() in self.roles:
                self.set_role(entry["room"], entry.get("role"))

    def adopt(self, rooms: Iterable[str]) -> list[str]:
        """After reconnecting: the `welcome`'s `rooms` are the user's; notes on the change.

        The server's membership is the truth: a room left in another session (or that the
        user was removed from) while this one was cut off stays left, one joined elsewhere
        is the user's too. If the current room is gone, another becomes current, as after a
        /leave.
        """
        rooms = {r.lower() for r in rooms}
        with self._lock:
            gone, came = sorted(self.rooms - rooms), sorted(rooms - self.rooms)
            self.rooms = rooms
            moved = self.room is not None and self.room not in rooms
            if moved:
                self.room = DEFAULT_ROOM if DEFAULT_ROOM in rooms else min(rooms, default=None)
        notes = []
        if gone:
            # Not "left": a kick, a ban or the operator deleting the room look the same here.
            note = f"while you were away you stopped being in {_listed(gone)}"
            notes.append(f"{note}; {self._now_in()}" if moved else note)
        if came:
            notes.append(f"while you were away you joined {_listed(came)} (in another session)")
        return notes

    def lost(self, room: str) -> str | None:
        """The server said we are not in `room`: forget it; a note if we thought we were."""
        was_in, current = self._drop(room)
        if not was_in:
            return None  # known already (from a presence, say): said then
        # Left in another session, or removed by the operator: the server does not say.
        note = f"you are no longer in {_shown(room.lower())}"
        return f"{note}; {self._now_in()}" if current else note


# The requests whose change every member's sessions hear of (a `room` or `role` event),
# before the `ok`: the `ok` is shown only where no event came (a role already held).
_ANNOUNCED = frozenset({"topic", "set_history", "set_role"})


def _asked_key(frame: Frame) -> tuple[str, ...] | None:
    """What ties a topic, set_history or set_role request to its event and its `ok`."""
    kind, room = frame.get("type"), frame.get("room")
    if kind not in _ANNOUNCED or not isinstance(room, str):
        return None
    if kind != "set_role":
        return (str(kind), room.lower())
    user, role = frame.get("username"), frame.get("role")
    if not isinstance(user, str) or not isinstance(role, str):
        return None
    return ("set_role", room.lower(), user.casefold(), role)


def _listed(rooms: list[str]) -> str:
    return ", ".join(_shown(r) for r in rooms)


def _is_me(name: object, me: str | None) -> bool:
    return isinstance(name, str) and me is not None and name.casefold() == me.casefold()


@dataclass(frozen=True)
class _Context:
    room: str | None
    state: ChatState | None


def _room_arg(args: str) -> str | None:
    """One room argument as typed (`#` allowed); None if it is not one word."""
    room = normalize_room(args)
    return room if room and " " not in room else None


def _join(args: str, ctx: _Context) -> Action:
    room = _room_arg(args)
    if room is None:
        return Invalid("usage: /join ROOM")
    return Request({"type": "join", "room": room})


def _leave(args: str, ctx: _Context) -> Action:
    if args and _room_arg(args) is None:
        return Invalid("usage: /leave [ROOM]")
    target = _room_arg(args) if args else ctx.room
    if target is None:
        return Notice(NO_ROOM)
    if target.lower() == DEFAULT_ROOM:
        return Invalid(CANNOT_LEAVE_DEFAULT)  # the server refuses it (`forbidden`)
    return Request({"type": "leave", "room": target})


def _msg(args: str, ctx: _Context) -> Action:
    user, _, text = args.partition(" ")
    if not user or not text.strip():
        return Invalid("usage: /msg USER TEXT")
    return Request({"type": "send", "to": user, "message": text})


def _who(args: str, ctx: _Context) -> Action:
    if args and _room_arg(args) is None:
        return Invalid("usage: /who [ROOM]")
    target = _room_arg(args) if args else ctx.room
    if target is None:
        return Notice(NO_ROOM)
    return Request({"type": "who", "room": target})


def _me(args: str, ctx: _Context) -> Action:
    if not args:
        return Invalid("usage: /me ACTION")
    if ctx.room is None:
        return Notice(NO_ROOM)
    return Request({"type": "send", "room": ctx.room, "message": ME_PREFIX + args})


def _switch(args: str, ctx: _Context) -> Action:
    room = _room_arg(args)
    if room is None:
        return Invalid("usage: /switch ROOM")
    return Switch(room)


def _rooms(args: str, ctx: _Context) -> Action:
    return Invalid("usage: /rooms") if args else Request({"type": "list_rooms"})


def _v11(name: str) -> Callable[[str, _Context], Action]:
    """One of chat.client.roomcommands' parsers as a command."""
    parse = roomcommands.PARSERS[name]

    def command(args: str, ctx: _Context) -> Action:
        try:
            if name in roomcommands.SEES_ROOMS:
                rooms = ctx.state.rooms if ctx.state is not None else frozenset()
                frame = parse(args, ctx.room, rooms)
            else:
                frame = parse(args, ctx.room)
        except NoRoom:
            return Notice(NO_ROOM)
        return Invalid(frame) if isinstance(frame, str) else Request(frame)

    return command


# End-to-end encryption's commands: answered by chat.client.secureclient, not the server.
VERIFY_USAGE = "usage: /verify USER [DEVICE] | /verify confirm | /verify cancel"


def _fingerprint(args: str, ctx: _Context) -> Action:
    return Invalid("usage: /fingerprint") if args else Request({"type": "e2e_fingerprint"})


def _devices(args: str, ctx: _Context) -> Action:
    words = args.split()
    if len(words) != 1:
        return Invalid("usage: /devices USER")
    return Request({"type": "e2e_devices", "username": words[0]})


def _verify(args: str, ctx: _Context) -> Action:
    words = args.split()
    if words in (["confirm"], ["cancel"]):
        return Request({"type": "e2e_verify", "action": words[0]})
    if not 1 <= len(words) <= 2:
        return Invalid(VERIFY_USAGE)
    return Request({"type": "e2e_verify", "username": words[0],
                    "device": words[1] if len(words) == 2 else None})


def _passwd(args: str, ctx: _Context) -> Action:
    return Invalid(ASK_NOT_ARGS) if args else Passwd()


# The protocol's user names and room names (docs/protocol.md, Fields): `/history NAME`
# takes NAME as a user when it can be one, else as a room when it can be one.
USERNAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{2,31}")
ROOM = re.compile(r"[A-Za-z0-9_-]{1,32}")
HISTORY_USAGE = "usage: /history [#ROOM | USER] [N] (N a positive number), or /history more"


def _history(args: str, ctx: _Context) -> Action:
    words = args.split()
    if words == [MORE]:
        if ctx.state is None:
            return Notice("/history more works at the interactive prompt; "
                          "line mode can ask /history with a number")
        more = ctx.state.more_history()
        return Notice(more) if isinstance(more, str) else Request(more)
    limit = None
    if words and words[-1].isascii() and words[-1].isdigit():
        limit = int(words.pop())
        if limit < 1:
            return Invalid(HISTORY_USAGE)
    if len(words) > 1:
        return Invalid(HISTORY_USAGE)
    frame: Frame = {"type": "history"}
    if not words:
        if ctx.room is None:
            return Notice(NO_ROOM)
        frame["room"] = ctx.room
    elif words[0].startswith("#"):
        room = normalize_room(words[0])
        if not room:
            return Invalid(HISTORY_USAGE)
        frame["room"] = room
    elif ctx.state is not None and words[0].lower() in ctx.state.rooms:
        frame["room"] = words[0]  # a room one is in, named without its `#`
    elif USERNAME.fullmatch(words[0]):
        frame["with"] = words[0]
    elif ROOM.fullmatch(words[0]):
        frame["room"] = words[0]  # `qa`: too short for a user; the server says if not in it
    else:
        return Invalid(HISTORY_USAGE)
    if limit is not None:
        frame["limit"] = limit
    return Request(frame)


def explain(frame: Frame, reply: Frame) -> str | None:
    """A note for a refusal of `frame` that is easy to misread, or None.

    `/history dev`, for a room one is not (or no longer) in, asks for the direct messages
    with a user `dev` (a room one is in would have been taken as the room), and the server
    answers `no_such_user`. The v1.1 refusals get the command that helps, where one does
    (chat.client.roomcommands.hint: `last_owner` says to make someone else owner first).
    """
    peer = frame.get("with")
    if (reply.get("code") == "no_such_user" and frame.get("type") == "history"
            and isinstance(peer, str) and ROOM.fullmatch(peer)):
        return (f"/history {sanitize(peer, multiline=False)} is for your direct messages with "
                f"a user; for the room, write /history {_shown(peer.lower())}")
    note = roomcommands.hint(frame, reply)
    return None if note is None else sanitize(note, multiline=False)


_COMMANDS: dict[str, Callable[[str, _Context], Action]] = {
    "join": _join,
    "leave": _leave,
    "msg": _msg,
    "who": _who,
    "history": _history,
    "me": _me,
    "switch": _switch,
    "rooms": _rooms,
    "passwd": _passwd,
    "fingerprint": _fingerprint,
    "devices": _devices,
    "verify": _verify,
    "help": lambda args, ctx: Help(),
    "quit": lambda args, ctx: Quit(),
    **{name: _v11(name) for name in roomcommands.PARSERS},
}

# The commands whose first argument is a room, and those whose first argument is a user
# (the completer offers those); /history takes either.
ROOM_COMMANDS = frozenset({"join", "leave", "switch", "who", "history",
                           *roomcommands.ROOM_FIRST})
USER_COMMANDS = frozenset({"msg", "history", "devices", "verify", *roomcommands.USER_FIRST})


def parse_command(
    line: str, room: str | None, *, state: ChatState | None = None
) -> Action | None:
    """What a typed line asks for in `room` (None: no room), or None for a blank line.

    With `state`, `/history NAME` knows NAME is a room when the user is in one of that
    name, and `/history more` knows what was shown last.
    """
    text = line.rstrip("\r\n")
    if not text.strip():
        return None
    if text.startswith("//") or not text.startswith("/"):
        if room is None:
            return Notice(NO_ROOM)
        body = text[1:] if text.startswith("//") else text
        return Request({"type": "send", "room": room, "message": body})
    name, _, rest = text[1:].partition(" ")
    command = _COMMANDS.get(name.lower())
    if command is None:
        return Invalid(f"unknown command /{name} (try /help)")
    return command(rest.strip(), _Context(room, state))


COMMAND_NAMES = tuple(sorted(_COMMANDS))


def run_local(action: Switch, state: ChatState) -> str:
    """Carry out a command that sends nothing; the line to show (`! ...` for a refusal)."""
    problem = state.switch(action.room)
    if problem is not None:
        return f"! {problem}"
    return f"-- now talking in {_shown(normalize_room(action.room).lower())}"


def perform(
    client: ChatClient, request: Request, state: ChatState, timeout: float = DEFAULT_TIMEOUT,
    *, follow_rooms: bool = True,
) -> Frame:
    """Send the request, wait for its reply, follow what it changed if it succeeded.

    `follow_rooms=False` leaves the rooms to `ChatState.observe` (the terminal UI and line
    mode, whose printer sees the `ok` in its place among the other frames).
    """
    state.asking(request.frame)
    try:
        reply = client.request(request.frame, timeout)
    except BaseException:
        state.forget(request.frame)
        raise
    if reply.get("type") == "error":
        state.forget(request.frame)
    if follow_rooms or request.frame.get("type") == "history":
        state.follow(request.frame, reply)
    return reply

"""Slash commands, shared by line mode and the terminal UI: one typed line, one action.

`parse_command` is pure (a line and the current room in, an action out), so it is tested
without a server; `perform` is the one place a command's request is sent, and `ChatState`
follows the rooms the user is in from the replies: the `welcome`'s rooms to start with,
then every successful /join and /leave. Leaving the current room makes another room the
user is still in current (#general if possible), or none: then a plain line is not sent,
the user is told to /join a room instead.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from chat.client.connection import DEFAULT_TIMEOUT, ChatClient
from chat.client.errors import Frame
from chat.client.format import ME_PREFIX, sanitize

DEFAULT_ROOM = "general"  # every user is in it from registration on
DEFAULT_HISTORY = 50  # the server's own default; said here so /help can name it
NO_ROOM = "you are in no room; /join one"


HELP = f"""\
commands:
  TEXT            send TEXT to the current room (start it with // to send a leading /)
  /me ACTION      send an action: the message text "/me ACTION", which chat-client
                  shows as "* you ACTION" (other clients show the text as it is)
  /join ROOM      join ROOM and make it the current room
  /leave [ROOM]   leave ROOM (default: the current room; another of yours becomes current)
  /switch ROOM    make ROOM, one you are in, the current room
  /rooms          the rooms you are in; * marks the current one
  /msg USER TEXT  send USER a direct message
  /who [ROOM]     who is online in ROOM (default: the current room)
  /history [N]    the last N messages of the current room (default {DEFAULT_HISTORY})
  /passwd         change your password (interactive only: asked for without echo)
  /help           this text
  /quit           leave (end of input or Ctrl-D does too)"""


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
class Rooms:
    """List the rooms the user is in (nothing is sent)."""


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

Action = Request | Quit | Help | Invalid | Notice | Rooms | Switch | Passwd


@dataclass
class ChatState:
    """What the commands remember between lines: the rooms the user is in, the current one.

    Room names are kept in lower case, as the server answers with them. `room` is None
    when the user is in no room (or left the current one and is in no other).
    """

    room: str | None = DEFAULT_ROOM
    rooms: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.rooms = {r.lower() for r in self.rooms}
        if self.room is not None:
            self.room = self.room.lower()
            self.rooms.add(self.room)

    @classmethod
    def start(cls, room: str | None, rooms: Iterable[object] = ()) -> ChatState:
        """The state after login: the `welcome`'s `rooms` (non-names ignored), `room` current."""
        return cls(room, {r for r in rooms if isinstance(r, str)})

    @property
    def prompt(self) -> str:
        """The interactive prompt: the current room, or `-` for none."""
        return f"[{sanitize(self.room or '-', multiline=False)}]> "

    def joined(self, room: str) -> None:
        self.rooms.add(room.lower())
        self.room = room.lower()

    def left(self, room: str) -> None:
        room = room.lower()
        self.rooms.discard(room)
        if self.room == room:  # talk on in #general if still there, else in another room
            fallback = DEFAULT_ROOM if DEFAULT_ROOM in self.rooms else min(self.rooms, default=None)
            self.room = fallback

    def describe_rooms(self) -> str:
        """What /rooms shows: every room, sorted, the current one marked with `*`."""
        if not self.rooms:
            return NO_ROOM
        names = [("*" if r == self.room else "") + "#" + sanitize(r, multiline=False)
                 for r in sorted(self.rooms)]
        return "rooms: " + " ".join(names)

    def switch(self, room: str) -> str | None:
        """Make `room` current; None if done, else why not (the user is not in it)."""
        room = room.lower()
        if room not in self.rooms:
            return f"you are not in #{sanitize(room, multiline=False)}; /join it first"
        self.room = room
        return None

    def follow(self, frame: Frame, reply: Frame) -> None:
        """Note what a successful join or leave changed; anything else changes nothing."""
        op = reply.get("op")
        if reply.get("type") != "ok" or op != frame.get("type"):
            return
        room = reply.get("room", frame.get("room"))  # the server's (lower-case) name
        if not isinstance(room, str) or not room:
            return
        if op == "join":
            self.joined(room)
        elif op == "leave":
            self.left(room)


def _join(args: str, room: str | None) -> Action:
    if not args or " " in args:
        return Invalid("usage: /join ROOM")
    return Request({"type": "join", "room": args})


def _leave(args: str, room: str | None) -> Action:
    if " " in args:
        return Invalid("usage: /leave [ROOM]")
    target = args or room
    if target is None:
        return Notice(NO_ROOM)
    return Request({"type": "leave", "room": target})


def _msg(args: str, room: str | None) -> Action:
    user, _, text = args.partition(" ")
    if not user or not text.strip():
        return Invalid("usage: /msg USER TEXT")
    return Request({"type": "send", "to": user, "message": text})


def _who(args: str, room: str | None) -> Action:
    if " " in args:
        return Invalid("usage: /who [ROOM]")
    target = args or room
    if target is None:
        return Notice(NO_ROOM)
    return Request({"type": "who", "room": target})


def _me(args: str, room: str | None) -> Action:
    if not args:
        return Invalid("usage: /me ACTION")
    if room is None:
        return Notice(NO_ROOM)
    return Request({"type": "send", "room": room, "message": ME_PREFIX + args})


def _switch(args: str, room: str | None) -> Action:
    if not args or " " in args:
        return Invalid("usage: /switch ROOM")
    return Switch(args.removeprefix("#"))


def _rooms(args: str, room: str | None) -> Action:
    return Invalid("usage: /rooms") if args else Rooms()


def _passwd(args: str, room: str | None) -> Action:
    return Invalid(ASK_NOT_ARGS) if args else Passwd()


def _history(args: str, room: str | None) -> Action:
    if args and (not args.isdigit() or int(args) < 1):
        return Invalid("usage: /history [N], N a positive number")
    if room is None:
        return Notice(NO_ROOM)
    frame: Frame = {"type": "history", "room": room}
    if args:
        frame["limit"] = int(args)
    return Request(frame)


_COMMANDS: dict[str, Callable[[str, str | None], Action]] = {
    "join": _join,
    "leave": _leave,
    "msg": _msg,
    "who": _who,
    "history": _history,
    "me": _me,
    "switch": _switch,
    "rooms": _rooms,
    "passwd": _passwd,
    "help": lambda args, room: Help(),
    "quit": lambda args, room: Quit(),
}


def parse_command(line: str, room: str | None) -> Action | None:
    """What a typed line asks for in `room` (None: no room), or None for a blank line."""
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
    return command(rest.strip(), room)


COMMAND_NAMES = tuple(sorted(_COMMANDS))


def run_local(action: Rooms | Switch, state: ChatState) -> str:
    """Carry out a command that sends nothing; the line to show (`! ...` for a refusal)."""
    if isinstance(action, Rooms):
        return "-- " + state.describe_rooms()
    problem = state.switch(action.room)
    if problem is not None:
        return f"! {problem}"
    return f"-- now talking in #{sanitize(action.room.lower(), multiline=False)}"


def perform(
    client: ChatClient, request: Request, state: ChatState, timeout: float = DEFAULT_TIMEOUT
) -> Frame:
    """Send the request, wait for its reply, follow the room change if it succeeded."""
    reply = client.request(request.frame, timeout)
    state.follow(request.frame, reply)
    return reply

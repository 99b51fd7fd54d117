"""Slash commands, shared by line mode and the terminal UI: one typed line, one action.

`parse_command` is pure (a line and the current room in, an action out), so it is tested
without a server; `perform` is the one place a command's request is sent and the current
room follows a successful /join or /leave.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from chat.client.connection import DEFAULT_TIMEOUT, ChatClient
from chat.client.errors import Frame

DEFAULT_ROOM = "general"  # every user is in it from registration on
DEFAULT_HISTORY = 50  # the server's own default; said here so /help can name it

HELP = f"""\
commands:
  TEXT            send TEXT to the current room (start it with // to send a leading /)
  /join ROOM      join ROOM and make it the current room
  /leave [ROOM]   leave ROOM (default: the current room)
  /msg USER TEXT  send USER a direct message
  /who [ROOM]     who is online in ROOM (default: the current room)
  /history [N]    the last N messages of the current room (default {DEFAULT_HISTORY})
  /help           this text
  /quit           leave (end of input or Ctrl-D does too)"""


@dataclass(frozen=True)
class Request:
    """A frame to send as a request; `room_after` becomes the current room if it succeeds."""

    frame: Frame
    room_after: str | None = None


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


Action = Request | Quit | Help | Invalid


@dataclass
class ChatState:
    """What the commands need to remember between lines."""

    room: str = DEFAULT_ROOM


def _join(args: str, room: str) -> Action:
    if not args or " " in args:
        return Invalid("usage: /join ROOM")
    return Request({"type": "join", "room": args}, room_after=args.lower())


def _leave(args: str, room: str) -> Action:
    if " " in args:
        return Invalid("usage: /leave [ROOM]")
    target = args or room
    # Leaving the current room leaves nowhere to talk; fall back to the room everyone has.
    after = DEFAULT_ROOM if target.lower() == room.lower() else None
    return Request({"type": "leave", "room": target}, room_after=after)


def _msg(args: str, room: str) -> Action:
    user, _, text = args.partition(" ")
    if not user or not text.strip():
        return Invalid("usage: /msg USER TEXT")
    return Request({"type": "send", "to": user, "message": text})


def _who(args: str, room: str) -> Action:
    if " " in args:
        return Invalid("usage: /who [ROOM]")
    return Request({"type": "who", "room": args or room})


def _history(args: str, room: str) -> Action:
    frame: Frame = {"type": "history", "room": room}
    if args:
        if not args.isdigit() or int(args) < 1:
            return Invalid("usage: /history [N], N a positive number")
        frame["limit"] = int(args)
    return Request(frame)


_COMMANDS: dict[str, Callable[[str, str], Action]] = {
    "join": _join,
    "leave": _leave,
    "msg": _msg,
    "who": _who,
    "history": _history,
    "help": lambda args, room: Help(),
    "quit": lambda args, room: Quit(),
}


def parse_command(line: str, room: str) -> Action | None:
    """What a typed line asks for, or None for a blank line (nothing to do)."""
    text = line.rstrip("\r\n")
    if not text.strip():
        return None
    if text.startswith("//") or not text.startswith("/"):
        body = text[1:] if text.startswith("//") else text
        return Request({"type": "send", "room": room, "message": body})
    name, _, rest = text[1:].partition(" ")
    command = _COMMANDS.get(name.lower())
    if command is None:
        return Invalid(f"unknown command /{name} (try /help)")
    return command(rest.strip(), room)


def perform(
    client: ChatClient, request: Request, state: ChatState, timeout: float = DEFAULT_TIMEOUT
) -> Frame:
    """Send the request, wait for its reply, follow the room change if it succeeded."""
    reply = client.request(request.frame, timeout)
    if reply.get("type") != "error" and request.room_after is not None:
        state.room = request.room_after
    return reply

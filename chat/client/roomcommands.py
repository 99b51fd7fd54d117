"""The v1.1 room commands (/create, /invite, /kick, /ban, ...): a typed line to a frame.

Pure functions, one a command: the words after the command name and the current room in,
the request frame out, or a usage text (str) saying how to write it. chat.client.commands
turns those into its actions and knows nothing of their syntax.

How a room is written: where a ROOM may be left out and free text may follow (`/kick`,
`/ban`, `/topic`), it must be written `#room`, so that "/kick bob spamming" is never read
as a kick from a room called "spamming"; where only a room can stand (`/invite bob dev`,
`/info dev`) the `#` is optional. Left out, the room is the current one.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection

from chat.client.errors import Frame

# The protocol's field rules (docs/protocol.md, Fields), checked here only to say "usage"
# for a line whose words are in the wrong places; the server is the judge of the rest.
USERNAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{2,31}")
ROOM = re.compile(r"[A-Za-z0-9_-]{1,32}")
ROLES = ("owner", "moderator", "member")
ROLE_ALIASES = {"mod": "moderator", "op": "owner"}  # as people say them
VISIBILITIES = ("public", "private")
HISTORIES = ("shared", "joined")
ENCRYPTED_WORDS = ("encrypted", "--encrypted")  # end-to-end encrypted, private for good
CLEAR_TOPIC = "-"  # `/topic -` clears the topic (the server's "")

NO_ROOM = "you are in no room; /join one"
# Said when a name typed for a new room cannot be one, rather than only the usage line.
ROOM_RULE = "a room name is 1 to 32 of the letters A-Z a-z, the digits 0-9, _ and -"

USAGE = {
    "create": "usage: /create ROOM [public|private] [shared|joined] [encrypted]",
    "invite": "usage: /invite USER [ROOM]",
    "kick": "usage: /kick USER [#ROOM] [REASON...]",
    "ban": "usage: /ban USER [#ROOM] [REASON...]",
    "unban": "usage: /unban USER [ROOM]",
    "role": "usage: /role USER owner|moderator|member [ROOM]",
    "topic": "usage: /topic [#ROOM] [TEXT | -]  (no TEXT: show it; -: clear it)",
    "sethistory": "usage: /sethistory shared|joined [ROOM]",
    "info": "usage: /info [ROOM]",
    "members": "usage: /members [ROOM]",
    "block": "usage: /block USER",
    "unblock": "usage: /unblock USER",
}


class NoRoom(Exception):
    """The command needs a room, none was named and there is no current one."""


def _room(word: str) -> str | None:
    """A room as typed, `#dev` or `dev`; None if it cannot be a room name."""
    bare = word.removeprefix("#")
    return bare if ROOM.fullmatch(bare) else None


def _user(word: str) -> str | None:
    return word if USERNAME.fullmatch(word) else None


def _or_current(room: str | None, current: str | None) -> str:
    target = room or current
    if target is None:
        raise NoRoom
    return target


def _split(args: str, most: int) -> list[str]:
    return args.split(None, most) if args else []


def create(args: str, current: str | None) -> Frame | str:
    words = args.split()
    if not words or len(words) > 4:
        return USAGE["create"]
    if _room(words[0]) is None:
        return f"{ROOM_RULE}, not {words[0]}; {USAGE['create']}"
    frame: Frame = {"type": "create", "room": _room(words[0])}
    for word in (w.lower() for w in words[1:]):
        if word in ENCRYPTED_WORDS and "encrypted" not in frame:
            frame["encrypted"] = True
            continue
        key = "visibility" if word in VISIBILITIES else "history" if word in HISTORIES else None
        if key is None or key in frame:
            return USAGE["create"]
        frame[key] = word
    if frame.get("encrypted"):
        if frame.get("visibility", "private") != "private":
            return f"only a private room can be encrypted; {USAGE['create']}"
        frame["visibility"] = "private"  # said outright: the server's default is public
    return frame


def invite(args: str, current: str | None) -> Frame | str:
    return _user_and_room("invite", args, current)


def unban(args: str, current: str | None) -> Frame | str:
    return _user_and_room("unban", args, current)


def _user_and_room(kind: str, args: str, current: str | None) -> Frame | str:
    words = args.split()
    if not 1 <= len(words) <= 2 or _user(words[0]) is None:
        return USAGE[kind]
    room = _room(words[1]) if len(words) == 2 else None
    if len(words) == 2 and room is None:
        return USAGE[kind]
    return {"type": kind, "room": _or_current(room, current), "username": words[0]}


def _unmarked_room(text: str, rooms: Collection[str]) -> str | None:
    """The first word of `text` if it names one of `rooms` (written without its `#`)."""
    first = text.split(None, 1)[0] if text.strip() else ""
    return first if first.lower() in rooms and _room(first) is not None else None


def _did_you_mean(room: str, command: str) -> str:
    """Refuses a room written as the first word of free text; shows the line meant."""
    return f"did you mean #{room}? write the room with its #: {command}"


def _removal(kind: str) -> Callable[..., Frame | str]:
    def parse(args: str, current: str | None, rooms: Collection[str] = ()) -> Frame | str:
        words = _split(args, 1)
        if not words or _user(words[0]) is None:
            return USAGE[kind]
        rest = words[1] if len(words) == 2 else ""
        room = None
        if rest.startswith("#"):
            first, _, rest = rest.partition(" ")
            room = _room(first)
            if room is None:
                return USAGE[kind]
        elif (meant := _unmarked_room(rest, rooms)) is not None:
            # "/ban bob dev rude" typed in another room: without this, "dev rude" would be
            # the reason and bob banned from the current room.
            reason = rest.split(None, 1)[1:]
            return _did_you_mean(meant, " ".join([f"/{kind}", words[0], f"#{meant}", *reason]))
        frame: Frame = {"type": kind, "room": _or_current(room, current),
                        "username": words[0]}
        if rest.strip():
            frame["reason"] = rest.strip()
        return frame

    return parse


kick = _removal("kick")
ban = _removal("ban")


def role(args: str, current: str | None) -> Frame | str:
    words = args.split()
    if not 2 <= len(words) <= 3 or _user(words[0]) is None:
        return USAGE["role"]
    wanted = ROLE_ALIASES.get(words[1].lower(), words[1].lower())
    room = _room(words[2]) if len(words) == 3 else None
    if wanted not in ROLES or (len(words) == 3 and room is None):
        return USAGE["role"]
    return {"type": "set_role", "room": _or_current(room, current), "username": words[0],
            "role": wanted}


def topic(args: str, current: str | None, rooms: Collection[str] = ()) -> Frame | str:
    """`/topic` shows the topic (room_info), `/topic TEXT` sets it, `/topic -` clears it.

    A TEXT whose first word names one of `rooms` (the user's) is refused with a hint:
    `/topic dev friday` more likely meant #dev than the topic "dev friday"; `/topic #dev dev
    friday` says it plainly.
    """
    room, text = None, args
    if args.startswith("#"):
        first, _, text = args.partition(" ")
        room = _room(first)
        if room is None:
            return USAGE["topic"]
    elif (meant := _unmarked_room(text, rooms)) is not None:
        return _did_you_mean(meant, " ".join(["/topic", f"#{meant}", *text.split(None, 1)[1:]]))
    target = _or_current(room, current)
    text = text.strip()
    if not text:
        return {"type": "room_info", "room": target}
    return {"type": "topic", "room": target, "topic": "" if text == CLEAR_TOPIC else text}


def set_history(args: str, current: str | None) -> Frame | str:
    words = args.split()
    if not 1 <= len(words) <= 2 or words[0].lower() not in HISTORIES:
        return USAGE["sethistory"]
    room = _room(words[1]) if len(words) == 2 else None
    if len(words) == 2 and room is None:
        return USAGE["sethistory"]
    return {"type": "set_history", "room": _or_current(room, current),
            "history": words[0].lower()}


def _about_room(kind: str, usage: str) -> Callable[[str, str | None], Frame | str]:
    def parse(args: str, current: str | None) -> Frame | str:
        words = args.split()
        room = _room(words[0]) if len(words) == 1 else None
        if words and room is None:
            return USAGE[usage]
        return {"type": kind, "room": _or_current(room, current)}

    return parse


info = _about_room("room_info", "info")
members = _about_room("members", "members")


def _about_user(kind: str) -> Callable[[str, str | None], Frame | str]:
    def parse(args: str, current: str | None) -> Frame | str:
        words = args.split()
        if len(words) != 1 or _user(words[0]) is None:
            return USAGE[kind]
        return {"type": kind, "username": words[0]}

    return parse


block = _about_user("block")
unblock = _about_user("unblock")

# Command name -> parser: (args, current room) -> frame or usage text; those in SEES_ROOMS
# take the user's rooms (lower case) too, to catch a room written without its `#` as the
# first word of their free text. `role` and `sethistory` name the frames `set_role`,
# `set_history`.
SEES_ROOMS = frozenset({"kick", "ban", "topic"})
PARSERS: dict[str, Callable[..., Frame | str]] = {
    "create": create, "invite": invite, "kick": kick, "ban": ban, "unban": unban,
    "role": role, "topic": topic, "sethistory": set_history, "info": info,
    "members": members, "block": block, "unblock": unblock,
}
# What Tab offers for the first argument (chat.client.completion).
USER_FIRST = frozenset({"invite", "kick", "ban", "unban", "role", "block", "unblock"})
ROOM_FIRST = frozenset({"info", "members", "topic"})


# -- what to do about a refusal ---------------------------------------------------------------

_OWNERS_ONLY = frozenset({"set_role", "set_history"})
_MODERATORS = frozenset({"kick", "ban", "unban", "topic"})


def hint(frame: Frame, reply: Frame) -> str | None:
    """What the user can do about a v1.1 refusal of `frame`, where one helps; or None.

    The server's text says what is wrong; this says which command would put it right.
    Names come from what the user typed (frame), shown by the caller after sanitizing.
    """
    code, kind = reply.get("code"), frame.get("type")
    room = f"#{frame['room']}" if isinstance(frame.get("room"), str) else "the room"
    user = frame.get("username") if isinstance(frame.get("username"), str) else "USER"
    if code == "last_owner":
        return (f"{room} must keep an owner: make someone else owner first "
                f"(/role USER owner {room}), then try again")
    if code == "banned" and kind == "join":
        return f"you are banned from {room}; only its moderators can lift that (/unban)"
    if code == "banned" and kind == "invite":
        return f"{user} is banned from {room}: /unban {user} {room} first"
    if code == "forbidden" and room == "#general" and kind in _MODERATORS | _OWNERS_ONLY:
        return "#general is moderated by the server's operator only"
    if code == "forbidden" and room == "#general":
        return None  # an invitation or a leave: the server's text says it all
    if code == "forbidden" and kind in _OWNERS_ONLY:
        return f"only an owner of {room} may do that (/info {room} shows your role)"
    if code == "forbidden" and kind in _MODERATORS | {"invite"}:
        return (f"only moderators and owners of {room} may do that, and only to someone "
                f"of a lower role (/members {room} shows the roles)")
    if code == "no_such_room":
        return (f"no room {room} that you can see: /rooms lists the public ones and yours; "
                "a private room needs an invitation")
    if code == "room_taken":
        return f"{room} exists already: /join {room}, or /create another name"
    if code == "blocked" and kind == "send":
        return f"{frame.get('to', 'that user')} does not take direct messages from you"
    if code == "blocked" and kind == "invite":
        return f"{user} does not take invitations from you"
    if code == "not_in_room" and kind in ("room_info", "members", "topic", "set_history"):
        return f"you are not in {room}: /join {room} first"
    return None


def about_the_asker(frame: Frame, reply: Frame) -> bool:
    """Whether a `not_in_room` refusal says the user is not in the frame's room.

    For a request about another user (kick, set_role, ...) it may mean that user instead,
    so it proves nothing about one's own membership.
    """
    return reply.get("code") == "not_in_room" and "username" not in frame

"""Tab completion for the interactive prompt: command names, rooms and online users.

Theory of operation
-------------------
A `Roster` remembers who is online in which room, from the frames the printer thread sees
(`who` replies, `presence` events) and from the `who` the UI asks for each room at login and
on /join; the members a `members` list names (offline ones too: one may /invite or /kick
them) and the rooms `list_rooms` and invitations name (one may /join them). The prompt's
event loop reads it while completing, so it keeps its sets under a lock and hands out
copies. The rooms the user is in come from `ChatState`, whose `rooms` set
is replaced, never changed in place, so reading it here needs no lock.

A completed word is followed by a space, as in a shell, so the next word can be typed at
once; a name completed at the very start of a message gets `: ` (the IRC way of addressing
someone).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from prompt_toolkit.completion import CompleteEvent, Completer, Completion
from prompt_toolkit.document import Document

from chat.client.commands import COMMAND_NAMES, ROOM_COMMANDS, USER_COMMANDS, ChatState

ADDRESS_SUFFIX = ": "  # after a name completed at the start of a message: "alice: hi"


class Roster:
    """Who is online in each room, as last seen; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rooms: dict[str, set[str]] = {}
        self._members: set[str] = set()  # named by a `members` list, online or not
        self._listed: set[str] = set()  # rooms named by `list_rooms` or an invitation

    def note(self, frame: Mapping[str, Any]) -> None:
        """Learn from one received frame: who, presence, members, rooms, invited."""
        kind, room = frame.get("type"), frame.get("room")
        if kind == "rooms" and isinstance(frame.get("rooms"), list):
            with self._lock:
                self._listed |= {r["room"].lower() for r in frame["rooms"]
                                 if isinstance(r, dict) and isinstance(r.get("room"), str)}
            return
        if not isinstance(room, str):
            return
        room = room.lower()
        with self._lock:
            if kind == "invited":
                self._listed.add(room)
            elif kind == "members" and isinstance(frame.get("members"), list):
                self._members |= {m["username"] for m in frame["members"]
                                  if isinstance(m, dict) and isinstance(m.get("username"), str)}
            elif kind == "who" and isinstance(frame.get("users"), list):
                self._rooms[room] = {u for u in frame["users"] if isinstance(u, str)}
            elif kind == "presence" and isinstance(frame.get("username"), str):
                members = self._rooms.setdefault(room, set())
                if frame.get("event") == "join":
                    members.add(frame["username"])
                elif frame.get("event") == "leave":
                    members.discard(frame["username"])

    def users(self, room: str | None = None) -> set[str]:
        """Everyone seen online, or only in `room`."""
        with self._lock:
            if room is not None:
                return set(self._rooms.get(room.lower(), ()))
            return set().union(*self._rooms.values())

    def names(self) -> set[str]:
        """Everyone seen online, and every member a `members` list named."""
        with self._lock:
            return set().union(self._members, *self._rooms.values())

    def rooms(self) -> set[str]:
        with self._lock:
            return set(self._rooms) | self._listed


class ChatCompleter(Completer):
    """Completes `/command`, a room or a user as its first argument, a name in a message."""

    def __init__(self, state: ChatState, roster: Roster) -> None:
        self._state = state
        self._roster = roster

    def get_completions(
        self, document: Document, complete_event: CompleteEvent
    ) -> Iterator[Completion]:
        text = document.text_before_cursor
        if not text.startswith("/") or text.startswith("//"):
            yield from self._names_in_text(text)
            return
        words = text[1:].split(" ")
        if len(words) == 1:
            yield from _matching(words[0], COMMAND_NAMES)
            return
        command, word = words[0].lower(), words[-1]
        bare = word.removeprefix("#")
        rooms = self._state.rooms | self._roster.rooms()
        if len(words) > 2:
            if bare != word and command != "msg":  # `/kick bob #d`: a room after the user
                yield from _matching(bare, rooms, prefix="#")
            return
        if command in ROOM_COMMANDS:
            if bare != word or command not in USER_COMMANDS:  # a room, `#` kept if typed
                yield from _matching(bare, rooms, prefix=word[: len(word) - len(bare)])
                return
            # /history NAME: a user, or one of the rooms, offered with its `#`
            yield from _matching(word, rooms, prefix="#", typed_prefix="")
        if command in USER_COMMANDS:
            yield from _matching(word, self._roster.names())

    def _names_in_text(self, text: str) -> Iterator[Completion]:
        """In a message: the word before the cursor, as a name online in the current room."""
        word = text.rsplit(" ", 1)[-1]
        if not word:
            return
        room = self._state.room
        names = self._roster.users(room) if room is not None else set()
        suffix = ADDRESS_SUFFIX if word == text else " "
        yield from _matching(word, names, suffix=suffix)


def _matching(
    word: str, candidates: Iterable[str], *, prefix: str = "", typed_prefix: str | None = None,
    suffix: str = " ",
) -> Iterator[Completion]:
    """The candidates that start with `word`, case-insensitively, sorted; each replaces it.

    Each is offered as `prefix` + candidate + `suffix`; it replaces `typed_prefix` + `word`
    (by default, the `prefix` was typed: a room's `#`).
    """
    key = word.lower()
    typed = prefix if typed_prefix is None else typed_prefix
    for candidate in sorted(set(candidates), key=str.lower):
        if candidate.lower().startswith(key):
            yield Completion(
                prefix + candidate + suffix, start_position=-len(typed + word),
                display=prefix + candidate,
            )

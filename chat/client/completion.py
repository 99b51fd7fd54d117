"""Tab completion for the interactive prompt: command names, rooms and online users.

Theory of operation
-------------------
A `Roster` remembers who is online in which room, from the frames the printer thread sees
(`who` replies, `presence` events); the prompt's event loop reads it while completing, so
it keeps its dict under a lock and hands out copies. The rooms the user is in come from
`ChatState`, which only the main thread changes and the completer (run in the main
thread's prompt loop) only reads.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from prompt_toolkit.completion import CompleteEvent, Completer, Completion
from prompt_toolkit.document import Document

from chat.client.commands import COMMAND_NAMES, ChatState

ROOM_COMMANDS = frozenset({"join", "leave", "switch", "who"})
USER_COMMANDS = frozenset({"msg"})


class Roster:
    """Who is online in each room, as last seen; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rooms: dict[str, set[str]] = {}

    def note(self, frame: Mapping[str, Any]) -> None:
        """Learn from one received frame (anything but who and presence is ignored)."""
        kind, room = frame.get("type"), frame.get("room")
        if not isinstance(room, str):
            return
        room = room.lower()
        with self._lock:
            if kind == "who" and isinstance(frame.get("users"), list):
                self._rooms[room] = {u for u in frame["users"] if isinstance(u, str)}
            elif kind == "presence" and isinstance(frame.get("username"), str):
                members = self._rooms.setdefault(room, set())
                if frame.get("event") == "join":
                    members.add(frame["username"])
                elif frame.get("event") == "leave":
                    members.discard(frame["username"])

    def users(self) -> set[str]:
        with self._lock:
            return set().union(*self._rooms.values())

    def rooms(self) -> set[str]:
        with self._lock:
            return set(self._rooms)


class ChatCompleter(Completer):
    """Completes `/command`, then a room or a user name as the command's first argument."""

    def __init__(self, state: ChatState, roster: Roster) -> None:
        self._state = state
        self._roster = roster

    def get_completions(
        self, document: Document, complete_event: CompleteEvent
    ) -> Iterator[Completion]:
        text = document.text_before_cursor
        if not text.startswith("/") or text.startswith("//"):
            return
        words = text[1:].split(" ")
        if len(words) == 1:
            yield from _matching(words[0], COMMAND_NAMES)
            return
        if len(words) != 2:
            return
        command, word = words[0].lower(), words[1]
        if command in ROOM_COMMANDS:
            yield from _matching(word, self._state.rooms | self._roster.rooms())
        elif command in USER_COMMANDS:
            yield from _matching(word, self._roster.users())


def _matching(word: str, candidates: Iterable[str]) -> Iterator[Completion]:
    """The candidates that start with `word`, case-insensitively, sorted; each replaces it."""
    key = word.lower()
    for candidate in sorted(set(candidates), key=str.lower):
        if candidate.lower().startswith(key):
            yield Completion(candidate, start_position=-len(word))

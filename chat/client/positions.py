"""Where a session stands in each conversation, for catching up after a lost connection.

On one node msg_ids are committed in the order they are taken, so one number says where a
session stands: the `welcome`'s `last_msg_id`, raised by every message received. Over
several nodes they are committed in order only within a conversation (a room; a user's
direct messages): a room's message may take its id before another room's and be stored
after it, so "after the last id received anywhere" can skip it. There the `welcome` says
where each conversation stood (`positions`), and each is raised only by its own messages
(docs/protocol.md, "Here: several nodes").
"""

from __future__ import annotations

from typing import Any


class Positions:
    """Each room's position and the direct messages'; written by the client's I/O thread
    as messages come, read once the connection has ended."""

    def __init__(self, rooms: dict[str, int], direct: int, joined_later: int) -> None:
        self.rooms = rooms
        self.direct = direct
        # A room joined after the welcome: every message of it stored after the join took
        # its id after the welcome's `last_msg_id` had been stored, so that is a safe start.
        self.joined_later = joined_later

    @classmethod
    def from_welcome(cls, value: Any, last_msg_id: int) -> Positions | None:
        """From the `welcome`'s `positions`; None if it has none (one node) or they are
        not what the protocol says (then `last_msg_id` alone is used, as on one node)."""
        if not isinstance(value, dict):
            return None
        rooms, direct = value.get("rooms"), value.get("direct")
        if not isinstance(rooms, dict) or type(direct) is not int:
            return None
        return cls({r.lower(): n for r, n in rooms.items()
                    if isinstance(r, str) and type(n) is int}, direct, last_msg_id)

    def note(self, frame: dict[str, Any]) -> None:
        """A message received live: its conversation stands at least there now (a session
        gets each conversation's messages in msg_id order). Not the echo of one's own
        (`re`): it goes to the sender at once, also from a node that has not yet applied
        the sender's join, made on another, and still has the room's earlier messages to
        deliver to it."""
        msg_id = frame.get("msg_id")
        if type(msg_id) is not int or "re" in frame:
            return
        room = frame.get("room")
        if isinstance(room, str):
            key = room.lower()
            if msg_id > self.room(key):
                self.rooms[key] = msg_id
        elif "to" in frame and msg_id > self.direct:
            self.direct = msg_id

    def room(self, name: str) -> int:
        return self.rooms.get(name.lower(), self.joined_later)

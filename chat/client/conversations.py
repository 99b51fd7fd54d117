"""Conversations: what a Megolm session, a room key and a message belong to.

A conversation is a room, by its lower-case name, or the direct messages of two users,
`dm:a:b` with both names lower-cased and sorted (`dm:a:a` for notes to oneself). Room
names cannot hold `:`, so the two never collide. The Megolm plaintext names the
conversation, so that the server cannot show a message in another room or between
other people than it was written for (docs/e2e.md).
"""

from __future__ import annotations

from typing import Any

from chat.client.e2e_results import Refused

MAX_MESSAGE_CHARS = 4000  # the server's limit on plaintext messages; we keep it too


def room_conversation(room: str) -> str:
    return room.lower()


def dm_conversation(a: str, b: str) -> str:
    first, second = sorted((a.lower(), b.lower()))
    return f"dm:{first}:{second}"


def conversation_of(frame: dict[str, Any]) -> str:
    """The conversation a `message` frame belongs to, from its server-stamped fields."""
    if isinstance(frame.get("room"), str):
        return room_conversation(frame["room"])
    if isinstance(frame.get("to"), str) and isinstance(frame.get("username"), str):
        return dm_conversation(frame["username"], frame["to"])
    raise Refused("a message with neither a room nor a recipient")


def dm_members(conversation: str) -> tuple[str, str] | None:
    if not conversation.startswith("dm:"):
        return None
    parts = conversation.split(":")
    return (parts[1], parts[2]) if len(parts) == 3 else None


def make_plaintext(conversation: str, sender: str, text: str) -> dict[str, Any]:
    """The Megolm plaintext of `text` from `sender` in the conversation."""
    members = dm_members(conversation)
    if members is None:
        return {"room": conversation, "message": text}
    other = members[1] if members[0] == sender.lower() else members[0]
    return {"from": sender.lower(), "to": other, "message": text}


def check_plaintext(plaintext: dict[str, Any], conversation: str,
                    frame: dict[str, Any]) -> str:
    """The text of a decrypted Megolm plaintext, if it was written for the conversation
    (and, for a direct message, the sender and recipient) the frame shows it in."""
    user = str(frame.get("username", "")).lower()
    text = plaintext.get("message")
    if not isinstance(text, str) or not 1 <= len(text) <= MAX_MESSAGE_CHARS:
        raise Refused("a decrypted message without a valid text")
    if dm_members(conversation) is None:
        if plaintext.get("room") != conversation or "to" in plaintext:
            raise Refused(f"a message for {str(plaintext.get('room'))[:32]} "
                          f"shown in {conversation}")
    elif (plaintext.get("from"), plaintext.get("to")) != (
            user, str(frame.get("to", "")).lower()):
        raise Refused("a direct message shown between other people than it was "
                      "written for")
    return text

"""On login: the last messages of the current room, then what arrived while away.

Right after `welcome` the server pushes the direct messages stored while the user was
offline, as `message` frames with `to`. `login_backlog` runs before the printer starts: it
asks quietly (the reply is not an event) for the last `limit` messages of the current room,
then takes the frames already received, which are exactly those that came before that reply
(the connection queues frames in arrival order before waking the request). What it returns
is shown in this order: those frames that are not messages (the `welcome`, a join's `ok`),
`-- last messages in #room` and the history, room messages that came in meanwhile, then
`-- while you were away` and the stored direct messages; each message once, through `Seen`.
Later frames are live traffic and are shown as they come.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from chat.client.errors import ClientError, Frame
from chat.client.reconnect import CATCH_UP_LIMIT, Seen

DEFAULT_RECENT = 20  # messages of the current room shown on login; 0: none


class Client(Protocol):
    def request(self, frame: Frame, timeout: float = ..., *, quiet: bool = ...) -> Frame: ...

    def pending_events(self) -> list[Frame]: ...


def _is_message(frame: Frame) -> bool:
    return frame.get("type") == "message"


def login_backlog(
    client: Client, seen: Seen, room: str | None, limit: int, timeout: float
) -> list[Frame | str]:
    """Frames to show and notes (str, shown as `-- note`), in order; [] when `limit` is 0."""
    if limit <= 0 or room is None:
        return []
    try:
        reply = client.request(
            {"type": "history", "room": room, "limit": min(limit, CATCH_UP_LIMIT)},
            timeout, quiet=True,
        )
    except ClientError:
        return []  # the printer finds out about a lost connection by itself
    held = client.pending_events()
    shown: list[Frame | str] = [f for f in held if not _is_message(f)]
    listed = reply.get("messages") if reply.get("type") == "history" else None
    history = [
        {"type": "message", **m} for m in (listed if isinstance(listed, list) else [])
        if isinstance(m, dict)
    ]
    recent = [m for m in history if seen.fresh(m)]
    if recent:
        shown.append(f"last messages in #{room}")
        shown.extend(recent)
    shown.extend(f for f in held if _is_message(f) and "to" not in f and seen.fresh(f))
    away = [f for f in held if _is_message(f) and "to" in f and seen.fresh(f)]
    if away:
        shown.append("while you were away")
        shown.extend(away)
    return shown


def show_backlog(
    items: list[Frame | str], show: Callable[[Frame], None], notify: Callable[[str], None]
) -> None:
    """Show what `login_backlog` returned: frames through `show`, notes through `notify`."""
    for item in items:
        if isinstance(item, str):
            notify(item)
        else:
            show(item)

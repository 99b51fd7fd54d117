"""What the terminal UI's printer thread shows: the login banner, live frames, a joined room.

Theory of operation
-------------------
One thread, the printer, runs `Printer.run`. It alone reads the connection's events and
calls `Seen.fresh`, and it follows the rooms from the frames in the order they came
(`ChatState.observe`: this session's own join or leave from its `ok`, another session's from
its presence or its messages). Every line goes through `show` (the UI's thread-safe Screen).

The login banner comes first, whole, before any live line: what the server said first
(`welcome`, the `ok` of joining --room), the room's last messages and the direct messages
that came while away (chat.client.backlog), who is online in the current room, then the
hint. A frame that came meanwhile but is news (a presence, a new message) is shown after it.

Then the live frames. Presence is held in a `PresenceBatch` and shown coalesced, at the end
of its window or as soon as anything else is to be shown, so order is kept. When this
session's own `ok` to a join arrives, the printer asks (quietly: the replies are not events)
for the room's last messages and who is there, and shows them right after it, and for
the user's role there (room_info), which the prompt shows, and the room's topic and history
setting, so that a `room` event can say which of them changed; so it does for a room it
made (the role and settings only) and for a room another session joined. At login and
after each reconnect it asks `list_rooms` for the user's role in every room.

The command thread waits for the printer to have handled the reply to each request it sent
(`Handled`), so the next prompt comes after the reply's lines and after the change it made
(a join's room, a leave's new current room): the prompt never shows a stale room.

A roster thread asks `who` for each of the user's other rooms at login and after each
reconnect, to feed Tab completion; it paces itself to half the server's frame rate so the
user's own lines are never kept waiting behind it.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from typing import Any

from chat.client.backlog import DEFAULT_RECENT
from chat.client.commands import NOTES_AFTER, ChatState
from chat.client.completion import Roster
from chat.client.connection import DEFAULT_TIMEOUT
from chat.client.errors import ClientError, ConnectionClosed, Frame, TimedOut
from chat.client.format import format_event, is_mention, presence_text, sanitize, who_summary
from chat.client.presence import PresenceBatch
from chat.client.reconnect import CATCH_UP_LIMIT, Link

BELL = "\a"
HINT = "type /help for commands, /quit or Ctrl-D to leave"
HANDLED_REMEMBERED = 64  # replies remembered as handled: the command thread waits on one
ROSTER_BURST = 10  # `who` requests sent at once at login; then paced (a third of v1's burst)


def with_bell(text: str, frame: Frame, me: str | None, bell: bool) -> str:
    """`text`, led by the terminal bell when it is a live message mentioning `me`."""
    return BELL + text if bell and is_mention(frame, me) else text


class Handled:
    """Which replies the printer has shown, so the command thread can wait for one."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._replies: deque[tuple[object, int]] = deque(maxlen=HANDLED_REMEMBERED)
        self._closed = False

    def mark(self, client: object, reply_to: object) -> None:
        if type(reply_to) is not int:
            return
        with self._cond:
            self._replies.append((client, reply_to))
            self._cond.notify_all()

    def close(self) -> None:
        """The printer has stopped: no one waits any longer."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def wait(self, client: object, reply_to: object, timeout: float) -> bool:
        """Wait until the reply `reply_to` of `client` was shown; False if it was not."""
        def done() -> bool:
            return self._closed or any(c is client and r == reply_to for c, r in self._replies)

        with self._cond:
            return self._cond.wait_for(done, timeout)


class Printer:
    """The printer thread's work; see the module's theory of operation."""

    def __init__(
        self,
        link: Link,
        state: ChatState,
        roster: Roster,
        show: Callable[[str], None],
        *,
        color: bool,
        bell: bool = True,
        recent: int = DEFAULT_RECENT,
        timeout: float = DEFAULT_TIMEOUT,
        batch: PresenceBatch | None = None,
    ) -> None:
        self.link = link
        self.state = state
        self.roster = roster
        self.handled = Handled()
        self.stopping = threading.Event()  # set by the UI on leaving: the roster thread stops
        self._show = show
        self._color = color
        self._bell = bell
        self._recent = recent
        self._timeout = timeout
        self._batch = batch or PresenceBatch()

    # -- the thread -------------------------------------------------------------------------

    def run(self, backlog: list[Frame | str]) -> None:
        """Show the banner, then every frame until the session is over (reconnecting)."""
        try:
            self._banner(backlog)
            while True:
                self._live(self.link.client)
                if not self.link.resume(self._catch_up_frame, self.notify):
                    break
                self._learn_rooms(self.link.client)  # roles may have changed meanwhile
                self._fill_roster(self.link.client, skip=None)
        finally:
            self.handled.close()

    def notify(self, text: str) -> None:
        self._flush()
        self._show(f"-- {sanitize(text, multiline=False)}")

    # -- the banner -------------------------------------------------------------------------

    def _banner(self, backlog: list[Frame | str]) -> None:
        client = self.link.client
        room = self.state.room
        who = self._ask(client, {"type": "who", "room": room}) if room is not None else None
        held = client.pending_events()  # what came meanwhile (all of it if `recent` is 0)
        later: list[Frame] = []
        for item in backlog:
            if isinstance(item, str):
                self.notify(item)
            elif item.get("type") == "presence":
                later.append(item)
            else:
                self._handle(client, item, live=False)
        for frame in held:
            if frame.get("type") in ("message", "presence"):
                later.append(frame)
            else:
                self._handle(client, frame, live=False)  # the welcome, when no backlog took it
        if not backlog:  # the direct messages stored while away, `--recent 0` or not
            away = [f for f in later if f.get("type") == "message" and "to" in f]
            later = [f for f in later if not any(f is a for a in away)]
            away = [f for f in away if self.link.seen.fresh(f)]
            if away:
                self.notify("while you were away")
                for frame in away:
                    self._handle(client, frame, live=False)
        if who is not None and who.get("type") == "who":
            self.roster.note(who)
            self._show(who_summary(who, me=client.username, color=self._color))
        self._learn_rooms(client)
        self.notify(HINT)
        for frame in later:
            self._handle(client, frame)
        self._fill_roster(client, skip=room)

    # -- live frames ------------------------------------------------------------------------

    def _live(self, client: Any) -> None:
        while True:
            try:
                frame = client.next_event(self._batch.time_left())
            except TimedOut:
                self._flush()
                continue
            except ConnectionClosed:
                self._flush()
                return
            self._handle(client, frame)

    def _catch_up_frame(self, frame: Frame) -> None:
        # From Link.resume, which has checked `fresh` already; missed, but news.
        self._handle(self.link.client, frame, live=False, ring=True)

    def _handle(
        self, client: Any, frame: Frame, *, live: bool = True, ring: bool | None = None
    ) -> None:
        """Show one frame and follow it. Not `live`: a banner's or a catch-up's, already
        checked by `fresh`, never held, rung for (a mention) only if `ring`."""
        me = client.username
        if live and not self.link.seen.fresh(frame):
            self.handled.mark(client, frame.get("re"))
            return
        self.roster.note(frame)
        kind = frame.get("type")
        own = kind == "presence" and _same(frame.get("username"), me)
        if kind == "presence" and not own:
            self._batch.add(frame)
            if self._batch.time_left() == 0:
                self._flush()
            return
        self._flush()
        current = self.state.room  # before observing: a `rooms` list marks it
        known = self.state.rooms
        changed = self.state.changes(frame, me)  # before observing, which keeps the new
        quiet = own or self.state.echoed(frame, me)
        notes = self.state.observe(frame, me)
        text = None if quiet else format_event(frame, me=me, color=self._color,
                                               current=current, changed=changed)
        after = kind in NOTES_AFTER  # else a note explains the line after it
        if not after:
            for note in notes:
                self.notify(note)
        if text is not None:
            self._show(with_bell(text, frame, me, self._bell and (live if ring is None else ring)))
        if after:
            for note in notes:
                self.notify(note)
        room = frame.get("room")
        if kind == "ok" and frame.get("op") == "join" and isinstance(room, str) and live:
            self._room_view(client, room)
        elif kind == "ok" and frame.get("op") == "create" and isinstance(room, str) and live:
            self._learn_role(client, room)  # and its settings, to say what a change changed
        elif kind != "ok" and live and self.state.rooms - known:  # joined in another session
            for added in sorted(self.state.rooms - known):
                self._learn_role(client, added)
        self.handled.mark(client, frame.get("re"))

    def _flush(self) -> None:
        for group in self._batch.take():
            self._show(presence_text(
                group.event, group.cause, group.room, list(group.names),
                me=self.link.client.username, color=self._color, ts=group.ts,
            ))

    # -- asking the server ------------------------------------------------------------------

    def _ask(self, client: Any, frame: Frame) -> Frame | None:
        """A quiet request's reply (not an event), or None if the connection failed it."""
        try:
            return client.request(frame, self._timeout, quiet=True)
        except ClientError:
            return None  # a lost connection shows by itself, as the end of the events

    def _learn_rooms(self, client: Any) -> None:
        """The user's role in each room (for the prompt), the rooms there are (for Tab)."""
        listed = self._ask(client, {"type": "list_rooms"})
        if listed is not None and listed.get("type") == "rooms":  # a v1 server: unknown_type
            self.roster.note(listed)
            self.state.observe(listed, client.username)

    def _room_view(self, client: Any, room: str) -> None:
        """After joining: the room's last messages (as many as on login), who is there."""
        if self._recent > 0:
            reply = self._ask(client, {"type": "history", "room": room,
                                       "limit": min(self._recent, CATCH_UP_LIMIT)})
            listed = reply.get("messages") if reply and reply.get("type") == "history" else None
            messages = [{"type": "message", **m} for m in
                        (listed if isinstance(listed, list) else []) if isinstance(m, dict)]
            fresh = [m for m in messages if self.link.seen.fresh(m)]
            if fresh:
                self.notify(f"last messages in #{room.lower()}")
                for message in fresh:
                    self._show(_message_text(message, client.username, self._color))
        who = self._ask(client, {"type": "who", "room": room})
        if who is not None and who.get("type") == "who":
            self.roster.note(who)
            self._show(who_summary(who, me=client.username, color=self._color))
        self._learn_role(client, room)

    def _learn_role(self, client: Any, room: str) -> None:
        """The user's role in `room`, for the prompt (room_info; a v1 server has none)."""
        info = self._ask(client, {"type": "room_info", "room": room})
        if info is not None and info.get("type") == "room":
            self.state.observe(info, client.username)

    def _fill_roster(self, client: Any, skip: str | None) -> None:
        rooms = sorted(self.state.rooms - {skip})
        if rooms:
            threading.Thread(
                target=self._ask_who, args=(client, rooms), name="chat-client-roster",
                daemon=True,
            ).start()

    def _ask_who(self, client: Any, rooms: list[str]) -> None:
        # Half the announced rate once past the first few, so the user's lines go first.
        pause = 2.0 / client.limits.frames_per_second
        for n, room in enumerate(rooms):
            if n >= ROSTER_BURST and self.stopping.wait(pause):
                return
            if self.stopping.is_set() or client.closed:
                return
            reply = self._ask(client, {"type": "who", "room": room})
            if reply is None:
                return
            self.roster.note(reply)


def _message_text(frame: Frame, me: str | None, color: bool) -> str:
    return format_event(frame, me=me, color=color) or ""  # a message always has a text


def _same(name: object, me: str | None) -> bool:
    return isinstance(name, str) and me is not None and name.casefold() == me.casefold()

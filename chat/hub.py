"""Who is online and in which room; fan-out of encoded frames to sessions' outbound queues.

Theory of operation
-------------------
The hub is the one fan-out interface: connection code never iterates over other
connections. A broker that spans several servers can replace `LocalHub` by implementing
the same methods (publishing to the broker and delivering what it receives locally).

The hub belongs to the store's writer thread: every method is called there, in the order
the writer decided things, so the hub needs no lock and no I/O thread ever waits for it,
however long a fan-out to a big room takes. That one thread is also what keeps the
order: all sessions see messages in `msg_id` order, and a new session gets `welcome`,
then its stored direct messages, then live traffic, with nothing in between.

Delivering is one `Outbound.deliver(bytes)` per recipient session, which writes at once or
appends to that session's queue and never blocks, so one slow client cannot delay the
others. Per-message work is proportional to the recipients, never to all users.

Presence is coalesced. A change (a join, a leave, a first session online, a last one
gone) only marks the (room, user) pair; `flush_presence` later sends each pair's net
change, if any, and each recipient session gets everything of one flush in one
`deliver`. So a user who joins and leaves a room ten times a second costs its members
at most one presence frame each per flush, none when the changes cancel out, and a
server restart that brings thousands online costs each session one write per flush,
not one per user. The writer flushes at once when nothing was flushed for
`presence_interval`, and otherwise when the interval has passed. In a room with more than
`presence_room_limit` sessions, coming online and going offline are not told at all:
with 10,000 in `general`, a restart would still be 10,000 frames for each of them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from chat.protocol import encode


class Outbound(Protocol):
    def deliver(self, data: bytes) -> bool: ...
    def accepting(self) -> bool: ...
    def end(self, reason: str) -> None: ...


@dataclass(eq=False)
class UserState:
    """What the hub knows about one online user; shared by all the user's sessions."""

    key: str
    name: str
    user_id: int
    # The user's rooms, as the writer decided them: requests are checked against this,
    # on the writer thread, in order (never by a connection's own guess).
    rooms: set[str] = field(default_factory=set)
    sessions: list[Session] = field(default_factory=list)
    # Set by the writer when the operator ends the user's sessions (disable, logout):
    # what they pipelined after it is refused while their `bye` is on its way.
    ended: bool = False


@dataclass(eq=False)
class Session:
    """One logged-in connection (or one whose login is in progress)."""

    user_id: int
    key: str
    name: str
    session_id: str = field(repr=False)
    out: Outbound = field(repr=False)
    user: UserState | None = None
    # Set by the connection's thread when it closes; an attach not yet done then fails.
    closed: bool = False
    # The rooms whose member sets hold this session: detach removes it from exactly these.
    rooms_in: set[str] = field(default_factory=set)
    # The device this session uploaded keys as (end-to-end encryption), if any, and its
    # Curve25519 key: what an encrypted message or a to-device message must name.
    device: str | None = None
    device_curve: str | None = None
    # The device's to-device queue: the highest `seq` given out, and whether all of it
    # was (then new messages go out live; else they wait for the next page).
    to_device_sent: int = 0
    to_device_live: bool = False
    # Users whose keys this session asked for (query_keys), oldest first: it is told of
    # their device changes. chat.keys bounds it (max_key_watch).
    watching: dict[str, None] = field(default_factory=dict, repr=False)
    # Over a cluster, the newest direct message stored when its login began (its backlog
    # held, or the user's other sessions had): one of those arriving live from another
    # node is not given to it.
    dm_floor: int = 0


def with_re(data: bytes, re: object) -> bytes:
    """The same encoded frame with `re` added: the sender's copy costs no re-serialising."""
    value = str(re).encode() if type(re) is int else encode(re)[:-1]  # type: ignore[arg-type]
    return data[:-2] + b',"re":' + value + b"}\n"


# Why a user's presence in a room changed: the protocol's `cause`.
ROOM, CONNECTION = "room", "connection"


@dataclass(slots=True)
class _Change:
    name: str
    was_there: bool  # visible in the room when the first unflushed change came
    cause: str  # of the latest change


class LocalHub:
    def __init__(self, presence_interval: float = 1.0, presence_room_limit: int = 1000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._users: dict[str, UserState] = {}
        self._rooms: dict[str, set[Session]] = {}
        self.presence_interval = presence_interval
        self.presence_room_limit = presence_room_limit
        self._who: dict[str, list[str]] = {}  # room -> who's sorted names, while unchanged
        self._clock = clock
        self._pending: dict[str, dict[str, _Change]] = {}  # room -> user key -> change
        self._last_flush = -presence_interval
        # user key -> sessions that asked for that user's keys (device-list notices)
        self._watchers: dict[str, set[Session]] = {}

    # --- sessions -------------------------------------------------------------------
    def attach(self, session: Session, rooms: list[str], first: list[bytes],
               cursors: dict[str, int] | None = None) -> bool:
        """Register a session in `rooms` (the user's, when the writer ran the login), give
        it `first` frames, and tell its rooms if it is the user's first session.

        Returns False (and does nothing) if the session was detached in the meantime,
        that is, its connection closed while the login was in progress.
        """
        if session.closed:
            return False
        user = self._users.get(session.key)
        first_session = user is None
        if user is None:
            user = UserState(session.key, session.name, session.user_id, set(rooms))
            self._users[session.key] = user
        session.user = user
        user.sessions.append(session)
        for data in first:
            session.out.deliver(data)
        for room in rooms:
            if first_session:
                self._mark(room, user, CONNECTION)
            self._rooms.setdefault(room, set()).add(session)
            self._who.pop(room, None)
            session.rooms_in.add(room)
        return True

    def detach(self, session: Session, *, quiet: bool = False) -> None:
        """Forget a session; with `quiet` (shutdown), tell no one it left."""
        session.closed = True
        user = session.user
        if user is None or session not in user.sessions:
            return
        last = len(user.sessions) == 1
        if last and not quiet:
            for room in session.rooms_in:
                self._mark(room, user, CONNECTION)
        user.sessions.remove(session)
        if last:
            del self._users[user.key]
        for room in session.rooms_in:
            members = self._rooms.get(room)
            if members is None:
                continue
            members.discard(session)
            self._who.pop(room, None)
            if not members:
                del self._rooms[room]
        session.rooms_in.clear()
        self._unwatch_all(session)

    # --- device-list notices (end-to-end encryption) ----------------------------------
    def watch(self, session: Session, key: str, limit: int) -> None:
        """`session` asked for the keys of user `key`: tell it when they change. It keeps
        the `limit` users it asked about last; rooms carry notices for the rest."""
        if session.closed:
            return  # detached already: nothing would ever remove it again
        session.watching.pop(key, None)
        session.watching[key] = None
        self._watchers.setdefault(key, set()).add(session)
        while len(session.watching) > limit:
            oldest = next(iter(session.watching))
            del session.watching[oldest]
            self._unwatch(session, oldest)

    def _unwatch(self, session: Session, key: str) -> None:
        watchers = self._watchers.get(key)
        if watchers is not None:
            watchers.discard(session)
            if not watchers:
                del self._watchers[key]

    def _unwatch_all(self, session: Session) -> None:
        for key in session.watching:
            self._unwatch(session, key)
        session.watching.clear()

    def devices_changed(self, key: str, rooms: list[str], data: bytes) -> None:
        """Tell that user `key`'s devices changed: to its sessions, to every session in a
        room it is in, and to every session that asked for its keys; each once. Only to
        sessions that use encryption (bound a device, or asked for keys): a v1 client
        would show a frame it does not know."""
        told: set[Session] = set(self._watchers.get(key, ()))
        told.update(s for s in self.sessions_of(key) if s.device is not None)
        for room in rooms:
            told.update(s for s in self._rooms.get(room, ()) if s.device is not None)
        for session in told:
            session.out.deliver(data)

    def tell(self, key: str, data: bytes, device: str | None = None) -> None:
        """One frame to every session of user `key` (with `device`, only to sessions bound
        to that device): an invitation, a key count. Over a cluster, on every node."""
        for session in self.sessions_of(key):
            if device is None or session.device == device:
                session.out.deliver(data)

    def end_sessions(self, key: str, reason: str, keep: Session | None = None) -> None:
        """Close every session of user `key` but `keep` with `bye reason`, detached first
        so that nothing later is fanned out to them. Over a cluster, on every node."""
        for session in self.sessions_of(key):
            if session is not keep:
                self.detach(session)
                session.out.end(reason)

    def ending(self, key: str) -> None:
        """The operator ends the user's sessions: what they pipelined after it is refused
        (the writer checks `ended`) while their `bye` is on its way."""
        user = self._users.get(key)
        if user is not None:
            user.rooms.clear()
            user.ended = True

    def sessions_of(self, key: str) -> list[Session]:
        user = self._users.get(key)
        return list(user.sessions) if user else []

    def user_state(self, key: str) -> UserState | None:
        return self._users.get(key)

    def is_online(self, key: str) -> bool:
        """Whether one of the user's sessions still takes frames (a closing one does not)."""
        user = self._users.get(key)
        return user is not None and any(s.out.accepting() for s in user.sessions)

    # --- rooms ----------------------------------------------------------------------
    def joined(self, user: UserState, room: str, newest: int | None = None) -> None:
        """After the join is stored: the user's sessions receive the room; members hear it.

        Applied as decided, whatever `user.rooms` says by now: in a batch with a join, a
        send and a leave, the send's fan-out (between the two) must find the joiner in.
        """
        if user.key not in self._users:
            return
        self._mark(room, user, ROOM)
        members = self._rooms.setdefault(room, set())
        self._who.pop(room, None)
        for session in user.sessions:
            members.add(session)
            session.rooms_in.add(room)

    def left(self, user: UserState, room: str) -> None:
        """The user's sessions leave the room's fan-out; its members hear it."""
        members = self._rooms.get(room)
        if members is None:
            return
        self._mark(room, user, ROOM)
        for session in user.sessions:
            members.discard(session)
            session.rooms_in.discard(room)
        self._who.pop(room, None)
        if not members:
            del self._rooms[room]

    def removed(self, user: UserState, room: str, data: bytes) -> None:
        """A kick or ban: each of the user's sessions gets `data` (the `removed` frame),
        then leaves the room's fan-out, before any later room traffic is delivered.
        (`user.rooms` is the writer's decision, changed when the kick was decided: a join
        decided after it may have put the room back by now.)"""
        for session in user.sessions:
            if room in session.rooms_in:
                session.out.deliver(data)
        self.left(user, room)

    def announce(self, room: str, roles: dict[int, str], encoded: dict[str, bytes]) -> None:
        """The `room` frame to each member's sessions in the room, as their role sees it
        (`roles` by user id, as decided; `encoded` by role)."""
        for session in self._rooms.get(room, ()):
            role = roles.get(session.user_id)
            if role is not None:
                session.out.deliver(encoded[role])

    def to_device_queued(self, key: str, device: str) -> None:
        """A to-device message was queued for user `key`'s `device`; this node gave it to
        its live sessions already (over a cluster, every node, this one too, has the
        device's live sessions pull the queue in seq order)."""

    def device_removed(self, key: str, device: str) -> None:
        """The operator removed user `key`'s `device`; its sessions here were unbound in
        the job that did it (over a cluster, every other node unbinds its own)."""

    def joined_offline(self, key: str, room: str, newest: int) -> None:
        """The operator put user `key`, with no session here, in `room` (`newest`: its
        newest id then). Over a cluster, other nodes may have some."""

    def removed_offline(self, key: str, room: str, data: bytes) -> None:
        """A kick or ban of a user with no session here (over a cluster, other nodes may
        have some)."""

    def sync(self, then: Callable[[], None]) -> None:
        """Call `then` once every node applied what was fanned out before (here: now)."""
        then()

    def sessions_in(self, room: str) -> set[Session]:
        return self._rooms.get(room, set())

    def publish_room(self, room: str, data: bytes) -> None:
        """One frame to every session in the room (an event: a role, a topic)."""
        for session in self._rooms.get(room, ()):
            session.out.deliver(data)

    def who(self, room: str) -> list[str]:
        """Who is online in the room, sorted; kept until its members change, so that
        asking again and again of a room of thousands costs the writer nothing."""
        users = self._who.get(room)
        if users is None:
            names = {s.key: s.name for s in self._rooms.get(room, ())}
            users = self._who[room] = [names[k] for k in sorted(names)]
        return users

    # --- presence -------------------------------------------------------------------
    def _visible(self, room: str, user: UserState) -> bool:
        return any(room in s.rooms_in for s in user.sessions)

    def _shown(self, room: str, key: str) -> bool:
        """Whether the user is shown online in the room (over a cluster, on any node)."""
        user = self._users.get(key)
        return user is not None and self._visible(room, user)

    def _mark(self, room: str, user: UserState, cause: str) -> None:
        self._mark_key(room, user.key, user.name, cause)

    def _mark_key(self, room: str, key: str, name: str, cause: str) -> None:
        """Before a change of the user's presence in the room: remember where it began."""
        changes = self._pending.setdefault(room, {})
        change = changes.get(key)
        if change is None:
            changes[key] = _Change(name, self._shown(room, key), cause)
        else:
            change.cause = cause

    # --- the writer's timers ---------------------------------------------------------
    def due(self) -> float | None:
        """Seconds until `tick` should run (0: now); None if nothing waits."""
        return self.presence_due()

    def tick(self) -> None:
        self.flush_presence()

    def presence_due(self) -> float | None:
        """Seconds until the pending presence should go out (0: now); None if none waits."""
        if not self._pending:
            return None
        return max(0.0, self._last_flush + self.presence_interval - self._clock())

    def flush_presence(self) -> None:
        """Send every pending net change of presence; one `deliver` per recipient session."""
        self._deliver_presence(self._presence_changes())

    def _presence_changes(self) -> list[tuple[str, str, str, bool, bytes]]:
        """The pending net changes, now taken: (room, user key, cause, there, frame)."""
        pending, self._pending = self._pending, {}
        self._last_flush = self._clock()
        changes = []
        for room, room_changes in pending.items():
            # Coming online and going offline are not told in a room this full: every
            # login would be news for every session there, O(n^2) for a restart.
            quiet = len(self._rooms.get(room, ())) > self.presence_room_limit
            for key, change in room_changes.items():
                if quiet and change.cause == CONNECTION:
                    continue
                there = self._shown(room, key)
                if there == change.was_there:
                    continue  # the changes cancelled out
                data = encode({"type": "presence", "room": room, "username": change.name,
                               "event": "join" if there else "leave", "cause": change.cause})
                changes.append((room, key, change.cause, there, data))
        return changes

    def _deliver_presence(self, changes: list[tuple[str, str, str, bool, bytes]]) -> None:
        out: dict[Session, list[bytes]] = {}
        for room, key, cause, there, data in changes:
            for session in self._rooms.get(room, ()):
                # Coming online or going offline is news for others only; a join or
                # leave of the room also tells the user's other sessions.
                if session.key != key or cause == ROOM:
                    out.setdefault(session, []).append(data)
            user = self._users.get(key)
            if not there and cause == ROOM and user is not None:
                for session in user.sessions:  # left: no longer among the members
                    if room not in session.rooms_in:
                        out.setdefault(session, []).append(data)
        for session, frames in out.items():
            session.out.deliver(frames[0] if len(frames) == 1 else b"".join(frames))

    # --- fan-out --------------------------------------------------------------------
    def publish_room_many(self, room: str, items: list[tuple[bytes, Session, bytes]],
                          chain: list[tuple[int, int]] | None = None) -> None:
        """Deliver messages, in order, to every session in the room, as one blob each.

        `items` are (frame, origin session, origin's copy with `re`); an origin gets its
        own copies in place of the plain ones.
        """
        blob = b"".join(data for data, _origin, _echo in items)
        origins = {origin for _data, origin, _echo in items}
        for session in self._rooms.get(room, ()):
            if session in origins:
                session.out.deliver(b"".join(
                    echo if origin is session else data for data, origin, echo in items
                ))
            else:
                session.out.deliver(blob)

    def publish_direct(
        self, to: str, sender: str, data: bytes, origin: Session | None, echo: bytes,
        chain: Any = None,
    ) -> bool:
        """Deliver a direct message to every session of both users (each session once).

        Returns whether at least one session of the recipient took it, so the caller
        can keep the message for the recipient's next login otherwise.
        """
        delivered = False
        recipient = self._users.get(to)
        if recipient is not None:
            for session in recipient.sessions:
                took = session.out.deliver(echo if session is origin else data)
                delivered = delivered or took
        author = self._users.get(sender)
        if author is not None and author is not recipient:
            for session in author.sessions:
                session.out.deliver(echo if session is origin else data)
        return delivered

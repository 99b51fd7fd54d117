"""Who is online and in which room; fan-out of encoded frames to sessions' outbound queues.

Theory of operation
-------------------
The hub is the one fan-out interface: connection code never iterates over other
connections. A broker that spans several servers can replace `LocalHub` by implementing
the same methods (publishing to the broker and delivering what it receives locally).

All state sits behind one lock. Callers hand the hub bytes that were serialised once;
delivering them is one `Outbound.deliver(bytes)` per recipient session, which only
appends to that session's queue and never blocks, so one slow client cannot delay the
others. Per-message work is proportional to the recipients, never to all users.

Every `message` fan-out runs on the store's writer thread (after the message is
committed), so all sessions see messages in one order. `attach` also runs there, which is
what lets a new session get `welcome`, then its stored direct messages, then live traffic,
with nothing in between.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Protocol

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
    # The user's rooms. Connections read it to validate requests; it changes under the
    # hub lock only.
    rooms: set[str] = field(default_factory=set)
    sessions: list[Session] = field(default_factory=list)


@dataclass(eq=False)
class Session:
    """One logged-in connection (or one whose login is in progress)."""

    user_id: int
    key: str
    name: str
    session_id: str = field(repr=False)
    out: Outbound = field(repr=False)
    user: UserState | None = None
    closed: bool = False
    # The rooms whose member sets hold this session: detach removes it from exactly these,
    # whatever the user's room set says by then (a leave may be half done).
    rooms_in: set[str] = field(default_factory=set)


def with_re(data: bytes, re: object) -> bytes:
    """The same encoded frame with `re` added: the sender's copy costs no re-serialising."""
    value = str(re).encode() if type(re) is int else encode(re)[:-1]  # type: ignore[arg-type]
    return data[:-2] + b',"re":' + value + b"}\n"


class LocalHub:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users: dict[str, UserState] = {}
        self._rooms: dict[str, set[Session]] = {}

    # --- sessions -------------------------------------------------------------------
    def attach(self, session: Session, rooms: list[str], first: list[bytes]) -> bool:
        """Register a session, give it `first` frames, tell its rooms if it is the first.

        Returns False (and does nothing) if the session was detached in the meantime,
        that is, its connection closed while the login was in progress.
        """
        with self._lock:
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
            for room in user.rooms:
                members = self._rooms.setdefault(room, set())
                if first_session:
                    self._presence(members, room, user.name, "join", "connection")
                members.add(session)
                session.rooms_in.add(room)
            return True

    def detach(self, session: Session, *, quiet: bool = False) -> None:
        """Forget a session; with `quiet` (shutdown), tell no one it left."""
        with self._lock:
            session.closed = True
            user = session.user
            if user is None or session not in user.sessions:
                return
            user.sessions.remove(session)
            last = not user.sessions
            if last:
                del self._users[user.key]
            for room in session.rooms_in:
                members = self._rooms.get(room)
                if members is None:
                    continue
                members.discard(session)
                if last and not quiet:
                    self._presence(members, room, user.name, "leave", "connection")
                if not members:
                    del self._rooms[room]
            session.rooms_in.clear()

    def sessions_of(self, key: str) -> list[Session]:
        with self._lock:
            user = self._users.get(key)
            return list(user.sessions) if user else []

    def is_online(self, key: str) -> bool:
        """Whether one of the user's sessions still takes frames (a closing one does not)."""
        with self._lock:
            user = self._users.get(key)
            return user is not None and any(s.out.accepting() for s in user.sessions)

    # --- rooms ----------------------------------------------------------------------
    def mark_joined(self, user: UserState, room: str) -> bool:
        """Record the join in the user's room set at once; False if already a member."""
        with self._lock:
            if room in user.rooms:
                return False
            user.rooms.add(room)
            return True

    def mark_left(self, user: UserState, room: str) -> bool:
        with self._lock:
            if room not in user.rooms:
                return False
            user.rooms.discard(room)
            return True

    def joined(self, user: UserState, room: str) -> None:
        """After the join is stored: the user's sessions receive the room; members hear it."""
        with self._lock:
            if room not in user.rooms or user.key not in self._users:
                return
            members = self._rooms.setdefault(room, set())
            for session in user.sessions:
                members.add(session)
                session.rooms_in.add(room)
            self._presence(members, room, user.name, "join", "room")

    def left(self, user: UserState, room: str) -> None:
        with self._lock:
            members = self._rooms.get(room)
            if members is None:
                return
            # The leaver hears its own leave too, so all its sessions learn of it.
            self._presence(members, room, user.name, "leave", "room")
            for session in list(members):
                if session.key == user.key:
                    members.discard(session)
                    session.rooms_in.discard(room)
            if not members:
                del self._rooms[room]

    def who(self, room: str) -> list[str]:
        with self._lock:
            members = self._rooms.get(room, ())
            names = {s.key: s.name for s in members}
        return [names[k] for k in sorted(names)]

    # --- fan-out --------------------------------------------------------------------
    def publish_room_many(self, room: str, items: list[tuple[bytes, Session, bytes]]) -> None:
        """Deliver messages, in order, to every session in the room, as one blob each.

        `items` are (frame, origin session, origin's copy with `re`); an origin gets its
        own copies in place of the plain ones.
        """
        blob = b"".join(data for data, _origin, _echo in items)
        origins = {origin for _data, origin, _echo in items}
        with self._lock:
            for session in self._rooms.get(room, ()):
                if session in origins:
                    session.out.deliver(b"".join(
                        echo if origin is session else data for data, origin, echo in items
                    ))
                else:
                    session.out.deliver(blob)

    def publish_direct(
        self, to: str, sender: str, data: bytes, origin: Session | None, echo: bytes
    ) -> bool:
        """Deliver a direct message to every session of both users (each session once).

        Returns whether at least one session of the recipient took it, so the caller
        can keep the message for the recipient's next login otherwise.
        """
        with self._lock:
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

    def broadcast(self, data: bytes) -> None:
        with self._lock:
            for user in self._users.values():
                for session in user.sessions:
                    session.out.deliver(data)

    def _presence(
        self, members: set[Session], room: str, name: str, event: str, cause: str
    ) -> None:
        if not members:
            return
        data = encode({"type": "presence", "room": room, "username": name, "event": event,
                       "cause": cause})
        for session in members:
            session.out.deliver(data)

"""The database side of several nodes: conversations' locks, their newest ids, repairs.

A conversation is a room (`r:<room>`) or one user's direct messages (`u:<user id>`, each
side of a direct message being in two). Its lock is a PostgreSQL advisory transaction
lock, held by a node's writer from the start of a batch that stores messages to it until
COMMIT, so that its ids are taken and committed in one order (chat.cluster explains why).
`Filler` reads what Redis did not bring, and what a joiner's sessions must catch up on, on
its own thread, for the writer to deliver.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, Engine, and_, bindparam, select, text

from chat.hub import LocalHub
from chat.models import Membership, Message, User

if TYPE_CHECKING:
    from chat.cluster import CatchUp, ClusterHub
    from chat.store import Store

log = logging.getLogger(__name__)

messages_t = Message.__table__
members_t = Membership.__table__
users_t = User.__table__

# Rows one gap repair reads at most; a longer gap takes several.
FILL_PAGE = 500


def room_conv(room: str) -> str:
    return "r:" + room


def user_conv(user_id: int) -> str:
    return f"u:{user_id}"


def lock_key(conv: str) -> int:
    """A conversation's advisory lock key (signed 64 bits); a collision only serialises
    two conversations that need not be."""
    return int.from_bytes(hashlib.blake2b(conv.encode(), digest_size=8).digest(), "big",
                          signed=True)


# The conversations' locks, and what a writer reads under them, in psycopg's parameter
# style: run on the driver's connection, in a pipeline (`locked_reads`).
_LOCK = "SELECT pg_advisory_xact_lock(k) FROM unnest(%(keys)s::bigint[]) AS k"
_ROOM_FACTS = (
    "SELECT r, (SELECT max(m.id) FROM messages m WHERE m.room = r), "
    "(SELECT x.encrypted FROM rooms x WHERE x.name = r), "
    "ARRAY(SELECT s.user_id FROM memberships s "
    "WHERE s.room = r AND s.user_id = ANY(%(senders)s::integer[])) "
    "FROM unnest(%(rooms)s::varchar[]) AS r")
_NEWEST_DIRECT = (
    "SELECT u, GREATEST("
    "(SELECT max(m.id) FROM messages m WHERE m.room IS NULL AND m.recipient_id = u), "
    "(SELECT max(m.id) FROM messages m WHERE m.room IS NULL AND m.sender_id = u)) "
    "FROM unnest(%(ids)s::integer[]) AS u")


@dataclass(frozen=True, slots=True)
class RoomFacts:
    """What a batch of room messages needs to know of a room, under its lock."""

    newest: int  # the room's newest message id (0 if none): the first message's `prev`
    encrypted: bool
    members: frozenset[int]  # which of the batch's senders are members


def locked_reads(db: Connection, convs: Iterable[str] = (), rooms: Iterable[str] = (),
                 senders: Iterable[int] = (), users: Iterable[int] = ()
                 ) -> tuple[dict[str, RoomFacts], dict[int, int]]:
    """Take the conversations' locks until the transaction ends, then read each room's
    facts (which of `senders` are in it) and each user's newest direct message id.

    The locks are taken in one order (sorted keys) on every node, so that two writers
    never wait for each other in a cycle. Everything goes in one round trip, a pipeline:
    PostgreSQL runs each statement after the one before it has finished, and in READ
    COMMITTED each takes its own snapshot, so the reads see every commit made before the
    locks were granted. One round trip, since the locks are held until COMMIT and every
    trip back to a node's writer under them (a thread that must get the GIL again, on a
    busy host) is a wait for every other node's writer with a message to the room."""
    keys = sorted({lock_key(c) for c in convs})
    names = sorted(set(rooms))
    ids = sorted(set(users))
    if not (keys or names or ids):
        return {}, {}  # no pipeline: its sync alone would be a round trip
    pg: Any = db.connection.driver_connection
    with pg.pipeline():
        if keys:
            pg.execute(_LOCK, {"keys": keys})
        facts = pg.execute(_ROOM_FACTS, {"rooms": names, "senders": sorted(set(senders))}
                           ) if names else None
        direct = pg.execute(_NEWEST_DIRECT, {"ids": ids}) if ids else None
    return ({r: RoomFacts(n or 0, bool(e), frozenset(m))
             for r, n, e, m in (facts if facts is not None else ())},
            {u: (n or 0) for u, n in (direct if direct is not None else ())})


def lock_conversations(db: Connection, convs: Iterable[str]) -> None:
    """Take these conversations' locks until the transaction ends (`locked_reads`)."""
    locked_reads(db, convs)


def newest_in_rooms(db: Connection, rooms: Iterable[str]) -> dict[str, int]:
    """Each room's newest message id (0 if none): one index probe each."""
    names = sorted(set(rooms))
    if not names:
        return {}
    rows = db.execute(text(
        "SELECT r, (SELECT max(m.id) FROM messages m WHERE m.room = r) "
        "FROM unnest(CAST(:rooms AS varchar[])) AS r"), {"rooms": names})
    return {r: (n or 0) for r, n in rows}


def newest_direct(db: Connection, user_ids: Iterable[int]) -> dict[int, int]:
    """Each user's newest direct message id, sent or received (0 if none)."""
    return locked_reads(db, users=user_ids)[1]


def memberships(db: Connection, pairs: set[tuple[str, str]]) -> set[tuple[str, str]]:
    """Which of these (user key, room) pairs are memberships now."""
    keys = sorted({k for k, _ in pairs})
    rooms = sorted({r for _, r in pairs})
    rows = db.execute(
        select(users_t.c.username_key, members_t.c.room)
        .join(members_t, members_t.c.user_id == users_t.c.id)
        .where(users_t.c.username_key.in_(keys), members_t.c.room.in_(rooms)))
    return {(k, r) for k, r in rows if (k, r) in pairs}


def newest_any(db: Connection) -> int:
    return db.execute(text("SELECT coalesce(max(id), 0) FROM messages")).scalar() or 0



class Filler:
    """Reads gaps and compares newest ids, off the writer; hands rows back as jobs."""

    def __init__(self, engine: Engine, store: Store, hub: ClusterHub, metrics: Any) -> None:
        self.engine = engine
        self.store = store
        self.hub = hub
        self.metrics = metrics
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="cluster-filler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join()

    def fill(self, conv: str, after: int, upto: int) -> None:
        self._queue.put(("fill", conv, after, upto))

    def reconcile(self, cursors: dict[str, int]) -> None:
        self._queue.put(("reconcile", cursors))

    def rooms(self, keys: list[str]) -> None:
        self._queue.put(("rooms", keys))

    def catch_up(self, catch: CatchUp, after: int, upto: int) -> None:
        self._queue.put(("catch_up", catch, after, upto))

    def _run(self) -> None:
        while True:
            task = self._queue.get()
            if task is None:
                return
            try:
                if task[0] == "fill":
                    self._fill(*task[1:])
                elif task[0] == "reconcile":
                    self._reconcile(task[1])
                elif task[0] == "catch_up":
                    self._catch_up(*task[1:])
                else:
                    self._rooms(task[1])
            except Exception:
                log.exception("cluster: a repair read failed; it is tried again")
                self.metrics.db_errors.inc()
                if task[0] == "fill":
                    self._submit(lambda conv=task[1]: self.hub.seq.retry(conv))
                elif task[0] == "catch_up":
                    self._submit(lambda catch=task[1]: self.hub.catch_up_failed(catch))

    def _submit(self, after: Callable[[], None]) -> None:
        """`after` on the writer thread; run even if its batch fails to commit (it reads
        and writes nothing there), but not at a shutdown's refusal (on this thread)."""
        from chat.store import Job

        def failed(exc: Exception) -> None:
            if self.store.on_writer_thread():
                after()

        self.store.submit(Job(lambda db: after, failed))

    def _read(self, conv: str, after: int, upto: int) -> list[Any]:
        m = messages_t.c
        if conv.startswith("r:"):
            where = m.room == conv[2:]
        else:
            uid = int(conv[2:])
            where = and_(m.room.is_(None), (m.recipient_id == uid) | (m.sender_id == uid))
        query = select(messages_t).where(where, m.id > after, m.id <= upto)
        with self.engine.connect() as db:
            return list(db.execute(query.order_by(m.id).limit(FILL_PAGE)))

    def _fill(self, conv: str, after: int, upto: int) -> None:
        rows = self._read(conv, after, upto)
        # A full page ends where it ends; the rest is read next.
        end = rows[-1].id if len(rows) == FILL_PAGE else upto
        self.metrics.gap_repairs.inc()
        self._submit(lambda: self.hub.filled(conv, after, end, rows))
        if end < upto:
            self._queue.put(("fill", conv, end, upto))

    def _catch_up(self, catch: CatchUp, after: int, upto: int) -> None:
        """One page: the hub asks for the next from where it ends (the node may have
        moved on meanwhile)."""
        rows = self._read(room_conv(catch.room), after, upto)
        end = rows[-1].id if len(rows) == FILL_PAGE else upto
        self._submit(lambda: self.hub.caught_up(catch, end, rows))

    def _reconcile(self, cursors: dict[str, int]) -> None:
        rooms = [c[2:] for c in cursors if c.startswith("r:")]
        users = [int(c[2:]) for c in cursors if c.startswith("u:")]
        with self.engine.connect() as db:
            newest = {room_conv(r): n for r, n in newest_in_rooms(db, rooms).items()}
            newest.update({user_conv(u): n for u, n in newest_direct(db, users).items()})
        for conv, cursor in cursors.items():
            if newest.get(conv, 0) > cursor:
                self._fill(conv, cursor, newest[conv])

    def _rooms(self, keys: list[str]) -> None:
        if not keys:
            return
        truth: dict[str, dict[str, int]] = {k: {} for k in keys}
        with self.engine.connect() as db:
            rows = db.execute(
                select(users_t.c.username_key, members_t.c.room, members_t.c.since_msg_id)
                .join(members_t, members_t.c.user_id == users_t.c.id)
                .where(users_t.c.username_key.in_(bindparam("keys", expanding=True))),
                {"keys": keys})
            for key, room, since in rows:
                truth[key][room] = since
            disabled = set(db.execute(
                select(users_t.c.username_key).where(
                    users_t.c.username_key.in_(bindparam("keys", expanding=True)),
                    users_t.c.disabled_ms.is_not(None)), {"keys": keys}).scalars())

        def apply() -> None:
            self.hub.reconcile_rooms({k: v for k, v in truth.items() if k not in disabled})
            for key in disabled:
                LocalHub.ending(self.hub, key)
                LocalHub.end_sessions(self.hub, key, "account_disabled")

        self._submit(apply)



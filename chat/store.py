"""Storage: one writer thread with group commit, plus reads any thread may do.

Theory of operation
-------------------
Every change to the database, and every fan-out of a `message`, happens on the single
writer thread, in the order jobs were submitted:

1. The writer takes every job waiting in its queue (up to `MAX_BATCH`) and runs them in
   one transaction. Consecutive messages become one multi-row INSERT; any other job runs
   inside its own SAVEPOINT, so a refused job (a taken username, say) changes nothing
   while the rest of the batch commits.
2. After COMMIT, it runs each job's continuation in order: fan-out through the hub,
   replies to the requester. So a message is on disk before anyone sees it, and per
   sender (indeed globally) messages reach every session in `msg_id` order.
3. If the COMMIT itself fails, every job in the batch is answered with `internal`.

Reads that need no ordering with writes (looking up a user for a login) go straight to
the engine from the calling thread; SQLite's WAL mode (PostgreSQL's MVCC) lets them run
beside the writer.
The user cache is touched by the writer thread only.
"""

from __future__ import annotations

import functools
import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, Engine, and_, func, insert, or_, select, update
from sqlalchemy.exc import IntegrityError

from chat import acl
from chat.auth import username_skeleton
from chat.cluster import DirectChain
from chat.conversations import (
    RoomFacts,
    lock_conversations,
    locked_reads,
    newest_any,
    newest_direct,
    newest_in_rooms,
    room_conv,
    user_conv,
)
from chat.devices import canonical
from chat.errors import (
    Blocked,
    ChatError,
    Forbidden,
    Internal,
    InvalidField,
    NoSuchUser,
    NotInRoom,
    ServerBusy,
    UsernameTaken,
)
from chat.hub import LocalHub, Session, with_re
from chat.messages import ENCRYPTED_PLACEHOLDER
from chat.metrics import Metrics
from chat.models import Membership, Message, User
from chat.protocol import Frame, encode
from chat.roombook import OPERATOR, RoomBook, missing

log = logging.getLogger(__name__)

users_t = User.__table__
members_t = Membership.__table__
messages_t = Message.__table__

DEFAULT_ROOM = "general"
# Bounds one transaction: large enough to amortise a commit over a burst, small enough that
# the first message of a burst is not held back long.
MAX_BATCH = 512
# Stored direct messages handed to a logging-in session per page.
MAX_BACKLOG_PAGE = 500
# Bounds the bytes one room fan-out hands each member at once: well under the outbound
# limit, so a burst never makes a healthy reader look like a slow consumer.
MAX_FANOUT_BYTES = 256 * 1024

# The writer's shortest wait for a timer: a timer due again at once must not spin it.
TIMER_FLOOR = 0.001
# A batch that met a deadlock with another node's is run again, at most this often.
DEADLOCK_RETRIES = 5

After = Callable[[], None] | None
# Over a cluster, what a run of messages reads under its conversations' locks: each room's
# facts, each direct-message user's newest id (chat.conversations.locked_reads).
_Read = tuple[dict[str, RoomFacts], dict[int, int]]


def _deadlocked(exc: BaseException) -> bool:
    """PostgreSQL failed the transaction to break a lock cycle (or a serialization
    conflict): nothing of it happened, and running it again is safe."""
    # The driver's own error where it was called directly (chat.conversations.locked_reads).
    driver = getattr(exc, "orig", exc)
    return getattr(driver, "sqlstate", None) in ("40P01", "40001")


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def format_ts(ms: int) -> str:
    dt = datetime.fromtimestamp(ms // 1000, UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


@dataclass(frozen=True, slots=True)
class UserRecord:
    id: int
    key: str
    name: str
    password_hash: str


@dataclass(frozen=True, slots=True)
class Job:
    """A unit of work for the writer: `run` inside a savepoint, then its continuation.

    `run` returns the continuation to call after COMMIT; if it raises a ChatError, the
    savepoint is rolled back and `fail` is called with it after COMMIT instead.
    """

    run: Callable[[Connection], After]
    fail: Callable[[ChatError], None]
    # A login job names its user: a direct message later in the same batch must count
    # the user as online, since the login's continuation attaches the session first.
    logs_in: str | None = None
    # The connection that asked, told when the job is done (its back-pressure count).
    owner: Any = None


@dataclass(frozen=True, slots=True)
class MessageJob:
    session: Session
    rid: Any
    room: str | None
    to: str | None
    text: str
    fail: Callable[[ChatError], None]
    owner: Any = None
    envelope: dict[str, str] | None = None  # an encrypted message's (chat.devices)


_STOP = object()


def message_frame(row: Any) -> Frame:
    frame: Frame = {
        "type": "message", "msg_id": row.id, "ts": format_ts(row.ts_ms),
        "username": row.sender_name,
    }
    if row.room is not None:
        frame["room"] = row.room
    else:
        frame["to"] = row.recipient_name
    if row.encrypted:
        frame["message"] = ENCRYPTED_PLACEHOLDER
        frame["encrypted"] = json.loads(row.body)
    else:
        frame["message"] = row.body
    return frame


def dm_pair(a: int, b: int) -> str:
    return f"{min(a, b)}:{max(a, b)}"


class Store:
    def __init__(self, engine: Engine, hub: LocalHub, metrics: Metrics | None = None) -> None:
        self.engine = engine
        self.hub = hub
        self.metrics = metrics or Metrics()
        self._batch_stored = 0  # messages the current batch inserted (writer only)
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="store-writer", daemon=True)
        self._stopping = False
        self._users: dict[str, UserRecord] = {}
        self._sqlite = engine.dialect.name == "sqlite"
        self._sort_returning = not self._sqlite
        self._conn: Connection | None = None  # the writer's own, kept open
        self._corrections: list[tuple[list[int], bool]] = []  # writer thread only
        # The newest msg_id stored; writer thread only once started. A login's `welcome`
        # carries it: everything newer reaches the new session live, in order.
        self.last_msg_id = 0
        # Undo steps for in-memory state a batch changed, run if its COMMIT fails.
        self._undo: list[Callable[[], None]] = []
        # Rooms, members, roles, bans: writer thread only (chat.roombook).
        self.rooms = RoomBook()
        # Several nodes write this database (chat.cluster): conversations are locked,
        # membership is read from the database, nothing is cached across batches.
        self.ordered = False

    def order_with_others(self) -> None:
        """Before start: this node is one of several on this (PostgreSQL) database."""
        self.ordered = True
        self.rooms.lock = lambda db, name: lock_conversations(db, [room_conv(name)])

    # --- lifecycle ------------------------------------------------------------------
    def start(self) -> None:
        with self.engine.connect() as conn:
            self.last_msg_id = conn.execute(select(func.max(messages_t.c.id))).scalar() or 0
        self._thread.start()

    def stop(self) -> None:
        """Finish every job already submitted, then stop the writer."""
        self._stopping = True
        self._queue.put(_STOP)
        self._thread.join()

    # --- submitting (any thread) ----------------------------------------------------
    def submit(self, job: Job | MessageJob) -> None:
        if self._stopping:
            job.fail(ServerBusy("the server is shutting down"))
            return
        self._queue.put(job)

    def on_writer_thread(self) -> bool:
        return threading.current_thread() is self._thread

    @property
    def running(self) -> bool:
        return self._thread.is_alive() and not self._stopping

    @property
    def backlog(self) -> int:
        """Jobs waiting for the writer (approximate, from any thread)."""
        return self._queue.qsize()

    def on_rollback(self, undo: Callable[[], None]) -> None:
        """Writer thread, inside a job: undo an in-memory change if the batch fails."""
        self._undo.append(undo)

    # --- reads (any thread) ---------------------------------------------------------
    def find_user(self, key: str) -> UserRecord | None:
        with self.engine.connect() as conn:
            row = conn.execute(
                select(users_t.c.id, users_t.c.username_key, users_t.c.username,
                       users_t.c.password_hash).where(users_t.c.username_key == key)
            ).first()
        return UserRecord(*row) if row else None

    # --- operations for jobs (writer thread, inside a transaction) ------------------
    def user(self, conn: Connection, key: str) -> UserRecord | None:
        rec = self._users.get(key)
        if rec is None:
            row = conn.execute(
                select(users_t.c.id, users_t.c.username_key, users_t.c.username,
                       users_t.c.password_hash).where(users_t.c.username_key == key)
            ).first()
            if row is None:
                return None
            rec = self._users[key] = UserRecord(*row)
        return rec

    def create_user(self, conn: Connection, name: str, password_hash: str) -> UserRecord:
        ms = now_ms()
        skeleton = username_skeleton(name)
        if skeleton == _OPERATOR_SKELETON:
            # What chat-admin does is signed with this name, in events and in the audit log.
            raise UsernameTaken("that name is the operator's")
        taken = conn.execute(
            select(users_t.c.username_key).where(or_(
                users_t.c.username_key == name.lower(), users_t.c.username_skeleton == skeleton))
        ).first()
        if taken is not None:
            if taken[0] == name.lower():
                raise UsernameTaken()
            raise UsernameTaken("that username looks too much like an existing one")
        try:
            uid = conn.execute(
                insert(users_t).values(
                    username_key=name.lower(), username=name, username_skeleton=skeleton,
                    password_hash=password_hash, created_ms=ms, updated_ms=ms,
                )
            ).inserted_primary_key[0]
        except IntegrityError:  # another server on the same database, an instant ago
            raise UsernameTaken() from None
        general = self.rooms.get(conn, DEFAULT_ROOM)
        assert general is not None  # made by the migrations
        # Over a cluster, general's newest id as the database says under its lock (taken
        # by `rooms.get`): this node's own last id may be behind the other nodes'.
        self.rooms.add_member(conn, general, uid, name, acl.MEMBER,
                              self.newest(conn, room=DEFAULT_ROOM), ms)
        rec = UserRecord(uid, name.lower(), name, password_hash)
        self._users[rec.key] = rec
        return rec

    def set_password_hash(self, conn: Connection, user_id: int, password_hash: str) -> None:
        conn.execute(
            update(users_t).where(users_t.c.id == user_id)
            .values(password_hash=password_hash, updated_ms=now_ms())
        )
        for key, rec in list(self._users.items()):
            if rec.id == user_id:
                del self._users[key]

    def rooms_of(self, conn: Connection, user_id: int) -> list[str]:
        rows = conn.execute(
            select(members_t.c.room).where(members_t.c.user_id == user_id)
            .order_by(members_t.c.room)
        )
        return [r[0] for r in rows]

    def disabled(self, conn: Connection, user_id: int) -> bool:
        return conn.execute(select(users_t.c.disabled_ms).where(users_t.c.id == user_id)
                            ).scalar() is not None

    def undelivered(self, conn: Connection, user_id: int) -> tuple[int, int | None]:
        """How many direct messages wait for the user's next session, and the oldest's id."""
        count, first = conn.execute(
            select(func.count(), func.min(messages_t.c.id)).where(
                and_(messages_t.c.recipient_id == user_id, messages_t.c.delivered.is_(False)))
        ).one()
        return count, first

    def take_undelivered(
        self, conn: Connection, user_id: int, max_bytes: int = 1 << 20
    ) -> tuple[list[Frame], bool]:
        """Direct messages stored while the user had no session, oldest first, now marked
        delivered; at most about `max_bytes` of them. The flag says whether more wait."""
        rows = conn.execute(
            select(messages_t).where(
                and_(messages_t.c.recipient_id == user_id, messages_t.c.delivered.is_(False))
            ).order_by(messages_t.c.id).limit(MAX_BACKLOG_PAGE + 1)
        ).all()
        taken, size = [], 0
        for row in rows[:MAX_BACKLOG_PAGE]:
            size += _frame_size(row)
            if taken and size > max_bytes:
                break
            taken.append(row)
        if taken:
            conn.execute(
                update(messages_t).where(messages_t.c.id.in_([r.id for r in taken]))
                .values(delivered=True)
            )
        return [message_frame(r) for r in taken], len(taken) < len(rows)

    def password_hash_is(self, conn: Connection, user_id: int, expected: str) -> bool:
        current = conn.execute(
            select(users_t.c.password_hash).where(users_t.c.id == user_id)
        ).scalar()
        return current == expected

    def correct_marks(self, msg_ids: list[int], delivered: bool) -> None:
        """From a continuation (writer thread): fix delivered marks before the next batch.

        Not a queued job: a login already waiting in the queue must see the corrected
        mark, and the correction must happen during the shutdown drain too.
        """
        self._corrections.append((list(msg_ids), delivered))

    def _apply_corrections(self) -> None:
        corrections, self._corrections = self._corrections, []
        try:
            conn = self._writer_conn()
            with conn.begin():
                for msg_ids, delivered in corrections:
                    conn.execute(update(messages_t).where(messages_t.c.id.in_(msg_ids))
                                 .values(delivered=delivered))
        except Exception:
            log.exception("store: could not correct %d delivered marks", len(corrections))
            self._drop_writer_conn()

    def history(
        self, conn: Connection, *, room: str | None = None, pair: str | None = None,
        direct_of: int | None = None, before: int | None = None, after: int | None = None,
        limit: int = 50, max_bytes: int = 1 << 20, upto: int | None = None, floor: int = 0,
    ) -> list[Frame]:
        """Stored messages, oldest first; fewer than `limit` if they would pass `max_bytes`.

        One conversation: a `room`, a direct-message `pair`, or every direct message to or
        from the user `direct_of`; nothing newer than `upto`, nothing up to `floor` (where
        a room's readable history begins for the asker). Trimming keeps the messages
        nearest the anchor (the newest ones, or with `after` the oldest ones), so paging
        on with `before`/`after` still sees every message.
        """
        m = messages_t.c
        if room is not None:
            wheres = [m.room == room]
        elif pair is not None:
            wheres = [m.dm_pair == pair]
        else:
            # Received, and sent to others: each an index range of its own (the partial
            # indexes of direct messages), merged below; an OR would scan every DM.
            direct = m.room.is_(None)
            wheres = [and_(direct, m.recipient_id == direct_of),
                      and_(direct, m.sender_id == direct_of, m.recipient_id != direct_of)]
        rows: list[Any] = []
        for where in wheres:
            query = select(messages_t).where(where)
            if floor:
                query = query.where(m.id > floor)
            if upto is not None:
                query = query.where(m.id <= upto)
            if after is not None:
                query = query.where(m.id > after).order_by(m.id.asc())
            else:
                if before is not None:
                    query = query.where(m.id < before)
                query = query.order_by(m.id.desc())
            rows += conn.execute(query.limit(limit)).all()
        if len(wheres) > 1:
            rows.sort(key=lambda r: r.id, reverse=after is None)
            del rows[limit:]
        frames, size = [], 0
        for row in rows:  # nearest the anchor first
            size += _frame_size(row)
            if frames and size > max_bytes:
                break
            frames.append(message_frame(row))
        if after is None:
            frames.reverse()
        return frames

    # --- the writer thread ----------------------------------------------------------
    def _writer_conn(self) -> Connection:
        if self._conn is None:
            self._conn = self.engine.connect()
        return self._conn

    def _drop_writer_conn(self) -> None:
        # After a failed COMMIT the connection's state is unknown: start afresh.
        if self._conn is not None:
            try:
                self._conn.invalidate()
                self._conn.close()
            except Exception:
                log.exception("store: could not discard the writer's connection")
            self._conn = None

    def _run(self) -> None:
        try:
            self._serve()
        finally:
            if self._conn is not None:
                self._conn.close()

    def _serve(self) -> None:
        stop = False
        hub = self.hub
        while not stop:
            due = hub.due()
            if due == 0.0:
                hub.tick()
                due = hub.due()  # the next timer (presence, a gap, a reconcile), if any
                if due is not None:
                    due = max(due, TIMER_FLOOR)
            try:
                batch = [self._queue.get(timeout=due)]
            except queue.Empty:
                continue
            while len(batch) < MAX_BATCH:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            if _STOP in batch:
                stop = True
                batch = [job for job in batch if job is not _STOP]
            if batch:
                self._run_batch(batch)
            # Not kept while waiting for the next: its closures hold connections.
            del batch
        hub.flush_presence()
        # Anything submitted in the instant before `_stopping` was seen.
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not _STOP:
                job.fail(ServerBusy("the server is shutting down"))

    def _run_batch(self, batch: list[Job | MessageJob]) -> None:
        last_msg_id = self.last_msg_id
        started = time.perf_counter()
        attempt = 0
        while True:
            afters: list[After] = []
            self._undo.clear()
            self._batch_stored = 0
            try:
                self._attempt(batch, afters)
                break
            except Exception as exc:
                retry = self.ordered and _deadlocked(exc) and attempt < DEADLOCK_RETRIES
                if not retry:
                    log.exception("store: a batch of %d jobs could not be committed",
                                  len(batch))
                    self.metrics.db_errors.inc()
                self.last_msg_id = last_msg_id  # its ids may be given out again
                for undo in reversed(self._undo):
                    undo()
                self._undo.clear()
                self._drop_writer_conn()
                self._users.clear()
                self.rooms.forget()
                if retry:
                    # Two nodes' batches waited for each other's locks; PostgreSQL
                    # broke the cycle by failing this one. Nothing of it is left: again.
                    attempt += 1
                    log.info("store: a batch met a deadlock with another node; again")
                    continue
                for job in batch:
                    job.fail(Internal())
                _done(batch)
                return
        self._undo.clear()
        committed = time.perf_counter()
        self.metrics.commit_seconds.observe(committed - started)
        if self._batch_stored:
            self.metrics.messages_stored.inc(self._batch_stored)
        for after in afters:
            if after is None:
                continue
            try:
                after()
            except Exception:
                log.exception("store: a continuation failed")
        self.metrics.fanout_seconds.observe(time.perf_counter() - committed)
        _done(batch)
        if self._corrections:
            self._apply_corrections()

    def _attempt(self, batch: list[Job | MessageJob], afters: list[After]) -> None:
        logging_in: set[str] = set()
        read: _Read | None = None  # one node reads nothing ahead (its facts are cached)
        conn = self._writer_conn()
        with conn.begin():
            if self.ordered:
                # Other nodes write too: nothing read before this batch may be trusted.
                self._users.clear()
                self.rooms.forget()
                read = self._lock_messages(conn, batch)
            messages: list[MessageJob] = []
            for job in batch:
                if isinstance(job, MessageJob):
                    messages.append(job)
                    continue
                if messages:
                    afters.extend(self._insert_messages(conn, messages, logging_in, read))
                    messages = []
                read = None  # the job may change what was read
                after, ok = self._run_job(conn, job)
                afters.append(after)
                if ok and job.logs_in is not None:
                    logging_in.add(job.logs_in)
            if messages:
                afters.extend(self._insert_messages(conn, messages, logging_in, read))

    def _lock_messages(self, conn: Connection, batch: list[Job | MessageJob]
                       ) -> _Read | None:
        """Every conversation the batch's messages go to, locked before anything else
        (chat.cluster): a lock taken later, in a job, may meet another node's in a
        cycle, which PostgreSQL breaks by failing a batch (then run again). In the same
        round trip, what the messages before the batch's first other job need to know
        (`_read`; often the whole batch)."""
        messages = [job for job in batch if isinstance(job, MessageJob)]
        leading = messages[:next((i for i, job in enumerate(batch)
                                  if not isinstance(job, MessageJob)), len(batch))]
        read = self._read(conn, leading, also_lock=messages)
        return read if leading else None

    def _read(self, conn: Connection, jobs: list[MessageJob],
              also_lock: list[MessageJob] | None = None) -> _Read:
        """Over a cluster, under the conversations' locks: for the messages to rooms, each
        room's newest id, whether it is encrypted and which senders are in it (another
        node's kick has either committed, and is seen, or waits for this batch); for
        direct messages, each side's newest direct id. Every conversation read is locked,
        held ones again (at once): a recipient registered on another node since the
        batch took its locks has a conversation that another node may be writing to."""
        rooms, senders, users = self._conversations(conn, jobs)
        locks = {*map(room_conv, rooms), *map(user_conv, users)}
        if also_lock:
            more_rooms, _senders, more_users = self._conversations(conn, also_lock)
            locks.update(map(room_conv, more_rooms), map(user_conv, more_users))
        return locked_reads(conn, locks, rooms, senders, users)

    def _conversations(self, conn: Connection, jobs: list[MessageJob]
                       ) -> tuple[set[str], set[int], set[int]]:
        """The messages' rooms, their senders there, and the users of their direct ones
        (both sides: a recipient that does not exist has none)."""
        rooms, senders, users = set(), set(), set()
        for job in jobs:
            if job.room is not None:
                rooms.add(job.room)
                senders.add(job.session.user_id)
            else:
                users.add(job.session.user_id)
                rec = self.user(conn, (job.to or "").lower())
                if rec is not None:
                    users.add(rec.id)
        return rooms, senders, users

    # --- several nodes (chat.cluster) ------------------------------------------------
    def lock(self, conn: Connection, convs: list[str]) -> None:
        """Writer thread, in a job: over a cluster, take these conversations' locks (a
        device's queue, say) until the batch commits; alone, nothing to do."""
        if self.ordered:
            lock_conversations(conn, convs)

    def newest(self, conn: Connection, room: str | None = None,
               user_id: int | None = None) -> int:
        """Writer thread: the newest message id of a room, or of a user's direct messages
        (what a `history` may reach, where a `joined` room's reading begins). One node
        knows it without asking; over a cluster, the database is asked: every message of
        the conversation up to its newest committed one is committed (chat.cluster)."""
        if not self.ordered:
            return self.last_msg_id
        if room is not None:
            return newest_in_rooms(conn, [room])[room]
        if user_id is not None:
            return newest_direct(conn, [user_id])[user_id]
        return newest_any(conn)

    def follow(self, conn: Connection, rooms: list[str], user_id: int) -> dict[str, int]:
        """Writer thread, at a login over a cluster: where this node starts following the
        session's conversations (its rooms, its direct messages) if it does not follow
        them when the session is attached. Read for every one of them, followed now or
        not: a continuation earlier in this batch (the last other session's detach, a
        leave) may stop following one before this login's attach."""
        if not self.ordered:
            return {}
        cursors = {room_conv(r): n for r, n in newest_in_rooms(conn, rooms).items()}
        cursors[user_conv(user_id)] = newest_direct(conn, [user_id])[user_id]
        return cursors

    def _run_job(self, conn: Connection, job: Job) -> tuple[After, bool]:
        undo_from, book = len(self._undo), self.rooms.changes
        try:
            with conn.begin_nested():
                return job.run(conn), True
        except ChatError as exc:
            self._unwind(undo_from, book)
            return _failing(job.fail, exc), False
        except Exception as exc:
            if self.ordered and _deadlocked(exc):
                raise  # the whole batch again (_run_batch)
            log.exception("store: a job failed")
            self._unwind(undo_from, book)
            return _failing(job.fail, Internal()), False

    def _unwind(self, undo_from: int, book: int) -> None:
        """A job failed and its savepoint was rolled back: so is what it changed in memory."""
        for undo in reversed(self._undo[undo_from:]):
            undo()
        del self._undo[undo_from:]
        if self.rooms.changes != book:
            self.rooms.forget()  # read again from the database, which is right

    def _insert_messages(
        self, conn: Connection, jobs: list[MessageJob], logging_in: set[str],
        read: _Read | None = None,
    ) -> list[After]:
        ms = now_ms()
        afters: list[After] = [None] * len(jobs)
        rows: list[dict[str, Any]] = []
        placed: list[tuple[int, MessageJob, UserRecord | None]] = []
        if self.ordered and read is None:
            read = self._read(conn, jobs)
        facts = read[0] if read is not None else None
        for i, job in enumerate(jobs):
            sess = job.session
            if job.room is not None and (
                    sess.user is None or (job.room not in sess.user.rooms if facts is None
                                          else sess.user.ended
                                          or sess.user_id not in facts[job.room].members)):
                # Membership is what this thread decided, in order: a send pipelined
                # behind a refused join (or after a leave, a kick, a ban) is refused here.
                afters[i] = _failing(job.fail, self._not_sendable(conn, job.room, sess))
                continue
            env = job.envelope
            if env is not None and (env["device"] != sess.device
                                    or env["sender_key"] != sess.device_curve):
                afters[i] = _failing(job.fail, InvalidField(
                    "encrypted: device and sender_key must be this session's device "
                    "(device_keys first)"))
                continue
            if job.room is not None and (
                    self.rooms.encrypted(conn, job.room) if facts is None
                    else facts[job.room].encrypted) != (env is not None):
                afters[i] = _failing(job.fail, Forbidden(
                    f"{job.room} is end-to-end encrypted: the server takes only ciphertext "
                    "there") if env is None else InvalidField(
                    f"encrypted: {job.room} is not an encrypted room"))
                continue
            row = {
                "ts_ms": ms, "sender_id": sess.user_id, "sender_name": sess.name,
                "room": job.room, "recipient_id": None, "recipient_name": None,
                "dm_pair": None, "body": job.text if env is None else canonical(env).decode(),
                "delivered": True, "encrypted": env is not None,
            }
            rec = None
            if job.to is not None:
                if sess.user is None or sess.user.ended:
                    afters[i] = _failing(job.fail, Forbidden("this session is ending"))
                    continue
                rec = self.user(conn, job.to.lower())
                if rec is None or (read is not None and rec.id not in read[1]):
                    # (Over a cluster, one registered since the run's locks were taken is
                    # unknown to it: its conversation was neither locked nor read.)
                    afters[i] = _failing(job.fail, NoSuchUser(f"no user named {job.to[:40]!r}"))
                    continue
                if self.rooms.blocked(conn, sess.user_id, rec.id):
                    afters[i] = _failing(job.fail, Blocked())
                    continue
                row.update(
                    recipient_id=rec.id, recipient_name=rec.name,
                    dm_pair=dm_pair(sess.user_id, rec.id),
                    # Over a cluster, whichever node hands it to a session marks it.
                    delivered=not self.ordered and (rec.key in logging_in
                                                    or self.hub.is_online(rec.key)),
                )
            rows.append(row)
            placed.append((i, job, rec))
        if not rows:
            return afters
        prev = None
        if read is not None:
            # Each conversation's newest id before these messages: the first one's `prev`.
            prev = {room_conv(r): f.newest for r, f in read[0].items()}
            prev.update({user_conv(u): n for u, n in read[1].items()})
        ids = self._insert_rows(conn, rows)
        ts = format_ts(ms)
        run: list[tuple[MessageJob, Frame]] = []  # consecutive messages to one room
        run_at = run_size = run_last = 0
        chain: list[tuple[int, int]] | None = None  # the run's (prev, id), over a cluster
        for (i, job, rec), row, msg_id in zip(placed, rows, ids, strict=True):
            frame: Frame = {
                "type": "message", "msg_id": msg_id, "ts": ts, "username": job.session.name,
            }
            if rec is None:
                frame["room"] = job.room
                frame["message"] = job.text
                if job.envelope is not None:
                    frame["encrypted"] = job.envelope
                size = _text_size(row["body"])
                # Anything between (a direct message, a refused one) ends the run, which
                # keeps it at its first message's place, before that.
                if run and (run[0][0].room != job.room or i != run_last + 1
                            or run_size + size > MAX_FANOUT_BYTES):
                    afters[run_at] = self._room_fanout_later(run, chain)
                    run = []
                if not run:
                    run_at, run_size = i, 0
                    chain = [] if prev is not None else None
                run.append((job, frame))
                if chain is not None and prev is not None:
                    conv = room_conv(job.room)  # type: ignore[arg-type]
                    chain.append((prev[conv], msg_id))
                    prev[conv] = msg_id
                run_size += size
                run_last = i
                continue
            frame["to"] = rec.name
            frame["message"] = job.text
            if job.envelope is not None:
                frame["encrypted"] = job.envelope
            direct = None
            if prev is not None:
                sender, recipient = user_conv(job.session.user_id), user_conv(rec.id)
                direct = DirectChain(msg_id, rec.id, prev[recipient], job.session.user_id,
                                     prev[sender])
                prev[sender] = prev[recipient] = msg_id
            afters[i] = self._fanout_later(job, rec, frame, bool(row["delivered"]), direct)
        if run:
            afters[run_at] = self._room_fanout_later(run, chain)
        return afters

    def _not_sendable(self, conn: Connection, name: str, sess: Session) -> ChatError:
        """Why a session may not send to a room it is not in: the room's own answer."""
        room = self.rooms.get(conn, name)
        view = room.view(sess.user_id, now_ms()) if room else missing(name)
        try:
            acl.member(view)
        except ChatError as exc:
            return exc
        return NotInRoom(f"join {name} first")  # a session that closed meanwhile

    def _insert_rows(self, conn: Connection, rows: list[dict[str, Any]]) -> list[int]:
        """INSERT the rows as one statement; their ids, in row order."""
        if self._sqlite:
            # The hottest statement of the server: straight to the driver, since building
            # it through SQLAlchemy cost as much CPU as SQLite's own work (py-spy, (b)).
            # The same connection, so it is inside the batch's transaction.
            # Plaintext batches leave `encrypted` to its default: one parameter fewer per
            # row on the hottest path.
            columns = (_MESSAGE_COLUMNS if any(row["encrypted"] for row in rows)
                       else _PLAIN_COLUMNS)
            params = [row[c] for row in rows for c in columns]
            cursor = conn.connection.driver_connection.execute(  # type: ignore[union-attr]
                _sqlite_insert(len(rows), columns), params
            )
            # One writer inserts the rows of a multi-row INSERT in order, so the ascending
            # ids belong to the rows in parameter order (RETURNING's own order is not
            # promised).
            ids = sorted(r[0] for r in cursor.fetchall())
        else:
            # PostgreSQL: SQLAlchemy's "insertmanyvalues" numbers the rows, inserts them
            # ORDER BY that number (so the sequence hands out ascending ids in row order)
            # and gives RETURNING back in parameter order: each id is its own row's.
            stmt = insert(messages_t).returning(
                messages_t.c.id, sort_by_parameter_order=self._sort_returning
            )
            ids = [r[0] for r in conn.execute(stmt, rows)]
        self.last_msg_id = max(ids)
        self._batch_stored += len(ids)
        return ids

    def _room_fanout_later(self, run: list[tuple[MessageJob, Frame]],
                           chain: list[tuple[int, int]] | None = None) -> After:
        """Consecutive messages to one room go out as one write per member.

        Nothing else happened between them (no join, leave, login or direct message), so
        the members are
        the same for all of them; each message is still serialised once, and each member
        gets them, in msg_id order, through one `deliver` instead of one per message.
        The run sits at its first message's place among the batch's continuations, and
        the places of the others stay empty.
        """
        def fanout() -> None:
            items = []
            for job, frame in run:
                data = encode(frame)
                echo = data if job.rid is None else with_re(data, job.rid)
                items.append((data, job.session, echo))
            room = run[0][0].room
            assert room is not None
            self.hub.publish_room_many(room, items, chain)

        return fanout

    def _fanout_later(
        self, job: MessageJob, rec: UserRecord, frame: Frame, stored_delivered: bool,
        chain: DirectChain | None = None,
    ) -> After:
        def fanout() -> None:
            data = encode(frame)
            echo = data if job.rid is None else with_re(data, job.rid)
            delivered = self.hub.publish_direct(rec.key, job.session.key, data, job.session,
                                                echo, chain)
            if delivered != stored_delivered:
                # The recipient's last session went (or a first one came) between the
                # INSERT and now: correct the mark so the next login gets it exactly once.
                self.correct_marks([frame["msg_id"]], delivered)

        return fanout


_OPERATOR_SKELETON = username_skeleton(OPERATOR)

_PLAIN_COLUMNS = ("ts_ms", "sender_id", "sender_name", "room", "recipient_id",
                  "recipient_name", "dm_pair", "body", "delivered")
_MESSAGE_COLUMNS = (*_PLAIN_COLUMNS, "encrypted")


@functools.lru_cache(maxsize=128)
def _sqlite_insert(n: int, columns: tuple[str, ...]) -> str:
    # Only our own table and column names and placeholders: the values are parameters.
    one = "(" + ",".join("?" * len(columns)) + ")"
    values = ",".join([one] * n)
    return (f"INSERT INTO {messages_t.name} ({','.join(columns)}) VALUES {values} "  # noqa: S608
            "RETURNING id")


def _text_size(body: str) -> int:
    # A cheap upper bound of the encoded frame: ASCII at worst doubles with JSON escapes
    # (control characters, which would take 6, are refused); other text is UTF-8, <= 4.
    return (2 * len(body) if body.isascii() else 4 * len(body)) + 200


def _frame_size(row: Any) -> int:
    return _text_size(row.body)


def _failing(fail: Callable[[ChatError], None], exc: ChatError) -> After:
    return lambda: fail(exc)


def _done(batch: list[Job | MessageJob]) -> None:
    for job in batch:
        owner = job.owner
        if owner is not None:
            owner.job_done()

"""The requests of a logged-in user: send, join, leave, who, history.

Each runs on the connection's loop thread, checks the field rules, and hands the rest to
the store's writer queue. Membership is decided there and only there, in the order the
requests came: the writer keeps each online user's rooms (`UserState.rooms`), changes
them only after the database agreed, and every request that needs membership is checked
against them on that thread. So a `send`, `who` or `history` pipelined behind a refused
`join` (or after a `leave`) is refused, whatever the connection believed.

History is then read on the read pool, off the writer, but only up to the last message
stored when the writer decided: a reply never holds what was stored after a leave.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from chat import messages as m
from chat.errors import ChatError, Forbidden, Internal, InvalidField, NoSuchUser, NotInRoom
from chat.hub import UserState
from chat.protocol import encode
from chat.store import DEFAULT_ROOM, Job, MessageJob, dm_pair

if TYPE_CHECKING:
    from chat.connection import Connection

log = logging.getLogger(__name__)

# The most one stored message can weigh in a reply: 4 UTF-8 bytes a character, and the
# frame's other fields.
MESSAGE_BYTES_BOUND = 4 * m.MAX_MESSAGE_CHARS + 200


def _user(conn: Connection) -> UserState:
    """Writer thread: the requester's online state (attached before its first request)."""
    session = conn.require_session()
    assert session.user is not None
    return session.user


def _member(conn: Connection, room: str) -> UserState:
    user = _user(conn)
    if room not in user.rooms:
        raise NotInRoom()
    return user


def send(conn: Connection, req: m.Send) -> None:
    session = conn.require_session()
    if req.to is not None and not m.valid_username(req.to):
        raise NoSuchUser(f"no user named {req.to[:40]!r}")
    rid = req.id
    # Membership is checked by the writer, with the message (Store._insert_messages).
    conn.submit(MessageJob(
        session, rid, req.room, req.to, req.message,
        fail=lambda exc: conn.send_error(exc, rid), owner=conn,
    ))


def join(conn: Connection, req: m.Join) -> None:
    session = conn.require_session()
    hub, store, rid, room = conn.server.hub, conn.server.store, req.id, req.room
    limit, max_members = conn.settings.max_rooms_per_user, conn.settings.max_room_members
    ok = {"type": "ok", "op": "join", "room": room}

    def run(db: Any) -> Callable[[], None]:
        user = _user(conn)
        if room in user.rooms:
            return lambda: conn.reply(rid, ok)  # already in: no presence
        if len(user.rooms) >= limit:
            raise InvalidField(f"room: you are in {limit} rooms already; leave one first")
        # general holds everyone from registration on, so it has no member limit.
        if room != DEFAULT_ROOM and store.member_count(db, room) >= max_members:
            raise InvalidField(f"room: {room} is full ({max_members} members)")
        store.add_member(db, session.user_id, room)
        user.rooms.add(room)
        store.on_rollback(lambda: user.rooms.discard(room))

        def after() -> None:
            conn.reply(rid, ok)
            hub.joined(user, room)

        return after

    conn.submit(Job(run, lambda exc: conn.send_error(exc, rid), owner=conn))


def leave(conn: Connection, req: m.Leave) -> None:
    conn.require_session()
    hub, store, rid, room = conn.server.hub, conn.server.store, req.id, req.room
    if room == DEFAULT_ROOM:
        raise Forbidden(f"everyone is in {DEFAULT_ROOM}; it cannot be left")

    def run(db: Any) -> Callable[[], None]:
        user = _member(conn, room)
        store.remove_member(db, user.user_id, room)
        user.rooms.discard(room)
        store.on_rollback(lambda: user.rooms.add(room))

        def after() -> None:
            conn.reply(rid, {"type": "ok", "op": "leave", "room": room})
            hub.left(user, room)

        return after

    conn.submit(Job(run, lambda exc: conn.send_error(exc, rid), owner=conn))


def who(conn: Connection, req: m.Who) -> None:
    conn.require_session()
    hub, rid, room = conn.server.hub, req.id, req.room

    def run(db: Any) -> Callable[[], None]:
        _member(conn, room)

        def after() -> None:
            # Here, not in `run`: a join pipelined before this is in the hub only once its
            # own continuation ran. The list is kept by the hub until the room changes;
            # encoding and sending it is the connection's loop's work, not the writer's.
            users = hub.who(room)
            conn.loop.call_soon(conn.reply_weighed, rid, {"type": "who", "room": room,
                                                          "users": users})

        return after

    conn.submit(Job(run, lambda exc: conn.send_error(exc, rid), owner=conn))


def history(conn: Connection, req: m.History) -> None:
    session = conn.require_session()
    store, rid, read_pool = conn.server.store, req.id, conn.server.read_pool
    max_bytes = conn.settings.max_history_bytes
    if req.with_ is not None and not m.valid_username(req.with_):
        raise NoSuchUser(f"no user named {req.with_[:40]!r}")
    # Spent now, before the reply exists, so that pipelined requests cannot all start
    # before the first one is weighed; the difference comes back with the reply.
    row_cost = conn.settings.history_row_cost
    reserved = min(req.limit * MESSAGE_BYTES_BOUND, max_bytes) + req.limit * row_cost
    conn.reply_budget.spend(reserved)
    conn.reads_in_flight += 1  # one at a time: Connection._process holds the next

    def read(upto: int) -> None:
        size = 0
        try:
            reply: dict[str, Any] = {"type": "history"}
            with store.engine.connect() as db:
                if req.room is not None:
                    reply["room"] = req.room
                    where: dict[str, Any] = {"room": req.room}
                elif req.direct:
                    reply["direct"] = True
                    where = {"direct_of": session.user_id}
                else:
                    assert req.with_ is not None
                    other = store.find_user(req.with_.lower())
                    if other is None:
                        raise NoSuchUser(f"no user named {req.with_[:40]!r}")
                    reply["with"] = other.name
                    where = {"pair": dm_pair(session.user_id, other.id)}
                reply["messages"] = store.history(
                    db, **where, before=req.before, after=req.after, limit=req.limit,
                    max_bytes=max_bytes, upto=upto)
            data = encode(_with_re(reply, rid))
            # Bytes, and each row's share of the work: 200 short messages are 25 KB but
            # as much CPU as 900 KB of long ones.
            size = len(data) + len(reply["messages"]) * row_cost
            conn.deliver(data)
        except ChatError as exc:
            conn.send_error(exc, rid)
        except Exception:
            log.exception("%s: history read failed", conn.peer)
            conn.send_error(Internal(), rid)
        finally:
            conn.loop.call_soon(conn.charge_reply, reserved, size)

    def run(db: Any) -> Callable[[], None]:
        if req.room is not None:
            _member(conn, req.room)
        # The writer only decides (membership, and where the history ends); a reader
        # thread does the work, so a large history never holds up everyone's messages.
        upto = store.last_msg_id

        def after() -> None:
            try:
                read_pool.submit(lambda: read(upto))
            except ChatError as exc:
                conn.send_error(exc, rid)
                conn.loop.call_soon(conn.charge_reply, reserved, 0)

        return after

    def fail(exc: ChatError) -> None:
        conn.send_error(exc, rid)
        conn.loop.call_soon(conn.charge_reply, reserved, 0)

    conn.submit(Job(run, fail, owner=conn))


def _with_re(frame: dict[str, Any], rid: m.RequestId) -> dict[str, Any]:
    if rid is not None:
        frame["re"] = rid
    return frame

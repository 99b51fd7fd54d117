"""The requests of a logged-in user: send, join, leave, who, history.

Each runs on the connection's loop thread, checks what it can at once (membership, field
rules), and hands the rest to the store's writer queue, so that it is ordered after the
same connection's earlier requests. History is then read on the read pool, off the writer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from chat import messages as m
from chat.errors import ChatError, Internal, InvalidField, NoSuchUser, NotInRoom
from chat.store import DEFAULT_ROOM, Job, MessageJob, dm_pair

if TYPE_CHECKING:
    from chat.connection import Connection

log = logging.getLogger(__name__)


def send(conn: Connection, req: m.Send) -> None:
    session = conn.require_session()
    if req.room is not None:
        assert session.user is not None
        if req.room not in session.user.rooms:
            raise NotInRoom(f"join {req.room} first")
    elif req.to is not None and not m.valid_username(req.to):
        raise NoSuchUser()
    rid = req.id
    conn.server.store.submit(MessageJob(
        session, rid, req.room, req.to, req.message,
        fail=lambda exc: conn.send_error(exc, rid),
    ))


def join(conn: Connection, req: m.Join) -> None:
    session = conn.require_session()
    user, hub, store, rid = session.user, conn.server.hub, conn.server.store, req.id
    assert user is not None
    if req.room in user.rooms:
        conn.in_order(rid, lambda: conn.reply(rid, {"type": "ok", "op": "join",
                                                     "room": req.room}))
        return
    limit = conn.settings.max_rooms_per_user
    if len(user.rooms) >= limit:
        raise InvalidField(f"room: you are in {limit} rooms already; leave one first")
    if not hub.mark_joined(user, req.room):
        # Joined by another of this user's sessions an instant ago: still answer.
        conn.in_order(rid, lambda: conn.reply(rid, {"type": "ok", "op": "join",
                                                     "room": req.room}))
        return
    max_members = conn.settings.max_room_members

    def run(db: Any) -> Callable[[], None]:
        # general holds everyone from registration on, so it has no member limit.
        full = req.room != DEFAULT_ROOM and store.member_count(db, req.room) >= max_members
        if full:
            raise InvalidField(f"room: {req.room} is full ({max_members} members)")
        store.add_member(db, session.user_id, req.room)

        def after() -> None:
            conn.reply(rid, {"type": "ok", "op": "join", "room": req.room})
            hub.joined(user, req.room)

        return after

    def fail(exc: ChatError) -> None:
        hub.mark_left(user, req.room)
        conn.send_error(exc, rid)

    store.submit(Job(run, fail))


def leave(conn: Connection, req: m.Leave) -> None:
    session = conn.require_session()
    user, hub, store, rid = session.user, conn.server.hub, conn.server.store, req.id
    assert user is not None
    if not hub.mark_left(user, req.room):
        raise NotInRoom()

    def run(db: Any) -> Callable[[], None]:
        store.remove_member(db, session.user_id, req.room)

        def after() -> None:
            conn.reply(rid, {"type": "ok", "op": "leave", "room": req.room})
            hub.left(user, req.room)

        return after

    def fail(exc: ChatError) -> None:
        hub.mark_joined(user, req.room)
        conn.send_error(exc, rid)

    store.submit(Job(run, fail))


def who(conn: Connection, req: m.Who) -> None:
    session = conn.require_session()
    assert session.user is not None
    if req.room not in session.user.rooms:
        raise NotInRoom()
    hub, rid = conn.server.hub, req.id
    conn.in_order(
        rid, lambda: conn.reply(rid, {"type": "who", "room": req.room,
                                      "users": hub.who(req.room)})
    )


def history(conn: Connection, req: m.History) -> None:
    session = conn.require_session()
    assert session.user is not None
    store, rid = conn.server.store, req.id
    max_bytes = conn.settings.max_history_bytes
    if req.room is not None and req.room not in session.user.rooms:
        raise NotInRoom()
    if req.with_ is not None and not m.valid_username(req.with_):
        raise NoSuchUser()

    read_pool = conn.server.read_pool

    def read() -> None:
        try:
            reply: dict[str, Any] = {"type": "history"}
            with store.engine.connect() as db:
                if req.room is not None:
                    reply["room"] = req.room
                    msgs = store.history(db, room=req.room, before=req.before,
                                         after=req.after, limit=req.limit,
                                         max_bytes=max_bytes)
                elif req.direct:
                    reply["direct"] = True
                    msgs = store.history(db, direct_of=session.user_id, before=req.before,
                                         after=req.after, limit=req.limit,
                                         max_bytes=max_bytes)
                else:
                    assert req.with_ is not None
                    other = store.find_user(req.with_.lower())
                    if other is None:
                        raise NoSuchUser()
                    reply["with"] = other.name
                    msgs = store.history(db, pair=dm_pair(session.user_id, other.id),
                                         before=req.before, after=req.after,
                                         limit=req.limit, max_bytes=max_bytes)
            reply["messages"] = msgs
            conn.reply(rid, reply)
        except ChatError as exc:
            conn.send_error(exc, rid)
        except Exception:
            log.exception("%s: history read failed", conn.peer)
            conn.send_error(Internal(), rid)

    def run(db: Any) -> Callable[[], None]:
        # The writer only orders the read after this connection's earlier writes
        # (a `send` then `history` sees the message); a reader thread does the work,
        # so a large history never holds up everyone's messages.
        def after() -> None:
            try:
                read_pool.submit(read)
            except ChatError as exc:
                conn.send_error(exc, rid)

        return after

    store.submit(Job(run, lambda exc: conn.send_error(exc, rid)))


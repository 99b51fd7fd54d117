"""The requests of a logged-in user about rooms: send, join, leave, who, history, and
(protocol v1.1) create, room_info, members, list_rooms. Moderation is in chat.moderation.

Each runs on the connection's loop thread, checks the field rules, and hands the rest to
the store's writer queue. Membership is decided there and only there, in the order the
requests came: the writer keeps each online user's rooms (`UserState.rooms`), changes
them only after the database agreed, and every request that needs membership is checked
against them on that thread. So a `send`, `who` or `history` pipelined behind a refused
`join` (or after a `leave`) is refused, whatever the connection believed.

Who may do what is `chat.acl`'s rule over the facts the writer's `RoomBook` holds. A
private room is answered `no_such_room` for whoever is neither member nor invited, with
the very bytes a room that does not exist gets.

History is then read on the read pool, off the writer, but only the window the writer
decided: nothing newer than the last message stored at that point (a reply never holds
what was stored after a leave or a kick), nothing older than where the asker's reading
begins (the room's start; in a `joined` room, the asker's current join).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from chat import acl
from chat import messages as m
from chat.errors import ChatError, Forbidden, Internal, InvalidField, NoSuchUser, RoomTaken
from chat.hub import UserState
from chat.protocol import encode
from chat.roombook import RoomState, missing, rooms_listed
from chat.store import DEFAULT_ROOM, Job, MessageJob, dm_pair, now_ms

if TYPE_CHECKING:
    from chat.connection import Connection

log = logging.getLogger(__name__)

# The most one stored message can weigh in a reply: 4 UTF-8 bytes a character, and the
# frame's other fields.
MESSAGE_BYTES_BOUND = 4 * m.MAX_MESSAGE_CHARS + 200
# What one room in a list_rooms reply is taken to weigh before it is read.
LISTED_ROOM_BYTES = 200


def requester(conn: Connection) -> UserState:
    """Writer thread: the requester's online state (attached before its first request)."""
    session = conn.require_session()
    assert session.user is not None
    if session.user.ended:
        raise Forbidden("this session is ending")
    return session.user


def room_view(conn: Connection, db: Any, name: str) -> tuple[RoomState | None, acl.View]:
    """Writer thread: the room, and the requester's standing in it."""
    room = conn.server.store.rooms.get(db, name)
    uid = conn.require_session().user_id
    return room, (room.view(uid, now_ms()) if room else missing(name))


def _member(conn: Connection, db: Any, name: str) -> tuple[UserState, RoomState]:
    """Writer thread: the requester is a member of the room (else the error acl says)."""
    user = requester(conn)
    room, view = room_view(conn, db, name)
    acl.member(view)
    assert room is not None
    return user, room


def drop_if_abandoned(store: Any, db: Any, room: RoomState, ms: int) -> bool:
    """Delete a private room that nobody is in or invited to (its history with it): nobody
    could reach it again, and its name would be taken for good."""
    if not room.abandoned(ms):
        return False
    store.rooms.delete(db, room)
    return True


def submit(conn: Connection, rid: m.RequestId, run: Callable[[Any], Callable[[], None]]) -> None:
    """Hand a request's decision to the writer; a refusal is answered to `rid`."""
    conn.submit(Job(run, lambda exc: conn.send_error(exc, rid), owner=conn))


def weighed_read(conn: Connection, rid: m.RequestId, reserved: int, what: str,
                 decide: Callable[[Any], Any], read: Callable[[Any], tuple[dict[str, Any], int]]
                 ) -> None:
    """A reply read off the writer and charged to the connection's reply budget.

    `reserved` is spent now, before the reply exists, so that pipelined requests cannot
    all start before the first one is weighed; one such read runs at a time per
    connection (Connection._process holds the next). The writer runs `decide` in order
    (membership, the window to read) and a reader thread `read`s with what it decided,
    returning the reply and its rows; the bytes and each row's share of the work are
    charged, and the difference from `reserved` comes back.
    """
    conn.reply_budget.spend(reserved)
    conn.reads_in_flight += 1
    row_cost = conn.settings.history_row_cost
    read_pool = conn.server.read_pool

    def on_pool(decided: Any) -> None:
        size = 0
        try:
            frame, rows = read(decided)
            data = encode(_with_re(frame, rid))
            # Bytes, and each row's share of the work: 200 short messages are 25 KB but
            # as much CPU as 900 KB of long ones.
            size = len(data) + rows * row_cost
            conn.deliver(data)
        except ChatError as exc:
            conn.send_error(exc, rid)
        except Exception:
            log.exception("%s: %s read failed", conn.peer, what)
            conn.send_error(Internal(), rid)
        finally:
            conn.loop.call_soon(conn.charge_reply, reserved, size)

    def fail(exc: ChatError) -> None:
        conn.send_error(exc, rid)
        conn.loop.call_soon(conn.charge_reply, reserved, 0)

    def run(db: Any) -> Callable[[], None]:
        requester(conn)  # a session being ended reads nothing more
        decided = decide(db)

        def after() -> None:
            try:
                read_pool.submit(lambda: on_pool(decided))
            except ChatError as exc:
                fail(exc)

        return after

    conn.submit(Job(run, fail, owner=conn))


def send(conn: Connection, req: m.Send) -> None:
    session = conn.require_session()
    if req.to is not None and not m.valid_username(req.to):
        raise NoSuchUser(f"no user named {req.to[:40]!r}")
    rid = req.id
    # Membership is checked by the writer, with the message (Store._insert_messages).
    conn.submit(MessageJob(
        session, rid, req.room, req.to, req.message,
        fail=lambda exc: conn.send_error(exc, rid), owner=conn, envelope=req.encrypted,
    ))


def join(conn: Connection, req: m.Join) -> None:
    _enter(conn, req.id, req.room, None)


def create(conn: Connection, req: m.Create) -> None:
    _enter(conn, req.id, req.room, req)


def _enter(conn: Connection, rid: m.RequestId, name: str, create: m.Create | None) -> None:
    """join (which makes a public room of a name nobody uses) and create."""
    session = conn.require_session()
    hub, store = conn.server.hub, conn.server.store
    limit, max_members = conn.settings.max_rooms_per_user, conn.settings.max_room_members
    op = "create" if create else "join"
    ok = {"type": "ok", "op": op, "room": name}

    def run(db: Any) -> Callable[[], None]:
        user = requester(conn)
        room, view = room_view(conn, db, name)
        if room is not None and drop_if_abandoned(store, db, room, now_ms()):
            room, view = None, missing(name)  # its invitations lapsed since its last left
        if create is not None and room is not None:
            raise RoomTaken()
        if room is not None:
            acl.join(view)
            if view.member:  # already in: no presence
                again = {**ok, "encrypted": True} if room.encrypted else ok
                return lambda: conn.reply(rid, again)
        if len(user.rooms) >= limit:
            raise InvalidField(f"room: you are in {limit} rooms already; leave one first")
        ms = now_ms()
        made = room is None
        if room is None:
            visibility, history = ((create.visibility, create.history) if create
                                   else (acl.PUBLIC, acl.SHARED))
            room = store.rooms.create(db, name, visibility, history, store.newest(db), ms,
                                      create is not None and create.encrypted)
        # general holds everyone from registration on, so it has no member limit.
        elif name != DEFAULT_ROOM and len(room.members) >= max_members:
            raise InvalidField(f"room: {name} is full ({max_members} members)")
        # The room's newest message: a `joined` history begins after it (over a cluster,
        # read under the room's lock, so nothing older can still commit).
        last = store.newest(db, room=name)
        # Whoever makes a room owns it; so does the first to enter a room nobody is in
        # (a v1 room whose members all left): a room with members keeps an owner.
        role = acl.OWNER if not room.members and name != DEFAULT_ROOM else acl.MEMBER
        store.rooms.add_member(db, room, session.user_id, session.name, role, last, ms)
        user.rooms.add(name)
        store.on_rollback(lambda: user.rooms.discard(name))

        # A join that made the room says so: a typo should not go unnoticed.
        reply = {**ok, "created": True} if made and create is None else ok
        if room.encrypted:
            reply = {**reply, "encrypted": True}

        def after() -> None:
            conn.reply(rid, reply)
            hub.joined(user, name, last)

        return after

    submit(conn, rid, run)


def leave(conn: Connection, req: m.Leave) -> None:
    conn.require_session()
    hub, store, rid, name = conn.server.hub, conn.server.store, req.id, req.room

    def run(db: Any) -> Callable[[], None]:
        user = requester(conn)
        room, view = room_view(conn, db, name)
        acl.leave(view)
        assert room is not None
        store.rooms.remove_member(db, room, user.user_id)
        drop_if_abandoned(store, db, room, now_ms())
        user.rooms.discard(name)
        store.on_rollback(lambda: user.rooms.add(name))

        def after() -> None:
            conn.reply(rid, {"type": "ok", "op": "leave", "room": name})
            hub.left(user, name)

        return after

    submit(conn, rid, run)


def room_info(conn: Connection, req: m.RoomInfo) -> None:
    conn.require_session()
    rid = req.id

    def run(db: Any) -> Callable[[], None]:
        user, room = _member(conn, db, req.room)
        role = room.members[user.user_id].role
        frame = room.info(role)
        if acl.rank(role) >= acl.rank(acl.MODERATOR):
            # Who is banned, for those who may unban: the room's own list, by name.
            frame["bans"] = conn.server.store.rooms.banned_names(db, room)
        return lambda: conn.reply(rid, frame)

    submit(conn, rid, run)


def members(conn: Connection, req: m.Members) -> None:
    conn.require_session()
    hub, rid = conn.server.hub, req.id
    conn.reads_in_flight += 1  # one at a time, charged when sent (Connection._process)

    def send(listed: tuple[tuple[str, str], ...], online_names: list[str]) -> None:
        # The loop thread's work: the writer only handed over two lists it keeps.
        online = set(online_names)
        frame = {"type": "members", "room": req.room, "members": [
            {"username": name, "role": role, "online": name in online}
            for name, role in listed]}
        if rid is not None:
            frame["re"] = rid
        data = encode(frame)
        conn.deliver(data)
        conn.charge_reply(0, len(data))

    def run(db: Any) -> Callable[[], None]:
        room = _member(conn, db, req.room)[1]
        listed = room.member_list()
        # `online` as of this point in the writer's order (after earlier continuations).
        return lambda: conn.loop.call_soon(send, listed, hub.who(req.room))

    def fail(exc: ChatError) -> None:
        conn.send_error(exc, rid)
        conn.loop.call_soon(conn.charge_reply, 0, 0)

    conn.submit(Job(run, fail, owner=conn))


def list_rooms(conn: Connection, req: m.ListRooms) -> None:
    session = conn.require_session()
    store, limit = conn.server.store, conn.settings.max_listed_rooms

    def read(_decided: None) -> tuple[dict[str, Any], int]:
        # Read after this connection's earlier requests (a create just before is listed):
        # what is committed is what the store decided.
        with store.engine.connect() as db:
            rooms, more = rooms_listed(db, session.user_id, now_ms(), limit)
        frame: dict[str, Any] = {"type": "rooms", "rooms": rooms}
        if more:
            frame["more"] = True
        return frame, len(rooms)

    reserved = min(limit * LISTED_ROOM_BYTES, conn.settings.max_history_bytes)
    weighed_read(conn, req.id, reserved, "list_rooms", lambda db: None, read)


def who(conn: Connection, req: m.Who) -> None:
    conn.require_session()
    hub, rid, room = conn.server.hub, req.id, req.room

    def run(db: Any) -> Callable[[], None]:
        _member(conn, db, room)

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
    store, max_bytes = conn.server.store, conn.settings.max_history_bytes
    if req.with_ is not None and not m.valid_username(req.with_):
        raise NoSuchUser(f"no user named {req.with_[:40]!r}")

    def decide(db: Any) -> tuple[int, int]:
        # The writer only decides (membership, and where the history begins and ends); a
        # reader thread does the work, so a large history never holds up everyone else.
        floor = 0
        if req.room is not None:
            user, room = _member(conn, db, req.room)
            floor = room.readable_after(user.user_id)
            return store.newest(db, room=req.room), floor
        return store.newest(db, user_id=session.user_id), floor

    def read(decided: tuple[int, int]) -> tuple[dict[str, Any], int]:
        upto, floor = decided
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
                max_bytes=max_bytes, upto=upto, floor=floor)
        return reply, len(reply["messages"])

    row_cost = conn.settings.history_row_cost
    reserved = min(req.limit * MESSAGE_BYTES_BOUND, max_bytes) + req.limit * row_cost
    weighed_read(conn, req.id, reserved, "history", decide, read)


def _with_re(frame: dict[str, Any], rid: m.RequestId) -> dict[str, Any]:
    if rid is not None:
        frame["re"] = rid
    return frame

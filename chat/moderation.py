"""Protocol v1.1 moderation: invite, kick, ban, unban, set_role, topic, set_history, and
the per-user block list.

Each request is decided by the store's writer, in order with every message: `run` checks
the rule (`chat.acl`) against the room as the writer holds it (`RoomBook`), changes the
database, the room and the audit log in one savepoint, and returns the continuation that
tells people after the COMMIT. Continuations run in the writer's order, so a kicked user's
sessions get `removed` and leave the room's fan-out before any message stored after the
kick is delivered; a message the kicked user sent after it (even pipelined in the same
batch) is refused, because the writer took the room from the user's rooms first.

The same steps serve the operator (`chat-admin`, through the control socket): `remove`
and friends take the actor's name, and `operator` acts where no member may (in general,
on owners).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from chat import acl
from chat import messages as m
from chat.errors import Blocked, InvalidField, NoSuchUser, ServerBusy
from chat.hub import LocalHub
from chat.protocol import encode
from chat.roombook import RoomState, audit
from chat.rooms import drop_if_abandoned, requester, room_view, submit
from chat.store import Store, UserRecord, now_ms

if TYPE_CHECKING:
    from chat.connection import Connection


def _target(store: Store, db: Any, username: str) -> UserRecord:
    rec = store.user(db, username.lower()) if m.valid_username(username) else None
    if rec is None:
        raise NoSuchUser(f"no user named {username[:40]!r}")
    return rec


def _actor_and_target(conn: Connection, db: Any, name: str, username: str
                      ) -> tuple[RoomState, acl.View, UserRecord, acl.View]:
    """The room, the requester's standing, the target user and theirs. A room the
    requester may not see is `no_such_room` before anything about the target is said."""
    requester(conn)  # a session being ended (disabled, logged out) acts no more
    room, view = room_view(conn, db, name)
    acl.member(view)
    assert room is not None
    target = _target(conn.server.store, db, username)
    return room, view, target, room.view(target.id, now_ms())


# --- steps shared with the operator (writer thread) ---------------------------------
def remove(store: Store, hub: LocalHub, db: Any, room: RoomState, target: UserRecord,
           how: str, by: str, reason: str) -> Callable[[], None]:
    """Kick or ban `target` from `room`; the continuation tells them and the members."""
    ms = now_ms()
    was_member = target.id in room.members
    if was_member:
        store.rooms.remove_member(db, room, target.id)
    if how == "ban":
        store.rooms.ban(db, room, target.id, by, reason, ms)
    audit(db, ms, by, how, target=target.name, room=room.name, reason=reason)
    name = room.name
    drop_if_abandoned(store, db, room, ms)
    state = hub.user_state(target.key)
    if state is not None and name in state.rooms:
        # Now, not after the COMMIT: the target's requests later in this batch (a send,
        # a history) are checked against it and refused.
        state.rooms.discard(name)
        store.on_rollback(lambda: state.rooms.add(name))
    frame = {"type": "removed", "room": name, "by": by, "how": how, "reason": reason}
    data = encode(frame)

    def after() -> None:
        # Looked up again: a login decided before the kick may have attached since, with
        # the rooms it read then; the state the kick changed above is right as it is (a
        # join decided after the kick may have put the room back).
        online = hub.user_state(target.key)
        if online is not None and was_member:
            if online is not state:
                online.rooms.discard(name)
            hub.removed(online, name, data)
        elif was_member:
            hub.removed_offline(target.key, name, data)

    return after


def reachable(hub: LocalHub) -> None:
    """Refuse, before changing anything, what must reach every node of a cluster while
    this node cannot reach the others (chat.cluster): it would hold for some only."""
    if not getattr(hub, "reachable", True):
        raise ServerBusy("the nodes cannot reach each other (Redis) just now; try again "
                         "shortly")


def announce_room(hub: LocalHub, room: RoomState, by: str) -> Callable[[], None]:
    """The `room` frame to every member's sessions, each with that member's own role, and
    who made the change (`by`, beyond the contract's room_info fields)."""
    roles = {uid: mb.role for uid, mb in room.members.items()}  # as of now, in order
    encoded = {role: encode({**room.info(role), "by": by}) for role in set(roles.values())}

    return lambda: hub.announce(room.name, roles, encoded)


# --- requests (loop thread; decided on the writer) -----------------------------------
def invite(conn: Connection, req: m.Invite) -> None:
    session = conn.require_session()
    store, hub, rid = conn.server.store, conn.server.hub, req.id
    ttl_ms = int(conn.settings.invite_ttl * 1000)
    cap = conn.settings.max_rooms_per_user  # pending invitations: as many as rooms
    ok = {"type": "ok", "op": "invite", "room": req.room}

    def run(db: Any) -> Callable[[], None]:
        room, view, target, tview = _actor_and_target(conn, db, req.room, req.username)
        acl.invite(view, tview)
        if store.rooms.blocked(db, session.user_id, target.id):
            raise Blocked()
        if tview.member:
            return lambda: conn.reply(rid, ok)  # nothing to do
        ms = now_ms()
        if room.private:  # a public room needs no invitation: it is only news
            store.rooms.invite(db, room, target.id, session.name, ms + ttl_ms, cap)
        audit(db, ms, session.name, "invite", target=target.name, room=room.name)
        data = encode({"type": "invited", "room": room.name, "by": session.name})

        def after() -> None:
            hub.tell(target.key, data)
            conn.reply(rid, ok)

        return after

    submit(conn, rid, run)


def _removal(how: str) -> Callable[[Connection, Any], None]:
    def handle(conn: Connection, req: m.Kick | m.Ban) -> None:
        session = conn.require_session()
        store, hub, rid = conn.server.store, conn.server.hub, req.id

        def run(db: Any) -> Callable[[], None]:
            room, view, target, tview = _actor_and_target(conn, db, req.room, req.username)
            (acl.kick if how == "kick" else acl.act_on)(view, tview)
            reachable(hub)
            tell = remove(store, hub, db, room, target, how, session.name, req.reason)

            def after() -> None:
                tell()
                # Over a cluster, the `ok` waits until every node has removed the target's
                # sessions from the room.
                hub.sync(lambda: conn.reply(rid, {"type": "ok", "op": how, "room": room.name,
                                                  "username": target.name}))

            return after

        submit(conn, rid, run)

    return handle


kick = _removal("kick")
ban = _removal("ban")


def unban(conn: Connection, req: m.Unban) -> None:
    session = conn.require_session()
    store, rid = conn.server.store, req.id

    def run(db: Any) -> Callable[[], None]:
        room, view, target, tview = _actor_and_target(conn, db, req.room, req.username)
        acl.act_on(view, tview)
        if tview.banned:
            store.rooms.unban(db, room, target.id)
            audit(db, now_ms(), session.name, "unban", target=target.name, room=room.name,
                  reason=req.reason)
        return lambda: conn.reply(rid, {"type": "ok", "op": "unban", "room": room.name,
                                        "username": target.name})

    submit(conn, rid, run)


def set_role(conn: Connection, req: m.SetRole) -> None:
    session = conn.require_session()
    store, hub, rid = conn.server.store, conn.server.hub, req.id

    def run(db: Any) -> Callable[[], None]:
        room, view, target, tview = _actor_and_target(conn, db, req.room, req.username)
        acl.set_role(view, tview, req.role, yourself=target.id == session.user_id)
        ok = {"type": "ok", "op": "set_role", "room": room.name, "username": target.name,
              "role": req.role}
        if tview.role == req.role:
            return lambda: conn.reply(rid, ok)
        store.rooms.set_role(db, room, target.id, req.role)
        audit(db, now_ms(), session.name, "set_role", target=target.name, room=room.name,
              detail=req.role)
        data = encode({"type": "role", "room": room.name, "username": target.name,
                       "role": req.role, "by": session.name})

        def after() -> None:
            hub.publish_room(room.name, data)
            conn.reply(rid, ok)

        return after

    submit(conn, rid, run)


def _room_setting(op: str) -> Callable[[Connection, Any], None]:
    """topic and set_history: change the room, tell its members."""

    def handle(conn: Connection, req: m.Topic | m.SetHistory) -> None:
        session = conn.require_session()
        store, hub, rid = conn.server.store, conn.server.hub, req.id

        def run(db: Any) -> Callable[[], None]:
            requester(conn)
            room, view = room_view(conn, db, req.room)
            if isinstance(req, m.Topic):
                acl.topic(view)
                store.rooms.set_topic(db, room, req.topic)  # type: ignore[arg-type]
                detail = req.topic
            else:
                acl.set_history(view)
                store.rooms.set_history(db, room, req.history)  # type: ignore[arg-type]
                detail = req.history
            assert room is not None
            audit(db, now_ms(), session.name, op, room=room.name, detail=detail)
            tell = announce_room(hub, room, session.name)

            def after() -> None:
                tell()
                conn.reply(rid, {"type": "ok", "op": op, "room": room.name})

            return after

        submit(conn, rid, run)

    return handle


topic = _room_setting("topic")
set_history = _room_setting("set_history")


def _blocking(block: bool) -> Callable[[Connection, Any], None]:
    def handle(conn: Connection, req: m.BlockUser | m.UnblockUser) -> None:
        session = conn.require_session()
        store, rid = conn.server.store, req.id
        op = "block" if block else "unblock"

        def run(db: Any) -> Callable[[], None]:
            requester(conn)
            target = _target(store, db, req.username)
            if target.id == session.user_id:
                raise InvalidField("username: you cannot block yourself")
            if block:
                store.rooms.block(db, session.user_id, target.id, now_ms())
            else:
                store.rooms.unblock(db, session.user_id, target.id)
            return lambda: conn.reply(rid, {"type": "ok", "op": op, "username": target.name})

        submit(conn, rid, run)

    return handle


block = _blocking(True)
unblock = _blocking(False)

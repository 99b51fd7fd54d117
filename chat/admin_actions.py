"""What the operator does with `chat-admin`: one function per action, run by the store's
writer when the server runs (through the control socket), or on the database directly
when it does not.

Each action takes an `Ops` (the transaction, the store, the hub) and returns what to
print, plus, through `Ops.later`, what live sessions must be told after the COMMIT. With
the server stopped the hub is an empty one: the same code changes the database and has
nobody to tell. A refusal raises `Refused`, which changes nothing.

Ending sessions (disable, logout, reset-password) is ordered like a ban: the writer takes
the user's rooms away at once (a message the user pipelined later in the same batch is
refused), and the continuation detaches every session from the hub before it closes them,
so that nothing stored after the action reaches them while their `bye` is on its way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, and_, delete, func, select, update

from chat import accounts, acl
from chat.errors import ChatError
from chat.hub import LocalHub, UserState
from chat.keys import device_list_notice
from chat.messages import valid_username
from chat.models import (
    DEVICE_LIVE,
    AuditEntry,
    Ban,
    Device,
    Membership,
    OneTimeKey,
    Room,
    ToDevice,
    ToDeviceSend,
    User,
)
from chat.moderation import announce_room, remove
from chat.protocol import encode
from chat.roombook import OPERATOR, audit
from chat.store import DEFAULT_ROOM, Store, UserRecord, now_ms

users_t, members_t, rooms_t = User.__table__, Membership.__table__, Room.__table__
devices_t, otks_t = Device.__table__, OneTimeKey.__table__
to_device_t, to_device_sends_t = ToDevice.__table__, ToDeviceSend.__table__
bans_t, audit_t = Ban.__table__, AuditEntry.__table__


MAX_AUDIT_ROWS = 10_000


class Refused(Exception):
    """The action cannot be done (no such user, say); nothing was changed."""


@dataclass
class Ops:
    db: Connection
    store: Store
    hub: LocalHub
    # The running server's pepper: a password hash chat-admin made must be under it.
    pepper_id: str | None = None
    later: list[Callable[[], None]] = field(default_factory=list)

    def check_hash(self, password_hash: str) -> None:
        parts = password_hash.split("$")
        if self.pepper_id is not None and (len(parts) < 3 or parts[1] != self.pepper_id):
            raise Refused(f"chat-admin hashed the password with another pepper (id "
                          f"{parts[1] if len(parts) > 1 else '?'}) than the server's "
                          f"({self.pepper_id}): run chat-admin with the server's settings "
                          "(--config, --pepper-file, --data-dir)")

    def user(self, name: str) -> UserRecord:
        rec = self.store.user(self.db, name.lower())
        if rec is None:
            raise Refused(f"no user named {name!r}")
        return rec

    def room(self, name: str) -> Any:
        room = self.store.rooms.get(self.db, name.lower().lstrip("#"))
        if room is None:
            raise Refused(f"no room named #{name.lower().lstrip('#')}")
        return room

    def run_later(self) -> None:
        for fn in self.later:
            fn()


def _must_reach_every_node(ops: Ops) -> None:
    """Refuse, before anything changes, what the other nodes of a cluster must apply
    while this one cannot reach them (chat.cluster)."""
    if not getattr(ops.hub, "reachable", True):
        raise Refused("the cluster's nodes cannot reach each other (Redis) just now: the "
                      "other nodes' sessions would stay; try again shortly")


def _end_sessions(ops: Ops, rec: UserRecord, reason: str) -> int:
    """Close every session of the user with `bye reason`, in the writer's order."""
    hub, store = ops.hub, ops.store
    _must_reach_every_node(ops)
    state = hub.user_state(rec.key)
    count = len(state.sessions) if state else 0
    if state is not None:
        taken = set(state.rooms)
        hub.ending(rec.key)  # requests later in this batch are refused

        def undo(state: UserState = state) -> None:
            state.rooms.update(taken)
            state.ended = False

        store.on_rollback(undo)
    ops.later.append(lambda: hub.end_sessions(rec.key, reason))
    return count


# --- users -------------------------------------------------------------------------
def user_list(ops: Ops) -> dict[str, Any]:
    rows = ops.db.execute(select(users_t.c.username, users_t.c.created_ms,
                                 users_t.c.disabled_ms).order_by(users_t.c.username_key))
    return {"users": [{"username": u, "created_ms": c, "disabled": d is not None,
                       "online": ops.hub.is_online(u.lower())} for u, c, d in rows]}


def user_show(ops: Ops, name: str) -> dict[str, Any]:
    rec = ops.user(name)
    row = ops.db.execute(select(users_t.c.created_ms, users_t.c.disabled_ms)
                         .where(users_t.c.id == rec.id)).one()
    rooms = ops.db.execute(select(members_t.c.room, members_t.c.role)
                           .where(members_t.c.user_id == rec.id).order_by(members_t.c.room))
    return {"username": rec.name, "created_ms": row.created_ms,
            "disabled": row.disabled_ms is not None, "disabled_ms": row.disabled_ms,
            "sessions": len(ops.hub.sessions_of(rec.key)),
            "rooms": [{"room": r, "role": role} for r, role in rooms]}


def user_add(ops: Ops, name: str, password_hash: str, reason: str = "") -> dict[str, Any]:
    if not valid_username(name):
        raise Refused(f"{name!r} is not a username: 3 to 32 characters of letters, digits, "
                      "'_', '.', '-', starting with a letter or digit")
    ops.check_hash(password_hash)
    try:
        rec = ops.store.create_user(ops.db, name, password_hash)
    except ChatError as exc:
        raise Refused(exc.message) from None
    audit(ops.db, now_ms(), OPERATOR, "user_add", target=rec.name, reason=reason)
    return {"username": rec.name}


def _set_disabled(ops: Ops, name: str, disabled: bool, reason: str) -> dict[str, Any]:
    rec = ops.user(name)
    ms = now_ms()
    ops.db.execute(update(users_t).where(users_t.c.id == rec.id)
                   .values(disabled_ms=ms if disabled else None))
    audit(ops.db, ms, OPERATOR, "disable" if disabled else "enable", target=rec.name,
          reason=reason)
    ended = _end_sessions(ops, rec, "account_disabled") if disabled else 0
    return {"username": rec.name, "disabled": disabled, "sessions_ended": ended}


def user_disable(ops: Ops, name: str, reason: str = "") -> dict[str, Any]:
    return _set_disabled(ops, name, True, reason)


def user_enable(ops: Ops, name: str, reason: str = "") -> dict[str, Any]:
    return _set_disabled(ops, name, False, reason)


def user_reset_password(ops: Ops, name: str, password_hash: str,
                        reason: str = "") -> dict[str, Any]:
    rec = ops.user(name)
    ops.check_hash(password_hash)
    ops.store.set_password_hash(ops.db, rec.id, password_hash)
    audit(ops.db, now_ms(), OPERATOR, "reset_password", target=rec.name, reason=reason)
    return {"username": rec.name, "sessions_ended": _end_sessions(ops, rec, "logged_out")}


def user_logout(ops: Ops, name: str, reason: str = "") -> dict[str, Any]:
    rec = ops.user(name)
    audit(ops.db, now_ms(), OPERATOR, "logout", target=rec.name, reason=reason)
    return {"username": rec.name, "sessions_ended": _end_sessions(ops, rec, "logged_out")}


# --- tokens ------------------------------------------------------------------------
def token_create(ops: Ops, uses: int = 1, ttl: float = accounts.DEFAULT_TOKEN_TTL,
                 note: str = "") -> dict[str, Any]:
    ms = now_ms()
    try:
        tid, token = accounts.create_token(ops.db, uses, ttl, note, ms)
    except ValueError as exc:
        raise Refused(str(exc)) from None
    audit(ops.db, ms, OPERATOR, "token_create", target=f"token {tid}",
          detail=f"uses {uses}, lasts {_span(ttl)}" + (f": {note}" if note else ""))
    return {"id": tid, "token": token, "uses_allowed": uses, "expires_ms": ms + int(ttl * 1000)}


def _span(seconds: float) -> str:
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size and seconds % size == 0:
            n = int(seconds // size)
            return f"{n} {unit}{'s' if n != 1 else ''}"
    return f"{seconds:g} s"


def token_list(ops: Ops) -> dict[str, Any]:
    return {"tokens": accounts.list_tokens(ops.db, now_ms())}


def token_revoke(ops: Ops, token_id: int) -> dict[str, Any]:
    ms = now_ms()
    if not accounts.revoke_token(ops.db, token_id, ms):
        raise Refused(f"no usable token with id {token_id}")
    audit(ops.db, ms, OPERATOR, "token_revoke", target=f"token {token_id}")
    return {"id": token_id, "revoked": True}


# --- rooms -------------------------------------------------------------------------
def room_list(ops: Ops) -> dict[str, Any]:
    counts = dict(ops.db.execute(select(members_t.c.room, func.count())
                                 .group_by(members_t.c.room)).all())
    rows = ops.db.execute(select(rooms_t.c.name, rooms_t.c.visibility, rooms_t.c.history,
                                 rooms_t.c.topic).order_by(rooms_t.c.name)).all()
    return {"rooms": [{"room": n, "visibility": v, "history": h, "topic": t,
                       "members": counts.get(n, 0)} for n, v, h, t in rows]}


def room_show(ops: Ops, name: str) -> dict[str, Any]:
    room = ops.room(name)
    banned = ops.db.execute(
        select(users_t.c.username, bans_t.c.by_name, bans_t.c.reason)
        .join(users_t, users_t.c.id == bans_t.c.user_id).where(bans_t.c.room == room.name)
        .order_by(users_t.c.username_key)).all()
    return {**room.info(None), "members": sorted(
        ({"username": m.name, "role": m.role} for m in room.members.values()),
        key=lambda m: m["username"].lower()),
        "bans": [{"username": u, "by": b, "reason": r} for u, b, r in banned]}


def room_set_owner(ops: Ops, name: str, username: str, reason: str = "") -> dict[str, Any]:
    room, rec = ops.room(name), ops.user(username)
    if room.name == DEFAULT_ROOM:
        raise Refused(f"{DEFAULT_ROOM} has no owner")
    ms = now_ms()
    if rec.id in room.members:
        ops.store.rooms.set_role(ops.db, room, rec.id, acl.OWNER)
    else:
        if rec.id in room.bans:
            ops.store.rooms.unban(ops.db, room, rec.id)
        newest = ops.store.newest(ops.db, room=room.name)
        ops.store.rooms.add_member(ops.db, room, rec.id, rec.name, acl.OWNER, newest, ms)
        state = ops.hub.user_state(rec.key)
        if state is not None:
            state.rooms.add(room.name)
            ops.store.on_rollback(lambda: state.rooms.discard(room.name))
            ops.later.append(lambda: ops.hub.joined(state, room.name, newest))
        else:
            # Over a cluster, the user may be online on another node.
            ops.later.append(lambda: ops.hub.joined_offline(rec.key, room.name, newest))
    audit(ops.db, ms, OPERATOR, "set_owner", target=rec.name, room=room.name, reason=reason)
    data = encode({"type": "role", "room": room.name, "username": rec.name, "role": acl.OWNER,
                   "by": OPERATOR})
    ops.later.append(lambda: ops.hub.publish_room(room.name, data))
    return {"room": room.name, "owner": rec.name}


def _room_removal(how: str) -> Callable[..., dict[str, Any]]:
    def act(ops: Ops, name: str, username: str, reason: str = "") -> dict[str, Any]:
        room, rec = ops.room(name), ops.user(username)
        if room.name == DEFAULT_ROOM:
            # Everyone is in general, always: keeping someone out is `user disable`.
            raise Refused(f"nobody leaves {DEFAULT_ROOM}: disable the account instead "
                          "(chat-admin user disable)")
        if how == "kick" and rec.id not in room.members:
            raise Refused(f"{rec.name} is not in #{room.name}")
        _must_reach_every_node(ops)
        ops.later.append(remove(ops.store, ops.hub, ops.db, room, rec, how, OPERATOR, reason))
        return {"room": room.name, "username": rec.name, how: True}

    return act


room_kick = _room_removal("kick")
room_ban = _room_removal("ban")


def room_unban(ops: Ops, name: str, username: str, reason: str = "") -> dict[str, Any]:
    room, rec = ops.room(name), ops.user(username)
    if rec.id not in room.bans:
        raise Refused(f"{rec.name} is not banned from #{room.name}")
    ops.store.rooms.unban(ops.db, room, rec.id)
    audit(ops.db, now_ms(), OPERATOR, "unban", target=rec.name, room=room.name, reason=reason)
    return {"room": room.name, "username": rec.name, "unban": True}


def room_delete(ops: Ops, name: str, reason: str = "") -> dict[str, Any]:
    room = ops.room(name)
    if room.name == DEFAULT_ROOM:
        raise Refused(f"{DEFAULT_ROOM} cannot be deleted")
    _must_reach_every_node(ops)
    # Everyone in it is removed first, as by a kick: each session is told, in order.
    for uid in list(room.members):
        rec = ops.store.user(ops.db, room.members[uid].name.lower())
        assert rec is not None
        ops.later.append(remove(ops.store, ops.hub, ops.db, room, rec, "kick", OPERATOR,
                                reason or "the room was deleted"))
    deleted = ops.store.rooms.delete(ops.db, room)
    audit(ops.db, now_ms(), OPERATOR, "room_delete", room=room.name, reason=reason,
          detail=f"{deleted} messages deleted")
    return {"room": room.name, "deleted": True, "messages_deleted": deleted}


def room_topic(ops: Ops, name: str, topic: str) -> dict[str, Any]:
    room = ops.room(name)
    ops.store.rooms.set_topic(ops.db, room, topic)
    audit(ops.db, now_ms(), OPERATOR, "topic", room=room.name, detail=topic)
    ops.later.append(announce_room(ops.hub, room, OPERATOR))
    return {"room": room.name, "topic": topic}


# --- devices (end-to-end encryption) ------------------------------------------------
def device_list(ops: Ops, name: str) -> dict[str, Any]:
    rec = ops.user(name)
    rows = ops.db.execute(select(devices_t.c.device, devices_t.c.ed25519, devices_t.c.created_ms,
                                 func.count(otks_t.c.key_id))
                          .outerjoin(otks_t, and_(otks_t.c.user_id == devices_t.c.user_id,
                                                  otks_t.c.device == devices_t.c.device,
                                                  otks_t.c.fallback.is_(False)))
                          .where(and_(devices_t.c.user_id == rec.id,
                                      DEVICE_LIVE))
                          .group_by(devices_t.c.device, devices_t.c.ed25519,
                                    devices_t.c.created_ms)
                          .order_by(devices_t.c.device)).all()
    return {"username": rec.name, "devices": [
        {"device": d, "ed25519": e, "created_ms": c, "one_time_keys": n} for d, e, c, n in rows]}


def device_remove(ops: Ops, name: str, device: str, reason: str = "") -> dict[str, Any]:
    """Remove a device (a lost phone): nobody can start a session with it, and its keys
    can never be registered again (the row stays, marked removed)."""
    rec = ops.user(name)
    _must_reach_every_node(ops)  # its sessions on the other nodes are unbound too
    gone = ops.db.execute(update(devices_t).where(and_(
        devices_t.c.user_id == rec.id, devices_t.c.device == device,
        DEVICE_LIVE)).values(removed_ms=now_ms())).rowcount
    if not gone:
        raise Refused(f"{rec.name} has no device {device!r}")
    # Its one-time keys, its queued to-device messages and its send ids go with it.
    for table in (otks_t, to_device_t, to_device_sends_t):
        ops.db.execute(delete(table).where(and_(table.c.user_id == rec.id,
                                                table.c.device == device)))
    audit(ops.db, now_ms(), OPERATOR, "device_remove", target=rec.name, detail=device,
          reason=reason)
    # Its sessions may stay, but send nothing more as that device: unbound here, in the
    # writer's order, so that what they pipelined behind the removal (even in this
    # batch) is refused as from an unbound session.
    bound = [(s, s.device, s.device_curve, s.to_device_sent, s.to_device_live)
             for s in ops.hub.sessions_of(rec.key) if s.device == device]
    for session, *_ in bound:
        session.device = session.device_curve = None
        session.to_device_sent, session.to_device_live = 0, False
    if bound:
        def rebind() -> None:
            for session, dev, curve, sent, live in bound:
                session.device, session.device_curve = dev, curve
                session.to_device_sent, session.to_device_live = sent, live

        ops.store.on_rollback(rebind)
    ops.later.append(lambda: ops.hub.device_removed(rec.key, device))
    ops.later.append(device_list_notice(ops.db, ops.store, rec.id, rec.key, rec.name))
    return {"username": rec.name, "device": device, "removed": True}


# --- the audit log -----------------------------------------------------------------
def audit_list(ops: Ops, room: str | None = None, user: str | None = None,
               since_ms: int | None = None, limit: int = 1000) -> dict[str, Any]:
    c = audit_t.c
    where = []
    if room:
        where.append(c.room == room.lower().lstrip("#"))
    if user:
        where.append((func.lower(c.target) == user.lower()) | (func.lower(c.actor) == user.lower()))
    if since_ms is not None:
        where.append(c.ts_ms >= since_ms)
    # Read on the writer thread: bounded, so a long log never holds up the chat.
    query = select(audit_t).order_by(c.id.desc()).limit(max(1, min(limit, MAX_AUDIT_ROWS)))
    if where:
        query = query.where(and_(*where))
    rows = ops.db.execute(query).all()
    return {"entries": [{"id": r.id, "ts_ms": r.ts_ms, "actor": r.actor, "action": r.action,
                         "target": r.target, "room": r.room, "reason": r.reason,
                         "detail": r.detail} for r in reversed(rows)]}


# The actions the control socket accepts, by name: nothing is looked up by a name a
# client sent but through this table.
ACTIONS: dict[str, Callable[..., dict[str, Any]]] = {
    "user_list": user_list, "user_show": user_show, "user_add": user_add,
    "user_disable": user_disable, "user_enable": user_enable,
    "user_reset_password": user_reset_password, "user_logout": user_logout,
    "token_create": token_create, "token_list": token_list, "token_revoke": token_revoke,
    "room_list": room_list, "room_show": room_show, "room_set_owner": room_set_owner,
    "room_kick": room_kick, "room_ban": room_ban, "room_unban": room_unban,
    "room_delete": room_delete, "room_topic": room_topic, "audit": audit_list,
    "device_list": device_list, "device_remove": device_remove,
}

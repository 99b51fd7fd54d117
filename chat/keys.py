"""The device directory's requests: device_keys, one_time_keys, query_keys, claim_key.

Each is decided by the store's writer, in order with everything else: a one-time key is
handed out once because only that thread takes one, and deletes it in the same
transaction (on several nodes, the DELETE ... RETURNING of one row does the same). What
a user uploads is checked first (chat.devices): public keys only, each signed by the
device's own Ed25519 key over the user's and the device's names. A device's identity
keys never change; new keys are a new device.

`device_keys` also makes the device this session's: its one-time key count is told to
the device's sessions whenever a claim takes one, so that they top up.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sqlalchemy import and_, delete, func, insert, select

from chat import devices, todevice
from chat import messages as m
from chat.errors import InvalidField, NoSuchUser
from chat.models import DEVICE_LIVE, Device, Membership, OneTimeKey
from chat.protocol import encode
from chat.rooms import requester, submit
from chat.store import now_ms

if TYPE_CHECKING:
    from chat.connection import Connection

devices_t, otks_t = Device.__table__, OneTimeKey.__table__
members_t = Membership.__table__


def _device_row(db: Any, user_id: int, device: str) -> Any:
    """The device, a removed one included (its id and keys are never taken again)."""
    return db.execute(select(devices_t).where(and_(
        devices_t.c.user_id == user_id, devices_t.c.device == device))).first()


def _removed(device: str) -> InvalidField:
    return InvalidField(f"device: the operator removed {device}; its keys cannot come back "
                        "(a new installation is a new device)")



def _count(db: Any, user_id: int, device: str) -> int:
    return db.execute(select(func.count()).select_from(otks_t).where(and_(
        otks_t.c.user_id == user_id, otks_t.c.device == device,
        otks_t.c.fallback.is_(False)))).scalar_one()


def device_list_notice(db: Any, store: Any, user_id: int, key: str, name: str
                       ) -> Callable[[], None]:
    """Writer, in a job: what tells everyone concerned that the user's devices changed
    (its sessions, those of its encrypted rooms, those that asked for its keys), to run
    after. Only encrypted rooms: a room of plaintext (general has everyone) needs no keys."""
    rooms = [room for room in db.execute(select(members_t.c.room)
                                         .where(members_t.c.user_id == user_id)).scalars()
             if store.rooms.encrypted(db, room)]
    hub = store.hub
    data = encode({"type": "device_list", "username": name})
    return lambda: hub.devices_changed(key, rooms, data)


def upload_device(conn: Connection, req: m.UploadDevice) -> None:
    session = conn.require_session()
    keys, limit = req.keys, conn.settings.max_devices_per_user
    devices.verify_device(session.name, keys)  # pure CPU, on the loop: no writer time
    store = conn.server.store

    def run(db: Any) -> Callable[[], None]:
        user = requester(conn)
        if session.device not in (None, keys.device):
            raise InvalidField(f"device: this session is device {session.device} already")
        row = _device_row(db, session.user_id, keys.device)
        notice = None
        if row is None:
            n = db.execute(select(func.count()).select_from(devices_t).where(and_(
                devices_t.c.user_id == session.user_id, DEVICE_LIVE))).scalar_one()
            if n >= limit:
                raise InvalidField(f"device: you have {limit} devices already; remove one "
                                   "(chat-admin) first")
            db.execute(insert(devices_t).values(user_id=session.user_id, **keys.public(),
                                                created_ms=now_ms()))
            notice = device_list_notice(db, store, session.user_id, user.key, session.name)
        elif row.removed_ms is not None:
            raise _removed(keys.device)
        elif (row.curve25519, row.ed25519) != (keys.curve25519, keys.ed25519):
            raise InvalidField(f"device: {keys.device} has other keys; a device's keys never "
                               "change (new keys are a new device)")
        reply = {"type": "ok", "op": "device_keys", "device": keys.device,
                 "one_time_keys": _count(db, session.user_id, keys.device)}
        page: list[bytes] = []
        if session.device is None:
            # The session is the device's from here on, in the writer's order: a send
            # behind this request already names it, and its queue starts coming.
            session.device, session.device_curve = keys.device, keys.curve25519

            def unbind() -> None:
                session.device = session.device_curve = None

            store.on_rollback(unbind)
            page = todevice.next_page(db, conn, session)

        def after() -> None:
            conn.reply(req.id, reply)
            for data in page:
                session.out.deliver(data)
            if notice is not None:
                notice()

        return after

    submit(conn, req.id, run)


def upload_one_time_keys(conn: Connection, req: m.UploadOneTimeKeys) -> None:
    session = conn.require_session()
    limit = conn.settings.max_one_time_keys
    if len(req.keys) > limit:
        raise InvalidField(f"keys: at most {limit} at once")

    def run(db: Any) -> Callable[[], None]:
        requester(conn)
        row = _device_row(db, session.user_id, req.device)
        if row is None:
            raise InvalidField(f"device: upload the keys of {req.device} first (device_keys)")
        if row.removed_ms is not None:
            raise _removed(req.device)
        keys = devices.DeviceKeys(row.device, row.curve25519, row.ed25519, row.signature)
        for key in (*req.keys, *([req.fallback] if req.fallback else [])):
            devices.verify_one_time_key(session.name, keys, key)
        have = _count(db, session.user_id, req.device)
        known = set(db.execute(select(otks_t.c.key_id).where(and_(
            otks_t.c.user_id == session.user_id, otks_t.c.device == req.device,
            otks_t.c.fallback.is_(False)))).scalars())
        new = [k for k in req.keys if k.id not in known]
        if have + len(new) > limit:
            raise InvalidField(f"keys: a device keeps at most {limit} one-time keys; it has "
                               f"{have}")
        for key in new:
            db.execute(insert(otks_t).values(user_id=session.user_id, device=req.device,
                                             key_id=key.id, key=key.key,
                                             signature=key.signature, fallback=False))
        if req.fallback is not None:  # replaces the one before
            db.execute(delete(otks_t).where(and_(
                otks_t.c.user_id == session.user_id, otks_t.c.device == req.device,
                otks_t.c.fallback.is_(True))))
            fb = req.fallback
            db.execute(insert(otks_t).values(user_id=session.user_id, device=req.device,
                                             key_id=fb.id, key=fb.key, signature=fb.signature,
                                             fallback=True))
        reply = {"type": "ok", "op": "one_time_keys", "device": req.device,
                 "one_time_keys": have + len(new)}
        return lambda: conn.reply(req.id, reply)

    submit(conn, req.id, run)


def query_keys(conn: Connection, req: m.QueryKeys) -> None:
    session = conn.require_session()
    store, hub, watch = conn.server.store, conn.server.hub, conn.settings.max_key_watch

    def run(db: Any) -> Callable[[], None]:
        requester(conn)
        found: dict[str, list[dict[str, str]]] = {}
        keys: list[str] = []
        for name in req.users:
            rec = store.user(db, name.lower()) if m.valid_username(name) else None
            if rec is None:
                continue  # unknown users are left out, as in a search
            keys.append(rec.key)
            rows = db.execute(select(devices_t).where(and_(devices_t.c.user_id == rec.id,
                                                           DEVICE_LIVE))
                              .order_by(devices_t.c.device)).all()
            found[rec.name] = [devices.DeviceKeys(r.device, r.curve25519, r.ed25519,
                                                  r.signature).public() for r in rows]
        frame = {"type": "keys", "users": found}

        def after() -> None:
            for key in keys:  # told of their device changes from now on
                hub.watch(session, key, watch)
            # In the writer's order, not the loop's: a device_list notice decided after
            # this read must reach the client after the keys it makes stale.
            conn.reply_charged(req.id, frame)

        return after

    submit(conn, req.id, run)


def claim_key(conn: Connection, req: m.ClaimKey) -> None:
    conn.require_session()
    store, hub = conn.server.store, conn.server.hub

    def run(db: Any) -> Callable[[], None]:
        requester(conn)
        rec = store.user(db, req.username.lower()) if m.valid_username(req.username) else None
        if rec is None:
            raise NoSuchUser(f"no user named {req.username[:40]!r}")
        where = and_(otks_t.c.user_id == rec.id, otks_t.c.device == req.device)
        # A one-time key if one is left (each handed out once), else the fallback key.
        row = db.execute(select(otks_t).where(where)
                         .order_by(otks_t.c.fallback, otks_t.c.key_id).limit(1)).first()
        if row is None:
            raise InvalidField(f"device: {rec.name} has no device {req.device} with keys")
        if not row.fallback:
            db.execute(delete(otks_t).where(and_(where, otks_t.c.fallback.is_(False),
                                                 otks_t.c.key_id == row.key_id)))
        key = devices.OneTimeKey(row.key_id, row.key, row.signature, row.fallback).public()
        left = _count(db, rec.id, req.device)
        reply = {"type": "claimed", "username": rec.name, "device": req.device, "key": key}
        count = encode({"type": "key_count", "device": req.device, "one_time_keys": left})

        def after() -> None:
            conn.reply(req.id, reply)
            hub.tell(rec.key, count, device=req.device)  # so that the device tops up

        return after

    submit(conn, req.id, run)

"""To-device messages: Olm ciphertext from one device to another, kept until acknowledged.

This is how room keys, forwarded keys and verification reach a device, online or not
(end-to-end encryption, step 2; docs/protocol.md). The server reads none of it: it checks
the shape (chat.devices.parse_olm), stamps the sender as it authenticated it, and keeps
each message in its target device's queue, in `seq` order, until that device says it
has stored what the message changed (`to_device_ack`).

Every decision runs on the store's writer, like everything else: a send, a bind and an
acknowledgement are ordered among themselves, which is what keeps a device's queue in
order across the page it is being given and the messages arriving live. A session's
queue state (`Session.to_device_sent`, `to_device_live`) is the writer's and is changed
inside the job, with an undo if the batch does not commit; the frames go out after the
commit.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sqlalchemy import and_, delete, func, insert, select

from chat import messages as m
from chat.devices import canonical
from chat.errors import InvalidField
from chat.hub import Session
from chat.models import DEVICE_LIVE, Device, ToDevice, ToDeviceSend
from chat.protocol import encode
from chat.rooms import requester, submit
from chat.store import Job, now_ms

if TYPE_CHECKING:
    from chat.connection import Connection

devices_t, queue_t, sends_t = Device.__table__, ToDevice.__table__, ToDeviceSend.__table__

NO_SUCH_DEVICE, QUEUE_FULL = "no_such_device", "queue_full"


def _frame(seq: int, sender: str, sender_device: str, olm: dict[str, Any]) -> bytes:
    return encode({"type": "to_device", "seq": seq, "username": sender,
                   "device": sender_device, "olm": olm})


def _bound(session: Session) -> str:
    if session.device is None:
        raise InvalidField("device: this session has no device yet (device_keys first)")
    return session.device


def next_page(db: Any, conn: Connection, session: Session) -> list[bytes]:
    """Writer, in a job: the next page of the session's device queue after what it was
    given, at most `to_device_page` messages and about `max_history_bytes`; marks the
    session live once the queue is all given out."""
    settings, store = conn.settings, conn.server.store
    rows = db.execute(
        select(queue_t.c.seq, queue_t.c.sender_name, queue_t.c.sender_device, queue_t.c.olm)
        .where(and_(queue_t.c.user_id == session.user_id,
                    queue_t.c.device == session.device,
                    queue_t.c.seq > session.to_device_sent))
        .order_by(queue_t.c.seq).limit(settings.to_device_page + 1)).all()
    page, size = [], 0
    for row in rows[:settings.to_device_page]:
        if page and size + len(row.olm) > settings.max_history_bytes:
            break
        page.append(_frame(row.seq, row.sender_name, row.sender_device, json.loads(row.olm)))
        size += len(row.olm)
    was = session.to_device_sent, session.to_device_live
    if page:
        session.to_device_sent = rows[len(page) - 1].seq
    session.to_device_live = len(page) == len(rows)

    def undo() -> None:
        session.to_device_sent, session.to_device_live = was

    store.on_rollback(undo)
    return page


def send(conn: Connection, req: m.ToDevice) -> None:
    session = conn.require_session()
    store, hub, settings = conn.server.store, conn.server.hub, conn.settings

    def run(db: Any) -> Callable[[], None]:
        requester(conn)
        device = _bound(session)
        for item in req.messages:
            if item.olm["sender_key"] != session.device_curve:
                raise InvalidField("olm: sender_key must be this device's curve25519 key")
        ms = now_ms()
        mine = and_(sends_t.c.user_id == session.user_id, sends_t.c.device == device)
        db.execute(delete(sends_t).where(and_(
            mine, sends_t.c.created_ms <= ms - int(settings.to_device_send_id_ttl * 1000))))
        earlier = db.execute(select(sends_t.c.answer).where(
            and_(mine, sends_t.c.send_id == req.send_id))).scalar()
        if earlier is not None:  # the client lost the answer: the same one again
            repeat = {"type": "ok", "op": "to_device", "send_id": req.send_id,
                      **json.loads(earlier), "repeat": True}
            return lambda: conn.reply(req.id, repeat)

        # Over a cluster, each target device's queue is locked: seq order is then commit
        # order, so a device given everything up to a seq can never miss a lower one.
        store.lock(db, [device_conv(rec.id, item.device) for item in req.messages
                        if m.valid_username(item.username)
                        and (rec := store.user(db, item.username.lower())) is not None])
        capacity: dict[tuple[int, str], int] = {}  # target -> messages it can still take, or -1
        skipped: list[dict[str, str]] = []
        live: list[tuple[Session, bytes]] = []
        arrived: set[tuple[str, str]] = set()  # (user key, device) that were queued to
        queued = 0
        for item in req.messages:
            rec = (store.user(db, item.username.lower())
                   if m.valid_username(item.username) else None)
            target = (rec.id, item.device) if rec is not None else None
            if target is not None and target not in capacity:
                exists = db.execute(select(devices_t.c.device).where(and_(
                    devices_t.c.user_id == rec.id, devices_t.c.device == item.device,
                    DEVICE_LIVE))).first() is not None
                capacity[target] = _room_for(db, settings, session, rec.id, item.device) \
                    if exists else -1
            left = capacity[target] if target is not None else -1
            if left <= 0:
                skipped.append({"username": rec.name if rec else item.username[:32],
                                "device": item.device,
                                "reason": NO_SUCH_DEVICE if left < 0 else QUEUE_FULL})
                continue
            assert rec is not None and target is not None
            capacity[target] = left - 1
            seq = db.execute(insert(queue_t).values(
                user_id=rec.id, device=item.device, sender_name=session.name,
                sender_device=device, olm=canonical(item.olm).decode(), created_ms=ms)
            ).inserted_primary_key[0]
            queued += 1
            arrived.add((rec.key, item.device))
            data = None
            # Over a cluster the device's sessions on this node, as on the others, read
            # the queue in seq order (ClusterHub.to_device_queued): given live from here,
            # a message would not move their place in it, and a pull for one queued on
            # another node would give it again (or after a later one).
            for other in hub.sessions_of(rec.key) if not store.ordered else ():
                if other.device == item.device and other.to_device_live:
                    data = data or _frame(seq, session.name, device, item.olm)
                    live.append((other, data))
        answer = {"queued": queued, "skipped": skipped}
        db.execute(insert(sends_t).values(user_id=session.user_id, device=device,
                                          send_id=req.send_id, answer=json.dumps(answer),
                                          created_ms=ms))
        # The send_ids a device is answered again for are its latest `to_device_send_ids`
        # (within the ttl): a client repeats a send whose answer it lost, one of the few it
        # had in flight. That bounds what a device leaves on disk, whatever its rate:
        # each is kept with its answer, up to a frame of skipped targets. (This one and
        # the latest others, of one millisecond, any of them, are kept.)
        keep = settings.to_device_send_ids
        others = and_(mine, sends_t.c.send_id != req.send_id)
        older = db.execute(select(sends_t.c.send_id).where(others)
                           .order_by(sends_t.c.created_ms.desc())
                           .offset(keep - 1).limit(keep)).scalars().all()
        if older:
            db.execute(delete(sends_t).where(and_(mine, sends_t.c.send_id.in_(older))))
        reply = {"type": "ok", "op": "to_device", "send_id": req.send_id, **answer}

        def after() -> None:
            conn.reply(req.id, reply)
            for other, data in live:
                other.out.deliver(data)
            for key, dev in arrived:
                hub.to_device_queued(key, dev)  # a cluster's other nodes pull theirs

        return after

    submit(conn, req.id, run)


def pull(store: Any, session: Session) -> None:
    """Over a cluster: something was queued (on this node or another) for this session's
    device.
    If the session is following its queue live, it gets what it has not had yet, read
    from the database in seq order (the device's lock makes that commit order)."""
    def run(db: Any) -> Callable[[], None] | None:
        if session.closed or not session.to_device_live or session.device is None:
            return None
        page = next_page(db, session.out, session)  # type: ignore[arg-type]

        def after() -> None:
            for data in page:
                session.out.deliver(data)

        return after

    store.submit(Job(run, lambda exc: None))


def device_conv(user_id: int, device: str) -> str:
    return f"d:{user_id}:{device}"


def _room_for(db: Any, settings: Any, sender: Session, user_id: int, device: str) -> int:
    """How many more messages from `sender` the device's queue takes: what is left of
    it, and, from another user, of that user's share, so that one sender filling the
    queue with junk cannot shut the device's rooms out of giving it keys."""
    where = and_(queue_t.c.user_id == user_id, queue_t.c.device == device)
    held = db.execute(select(func.count()).select_from(queue_t).where(where)).scalar_one()
    left = settings.max_to_device_queue - held
    if user_id != sender.user_id:
        mine = db.execute(select(func.count()).select_from(queue_t).where(
            and_(where, queue_t.c.sender_name == sender.name))).scalar_one()
        left = min(left, settings.max_to_device_per_sender - mine)
    return max(0, left)


def ack(conn: Connection, req: m.ToDeviceAck) -> None:
    session = conn.require_session()

    def run(db: Any) -> Callable[[], None]:
        requester(conn)
        device = _bound(session)
        db.execute(delete(queue_t).where(and_(
            queue_t.c.user_id == session.user_id, queue_t.c.device == device,
            queue_t.c.seq <= req.upto)))
        page: list[bytes] = []
        if not session.to_device_live and req.upto >= session.to_device_sent:
            page = next_page(db, conn, session)
        reply = {"type": "ok", "op": "to_device_ack", "upto": req.upto}

        def after() -> None:
            conn.reply(req.id, reply)
            for data in page:
                session.out.deliver(data)

        return after

    submit(conn, req.id, run)

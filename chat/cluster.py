"""Several nodes on one PostgreSQL database and one Redis: order, fan-out, repair, presence.

Theory of operation
-------------------
Each node is a whole server (its own writer, hub, connections). What they share:

* **PostgreSQL is the truth.** A message is committed before any node shows it. Inside
  its writer's transaction a node takes the conversation's lock first (an advisory
  transaction lock on `r:<room>`, or on `u:<user id>` for each side of a direct message;
  see `lock_conversations`), reads the conversation's newest id (`prev`), and inserts.
  So within one conversation ids are taken and committed in one order, and a message's
  `prev` is exactly the one before it: no reader of `id > cursor` can ever skip a row
  that commits later (the issue's 2-18% loss with a plain sequence).

* **Redis Pub/Sub carries what happened, after the commit** (`Bus`): messages with their
  `prev`, membership changes, removals, ended sessions, presence, notices. One channel
  for the cluster, one per node for acknowledgements. Nothing in Redis is needed to
  recover: it is the fast path, the database is the repair path.

* **Each node delivers a conversation in order, once** (`Sequencer`, on the writer
  thread). It keeps, per conversation its sessions are in, the last id it delivered. A
  message whose `prev` is that id goes out; an older one is a duplicate and is dropped;
  a newer one (its predecessor is late, or Pub/Sub lost it) waits `cluster_gap_wait`,
  then the gap is read from the database (`Filler`, off the writer) and delivered in
  order, followed by whatever waited. Every `cluster_reconcile_interval`, and at once
  after Redis comes back, the filler also compares each conversation's newest id in the
  database with the node's: that catches a lost *last* message, which no later `prev`
  would reveal.

* **A session gets nothing of a room from before it entered** (its login, its user's
  join), as on one node. That point is a room's newest id, read under the room's lock
  by a join (and sent in its `j`, and kept as the membership's `since_msg_id`) or read
  by a login; a node behind it in the room (a gap, a Pub/Sub slower than the database)
  still delivers what lies between to the room's other sessions. So the hub keeps that
  session's *floor* in the room, and hands it nothing at or below it; a floor goes once
  a delivery in the room reaches it, or with the session's leave or close. Checking is
  one dict lookup per delivered run of a room: runs stay one write per member.

* **Changes other nodes must apply before the actor hears `ok`** (a kick, a ban, a
  disable or logout) are followed by a `sync` barrier: every live node answers it on
  the actor's node channel after its writer has applied everything published before it
  (one Redis connection keeps the order). The `ok` waits for every node registered at
  that moment, or until a silent node's registration has lapsed (`cluster_node_ttl`),
  since a node cut off from Redis that long has closed its clients (below).

* **Liveness.** Each node refreshes `<prefix>:nodes:<id>` every third of
  `cluster_node_ttl` while it is subscribed (and is in the set `<prefix>:nodes`, which is
  what is read to find the live ones: never a scan of the keyspace). A node that has
  been neither registered nor subscribed for `FENCE_AFTER` of the ttl (before its
  registration can lapse) is *fenced*: it ends every session (`bye shutdown`; clients
  reconnect through the balancer to a healthy node), refuses logins and answers /health
  with 503 until Redis is back. While the bus is down (before the fence), requests that must reach
  other nodes (kick, ban, `passwd` with `logout_others`; the operator's disable, logout,
  room kick, ban and delete, device remove) are refused (`server_busy`, or the operator's
  refusal); messages keep flowing through the database (the reconcile). After a reconnect,
  a node subscribes first and then reconciles: messages, and the rooms of its online users
  from the database.

* **Presence** is coalesced per node as on one node (chat.hub). A node publishes the
  presence frames its flush made and which of its users came online or went offline;
  the others deliver those frames to their own sessions and keep a replica of who is
  online where (for `who`, for "online elsewhere"), rebuilt from Redis hashes at start
  and dropped for a node whose heartbeat lapsed.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, Engine, and_, bindparam, select, text

from chat.hub import CONNECTION, ROOM, LocalHub, Session, UserState, _Change
from chat.models import Membership, Message, User
from chat.protocol import encode

if TYPE_CHECKING:
    from chat.store import Store

log = logging.getLogger(__name__)

messages_t = Message.__table__
members_t = Membership.__table__
users_t = User.__table__

# Redis calls never wait longer than this: a stalled Redis must not stall a node.
REDIS_TIMEOUT = 2.0
# Events published at most per pipeline round trip.
PUBLISH_BATCH = 256
# Events kept while Redis is unreachable; past this the oldest go (the database repairs).
MAX_UNPUBLISHED = 100_000
# A node with neither its registration refreshed nor its subscription up for this share
# of cluster_node_ttl fences itself: before the registration lapses (at the whole ttl),
# when the other nodes' barriers stop waiting for it.
FENCE_AFTER = 0.6
# Rows one gap repair reads at most; a longer gap takes several.
FILL_PAGE = 500
# Other nodes' messages one conversation holds behind a gap at most; past it they are
# dropped (they are committed: the repair, or the reconcile, reads them in order).
MAX_HELD = 10_000


def room_conv(room: str) -> str:
    return "r:" + room


def user_conv(user_id: int) -> str:
    return f"u:{user_id}"


def lock_key(conv: str) -> int:
    """A conversation's advisory lock key (signed 64 bits); a collision only serialises
    two conversations that need not be."""
    return int.from_bytes(hashlib.blake2b(conv.encode(), digest_size=8).digest(), "big",
                          signed=True)


def lock_conversations(db: Connection, convs: Iterable[str]) -> None:
    """Take the conversations' locks until the transaction ends, in one order (sorted
    keys) on every node, so that two writers never wait for each other in a cycle."""
    keys = sorted({lock_key(c) for c in convs})
    if keys:
        db.execute(text("SELECT pg_advisory_xact_lock(k) FROM unnest(CAST(:keys AS bigint[])) "
                        "AS k"), {"keys": keys})


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
    ids = sorted(set(user_ids))
    if not ids:
        return {}
    rows = db.execute(text(
        "SELECT u, GREATEST("
        "(SELECT max(m.id) FROM messages m WHERE m.room IS NULL AND m.recipient_id = u), "
        "(SELECT max(m.id) FROM messages m WHERE m.room IS NULL AND m.sender_id = u)) "
        "FROM unnest(CAST(:ids AS integer[])) AS u"), {"ids": ids})
    return {u: (n or 0) for u, n in rows}


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


# --- ordered delivery (writer thread) ---------------------------------------------
Deliver = Callable[[], None]


@dataclass(slots=True)
class _Item:
    prev: int
    id: int
    deliver: Deliver


@dataclass(slots=True)
class _Conv:
    cursor: int
    held: dict[int, _Item] = field(default_factory=dict)  # by id
    order: list[int] = field(default_factory=list)  # a heap of held ids (some gone since)
    since: float = 0.0  # when the oldest held item began to wait
    filling: float = 0.0  # when a repair was asked for (0: none in flight)
    following: bool = True  # False: untracked while items waited; forgotten once they went


class Sequencer:
    """Per conversation: deliver each id once, in order, with the gaps filled."""

    def __init__(self, gap_wait: float, ask_fill: Callable[[str, int, int], None],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.gap_wait = gap_wait
        self._ask_fill = ask_fill
        self._clock = clock
        self.convs: dict[str, _Conv] = {}
        self.repairs = 0  # gaps read from the database (a metric)

    def track(self, conv: str, cursor: int) -> None:
        """The node's sessions are now in `conv`: its messages after `cursor` go out."""
        state = self.convs.get(conv)
        if state is None:
            self.convs[conv] = _Conv(cursor)
        else:
            state.following = True

    def untrack(self, conv: str) -> None:
        """No session here is in `conv` any more (kept while items wait: an origin's own
        copy must still reach it; forgotten once they went)."""
        state = self.convs.get(conv)
        if state is not None:
            state.following = False
            self._settle(conv, state)

    def _settle(self, conv: str, state: _Conv) -> None:
        if not state.following and not state.held:
            del self.convs[conv]

    def cursor(self, conv: str) -> int | None:
        state = self.convs.get(conv)
        return None if state is None else state.cursor

    def in_order(self, conv: str, prev: int) -> bool:
        """Would an item after `prev` go out at once (the common case: nothing waits)?"""
        state = self.convs.get(conv)
        return state is None or (not state.held and prev <= state.cursor)

    def advance(self, conv: str, last: int) -> None:
        """The caller delivered a run that `in_order` allowed, ending at `last`."""
        state = self.convs.get(conv)
        if state is not None and last > state.cursor:
            state.cursor = last

    def offer(self, conv: str, prev: int, msg_id: int, deliver: Deliver,
              local: bool = False) -> None:
        state = self.convs.get(conv)
        if state is None:
            if local:
                deliver()  # nobody here follows it; the sender's own copy still goes
            return
        if msg_id <= state.cursor or msg_id in state.held:
            return  # had it already
        if prev <= state.cursor:
            deliver()
            state.cursor = msg_id
            self._drain(state)
            self._settle(conv, state)
            return
        if not local and len(state.held) >= MAX_HELD:
            return  # read from the database with the rest (this node's own are kept)
        if not state.held:
            state.since = self._clock()
        state.held[msg_id] = _Item(prev, msg_id, deliver)
        heapq.heappush(state.order, msg_id)

    def _drain(self, state: _Conv) -> None:
        order = state.order
        while state.held:
            nxt = order[0]
            item = state.held.get(nxt)
            if item is None:  # delivered by a repair meanwhile
                heapq.heappop(order)
                continue
            if item.prev > state.cursor:
                return
            heapq.heappop(order)
            del state.held[nxt]
            if nxt > state.cursor:
                item.deliver()
                state.cursor = nxt
        order.clear()
        state.since = 0.0

    def filled(self, conv: str, after: int, upto: int,
               rows: list[tuple[int, Deliver]]) -> None:
        """A repair read everything of `conv` in (after, upto]: `rows` (id, delivery)."""
        state = self.convs.get(conv)
        if state is None:
            return
        state.filling = 0.0
        if after > state.cursor:
            return  # read from further on than we are: cannot vouch for what is between
        self.repairs += 1
        for msg_id, deliver in rows:
            if msg_id <= state.cursor:
                continue
            held = state.held.pop(msg_id, None)
            (held.deliver if held is not None else deliver)()
            state.cursor = msg_id
        state.cursor = max(state.cursor, upto)
        self._drain(state)
        if state.held:
            state.since = self._clock()
        self._settle(conv, state)

    def due(self) -> float | None:
        waits = [s.since for s in self.convs.values() if s.held and not s.filling]
        if not waits:
            return None
        return max(0.0, min(waits) + self.gap_wait - self._clock())

    def tick(self) -> None:
        now = self._clock()
        for conv, state in self.convs.items():
            if state.held and not state.filling and now >= state.since + self.gap_wait:
                state.filling = now
                upto = min(item.prev for item in state.held.values())
                self._ask_fill(conv, state.cursor, upto)

    def retry(self, conv: str) -> None:
        """A repair failed (the database): ask again at the next gap deadline."""
        state = self.convs.get(conv)
        if state is not None:
            state.filling = 0.0
            state.since = self._clock()


# --- the hub of one node in a cluster (writer thread) ------------------------------
@dataclass(frozen=True, slots=True)
class DirectChain:
    """Where a direct message sits in each side's stream of direct messages."""

    msg_id: int
    recipient_id: int
    prev_recipient: int
    sender_id: int
    prev_sender: int


@dataclass(slots=True)
class _Remote:
    name: str
    rooms: dict[str, set[str]] = field(default_factory=dict)  # node -> rooms


class ClusterHub(LocalHub):
    """`LocalHub` plus: every fan-out is also published, and what other nodes publish is
    applied here, on the writer thread, in order. Messages go through the `Sequencer`."""

    def __init__(self, node: str, presence_interval: float = 1.0,
                 presence_room_limit: int = 1000, gap_wait: float = 0.05,
                 reconcile_interval: float = 2.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(presence_interval, presence_room_limit, clock)
        self.node = node
        self.publish: Callable[[dict[str, Any]], None] = lambda event: None
        self.ask_fill: Callable[[str, int, int], None] = lambda conv, after, upto: None
        self.ask_reconcile: Callable[[dict[str, int]], None] = lambda cursors: None
        self.sync_then: Callable[[Callable[[], None]], None] = lambda then: then()
        self.store: Store | None = None
        self.reachable = True  # the bus is up (set by the Bus's thread; a plain flag)
        self.seq = Sequencer(gap_wait, lambda c, a, u: self.ask_fill(c, a, u), clock)
        self.reconcile_interval = reconcile_interval
        self._next_reconcile = clock() + reconcile_interval
        self._keys: dict[int, str] = {}  # user id -> key, of users with sessions here
        # room -> session -> the newest id of the room when the session's reading of it
        # began (its login, its user's join), where this node had not delivered that far:
        # what it still delivers up to there is not the session's (see _floor).
        self._floors: dict[str, dict[Session, int]] = {}
        self._remote: dict[str, _Remote] = {}  # users online on other nodes

    # --- timers ---------------------------------------------------------------------
    def due(self) -> float | None:
        waits = [w for w in (self.presence_due(), self.seq.due(),
                             max(0.0, self._next_reconcile - self._clock())) if w is not None]
        return min(waits)

    def tick(self) -> None:
        if self.presence_due() == 0.0:
            self.flush_presence()
        self.seq.tick()
        if self._clock() >= self._next_reconcile:
            self._next_reconcile = self._clock() + self.reconcile_interval
            self.ask_reconcile({c: s.cursor for c, s in self.seq.convs.items()})

    # --- sessions -------------------------------------------------------------------
    def attach(self, session: Session, rooms: list[str], first: list[bytes],
               cursors: dict[str, int] | None = None) -> bool:
        """As LocalHub's; `cursors` (read by the login) start the conversations this node
        does not follow yet: the session's rooms and its user's direct messages (those it
        follows already keep their own cursor)."""
        first_here = session.key not in self._users
        if not super().attach(session, rooms, first):
            return False
        self._keys[session.user_id] = session.key
        cursors = cursors or {}
        for room in rooms:
            # As for a join: a room's messages stored before the login (up to the newest
            # id it read of the room, no later than its `last_msg_id`) never reach the
            # session live on one node; here the node may still be delivering them.
            read = cursors.get(room_conv(room))
            if read is not None:
                self._floor([session], room, read)
        for conv, cursor in cursors.items():
            self.seq.track(conv, cursor)
        if first_here:
            self.publish({"t": "o", "k": session.key, "name": session.name, "on": True,
                          "rooms": sorted(rooms)})
        return True

    def detach(self, session: Session, *, quiet: bool = False) -> None:
        user = session.user
        was_here = user is not None and session in user.sessions
        rooms = set(session.rooms_in)
        super().detach(session, quiet=quiet)
        for room in rooms:
            self._drop_floors(room, [session])
        if not was_here or session.key in self._users:
            return
        self._keys.pop(session.user_id, None)
        self.seq.untrack(user_conv(session.user_id))
        for room in rooms:
            if room not in self._rooms:
                self.seq.untrack(room_conv(room))
        self.publish({"t": "o", "k": session.key, "name": session.name, "on": False})

    def is_online(self, key: str) -> bool:
        return super().is_online(key) or key in self._remote

    # --- membership -------------------------------------------------------------------
    def joined(self, user: UserState, room: str, newest: int | None = None) -> None:
        self._joined_here(user, room, newest)
        self._remote_member(user.key, room, True)
        self.publish({"t": "j", "k": user.key, "room": room, "n": newest, **_mine(user)})

    def _joined_here(self, user: UserState, room: str, newest: int | None,
                     since: int | None = None) -> None:
        """`newest`: the room's newest id when the join was decided, or read since, where
        this node starts following the room if it does not yet; `since`: where the join
        began the user's reading (`newest` if not told)."""
        super().joined(user, room)
        if room in self._rooms and newest is not None:
            self._floor(user.sessions, room, newest if since is None else since)
            self.seq.track(room_conv(room), newest)

    def _floor(self, sessions: list[Session], room: str, newest: int) -> None:
        """These sessions' reading of `room` begins after `newest`. On one node nothing
        stored before then reaches them; here the node may still have to deliver some of
        it to the room's other sessions (a gap, a Pub/Sub slower than the database), and
        in a `joined` room it is not theirs to read. Nothing is kept where the node is
        past `newest` already, or starts following the room there."""
        cursor = self.seq.cursor(room_conv(room))
        if cursor is None or cursor >= newest:
            return
        floors = self._floors.setdefault(room, {})
        for session in sessions:
            if floors.get(session, 0) < newest:
                floors[session] = newest

    def _drop_floors(self, room: str, sessions: list[Session]) -> None:
        floors = self._floors.get(room)
        if floors is not None:
            for session in sessions:
                floors.pop(session, None)
            if not floors:
                del self._floors[room]

    def left(self, user: UserState, room: str) -> None:
        self._left_here(user, room)
        self._remote_member(user.key, room, False)
        self.publish({"t": "l", "k": user.key, "room": room, **_mine(user)})

    def _left_here(self, user: UserState, room: str, mark: bool = True) -> None:
        LocalHub.left(self, user, room, mark=mark)
        self._drop_floors(room, user.sessions)
        if room not in self._rooms:
            self.seq.untrack(room_conv(room))

    def removed(self, user: UserState, room: str, data: bytes) -> None:
        for session in user.sessions:
            if room in session.rooms_in:
                session.out.deliver(data)
        self._left_here(user, room)
        self._remote_member(user.key, room, False)
        self.publish({"t": "x", "k": user.key, "room": room, "f": data.decode(), **_mine(user)})

    def removed_offline(self, key: str, room: str, data: bytes) -> None:
        """A kick or ban of a user with no session here: other nodes may have some. They
        apply it without presence (the origin tells): with no session here to mark, the
        change is marked from the replica, and told at this node's next flush."""
        remote = self._remote.get(key)
        if remote is not None and any(room in rooms for rooms in remote.rooms.values()):
            self._pending.setdefault(room, {}).setdefault(key, _Change(remote.name, True, ROOM))
        self._remote_member(key, room, False)
        self.publish({"t": "x", "k": key, "room": room, "f": data.decode()})

    def _remote_member(self, key: str, room: str, member: bool) -> None:
        """The user's membership changed: so it did for its sessions on every node (the
        replica keeps their rooms per node, all the same rooms: the user's)."""
        remote = self._remote.get(key)
        if remote is not None:
            for rooms in remote.rooms.values():
                (rooms.add if member else rooms.discard)(room)
            self._who.pop(room, None)

    def publish_room(self, room: str, data: bytes) -> None:
        super().publish_room(room, data)
        self.publish({"t": "p", "room": room, "f": data.decode()})

    def announce(self, room: str, roles: dict[int, str], encoded: dict[str, bytes]) -> None:
        super().announce(room, roles, encoded)
        self.publish({"t": "a", "room": room, "roles": {str(k): v for k, v in roles.items()},
                      "f": {k: v.decode() for k, v in encoded.items()}})

    def tell(self, key: str, data: bytes, device: str | None = None) -> None:
        super().tell(key, data, device)
        self.publish({"t": "u", "k": key, "f": data.decode(), "d": device})

    def end_sessions(self, key: str, reason: str, keep: Session | None = None) -> None:
        super().end_sessions(key, reason, keep)
        self.publish({"t": "e", "k": key, "reason": reason})

    def ending(self, key: str) -> None:
        super().ending(key)

    def devices_changed(self, key: str, rooms: list[str], data: bytes) -> None:
        super().devices_changed(key, rooms, data)
        self.publish({"t": "dv", "k": key, "rooms": rooms, "f": data.decode()})

    def device_removed(self, key: str, device: str) -> None:
        self.publish({"t": "dr", "k": key, "d": device})

    def _unbind(self, key: str, device: str) -> None:
        """Another node's operator removed the device: its sessions here send nothing
        more as it (chat.admin_actions.device_remove does the same on its node)."""
        for session in self.sessions_of(key):
            if session.device == device:
                session.device = session.device_curve = None
                session.to_device_sent, session.to_device_live = 0, False

    def to_device_queued(self, key: str, device: str) -> None:
        self._pull(key, device)
        self.publish({"t": "td", "k": key, "d": device})

    def pull_every_device(self) -> None:
        """After a reconnect: every device session here that follows its queue live reads
        what it has not had (a `td` saying so may have gone by while unsubscribed)."""
        from chat.todevice import pull

        for user in list(self._users.values()):
            for session in user.sessions:
                if session.device is not None and session.to_device_live:
                    pull(self.store, session)

    def _pull(self, key: str, device: str) -> None:
        """The device's live sessions here read what they have not had of its queue, in
        seq order, from their own place in it (chat.todevice.pull)."""
        from chat.todevice import pull

        for session in self.sessions_of(key):
            if session.device == device and session.to_device_live:
                pull(self.store, session)

    def sync(self, then: Callable[[], None]) -> None:
        """Call `then` (any thread) once every other node applied what was published."""
        self.sync_then(then)

    # --- messages -------------------------------------------------------------------
    def publish_room_many(self, room: str, items: list[tuple[bytes, Session, bytes]],
                          chain: list[tuple[int, int]] | None = None) -> None:
        if chain is None:
            super().publish_room_many(room, items)
            return
        self.publish({"t": "m", "room": room,
                      "items": [[p, i, d.decode()] for (p, i), (d, _o, _e) in zip(
                          chain, items, strict=True)]})
        conv = room_conv(room)
        if self.seq.in_order(conv, chain[0][0]):
            self._room_deliver(room, items, [msg_id for _prev, msg_id in chain])
            self.seq.advance(conv, chain[-1][1])
            return
        for (prev, msg_id), item in zip(chain, items, strict=True):
            self.seq.offer(conv, prev, msg_id, lambda item=item, msg_id=msg_id:
                           self._room_deliver(room, [item], [msg_id]), local=True)

    def _room_deliver(self, room: str, items: list[tuple[bytes, Session | None, bytes]],
                      ids: list[int]) -> None:
        """Messages of `room` (`ids` theirs, in order) to its sessions here."""
        floors = self._floors.get(room)
        if floors is None:  # as good as always: no session entered it while the node lagged
            super().publish_room_many(room, items)  # type: ignore[arg-type]
        else:
            self._deliver_above_floors(room, items, ids, floors)
        members = self._rooms.get(room, ())
        for _data, origin, echo in items:
            # A sender the database let in whose join this node has not applied yet
            # (made on another node a moment ago) still gets its own copy.
            if origin is not None and origin not in members:
                origin.out.deliver(echo)

    def _deliver_above_floors(self, room: str,
                              items: list[tuple[bytes, Session | None, bytes]],
                              ids: list[int], floors: dict[Session, int]) -> None:
        """As LocalHub.publish_room_many, but a session with a floor gets only what is
        above it. This node delivers the room in id order: a floor this run reaches is
        done with, so each costs this slower path until the node caught up."""
        blob = b"".join(data for data, _origin, _echo in items)
        origins = {origin for _data, origin, _echo in items}
        for session in self._rooms.get(room, ()):
            floor = floors.get(session)
            if floor is None or floor < ids[0]:
                mine = items
            else:
                mine = [item for item, msg_id in zip(items, ids, strict=True)
                        if msg_id > floor]
                if not mine:
                    continue
            if mine is items and session not in origins:
                session.out.deliver(blob)
            else:
                session.out.deliver(b"".join(echo if origin is session else data
                                             for data, origin, echo in mine))
        last = ids[-1]
        for session in [s for s, floor in floors.items() if floor <= last]:
            del floors[session]
        if not floors:
            del self._floors[room]

    def publish_direct(self, to: str, sender: str, data: bytes, origin: Session | None,
                       echo: bytes, chain: DirectChain | None = None) -> bool:
        if chain is None:
            return super().publish_direct(to, sender, data, origin, echo)
        c = chain
        self.publish({"t": "d", "f": data.decode(), "to": to, "from": sender,
                      "c": [c.msg_id, c.recipient_id, c.prev_recipient, c.sender_id,
                            c.prev_sender]})
        self._direct(to, sender, data, origin, echo, c, local=True)
        return False  # stored undelivered: each node that hands it over marks it

    def _direct(self, to: str, sender: str, data: bytes, origin: Session | None,
                echo: bytes, c: DirectChain, local: bool) -> None:
        self.seq.offer(user_conv(c.recipient_id), c.prev_recipient, c.msg_id,
                       lambda: self._dm_deliver(to, data, origin, echo, c.msg_id, True), local)
        if c.sender_id != c.recipient_id:
            self.seq.offer(user_conv(c.sender_id), c.prev_sender, c.msg_id,
                           lambda: self._dm_deliver(sender, data, origin, echo, c.msg_id,
                                                    False), local)

    def _dm_deliver(self, key: str, data: bytes, origin: Session | None, echo: bytes,
                    msg_id: int, recipient: bool) -> None:
        user = self._users.get(key)
        took = False
        for session in user.sessions if user is not None else ():
            if session.dm_floor >= msg_id:
                continue  # had it in its login's backlog
            took = session.out.deliver(echo if session is origin else data) or took
        if origin is not None and origin.key == key and (user is None
                                                         or origin not in user.sessions):
            origin.out.deliver(echo)
        if took and recipient and self.store is not None:
            self.store.correct_marks([msg_id], True)

    # --- repairs (the filler's results, on the writer thread) ---------------------------
    def filled(self, conv: str, after: int, upto: int, rows: list[Any]) -> None:
        if conv.startswith("r:"):
            room = conv[2:]
            deliveries = [(r.id, lambda r=r: self._room_deliver(
                room, [(encode(_frame(r)), None, b"")], [r.id])) for r in rows]
        else:
            uid = int(conv[2:])
            key = self._keys.get(uid)
            deliveries = []
            if key is not None:
                for r in rows:
                    deliveries.append((r.id, lambda r=r: self._dm_deliver(
                        key, encode(_frame(r)), None, b"", r.id, r.recipient_id == uid)))
        self.seq.filled(conv, after, upto, deliveries)

    # --- what other nodes published ----------------------------------------------------
    def apply(self, node: str, event: dict[str, Any],
              members: set[tuple[str, str]] | None = None) -> None:
        """Another node's event. `members`: the (user key, room) pairs of the membership
        events among it that the database held when they were applied (Bus.decide)."""
        kind = event["t"]
        if kind == "m":
            room = event["room"]
            conv = room_conv(room)
            for prev, msg_id, f in event["items"]:
                data = f.encode()
                self.seq.offer(conv, prev, msg_id, lambda data=data, msg_id=msg_id:
                               self._room_deliver(room, [(data, None, b"")], [msg_id]))
        elif kind == "d":
            c = DirectChain(*event["c"])
            self._direct(event["to"], event["from"], event["f"].encode(), None, b"", c, False)
        elif kind in ("j", "l", "x"):
            self._apply_membership(node, event, members)
        elif kind == "p":
            super().publish_room(event["room"], event["f"].encode())
        elif kind == "a":
            super().announce(event["room"], {int(k): v for k, v in event["roles"].items()},
                             {k: v.encode() for k, v in event["f"].items()})
        elif kind == "u":
            super().tell(event["k"], event["f"].encode(), event.get("d"))
        elif kind == "e":
            super().ending(event["k"])
            super().end_sessions(event["k"], event["reason"])
        elif kind == "dv":
            super().devices_changed(event["k"], event["rooms"], event["f"].encode())
        elif kind == "pr":
            self._apply_presence(event["c"])
        elif kind == "o":
            self._apply_online(node, event)
        elif kind == "td":
            self._pull(event["k"], event["d"])
        elif kind == "dr":
            self._unbind(event["k"], event["d"])

    def _apply_membership(self, node: str, event: dict[str, Any],
                          members: set[tuple[str, str]] | None = None) -> None:
        """A join, leave or removal decided on another node. Events of different nodes
        reach this one in no particular order (a kick on one node may come before the
        join it undid, made on another a moment earlier): where the database, read when
        the event was applied, says otherwise, it is right, and the event changes nothing
        here (the event of whatever made the difference comes, or came, too)."""
        key, room, kind = event["k"], event["room"], event["t"]
        member = kind == "j" if members is None else (key, room) in members
        self._remote_member(key, room, member)
        if member != (kind == "j"):
            return
        user = self._users.get(key)
        if user is None:
            return
        if kind == "j":
            user.rooms.add(room)
            self._joined_here(user, room, event.get("n"))
            self._pending.get(room, {}).pop(key, None)  # the origin tells presence
        else:
            user.rooms.discard(room)
            if kind == "x":
                for session in user.sessions:
                    if room in session.rooms_in:
                        session.out.deliver(event["f"].encode())
            self._left_here(user, room, mark=False)
        if node != self.node:
            # Our user's rooms changed elsewhere: our Redis hash and the others' replica.
            self.publish({"t": "o", "k": key, "name": user.name, "on": True,
                          "rooms": sorted(user.rooms)})

    def _apply_online(self, node: str, event: dict[str, Any]) -> None:
        key = event["k"]
        if event["on"]:
            remote = self._remote.setdefault(key, _Remote(event["name"]))
            before = remote.rooms.get(node, set())
            remote.rooms[node] = set(event.get("rooms", ()))
            for room in before | remote.rooms[node]:  # left ones too
                self._who.pop(room, None)
        else:
            remote = self._remote.get(key)
            if remote is not None:
                for room in remote.rooms.pop(node, set()):
                    self._who.pop(room, None)
                if not remote.rooms:
                    del self._remote[key]

    def node_gone(self, node: str) -> None:
        """A node's heartbeat lapsed: its users are offline unless online elsewhere."""
        frames: dict[str, list[bytes]] = {}
        for key, remote in list(self._remote.items()):
            rooms = remote.rooms.pop(node, None)
            if rooms is None:
                continue
            if not remote.rooms:
                del self._remote[key]
                if key not in self._users:
                    for room in rooms:
                        if len(self._rooms.get(room, ())) <= self.presence_room_limit:
                            frames.setdefault(room, []).append(encode(
                                {"type": "presence", "room": room, "username": remote.name,
                                 "event": "leave", "cause": CONNECTION}))
            for room in rooms:
                self._who.pop(room, None)
        for room, datas in frames.items():
            blob = b"".join(datas)
            for session in self._rooms.get(room, ()):
                session.out.deliver(blob)

    def reset_remote(self, snapshot: dict[str, dict[str, tuple[str, list[str]]]]) -> None:
        """Who is online on the other nodes, as their Redis hashes say (start, reconnect)."""
        self._remote.clear()
        for node, users in snapshot.items():
            if node == self.node:
                continue
            for key, (name, rooms) in users.items():
                self._remote.setdefault(key, _Remote(name)).rooms[node] = set(rooms)
        self._who.clear()

    def online_here(self) -> dict[str, tuple[str, list[str]]]:
        """This node's users and their rooms, for its Redis hash."""
        return {key: (u.name, sorted(u.rooms)) for key, u in self._users.items()}

    def reconcile_rooms(self, truth: dict[str, dict[str, int]], newest: dict[str, int]
                        ) -> None:
        """After Redis came back: the rooms of this node's users as the database says
        (user key -> room -> the membership's since_msg_id, where its join began the
        user's reading); membership events lost meanwhile are applied now (without
        presence). A room this node did not follow is followed from `newest` (its newest
        id when the rooms were read: anything later that went by meanwhile is a gap,
        filled); in one it follows, the joiner's sessions get nothing up to the join. A
        user whose rooms changed is published online again with them: this node's Redis
        hash and the other nodes' replica had the ones it republished after the
        reconnect, before this."""
        for key, joins in truth.items():
            user = self._users.get(key)
            if user is None or user.ended:
                continue
            rooms = set(joins)
            if rooms != user.rooms:
                self.publish({"t": "o", "k": key, "name": user.name, "on": True,
                              "rooms": sorted(rooms)})
            for room in rooms - user.rooms:
                user.rooms.add(room)
                self._joined_here(user, room, newest.get(room, 0), joins[room])
                self._pending.get(room, {}).pop(key, None)
            for room in user.rooms - rooms:
                user.rooms.discard(room)
                self._left_here(user, room, mark=False)

    # --- presence ---------------------------------------------------------------------
    def flush_presence(self) -> None:
        changes = self._presence_changes()
        kept = [c for c in changes if c[2] != CONNECTION or c[1] not in self._remote]
        self._deliver_presence(kept)
        if kept:
            self.publish({"t": "pr", "c": [[room, key, cause, there, data.decode()]
                                           for room, key, cause, there, data in kept]})

    def _apply_presence(self, changes: list[list[Any]]) -> None:
        mine = []
        for room, key, cause, there, data in changes:
            if cause == CONNECTION and key in self._users:
                continue  # online here: coming or going elsewhere is no news
            mine.append((room, key, cause, there, data.encode()))
        self._deliver_presence(mine)

    def who(self, room: str) -> list[str]:
        users = self._who.get(room)
        if users is None:
            names = {s.key: s.name for s in self._rooms.get(room, ())}
            for key, remote in self._remote.items():
                if any(room in rooms for rooms in remote.rooms.values()):
                    names.setdefault(key, remote.name)
            users = self._who[room] = [names[k] for k in sorted(names)]
        return users


def _mine(user: UserState) -> dict[str, Any]:
    """A local user's name and rooms, for this node's Redis hash of who is online here
    (nothing for a user no longer online here: the hash would list it for good)."""
    if not user.sessions:
        return {}
    return {"name": user.name, "rooms": sorted(user.rooms)}


def _frame(row: Any) -> dict[str, Any]:
    from chat.store import message_frame

    return message_frame(row)


# --- the database reader of repairs (its own thread) -----------------------------------
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
                else:
                    self._rooms(task[1])
            except Exception:
                log.exception("cluster: a repair read failed; it is tried again")
                self.metrics.db_errors.inc()
                if task[0] == "fill":
                    self._submit(lambda conv=task[1]: self.hub.seq.retry(conv))

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
            newest = newest_in_rooms(db, {r for joins in truth.values() for r in joins})
            disabled = set(db.execute(
                select(users_t.c.username_key).where(
                    users_t.c.username_key.in_(bindparam("keys", expanding=True)),
                    users_t.c.disabled_ms.is_not(None)), {"keys": keys}).scalars())

        def apply() -> None:
            self.hub.reconcile_rooms({k: v for k, v in truth.items() if k not in disabled},
                                     newest)
            for key in disabled:
                LocalHub.ending(self.hub, key)
                LocalHub.end_sessions(self.hub, key, "account_disabled")

        self._submit(apply)


# --- Redis ------------------------------------------------------------------------------
class Bus:
    """The node's Redis side: a publisher, a subscriber and a heartbeat, each a thread
    with its own connection, so that none waits behind another."""

    def __init__(self, url: str, prefix: str, hub: ClusterHub, store: Store, filler: Filler,
                 ttl: float, metrics: Any, on_fence: Callable[[bool], None],
                 writer_queue_limit: int = 10_000) -> None:
        import redis

        self._redis = redis
        self.url = url
        self.prefix = prefix
        self.hub = hub
        self.node = hub.node
        self.store = store
        self.filler = filler
        self.ttl = ttl
        self.metrics = metrics
        self.on_fence = on_fence
        # Past this many jobs waiting for the writer, the subscriber reads no more: what
        # comes waits in Redis (bounded there by its pubsub output buffer limit, past
        # which it drops the subscription, and the reconnect repairs from the database).
        self.writer_queue_limit = writer_queue_limit
        self.channel = f"{prefix}:events"
        self.node_channel = f"{prefix}:node:{self.node}"
        self._out: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._syncs: dict[str, _Sync] = {}
        self._syncs_lock = threading.Lock()
        self.connected = threading.Event()  # the subscriber is subscribed
        self.fenced = False
        self._last_good = time.monotonic()  # registered and subscribed, last seen so
        self._last_beat = 0.0  # the heartbeat's last look at the live nodes
        self._threads = [threading.Thread(target=fn, name=f"cluster-{name}", daemon=True)
                         for name, fn in (("publish", self._publisher),
                                          ("subscribe", self._subscriber),
                                          ("heartbeat", self._heartbeat),
                                          ("watchdog", self._watchdog))]
        self._sub_client: Any = None

    def _client(self) -> Any:
        return self._redis.Redis.from_url(
            self.url, socket_timeout=REDIS_TIMEOUT, socket_connect_timeout=REDIS_TIMEOUT,
            health_check_interval=0)

    # --- lifecycle --------------------------------------------------------------------
    def start(self, wait: float) -> bool:
        """Start the threads; True once subscribed (within `wait` seconds) and registered.

        Registered here, not at the heartbeat's first beat (a third of the ttl later):
        from now on the node may serve sessions, and every barrier must wait for it."""
        for thread in self._threads:
            thread.start()
        if not self.connected.wait(wait):
            return False
        try:
            client = self._client()
            try:
                self._register(client.pipeline(transaction=False)).execute()
            finally:
                client.close()
        except self._redis.RedisError:
            return False
        return True

    def stop(self) -> None:
        self._stop.set()
        self._out.put(None)
        client = self._sub_client
        if client is not None:
            try:
                client.close()  # wakes the subscriber
            except Exception:
                log.debug("cluster: closing the subscription failed", exc_info=True)
        for thread in self._threads:
            thread.join(timeout=REDIS_TIMEOUT * 2)
        try:
            # Gone at once, rather than after the ttl: others stop waiting for us.
            c = self._client()
            c.delete(self._node_key(), self._online_key())
            c.srem(self._nodes_key(), self.node)
            c.close()
        except Exception:
            log.warning("cluster: could not remove this node's keys from Redis; they "
                        "lapse after cluster_node_ttl")

    def _node_key(self) -> str:
        return f"{self.prefix}:nodes:{self.node}"

    def _nodes_key(self) -> str:
        """The set of the nodes' ids (each alive while its own key is): what is scanned
        for live nodes, instead of the whole keyspace (the throttles' keys included)."""
        return f"{self.prefix}:nodes"

    def _register(self, pipe: Any) -> Any:
        """Queue the registration; its first result says whether the node was still
        registered (0: its registration had lapsed, or was evicted)."""
        pipe.exists(self._node_key())
        pipe.set(self._node_key(), str(time.time()), px=int(self.ttl * 1000))
        pipe.sadd(self._nodes_key(), self.node)
        return pipe

    def _online_key(self, node: str | None = None) -> str:
        return f"{self.prefix}:online:{node or self.node}"

    # --- publishing (any thread queues; one thread sends, in order) -------------------
    def publish(self, event: dict[str, Any]) -> None:
        # The queue's own size bounds it (a count kept by this thread and the publisher's,
        # unlocked, lost updates and drifted).
        if self._out.qsize() >= MAX_UNPUBLISHED:
            self.metrics.redis_errors.inc()
            return  # the newest is dropped; the database repairs messages, a reconnect rooms
        self._out.put(("event", time.monotonic(),
                       json.dumps(event, separators=(",", ":")).encode()))

    def sync(self, then: Callable[[], None]) -> None:
        sid = uuid.uuid4().hex[:16]
        with self._syncs_lock:
            self._syncs[sid] = _Sync(then, time.monotonic() + 2 * self.ttl)
        self._out.put(("sync", sid))

    def _publisher(self) -> None:
        client = None
        pending: list[Any] = []
        while not self._stop.is_set():
            if not pending:
                item = self._out.get()
                if item is None:
                    return
                pending.append(item)
                while len(pending) < PUBLISH_BATCH:
                    try:
                        nxt = self._out.get_nowait()
                    except queue.Empty:
                        break
                    if nxt is None:
                        self._stop.set()
                        break
                    pending.append(nxt)
            try:
                if client is None:
                    client = self._client()
                # An event older than the node ttl is no news by now: every node that
                # missed it either fenced itself (and its sessions are gone) or repairs
                # from the database. Applied late, an ended-sessions event would end
                # sessions made since.
                stale = time.monotonic() - self.ttl
                self._send(client, [p for p in pending if p[0] != "event" or p[1] >= stale])
                pending = []
            except self._redis.RedisError:
                self.metrics.redis_errors.inc()
                client = None
                # Kept, in order, for when Redis is back; meanwhile nobody waits on us.
                self._stop.wait(0.2)

    def _send(self, client: Any, items: list[Any]) -> None:
        pipe = client.pipeline(transaction=False)
        syncs = []
        me = self.node.encode() + b" "
        for item in items:
            if item[0] == "event":
                pipe.publish(self.channel, me + item[2])
                self._mirror(pipe, item[2])
            elif item[0] == "sync":
                syncs.append(item[1])
                pipe.publish(self.channel, me + json.dumps(
                    {"t": "s", "id": item[1], "from": self.node}).encode())
            else:  # ("ack", barrier id, its node)
                pipe.publish(f"{self.prefix}:node:{item[2]}",
                             me + json.dumps({"t": "k", "id": item[1]}).encode())
        if syncs:
            # In the same round trip, after the barriers went out: the nodes live then.
            # (Asked apart, a failure of that call sent the whole batch again.)
            self._ask_live_nodes(pipe)
        results = pipe.execute()
        if syncs:
            nodes = {n.decode() for n in results[-1]} - {self.node}
            with self._syncs_lock:
                for sid in syncs:
                    sync = self._syncs.get(sid)
                    if sync is not None:
                        sync.waiting = nodes - sync.acked
                        sync.published = True
            self._finish_syncs()

    def _mirror(self, pipe: Any, item: bytes) -> None:
        """This node's online users and their rooms in its Redis hash, for nodes that
        start (or reconnect) later: kept by the events that change them."""
        if item[:8] not in (b'{"t":"o"', b'{"t":"j"', b'{"t":"l"', b'{"t":"x"'):
            return
        event = json.loads(item)
        if event["t"] == "o" and not event["on"]:
            pipe.hdel(self._online_key(), event["k"])
        elif "rooms" in event:
            pipe.hset(self._online_key(), event["k"], json.dumps([event["name"],
                                                                   event["rooms"]]))
            # The HSET may have made the hash again: it lapses with the node all the same.
            pipe.pexpire(self._online_key(), int(self.ttl * 1000))

    def _live_nodes(self, client: Any) -> set[str]:
        """The nodes whose registration has not lapsed (one round trip; the lapsed are
        taken out of the set, atomically, so that one registering again stays in)."""
        return {n.decode() for n in self._ask_live_nodes(client)}

    def _ask_live_nodes(self, client: Any) -> Any:
        """The live nodes' ids, as bytes (on a pipeline: queued, in its results)."""
        return client.eval(_LIVE_NODES, 1, self._nodes_key(), f"{self.prefix}:nodes:")

    # --- acknowledgements ---------------------------------------------------------------
    def _acked(self, sid: str, node: str) -> None:
        with self._syncs_lock:
            sync = self._syncs.get(sid)
            if sync is not None:
                sync.acked.add(node)
                sync.waiting.discard(node)
        self._finish_syncs()

    def _finish_syncs(self, live: set[str] | None = None, now: float | None = None) -> None:
        done = []
        with self._syncs_lock:
            for sid, sync in list(self._syncs.items()):
                if live is not None:
                    sync.waiting &= live
                late = now is not None and now > sync.deadline
                if (sync.published and not sync.waiting) or late:
                    if late:
                        log.warning("cluster: no acknowledgement from %s; going on",
                                    ", ".join(sorted(sync.waiting)) or "Redis")
                    done.append(sync.then)
                    del self._syncs[sid]
        for then in done:
            try:
                then()
            except Exception:
                log.exception("cluster: a continuation after a barrier failed")

    def ack(self, sid: str, node: str) -> None:
        """Writer thread (applying a barrier): tell its node we got this far."""
        self._out.put(("ack", sid, node))

    # --- subscribing ------------------------------------------------------------------
    def _subscriber(self) -> None:
        backoff = 0.1
        first = True
        while not self._stop.is_set():
            try:
                # PINGs on the idle subscription: a connection that died silently
                # (synapse#9010) is noticed within a third of the node ttl.
                client = self._sub_client = self._redis.Redis.from_url(
                    self.url, socket_timeout=REDIS_TIMEOUT,
                    socket_connect_timeout=REDIS_TIMEOUT,
                    health_check_interval=max(1, int(self.ttl / 3)))
                pubsub = client.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(self.channel, self.node_channel)
                # Subscribed first, then what was missed is read from the database:
                # nothing published from now on can fall between the two.
                self._reconnected(client, first)
                first = False
                # In this order (and the reverse below): whoever sees `connected` sees
                # `reachable` agree.
                self.hub.reachable = True
                self.connected.set()
                backoff = 0.1
                self._listen(pubsub)
            except Exception as exc:
                if self._stop.is_set():
                    return
                if not isinstance(exc, self._redis.RedisError | OSError):
                    log.exception("cluster: subscriber failed")
                self.metrics.redis_errors.inc()
                if self.connected.is_set():
                    log.warning("cluster: lost Redis (%s); reconnecting", exc)
                self.hub.reachable = False
                self.connected.clear()
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 2.0)

    def _reconnected(self, client: Any, first: bool) -> None:
        snapshot: dict[str, dict[str, tuple[str, list[str]]]] = {}
        for node in self._live_nodes(client):
            users = client.hgetall(self._online_key(node))
            snapshot[node] = {k.decode(): tuple(json.loads(v)) for k, v in users.items()}

        def apply() -> None:
            self.hub.reset_remote(snapshot)
            self.hub.ask_reconcile({c: s.cursor for c, s in self.hub.seq.convs.items()})
            if not first:
                self.filler.rooms(list(self.hub.online_here()))
                self._republish_online()
                self.hub.pull_every_device()  # a `td` may have been lost meanwhile

        self.filler._submit(apply)

    def _republish_online(self) -> None:
        """Writer thread: our hash may have been lost with Redis' memory."""
        for key, (name, rooms) in self.hub.online_here().items():
            self.publish({"t": "o", "k": key, "name": name, "on": True, "rooms": rooms})

    def _listen(self, pubsub: Any) -> None:
        from chat.store import Job

        while not self._stop.is_set():
            if self.store.backlog > self.writer_queue_limit:
                self._stop.wait(0.01)  # the writer is behind: not in this process's memory
                continue
            msg = pubsub.get_message(timeout=1.0)
            if msg is None:
                continue
            batch = [msg]
            while len(batch) < PUBLISH_BATCH:
                more = pubsub.get_message(timeout=0)
                if more is None:
                    break
                batch.append(more)
            events = []
            for m in batch:
                if m.get("type") != "message":
                    continue
                try:
                    node, _, body = m["data"].partition(b" ")
                    node_s = node.decode()
                    if node_s == self.node:
                        continue
                    event = json.loads(body)
                    if not isinstance(event, dict) or not isinstance(event.get("t"), str):
                        raise ValueError("not an event")
                    if event["t"] == "k":
                        self._acked(str(event["id"]), node_s)
                        continue
                except (ValueError, KeyError, TypeError, RecursionError) as exc:
                    # Not one of ours (another version, another program on the channel):
                    # skipped, not the rest of the batch with it.
                    log.warning("cluster: skipped a malformed event on %s (%s)",
                                self.channel, type(exc).__name__)
                    continue
                events.append((node_s, event))
            if events:
                self.store.submit(Job(lambda db, events=events: self.decide(db, events),
                                      lambda exc, events=events: self._not_decided(events)))

    def _not_decided(self, events: list[tuple[str, dict[str, Any]]]) -> None:
        """The batch that was to apply these failed (the database): they happened all
        the same, on other nodes, and are applied as they say. Not at a shutdown's
        refusal (from this thread; the writer has stopped)."""
        if self.store.on_writer_thread():
            self._apply(events)

    def decide(self, db: Connection, events: list[tuple[str, dict[str, Any]]]
               ) -> Callable[[], None]:
        """Writer thread, in its batch: the memberships the events' joins, leaves and
        removals are about, as the database holds them now (after every one of those
        events was committed), for `_apply`."""
        pairs = set()
        for _node, event in events:
            if event.get("t") in ("j", "l", "x"):
                pairs.add((str(event.get("k")), str(event.get("room"))))
        members = memberships(db, pairs) if pairs else set()
        return lambda: self._apply(events, members)

    def _apply(self, events: list[tuple[str, dict[str, Any]]],
               members: set[tuple[str, str]] | None = None) -> None:
        """Writer thread."""
        for node, event in events:
            try:
                if event["t"] == "s":
                    self._out.put(("ack", event["id"], event["from"]))
                else:
                    self.hub.apply(node, event, members)
            except Exception:
                log.exception("cluster: could not apply an event from %s", node)

    # --- heartbeat and fence ---------------------------------------------------------------
    def _heartbeat(self) -> None:
        """Refreshes this node's registration while it is subscribed, notices nodes that
        lapsed, and lets barriers go on when the nodes they wait for have."""
        client = None
        known: set[str] = set()
        interval = self.ttl / 3
        first = True
        # The first beat at once: a node's sessions must not begin before the others
        # count it among the nodes a barrier waits for.
        while first or not self._stop.wait(min(interval, 0.2) if self._syncs else interval):
            first = False
            now = time.monotonic()
            try:
                if client is None:
                    client = self._client()
                if self.connected.is_set():
                    # Only while subscribed: a node that hears nothing must lapse, so
                    # that barriers stop waiting for it (it fences itself first).
                    pipe = self._register(client.pipeline(transaction=False))
                    pipe.pexpire(self._online_key(), int(self.ttl * 1000))
                    if not pipe.execute()[0]:
                        # Our registration had lapsed (a late beat) or was evicted, and
                        # our online hash with it: the others took this node for gone
                        # and forgot its users. Who is online here is told again.
                        log.warning("cluster: this node's registration had lapsed; "
                                    "telling the others who is online here again")
                        self.filler._submit(self._republish_online)
                    self._last_good = now
                live = self._live_nodes(client)
                self._last_beat = now
            except self._redis.RedisError:
                self.metrics.redis_errors.inc()
                client = None
                self._finish_syncs(now=now)
                continue
            gone = known - live - {self.node}
            known = live
            for node in gone:
                self.filler._submit(lambda node=node: self.hub.node_gone(node))
            self._finish_syncs(live=live, now=now)

    def _watchdog(self) -> None:
        """Fences the node when it has been neither registered nor subscribed for
        FENCE_AFTER of the node ttl, and lifts the fence when it is both again. Its own
        thread, never waiting on Redis: the heartbeat may be stuck in a call for
        REDIS_TIMEOUT, and the fence must come before the registration lapses (a barrier
        elsewhere then stops waiting for this node, whose sessions must be gone by then)."""
        while not self._stop.wait(self.ttl / 20):
            quiet = time.monotonic() - self._last_good
            if not self.fenced and quiet > FENCE_AFTER * self.ttl:
                self.fenced = True
                log.error("cluster: cut off from the other nodes for %.1f s (Redis): closing "
                          "every session until they can be reached", quiet)
                self.on_fence(True)
            elif self.fenced and quiet < self.ttl / 2 and self.connected.is_set():
                self.fenced = False
                log.warning("cluster: Redis is back; serving again")
                self.on_fence(False)


# KEYS[1]: the set of node ids; ARGV[1]: the prefix of their keys.
_LIVE_NODES = """
local live = {}
for _, node in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if redis.call('EXISTS', ARGV[1] .. node) == 1 then
    table.insert(live, node)
  else
    redis.call('SREM', KEYS[1], node)
  end
end
return live
"""


@dataclass(slots=True)
class _Sync:
    then: Callable[[], None]
    deadline: float
    waiting: set[str] = field(default_factory=set)
    acked: set[str] = field(default_factory=set)
    published: bool = False

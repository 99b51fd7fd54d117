"""Several nodes on one PostgreSQL database and one Redis: order, fan-out, repair, presence.

Theory of operation
-------------------
Each node is a whole server (its own writer, hub, connections). What they share:

* **PostgreSQL is the truth.** A message is committed before any node shows it. Inside
  its writer's transaction a node takes the conversation's lock first (an advisory
  transaction lock on `r:<room>`, or on `u:<user id>` for each side of a direct message;
  see `locked_reads`), reads the conversation's newest id (`prev`), and inserts.
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

* **A session gets everything of a room from when it entered**, as on one node. Events of
  different nodes keep no order between them, so a node may apply a join (its `j`, or
  the reconcile after a reconnect) after it delivered messages stored after the join to
  the room's other sessions. The joiner's sessions here new to the room then *catch up*:
  they get nothing of the room live (a floor above every id) while the filler reads
  what lies between the join and the node's cursor, a page at a time, and the writer
  hands it to them, their own sends' replies in place; once a read reaches the node's
  cursor they take the room live. A leave or close drops them from it (the replies to
  their sends still go out); a failed read is asked again after `cluster_gap_wait`.

* **Changes other nodes must apply before the actor hears `ok`** (a kick, a ban, a
  disable or logout) are followed by a `sync` barrier: every live node answers it on
  the actor's node channel after its writer has applied everything published before it
  (one Redis connection keeps the order). The `ok` waits for every node registered at
  that moment, or until a silent node's registration has lapsed (`cluster_node_ttl`),
  since a node cut off from Redis that long has closed its clients (below).

* **Liveness.** Each node refreshes `<prefix>:nodes:<id>` every fifth of
  `cluster_node_ttl` while it is subscribed (and at once when it is subscribed again
  after Redis was away, which it retries at most a tenth of the ttl apart, so that a
  short outage does not fence it) (and is in the set `<prefix>:nodes`, which is
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

* **Presence** is coalesced per node as on one node (chat.hub). A node publishes which
  of its users came online or went offline (an `o` event), and every node keeps a
  replica of who is online where (for `who`, for "online elsewhere"), rebuilt from
  Redis hashes at start and dropped for a node whose heartbeat lapsed. Each node tells
  its own sessions all of it, from its own view (its sessions and that replica): coming
  online when a user's first session on any node begins, going offline when the last
  ends, joins and leaves of rooms wherever decided. No node could tell it for the
  others: two nodes whose last sessions of a user close at once each still see the
  other's at their flush (every node learns of both closes); and a join told by the
  node that decided it, beside coming and going told by each, doubled or lost frames
  of one (room, user) pair. So every change of what a node shows is marked there first
  (its sessions' own, or `_set_replica`), and its flush's net change per pair keeps
  join and leave alternating.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from chat.conversations import room_conv, user_conv
from chat.hub import CONNECTION, ROOM, LocalHub, Session, UserState
from chat.protocol import encode
from chat.sequencer import Sequencer

if TYPE_CHECKING:
    from chat.store import Store

# A floor no message id reaches: the session's room messages come from its catch-up.
_CATCHING_UP = 1 << 63


@dataclass(frozen=True, slots=True)
class DirectChain:
    """Where a direct message sits in each side's stream of direct messages."""

    msg_id: int
    recipient_id: int
    prev_recipient: int
    sender_id: int
    prev_sender: int


@dataclass(eq=False, slots=True)
class CatchUp:
    """Sessions new to `room` here whose reading of it began (their user's join) at an id
    this node had delivered past already. They have had the room up to `had`; the rest,
    up to where the node is, is read from the database for them before they get any of
    the room live. The writer's, as the hub is; the filler reads only `room`."""

    room: str
    had: int
    sessions: set[Session]
    # Their own messages sent meanwhile: the copy with `re` (the reply to the send), given
    # in place of the stored one when the catch-up reaches it, or at once if they leave.
    echoes: dict[int, tuple[Session, bytes]] = field(default_factory=dict)


@dataclass(slots=True)
class _Remote:
    name: str
    rooms: dict[str, set[str]] = field(default_factory=dict)  # node -> rooms

    def in_room(self, room: str) -> bool:
        return any(room in rooms for rooms in self.rooms.values())


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
        self.ask_catch_up: Callable[[CatchUp, int, int], None] = lambda c, after, upto: None
        self.sync_then: Callable[[Callable[[], None]], None] = lambda then: then()
        self.store: Store | None = None
        self.reachable = True  # the bus is up (set by the Bus's thread; a plain flag)
        self.seq = Sequencer(gap_wait, lambda c, a, u: self.ask_fill(c, a, u), clock)
        self.reconcile_interval = reconcile_interval
        self._next_reconcile = clock() + reconcile_interval
        self._keys: dict[int, str] = {}  # user id -> key, of users with sessions here
        # room -> session -> the newest id of the room when the session's reading of it
        # began (its login, its user's join), where this node had not delivered that far:
        # what it still delivers up to there is not the session's (see _floor); or, where
        # the node had delivered past it, _CATCHING_UP (see _catch_up).
        self._floors: dict[str, dict[Session, int]] = {}
        self._catch_ups: dict[str, list[CatchUp]] = {}  # room -> those in flight
        self._retries: deque[tuple[float, CatchUp]] = deque()  # failed reads, by when again
        self._remote: dict[str, _Remote] = {}  # users online on other nodes

    # --- timers ---------------------------------------------------------------------
    def due(self) -> float | None:
        waits = [w for w in (self.presence_due(), self.seq.due(),
                             max(0.0, self._next_reconcile - self._clock())) if w is not None]
        if self._retries:
            waits.append(max(0.0, self._retries[0][0] - self._clock()))
        return min(waits)

    def tick(self) -> None:
        if self.presence_due() == 0.0:
            self.flush_presence()
        self.seq.tick()
        while self._retries and self._retries[0][0] <= self._clock():
            _when, catch = self._retries.popleft()
            if catch.sessions:
                self._catch_up_next(catch)
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
        """`newest`: where this node starts following the room if it does not yet (the
        room's newest id when the join was decided; a repaired one's, its earliest join
        here); `since`: where the join began the user's reading (`newest` if not told)."""
        new = [s for s in user.sessions if room not in s.rooms_in]
        super().joined(user, room)
        if room in self._rooms and newest is not None:
            since = newest if since is None else since
            self.seq.track(room_conv(room), newest)
            self._floor(user.sessions, room, since)
            self._catch_up(new, room, since)

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

    def _catch_up(self, sessions: list[Session], room: str, since: int) -> None:
        """These sessions, new to `room`, read it from after `since`, and this node has
        delivered past that already: a message stored after the join came here before the
        join's event (events of different nodes keep no order between them), or the join
        is repaired after a reconnect. On one node they would have had every message
        since; so they get those from the database first, in order, and then the room
        live (the floor above every id keeps it from them meanwhile)."""
        cursor = self.seq.cursor(room_conv(room))
        if not sessions or cursor is None or cursor <= since:
            return
        catch = CatchUp(room, since, set(sessions))
        floors = self._floors.setdefault(room, {})
        for session in sessions:
            floors[session] = _CATCHING_UP
        self._catch_ups.setdefault(room, []).append(catch)
        self.ask_catch_up(catch, since, cursor)

    def _catch_up_next(self, catch: CatchUp) -> None:
        """Read on from where the catch-up is to where the node is now; when there, the
        sessions take the room live from the next message the node delivers."""
        cursor = self.seq.cursor(room_conv(catch.room))
        if cursor is not None and cursor > catch.had:
            self.ask_catch_up(catch, catch.had, cursor)
            return
        self._drop_floors(catch.room, list(catch.sessions))

    def caught_up(self, catch: CatchUp, end: int, rows: list[Any]) -> None:
        """Writer thread: a catch-up's read, `rows` being every message of its room in
        (catch.had, end]."""
        if not catch.sessions:
            return  # all left or closed meanwhile
        frames = [(row.id, encode(_frame(row))) for row in rows]
        blob = b"".join(data for _id, data in frames)
        for session in catch.sessions:
            own = {i: echo for i, (origin, echo) in catch.echoes.items() if origin is session}
            if own:
                session.out.deliver(b"".join(own.get(i, data) for i, data in frames))
            elif blob:
                session.out.deliver(blob)
        for msg_id in [i for i in catch.echoes if i <= end]:
            del catch.echoes[msg_id]
        catch.had = end
        self._catch_up_next(catch)

    def catch_up_failed(self, catch: CatchUp) -> None:
        """Writer thread: the read failed (the database); asked again as a gap's is."""
        if catch.sessions:
            self._retries.append((self._clock() + self.seq.gap_wait, catch))

    def _drop_floors(self, room: str, sessions: list[Session]) -> None:
        """The sessions left the room or closed, or caught up: they have no floor in it."""
        floors = self._floors.get(room)
        if floors is not None:
            for session in sessions:
                floors.pop(session, None)
            if not floors:
                del self._floors[room]
        catches = self._catch_ups.get(room)
        if catches is None:
            return
        for catch in catches:
            for session in catch.sessions.intersection(sessions):
                catch.sessions.discard(session)
                # Replies to its sends (on one node it had them at once), nothing else.
                own = [echo for _i, (origin, echo) in sorted(catch.echoes.items())
                       if origin is session]
                if own and not session.closed:
                    session.out.deliver(b"".join(own))
            if catch.echoes:
                catch.echoes = {i: e for i, e in catch.echoes.items()
                                if e[0] in catch.sessions}
        catches[:] = [c for c in catches if c.sessions]
        if not catches:
            del self._catch_ups[room]

    def left(self, user: UserState, room: str) -> None:
        self._left_here(user, room)
        self._remote_member(user.key, room, False)
        self.publish({"t": "l", "k": user.key, "room": room, **_mine(user)})

    def _left_here(self, user: UserState, room: str) -> None:
        LocalHub.left(self, user, room)
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

    def joined_offline(self, key: str, room: str, newest: int) -> None:
        """A join of a user with no session here (the operator's): other nodes may have
        some, and apply it as one made there."""
        self._remote_member(key, room, True)
        self.publish({"t": "j", "k": key, "room": room, "n": newest})

    def removed_offline(self, key: str, room: str, data: bytes) -> None:
        """A kick or ban of a user with no session here: other nodes may have some."""
        self._remote_member(key, room, False)
        self.publish({"t": "x", "k": key, "room": room, "f": data.decode()})

    def _remote_member(self, key: str, room: str, member: bool) -> None:
        """The user's membership changed: so it did for its sessions on every node (the
        replica keeps their rooms per node, all the same rooms: the user's)."""
        remote = self._remote.get(key)
        if remote is not None:
            self._set_replica(key, remote.name, {
                node: rooms | {room} if member else rooms - {room}
                for node, rooms in remote.rooms.items()})

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
        done with, so each costs this slower path until the node caught up (or, for a
        session catching up, until it did)."""
        blob = b"".join(data for data, _origin, _echo in items)
        origins = {origin for _data, origin, _echo in items}
        for session in self._rooms.get(room, ()):
            floor = floors.get(session)
            if floor is None or floor < ids[0]:
                mine = items
            elif floor == _CATCHING_UP:
                if session in origins:
                    self._keep_echoes(room, session, items, ids)
                continue
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

    def _keep_echoes(self, room: str, session: Session,
                     items: list[tuple[bytes, Session | None, bytes]], ids: list[int]) -> None:
        """A catching-up session sent some of these: its replies wait for their turn."""
        for catch in self._catch_ups.get(room, ()):
            if session in catch.sessions:
                for (_data, origin, echo), msg_id in zip(items, ids, strict=True):
                    if origin is session:
                        catch.echoes[msg_id] = (session, echo)

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
                continue  # stored before its login: in its backlog, or history
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
        else:
            user.rooms.discard(room)
            if kind == "x":
                for session in user.sessions:
                    if room in session.rooms_in:
                        session.out.deliver(event["f"].encode())
            self._left_here(user, room)
        if node != self.node:
            # Our user's rooms changed elsewhere: our Redis hash and the others' replica.
            self.publish({"t": "o", "k": key, "name": user.name, "on": True,
                          "rooms": sorted(user.rooms)})

    def _apply_online(self, node: str, event: dict[str, Any]) -> None:
        key = event["k"]
        remote = self._remote.get(key)
        rooms = dict(remote.rooms) if remote is not None else {}
        if event["on"]:
            rooms[node] = set(event.get("rooms", ()))
        elif rooms.pop(node, None) is None:
            return
        self._set_replica(key, event.get("name") or (remote.name if remote else key), rooms)

    def _offline_on(self, node: str, key: str, remote: _Remote) -> None:
        """The user has no session on `node` any more (its `o` said so, or it is gone)."""
        self._set_replica(key, remote.name, {n: r for n, r in remote.rooms.items()
                                             if n != node})

    def _set_replica(self, key: str, name: str, rooms: dict[str, set[str]]) -> None:
        """The user's rooms on each other node where it is online are now `rooms`. Every
        change of what a node shows goes through here or through its own sessions' marks:
        each node tells its sessions all of it, from its own view, and a flush's net
        change per (room, user) then keeps join and leave alternating. Each room here
        whose showing of the user this changes is marked first: as coming online or going
        offline if the user was online on no node before, or is on none now; else as a
        join or leave of the room (another node's, or a repair's)."""
        remote = self._remote.get(key)
        before = remote.rooms if remote is not None else {}
        changed = set().union(*before.values()) ^ set().union(*rooms.values())
        if changed:
            user = self._users.get(key)
            cause = ROOM if user is not None or bool(before) == bool(rooms) else CONNECTION
            for room in changed:
                if room in self._rooms and (user is None or not self._visible(room, user)):
                    self._mark_key(room, key, name, cause)
                self._who.pop(room, None)
        if not rooms:
            self._remote.pop(key, None)
        elif remote is None:
            self._remote[key] = _Remote(name, rooms)
        else:
            remote.rooms = rooms

    def node_gone(self, node: str) -> None:
        """A node's heartbeat lapsed: its users went offline there."""
        for key, remote in list(self._remote.items()):
            if node in remote.rooms:
                self._offline_on(node, key, remote)

    def reset_remote(self, snapshot: dict[str, dict[str, tuple[str, list[str]]]]) -> None:
        """Who is online on the other nodes, as their Redis hashes say (start, reconnect).
        After a reconnect, the `o` of whoever came online or went offline meanwhile went
        by unheard, and this node's sessions, kept, would show them as they were for good:
        they are told now. (An `o` still on its way, published after it was subscribed
        again, finds the replica saying so already: no news twice.)"""
        fresh: dict[str, _Remote] = {}
        for node, users in snapshot.items():
            if node == self.node:
                continue
            for key, (name, rooms) in users.items():
                fresh.setdefault(key, _Remote(name)).rooms[node] = set(rooms)
        for key in self._remote.keys() | fresh.keys():
            remote = fresh.get(key) or self._remote[key]
            self._set_replica(key, remote.name, fresh[key].rooms if key in fresh else {})
        self._who.clear()

    def online_here(self) -> dict[str, tuple[str, list[str]]]:
        """This node's users and their rooms, for its Redis hash."""
        return {key: (u.name, sorted(u.rooms)) for key, u in self._users.items()}

    def reconcile_rooms(self, truth: dict[str, dict[str, int]]) -> None:
        """After Redis came back: the rooms of this node's users as the database says
        (user key -> room -> the membership's since_msg_id, where its join began the
        user's reading); membership events lost meanwhile are applied now. A room this
        node did not follow is followed from the earliest of those joins here: what was
        sent after it is the joiner's, as on one node, where it came live (nobody else
        here is in the room, and the gap is filled); in one it follows, the joiner's
        sessions get nothing up to the join, and what the node delivered after it from
        the database (_catch_up). A user whose rooms changed is published
        online again with them: this node's Redis hash and the other nodes' replica had
        the ones it republished after the reconnect, before this."""
        here = [(user, joins) for key, joins in truth.items()
                if (user := self._users.get(key)) is not None and not user.ended]
        starts: dict[str, int] = {}
        for user, joins in here:
            for room in joins.keys() - user.rooms:
                starts[room] = min(starts.get(room, joins[room]), joins[room])
        for user, joins in here:
            rooms = set(joins)
            if rooms != user.rooms:
                self.publish({"t": "o", "k": user.key, "name": user.name, "on": True,
                              "rooms": sorted(rooms)})
            for room in rooms - user.rooms:
                user.rooms.add(room)
                self._joined_here(user, room, starts[room], joins[room])
            for room in user.rooms - rooms:
                user.rooms.discard(room)
                self._left_here(user, room)

    # --- presence ---------------------------------------------------------------------
    def _shown(self, room: str, key: str) -> bool:
        remote = self._remote.get(key)
        return super()._shown(room, key) or (remote is not None and remote.in_room(room))

    def who(self, room: str) -> list[str]:
        users = self._who.get(room)
        if users is None:
            names = {s.key: s.name for s in self._rooms.get(room, ())}
            for key, remote in self._remote.items():
                if remote.in_room(room):
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



"""The Redis side of one node of several: publishing, subscribing, barriers, the fence.

See chat.cluster for what travels and why; this module moves it. A publisher, a
subscriber, a heartbeat and a watchdog, each a thread with its own connection (the
watchdog with none), so that none waits behind another.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection

from chat.conversations import Filler, memberships

if TYPE_CHECKING:
    from chat.cluster import ClusterHub
    from chat.store import Store

log = logging.getLogger(__name__)

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
# While Redis is unreachable, the subscriber tries again at most this share of
# cluster_node_ttl apart, and the heartbeat this share after a failed beat: a node must
# be subscribed and registered again soon after Redis is back, or an outage shorter than
# FENCE_AFTER of the ttl still fences it (with a 2 s cap, one of 1.5 s did).
RETRY_SHARE = 0.1
BEAT_RETRY_SHARE = 0.05


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
        self._beat = threading.Event()  # wakes the heartbeat: stopping, or subscribed again
        self._syncs: dict[str, _Sync] = {}
        self._syncs_lock = threading.Lock()
        self.connected = threading.Event()  # the subscriber is subscribed
        self.fenced = False
        self._last_good = time.monotonic()  # registered and subscribed, last seen so
        self._last_beat = 0.0  # the heartbeat's last look at the live nodes
        # The nodes the heartbeat last found live, and those a replica was read from since:
        # a node of these that it finds gone, it tells the hub of (node_gone), after the
        # replica (the lock keeps the two submissions in the order they were decided).
        self._known: set[str] = set()
        self._known_lock = threading.Lock()
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

        Registered here, not at the heartbeat's first beat (a fifth of the ttl later):
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
        self._beat.set()
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
                self._beat.set()  # registered again now, not at the next beat
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
                backoff = min(backoff * 2, 2.0, RETRY_SHARE * self.ttl)

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

        with self._known_lock:
            self.filler._submit(apply)
            # A node read here may lapse before the heartbeat's next look, which may have
            # found it gone already (its node_gone then came before this replica, which
            # puts its users back): the next look that does not find it says it is gone.
            self._known |= set(snapshot)

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
        # A fifth of the ttl: the older the last beat when Redis goes, the shorter the
        # outage that fences the node (FENCE_AFTER of the ttl after that beat).
        interval = self.ttl / 5
        wait = 0.0  # the first beat at once: a node's sessions must not begin before the
        # others count it among the nodes a barrier waits for
        while True:
            self._beat.wait(min(wait, 0.2) if self._syncs else wait)
            self._beat.clear()
            if self._stop.is_set():
                return
            now = time.monotonic()
            # Until a beat registers the node, the next comes soon (Redis may be back).
            wait = BEAT_RETRY_SHARE * self.ttl
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
                    wait = interval
                live = self._live_nodes(client)
                self._last_beat = now
            except self._redis.RedisError:
                self.metrics.redis_errors.inc()
                client = None
                self._finish_syncs(now=now)
                continue
            with self._known_lock:
                gone = self._known - live - {self.node}
                self._known = live
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


"""Third outside review of the cluster: each test here shows one defect.

Most drive one ClusterHub by hand (fake sessions, a fake clock): the interleavings are
the test's own, not the machine's.
"""

from __future__ import annotations

import json
import queue
import threading
from collections.abc import Callable
from typing import Any

import pytest
import test_client_library
import test_cluster
from conftest import TIMEOUT
from test_cluster_review import (
    Clock,
    FakeMetrics,
    FakeStore,
    Operator,
    connection_news,
    fake_session,
    room_event,
    room_row,
)

from chat.hub import Session

cluster = test_cluster.cluster  # the fixture: cluster(n, **settings)
pki = test_client_library.pki  # the fixture: a scripted server's certificates


# --- 1. presence missed while this node was not subscribed -----------------------------
def test_a_reconnect_tells_who_came_and_went_while_the_node_heard_nothing() -> None:
    """Node c lost its subscription for a moment (Redis dropped it, or the network), not
    long enough to be fenced: its sessions stay. Meanwhile bob's last session (on node
    a) ended and carol's first began (on node b); both `o` went by unheard. The
    reconnect rebuilds the replica from the nodes' hashes: alice must be told bob went
    and carol came, or she sees bob online for good and never sees carol."""
    from chat.cluster import ClusterHub

    hub = ClusterHub("c", clock=Clock())
    alice = fake_session(1, "alice")
    assert hub.attach(alice, ["general"], [], {"r:general": 0, "u:1": 0})
    hub.apply("a", {"t": "o", "k": "bob", "name": "bob", "on": True, "rooms": ["general"]})
    hub.flush_presence()
    assert connection_news(alice) == [("bob", "join")]
    hub.reset_remote({"a": {}, "b": {"carol": ("carol", ["general"])},
                      "c": {"alice": ("alice", ["general"])}})
    hub.flush_presence()
    assert sorted(connection_news(alice)) == [("bob", "join"), ("bob", "leave"),
                                              ("carol", "join")]
    assert hub.who("general") == ["alice", "carol"]


# --- 2. a node that lapses while the replica is being read again ------------------------
class SteppedRedis:
    """A Redis client for one Bus: the heartbeat's look at the live nodes waits for the
    test to say what it finds (`beat`); anyone else's finds `live` at once."""

    def __init__(self, hashes: dict[str, dict[bytes, bytes]]) -> None:
        self.live = [b"a", b"me"]
        self.hashes = hashes
        self.on_hgetall: Callable[[], None] = lambda: None
        self._answers: queue.Queue[list[bytes]] = queue.Queue()
        self._asking = threading.Semaphore(0)
        self.heartbeat: threading.Thread | None = None

    def eval(self, *args: Any) -> list[bytes]:
        if threading.current_thread() is not self.heartbeat:
            return self.live
        self._asking.release()
        return self._answers.get(timeout=TIMEOUT)

    def hgetall(self, key: str) -> dict[bytes, bytes]:
        self.on_hgetall()
        return self.hashes.get(key.rpartition(":")[2], {})

    def close(self) -> None:
        pass

    def beat(self, live: list[bytes]) -> None:
        """Wait for the heartbeat's next look, answer it `live`, and wait until the beat
        is over (it asks again)."""
        assert self._asking.acquire(timeout=TIMEOUT), "the heartbeat never looked"
        self._answers.put(live)
        assert self._asking.acquire(timeout=TIMEOUT), "the heartbeat's beat never ended"
        self._asking.release()  # the next beat's wait, for the next call


class WriterJobs:
    """The Filler's side of a Bus: what it submits to the writer, in order."""

    def __init__(self) -> None:
        self.jobs: list[Callable[[], None]] = []

    def _submit(self, after: Callable[[], None]) -> None:
        self.jobs.append(after)

    def rooms(self, keys: list[str]) -> None:
        pass


def test_a_node_lapsing_while_the_replica_is_read_again_is_not_online_for_good() -> None:
    """Node me reads who is online on each live node again (a reconnect): a, bob's,
    among them. Node a lapses (it died) while the hashes are being read, and the
    heartbeat's next look finds it gone: its node_gone reaches the writer before the
    reset, which puts a's users back, and no later look finds a gone again (it was gone
    already). bob is online in the replica for good."""
    from chat.bus import Bus
    from chat.cluster import ClusterHub

    hub = ClusterHub("me", clock=Clock())
    alice = fake_session(1, "alice")
    assert hub.attach(alice, ["general"], [], {"r:general": 0, "u:1": 0})
    hub.apply("a", {"t": "o", "k": "bob", "name": "bob", "on": True, "rooms": ["general"]})
    redis = SteppedRedis({"a": {b"bob": json.dumps(["bob", ["general"]]).encode()}})
    filler = WriterJobs()
    bus = Bus("redis://127.0.0.1:1/0", "p", hub, FakeStore(), filler,  # type: ignore[arg-type]
              0.03, FakeMetrics(), lambda fenced: None)
    bus._client = lambda: redis  # type: ignore[method-assign]
    redis.heartbeat = threading.Thread(target=bus._heartbeat, daemon=True)
    redis.heartbeat.start()
    try:
        redis.beat([b"a", b"me"])

        def a_lapses() -> None:  # between the replica's look at the nodes and a's hash
            redis.on_hgetall = lambda: None
            redis.beat([b"me"])

        redis.on_hgetall = a_lapses
        bus._reconnected(redis, first=False)
        redis.beat([b"me"])
        redis.beat([b"me"])
    finally:
        bus._stop.set()
        redis._answers.put([b"me"])
        redis.heartbeat.join(TIMEOUT)
    for job in filler.jobs:
        job()
    hub.flush_presence()
    assert not hub.is_online("bob"), "bob, whose node is gone, is online for good"
    assert hub.who("general") == ["alice"]


# --- 3. a join repaired after a reconnect, in a room this node did not follow -------------
def test_a_join_repaired_in_a_room_not_followed_gets_what_was_sent_after_the_join() -> None:
    """alice (online here, on node a) joined den on node b when its newest message was
    11; the `j` was lost with Redis, and 12 and 13 were sent to den meanwhile (nobody
    here is in den: node a does not follow it). The reconcile after the reconnect finds
    the membership (since_msg_id 11): 12 and 13 are hers, as on one node, where she
    would have had them live. Followed from den's newest at the reconcile (13), node a
    never delivers them, and no catch-up of her client asks for them: it lost nothing."""
    from chat.cluster import ClusterHub

    clock = Clock()
    hub = ClusterHub("a", reconcile_interval=2.0, clock=clock)
    asked: list[dict[str, int]] = []
    hub.ask_reconcile = asked.append
    alice = fake_session(2, "alice")
    assert hub.attach(alice, [], [], {"u:2": 0})
    hub.reconcile_rooms({"alice": {"den": 11}})
    clock.now += 2.0
    hub.tick()  # the reconcile: the filler reads what each followed conversation lacks
    cursor = asked[-1]["r:den"]
    hub.filled("r:den", cursor, 13, [room_row(i, "den") for i in (12, 13) if i > cursor])
    hub.apply("b", room_event(13, 14, "den"))
    assert alice.out.messages() == [12, 13, 14]  # type: ignore[attr-defined]


# --- 4. the operator makes an owner of a user online on another node only -------------------
@pytest.mark.redis
def test_an_owner_made_by_the_operator_gets_the_rooms_messages_on_every_node(
        cluster: Any) -> None:
    """`room_set_owner` adds alice to den on node 1, where she has no session: it told
    the hub of the join only if she was online there, and nothing told the other nodes.
    Her session on node 2 never entered den's fan-out (until some reconnect repaired
    it): den's messages, hers to read, never reached it, nor did her client catch up."""
    c = cluster(2)
    n1, n2 = c.nodes
    bob = n1.user("bob")
    alice = n2.user("alice")
    try:
        assert bob.request({"type": "join", "room": "den"})["type"] == "ok"
        Operator(n1, "room_set_owner", {"name": "den", "username": "alice"}).result()
        sent = bob.request({"type": "send", "room": "den", "message": "hello owner"})
        assert alice.recv_until("message", room="den")["msg_id"] == sent["msg_id"]
    finally:
        bob.close()
        alice.close()


# --- 5. one's own message echoed before the room's earlier ones --------------------------
def test_an_echo_that_overtakes_the_rooms_earlier_messages_does_not_move_the_catch_up() -> None:
    """alice joined den from her session on node c (den's newest: 10); her session here,
    on node b, sends to den before b applied that join (the database let her in): the
    echo of her 12 goes to her at once, while carol's 11, sent on node a after the join,
    reaches her only once b follows den. If her connection goes between the two, her
    client catches den up after 12, raised by the echo: 11 is lost."""
    from chat.client.positions import Positions
    from chat.cluster import ClusterHub
    from chat.hub import with_re
    from chat.protocol import encode
    from chat.store import message_frame

    hub = ClusterHub("b", clock=Clock())
    alice = fake_session(2, "alice")
    assert hub.attach(alice, [], [], {"u:2": 0})
    data = encode(message_frame(room_row(12, "den")))
    hub.publish_room_many("den", [(data, alice, with_re(data, 7))], [(11, 12)])
    positions = Positions.from_welcome({"rooms": {"general": 5}, "direct": 0}, 5)
    assert positions is not None
    for blob in alice.out.frames:  # type: ignore[attr-defined]
        for line in blob.splitlines():
            positions.note(json.loads(line))
    assert positions.room("den") < 11, "den is caught up from after carol's 11"


# --- 6. a direct message stored before the login, live, counted as the backlog's ------------
@pytest.mark.redis
def test_a_direct_message_stored_before_a_login_does_not_reach_it_live(cluster: Any) -> None:
    """bob has a session on each node; alice's message to him, sent on node 1, is handed
    to his session there (and marked delivered) while node 2 has not heard of it yet
    (its publisher lags). bob logs in again on node 2: the message is older than his
    welcome (its `positions.direct` included), and node 2 delivered it to the new
    session live once it heard of it (docs/protocol.md allowed "a few"). On one node it
    never would, and it matters: a client counts the `backlog` its welcome announced as
    the direct messages up to `last_msg_id`, so one such message taken for the
    backlog's makes a backlog cut short by a lost connection look whole, and the
    catch-up from `positions.direct` skips the rest of it (handed to this session
    only)."""
    from test_cluster_review import hold_publishing

    c = cluster(2, cluster_reconcile_interval=600.0)  # only Redis brings it to node 2
    n1, n2 = c.nodes
    alice = n1.user("alice")
    bob1 = n1.user("bob")
    bob2 = n2.client()
    bob3 = n2.client()
    released = threading.Event()
    try:
        assert bob2.login("bob")["type"] == "welcome"
        hold_publishing(n1, lambda e: e.startswith(b'{"t":"d"'), released)
        before = alice.request({"type": "send", "to": "bob", "message": "before"})
        assert bob1.recv_until("message", to="bob")["msg_id"] == before["msg_id"]
        welcome = bob3.login("bob")
        assert welcome["type"] == "welcome" and "backlog" not in welcome, welcome
        assert welcome["positions"]["direct"] >= before["msg_id"], welcome
        released.set()
        assert bob2.recv_until("message", to="bob")["msg_id"] == before["msg_id"]
        after = alice.request({"type": "send", "to": "bob", "message": "after"})
        got = bob3.recv_until("message", to="bob")["msg_id"]
        assert got == after["msg_id"], "a message stored before the login came live"
    finally:
        released.set()
        for client in (alice, bob1, bob2, bob3):
            client.close()


# --- 7. presence: a join on one node, a first session on another, a last one on the first ---
class Wire:
    """Nodes' hubs joined by a hand-driven Pub/Sub: each node's events reach each other
    node in the order published, when the test says (`drain`); `members` stands for the
    database's answer at apply time (Bus.decide)."""

    def __init__(self, *names: str) -> None:
        from chat.cluster import ClusterHub

        self.hubs = {n: ClusterHub(n, clock=Clock()) for n in names}
        self.queues: dict[tuple[str, str], list[dict[str, Any]]] = {
            (o, t): [] for o in names for t in names if o != t}
        self.members: set[tuple[str, str]] = set()
        for name, hub in self.hubs.items():
            hub.publish = lambda e, name=name: self._publish(name, e)

    def _publish(self, origin: str, event: dict[str, Any]) -> None:
        for (o, _t), queue_ in self.queues.items():
            if o == origin:
                queue_.append(json.loads(json.dumps(event)))

    def drain(self, origin: str | None = None, target: str | None = None) -> None:
        for (o, t), queue_ in self.queues.items():
            if origin in (None, o) and target in (None, t):
                while queue_:
                    self.hubs[t].apply(o, queue_.pop(0), set(self.members))

    def flush(self) -> None:
        for _ in range(2):  # a flush publishes the `pr` the others deliver
            for hub in self.hubs.values():
                hub.flush_presence()
            self.drain()


def presence_in(session: Session, name: str) -> list[str]:
    told = []
    for blob in session.out.frames:  # type: ignore[attr-defined]
        for line in blob.splitlines():
            frame = json.loads(line)
            if frame["type"] == "presence" and frame["username"] == name:
                told.append(frame["event"])
    return told


def test_a_user_joining_on_one_node_and_moving_to_another_is_shown_in_the_room() -> None:
    """bob, online on node c only, joins den there; his session on node a begins (its
    login read den among his rooms) and his one on c ends, all before the nodes heard
    of each other's events. He is online, in den: every node's members of den must be
    told so. A join or leave was told by the deciding node (its `pr`, sent only if its
    net change's latest cause was the room), coming and going by every node from its
    replica: node a dropped its own pending "came online" on applying c's join ("the
    origin tells"); c's change of the pair became "went offline" and was no `pr`; node
    b changed its replica on c's `j` and marked nothing. Only c's members were told."""
    wire = Wire("a", "b", "c")
    a, c = wire.hubs["a"], wire.hubs["c"]
    watchers = {}
    for i, (name, hub) in enumerate(wire.hubs.items()):
        watchers[name] = fake_session(10 + i, "watcher-" + name)
        assert hub.attach(watchers[name], ["den"], [], {"r:den": 0, f"u:{10 + i}": 0})
    wire.flush()
    bob_c = fake_session(2, "bob")
    assert c.attach(bob_c, [], [], {"r:den": 0, "u:2": 0})
    wire.drain(origin="c")
    user = c.user_state("bob")
    assert user is not None
    user.rooms.add("den")
    wire.members.add(("bob", "den"))
    c.joined(user, "den", 0)
    bob_a = fake_session(2, "bob")
    assert a.attach(bob_a, ["den"], [], {"r:den": 0, "u:2": 0})
    c.detach(bob_c)
    wire.drain()
    wire.flush()
    told = {name: presence_in(session, "bob") for name, session in watchers.items()}
    assert told == {"a": ["join"], "b": ["join"], "c": ["join"]}, told


# --- 8. the backlog counted up to last_msg_id, read after the direct messages' position ------
def test_a_backlog_cut_short_is_caught_up_though_a_live_message_is_older_than_the_welcome(
        pki: Any) -> None:
    """A login reads its direct messages' position (15) and then last_msg_id (20): bob's
    direct message 17, committed by another node between the two reads, comes live (it
    is after his position). The client counted the announced backlog (2, from 10) as the
    direct messages up to last_msg_id: 10 and 17. The connection went before 12, the
    backlog's second (handed to this session only): it looked whole, the direct messages
    were caught up from after 15, and 12 was lost. Over several nodes the backlog is
    what lies up to `positions.direct`."""
    from test_client_library import PASSWORD, WAIT, FakeServer, connect, message

    def script(peer: Any) -> None:
        login = peer.recv()
        peer.send({"type": "welcome", "username": "bob", "rooms": ["general"],
                   "session": "s", "last_msg_id": 20, "re": login["id"],
                   "positions": {"rooms": {"general": 20}, "direct": 15},
                   "backlog": {"count": 2, "first_msg_id": 10}})
        peer.send(message(10, to="bob", room=None, username="carol"))
        peer.send(message(17, to="bob", room=None, username="carol"))

    with FakeServer(pki, script) as server, connect(pki, server) as client:
        client.login("bob", PASSWORD, WAIT)
        for _frame in client.events():
            pass  # until the connection has ended
        assert client.direct_position == 9, "a backlog cut short looked whole"


def test_a_join_and_a_last_session_gone_within_a_flush_are_no_news_anywhere() -> None:
    """bob, online on node a in no room, joins den and his session ends before a
    flushes: a's net change is none, and so is everyone's. The other nodes put den in
    their replica on his `j` unmarked ("the origin tells"), and his going offline was
    then news of den there: a `leave` with no `join` before it."""
    wire = Wire("a", "b", "c")
    a = wire.hubs["a"]
    watchers = {}
    for i, (name, hub) in enumerate(wire.hubs.items()):
        watchers[name] = fake_session(10 + i, "watcher-" + name)
        assert hub.attach(watchers[name], ["den"], [], {"r:den": 0, f"u:{10 + i}": 0})
    wire.flush()
    bob = fake_session(2, "bob")
    assert a.attach(bob, [], [], {"r:den": 0, "u:2": 0})
    wire.drain(origin="a", target="c")
    user = a.user_state("bob")
    assert user is not None
    user.rooms.add("den")
    wire.members.add(("bob", "den"))
    a.joined(user, "den", 0)
    a.detach(bob)
    wire.drain()
    wire.flush()
    told = {name: presence_in(session, "bob") for name, session in watchers.items()}
    assert told == {"a": [], "b": [], "c": []}, told

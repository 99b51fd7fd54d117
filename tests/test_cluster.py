"""Several nodes in one process: one PostgreSQL schema, one private Redis (chat.cluster).

Each node is a whole `Server` with its own data directory; they share the database, the
Redis prefix and the pepper (a password set on one node is checked on another). Clients
talk to the node they are given, as behind a balancer.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pgtest
import pytest
import redistest
from conftest import PASSWORD, TIMEOUT, Client, RunningServer, make_settings

from chat import certs
from chat.server import Server

pytestmark = [pytest.mark.redis]


class Cluster:
    def __init__(self, tmp_path: Path, cert_dir: certs.CertPaths, db: str,
                 redis: redistest.RedisServer, **overrides: Any) -> None:
        self.tmp_path = tmp_path
        self.cert_dir = cert_dir
        self.db = db
        self.redis = redis
        self.prefix = redistest.unique_prefix()
        self.overrides = overrides
        self.nodes: list[RunningServer] = []

    def start_node(self, **overrides: Any) -> RunningServer:
        i = len(self.nodes)
        settings = make_settings(
            self.tmp_path / f"node{i}", self.cert_dir, **{
                "db": self.db, "redis": self.redis.url, "redis_prefix": self.prefix,
                "pepper_file": str(self.tmp_path / "pepper"), "cluster_node_ttl": 2.0,
                "cluster_reconcile_interval": 0.5, **self.overrides, **overrides})
        server = Server(settings)
        server.start()
        node = RunningServer(server, settings, self.cert_dir.ca_cert)
        self.nodes.append(node)
        return node

    def stop(self) -> None:
        for node in self.nodes:
            node.server.stop()


@pytest.fixture
def cluster(tmp_path: Path, cert_dir: certs.CertPaths,
            redis_server: redistest.RedisServer) -> Iterator[Callable[..., Cluster]]:
    pgtest.need_postgres()
    made: list[tuple[Cluster, str]] = []

    def make(n: int = 3, **overrides: Any) -> Cluster:
        schema, url = pgtest.create_schema()
        c = Cluster(tmp_path, cert_dir, url, redis_server, **overrides)
        made.append((c, schema))
        for _ in range(n):
            c.start_node()
        return c

    yield make
    for c, schema in made:
        c.stop()
        pgtest.drop_schema(schema)


def barrier(client: Client) -> None:
    """Everything the client's node fanned out before this is in the client's stream:
    a request that goes through the writer (a ping is the loop's, and could overtake)."""
    reply = client.request({"type": "join", "room": "general"})
    assert reply["type"] == "ok", reply


def collect(client: Client, want: Callable[[dict[str, Any]], bool], count: int
            ) -> list[dict[str, Any]]:
    got = []
    while len(got) < count:
        frame = client.recv()
        if want(frame):
            got.append(frame)
    return got


def test_nodes_share_users_rooms_and_deliver_across_nodes(cluster: Any) -> None:
    c = cluster(3)
    n1, n2, n3 = c.nodes
    alice = n1.user("alice")
    bob = n2.user("bob")  # registered on node 2: the pepper and the database are shared
    carol = n3.user("carol")
    try:
        reply = alice.request({"type": "send", "room": "general", "message": "hello all"})
        assert reply["type"] == "message", reply
        for who in (bob, carol):
            frame = who.recv_until("message", room="general")
            assert frame["message"] == "hello all" and frame["username"] == "alice"
            assert frame["msg_id"] == reply["msg_id"]
        dm = bob.request({"type": "send", "to": "carol", "message": "psst"})
        assert dm["type"] == "message", dm
        got = carol.recv_until("message", to="carol")
        assert got["message"] == "psst" and got["msg_id"] == dm["msg_id"]
        # A second session of carol's, on another node, gets her next direct message.
        carol2 = n1.client()
        welcome = carol2.login("carol")
        assert welcome["type"] == "welcome"
        # (Node 3 marks "psst" delivered in a batch after handing it over: a login on
        # node 1 before that commits has it in its backlog too, first.)
        backlog = welcome.get("backlog", {"count": 0})["count"]
        assert backlog in (0, 1), welcome
        for _ in range(backlog):
            assert carol2.recv_until("message", to="carol")["msg_id"] == dm["msg_id"]
        dm2 = alice.request({"type": "send", "to": "carol", "message": "both of you"})
        for session in (carol, carol2):
            assert session.recv_until("message", to="carol")["msg_id"] == dm2["msg_id"]
        carol2.close()
    finally:
        for client in (alice, bob, carol):
            client.close()


def test_a_burst_from_every_node_arrives_once_and_in_order_everywhere(cluster: Any) -> None:
    c = cluster(3)
    names = ["amy", "ben", "cat"]
    senders = [node.user(name) for node, name in zip(c.nodes, names, strict=True)]
    readers = [node.user(f"reader{i}") for i, node in enumerate(c.nodes)]
    per_sender = 150
    try:
        for reader in readers:
            barrier(reader)

        def burst(client: Client, name: str) -> None:
            for i in range(per_sender):
                client.send({"type": "send", "room": "general", "message": f"{name} {i}"})

        threads = [threading.Thread(target=burst, args=(s, n))
                   for s, n in zip(senders, names, strict=True)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(TIMEOUT)
        total = per_sender * len(names)
        for reader in readers:
            got = collect(reader, lambda f: f["type"] == "message"
                          and f.get("room") == "general", total)
            ids = [f["msg_id"] for f in got]
            assert ids == sorted(ids) and len(set(ids)) == total
            for name in names:  # each sender's own order too
                mine = [int(f["message"].split()[1]) for f in got if f["username"] == name]
                assert mine == list(range(per_sender))
        # And `history after` on any node misses nothing.
        everything = sorted(reader_ids(readers[0], total))
        for node in c.nodes:
            h = node.user(f"h{node.port}")
            try:
                ids = []
                after = 0
                while True:
                    page = h.request({"type": "history", "room": "general", "after": after,
                                      "limit": 200})["messages"]
                    if not page:
                        break
                    ids += [m["msg_id"] for m in page if m["username"] in names]
                    after = page[-1]["msg_id"]
                assert ids == everything
            finally:
                h.close()
    finally:
        for client in senders + readers:
            client.close()


def reader_ids(reader: Client, total: int) -> list[int]:
    reply = reader.request({"type": "history", "room": "general", "limit": 200})
    ids = [m["msg_id"] for m in reply["messages"] if m["username"] in ("amy", "ben", "cat")]
    while len(ids) < total:
        older = reader.request({"type": "history", "room": "general", "limit": 200,
                                "before": reply["messages"][0]["msg_id"]})
        if not older["messages"]:
            break
        reply = older
        ids = [m["msg_id"] for m in older["messages"]
               if m["username"] in ("amy", "ben", "cat")] + ids
    return ids


def test_killed_pubsub_connections_are_repaired_from_the_database(cluster: Any) -> None:
    c = cluster(2)
    n1, n2 = c.nodes
    sender = n1.user("sender")
    reader = n2.user("reader")
    total = 400
    try:
        barrier(reader)

        def burst() -> None:
            for i in range(total):
                sender.send({"type": "send", "room": "general", "message": f"m {i}"})

        t = threading.Thread(target=burst)
        t.start()
        killer = c.redis.client()
        killed = 0
        deadline = time.monotonic() + TIMEOUT
        while t.is_alive() and time.monotonic() < deadline:
            killed += killer.client_kill_filter(_type="pubsub")
            time.sleep(0.01)
        t.join(TIMEOUT)
        killed += killer.client_kill_filter(_type="pubsub")
        got = collect(reader, lambda f: f["type"] == "message" and f["username"] == "sender",
                      total)
        assert [int(f["message"].split()[1]) for f in got] == list(range(total))
        assert killed > 0
        metrics = n2.server.metrics
        assert metrics.redis_errors._value.get() > 0
        # What Pub/Sub lost while the subscription was down came from the database.
        assert metrics.gap_repairs._value.get() > 0
    finally:
        sender.close()
        reader.close()


def test_a_kick_on_one_node_reaches_the_target_on_every_node_before_the_ok(
        cluster: Any) -> None:
    c = cluster(3)
    n1, n2, n3 = c.nodes
    owner = n1.user("owner")
    target = n2.user("target")
    target2 = n3.client()
    try:
        assert target2.login("target")["type"] == "welcome"
        assert owner.request({"type": "join", "room": "den"})["type"] == "ok"
        assert target.request({"type": "join", "room": "den"})["type"] == "ok"
        # The join made on node 2 reaches target's session on node 3.
        hello = owner.request({"type": "send", "room": "den", "message": "hi"})
        for s in (target, target2):
            assert s.recv_until("message", room="den")["msg_id"] == hello["msg_id"]
        reply = owner.request({"type": "ban", "room": "den", "username": "target"})
        assert reply["type"] == "ok", reply
        # After the ok, nothing more of the room reaches either session: a direct
        # message sent after the room message is the barrier.
        owner.request({"type": "send", "room": "den", "message": "after the ban"})
        owner.request({"type": "send", "to": "target", "message": "barrier"})
        for s in (target, target2):
            seen = []
            while True:
                frame = s.recv()
                seen.append(frame)
                if frame["type"] == "message" and frame.get("to") == "target":
                    break
            # (Presence is coalesced: the joins' frames, or the leave, may come in between.)
            assert [f["type"] for f in seen if f.get("room") == "den"
                    and f["type"] != "presence"] == ["removed"]
        # And the banned user cannot send there from any node.
        for s in (target, target2):
            refused = s.request({"type": "send", "room": "den", "message": "let me"})
            assert refused["type"] == "error", refused
    finally:
        for s in (owner, target, target2):
            s.close()


def test_an_encrypted_room_made_on_one_node_takes_no_plaintext_on_another(
        cluster: Any) -> None:
    """Over a cluster a room message's checks are read from the database under the room's
    lock, in one query (chat.conversations.locked_reads): membership, and whether the room is
    encrypted, for a room the other node has never loaded."""
    c = cluster(2)
    n1, n2 = c.nodes
    owner = n1.user("owner")
    owner2 = n2.client()
    outsider = n2.user("outsider")
    try:
        assert owner2.login("owner")["type"] == "welcome"
        made = owner.request({"type": "create", "room": "vault", "visibility": "private",
                              "encrypted": True})
        assert made["type"] == "ok", made
        refused = owner2.request({"type": "send", "room": "vault", "message": "in clear"})
        assert refused["type"] == "error" and refused["code"] == "forbidden", refused
        assert "encrypted" in refused["message"]
        refused = outsider.request({"type": "send", "room": "vault", "message": "hi"})
        # Not a member: refused as such (what a private room says to an outsider).
        assert refused["type"] == "error" and "encrypted" not in refused["message"], refused
        # A plain room beside it, in the same kind of batch, still takes plaintext.
        sent = owner2.request({"type": "send", "room": "general", "message": "plain"})
        assert sent["type"] == "message", sent
    finally:
        for client in (owner, owner2, outsider):
            client.close()


def test_a_deadlock_is_known_whether_the_driver_or_sqlalchemy_raised_it() -> None:
    """A batch that PostgreSQL failed to break a lock cycle is run again (Store._run_batch);
    the locks are taken on the driver's connection (chat.conversations.locked_reads), whose
    errors come unwrapped, and through SQLAlchemy elsewhere, whose come wrapped."""
    import psycopg
    from sqlalchemy.exc import OperationalError

    from chat.store import _deadlocked

    raw = psycopg.errors.DeadlockDetected("deadlock detected")
    assert _deadlocked(raw)
    assert _deadlocked(OperationalError("SELECT 1", {}, raw))
    assert not _deadlocked(psycopg.errors.UniqueViolation("duplicate key"))
    assert not _deadlocked(RuntimeError("something else"))


def test_presence_and_who_span_the_nodes(cluster: Any) -> None:
    c = cluster(2)
    n1, n2 = c.nodes
    alice = n1.user("alice")
    try:
        barrier(alice)
        bob = n2.user("bob")
        frame = alice.recv_until("presence", username="bob")
        assert frame["event"] == "join" and frame["cause"] == "connection"
        who = alice.request({"type": "who", "room": "general"})
        assert set(who["users"]) >= {"alice", "bob"}, who
        bob.close()
        frame = alice.recv_until("presence", username="bob")
        assert frame["event"] == "leave"
    finally:
        alice.close()


def test_direct_messages_wait_for_a_user_offline_on_every_node(cluster: Any) -> None:
    c = cluster(2)
    n1, n2 = c.nodes
    alice = n1.user("alice")
    n2.register("bob")
    try:
        sent = alice.request({"type": "send", "to": "bob", "message": "while you were out"})
        assert sent["type"] == "message"
        bob = n2.client()
        welcome = bob.login("bob")
        assert welcome.get("backlog", {}).get("count") == 1, welcome
        frame = bob.recv_until("message", to="bob")
        assert frame["msg_id"] == sent["msg_id"]
        # Once only: the next thing bob gets is the next message.
        later = alice.request({"type": "send", "to": "bob", "message": "now live"})
        assert bob.recv_until("message", to="bob")["msg_id"] == later["msg_id"]
        bob.close()
    finally:
        alice.close()


def test_a_second_lone_server_cannot_join_a_clusters_database(
        cluster: Any, tmp_path: Path, cert_dir: certs.CertPaths) -> None:
    c = cluster(1)
    from chat.config import SettingError

    settings = make_settings(tmp_path / "lone", cert_dir, db=c.db)
    with pytest.raises(SettingError, match="lock is held"):
        Server(settings).start()


def test_password_hashes_are_checked_on_every_node(cluster: Any) -> None:
    c = cluster(2)
    c.nodes[0].register("dana")
    other = c.nodes[1].client()
    try:
        assert other.login("dana", PASSWORD)["type"] == "welcome"
    finally:
        other.close()


def wait_for(condition: Callable[[], Any], what: str) -> Any:
    deadline = time.monotonic() + TIMEOUT
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_while_redis_is_down_messages_flow_and_kicks_wait_for_it(cluster: Any) -> None:
    # A long node ttl: this test is about the time before a node fences itself.
    c = cluster(2, cluster_node_ttl=120.0)
    n1, n2 = c.nodes
    alice = n1.user("alice")
    bob = n2.user("bob")
    try:
        assert alice.request({"type": "join", "room": "den"})["type"] == "ok"
        assert bob.request({"type": "join", "room": "den"})["type"] == "ok"
        barrier(alice)
        c.redis.stop()
        for node in c.nodes:
            wait_for(lambda node=node: not node.server.bus.connected.is_set(),
                     "the nodes to notice Redis is gone")
        # Messages are stored and reach the other node through the database.
        sent = alice.request({"type": "send", "room": "den", "message": "via the db"})
        assert sent["type"] == "message"
        assert bob.recv_until("message", room="den")["msg_id"] == sent["msg_id"]
        dm = alice.request({"type": "send", "to": "bob", "message": "direct, via the db"})
        assert bob.recv_until("message", to="bob")["msg_id"] == dm["msg_id"]
        # What must reach every node before its `ok` is refused, and changes nothing.
        refused = alice.request({"type": "kick", "room": "den", "username": "bob"})
        assert refused["type"] == "error" and refused["code"] == "server_busy", refused
        # So is the operator's, at once, and saying why.
        answer = n1.server.control.perform({"action": "room_kick", "args": {
            "name": "den", "username": "bob"}})
        assert not answer["ok"] and "Redis" in answer["error"], answer
        answer = n1.server.control.perform({"action": "user_logout", "args": {
            "name": "bob"}})
        assert not answer["ok"] and "Redis" in answer["error"], answer
        # Before the node ttl, the node still serves: a Redis blip must not have the
        # balancer cut every client.
        assert n1.server.healthy()
        c.redis.start()
        for node in c.nodes:
            wait_for(lambda node=node: node.server.bus.connected.is_set(),
                     "the nodes to reconnect")
        assert n1.server.healthy()
        reply = alice.request({"type": "kick", "room": "den", "username": "bob"})
        assert reply["type"] == "ok", reply
        assert bob.recv_until("removed", room="den")["how"] == "kick"
    finally:
        alice.close()
        bob.close()


def test_a_node_cut_off_from_redis_closes_its_sessions_until_it_is_back(
        cluster: Any) -> None:
    c = cluster(1, cluster_node_ttl=1.0)
    node = c.nodes[0]
    alice = node.user("alice")
    try:
        c.redis.stop()
        bye = alice.recv_until("bye")
        assert bye["reason"] == "shutdown"
        assert not node.server.healthy()
        again = node.client()
        refused = again.login("alice")
        assert refused["type"] == "error" and refused["code"] == "server_busy", refused
        again.close()
        c.redis.start()
        wait_for(lambda: not node.server.fenced and node.server.healthy(),
                 "the node to serve again")
        back = node.client()
        assert back.login("alice")["type"] == "welcome"
        back.close()
    finally:
        alice.close()


def test_a_membership_change_lost_with_redis_is_repaired_on_reconnect(cluster: Any) -> None:
    c = cluster(2, cluster_node_ttl=120.0)
    n1, n2 = c.nodes
    owner = n1.user("owner")
    guest = n2.user("guest")
    try:
        assert owner.request({"type": "join", "room": "den"})["type"] == "ok"
        assert guest.request({"type": "join", "room": "den"})["type"] == "ok"
        # The guest leaves on node 2 while node 1 cannot hear of it...
        c.redis.stop()
        for node in c.nodes:
            wait_for(lambda node=node: not node.server.bus.connected.is_set(),
                     "the nodes to notice Redis is gone")
        assert guest.request({"type": "leave", "room": "den"})["type"] == "ok"
        c.redis.start()
        for node in c.nodes:
            wait_for(lambda node=node: node.server.bus.connected.is_set(),
                     "the nodes to reconnect")
        # ...and after the reconnect, node 1's who agrees with the database.
        wait_for(lambda: "guest" not in owner.request(
            {"type": "who", "room": "den"})["users"], "who to forget the guest")
    finally:
        owner.close()
        guest.close()


def test_to_device_messages_reach_a_device_on_another_node_in_seq_order(
        cluster: Any) -> None:
    from test_todevice import Device

    c = cluster(3)
    n1, n2, n3 = c.nodes
    n2.register("bob")
    bob = Device(n2, "bob", "phone")
    alice = Device(n1, "alice", "laptop", register=True)
    carol = Device(n3, "carol", "tablet", register=True)
    try:
        assert alice.to_device([("bob", "phone")], "first")["queued"] == 1
        seqs: list[int] = []

        def received(n: int) -> bool:
            bob.pump()
            got = bob.received()
            if got:  # as a client does: the next page comes after the acknowledgement
                seqs.extend(got)
                assert bob.ack(got[-1])["type"] == "ok"
                seqs.extend(bob.received())
            return len(seqs) >= n

        wait_for(lambda: received(1), "the live to-device message")
        (first,) = seqs
        seqs.clear()
        per_sender = 30

        replies: list[dict[str, Any]] = []

        def burst(device: Device, tag: str) -> None:
            for i in range(per_sender):
                replies.append(device.to_device([("bob", "phone")], f"{tag}{i}"))

        threads = [threading.Thread(target=burst, args=(d, t))
                   for d, t in ((alice, "a"), (carol, "c"))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(TIMEOUT)
        wait_for(lambda: received(2 * per_sender), "every to-device message")
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs) == 2 * per_sender
        assert seqs[0] > first
    finally:
        for d in (alice, bob, carol):
            d.conn.close()


def test_logging_out_other_sessions_ends_them_on_every_node_before_the_ok(
        cluster: Any) -> None:
    c = cluster(2)
    n1, n2 = c.nodes
    here = n1.user("erin")
    there = n2.client()
    try:
        assert there.login("erin")["type"] == "welcome"
        reply = here.request({"type": "passwd", "old": PASSWORD,
                              "new": PASSWORD + " and more", "logout_others": True})
        assert reply["type"] == "ok", reply
        assert there.recv_until("bye")["reason"] == "quit"
    finally:
        here.close()
        there.close()


def test_a_join_made_while_redis_was_down_is_followed_on_every_node_after(
        cluster: Any) -> None:
    c = cluster(2, cluster_node_ttl=120.0)
    n1, n2 = c.nodes
    guest_here = n1.user("guest")
    guest_there = n2.client()
    host = n2.user("host")
    watcher = n1.user("watcher")
    try:
        assert guest_there.login("guest")["type"] == "welcome"
        assert host.request({"type": "join", "room": "late"})["type"] == "ok"
        c.redis.stop()
        for node in c.nodes:
            wait_for(lambda node=node: not node.server.bus.connected.is_set(),
                     "the nodes to notice Redis is gone")
        # Made on node 2; node 1, where guest has a session too, cannot hear of it.
        assert guest_there.request({"type": "join", "room": "late"})["type"] == "ok"
        c.redis.start()
        for node in c.nodes:
            wait_for(lambda node=node: node.server.bus.connected.is_set(),
                     "the nodes to reconnect")
        # Node 1 learns it from the database, and follows the room from then on.
        wait_for(lambda: "late" in n1.server.hub.user_state("guest").rooms,
                 "node 1 to repair guest's rooms")
        sent = host.request({"type": "send", "room": "late", "message": "made it"})
        assert guest_here.recv_until("message", room="late")["msg_id"] == sent["msg_id"]
        # And `who` everywhere agrees with the database.
        assert watcher.request({"type": "join", "room": "late"})["type"] == "ok"
        wait_for(lambda: "guest" in watcher.request(
            {"type": "who", "room": "late"})["users"], "who on node 1 to list guest")
    finally:
        for client in (guest_here, guest_there, host, watcher):
            client.close()


def test_who_forgets_a_member_kicked_on_a_node_where_they_have_no_session(
        cluster: Any) -> None:
    c = cluster(3)
    n1, n2, n3 = c.nodes
    owner = n1.user("owner")
    member = n2.user("member")
    onlooker = n3.user("onlooker")
    try:
        for client in (owner, member, onlooker):
            assert client.request({"type": "join", "room": "den"})["type"] == "ok"
        wait_for(lambda: "member" in onlooker.request(
            {"type": "who", "room": "den"})["users"], "who to list the member")
        assert owner.request({"type": "kick", "room": "den",
                              "username": "member"})["type"] == "ok"
        # The kick is made on node 1 about a session on node 2; node 3 hears both.
        wait_for(lambda: "member" not in onlooker.request(
            {"type": "who", "room": "den"})["users"], "who to forget the member")
    finally:
        for client in (owner, member, onlooker):
            client.close()


@pytest.mark.parametrize(("revision", "says"), [("0005", "older schema"),
                                                ("f00d0000cafe", "newer than this node")])
def test_a_node_joining_running_ones_on_another_schema_is_refused_and_told_why(
        cluster: Any, revision: str, says: str) -> None:
    from chat.config import SettingError

    c = cluster(1)  # running: a joining node may not migrate under it
    (version,) = c.nodes[0].query("SELECT version_num FROM alembic_version")[0]
    from sqlalchemy import create_engine, text

    engine = create_engine(c.db)
    try:
        with engine.begin() as db:
            db.execute(text("UPDATE alembic_version SET version_num = :v"), {"v": revision})
        with pytest.raises(SettingError, match=says):
            c.start_node()
    finally:
        with engine.begin() as db:
            db.execute(text("UPDATE alembic_version SET version_num = :v"), {"v": version})
        engine.dispose()


def test_a_node_whose_database_lock_is_lost_takes_it_again_or_stops_serving(
        cluster: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import psycopg

    from chat import server as server_module

    monkeypatch.setattr(server_module, "LOCK_CHECK", 0.05)
    c = cluster(1)
    node = c.nodes[0]
    alice = node.user("alice")
    conninfo = pgtest._conninfo(c.db)
    # This schema's lock only (pg_locks shows the signed hash as an unsigned oid): other
    # runs' nodes hold theirs on the same database.
    lock_holders = ("SELECT pid FROM pg_locks WHERE locktype = 'advisory' "
                    "AND classid::bigint = 1667785076 AND objsubid = 2 AND granted "
                    "AND objid::bigint = (hashtext(current_schema())::bigint & 4294967295)")
    with psycopg.connect(conninfo, autocommit=True) as admin:
        (holder,) = admin.execute(lock_holders).fetchone()

        def taken_from_the_node() -> bool:
            # As a PostgreSQL restart would: the connection that held the lock is gone;
            # and a lone server is quicker to take it (the node may win a round first).
            for (pid,) in admin.execute(lock_holders).fetchall():
                admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
            return admin.execute("SELECT pg_try_advisory_lock(1667785076, "
                                 "hashtext(current_schema()))").fetchone()[0]

        wait_for(taken_from_the_node, "the test to take the node's lock")
        try:
            assert alice.recv_until("bye")["reason"] == "shutdown"
            assert not node.server.healthy()
        finally:
            admin.execute(
                "SELECT pg_advisory_unlock(1667785076, hashtext(current_schema()))")
        # Free again: the node takes it back and serves again.
        wait_for(lambda: node.server.healthy(), "the node to take its lock again")
        (again,) = admin.execute(lock_holders).fetchone()
        assert again != holder
    back = node.client()
    assert back.login("alice")["type"] == "welcome"
    back.close()
    alice.close()


def test_a_cluster_node_needs_postgresql(
        tmp_path: Path, cert_dir: certs.CertPaths, redis_server: redistest.RedisServer
) -> None:
    """The nodes order their messages with PostgreSQL's locks, through psycopg 3 itself
    (chat.conversations.locked_reads; no other driver is installed here to show it)."""
    from chat.config import SettingError

    settings = make_settings(tmp_path, cert_dir, db=f"sqlite:///{tmp_path}/chat.db",
                             redis=redis_server.url)
    with pytest.raises(SettingError, match="postgresql\\+psycopg://"):
        Server(settings).start()


def test_a_user_registered_on_a_node_behind_joins_general_at_its_newest_message(
        cluster: Any) -> None:
    """A registration puts the user in general from its newest message on (what a
    `joined` history would count from): general's, as the database says under its lock,
    not the registering node's own last id, which lags behind the other nodes'."""
    c = cluster(2)
    n1, n2 = c.nodes
    alice = n1.user("alice")
    try:
        for text in ("one", "two"):
            sent = alice.request({"type": "send", "room": "general", "message": text})
            assert sent["type"] == "message", sent
        n2.register("newbie")
        rows = n2.query("SELECT m.since_msg_id FROM memberships m JOIN users u "
                        "ON u.id = m.user_id WHERE u.username_key = 'newbie' "
                        "AND m.room = 'general'")
        assert rows == [(sent["msg_id"],)], rows
    finally:
        alice.close()


def test_a_redis_outage_shorter_than_the_fence_does_not_close_anyones_session(
        cluster: Any) -> None:
    """Once Redis is back the node subscribes and registers again at once, well before
    FENCE_AFTER of the ttl since its last good beat: a blip must not cut every client
    off (a new user's walkthrough saw a 1.5 s outage fence every node: the subscriber's
    retries were 2 s apart, the heartbeat's a third of the ttl)."""
    c = cluster(1, cluster_node_ttl=20.0)  # the fence only after 12 s: far from the blip
    node = c.nodes[0]
    bus = node.server.bus
    alice = node.user("alice")
    fenced: list[bool] = []
    on_fence = bus.on_fence
    bus.on_fence = lambda cut: (fenced.append(cut), on_fence(cut))
    beat_failed = threading.Event()
    client = bus._client

    def watched() -> Any:
        if threading.current_thread().name == "cluster-heartbeat" and not bus.connected.is_set():
            beat_failed.set()  # a beat while Redis is away
        return client()

    bus._client = watched
    try:
        c.redis.stop()
        wait_for(lambda: not bus.connected.is_set(), "the node to notice Redis is gone")
        assert beat_failed.wait(TIMEOUT), "no beat while Redis was away"
        c.redis.start()
        back = time.monotonic()
        wait_for(lambda: bus.connected.is_set() and bus._last_good > back,
                 "subscribed and registered again")
        assert fenced == [] and not bus.fenced
        sent = alice.request({"type": "send", "room": "general", "message": "still here"})
        assert sent["type"] == "message", sent
    finally:
        alice.close()

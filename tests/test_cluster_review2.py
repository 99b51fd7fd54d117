"""Second outside review of the cluster (issue 19): each test here shows one defect.

In-process nodes share a PostgreSQL schema and a private redis-server (the `cluster`
fixture of test_cluster); the writer's batches are made deterministic by holding it
(WriterGate), never by sleeping.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest
import test_cluster
from conftest import TIMEOUT
from test_cluster import wait_for
from test_cluster_review import Submitted
from writer_gate import WriterGate, reply_to

from chat.store import Job, MessageJob

cluster = test_cluster.cluster  # the fixture: cluster(n, **settings)


class Hold:
    """A job that holds the node's writer inside its batch's transaction (after what was
    queued before it, before COMMIT) until released."""

    def __init__(self, node: Any) -> None:
        self.started, self._release = threading.Event(), threading.Event()

        def run(db: Any) -> None:
            self.started.set()
            self._release.wait(TIMEOUT)

        node.server.store.submit(Job(run, lambda exc: None))

    def wait(self) -> None:
        assert self.started.wait(TIMEOUT), "the held job never ran"

    def release(self) -> None:
        self._release.set()


def is_dm_to(name: str) -> Any:
    return lambda job: isinstance(job, MessageJob) and job.to == name


# --- 1. one node: a batch that begins with a message -----------------------------------
def test_a_single_nodes_batch_of_messages_is_stored_and_echoed(chat_server: Any) -> None:
    """The writer's locked reads (a cluster's) left `read` unbound on one node: a batch
    whose first job was a message failed whole with `internal`."""
    alice = chat_server.user("alice")
    try:
        gate = WriterGate(chat_server.server)
        alice.send({"type": "send", "room": "general", "message": "one", "id": 1})
        alice.send({"type": "send", "room": "general", "message": "two", "id": 2})
        gate.wait_queued(2)
        gate.open()
        for rid, text in ((1, "one"), (2, "two")):
            reply = reply_to(alice, rid)
            assert reply["type"] == "message" and reply["message"] == text, reply
    finally:
        alice.close()


# --- 2. a direct message to a user registered after the batch took its locks --------------
@pytest.mark.redis
def test_a_direct_message_to_a_user_registered_mid_batch_takes_the_users_lock(
        cluster: Any) -> None:
    """The writer locks its batch's conversations at the start; a run of messages after
    another job reads again, and a recipient unknown then but registered since (on
    another node) was read and written without its lock: its `prev` could be one that
    another node's uncommitted message also had, and the node that got the later one
    first dropped the earlier as a duplicate."""
    c = cluster(3)
    n1, n2, n3 = c.nodes
    alice = n1.user("alice")
    carol = n2.user("carol")
    bob = None
    try:
        gate1, seen1 = WriterGate(n1.server), Submitted(n1)
        held1 = Hold(n1)  # the batch's first job: its locks are taken before bob exists
        alice.send({"type": "send", "to": "bob", "message": "from alice", "id": 1})
        seen1.wait_for(is_dm_to("bob"), "alice's direct message")
        seen1.close()
        gate1.open()
        held1.wait()
        bob = n3.user("bob")  # follows u:bob on node 3 from 0
        gate2, seen2 = WriterGate(n2.server), Submitted(n2)
        carol.send({"type": "send", "to": "bob", "message": "from carol", "id": 1})
        seen2.wait_for(is_dm_to("bob"), "carol's direct message")
        seen2.close()
        held2 = Hold(n2)  # carol's message inserted under u:bob's lock, not committed
        gate2.open()
        held2.wait()
        held1.release()
        # Node 1 either stores its message at once (without bob's lock) or waits for it.
        wait_for(lambda: n1.query(
            "SELECT count(*) FROM messages WHERE sender_name = 'alice'")[0][0]
            or n1.query("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                        "AND NOT granted")[0][0], "node 1 to store or wait for the lock")
        held2.release()
        from_alice, from_carol = reply_to(alice, 1), reply_to(carol, 1)
        assert from_alice["type"] == from_carol["type"] == "message"
        last = alice.request({"type": "send", "to": "bob", "message": "last"})
        got = []
        while not got or got[-1] != last["msg_id"]:
            got.append(bob.recv_until("message", to="bob")["msg_id"])
        assert got == sorted({from_alice["msg_id"], from_carol["msg_id"], last["msg_id"]})
    finally:
        for client in (alice, carol, bob):
            if client is not None:
                client.close()


# --- 3. catching up after a reconnect from one position ----------------------------------
@pytest.mark.redis
def test_catching_up_as_the_protocol_says_misses_nothing_over_a_cluster(
        cluster: Any) -> None:
    """Ids come from one sequence and commit in order only within a conversation: den's
    message took its id first and committed after general's, which carol had received
    when her connection went. "After the last id received anywhere" would skip it
    (docs/protocol.md once said so); each conversation's own position does not: den's,
    a room joined after the welcome, is the welcome's last_msg_id."""
    c = cluster(2)
    n1, n2 = c.nodes
    alice = n1.user("alice")
    bob = n2.user("bob")
    n1.register("carol")
    carol = n1.client()
    again = None
    try:
        welcome = carol.login("carol")
        assert welcome["type"] == "welcome" and "positions" in welcome, welcome
        assert welcome["positions"]["rooms"].keys() == set(welcome["rooms"]), welcome
        for who in (bob, carol):
            assert who.request({"type": "join", "room": "den"})["type"] == "ok"
        gate, seen = WriterGate(n2.server), Submitted(n2)
        bob.send({"type": "send", "room": "den", "message": "slow", "id": 1})
        seen.wait_for(lambda job: isinstance(job, MessageJob) and job.room == "den",
                      "bob's message")
        seen.close()
        held = Hold(n2)  # den's message has its id, and is not committed
        gate.open()
        held.wait()
        fast = alice.request({"type": "send", "room": "general", "message": "fast"})
        got = carol.recv_until("message", room="general")
        assert got["msg_id"] == fast["msg_id"]
        carol.close()  # the connection is lost
        held.release()
        slow = reply_to(bob, 1)
        assert slow["type"] == "message" and slow["msg_id"] < got["msg_id"]
        den_position = welcome["positions"]["rooms"].get("den", welcome["last_msg_id"])
        again = n1.client()
        assert again.login("carol")["type"] == "welcome"
        caught = again.request({"type": "history", "room": "den", "after": den_position})
        assert slow["msg_id"] in [m["msg_id"] for m in caught["messages"]], caught
    finally:
        for client in (alice, bob, carol, again):
            if client is not None:
                client.close()

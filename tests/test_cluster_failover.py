"""A node killed with kill -9 in the middle of a burst, behind HAProxy (issue 19's proof).

Three node processes on one PostgreSQL schema and one Redis (tests/clustertest.py). Six
clients come in through the balancer, which spreads them over the nodes; three of them
send a burst to `general`, each message as a request whose echo (`re`) is its
acknowledgement, and all six read. One node is killed with SIGKILL a third of the way
in. Its clients see the connection end, log in again through the balancer (which has
taken the dead node out) and catch up with `history ... after` the newest id they had,
as a client is meant to (docs/protocol.md), then go on.

At the end every stored message is checked: every acknowledged message is stored, none is
stored twice, and every client's view of `general` (what it got live, plus what it caught
up, one copy of each `msg_id`) is exactly what was stored, in `msg_id` order, with each
live stream in order on its own.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from clustertest import wait_until
from conftest import PASSWORD, TIMEOUT

pytestmark = [pytest.mark.redis]

SENDERS = ("sender0", "sender1", "sender2")
READERS = ("reader0", "reader1", "reader2")
PER_SENDER = 90


class Participant:
    """One user's connection through the balancer, on one thread, reconnecting when its
    node dies."""

    def __init__(self, cluster: Any, name: str) -> None:
        self.cluster = cluster
        self.name = name
        self.client = cluster.user(name, register=False)
        self.live: list[list[int]] = [[]]  # msg_ids received live, one list per connection
        self.caught_up: list[int] = []
        self.acked: list[str] = []
        self.unknown: list[str] = []  # sent when the node died: stored or not, unknown
        self.reconnects = 0
        self.newest = 0

    def _take(self, frame: dict[str, Any]) -> None:
        if frame.get("type") == "message" and frame.get("room") == "general":
            self.live[-1].append(frame["msg_id"])
            self.newest = max(self.newest, frame["msg_id"])

    def reconnect(self) -> None:
        """As a client does: again until it works (until the balancer has taken the dead
        node out, a new connection may still be sent there and cut)."""
        self.client.close()
        self.reconnects += 1
        deadline = time.monotonic() + TIMEOUT
        while True:
            try:
                self.client = self.cluster.client()
                self.live.append([])
                welcome = self.call({"type": "login", "username": self.name,
                                     "password": PASSWORD})
                assert welcome["type"] == "welcome", welcome
                self.catch_up()
                return
            except (EOFError, OSError, ValueError):
                assert time.monotonic() < deadline, f"{self.name} could not reconnect"
                time.sleep(0.1)  # a client's backoff, short

    def call(self, frame: dict[str, Any]) -> dict[str, Any]:
        """A request's answer; what arrives live meanwhile is kept, not skipped."""
        self.client._next_id += 1
        rid = self.client._next_id
        self.client.send({**frame, "id": rid})
        while True:
            got = self.client.recv()
            if got.get("re") == rid:
                return got
            self._take(got)

    def catch_up(self) -> None:
        after = self.newest
        while True:
            page = self.call({"type": "history", "room": "general", "after": after,
                              "limit": 200})
            assert page["type"] == "history", page
            if not page["messages"]:
                return
            for m in page["messages"]:
                self.caught_up.append(m["msg_id"])
                self.newest = max(self.newest, m["msg_id"])
            after = page["messages"][-1]["msg_id"]

    def send_all(self, started: threading.Event, sent: list[int]) -> None:
        started.wait(TIMEOUT)
        for i in range(PER_SENDER):
            text = f"{self.name} {i}"
            try:
                self.client._next_id += 1
                rid = self.client._next_id
                self.client.send({"type": "send", "room": "general", "message": text,
                                  "id": rid})
                while True:
                    frame = self.client.recv()
                    self._take(frame)
                    if frame.get("re") == rid:
                        assert frame["type"] == "message", frame
                        self.acked.append(text)
                        break
            except (EOFError, OSError, ValueError):
                self.unknown.append(text)
                self.reconnect()
            sent[0] += 1

    def read_until(self, done: threading.Event) -> None:
        while not done.is_set():
            try:
                # The join is a barrier through the writer: everything the node
                # delivered before it has arrived by its answer.
                self.client._next_id += 1
                rid = self.client._next_id
                self.client.send({"type": "join", "room": "general", "id": rid})
                while True:
                    frame = self.client.recv()
                    self._take(frame)
                    if frame.get("re") == rid:
                        break
            except (EOFError, OSError, ValueError):
                self.reconnect()


def test_a_node_killed_mid_burst_loses_nothing_acknowledged_and_doubles_nothing(
        cluster_factory: Any) -> None:
    cluster = cluster_factory()
    for name in SENDERS + READERS:
        cluster.register(name)
    people = {name: Participant(cluster, name) for name in SENDERS + READERS}
    wait_until(lambda: all(cluster.balancer.sessions().values()),
               "the balancer to spread the clients over every node")
    started, done = threading.Event(), threading.Event()
    sent = [0]
    threads = [threading.Thread(target=people[n].send_all, args=(started, sent))
               for n in SENDERS]
    threads += [threading.Thread(target=people[n].read_until, args=(done,))
                for n in READERS]
    for t in threads:
        t.start()
    started.set()
    wait_until(lambda: sent[0] >= len(SENDERS) * PER_SENDER // 3, "a third of the burst")
    victim = cluster.nodes[0]
    victim.kill()
    for t in threads[:len(SENDERS)]:
        t.join(TIMEOUT * 3)
        assert not t.is_alive()
    done.set()
    for t in threads[len(SENDERS):]:
        t.join(TIMEOUT)
        assert not t.is_alive()

    # What is stored, read through the balancer from a node still alive.
    checker = cluster.user("sender0", register=False)
    stored: list[tuple[int, str]] = []
    after = 0
    while True:
        page = checker.request({"type": "history", "room": "general", "after": after,
                                "limit": 200})["messages"]
        if not page:
            break
        stored += [(m["msg_id"], m["message"]) for m in page if m["username"] in SENDERS]
        after = page[-1]["msg_id"]
    checker.close()
    texts = [t for _, t in stored]
    assert len(texts) == len(set(texts)), "a message was stored twice"
    acked = {t for n in SENDERS for t in people[n].acked}
    assert acked <= set(texts), f"acknowledged but lost: {sorted(acked - set(texts))}"
    unknown = {t for n in SENDERS for t in people[n].unknown}
    assert set(texts) <= acked | unknown
    assert sum(p.reconnects for p in people.values()) > 0  # the victim had clients
    everything = [i for i, _ in stored]
    for p in people.values():
        p.catch_up()  # whatever was still on its way when the burst ended
        for stream in p.live:
            assert stream == sorted(stream) and len(stream) == len(set(stream)), p.name
        seen = sorted({i for stream in p.live for i in stream} | set(p.caught_up))
        mine = [i for i in seen if i in set(everything)]
        missing = sorted(set(everything) - set(mine))
        assert mine == everything, (p.name, missing)
        p.client.close()

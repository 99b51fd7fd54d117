"""Several nodes on one database behind HAProxy, as deploy/ and docs/cluster.md set them
up: what works before the cluster core (cross-node delivery) does. The nodes are server
processes started by tests/clustertest.py, on PostgreSQL, with a Redis of the test's own.
"""

from __future__ import annotations

import pytest
from clustertest import NodeExited, wait_until

pytestmark = [pytest.mark.redis]


def on_one_node(sessions: dict[str, int]) -> str | None:
    """The node holding the one connection the balancer forwards, if there is one."""
    busy = {name: n for name, n in sessions.items() if n}
    return next(iter(busy)) if list(busy.values()) == [1] else None


def test_three_nodes_share_one_schema_and_a_lone_server_is_refused(cluster_factory):
    cluster = cluster_factory(balancer=False)
    assert [node.health() for node in cluster.nodes] == [200, 200, 200]
    # Without `redis` a server wants the database to itself: the nodes' shared lock
    # keeps it out, and it says why.
    lone = cluster.new_node(redis="")
    with pytest.raises(NodeExited) as refused:
        lone.start()
    assert refused.value.returncode == 1
    assert "another server (or chat-admin) is using this database" in refused.value.log
    assert [node.health() for node in cluster.nodes] == [200, 200, 200]


def test_registered_through_the_balancer_on_one_node_logs_in_on_another(cluster_factory):
    cluster = cluster_factory()
    first = cluster.client()
    assert first.request({"type": "register", "username": "alice",
                          "password": "correct horse battery staple 42"})["type"] == "ok"
    registered_on = wait_until(lambda: on_one_node(cluster.balancer.sessions()),
                               "the balancer to count the first connection")
    # Least connections: with the first one still open, the next goes to another node.
    second = cluster.client()
    assert second.login("alice")["type"] == "welcome"
    sessions = cluster.balancer.sessions()
    assert sessions[registered_on] == 1 and sum(sessions.values()) == 2, sessions
    first.close()
    second.close()
    for node in cluster.nodes:  # and straight to each node, past the balancer
        c = node.client()
        assert c.login("alice")["type"] == "welcome", node
        # This one only, once the node has seen the balancer's two go.
        wait_until(lambda n=node: n.metrics()["chat_connections"] == 1,
                   f"{node.name} to hold one connection")
        c.close()


def test_a_node_killed_with_kill_9_is_taken_out_and_its_clients_log_in_on_the_others(
        cluster_factory):
    cluster = cluster_factory()
    cluster.register("alice")
    alice = cluster.user("alice", register=False)
    name = wait_until(lambda: on_one_node(cluster.balancer.sessions()),
                      "the balancer to count alice's connection")
    dead = cluster.node(name)
    dead.kill()
    assert alice.at_eof()
    alice.close()
    cluster.balancer.wait_status(name, "DOWN")
    # Every new connection lands on a node still alive, and the user is known there.
    held = [cluster.user("alice", register=False) for _ in range(4)]
    sessions = cluster.balancer.sessions()
    assert sessions[name] == 0 and sum(sessions.values()) == 4, sessions
    # Started again, the node is UP once its check passes, and least connections sends
    # it the next client: it has none while the others hold two each.
    dead.start()
    cluster.balancer.wait_status(name, "UP")
    back = cluster.user("alice", register=False)
    assert cluster.balancer.sessions()[name] == 1
    for c in [*held, back]:
        c.close()


def test_a_hung_node_is_taken_out_and_its_clients_are_cut_loose(cluster_factory):
    cluster = cluster_factory()
    cluster.register("alice")
    alice = cluster.user("alice", register=False)
    name = wait_until(lambda: on_one_node(cluster.balancer.sessions()),
                      "the balancer to count alice's connection")
    hung = cluster.node(name)
    # Stopped, the node keeps its sockets open: its clients would wait on it for as long
    # as the balancer's timeouts allow, unless its failed checks cut them loose
    # (on-marked-down shutdown-sessions), so that they reconnect elsewhere.
    hung.pause()
    try:
        cluster.balancer.wait_status(name, "DOWN")
        assert alice.at_eof()
        again = cluster.user("alice", register=False)
        assert cluster.balancer.sessions()[name] == 0
        again.close()
    finally:
        hung.resume()
    alice.close()
    cluster.balancer.wait_status(name, "UP")

"""Third outside review of the cluster: each test here shows one defect.

Most drive one ClusterHub by hand (fake sessions, a fake clock): the interleavings are
the test's own, not the machine's.
"""

from __future__ import annotations

import test_cluster
from test_cluster_review import Clock, connection_news, fake_session

cluster = test_cluster.cluster  # the fixture: cluster(n, **settings)


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

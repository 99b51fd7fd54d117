"""Second outside review of the cluster (issue 19): each test here shows one defect.

In-process nodes share a PostgreSQL schema and a private redis-server (the `cluster`
fixture of test_cluster); the writer's batches are made deterministic by holding it
(WriterGate), never by sleeping.
"""

from __future__ import annotations

from typing import Any

import pytest
import test_cluster
from writer_gate import WriterGate, reply_to

cluster = test_cluster.cluster  # the fixture: cluster(n, **settings)


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

"""Regression tests for the review of e2e step 2 (to-device messages, device-list
notices, encrypted conversations). Each forces its interleaving by holding the store's
writer (and, where the order of two deliveries matters, the I/O loops) instead of hoping
that a timing window opens."""

from __future__ import annotations

import threading
from typing import Any

from conftest import TIMEOUT
from test_todevice import Device, Megolm, call
from writer_gate import WriterGate, reply_to


def _perform(server: Any, action: str, **args: Any) -> threading.Thread:
    """Run a chat-admin action through the control socket's code, on a thread (it waits
    for the writer)."""
    thread = threading.Thread(target=server.server.control.perform,
                              args=({"action": action, "args": args},), daemon=True)
    thread.start()
    return thread


# --- a device removed by the operator while its session is live ---------------------
def test_a_send_behind_the_operators_device_removal_no_longer_speaks_as_that_device(
        chat_server):
    """The removal unbound the device's sessions only in its continuation, after the whole
    batch: a to_device the session pipelined behind it failed on the foreign key
    (`internal`, a traceback in the log), and an encrypted message naming the removed
    device was stored and relayed."""
    alice = Device(chat_server, "alice", "laptop", register=True)
    bob = Device(chat_server, "bob", "phone", register=True)
    call(alice.conn, {"type": "create", "room": "secret", "visibility": "private",
                      "encrypted": True})
    envelope = Megolm(alice).envelope("after removal")
    gate = WriterGate(chat_server.server)
    admin = _perform(chat_server, "device_remove", name="alice", device="laptop")
    gate.wait_queued(1)
    alice.conn.send({"type": "to_device", "send_id": "late", "id": "late", "messages": [
        {"username": "bob", "device": "phone", "olm": alice.olm()}]})
    alice.conn.send({"type": "send", "room": "secret", "encrypted": envelope, "id": "msg"})
    gate.wait_queued(3)
    gate.open()
    admin.join(TIMEOUT)
    late = reply_to(alice.conn, "late")
    assert late["type"] == "error" and late["code"] == "invalid_field", late
    msg = reply_to(alice.conn, "msg")
    assert msg["type"] == "error" and msg["code"] == "invalid_field", msg
    bob.pump()
    assert bob.received() == []

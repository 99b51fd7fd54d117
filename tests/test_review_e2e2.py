"""Regression tests for the review of e2e step 2 (to-device messages, device-list
notices, encrypted conversations). Each forces its interleaving by holding the store's
writer (and, where the order of two deliveries matters, the I/O loops) instead of hoping
that a timing window opens."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from conftest import TIMEOUT
from test_todevice import Device, Megolm, call
from writer_gate import WriterGate, reply_to

from chat.store import Job


def _perform(server: Any, action: str, **args: Any) -> threading.Thread:
    """Run a chat-admin action through the control socket's code, on a thread (it waits
    for the writer)."""
    thread = threading.Thread(target=server.server.control.perform,
                              args=({"action": action, "args": args},), daemon=True)
    thread.start()
    return thread


@contextmanager
def held_loops(server: Any) -> Iterator[None]:
    """Every I/O loop runs a callback that waits: what the writer delivers meanwhile goes
    out (or is queued) in the writer's order, and a loop's own call_soon work waits."""
    release = threading.Event()
    started = []
    for loop in server.server.loops:
        entered = threading.Event()
        started.append(entered)

        def hold(entered: threading.Event = entered) -> None:
            entered.set()
            release.wait(TIMEOUT)

        loop.call_soon(hold)
    for entered in started:
        assert entered.wait(TIMEOUT)
    try:
        yield
    finally:
        release.set()


def _writer_done(server: Any) -> None:
    """Wait until the writer has run everything submitted before, continuations included."""
    done = threading.Event()
    server.server.store.submit(Job(lambda db: done.set, lambda exc: done.set()))
    assert done.wait(TIMEOUT)


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


# --- a notice never overtakes the reply to an earlier query_keys ---------------------
def test_a_device_list_notice_does_not_overtake_the_keys_it_makes_stale(chat_server):
    """query_keys' reply went out from the loop (call_soon) while a device_list notice
    decided after it went out from the writer at once: the client read the notice, then
    keys without the new device, and took those as current."""
    carol = chat_server.user("carol")
    chat_server.register("alice")
    second = chat_server.user("alice", register=False)
    gate = WriterGate(chat_server.server)
    carol.send({"type": "query_keys", "users": ["alice"], "id": "q"})
    gate.wait_queued(1)
    import vodozemac
    from test_devices import device_frame

    second.send({**device_frame(vodozemac.Account(), "alice", "new"), "id": "bind"})
    gate.wait_queued(2)
    with held_loops(chat_server):
        gate.open()
        _writer_done(chat_server)
    order = []
    while len(order) < 2:
        frame = carol.recv()
        if frame["type"] in ("keys", "device_list"):
            order.append(frame["type"])
    assert order == ["keys", "device_list"]


# --- what the server keeps of a device's sends -----------------------------------------
def test_a_device_s_remembered_send_ids_are_bounded_by_count_not_only_by_age(chat_server):
    """Every send_id was kept for a day, each with its answer (the skipped targets, up to a
    frame's worth): a device sending ten frames a second left 864,000 rows a day, not the
    few KB security.md promises."""
    from sqlalchemy import text

    keep = chat_server.settings.to_device_send_ids
    alice = Device(chat_server, "alice", "laptop", register=True)
    olm = alice.olm()
    n = keep + 40
    for i in range(n):  # pipelined: the replies are read below
        alice.conn.send({"type": "to_device", "send_id": f"s{i}", "id": i, "messages": [
            {"username": "nobody-here", "device": "x", "olm": olm}]})
    for i in range(n):
        assert reply_to(alice.conn, i)["type"] == "ok"
    with chat_server.server.engine.connect() as db:
        kept = db.execute(text("SELECT count(*) FROM to_device_sends")).scalar_one()
    assert kept <= keep
    # The latest are still answered again, not queued twice.
    repeat = alice.to_device([("nobody-here", "x")], f"s{n - 1}")
    assert repeat["repeat"] is True


# --- found here, fixed on main ---------------------------------------------------------
def test_a_device_the_operator_removed_cannot_come_back_by_uploading_its_keys(chat_server):
    """chat-admin device remove is for "a lost phone: nobody can start a session with it";
    but the phone's session (or its next login, with the saved password) sends
    device_keys again and the server takes the same keys as a new device."""
    from test_devices import device_frame

    laptop = Device(chat_server, "alice", "laptop", register=True)
    _perform(chat_server, "device_remove", name="alice", device="laptop").join(TIMEOUT)
    _writer_done(chat_server)
    reply, _ = call(laptop.conn, device_frame(laptop.account, "alice", "laptop"))
    assert reply["type"] == "error", reply


def test_one_sender_cannot_fill_a_device_s_queue_for_everyone(server_factory):
    """Any user could fill any offline device's queue (max_to_device_queue) with junk;
    every room key sent to it afterwards was skipped with queue_full until the device
    came back and acknowledged. Another user now has a share of it
    (max_to_device_per_sender); the device's own user, forwarding keys to a new device,
    may use all of it."""
    server = server_factory(max_to_device_queue=6, max_to_device_per_sender=2)
    bob = Device(server, "bob", "phone", register=True)
    bob.conn.close()
    mallory = Device(server, "mallory", "evil", register=True)
    flood = mallory.to_device([("bob", "phone")] * 4, "flood")
    assert flood["queued"] == 2  # its share; the rest is queue_full for it alone
    assert [s["reason"] for s in flood["skipped"]] == ["queue_full"] * 2
    alice = Device(server, "alice", "laptop", register=True)
    assert alice.to_device([("bob", "phone")], "room-key")["queued"] == 1
    laptop = Device(server, "bob", "laptop")  # bob's own: the rest of the queue
    assert laptop.to_device([("bob", "phone")] * 4, "forwarded")["queued"] == 3

"""To-device messages, device-list notices and encrypted conversations over TLS
(end-to-end encryption, step 2), with real vodozemac Olm and Megolm sessions."""

from __future__ import annotations

import base64
import os
from typing import Any

import pytest
import vodozemac
from test_devices import device_frame, one_time_keys


class Device:
    """A device of a test user: its Olm account and a logged-in connection bound to it."""

    def __init__(self, server: Any, user: str, name: str, *, register: bool = False,
                 account: vodozemac.Account | None = None) -> None:
        self.user, self.name = user, name
        self.account = account or vodozemac.Account()
        self.conn = server.user(user, register=register)
        self.frames: list[dict[str, Any]] = []
        reply, self.frames = call(self.conn, device_frame(self.account, user, name))
        assert reply["type"] == "ok", reply
        self.curve = self.account.curve25519_key.to_base64()
        self.pump()  # the queue comes after the ok

    def upload_keys(self, n: int = 3) -> None:
        reply, more = call(self.conn, {
            "type": "one_time_keys", "device": self.name,
            "keys": one_time_keys(self.account, self.user, self.name, n),
            "fallback": one_time_keys(self.account, self.user, self.name, 0, fallback=True)[0]})
        assert reply["type"] == "ok", reply
        self.frames += more
        self.account.mark_keys_as_published()

    def olm(self, text: bytes = b"x") -> dict[str, Any]:
        """An Olm message from this device (to a fresh peer key: the server cannot tell)."""
        peer = vodozemac.Account()
        peer.generate_one_time_keys(1)
        otk = next(iter(peer.one_time_keys.values()))
        message = self.account.create_outbound_session(peer.curve25519_key, otk).encrypt(text)
        kind, body = message.to_parts()
        return {"type": kind, "body": base64.b64encode(body).decode().rstrip("="),
                "sender_key": self.curve}

    def to_device(self, targets: list[tuple[str, str]], send_id: str,
                  **kw: Any) -> dict[str, Any]:
        reply, more = call(self.conn, {"type": "to_device", "send_id": send_id, "messages": [
            {"username": u, "device": d, "olm": self.olm()} for u, d in targets], **kw})
        self.frames += more
        return reply

    def received(self) -> list[int]:
        """The seqs of the to-device messages read so far (and clears them)."""
        seqs = [f["seq"] for f in self.frames if f["type"] == "to_device"]
        self.frames = [f for f in self.frames if f["type"] != "to_device"]
        return seqs

    def pump(self) -> None:
        """Read everything the writer delivered before a round trip through it (a `ping`
        is answered by the loop, and may overtake what the writer is delivering): joining
        general, which one is in, changes nothing and is answered in the writer's order."""
        _, more = call(self.conn, {"type": "join", "room": "general"})
        self.frames += more

    def ack(self, upto: int) -> dict[str, Any]:
        reply, more = call(self.conn, {"type": "to_device_ack", "upto": upto})
        self.frames += more
        self.pump()  # the next page comes after the ok
        return reply


def call(conn: Any, frame: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Send a request; its answer, and every other frame that came before it."""
    conn._next_id += 1
    rid = conn._next_id
    conn.send({**frame, "id": rid})
    others = []
    while True:
        got = conn.recv()
        if got.get("re") == rid or (got["type"] == "pong" and frame["type"] == "ping"):
            return got, others
        others.append(got)


def test_a_device_gets_its_queue_in_order_at_bind_until_it_acknowledges(server_factory):
    server = server_factory(to_device_page=2)
    server.register("bob")
    bob = Device(server, "bob", "phone")
    bob.conn.close()
    alice = Device(server, "alice", "laptop", register=True)
    reply = alice.to_device([("Bob", "phone")] * 3, "s1")
    assert reply == {"type": "ok", "op": "to_device", "send_id": "s1", "queued": 3,
                     "skipped": [], "re": reply["re"]}
    first = Device(server, "bob", "phone", account=bob.account)
    frames = [f for f in first.frames if f["type"] == "to_device"]
    assert [(f["username"], f["device"]) for f in frames] == [("alice", "laptop")] * 2
    seqs = first.received()
    assert seqs == sorted(seqs) and len(seqs) == 2  # one page
    assert first.ack(seqs[-1])["type"] == "ok"
    (third,) = first.received()  # the next page follows the acknowledgement
    assert third > seqs[-1]
    first.conn.close()
    # Not acknowledged: the third comes again at the next bind, and only it.
    again = Device(server, "bob", "phone", account=bob.account)
    assert again.received() == [third]
    again.ack(third)
    # From now on the device's queue is given out: new messages come live.
    alice.to_device([("bob", "phone")], "s2")
    again.pump()
    (live,) = again.received()
    assert live > third
    again.ack(live)
    again.conn.close()
    assert Device(server, "bob", "phone", account=bob.account).received() == []


def test_a_page_in_progress_keeps_order_with_messages_sent_meanwhile(server_factory):
    server = server_factory(to_device_page=2)
    server.register("bob")
    bob = Device(server, "bob", "phone")
    bob.conn.close()
    alice = Device(server, "alice", "laptop", register=True)
    alice.to_device([("bob", "phone")] * 3, "before")
    bob = Device(server, "bob", "phone", account=bob.account)
    got = bob.received()
    assert len(got) == 2
    alice.to_device([("bob", "phone")] * 2, "meanwhile")  # not live: a page is pending
    bob.pump()
    assert bob.received() == []
    bob.ack(got[-1])
    got += bob.received()
    bob.ack(got[-1])
    got += bob.received()
    assert len(got) == 5 and got == sorted(got)


def test_a_send_id_makes_a_send_idempotent_and_skips_are_reported(server_factory):
    server = server_factory(max_to_device_queue=2)
    server.register("bob")
    bob = Device(server, "bob", "phone")
    bob.conn.close()
    alice = Device(server, "alice", "laptop", register=True)
    targets = [("bob", "phone"), ("bob", "tablet"), ("nobody-here", "x"), ("bob", "phone"),
               ("bob", "phone")]
    first = alice.to_device(targets, "once")
    assert first["queued"] == 2
    assert [(s["username"], s["device"], s["reason"]) for s in first["skipped"]] == [
        ("bob", "tablet", "no_such_device"), ("nobody-here", "x", "no_such_device"),
        ("bob", "phone", "queue_full")]
    repeat = alice.to_device([("bob", "phone")], "once")
    assert repeat["repeat"] is True and repeat["queued"] == 2
    assert repeat["skipped"] == first["skipped"]
    assert len(Device(server, "bob", "phone", account=bob.account).received()) == 2


def test_to_device_needs_this_sessions_device_and_its_key(chat_server):
    alice = chat_server.user("alice")
    device = Device(chat_server, "alice", "laptop")
    unbound = chat_server.user("alice", register=False)
    olm = device.olm()
    reply, _ = call(unbound, {"type": "to_device", "send_id": "a", "messages": [
        {"username": "alice", "device": "laptop", "olm": olm}]})
    assert reply["code"] == "invalid_field" and "device_keys first" in reply["message"]
    other = Device(chat_server, "alice", "phone")
    reply, _ = call(other.conn, {"type": "to_device", "send_id": "a", "messages": [
        {"username": "alice", "device": "laptop", "olm": olm}]})  # laptop's sender_key
    assert reply["code"] == "invalid_field" and "sender_key" in reply["message"]
    for bad in ({**olm, "type": 2}, {**olm, "body": "not base64!"}, {**olm, "extra": 1},
                {**olm, "sender_key": "short"}):
        reply, _ = call(device.conn, {"type": "to_device", "send_id": "b", "messages": [
            {"username": "alice", "device": "phone", "olm": bad}]})
        assert reply["code"] == "invalid_field", bad
    reply, _ = call(alice, {"type": "to_device_ack", "upto": 1})
    assert reply["code"] == "invalid_field"


def test_device_changes_are_told_to_rooms_askers_and_the_user(chat_server):
    from chat import admin

    alice, bob = chat_server.user("alice"), chat_server.user("bob")
    carol, dave = chat_server.user("carol"), chat_server.user("dave")
    # An encrypted room carries the notices (general, which has everyone, does not).
    assert alice.request({"type": "create", "room": "team", "visibility": "private",
                          "encrypted": True})["type"] == "ok"
    assert alice.request({"type": "invite", "room": "team", "username": "bob"})["type"] == "ok"
    assert bob.request({"type": "join", "room": "team"})["type"] == "ok"
    assert call(carol, {"type": "query_keys", "users": ["alice"]})[0]["type"] == "keys"
    Device(chat_server, "alice", "laptop")
    for c in (alice, bob, carol):
        assert c.recv_until("device_list") == {"type": "device_list", "username": "alice"}
    _, seen = call(dave, {"type": "join", "room": "general"})  # through the writer
    assert not [f for f in seen if f["type"] == "device_list"]
    # The operator removes it: told again, and the device's keys and queue are gone.
    assert admin.main(["--data-dir", chat_server.settings.data_dir, "device", "remove",
                       "alice", "laptop"]) == 0
    for c in (alice, bob, carol):
        assert c.recv_until("device_list") == {"type": "device_list", "username": "alice"}


def test_a_session_follows_at_most_max_key_watch_users(server_factory):
    server = server_factory(max_key_watch=1)
    asker = server.user("asker")
    for name in ("alice", "bob"):
        server.register(name)
    call(asker, {"type": "query_keys", "users": ["alice"]})
    call(asker, {"type": "query_keys", "users": ["bob"]})  # alice is dropped
    Device(server, "alice", "laptop")
    Device(server, "bob", "laptop")
    assert asker.recv_until("device_list") == {"type": "device_list", "username": "bob"}
    _, seen = call(asker, {"type": "join", "room": "general"})  # through the writer
    assert not [f for f in seen if f["type"] == "device_list"]


# --- encrypted conversations ---------------------------------------------------------
class Megolm:
    def __init__(self, device: Device) -> None:
        self.device, self.session = device, vodozemac.GroupSession()

    def envelope(self, text: str) -> dict[str, str]:
        return {"algorithm": "megolm", "device": self.device.name,
                "sender_key": self.device.curve, "session_id": self.session.session_id,
                "ciphertext": self.session.encrypt(text.encode()).to_base64()}


def test_an_encrypted_room_takes_and_keeps_only_ciphertext(chat_server):
    owner = Device(chat_server, "alice", "laptop", register=True)
    alice = owner.conn
    reply, _ = call(alice, {"type": "create", "room": "open", "encrypted": True})
    assert reply["code"] == "invalid_field"  # only a private room
    reply, _ = call(alice, {"type": "create", "room": "secret", "visibility": "private",
                            "encrypted": True})
    assert reply["encrypted"] is True
    reply, _ = call(alice, {"type": "send", "room": "secret", "message": "plain"})
    assert reply["code"] == "forbidden" and "encrypted" in reply["message"]
    group = Megolm(owner)
    reply, _ = call(alice, {"type": "send", "room": "general",
                            "encrypted": group.envelope("x")})
    assert reply["code"] == "invalid_field"  # not an encrypted room
    inbound = vodozemac.InboundGroupSession(group.session.session_key)
    envelope = group.envelope("hello")
    reply, _ = call(alice, {"type": "send", "room": "secret", "encrypted": envelope})
    assert reply["type"] == "message" and reply["encrypted"] == envelope
    assert reply["message"] == "[encrypted]"
    info, _ = call(alice, {"type": "room_info", "room": "secret"})
    assert info["encrypted"] is True
    listed, _ = call(alice, {"type": "list_rooms"})
    assert [r.get("encrypted") for r in listed["rooms"] if r["room"] == "secret"] == [True]
    history, _ = call(alice, {"type": "history", "room": "secret"})
    (stored,) = history["messages"]
    assert stored["encrypted"] == envelope and stored["message"] == "[encrypted]"
    decrypted = inbound.decrypt(vodozemac.MegolmMessage.from_base64(stored["encrypted"]
                                                                    ["ciphertext"]))
    assert decrypted.plaintext == b"hello"


def test_an_envelope_must_name_this_sessions_device(chat_server):
    owner = Device(chat_server, "alice", "laptop", register=True)
    call(owner.conn, {"type": "create", "room": "secret", "visibility": "private",
                      "encrypted": True})
    envelope = Megolm(owner).envelope("x")
    for bad in ({**envelope, "device": "phone"},
                {**envelope, "sender_key": Device(chat_server, "alice", "phone").curve}):
        reply, _ = call(owner.conn, {"type": "send", "room": "secret", "encrypted": bad})
        assert reply["code"] == "invalid_field", bad
    unbound = chat_server.user("alice", register=False)
    reply, _ = call(unbound, {"type": "send", "room": "secret", "encrypted": envelope})
    assert reply["code"] == "invalid_field"
    for bad in ({**envelope, "algorithm": "olm"}, {**envelope, "room": "x"},
                {**envelope, "ciphertext": "!!"}):
        reply, _ = call(owner.conn, {"type": "send", "room": "secret", "encrypted": bad})
        assert reply["code"] == "invalid_field", bad
    reply, _ = call(owner.conn, {"type": "send", "room": "secret", "encrypted": envelope,
                                 "message": "both"})
    assert reply["code"] == "invalid_field"


def test_encrypted_direct_messages_are_stored_and_delivered_offline(chat_server):
    chat_server.register("bob")
    alice = Device(chat_server, "alice", "laptop", register=True)
    envelope = Megolm(alice).envelope("psst")
    reply, _ = call(alice.conn, {"type": "send", "to": "bob", "encrypted": envelope})
    assert reply["to"] == "bob" and reply["encrypted"] == envelope
    bob = chat_server.user("bob", register=False)
    dm = bob.recv_until("message")
    assert dm["encrypted"] == envelope and dm["username"] == "alice"
    # A v1 client's plaintext DM still works.
    reply, _ = call(bob, {"type": "send", "to": "alice", "message": "plain is fine"})
    assert reply["message"] == "plain is fine"


@pytest.mark.parametrize("form", ["raw", "base64", "hex"])
def test_the_server_keeps_no_plaintext_of_an_encrypted_message(chat_server, form):
    """A canary: what the server stores and logs holds no trace of the plaintext."""
    canary = "canary-" + os.urandom(12).hex()
    alice = Device(chat_server, "alice", "laptop", register=True)
    call(alice.conn, {"type": "create", "room": "secret", "visibility": "private",
                      "encrypted": True})
    group = Megolm(alice)
    for target in ({"room": "secret"}, {"to": "alice"}):
        reply, _ = call(alice.conn, {"type": "send", **target,
                                     "encrypted": group.envelope(canary)})
        assert reply["type"] == "message", reply
    needle = {"raw": canary.encode(), "base64": base64.b64encode(canary.encode()),
              "hex": canary.encode().hex().encode()}[form]
    data_dir = chat_server.settings.data_dir
    files = [os.path.join(data_dir, f) for f in os.listdir(data_dir)]
    assert any(f.endswith("chat.db") for f in files)
    for path in files:
        if os.path.isfile(path):
            with open(path, "rb") as f:
                assert needle not in f.read(), path


"""To-device messages, device-list notices and encrypted conversations over TLS
(end-to-end encryption, step 2), with real vodozemac Olm and Megolm sessions."""

from __future__ import annotations

import base64
import os
from typing import Any

import pytest
import vodozemac
from test_devices import device_frame, one_time_keys

# Storage is what these exercise: each runs on SQLite and on PostgreSQL (conftest).
pytestmark = pytest.mark.both_engines


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
        """Read everything the writer sent before a round trip through it (a ping is
        answered by the connection's own thread, and could overtake a page)."""
        self.frames += barrier(self.conn)

    def ack(self, upto: int) -> dict[str, Any]:
        reply, more = call(self.conn, {"type": "to_device_ack", "upto": upto})
        self.frames += more
        self.pump()  # the next page comes after the ok
        return reply


def barrier(conn: Any) -> list[dict[str, Any]]:
    """Every frame the writer sent this connection before now: joining a room one is in
    is answered in the writer's order, after them."""
    reply, more = call(conn, {"type": "join", "room": "general"})
    assert reply["type"] == "ok", reply
    return more


def call(conn: Any, frame: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Send a request; its answer, and every other frame that came before it."""
    conn._next_id += 1
    rid = conn._next_id
    conn.send({**frame, "id": rid})
    others = []
    while True:
        got = conn.recv()
        if got.get("re") == rid:
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

    # Sessions that use encryption: alice's and bob's bound to a device, carol asking.
    alice = Device(chat_server, "alice", "desk", register=True).conn
    bob = Device(chat_server, "bob", "phone", register=True).conn
    carol, dave = chat_server.user("carol"), chat_server.user("dave")
    plain = chat_server.user("bob", register=False)  # a v1 client of bob's, in the room
    # An encrypted room carries the notices (general, which has everyone, does not).
    assert alice.request({"type": "create", "room": "team", "visibility": "private",
                          "encrypted": True})["type"] == "ok"
    assert alice.request({"type": "invite", "room": "team", "username": "bob"})["type"] == "ok"
    assert bob.request({"type": "join", "room": "team"})["type"] == "ok"
    assert call(carol, {"type": "query_keys", "users": ["alice"]})[0]["type"] == "keys"
    Device(chat_server, "alice", "laptop")
    for c in (alice, bob, carol):
        assert c.recv_until("device_list") == {"type": "device_list", "username": "alice"}
    for c in (dave, plain):  # not concerned, or would not know the frame
        assert not [f for f in barrier(c) if f["type"] == "device_list"]
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
    assert not [f for f in barrier(asker) if f["type"] == "device_list"]


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


@pytest.mark.sqlite_only  # it searches the database's files, WAL included
def test_the_server_keeps_no_plaintext_of_an_encrypted_message(chat_server, monkeypatch,
                                                               caplog):
    """A canary: what the server decodes, stores and logs holds no trace of the plaintext,
    raw, in base64 or in hex (the server only ever had ciphertext)."""
    import logging

    from chat import protocol

    decoded: list[bytes] = []
    real = protocol.FrameDecoder.next_event

    def recording(self):
        event = real(self)
        if isinstance(event, dict):
            decoded.append(repr(event).encode())
        return event

    monkeypatch.setattr(protocol.FrameDecoder, "next_event", recording)
    caplog.set_level(logging.DEBUG)
    canary = "canary-" + os.urandom(12).hex()
    alice = Device(chat_server, "alice", "laptop", register=True)
    call(alice.conn, {"type": "create", "room": "secret", "visibility": "private",
                      "encrypted": True})
    group = Megolm(alice)
    for target in ({"room": "secret"}, {"to": "alice"}):
        reply, _ = call(alice.conn, {"type": "send", **target,
                                     "encrypted": group.envelope(canary)})
        assert reply["type"] == "message", reply
    assert call(alice.conn, {"type": "history", "room": "secret"})[0]["messages"]
    data_dir = chat_server.settings.data_dir
    files = [os.path.join(data_dir, f) for f in os.listdir(data_dir)]
    assert any(f.endswith("chat.db-wal") for f in files)  # the WAL is searched too
    haystacks = [b"".join(decoded), caplog.text.encode()]
    for path in files:
        if os.path.isfile(path):
            with open(path, "rb") as f:
                haystacks.append(f.read())
    assert any(b"secret" in h for h in haystacks)  # the search can find what is there
    for needle in (canary.encode(), base64.b64encode(canary.encode()),
                   canary.encode().hex().encode()):
        for hay in haystacks:
            assert needle not in hay


def test_removing_a_device_drops_its_queue(chat_server):
    from chat import admin

    chat_server.register("bob")
    bob = Device(chat_server, "bob", "phone")
    bob.conn.close()
    alice = Device(chat_server, "alice", "laptop", register=True)
    assert alice.to_device([("bob", "phone")] * 2, "q")["queued"] == 2
    d = chat_server.settings.data_dir

    def queued() -> int:
        return chat_server.query("SELECT count(*) FROM to_device")[0][0]

    assert queued() == 2
    assert admin.main(["--data-dir", d, "device", "remove", "bob", "phone"]) == 0
    assert queued() == 0
    reply = alice.to_device([("bob", "phone")], "r")
    assert reply["skipped"][0]["reason"] == "no_such_device"

"""The client's end-to-end core with real vodozemac: machines pass payloads between them
through a fake directory and queue (no server, no sockets), as the server would relay."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import pytest
import vodozemac

from chat import devices
from chat.client.conversations import conversation_of, dm_conversation
from chat.client.crypto import E2E
from chat.client.e2e_results import E2EError, Refused, Status
from chat.client.keystore import KeyStore
from chat.client.sas import Party, SasError, Verification
from chat.protocol import DEFAULT_MAX_FRAME_BYTES, encode


class Net:
    """What the server does, minus TLS: a device directory, one-time keys, a to-device
    queue per device, message ids."""

    def __init__(self, tmp_path) -> None:
        self.tmp = tmp_path
        self.machines: dict[tuple[str, str], E2E] = {}
        self.directory: dict[str, dict[str, dict[str, Any]]] = {}
        self.otks: dict[tuple[str, str], list[dict[str, Any]]] = {}
        self.fallback: dict[tuple[str, str], dict[str, Any]] = {}
        self.seq = 0
        self.msg_id = 100

    def device(self, user: str, device: str, **kw: Any) -> E2E:
        store = KeyStore.open(self.tmp / user / f"{device}.sqlite3")
        machine = E2E(store, user, device, **kw)
        keys = machine.device_keys_request()
        devices.verify_device(user, devices.parse_device(keys))  # as the server checks
        entry = {k: keys[k] for k in ("device", "curve25519", "ed25519", "signature")}
        self.directory.setdefault(user.lower(), {})[device] = entry
        self.upload(machine, 0)
        self.machines[(user.lower(), device)] = machine
        return machine

    def upload(self, machine: E2E, held: int) -> None:
        request = machine.one_time_keys_request(held)
        if request is None:
            return
        dev = devices.parse_device(machine.device_keys_request())
        for key in request["keys"]:
            devices.verify_one_time_key(machine.username, dev, devices.parse_one_time_key(key))
        self.otks.setdefault((machine.user, machine.device), []).extend(request["keys"])
        if "fallback" in request:
            devices.verify_one_time_key(machine.username, dev, devices.parse_one_time_key(
                request["fallback"], fallback=True))
            self.fallback[(machine.user, machine.device)] = request["fallback"]
        machine.keys_published()

    def keys_frame(self, *users: str) -> dict[str, Any]:
        return {"type": "keys", "users": {u: list(self.directory.get(u, {}).values())
                                          for u in users if u in self.directory}}

    def query(self, machine: E2E, *users: str):
        return machine.receive_keys(self.keys_frame(*users))

    def claim(self, machine: E2E, targets) -> None:
        for user, device in machine.sessions_needed(targets):
            queue = self.otks.get((user, device))
            key = queue.pop(0) if queue else {**self.fallback[(user, device)], "fallback": True}
            machine.receive_claimed({"type": "claimed", "username": user, "device": device,
                                     "key": key})

    def frame(self, sender: E2E, entry: dict[str, Any]) -> dict[str, Any]:
        self.seq += 1
        return {"type": "to_device", "seq": self.seq, "username": sender.user,
                "device": sender.device, "olm": entry["olm"]}

    def deliver(self, sender: E2E, entries: list[dict[str, Any]]):
        results = []
        for entry in entries:
            target = self.machines[(entry["username"], entry["device"])]
            results.append(target.receive_to_device(self.frame(sender, entry)))
        return results

    def share(self, sender: E2E, conversation: str, targets, **kw: Any):
        self.claim(sender, targets)
        share = sender.prepare(conversation, targets, **kw)
        assert not share.need_sessions
        return self.deliver(sender, share.messages)

    def send(self, sender: E2E, conversation: str, text: str, **where: str) -> dict[str, Any]:
        self.msg_id += 1
        return {"type": "message", "msg_id": self.msg_id, "ts": "2026-12-06T00:00:00.000Z",
                "username": sender.user, **where, "message": "[encrypted]",
                "encrypted": sender.encrypt(conversation, text)}

    def all_devices(self, *users: str) -> list[tuple[str, str]]:
        return [(u, d) for u in users for d in self.directory.get(u, {})]


@pytest.fixture
def net(tmp_path):
    return Net(tmp_path)


def trio(net: Net):
    alice, bob, carol = (net.device(u, d) for u, d in
                         (("alice", "laptop"), ("bob", "phone"), ("carol", "desk")))
    for m in (alice, bob, carol):
        net.query(m, "alice", "bob", "carol")
    return alice, bob, carol


def test_published_keys_pass_the_servers_own_checks_and_are_topped_up(net):
    alice = net.device("alice", "laptop")  # Net.device runs the server's checks
    assert len(net.otks[("alice", "laptop")]) == 50 and ("alice", "laptop") in net.fallback
    assert alice.one_time_keys_request(40) is None  # plenty left
    again = alice.one_time_keys_request(10)
    assert len(again["keys"]) == 40 and "fallback" not in again
    alice.keys_published()
    fp = alice.fingerprint()
    assert fp.replace(" ", "") == alice.ed25519 and len(fp.split()[0]) == 4


def test_olm_round_trip_both_ways(net):
    alice, bob, _carol = trio(net)
    (result,) = net.share(alice, "dev", [("bob", "phone")])
    assert result.status is Status.OK and result.kind == "room_key"
    assert result.sender == "alice" and result.ack == result.seq
    # bob answers over the session alice's pre-key message started: no claim needed
    assert bob.sessions_needed([("alice", "laptop")]) == []
    (back,) = net.share(bob, "dev", [("alice", "laptop")])
    assert back.status is Status.OK


def test_room_messages_decrypt_for_members_and_the_sender(net):
    alice, bob, carol = trio(net)
    results = net.share(alice, "dev", net.all_devices("alice", "bob", "carol"))
    assert [r.status for r in results] == [Status.OK, Status.OK]
    frame = net.send(alice, "dev", "hello, dev", room="dev")
    for m in (alice, bob, carol):
        got = m.decrypt(frame)
        assert (got.status, got.text, got.sender, got.device) == (
            Status.OK, "hello, dev", "alice", "laptop")
    assert alice.decrypt(frame).verified and not bob.decrypt(frame).verified
    # sharing again sends nothing: each device gets each session once
    again = alice.prepare("dev", net.all_devices("bob", "carol"))
    assert again.messages == [] and again.need_sessions == []


def test_after_rotation_a_removed_member_cannot_read(net):
    alice, bob, carol = trio(net)
    net.share(alice, "dev", net.all_devices("bob", "carol"))
    old = net.send(alice, "dev", "before", room="dev")
    alice.rotate("dev")  # carol was kicked
    net.share(alice, "dev", net.all_devices("bob"))
    new = net.send(alice, "dev", "after", room="dev")
    assert new["encrypted"]["session_id"] != old["encrypted"]["session_id"]
    assert bob.decrypt(new).text == "after"
    assert carol.decrypt(old).text == "before"
    assert carol.decrypt(new).status is Status.PENDING


def test_a_removed_device_rotates_the_sessions_it_was_given(net):
    alice, _bob, _ = trio(net)
    net.device("bob", "tablet")
    net.query(alice, "bob")
    net.share(alice, "dev", net.all_devices("bob"))
    net.share(alice, "quiet", net.all_devices("carol"))
    before = {c: alice.encrypt(c, "x")["session_id"] for c in ("dev", "quiet")}
    del net.directory["bob"]["tablet"]
    net.query(alice, "bob")
    with pytest.raises(E2EError):
        alice.encrypt("dev", "the tablet must not read this")
    assert alice.encrypt("quiet", "x")["session_id"] == before["quiet"]
    net.share(alice, "dev", net.all_devices("bob"))
    assert alice.encrypt("dev", "y")["session_id"] != before["dev"]


def test_sessions_rotate_by_themselves_after_n_messages_or_t_seconds(net):
    now = [1000.0]
    alice = net.device("alice", "laptop", rotate_after_messages=2,
                       rotate_after_seconds=60, clock=lambda: now[0])
    alice.prepare("dev", [])
    first = {alice.encrypt("dev", "one")["session_id"], alice.encrypt("dev", "two")["session_id"]}
    with pytest.raises(E2EError, match="prepare"):
        alice.encrypt("dev", "three")  # never under a key nobody was given
    alice.prepare("dev", [])
    second = alice.encrypt("dev", "three")["session_id"]
    assert len(first) == 1 and second not in first
    now[0] += 60
    with pytest.raises(E2EError):
        alice.encrypt("dev", "a minute later")
    alice.prepare("dev", [])
    assert alice.encrypt("dev", "four")["session_id"] not in first | {second}


def test_a_replayed_message_is_refused(net):
    alice, bob, _ = trio(net)
    net.share(alice, "dev", [("bob", "phone")])
    frame = net.send(alice, "dev", "pay bob 5", room="dev")
    assert bob.decrypt(frame).status is Status.OK
    assert bob.decrypt(frame).status is Status.OK  # the same message shown again (history)
    replay = {**frame, "msg_id": frame["msg_id"] + 50}
    got = bob.decrypt(replay)
    assert got.status is Status.REFUSED and "replay" in got.reason


def test_a_message_moved_to_another_room_is_refused(net):
    alice, bob, _ = trio(net)
    net.share(alice, "dev", [("bob", "phone")])
    frame = net.send(alice, "dev", "dev only", room="dev")
    got = bob.decrypt({**frame, "room": "general"})
    assert got.status is Status.REFUSED and "dev" in got.reason


def test_a_direct_message_moved_to_another_pair_is_refused(net):
    alice, bob, carol = trio(net)
    dm = dm_conversation("Alice", "bob")
    assert dm == "dm:alice:bob"
    net.share(alice, dm, net.all_devices("bob"))
    frame = net.send(alice, dm, "just for you", to="bob")
    assert conversation_of(frame) == dm and bob.decrypt(frame).text == "just for you"
    moved = bob.decrypt({**frame, "to": "carol"})
    assert moved.status is Status.REFUSED
    turned = bob.decrypt({**frame, "username": "bob", "to": "alice"})  # as if bob wrote it
    assert turned.status is Status.REFUSED and "claims to be from bob" in turned.reason
    with pytest.raises(E2EError, match="carol is not in"):
        alice.prepare(dm, net.all_devices("carol"))
    # and a room key for a DM from someone outside it is refused by the receiver
    carol_share = carol.prepare("dm:alice:bob", [])
    assert carol_share.messages == []
    net.claim(carol, [("bob", "phone")])
    entry = carol.encrypt_to_device("bob", "phone", "room_key", {
        "conversation": "dm:alice:bob", "session_id": "x", "session_key": "y"})
    (result,) = net.deliver(carol, [entry])
    assert result.status is Status.REFUSED and "not in it" in result.reason


def test_a_flipped_bit_is_refused(net):
    alice, bob, _ = trio(net)
    net.share(alice, "dev", [("bob", "phone")])
    frame = net.send(alice, "dev", "integrity", room="dev")
    raw = bytearray(vodozemac.MegolmMessage.from_base64(frame["encrypted"]["ciphertext"])
                    .to_bytes())
    raw[12] ^= 1
    bad = copy.deepcopy(frame)
    bad["encrypted"]["ciphertext"] = vodozemac.MegolmMessage.from_bytes(bytes(raw)).to_base64()
    got = bob.decrypt(bad)
    assert got.status is Status.REFUSED and "altered" in got.reason
    assert bob.decrypt(frame).text == "integrity"  # the real one still reads


def test_a_substituted_device_key_is_warned_and_never_used(net):
    alice, bob, _ = trio(net)
    net.share(alice, "dev", [("bob", "phone")])
    net.share(bob, "dev", [("alice", "laptop")])
    from_bob = net.send(bob, "dev", "hi", room="dev")
    # The server now lists mallory's keys, correctly self-signed, as bob's phone.
    mallory = vodozemac.Account()
    keys = {"curve25519": mallory.curve25519_key.to_base64(), "device": "phone",
            "ed25519": mallory.ed25519_key.to_base64(), "user": "bob"}
    forged = {**{k: keys[k] for k in ("device", "curve25519", "ed25519")},
              "signature": mallory.sign(devices.canonical(keys)).to_base64()}
    (notice,) = alice.observe_devices("bob", [forged])
    assert notice.kind == "changed_key" and notice.loud and "WARNING" in notice.text
    assert alice.store.device("bob", "phone").ed25519 == bob.ed25519  # the first one kept
    assert alice.observe_devices("bob", [forged]) == []  # told once, not at every query
    alice.rotate("dev")
    share = alice.prepare("dev", [("bob", "phone")])
    assert share.skipped == [("bob", "phone", "changed")] and share.messages == []
    with pytest.raises(Refused, match="changed"):
        alice.encrypt_to_device("bob", "phone", "room_key", {})
    # and nothing from that device id is believed any more
    got = alice.decrypt(from_bob)
    assert got.status is Status.REFUSED and "changed" in got.reason
    (result,) = net.share(bob, "dev2", [("alice", "laptop")])
    assert result.status is Status.REFUSED and "changed" in result.reason


def test_device_list_changes_are_told(net):
    alice, _bob, _ = trio(net)
    net.device("bob", "tablet")
    notices = net.query(alice, "bob")
    assert [(n.kind, n.device, n.loud) for n in notices] == [("new_device", "tablet", False)]
    del net.directory["bob"]["tablet"]
    (gone,) = net.query(alice, "bob")
    assert (gone.kind, gone.device) == ("removed", "tablet")
    assert not alice.store.device("bob", "tablet").trusted
    assert alice.receive_keys({"type": "keys", "users": {}}, asked=["carol"])[0].kind == \
        "removed"  # carol is no longer listed at all
    sig = net.directory["bob"]["phone"]["signature"]
    bad = {**net.directory["bob"]["phone"], "signature": ("B" if sig[0] == "A" else "A")
           + sig[1:]}
    (notice,) = alice.observe_devices("bob", [bad])
    assert notice.kind == "bad_signature" and notice.loud


def test_a_new_device_learns_its_siblings_quietly_and_is_told_of_later_ones(net):
    laptop = net.device("alice", "laptop")
    assert net.query(laptop, "alice") == []  # its own account: only itself so far
    phone = net.device("alice", "phone")
    assert net.query(phone, "alice") == []  # the laptop was there before it: no news
    assert [(n.kind, n.device) for n in net.query(laptop, "alice")] == [
        ("new_device", "phone")]  # but to the laptop, the phone is
    net.device("alice", "tablet")
    for m in (laptop, phone):
        assert [(n.kind, n.device) for n in net.query(m, "alice")] == [
            ("new_device", "tablet")]


def test_to_device_payloads_that_lie_about_sender_or_recipient_are_refused(net):
    alice, bob, _carol = trio(net)
    net.claim(bob, [("alice", "laptop")])
    bob.device = "tablet"  # bob's machine writes another sender device in the payload
    entry = bob.encrypt_to_device("alice", "laptop", "room_key", {})
    bob.device = "phone"
    (result,) = net.deliver(bob, [entry])
    assert result.status is Status.REFUSED and "claims to be from" in result.reason
    # a payload written for bob's tablet but encrypted to his phone's key
    net.claim(alice, [("bob", "phone")])
    phone = alice.store.device("bob", "phone")
    with alice.store.transaction():
        entry = alice._encrypt_olm(dataclasses.replace(phone, device="tablet"), "room_key", {})
    entry["device"] = "phone"
    (result,) = net.deliver(alice, [entry])
    assert result.status is Status.REFUSED and "another device" in result.reason
    # the server stamps the frame with carol's name: the Olm key is not hers
    net.claim(alice, [("carol", "desk")])
    entry = alice.encrypt_to_device("bob", "phone", "room_key", {})
    frame = {**net.frame(alice, entry), "username": "carol", "device": "desk"}
    result = bob.receive_to_device(frame)
    assert result.status is Status.REFUSED and "another key" in result.reason


def test_a_message_before_its_key_is_pending_then_decrypts(net):
    alice, bob, _ = trio(net)
    net.claim(alice, [("bob", "phone")])
    share = alice.prepare("dev", [("bob", "phone")])
    frame = net.send(alice, "dev", "early bird", room="dev")
    got = bob.decrypt(frame)
    assert got.status is Status.PENDING and "room key" in got.reason
    assert bob.pending_frames() == [frame]
    (result,) = net.deliver(alice, share.messages)
    assert result.decryptable == [frame]
    assert bob.decrypt(frame).text == "early bird"
    assert bob.pending_frames() == []


def test_a_to_device_message_from_an_unknown_device_waits_for_its_keys(net):
    alice = net.device("alice", "laptop")
    bob = net.device("bob", "phone")
    net.query(alice, "bob")  # bob does not know alice yet
    net.claim(alice, [("bob", "phone")])
    share = alice.prepare("dev", [("bob", "phone")])
    frame = net.frame(alice, share.messages[0])
    results, upto = bob.receive_to_device_page([frame])
    assert results[0].status is Status.PENDING and results[0].needs_keys == "alice"
    assert upto is None  # nothing committed, nothing to acknowledge
    net.query(bob, "alice")
    results, upto = bob.receive_to_device_page([frame])
    assert results[0].status is Status.OK and upto == frame["seq"]
    # the server sends it again (the ack was lost): skipped, acknowledged again
    again = bob.receive_to_device(frame)
    assert again.status is Status.DUPLICATE and again.ack == frame["seq"]
    # a device its owner's keys do not list, even once asked, is refused (and acked)
    stray = {**net.frame(alice, share.messages[0]), "device": "ghost"}
    assert bob.receive_to_device(stray).needs_keys == "alice"
    net.query(bob, "alice")
    refused = bob.receive_to_device(stray)
    assert refused.status is Status.REFUSED and refused.ack == stray["seq"]


def verify(net: Net, a: E2E, b: E2E) -> None:
    net.claim(a, [(b.user, b.device)])
    txn, start = a.start_verification(b.user, b.device)
    (at_b,) = net.deliver(a, start["messages"])  # b accepts, with a commitment to its key
    (at_a,) = net.deliver(b, at_b.replies)  # a sends its key
    (at_b,) = net.deliver(a, at_a.replies)  # b sends its key
    (at_a,) = net.deliver(b, at_b.replies)  # a checks it against the commitment
    assert at_a.status is Status.OK and at_a.replies == []
    assert a.verification_codes(txn) == b.verification_codes(txn)
    mac_a, done_a = a.confirm_verification(txn)
    mac_b, done_b = b.confirm_verification(txn)
    assert not done_a and not done_b
    (got_a,) = net.deliver(a, mac_a["messages"])
    (got_b,) = net.deliver(b, mac_b["messages"])
    assert got_a.verified == (a.user, a.device) and got_b.verified == (b.user, b.device)


def test_two_devices_verify_each_other_by_sas(net):
    alice, bob, _ = trio(net)
    verify(net, alice, bob)
    assert alice.store.device("bob", "phone").verified
    assert bob.store.device("alice", "laptop").verified
    net.share(bob, "dev", [("alice", "laptop")])
    assert alice.decrypt(net.send(bob, "dev", "trusted", room="dev")).verified


def test_a_failed_verification_is_cancelled_on_both_sides(net):
    alice, bob, _ = trio(net)
    net.claim(alice, [("bob", "phone")])
    txn, start = alice.start_verification("bob", "phone")
    (at_bob,) = net.deliver(alice, start["messages"])
    (at_alice,) = net.deliver(bob, at_bob.replies)
    (at_bob,) = net.deliver(alice, at_alice.replies)
    net.deliver(bob, at_bob.replies)
    assert alice.verification_codes(txn) == bob.verification_codes(txn)
    request = alice.cancel_verification(txn, "the emoji differ")
    (at_bob,) = net.deliver(alice, request["messages"])
    assert at_bob.kind == "sas.cancel" and "emoji differ" in at_bob.reason
    with pytest.raises(E2EError):
        bob.confirm_verification(txn)
    assert not bob.store.device("alice", "laptop").verified
    # a MAC out of turn (no verification in progress) is refused, not applied
    entry = alice.encrypt_to_device("bob", "phone", "sas.mac", {"txn": txn, "mac": {}})
    (at_bob,) = net.deliver(alice, [entry])
    assert at_bob.status is Status.REFUSED


def test_to_device_requests_wait_in_the_outbox_until_the_server_took_them(net, tmp_path):
    alice, _bob, _ = trio(net)
    net.claim(alice, [("bob", "phone")])
    share = alice.prepare("dev", [("bob", "phone")])
    (request,) = share.requests
    assert request["messages"] == share.messages
    alice.store.close()  # the client stops before sending
    alice = E2E(KeyStore.open(tmp_path / "alice" / "laptop.sqlite3"), "alice", "laptop")
    assert alice.outbox() == [request]
    assert alice.prepare("dev", [("bob", "phone")]).requests == []  # already given
    alice.to_device_sent(request["send_id"])
    assert alice.outbox() == []


def test_to_device_requests_fit_in_the_servers_frames(net):
    alice = net.device("alice", "laptop", max_frame_bytes=DEFAULT_MAX_FRAME_BYTES)
    phones = [net.device(f"user{i}", "phone") for i in range(30)]
    net.query(alice, *(p.user for p in phones))
    targets = [(p.user, "phone") for p in phones]
    net.claim(alice, targets)
    share = alice.prepare("big", targets)
    assert len(share.messages) == 30 and len(share.requests) > 1
    assert [m for r in share.requests for m in r["messages"]] == share.messages
    for request in share.requests:
        assert len(encode({**request, "id": 10**9})) <= DEFAULT_MAX_FRAME_BYTES
    assert len({r["send_id"] for r in share.requests}) == len(share.requests)


def test_a_conversation_once_encrypted_stays_so(net):
    alice = net.device("alice", "laptop")
    assert not alice.must_encrypt("dev")
    alice.pin_encrypted("dev")
    assert alice.must_encrypt("dev") and not alice.must_encrypt("general")


def test_a_man_in_the_middle_of_sas_is_caught():
    alice = Party("alice", "laptop", vodozemac.Account().ed25519_key.to_base64())
    bob = Party("bob", "phone", vodozemac.Account().ed25519_key.to_base64())
    # mallory swaps bob's key for hers on its way to alice: the commitment catches it
    a, b, m = (Verification("t1", alice, bob, we_started=True),
               Verification("t1", bob, alice, we_started=False), vodozemac.Sas())
    key_a = a.on_accept(b.on_start(a.start()))
    b.on_key(key_a)
    with pytest.raises(SasError, match="commitment"):
        a.on_key({"txn": "t1", "key": m.public_key.to_base64()})
    # she swaps alice's key on its way to bob instead: the codes differ, and if the
    # users confirm all the same, the MACs do not match
    a, b = (Verification("t2", alice, bob, we_started=True),
            Verification("t2", bob, alice, we_started=False))
    key_a = a.on_accept(b.on_start(a.start()))
    key_b = b.on_key({"txn": "t2", "key": m.public_key.to_base64()})
    a.on_key(key_b)
    assert a.codes() != b.codes()
    mac_a, mac_b = a.confirm(), b.confirm()
    with pytest.raises(SasError, match="MAC"):
        b.on_mac(mac_a)
    with pytest.raises(SasError, match="MAC"):
        a.on_mac(mac_b)
    assert not a.verified and not b.verified


def test_forwarded_keys_only_from_our_own_verified_devices(net):
    alice, bob, _ = trio(net)
    net.share(bob, "dev", [("alice", "laptop")])
    old = net.send(bob, "dev", "from before the phone", room="dev")
    assert alice.decrypt(old).status is Status.OK
    phone = net.device("alice", "phone")
    (notice,) = net.query(alice, "alice", "bob")
    assert (notice.kind, notice.device) == ("new_device", "phone")  # ours: always told
    net.query(phone, "alice", "bob")
    assert phone.decrypt(old).status is Status.PENDING
    assert alice.export_keys_for("phone").skipped == [("alice", "phone", "not verified")]
    # the laptop trusts the phone, but the phone has not verified the laptop
    with alice.store.transaction():
        alice.store.set_verified("alice", "phone")
    net.claim(alice, [("alice", "phone")])
    results = net.deliver(alice, alice.export_keys_for("phone").messages)
    assert results and all(r.status is Status.REFUSED and "verified" in r.reason
                           for r in results)
    verify(net, alice, phone)
    results = net.deliver(alice, alice.export_keys_for("phone").messages)
    assert all(r.status is Status.OK for r in results)
    assert [f["msg_id"] for r in results for f in r.decryptable] == [old["msg_id"]]
    got = phone.decrypt(old)
    assert (got.status, got.text, got.sender) == (Status.OK, "from before the phone", "bob")
    # bob is verified by nobody here, and is not alice anyway
    net.query(bob, "alice")
    net.claim(bob, [("alice", "phone")])
    forged = bob.encrypt_to_device("alice", "phone", "forwarded_room_key", {})
    (result,) = net.deliver(bob, [forged])
    assert result.status is Status.REFUSED and "own verified devices" in result.reason


def test_state_survives_a_restart(net, tmp_path):
    alice, bob, _ = trio(net)
    net.share(alice, "dev", [("bob", "phone")])
    first = net.send(alice, "dev", "one", room="dev")
    ed = bob.ed25519
    bob.store.close()
    bob = net.machines[("bob", "phone")] = E2E(KeyStore.open(tmp_path / "bob" / "phone.sqlite3"),
                                               "bob", "phone")
    assert bob.ed25519 == ed
    assert bob.decrypt(first).text == "one"
    assert bob.decrypt(net.send(alice, "dev", "two", room="dev")).text == "two"
    net.share(bob, "dev", [("alice", "laptop")])  # over the old Olm session
    with pytest.raises(E2EError, match="belongs to bob/phone"):
        E2E(KeyStore.open(tmp_path / "bob" / "phone.sqlite3"), "bob", "tablet")


"""The device directory over TLS: upload, query and claim keys (end-to-end encryption,
step 1), with real vodozemac accounts."""

from __future__ import annotations

import pytest
import vodozemac
from test_devices import device_frame, one_time_keys

# Storage is what these exercise: each runs on SQLite and on PostgreSQL (conftest).
pytestmark = pytest.mark.both_engines


def register_device(client, user: str, device: str, n: int = 5):
    account = vodozemac.Account()
    reply = client.request(device_frame(account, user, device))
    assert reply["type"] == "ok" and reply["one_time_keys"] == 0, reply
    reply = client.request({
        "type": "one_time_keys", "device": device, "keys": one_time_keys(account, user, device, n),
        "fallback": one_time_keys(account, user, device, 0, fallback=True)[0]})
    assert reply == {"type": "ok", "op": "one_time_keys", "device": device,
                     "one_time_keys": n, "re": reply["re"]}
    return account


def test_keys_are_published_queried_and_each_one_time_key_claimed_once(chat_server):
    alice, bob = chat_server.user("alice"), chat_server.user("bob")
    account = register_device(alice, "alice", "laptop", n=3)
    keys = bob.request({"type": "query_keys", "users": ["Alice", "nobody-here"]})
    (device,) = keys["users"]["alice"]
    assert device["ed25519"] == account.ed25519_key.to_base64()
    assert set(keys["users"]) == {"alice"}
    claimed = [bob.request({"type": "claim_key", "username": "alice", "device": "laptop"})
               for _ in range(5)]
    otks = [c["key"] for c in claimed if not c["key"].get("fallback")]
    assert len({k["id"] for k in otks}) == 3  # each once, then the fallback key
    assert all(c["key"].get("fallback") for c in claimed[3:])
    counts = []
    while len(counts) < 3:
        frame = alice.recv()
        if frame["type"] == "key_count":
            counts.append(frame["one_time_keys"])
    assert counts == [2, 1, 0]  # the device is told, so that it tops up
    # and bob can start an Olm session with what he got
    bob_account = vodozemac.Account()
    session = bob_account.create_outbound_session(
        vodozemac.Curve25519PublicKey.from_base64(device["curve25519"]),
        vodozemac.Curve25519PublicKey.from_base64(otks[0]["key"]))
    message = session.encrypt(b"hello")
    _session, plaintext = account.create_inbound_session(bob_account.curve25519_key,
                                                        message.to_pre_key())
    assert plaintext == b"hello"


def test_forged_changed_or_secret_keys_are_refused(chat_server):
    alice = chat_server.user("alice")
    account = vodozemac.Account()
    as_mallory = device_frame(account, "mallory", "laptop")
    assert alice.request(as_mallory)["code"] == "invalid_field"
    assert alice.request(device_frame(account, "alice", "laptop"))["type"] == "ok"
    other = device_frame(vodozemac.Account(), "alice", "laptop")
    assert "never change" in alice.request(other)["message"]
    (otk,) = one_time_keys(account, "alice", "laptop", 1)
    reply = alice.request({"type": "one_time_keys", "device": "laptop",
                           "keys": [{**otk, "secret": "x"}]})
    assert reply["code"] == "invalid_field"
    stranger = vodozemac.Account()
    (forged,) = one_time_keys(stranger, "alice", "laptop", 1)
    assert alice.request({"type": "one_time_keys", "device": "laptop",
                          "keys": [forged]})["code"] == "invalid_field"


def test_fifty_claims_at_once_share_no_one_time_key(chat_server):
    alice = chat_server.user("alice")
    register_device(alice, "alice", "phone", n=10)
    clients = [chat_server.user(f"claimer{i}") for i in range(5)]
    for c in clients:
        for i in range(10):
            c.send({"type": "claim_key", "username": "alice", "device": "phone", "id": i})
    got = []
    for c in clients:
        for _ in range(10):
            frame = c.recv()
            while frame["type"] != "claimed":
                frame = c.recv()
            got.append(frame["key"])
    otk_ids = [k["id"] for k in got if not k.get("fallback")]
    assert len(otk_ids) == 10 and len(set(otk_ids)) == 10
    assert sum(1 for k in got if k.get("fallback")) == 40


def test_devices_and_one_time_keys_are_bounded(server_factory):
    server = server_factory(max_devices_per_user=2, max_one_time_keys=4)
    alice = server.user("alice")
    register_device(alice, "alice", "one", n=4)
    # A session is one device: each device here has its own.
    register_device(server.user("alice", register=False), "alice", "two", n=0)
    assert "session is device one" in alice.request(
        device_frame(vodozemac.Account(), "alice", "two"))["message"]
    assert "2 devices already" in server.user("alice", register=False).request(
        device_frame(vodozemac.Account(), "alice", "three"))["message"]
    account = vodozemac.Account()
    alice = server.user("alice", register=False)
    alice.request(device_frame(account, "alice", "two"))
    reply = alice.request({"type": "one_time_keys", "device": "two",
                           "keys": one_time_keys(account, "alice", "two", 5)})
    assert reply["code"] == "invalid_field"


def test_the_operator_lists_and_removes_devices(chat_server, capsys):
    import json

    from chat import admin

    alice = chat_server.user("alice")
    account = register_device(alice, "alice", "phone", n=2)
    d = chat_server.settings.data_dir
    assert admin.main(["--data-dir", d, "--json", "device", "list", "alice"]) == 0
    listed = json.loads(capsys.readouterr().out)["result"]["devices"]
    assert [(x["device"], x["ed25519"], x["one_time_keys"]) for x in listed] == [
        ("phone", account.ed25519_key.to_base64(), 2)]
    assert admin.main(["--data-dir", d, "device", "remove", "alice", "phone",
                       "--reason", "lost"]) == 0
    capsys.readouterr()
    bob = chat_server.user("bob")
    assert bob.request({"type": "query_keys", "users": ["alice"]})["users"] == {"alice": []}
    assert bob.request({"type": "claim_key", "username": "alice",
                        "device": "phone"})["code"] == "invalid_field"
    assert admin.main(["--data-dir", d, "device", "remove", "alice", "phone"]) == 1

"""End-to-end encryption through the client library (chat.client.secure) against the real
server: people talking in encrypted direct messages and private rooms, devices coming
and going, restarts, crashes between decrypt and ack, verification.

Each `Person` is one device: its own key store (its own XDG_DATA_HOME) and a reader
thread that feeds everything the server says through `Secure.process`, as the CLI's
printer does; a test waits on what that thread shows, never on time.
"""

from __future__ import annotations

import base64
import logging
import os
import queue
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from chat.client import ChatClient, raise_for_error
from chat.client.secure import Secure
from chat.tls import client_context
from tests.test_client_cli import PASSWORD
from tests.test_client_linemode import WAIT

Frame = dict[str, Any]
STORE_SERVER = "chat.test:7072"  # the key store's name for the server: kept across restarts


def name(prefix: str = "u") -> str:
    return prefix + uuid.uuid4().hex[:10]


class Person:
    """One device of a user: a key store, and a connection read by its own thread."""

    def __init__(self, server: Any, username: str, home: Path, *, ack: bool = True,
                 connect: bool = True, client_class: type[ChatClient] = ChatClient,
                 verified_only: bool = False) -> None:
        self.username, self.home = username, home
        self.client_class = client_class
        self.secure = Secure.open(STORE_SERVER, username, {"XDG_DATA_HOME": str(home)},
                                  ack=ack, timeout=WAIT, verified_only=verified_only)
        self.shown: queue.Queue[Frame] = queue.Queue()
        self.log: list[Frame] = []  # everything taken from `shown` so far
        self.raw: list[Frame] = []  # every frame the server sent (before process)
        self.secure.notify = self.shown.put  # news of a send or a query, at once
        self.client: ChatClient | None = None
        self.reader: threading.Thread | None = None
        if connect:
            self.connect(server)

    @property
    def device(self) -> str:
        return self.secure.device

    def connect(self, server: Any) -> None:
        self.client = self.client_class.connect(
            server.host, server.port, ssl_context=client_context(server.cafile), timeout=WAIT)
        raise_for_error(self.client.login(self.username, PASSWORD, timeout=WAIT))
        assert Secure.supported(self.client)
        for frame in self.secure.attach(self.client):
            self.shown.put(frame)
        self.reader = threading.Thread(target=self._read, args=(self.client,), daemon=True)
        self.reader.start()

    def _read(self, client: ChatClient) -> None:
        for frame in client.events():
            self.raw.append(frame)
            for out in self.secure.process(frame):
                self.shown.put(out)

    def disconnect(self) -> None:
        assert self.client is not None and self.reader is not None
        self.client.close()
        self.reader.join(WAIT)
        assert not self.reader.is_alive()
        self.client = None

    def close(self) -> None:
        if self.client is not None:
            self.disconnect()
        self.secure.close()

    def wait(self, pred: Callable[[Frame], bool], what: str = "a frame") -> Frame:
        """The next shown frame for which `pred` holds (the others are kept in `log`)."""
        for frame in self.log:
            if pred(frame) and not frame.get("_taken"):
                frame["_taken"] = True
                return frame
        while True:
            try:
                frame = self.shown.get(timeout=WAIT)
            except queue.Empty:
                raise AssertionError(f"{self.username}/{self.device}: no {what}; "
                                     f"saw {self.log}") from None
            self.log.append(frame)
            if pred(frame):
                frame["_taken"] = True
                return frame

    def message(self, sender: str, **where: Any) -> Frame:
        return self.wait(lambda f: f.get("type") == "message" and f.get("username") == sender
                         and all(f.get(k) == v for k, v in where.items()),
                         f"message from {sender} {where}")

    def notice(self, kind: str, **fields: Any) -> Frame:
        return self.wait(lambda f: f.get("type") == "e2e" and f.get("kind") == kind
                         and all(f.get(k) == v for k, v in fields.items()),
                         f"{kind} notice {fields}")

    def read(self, frame: Frame) -> str:
        """The text of a (possibly pending) message: waits for its key if need be."""
        if frame["e2e"]["status"] == "pending":
            frame = self.wait(lambda f: f.get("type") == "message"
                              and f.get("msg_id") == frame["msg_id"]
                              and f["e2e"]["status"] != "pending",
                              f"the key of message {frame['msg_id']}")
        assert frame["e2e"]["status"] == "ok", frame
        return frame["message"]

    def history(self, **kw: Any) -> list[Frame]:
        return raise_for_error(self.secure.history(**kw, timeout=WAIT))["messages"]


@pytest.fixture
def people(chat_server: Any, tmp_path: Path) -> Any:
    made: list[Person] = []

    def make(username: str | None = None, *, register: bool = True, server: Any = None,
             **kw: Any) -> Person:
        username = username or name()
        if register:
            (server or chat_server).register(username)
        person = Person(server or chat_server, username, tmp_path / uuid.uuid4().hex, **kw)
        made.append(person)
        return person

    yield make
    for person in made:
        person.close()


def encrypted_room(owner: Person, *guests: Person) -> str:
    room = name("r")
    created = owner.secure.create(room, encrypted=True, timeout=WAIT)
    assert created["encrypted"] is True, created
    for guest in guests:
        assert owner.client is not None and guest.client is not None
        raise_for_error(owner.client.invite(room, guest.username, WAIT))
        guest.secure.process_reply(raise_for_error(guest.client.join(room, WAIT)))
    return room


def test_two_people_talk_encrypted_in_a_dm_and_a_private_room(
        chat_server: Any, people: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    alice, bob = people(), people()
    canary = "canary-" + os.urandom(8).hex()
    sent = alice.secure.direct(bob.username, f"dm {canary}", WAIT)
    assert sent["message"] == f"dm {canary}" and sent["e2e"]["status"] == "ok"
    assert sent["encrypted"] and sent["to"] == bob.username
    got = bob.message(alice.username)
    assert bob.read(got) == f"dm {canary}" and got["e2e"]["verified"] is False
    raise_for_error(bob.secure.direct(alice.username, "dm back", WAIT))
    assert alice.read(alice.message(bob.username, to=alice.username)) == "dm back"
    # a v1 plaintext DM (sent by a client without the layer) is marked as such
    assert bob.client is not None
    raise_for_error(bob.client.direct(alice.username, "plain old dm", WAIT))
    plain = alice.message(bob.username, message="plain old dm")
    assert plain["e2e"]["status"] == "plaintext"

    room = encrypted_room(alice, bob)
    raise_for_error(alice.secure.say(room, f"room {canary}", WAIT))
    assert bob.read(bob.message(alice.username, room=room)) == f"room {canary}"
    raise_for_error(bob.secure.say(room, "room back", WAIT))
    assert alice.read(alice.message(bob.username, room=room)) == "room back"
    # history reads the same way
    texts = [bob.read(m) for m in bob.history(room=room)]
    assert texts == [f"room {canary}", "room back"]

    # Neither the server's files nor its log hold the plaintext, in any usual form.
    needles = [canary.encode(), base64.b64encode(canary.encode()), canary.encode().hex().encode()]
    data_dir = Path(chat_server.settings.data_dir)
    files = [p for p in data_dir.rglob("*") if p.is_file()]
    assert any(p.name.endswith("chat.db") for p in files)
    for path in files:
        data = path.read_bytes()
        assert not any(n in data for n in needles), path
    log_text = "\n".join(r.getMessage() for r in caplog.records)
    assert "to_device" in log_text or caplog.records  # the log did record the session
    assert not any(n.decode() in log_text for n in needles)


def test_a_dm_to_someone_without_a_device_goes_in_clear_and_says_so(
        chat_server: Any, people: Any) -> None:
    alice, old_client = people(), name()
    chat_server.register(old_client)  # a v1 client: it never publishes a device
    reply = raise_for_error(alice.secure.direct(old_client, "hello, v1", WAIT))
    assert "encrypted" not in reply and reply["e2e"] == {"status": "plaintext"}
    assert alice.message(alice.username, to=old_client)["e2e"]["status"] == "plaintext"


def test_an_offline_device_reads_on_return_and_a_new_device_reads_the_next_message(
        chat_server: Any, people: Any) -> None:
    alice = people()
    phone = people(alice.username, register=False)  # alice's second device, known to all
    bob = people()
    room = encrypted_room(alice, bob)
    phone.disconnect()
    raise_for_error(bob.secure.say(room, "while the phone was off", WAIT))
    raise_for_error(bob.secure.direct(alice.username, "a dm meanwhile", WAIT))
    phone.connect(chat_server)  # its queue (the room keys) comes after the bind
    (room_msg,) = phone.history(room=room)
    assert phone.read(room_msg) == "while the phone was off"
    (dm,) = phone.history(with_=bob.username)
    assert phone.read(dm) == "a dm meanwhile"

    tablet = people(bob.username, register=False)  # bob's new device
    # alice hears of it (device_list) before she writes again, and says so
    alice.notice("new_device", username=bob.username, device=tablet.device)
    raise_for_error(alice.secure.say(room, "hello tablet", WAIT))
    assert tablet.read(tablet.message(alice.username, room=room)) == "hello tablet"


def test_a_kicked_member_cannot_read_after_rotation(chat_server: Any, people: Any) -> None:
    alice, bob, carol = people(), people(), people()
    room = encrypted_room(alice, bob, carol)
    raise_for_error(alice.secure.say(room, "before", WAIT))
    assert carol.read(carol.message(alice.username, room=room)) == "before"
    raise_for_error(alice.secure.kick(room, carol.username, "bye", WAIT))
    after = raise_for_error(alice.secure.say(room, "after the kick", WAIT))
    assert bob.read(bob.message(alice.username, room=room, msg_id=after["msg_id"])) == \
        "after the kick"
    # A server that relayed it to carol all the same: she holds no key for it.
    leaked = {k: v for k, v in after.items() if k != "e2e"}
    leaked["message"] = "[encrypted]"
    got = carol.secure.decrypt_message(leaked)
    assert got["e2e"]["status"] == "pending" and "after the kick" not in str(got)


def test_a_member_who_left_while_we_were_away_gets_no_new_key(
        chat_server: Any, people: Any) -> None:
    alice, bob, carol = people(), people(), people()
    room = encrypted_room(alice, bob, carol)
    raise_for_error(alice.secure.say(room, "all three", WAIT))
    alice.disconnect()  # no presence reaches her: the members list must do it
    assert carol.client is not None
    raise_for_error(carol.client.leave(room, WAIT))
    alice.connect(chat_server)
    after = raise_for_error(alice.secure.say(room, "two of us", WAIT))
    leaked = {k: v for k, v in after.items() if k != "e2e"}
    assert carol.secure.decrypt_message(leaked)["e2e"]["status"] == "pending"
    assert bob.read(bob.message(alice.username, msg_id=after["msg_id"])) == "two of us"


def test_a_restart_of_server_and_clients_keeps_everything_readable(
        server_factory: Any, tmp_path: Path) -> None:
    server = server_factory()
    alice_name, bob_name = name(), name()
    server.register(alice_name)
    server.register(bob_name)
    homes = {alice_name: tmp_path / "a", bob_name: tmp_path / "b"}
    alice, bob = (Person(server, n, homes[n]) for n in (alice_name, bob_name))
    try:
        room = encrypted_room(alice, bob)
        raise_for_error(alice.secure.say(room, "before the restart", WAIT))
        raise_for_error(alice.secure.direct(bob_name, "dm before", WAIT))
        bob.read(bob.message(alice_name, room=room))
    finally:
        alice.close()
        bob.close()
    server.server.stop()
    server = server_factory()  # the same database, another port
    alice, bob = (Person(server, n, homes[n]) for n in (alice_name, bob_name))
    try:
        assert [bob.read(m) for m in bob.history(room=room)] == ["before the restart"]
        assert [alice.read(m) for m in alice.history(room=room)] == ["before the restart"]
        assert [bob.read(m) for m in bob.history(with_=alice_name)] == ["dm before"]
        raise_for_error(bob.secure.say(room, "after the restart", WAIT))
        assert alice.read(alice.message(bob_name, room=room)) == "after the restart"
        raise_for_error(alice.secure.direct(bob_name, "dm after", WAIT))
        assert bob.read(bob.message(alice_name, message="dm after")) == "dm after"
    finally:
        alice.close()
        bob.close()


def test_bob_receives_through_his_fallback_key_once_one_time_keys_run_out(
        chat_server: Any, people: Any) -> None:
    bob = people()
    bob.disconnect()
    thief = people()
    assert thief.client is not None
    for _ in range(200):  # take every one-time key of bob's device
        claimed = raise_for_error(thief.client.request(
            {"type": "claim_key", "username": bob.username, "device": bob.device}, WAIT))
        if claimed["key"].get("fallback"):
            break
    else:
        raise AssertionError("the one-time keys never ran out")
    carol, dave = people(), people()
    raise_for_error(carol.secure.direct(bob.username, "from carol", WAIT))
    raise_for_error(dave.secure.direct(bob.username, "from dave", WAIT))
    bob.connect(chat_server)
    (from_carol,) = bob.history(with_=carol.username)
    (from_dave,) = bob.history(with_=dave.username)
    assert (bob.read(from_carol), bob.read(from_dave)) == ("from carol", "from dave")


def test_a_client_killed_between_decrypt_and_ack_loses_nothing(
        chat_server: Any, people: Any, tmp_path: Path) -> None:
    alice = people()
    bob = people(ack=False)  # commits what each to-device message did, never acks
    raise_for_error(alice.secure.direct(bob.username, "one", WAIT))
    assert bob.read(bob.message(alice.username)) == "one"
    keys_seen = [f["seq"] for f in bob.raw if f.get("type") == "to_device"]
    assert keys_seen
    home = bob.home
    bob.close()  # "killed": the server still holds the unacknowledged messages
    again = Person(chat_server, bob.username, home)
    try:
        (dm,) = again.history(with_=alice.username)
        assert again.read(dm) == "one"
        raise_for_error(alice.secure.direct(bob.username, "two", WAIT))
        assert again.read(again.message(alice.username, message="two")) == "two"
        resent = [f["seq"] for f in again.raw if f.get("type") == "to_device"]
        assert resent[:len(keys_seen)] == keys_seen
    finally:
        again.close()
    # acknowledged this time: a third start gets nothing again
    third = Person(chat_server, bob.username, home)
    try:
        raise_for_error(alice.secure.direct(bob.username, "three", WAIT))
        third.message(alice.username, message="three")
        assert not set(keys_seen) & {f["seq"] for f in third.raw
                                     if f.get("type") == "to_device"}
    finally:
        third.close()


def verify(a: Person, b: Person) -> None:
    txn = a.secure.start_verification(b.username, b.device)
    b.notice("sas_started", username=a.username, device=a.device)
    codes_b = b.notice("sas_codes", txn=txn)
    codes_a = a.notice("sas_codes", txn=txn)
    assert codes_a["emoji"] == codes_b["emoji"] and codes_a["decimals"] == codes_b["decimals"]
    for frame in a.secure.confirm_verification(txn):
        a.shown.put(frame)
    for frame in b.secure.confirm_verification(txn):
        b.shown.put(frame)
    a.notice("verified", username=b.username, device=b.device)
    b.notice("verified", username=a.username, device=a.device)


def test_a_device_added_later_reads_the_past_after_verification_and_not_before(
        chat_server: Any, people: Any) -> None:
    laptop, bob = people(), people()
    room = encrypted_room(laptop, bob)
    raise_for_error(bob.secure.say(room, "old news", WAIT))
    laptop.read(laptop.message(bob.username, room=room))
    phone = people(laptop.username, register=False)
    laptop.notice("new_device", username=laptop.username, device=phone.device)
    (old,) = phone.history(room=room)
    assert old["e2e"]["status"] == "pending" and "old news" not in str(old)
    verify(laptop, phone)
    assert phone.read(old) == "old news"  # the forwarded key came after the MACs
    assert phone.secure.devices(laptop.username)  # and the laptop is verified there
    assert any(d.verified for d in phone.secure.devices(laptop.username)
               if d.device == laptop.device)


def test_verified_only_gives_room_keys_to_verified_devices_alone(
        chat_server: Any, people: Any) -> None:
    alice, bob = people(verified_only=True), people()
    room = encrypted_room(alice, bob)
    raise_for_error(alice.secure.say(room, "not for strangers", WAIT))
    alice.notice("unshared", username=bob.username, device=bob.device)
    early = bob.message(alice.username, room=room)
    assert early["e2e"]["status"] == "pending" and "strangers" not in str(early)
    verify(alice, bob)
    raise_for_error(alice.secure.say(room, "now you are known", WAIT))
    later = bob.wait(lambda f: f.get("type") == "message" and f.get("msg_id", 0) > early[
        "msg_id"], "the message after verification")
    assert bob.read(later) == "now you are known"
    # What was sent before stays unreadable to bob: the session went to him from the
    # message after (Megolm keys only ratchet forward).
    assert all(f["e2e"]["status"] != "ok" for f in bob.log
               if f.get("type") == "message" and f["msg_id"] == early["msg_id"])


def test_a_secure_client_encrypts_direct_messages_by_default(
        chat_server: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The library's SecureClient, with nothing set but the data directory it keeps its
    keys in (the XDG default), encrypts a DM to a peer with a device and decrypts it."""
    from chat.client import SecureClient

    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    alice, bob, old = name(), name(), name()
    for user in (alice, bob, old):
        chat_server.register(user)
    ctx = client_context(chat_server.cafile)

    def raw_client(server: Any) -> Any:
        return server.client()

    with SecureClient.connect(chat_server.host, chat_server.port, ssl_context=ctx,
                              timeout=WAIT) as a, \
            SecureClient.connect(chat_server.host, chat_server.port, ssl_context=ctx,
                                 timeout=WAIT) as b:
        raise_for_error(a.login(alice, PASSWORD, WAIT))
        raise_for_error(b.login(bob, PASSWORD, WAIT))
        sent = raise_for_error(a.direct(bob, "private by default", WAIT))
        assert sent["encrypted"] and sent["e2e"]["status"] == "ok"
        for frame in b.events(timeout=WAIT):
            if frame.get("type") == "message" and frame.get("username") == alice:
                assert frame["message"] == "private by default"
                assert frame["e2e"]["status"] == "ok" and frame["encrypted"]
                break
        # (and a room made encrypted through the library's create)
        room = name("r")
        assert raise_for_error(a.create(room, encrypted=True, timeout=WAIT))["encrypted"]
        said = raise_for_error(a.say(room, "in the room", WAIT))
        assert said["encrypted"] and said["e2e"]["status"] == "ok"
        # Plaintext where there is nothing to encrypt for: a plain room, and a direct
        # message to someone with no device (it once went round in circles in the layer).
        plain = raw_client(chat_server)
        said = raise_for_error(a.say("general", "hello, everyone", WAIT))
        assert said["message"] == "hello, everyone" and "encrypted" not in said
        assert plain.request({"type": "login", "username": old, "password": PASSWORD})[
            "type"] == "welcome"
        dm = raise_for_error(a.direct(old, "to a v1 client", WAIT))
        assert dm["e2e"] == {"status": "plaintext"} and "encrypted" not in dm
    stores = list((tmp_path / "xdg" / "chat-client").glob("*/*.sqlite3"))
    assert sorted(p.stem for p in stores) == sorted([alice, bob])

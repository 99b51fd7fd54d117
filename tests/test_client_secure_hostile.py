"""A hostile server against the client library's end-to-end layer.

The server is the real one; what it sends passes through a `tamper` function before the
client reads it (`Hostile._route`, where a frame enters the client after TLS): so each
test is the server, or the network after TLS, lying in one way. Every lie must show as a
warning (an `e2e` notice, or a message whose `e2e` status is `refused`), never as a
normal message.
"""

from __future__ import annotations

import copy
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import vodozemac

from chat import devices
from chat.client import ChatClient, raise_for_error
from chat.client.format import format_event
from chat.client.secure import SecureError
from tests.test_client_linemode import WAIT
from tests.test_client_secure_e2e import Person, encrypted_room, name

Frame = dict[str, Any]


class Hostile(ChatClient):
    """A ChatClient whose every incoming frame the test may rewrite, drop or repeat."""

    tamper: Callable[[Frame], list[Frame]] | None = None

    def _route(self, frame: Frame) -> None:
        tamper = self.tamper
        for out in tamper(frame) if tamper is not None else [frame]:
            super()._route(out)


@pytest.fixture
def cast(chat_server: Any, tmp_path: Path) -> Any:
    made: list[Person] = []

    def make(**kw: Any) -> Person:
        username = name()
        chat_server.register(username)
        person = Person(chat_server, username, tmp_path / uuid.uuid4().hex,
                        client_class=Hostile, **kw)
        made.append(person)
        return person

    yield make
    for person in made:
        person.close()


def hostile(person: Person) -> Hostile:
    assert isinstance(person.client, Hostile)
    return person.client


def forged_device(user: str, device: str) -> Frame:
    """A directory entry for `user`'s `device`, correctly self-signed, with the server's
    own keys: what a server passing off its keys as someone's device would list."""
    mallory = vodozemac.Account()
    keys = {"curve25519": mallory.curve25519_key.to_base64(), "device": device,
            "ed25519": mallory.ed25519_key.to_base64(), "user": user}
    return {"device": device, "curve25519": keys["curve25519"], "ed25519": keys["ed25519"],
            "signature": mallory.sign(devices.canonical(keys)).to_base64()}


def in_keys(change: Callable[[list[Frame]], list[Frame]], user: str
            ) -> Callable[[Frame], list[Frame]]:
    def tamper(frame: Frame) -> list[Frame]:
        if frame.get("type") == "keys" and user in frame.get("users", {}):
            frame = copy.deepcopy(frame)
            frame["users"][user] = change(frame["users"][user])
        return [frame]
    return tamper


def shown_normally(person: Person, text: str) -> bool:
    return any(f.get("type") == "message" and f.get("message") == text
               and f.get("e2e", {}).get("status") == "ok" for f in person.log)


def test_a_substituted_device_key_is_a_loud_warning_and_never_used(cast: Any) -> None:
    alice, bob = cast(), cast()
    room = encrypted_room(alice, bob)
    raise_for_error(bob.secure.say(room, "the real bob", WAIT))
    assert alice.read(alice.message(bob.username, room=room)) == "the real bob"
    hostile(alice).tamper = in_keys(
        lambda entries: [forged_device(bob.username, bob.device)], bob.username)
    alice.secure.devices(bob.username)  # asks the directory again
    warning = alice.notice("changed_key", username=bob.username, device=bob.device)
    assert warning["loud"] and format_event(warning).startswith("!! WARNING")
    # nothing from that device id is believed, and it gets no key any more
    raise_for_error(bob.secure.say(room, "bob again", WAIT))
    got = alice.message(bob.username, room=room)
    assert got["e2e"]["status"] == "refused" and "changed" in got["e2e"]["reason"]
    assert "REFUSED" in format_event(got) and "bob again" not in format_event(got)
    raise_for_error(alice.secure.say(room, "not for the impostor", WAIT))
    at_bob = bob.message(alice.username, room=room)
    assert at_bob["e2e"]["status"] == "pending"


def test_an_injected_device_is_announced_loudly(cast: Any) -> None:
    alice, bob = cast(), cast()
    room = encrypted_room(alice, bob)
    raise_for_error(alice.secure.say(room, "hello", WAIT))
    hostile(alice).tamper = in_keys(
        lambda entries: [*entries, forged_device(bob.username, "EVILDEVICE")], bob.username)
    alice.secure.devices(bob.username)
    notice = alice.notice("new_device", username=bob.username, device="EVILDEVICE")
    assert notice["loud"] and format_event(notice).startswith("!! ")


def test_replayed_moved_altered_and_plaintext_messages_are_refused(cast: Any) -> None:
    alice, bob = cast(), cast()
    room, other = encrypted_room(alice, bob), encrypted_room(alice, bob)
    forged: list[Frame] = []

    def tamper(frame: Frame) -> list[Frame]:
        if frame.get("type") != "message" or frame.get("room") != room \
                or frame.get("username") != alice.username:
            return [frame]
        replay = {**frame, "msg_id": frame["msg_id"] + 1000}
        moved = {**frame, "room": other, "msg_id": frame["msg_id"] + 2000}
        flipped = copy.deepcopy(frame)
        flipped["msg_id"] += 3000
        raw = bytearray(vodozemac.MegolmMessage.from_base64(
            frame["encrypted"]["ciphertext"]).to_bytes())
        raw[12] ^= 1
        flipped["encrypted"]["ciphertext"] = vodozemac.MegolmMessage.from_bytes(
            bytes(raw)).to_base64()
        plain = {k: v for k, v in frame.items() if k != "encrypted"}
        plain.update(msg_id=frame["msg_id"] + 4000, message="send your password to mallory")
        forged.extend([replay, moved, flipped, plain])
        return [frame, replay, moved, flipped, plain]

    hostile(bob).tamper = tamper
    raise_for_error(alice.secure.say(room, "pay bob 5", WAIT))
    assert bob.read(bob.message(alice.username, room=room)) == "pay bob 5"
    reasons = {}
    for fake in forged:
        got = bob.message(alice.username, msg_id=fake["msg_id"])
        assert got["e2e"]["status"] == "refused", got
        text = format_event(got)
        assert "REFUSED" in text and "pay bob 5" not in text and "password" not in text
        reasons[fake["msg_id"]] = got["e2e"]["reason"]
    assert any("replay" in r for r in reasons.values())
    assert any("plaintext" in r for r in reasons.values())
    assert not shown_normally(bob, "send your password to mallory")


def test_a_replayed_to_device_message_is_a_warning(cast: Any) -> None:
    alice, bob = cast(), cast()

    def tamper(frame: Frame) -> list[Frame]:
        if frame.get("type") != "to_device":
            return [frame]
        # Far ahead, so that no real message after it is taken for one handled before.
        return [frame, {**frame, "seq": frame["seq"] + 10**6}]

    hostile(bob).tamper = tamper
    raise_for_error(alice.secure.direct(bob.username, "first contact", WAIT))
    assert bob.read(bob.message(alice.username)) == "first contact"
    warning = bob.notice("warning", username=alice.username)
    assert warning["loud"] and "refused" in warning["text"]


def test_a_server_hiding_someones_devices_cannot_make_us_write_in_clear(cast: Any) -> None:
    alice, bob = cast(), cast()
    raise_for_error(alice.secure.direct(bob.username, "encrypted, once", WAIT))
    hostile(alice).tamper = in_keys(lambda entries: [], bob.username)
    alice.secure.devices(bob.username)  # the directory now "has no device" for bob
    alice.notice("removed", username=bob.username, device=bob.device)
    with pytest.raises(SecureError, match="nothing sent"):
        alice.secure.direct(bob.username, "in clear?", WAIT)
    assert bob.read(bob.message(alice.username)) == "encrypted, once"
    assert not any(f.get("message") == "in clear?" for f in bob.raw)

"""A hostile server against the client library's end-to-end layer.

The server is the real one, but each client reaches it through a `Relay` that the test
plays as the attacker: it holds the server's certificate (as a server that lies would),
and every frame the server sends passes through its `tamper` function on the way. So
each test is the server, or the network after TLS, lying in one way. Every lie must show
as a warning (an `e2e` notice, or a message whose `e2e` status is `refused`), never as
a normal message.
"""

from __future__ import annotations

import copy
import json
import select
import socket
import ssl
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import vodozemac

from chat import devices
from chat.client import raise_for_error
from chat.client.format import format_event
from chat.client.secure import SecureError
from chat.tls import client_context
from tests.test_client_linemode import WAIT
from tests.test_client_secure_e2e import Person, encrypted_room, name

Frame = dict[str, Any]
Tamper = Callable[[Frame], list[Frame]]


class Relay:
    """A TLS relay from 127.0.0.1:<free port> to the real server, steered by `tamper`
    (each frame from the server -> the frames to pass on). One thread per connection
    owns both of its TLS sockets (an SSL object is not for two threads at once)."""

    def __init__(self, server: Any) -> None:
        self.server = server
        self.tamper: Tamper | None = None
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(server.settings.certfile, server.settings.keyfile)
        self.upstream = client_context(server.cafile)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self.listener.close()
        for sock in self._sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, raw: socket.socket) -> None:
        self._sockets.append(raw)
        try:
            down = self.context.wrap_socket(raw, server_side=True)
            up = self.upstream.wrap_socket(
                socket.create_connection((self.server.host, self.server.port), timeout=WAIT),
                server_hostname=self.server.host)
        except OSError:
            raw.close()
            return
        self._sockets.append(up)
        try:
            self._pump(down, up)
        finally:
            down.close()
            up.close()

    def _pump(self, down: ssl.SSLSocket, up: ssl.SSLSocket) -> None:
        for sock in (down, up):
            sock.setblocking(False)
        out = {down: bytearray(), up: bytearray()}  # what waits to be written to each
        partial = bytearray()  # the start of a frame from the server
        ended = False
        while not ended or any(out.values()):
            writers = [sock for sock, data in out.items() if data]
            # The timeout only bounds how long an ended peer goes unnoticed.
            readable, writable, _ = select.select([] if ended else [down, up], writers, [],
                                                  1.0)
            for sock in readable:
                while True:
                    try:
                        data = sock.recv(65536)
                    except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                        break
                    except OSError:
                        return
                    if not data:
                        ended = True
                        break
                    if sock is up:
                        partial += data
                        while b"\n" in partial:
                            line, _, rest = bytes(partial).partition(b"\n")
                            partial = bytearray(rest)
                            out[down] += self._tampered(line)
                    else:
                        out[up] += data
                    if not sock.pending():
                        break
            for sock in writable:
                try:
                    sent = sock.send(out[sock])
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    continue
                except OSError:
                    return
                del out[sock][:sent]

    def _tampered(self, line: bytes) -> bytes:
        tamper = self.tamper
        if tamper is None:
            return line + b"\n"
        frames = tamper(json.loads(line))
        return b"".join(json.dumps(f, separators=(",", ":")).encode() + b"\n"
                        for f in frames)


@dataclass
class Via:
    """The server as a client sees it through a relay (what Person connects to)."""
    host: str
    port: int
    cafile: Path


@pytest.fixture
def cast(chat_server: Any, tmp_path: Path) -> Any:
    made: list[tuple[Person, Relay]] = []

    def make(**kw: Any) -> Person:
        username = name()
        chat_server.register(username)
        relay = Relay(chat_server)
        person = Person(Via("127.0.0.1", relay.port, chat_server.cafile), username,
                        tmp_path / uuid.uuid4().hex, **kw)
        person.relay = relay  # type: ignore[attr-defined]
        made.append((person, relay))
        return person

    yield make
    for person, relay in made:
        person.close()
        relay.close()


def relay(person: Person) -> Relay:
    return person.relay  # type: ignore[attr-defined, no-any-return]


def forged_device(user: str, device: str) -> Frame:
    """A directory entry for `user`'s `device`, correctly self-signed, with the server's
    own keys: what a server passing off its keys as someone's device would list."""
    mallory = vodozemac.Account()
    keys = {"curve25519": mallory.curve25519_key.to_base64(), "device": device,
            "ed25519": mallory.ed25519_key.to_base64(), "user": user}
    return {"device": device, "curve25519": keys["curve25519"], "ed25519": keys["ed25519"],
            "signature": mallory.sign(devices.canonical(keys)).to_base64()}


def in_keys(change: Callable[[list[Frame]], list[Frame]], user: str) -> Tamper:
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
    relay(alice).tamper = in_keys(
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
    relay(alice).tamper = in_keys(
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

    relay(bob).tamper = tamper
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

    relay(bob).tamper = tamper
    raise_for_error(alice.secure.direct(bob.username, "first contact", WAIT))
    assert bob.read(bob.message(alice.username)) == "first contact"
    warning = bob.notice("warning", username=alice.username)
    assert warning["loud"] and "refused" in warning["text"]


def test_a_server_hiding_someones_devices_cannot_make_us_write_in_clear(cast: Any) -> None:
    alice, bob = cast(), cast()
    raise_for_error(alice.secure.direct(bob.username, "encrypted, once", WAIT))
    relay(alice).tamper = in_keys(lambda entries: [], bob.username)
    alice.secure.devices(bob.username)  # the directory now "has no device" for bob
    alice.notice("removed", username=bob.username, device=bob.device)
    with pytest.raises(SecureError, match="nothing sent"):
        alice.secure.direct(bob.username, "in clear?", WAIT)
    assert bob.read(bob.message(alice.username)) == "encrypted, once"
    assert not any(f.get("message") == "in clear?" for f in bob.raw)

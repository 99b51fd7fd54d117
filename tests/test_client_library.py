"""The client library (chat.client.connection): first against a scripted TLS peer, then
against the real server.

The scripted peer (`FakeServer`) runs a test's script in a thread over real TLS, with the
session's development certificates (conftest's `cert_dir`), so the I/O thread's routing,
pong, framing and ending are tested without the server. The second half uses the
`chat_server` fixture from tests/conftest.py.
"""

from __future__ import annotations

import socket
import ssl
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from chat import certs
from chat.client import (
    CertificateNotTrusted,
    ChatClient,
    ConnectFailed,
    ConnectionClosed,
    IncompatibleServer,
    ServerError,
    TimedOut,
    TLSFailed,
    raise_for_error,
)
from chat.protocol import FrameDecoder, encode
from chat.tls import client_context, server_context

WAIT = 10.0  # seconds: the bound on anything a test waits for; generous for a loaded machine
HELLO = {
    "type": "hello", "protocol": 1, "server": "fake/0", "max_frame_bytes": 16384,
    "min_password_length": 15,
}
PASSWORD = "correct horse battery staple 42"


# -- certificates -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    ca: Path
    other_ca: Path  # a CA that did not sign the server's certificate
    cert: Path
    key: Path


@pytest.fixture(scope="session")
def pki(cert_dir: certs.CertPaths, tmp_path_factory: pytest.TempPathFactory) -> Pki:
    other = certs.generate_dev_certs(tmp_path_factory.mktemp("other-ca"))
    return Pki(cert_dir.ca_cert, other.ca_cert, cert_dir.server_cert, cert_dir.server_key)


# -- the scripted peer ------------------------------------------------------------------------


class Peer:
    """The server's end of one TLS connection, blocking, used by the script's thread only."""

    def __init__(self, sock: ssl.SSLSocket) -> None:
        self.sock = sock
        self.decoder = FrameDecoder(1 << 20)
        self.frames: list[Any] = []

    def send(self, frame: dict[str, Any]) -> None:
        self.sock.sendall(encode(frame))

    def recv(self) -> dict[str, Any]:
        while not self.frames:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError("the client closed")
            self.frames.extend(self.decoder.feed(data))
        frame = self.frames.pop(0)
        assert isinstance(frame, dict), frame
        return frame

    def wait_closed(self) -> None:
        """Read until the client hangs up (ignoring what it says)."""
        try:
            while self.sock.recv(65536):
                pass
        except OSError:
            pass


Script = Callable[[Peer], None]


class FakeServer:
    """Accepts one connection on 127.0.0.1:<free port> and runs `script` on it in a thread."""

    def __init__(
        self, pki: Pki, script: Script, *, hello: dict[str, Any] | None = HELLO,
        tls: bool = True, fails: bool = False,
    ) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(WAIT)
        self.port = self.listener.getsockname()[1]
        self.context = server_context(pki.cert, pki.key)
        self.script = script
        self.hello = hello
        self.tls = tls
        self.fails = fails  # the test makes the connection fail: the script's error is expected
        self.error: BaseException | None = None
        self.release = threading.Event()  # scripts that hold a connection open wait on it
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        try:
            conn, _ = self.listener.accept()
            conn.settimeout(WAIT)
            if not self.tls:
                with conn:
                    self.script(conn)  # type: ignore[arg-type]
                return
            with self.context.wrap_socket(conn, server_side=True) as sock:
                peer = Peer(sock)
                if self.hello is not None:
                    peer.send(self.hello)
                self.script(peer)
        except BaseException as exc:
            self.error = exc

    def __enter__(self) -> FakeServer:
        self.thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release.set()
        self.thread.join(WAIT)
        self.listener.close()
        assert not self.thread.is_alive(), "the fake server's script did not finish"
        if self.error is not None and exc_info[0] is None and not self.fails:
            raise self.error


def connect(pki: Pki, server: FakeServer, **kwargs: Any) -> ChatClient:
    return ChatClient.connect(
        "127.0.0.1", server.port, ssl_context=client_context(pki.ca), timeout=WAIT, **kwargs
    )


def message(n: int, text: str = "hi", **extra: Any) -> dict[str, Any]:
    return {
        "type": "message", "msg_id": n, "ts": "2026-11-23T19:50:16.123Z",
        "username": "alice", "room": "general", "message": text, **extra,
    }


# -- the library against the scripted peer ----------------------------------------------------


def test_connect_exposes_hello_and_keeps_it_out_of_the_events(pki: Pki) -> None:
    def script(peer: Peer) -> None:
        peer.send(message(1))
        peer.wait_closed()

    with FakeServer(pki, script) as server, connect(pki, server) as client:
        assert client.hello == HELLO
        assert client.next_event(WAIT) == message(1)


def test_request_gets_the_reply_whose_re_matches_and_events_keep_wire_order(pki: Pki) -> None:
    def script(peer: Peer) -> None:
        request = peer.recv()
        assert request["type"] == "who" and isinstance(request["id"], int)
        peer.send({"type": "who", "room": "general", "users": [], "re": request["id"] + 1000})
        peer.send(message(1))
        peer.send({"type": "who", "room": "general", "users": ["alice"], "re": request["id"]})
        peer.wait_closed()

    with FakeServer(pki, script) as server, connect(pki, server) as client:
        reply = client.who("general", timeout=WAIT)
        assert reply["users"] == ["alice"]
        kinds = [client.next_event(WAIT) for _ in range(3)]
        assert [f["type"] for f in kinds] == ["who", "message", "who"]
        assert kinds[2] == reply  # the reply is an event too, in its place


def test_replies_can_be_kept_out_of_the_events(pki: Pki) -> None:
    def script(peer: Peer) -> None:
        request = peer.recv()
        peer.send({"type": "pong", "re": request["id"]})
        peer.send(message(1))
        peer.wait_closed()

    with FakeServer(pki, script) as server, connect(
        pki, server, replies_as_events=False
    ) as client:
        assert client.ping(WAIT)["type"] == "pong"
        assert client.next_event(WAIT)["type"] == "message"


def test_concurrent_requests_each_get_their_own_reply(pki: Pki) -> None:
    count = 8

    def script(peer: Peer) -> None:
        requests = [peer.recv() for _ in range(count)]
        for request in reversed(requests):
            peer.send({"type": "ok", "op": "join", "room": request["room"], "re": request["id"]})
        peer.wait_closed()

    with FakeServer(pki, script) as server, connect(pki, server) as client:
        replies: dict[str, dict[str, Any]] = {}

        def join(room: str) -> None:
            replies[room] = client.join(room, timeout=WAIT)

        threads = [threading.Thread(target=join, args=(f"r{i}",)) for i in range(count)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(WAIT)
        assert {room: reply["room"] for room, reply in replies.items()} == {
            f"r{i}": f"r{i}" for i in range(count)
        }


def test_a_server_ping_is_answered_with_pong(pki: Pki) -> None:
    answered = []

    def script(peer: Peer) -> None:
        peer.send({"type": "ping"})
        answered.append(peer.recv())
        peer.send(message(1))
        peer.wait_closed()

    with FakeServer(pki, script) as server, connect(pki, server) as client:
        assert client.next_event(WAIT) == {"type": "ping"}
        assert client.next_event(WAIT)["type"] == "message"  # sent after the pong arrived
    assert answered == [{"type": "pong"}]


def test_a_large_frame_in_small_pieces_arrives_whole(pki: Pki) -> None:
    big = {
        "type": "history", "room": "general",
        "messages": [message(n, "é" * 3999 + "\n") for n in range(200)],
    }

    def script(peer: Peer) -> None:
        request = peer.recv()
        data = encode({**big, "re": request["id"]})
        assert len(data) > 1_000_000
        for start in range(0, len(data), 7001):
            peer.sock.sendall(data[start : start + 7001])
        peer.wait_closed()

    with FakeServer(pki, script) as server, connect(pki, server) as client:
        reply = client.history(room="general", limit=200, timeout=WAIT)
        assert reply["messages"] == big["messages"]


def test_sending_more_than_the_socket_holds_arrives_whole_and_in_order(pki: Pki) -> None:
    count, text = 1000, "x" * 10_000  # 10 MB: far more than the kernel buffers hold
    received: list[int] = []

    def script(peer: Peer) -> None:
        peer.send({"type": "ping"})  # the client must keep reading while its writes wait
        server.release.wait(WAIT)  # let the client's writes back up first
        while len(received) < count:
            frame = peer.recv()
            if frame["type"] == "send":
                received.append(frame["seq"])
        peer.send(message(1, "all in"))
        peer.wait_closed()

    server = FakeServer(pki, script)
    with server, connect(pki, server) as client:
        for seq in range(count):
            client.send({"type": "send", "room": "general", "message": text, "seq": seq})
        assert client.next_event(WAIT) == {"type": "ping"}
        server.release.set()
        assert client.next_event(WAIT)["message"] == "all in"
    assert received == list(range(count))


def test_the_event_stream_ends_after_every_frame_bye_included(pki: Pki) -> None:
    def script(peer: Peer) -> None:
        for n in range(3):
            peer.send(message(n))
        peer.send({"type": "bye", "reason": "shutdown"})

    with FakeServer(pki, script) as server, connect(pki, server) as client:
        frames = list(client.events(timeout=WAIT))
        assert [f["type"] for f in frames] == ["message"] * 3 + ["bye"]
        assert client.bye_reason == "shutdown"
        assert client.closed
        with pytest.raises(ConnectionClosed) as caught:
            client.next_event(WAIT)  # the end stays visible
        assert caught.value.reason == "shutdown"
        with pytest.raises(ConnectionClosed):
            client.send({"type": "ping"})


def test_a_pending_request_fails_when_the_server_closes(pki: Pki) -> None:
    def script(peer: Peer) -> None:
        peer.recv()  # and hang up without answering

    with (
        FakeServer(pki, script) as server,
        connect(pki, server) as client,
        pytest.raises(ConnectionClosed),
    ):
        client.ping(timeout=WAIT)


def test_a_request_without_reply_times_out(pki: Pki) -> None:
    def script(peer: Peer) -> None:
        peer.recv()
        server.release.wait(WAIT)

    server = FakeServer(pki, script)
    with server, connect(pki, server) as client:
        with pytest.raises(TimedOut):
            client.ping(timeout=0.2)
        with pytest.raises(TimedOut):
            client.next_event(timeout=0.01)
        assert not client.closed


def test_bad_lines_from_the_server_are_dropped(pki: Pki) -> None:
    def script(peer: Peer) -> None:
        peer.sock.sendall(b"this is not json\n[1,2]\n")
        peer.send(message(1))
        peer.wait_closed()

    with FakeServer(pki, script) as server, connect(pki, server) as client:
        assert client.next_event(WAIT) == message(1)
        assert client.bad_frames == 2


def test_a_frame_over_the_servers_limit_is_refused_locally(pki: Pki) -> None:
    def script(peer: Peer) -> None:
        peer.wait_closed()

    hello = {**HELLO, "max_frame_bytes": 100}
    with FakeServer(pki, script, hello=hello) as server, connect(pki, server) as client:
        with pytest.raises(ValueError, match="limit of 100"):
            client.say("general", "x" * 100)
        with pytest.raises(ValueError):
            client.history(room="general", with_="bob")
        with pytest.raises(ValueError):
            client.history(room="general", before=1, after=2)


def test_close_ends_the_event_stream_promptly(pki: Pki) -> None:
    def script(peer: Peer) -> None:
        peer.wait_closed()

    with FakeServer(pki, script) as server:
        client = connect(pki, server)
        client.close()
        assert client.closed
        assert list(client.events(timeout=WAIT)) == []


def test_quit_sends_quit_and_waits_for_the_close(pki: Pki) -> None:
    def script(peer: Peer) -> None:
        assert peer.recv() == {"type": "quit"}
        peer.send({"type": "bye", "reason": "quit"})

    with FakeServer(pki, script) as server:
        client = connect(pki, server)
        client.quit(timeout=WAIT)
        assert [f["type"] for f in client.events(timeout=WAIT)] == ["bye"]


def test_an_error_frame_is_returned_and_raise_for_error_raises(pki: Pki) -> None:
    def script(peer: Peer) -> None:
        request = peer.recv()
        assert request["password"] == PASSWORD and "id" in request
        peer.send({
            "type": "error", "code": "rate_limited", "message": "slow down",
            "retry_after": 7, "re": request["id"],
        })
        peer.wait_closed()

    with FakeServer(pki, script) as server, connect(pki, server) as client:
        reply = client.login("alice", PASSWORD, timeout=WAIT)
        assert reply["code"] == "rate_limited"
        assert client.username is None
        assert PASSWORD not in repr(client)
        with pytest.raises(ServerError) as caught:
            raise_for_error(reply)
        assert (caught.value.code, caught.value.retry_after) == ("rate_limited", 7)


# -- connection failures ------------------------------------------------------------------------


def test_an_untrusted_certificate_is_reported_as_such(pki: Pki) -> None:
    with FakeServer(pki, lambda peer: None, fails=True) as server:
        with pytest.raises(CertificateNotTrusted) as caught:
            ChatClient.connect(
                "127.0.0.1", server.port, ssl_context=client_context(pki.other_ca), timeout=WAIT
            )
        assert caught.value.verify_message


def test_a_certificate_for_another_host_is_not_trusted(pki: Pki) -> None:
    with (
        FakeServer(pki, lambda peer: None, fails=True) as server,
        pytest.raises(CertificateNotTrusted, match=r"(?i)hostname"),
    ):
        ChatClient.connect(
            "127.0.0.1", server.port, ssl_context=client_context(pki.ca),
            server_hostname="chat.example", timeout=WAIT,
        )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_refused_connection_is_a_connect_failure(pki: Pki) -> None:
    with pytest.raises(ConnectFailed, match=r"127\.0\.0\.1"):
        ChatClient.connect("127.0.0.1", free_port(), ssl_context=client_context(pki.ca))


def test_a_peer_that_never_handshakes_is_a_tls_failure(pki: Pki) -> None:
    def script(conn: socket.socket) -> None:
        server.release.wait(WAIT)

    server = FakeServer(pki, script, tls=False)
    with server, pytest.raises(TLSFailed, match="timed out"):
        ChatClient.connect(
            "127.0.0.1", server.port, ssl_context=client_context(pki.ca), timeout=0.3
        )


def test_a_plaintext_peer_is_a_tls_failure(pki: Pki) -> None:
    def script(conn: socket.socket) -> None:
        conn.sendall(b'{"type":"hello"}\n' * 20)
        try:
            conn.recv(1024)
        except OSError:
            pass

    server = FakeServer(pki, script, tls=False, fails=True)
    with server, pytest.raises(TLSFailed) as caught:
        connect(pki, server)
    assert not isinstance(caught.value, CertificateNotTrusted)


@pytest.mark.parametrize(
    "first",
    [message(1), {**HELLO, "protocol": 2}],
    ids=["not-hello", "protocol-2"],
)
def test_a_server_that_does_not_say_hello_v1_is_incompatible(
    pki: Pki, first: dict[str, Any]
) -> None:
    server = FakeServer(pki, lambda peer: peer.wait_closed(), hello=first)
    with server, pytest.raises(IncompatibleServer):
        connect(pki, server)


def test_a_server_busy_greeting_is_a_server_error(pki: Pki) -> None:
    busy = {"type": "error", "code": "server_busy", "message": "try later"}
    with FakeServer(pki, lambda peer: None, hello=busy) as server:
        with pytest.raises(ServerError) as caught:
            connect(pki, server)
        assert caught.value.code == "server_busy"


# -- the library against the real server --------------------------------------------------------


def new_name() -> str:
    return "u" + uuid.uuid4().hex[:12]


def open_session(server: Any, username: str, password: str = PASSWORD) -> ChatClient:
    client = ChatClient.connect(
        server.host, server.port, ssl_context=client_context(server.cafile), timeout=WAIT
    )
    try:
        raise_for_error(client.login(username, password, timeout=WAIT))
    except BaseException:
        client.close()
        raise
    return client


@pytest.fixture
def user(chat_server: Any) -> str:
    name = new_name()
    chat_server.register(name, PASSWORD)
    return name


def wait_for(client: ChatClient, pred: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    """The first event that matches `pred` (within WAIT per event)."""
    for frame in client.events(timeout=WAIT):
        if pred(frame):
            return frame
    raise AssertionError("the connection ended before the expected event")


def test_real_register_then_login(chat_server: Any) -> None:
    name = new_name()
    with ChatClient.connect(
        chat_server.host, chat_server.port, ssl_context=client_context(chat_server.cafile),
        timeout=WAIT,
    ) as client:
        assert client.hello["protocol"] == 1
        assert client.register(name, PASSWORD, timeout=WAIT)["type"] == "ok"
        again = client.register(name, PASSWORD, timeout=WAIT)
        assert again["type"] == "error" and again["code"] == "username_taken"
        welcome = client.login(name, PASSWORD, timeout=WAIT)
        assert welcome["type"] == "welcome" and "general" in welcome["rooms"]
        assert client.username == name


def test_real_wrong_password_is_invalid_credentials(chat_server: Any, user: str) -> None:
    with ChatClient.connect(
        chat_server.host, chat_server.port, ssl_context=client_context(chat_server.cafile),
        timeout=WAIT,
    ) as client:
        reply = client.login(user, PASSWORD + " wrong", timeout=WAIT)
        assert reply["type"] == "error" and reply["code"] == "invalid_credentials"


def test_real_room_message_reaches_the_other_user(chat_server: Any, user: str) -> None:
    other = new_name()
    chat_server.register(other, PASSWORD)
    with open_session(chat_server, user) as alice, open_session(chat_server, other) as bob:
        echo = raise_for_error(alice.say("general", "hello\nsecond line", timeout=WAIT))
        assert echo["type"] == "message" and echo["username"] == user
        got = wait_for(bob, lambda f: f.get("type") == "message" and f.get("username") == user)
        assert got["message"] == "hello\nsecond line"
        assert got["msg_id"] == echo["msg_id"] and "re" not in got


def test_real_direct_message_and_offline_delivery(chat_server: Any, user: str) -> None:
    other = new_name()
    chat_server.register(other, PASSWORD)
    with open_session(chat_server, user) as alice:
        echo = raise_for_error(alice.direct(other, "while you were out", timeout=WAIT))
        assert echo["to"] == other
    with open_session(chat_server, other) as bob:
        got = wait_for(bob, lambda f: f.get("type") == "message")
        assert (got["username"], got["to"], got["message"]) == (user, other, "while you were out")
        history = bob.history(with_=user, timeout=WAIT)
        assert history["with"] == user
        assert [m["message"] for m in history["messages"]] == ["while you were out"]


def test_real_join_who_history_leave(chat_server: Any, user: str) -> None:
    room = "r" + uuid.uuid4().hex[:8]
    with open_session(chat_server, user) as client:
        assert client.join(room, timeout=WAIT)["type"] == "ok"
        who = client.who(room, timeout=WAIT)
        assert who["type"] == "who" and who["users"] == [user]
        for n in range(3):
            raise_for_error(client.say(room, f"m{n}", timeout=WAIT))
        history = client.history(room=room, limit=2, timeout=WAIT)
        assert [m["message"] for m in history["messages"]] == ["m1", "m2"]
        older = client.history(room=room, before=history["messages"][0]["msg_id"], timeout=WAIT)
        assert [m["message"] for m in older["messages"]] == ["m0"]
        assert client.leave(room, timeout=WAIT)["type"] == "ok"
        refused = client.say(room, "gone", timeout=WAIT)
        assert refused["type"] == "error" and refused["code"] == "not_in_room"


def test_real_ping_and_quit(chat_server: Any, user: str) -> None:
    client = open_session(chat_server, user)
    assert client.ping(timeout=WAIT)["type"] == "pong"
    client.quit(timeout=WAIT)
    frames = list(client.events(timeout=WAIT))
    assert frames[-1] == {"type": "bye", "reason": "quit"}

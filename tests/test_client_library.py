"""The client library (chat.client.connection): first against a scripted TLS peer, then
against the real server.

The scripted peer (`FakeServer`) runs a test's script in a thread over real TLS, with the
session's development certificates (conftest's `cert_dir`), so the I/O thread's routing,
pong, framing and ending are tested without the server. The second half uses the
`chat_server` fixture from tests/conftest.py.
"""

from __future__ import annotations

import itertools
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
    ClientCertificateRefused,
    ConnectFailed,
    ConnectionClosed,
    IncompatibleServer,
    ServerError,
    TimedOut,
    TLSFailed,
    raise_for_error,
)
from chat.client.connection import MAX_RESENDS
from chat.client.limits import SendPacer
from chat.protocol import FrameDecoder, encode
from chat.tls import client_context, server_context
from tests.tls_helpers import client_certificate

WAIT = 10.0  # seconds: the bound on anything a test waits for; generous for a loaded machine
HELLO = {
    "type": "hello", "protocol": 1, "server": "fake/0", "max_frame_bytes": 16384,
    "min_password_length": 15,
}
# A hello whose limits do not make the client pace itself, for tests that send a lot.
UNLIMITED_HELLO = {**HELLO, "limits": {"frames_per_second": 1e9, "frame_burst": 10**9}}
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

    with FakeServer(pki, script) as server, connect(
        pki, server, replies_as_events=True
    ) as client:
        reply = client.who("general", timeout=WAIT)
        assert reply["users"] == ["alice"]
        kinds = [client.next_event(WAIT) for _ in range(3)]
        assert [f["type"] for f in kinds] == ["who", "message", "who"]
        assert kinds[2] == reply  # the reply is an event too, in its place


def replying_script(peer: Peer) -> None:
    """Answers a login, a ping and a send, then says one message of its own."""
    login = peer.recv()
    peer.send({"type": "welcome", "username": "alice", "rooms": ["general"], "session": "s",
               "last_msg_id": 0, "re": login["id"]})
    ping = peer.recv()
    peer.send({"type": "pong", "re": ping["id"]})
    send = peer.recv()
    peer.send(message(1, send["message"], re=send["id"]))
    peer.send(message(2, "from bob", username="bob"))
    peer.wait_closed()


def test_by_default_only_the_senders_own_message_of_all_replies_is_an_event(pki: Pki) -> None:
    with FakeServer(pki, replying_script) as server, connect(pki, server) as client:
        assert client.login("alice", PASSWORD, WAIT)["type"] == "welcome"
        assert client.ping(WAIT)["type"] == "pong"
        echo = client.say("general", "mine", WAIT)
        events = [client.next_event(WAIT) for _ in range(2)]
        assert events == [echo, message(2, "from bob", username="bob")]


def test_replies_can_be_kept_out_of_the_events(pki: Pki) -> None:
    with FakeServer(pki, replying_script) as server, connect(
        pki, server, replies_as_events=False
    ) as client:
        client.login("alice", PASSWORD, WAIT)
        assert client.ping(WAIT)["type"] == "pong"
        client.say("general", "mine", WAIT)
        assert client.next_event(WAIT)["message"] == "from bob"


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
        # The ping is answered, not yielded: the message, sent after the pong arrived, is first.
        assert client.next_event(WAIT)["type"] == "message"
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
        peer.send(message(0, "read me"))  # the client must keep reading while its writes wait
        server.release.wait(WAIT)  # let the client's writes back up first
        while len(received) < count:
            frame = peer.recv()
            if frame["type"] == "send":
                received.append(frame["seq"])
        peer.send(message(1, "all in"))
        peer.wait_closed()

    server = FakeServer(pki, script, hello=UNLIMITED_HELLO)
    with server, connect(pki, server) as client:
        for seq in range(count):
            client.send({"type": "send", "room": "general", "message": text, "seq": seq})
        assert client.next_event(WAIT)["message"] == "read me"
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
        # A wait this long is a throttle meant for the user: returned, not waited out.
        peer.send({
            "type": "error", "code": "rate_limited", "message": "slow down",
            "retry_after": 600, "re": request["id"],
        })
        peer.wait_closed()

    with FakeServer(pki, script) as server, connect(pki, server) as client:
        reply = client.login("alice", PASSWORD, timeout=WAIT)
        assert reply["code"] == "rate_limited"
        assert client.username is None
        assert PASSWORD not in repr(client)
        with pytest.raises(ServerError) as caught:
            raise_for_error(reply)
        assert (caught.value.code, caught.value.retry_after) == ("rate_limited", 600)


def refusal(request: dict[str, Any], retry_after: float) -> dict[str, Any]:
    return {"type": "error", "code": "rate_limited", "message": "too many frames; slow down",
            "retry_after": retry_after, "re": request["id"]}


def test_a_rate_limited_request_is_waited_out_and_sent_again(pki: Pki) -> None:
    sent: list[dict[str, Any]] = []

    def script(peer: Peer) -> None:
        first = peer.recv()
        sent.append(first)
        peer.send(refusal(first, 0.05))
        again = peer.recv()
        sent.append(again)
        peer.send(message(1, again["message"], re=again["id"]))
        peer.wait_closed()

    waits: list[float] = []
    with FakeServer(pki, script) as server, connect(
        pki, server, replies_as_events=True
    ) as client:
        client.on_resend = lambda frame, wait: waits.append(wait)
        reply = client.say("general", "one", timeout=WAIT)
        assert reply["type"] == "message" and reply["message"] == "one"
        # The refusal that was waited out is no event: the echo is the first.
        assert client.next_event(WAIT) == reply
    assert [f["message"] for f in sent] == ["one", "one"]
    assert sent[0]["id"] != sent[1]["id"]
    assert waits == [0.05]


def test_a_request_refused_every_time_is_returned_after_the_last_resend(pki: Pki) -> None:
    def script(peer: Peer) -> None:
        for _ in range(MAX_RESENDS + 1):
            peer.send(refusal(peer.recv(), 0.01))
        peer.wait_closed()

    with FakeServer(pki, script) as server, connect(
        pki, server, replies_as_events=True
    ) as client:
        reply = client.say("general", "never", timeout=WAIT)
        assert reply["code"] == "rate_limited"
        assert client.next_event(WAIT) == reply  # the last refusal, and only it, is an event
        with pytest.raises(TimedOut):
            client.next_event(0.01)


def test_events_wait_through_a_quiet_period_and_idle_ends_them_quietly(pki: Pki) -> None:
    def script(peer: Peer) -> None:
        peer.send({"type": "ping"})  # answered, not yielded, and not "something came"
        assert peer.recv() == {"type": "pong"}
        peer.send(message(1))
        server.release.wait(WAIT)

    server = FakeServer(pki, script)
    with server, connect(pki, server) as client:
        # The ping came first: the message is the first thing yielded.
        assert next(client.events(idle=WAIT)) == message(1)
        assert list(client.events(idle=0.05)) == []  # a quiet period ends it, no error
        with pytest.raises(TimedOut):
            next(client.events(timeout=0.01))
        # Both: whichever is shorter decides between a quiet end and TimedOut.
        assert list(client.events(timeout=WAIT, idle=0.01)) == []
        with pytest.raises(TimedOut):
            next(client.events(timeout=0.01, idle=WAIT))


def test_last_msg_id_starts_at_the_welcome_and_follows_the_messages(pki: Pki) -> None:
    def script(peer: Peer) -> None:
        login = peer.recv()
        peer.send({"type": "welcome", "username": "alice", "rooms": [], "session": "s",
                   "last_msg_id": 40, "re": login["id"]})
        peer.send(message(41))
        peer.send(message(12, to="alice"))  # a stored direct message: older, changes nothing
        peer.send({"type": "history", "room": "general", "messages": [message(99)]})
        peer.send(message(42))
        peer.wait_closed()

    with FakeServer(pki, script) as server, connect(pki, server) as client:
        assert client.last_msg_id is None
        client.login("alice", PASSWORD, WAIT)
        assert [f.get("msg_id") for f in itertools.islice(client.events(), 4)] == [
            41, 12, None, 42]
        # Only messages received live count: a history reply's messages say nothing
        # about what the session has had.
        assert client.last_msg_id == 42


@pytest.mark.parametrize("received", [2, 3])
def test_direct_position_says_where_a_backlog_cut_short_began(pki: Pki, received: int) -> None:
    def script(peer: Peer) -> None:
        login = peer.recv()
        peer.send({"type": "welcome", "username": "alice", "rooms": [], "session": "s",
                   "last_msg_id": 40, "backlog": {"count": 3, "first_msg_id": 10},
                   "re": login["id"]})
        peer.send(message(10, to="alice"))
        peer.send(message(41, to="alice"))  # live, meanwhile: not one of the three
        for n in (20, 30)[:received - 1]:
            peer.send(message(n, to="alice"))
        # The connection ends here (the script returns and the peer closes).

    with FakeServer(pki, script) as server, connect(pki, server) as client:
        client.login("alice", PASSWORD, WAIT)
        assert len(list(client.events(timeout=WAIT))) == received + 1
        assert client.last_msg_id == 41
        # Short of the three: the direct messages are caught up from before the first.
        assert client.direct_position == (9 if received < 3 else None)


def test_direct_position_is_none_without_a_backlog(pki: Pki) -> None:
    def script(peer: Peer) -> None:
        login = peer.recv()
        peer.send({"type": "welcome", "username": "alice", "rooms": [], "session": "s",
                   "last_msg_id": 40, "re": login["id"]})

    with FakeServer(pki, script) as server, connect(pki, server) as client:
        client.login("alice", PASSWORD, WAIT)
        assert list(client.events(timeout=WAIT)) == []
        assert client.direct_position is None


def test_history_direct_asks_for_every_direct_message(pki: Pki) -> None:
    asked: list[dict[str, Any]] = []

    def script(peer: Peer) -> None:
        request = peer.recv()
        asked.append(request)
        peer.send({"type": "history", "direct": True, "messages": [], "re": request["id"]})
        peer.wait_closed()

    with FakeServer(pki, script) as server, connect(pki, server) as client:
        assert client.history(direct=True, after=7, limit=200, timeout=WAIT)["direct"] is True
        with pytest.raises(ValueError):
            client.history(room="general", direct=True)
    assert {k: v for k, v in asked[0].items() if k != "id"} == {
        "type": "history", "direct": True, "after": 7, "limit": 200}


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
    with server, pytest.raises(TLSFailed, match=r"handshake .* timed out .* never answered"):
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
    assert "does not speak TLS" in str(caught.value) and "7072" in str(caught.value)


def test_a_plain_http_server_does_not_speak_tls(pki: Pki) -> None:
    def script(conn: socket.socket) -> None:
        conn.recv(4096)  # the ClientHello, taken for a bad request
        conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")

    server = FakeServer(pki, script, tls=False, fails=True)
    with server, pytest.raises(TLSFailed, match=r"does not speak TLS.*chat port is 7072"):
        connect(pki, server)


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


def test_real_a_client_that_outruns_the_server_has_every_refused_message_resent_in_order(
    server_factory: Any, refusing_sends: Any,
) -> None:
    # A server that refuses frames over its rate (rate_limited, retry_after), as older
    # releases did (ours now paces them): the client, sending as fast as it can, must
    # wait and resend each refused one, in order.
    refusing_sends(every=3)
    server = server_factory()
    name, other = new_name(), new_name()
    server.register(name, PASSWORD)
    server.register(other, PASSWORD)
    texts = [f"line {n}" for n in range(10)]
    with open_session(server, other) as reader, open_session(server, name) as writer:
        writer.pacer = SendPacer(1e9, 10**9)  # no pacing: every refusal is the server's
        resends: list[float] = []
        writer.on_resend = lambda frame, wait: resends.append(wait)
        for text in texts:
            raise_for_error(writer.say("general", text, timeout=WAIT))
        got = [f["message"] for f in itertools.islice(
            (f for f in reader.events(timeout=WAIT)
             if f.get("type") == "message" and f.get("username") == name), len(texts))]
        assert got == texts
        assert resends, "the server never refused: the test did not test the resend"


def test_real_a_paced_client_follows_the_limits_in_hello(server_factory: Any) -> None:
    # Whether the server ever refused a paced frame depends on how evenly it read them, so
    # this checks the pace itself (with a clock, in test_client_limits) and delivery here.
    server = server_factory(frames_per_second=50.0, frame_burst=30)
    name, other = new_name(), new_name()
    server.register(name, PASSWORD)
    server.register(other, PASSWORD)
    with open_session(server, other) as reader, open_session(server, name) as client:
        assert client.limits.frames_per_second == 50.0 and client.limits.frame_burst == 30
        assert client.pacer.rate < 50.0 and client.pacer.burst < 30
        texts = [f"m{n}" for n in range(80)]
        for text in texts:
            raise_for_error(client.say("general", text, timeout=WAIT))
        got = [f["message"] for f in itertools.islice(
            (f for f in reader.events(timeout=WAIT)
             if f.get("type") == "message" and f.get("username") == name), len(texts))]
        assert got == texts


def mutual_tls_server(server_factory: Any, cert_dir: certs.CertPaths) -> Any:
    return server_factory(client_cafile=str(cert_dir.ca_cert))


def test_real_a_server_that_wants_a_client_certificate_says_so(
    server_factory: Any, cert_dir: certs.CertPaths
) -> None:
    server = mutual_tls_server(server_factory, cert_dir)
    with pytest.raises(ClientCertificateRefused, match="requires a client certificate") as got:
        ChatClient.connect(server.host, server.port,
                           ssl_context=client_context(server.cafile), timeout=WAIT)
    assert got.value.missing


def test_real_a_client_certificate_from_another_ca_is_refused_and_the_right_one_works(
    server_factory: Any, cert_dir: certs.CertPaths, tmp_path: Path
) -> None:
    server = mutual_tls_server(server_factory, cert_dir)
    stranger = certs.generate_dev_certs(tmp_path / "stranger")
    wrong_cert, wrong_key = client_certificate(tmp_path / "wrong", stranger)
    context = client_context(server.cafile, certfile=wrong_cert, keyfile=wrong_key)
    with pytest.raises(ClientCertificateRefused, match="refused the client certificate") as got:
        ChatClient.connect(server.host, server.port, ssl_context=context, timeout=WAIT)
    assert not got.value.missing
    cert, key = client_certificate(tmp_path / "right", cert_dir)
    context = client_context(server.cafile, certfile=cert, keyfile=key)
    with ChatClient.connect(server.host, server.port, ssl_context=context, timeout=WAIT) as c:
        assert c.hello["type"] == "hello"


def test_positions_follow_each_conversation_when_the_welcome_gives_them(pki: Pki) -> None:
    """Several nodes: the welcome's `positions`, each raised only by its own conversation's
    live messages (chat.client.positions); one node's welcome has none."""
    def script(peer: Peer) -> None:
        login = peer.recv()
        peer.send({"type": "welcome", "username": "alice", "rooms": ["den", "general"],
                   "session": "s", "last_msg_id": 40, "re": login["id"],
                   "positions": {"rooms": {"den": 30, "general": 40}, "direct": 20}})
        peer.send(message(50))  # general
        peer.send(message(45, to="alice", room=None))
        peer.send({"type": "history", "room": "den", "messages": [message(99)]})
        peer.wait_closed()

    with FakeServer(pki, script) as server, connect(pki, server) as client:
        client.login("alice", PASSWORD, WAIT)
        assert len(list(itertools.islice(client.events(), 3))) == 3
        positions = client.positions
        assert positions is not None
        assert (positions.room("general"), positions.room("den"), positions.direct) == \
            (50, 30, 45)
        assert positions.room("joined-since") == 40

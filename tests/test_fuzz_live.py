"""Property-based fuzzing of a live server over TLS, beside well-behaved traffic.

Hypothesis makes random and mutated frames; several connections at once throw them at
one server while a well-behaved pair of users chats. Afterwards the server must still
answer, every well-formed message of the well-behaved sender must have arrived intact and
in order, and the database must be consistent.
"""

from __future__ import annotations

import json
import ssl
import threading
from concurrent.futures import ThreadPoolExecutor

from conftest import PASSWORD, TIMEOUT
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import text

VALID = [
    {"type": "ping"},
    {"type": "login", "username": "fuzzer", "password": PASSWORD},
    {"type": "register", "username": "fuzzer2", "password": PASSWORD},
    {"type": "send", "room": "general", "message": "fuzz"},
    {"type": "send", "to": "good", "message": "fuzz dm"},
    {"type": "join", "room": "fuzzroom"},
    {"type": "leave", "room": "fuzzroom"},
    {"type": "who", "room": "general"},
    {"type": "history", "room": "general", "limit": 5},
    {"type": "history", "with": "good", "after": 1},
    {"type": "passwd", "old": "x", "new": "y"},
]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


@st.composite
def mutated(draw) -> bytes:
    base = bytearray(json.dumps(draw(st.sampled_from(VALID))).encode())
    for _ in range(draw(st.integers(0, 4))):
        i = draw(st.integers(0, len(base)))
        op = draw(st.sampled_from(["flip", "insert", "delete"]))
        if op == "insert" or i == len(base):
            base[i:i] = draw(st.binary(min_size=1, max_size=3))
        elif op == "flip":
            base[i] ^= 1 << draw(st.integers(0, 7))
        else:
            del base[i]
    return bytes(base).replace(b"\n", b" ") + b"\n"


@st.composite
def random_object(draw) -> bytes:
    obj = draw(st.dictionaries(st.sampled_from(
        ["type", "id", "room", "to", "message", "username", "password", "limit", "before",
         "after", "with", "old", "new", "logout_others"]), json_values, max_size=6))
    if draw(st.booleans()):
        obj["type"] = draw(st.sampled_from([f["type"] for f in VALID] + ["pong", "x"]))
    try:
        line = json.dumps(obj, ensure_ascii=draw(st.booleans())).encode("utf-8", "surrogatepass")
    except (ValueError, UnicodeEncodeError):
        line = b"{}"
    return line.replace(b"\n", b" ") + b"\n"


payloads = st.lists(
    st.one_of(mutated(), random_object(), st.binary(max_size=300),
              st.just(b"x" * 20000 + b"\n")),
    min_size=1, max_size=15,
)


class GoodTraffic:
    """A well-behaved sender and receiver chatting for the whole test."""

    def __init__(self, server) -> None:
        self.sender = server.user("good")
        self.receiver = server.user("listener")
        self.sender.recv_until("presence", username="listener")
        self.sent: list[str] = []
        self.got: list[dict] = []
        self.stop = threading.Event()
        self.errors: list[BaseException] = []
        self.threads = [threading.Thread(target=self._send), threading.Thread(target=self._recv)]
        for t in self.threads:
            t.start()

    def _send(self) -> None:
        try:
            i = 0
            while not self.stop.is_set():
                text_ = f"good {i} ✓\n\tline two"
                reply = self.sender.request({"type": "send", "room": "general", "message": text_})
                assert reply["type"] == "message", reply
                self.sent.append(text_)
                i += 1
            self.sender.send({"type": "send", "room": "general", "message": "END"})
        except BaseException as exc:
            self.errors.append(exc)

    def _recv(self) -> None:
        try:
            while True:
                frame = self.receiver.recv()
                if frame["type"] == "message" and frame["username"] == "good":
                    if frame["message"] == "END":
                        return
                    self.got.append(frame)
        except BaseException as exc:
            self.errors.append(exc)

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(TIMEOUT * 2)


def _throw(server, chunks: list[bytes], login: bool) -> None:
    """One fuzzing connection: send everything, then read until pong or a close."""
    c = server.client()
    try:
        if login:
            c.login("fuzzer")
        for chunk in chunks:
            c.send_raw(chunk)
        # End any unfinished line first, so the marker is a frame of its own.
        c.send_raw(b"\n")
        c.send({"type": "ping", "id": "done"})
        while True:
            frame = c.recv()
            assert frame.get("type") in {
                "pong", "error", "ok", "welcome", "message", "who", "history", "presence", "bye",
            }, frame
            if frame.get("re") == "done" or frame["type"] == "bye":
                return
    except (TimeoutError, EOFError, ConnectionError, ssl.SSLError):
        return  # the server closed (too many errors): allowed
    finally:
        c.close()


def test_fuzz_live_server(server_factory):
    server = server_factory(max_outbound_bytes=8 << 20)
    server.register("fuzzer")
    good = GoodTraffic(server)

    @settings(max_examples=100, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(batches=st.lists(payloads, min_size=3, max_size=3), login=st.booleans())
    def three_connections_at_once(batches: list[list[bytes]], login: bool) -> None:
        with ThreadPoolExecutor(max_workers=3) as pool:
            for f in [pool.submit(_throw, server, batch, login) for batch in batches]:
                f.result(timeout=TIMEOUT * 2)
        assert not good.errors, good.errors
        assert server.client().request({"type": "ping"})["type"] == "pong"

    try:
        three_connections_at_once()
    finally:
        good.finish()
    assert not good.errors, good.errors
    assert len(good.sent) > 0
    assert [f["message"] for f in good.got] == good.sent  # intact, in order, none lost
    ids = [f["msg_id"] for f in good.got]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    with server.server.engine.connect() as conn:
        assert conn.execute(text("PRAGMA integrity_check")).scalar() == "ok"
        assert conn.execute(text("PRAGMA foreign_key_check")).all() == []
        stored = [r[0] for r in conn.execute(text(
            "SELECT body FROM messages WHERE sender_name = 'good' ORDER BY id"))]
    assert [b for b in stored if b != "END"] == good.sent

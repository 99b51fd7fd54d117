"""What one connection can cost the server: parsing, the frame rate, reply bytes, the
writer's queue, and what a closed connection leaves behind (the outside review's findings).

Each test holds the server still where it needs an interleaving (a held writer, a frozen
token clock) and waits on conditions, never on time.
"""

from __future__ import annotations

import gc
import socket
import struct
import threading
import time
import weakref

import pytest
from conftest import TIMEOUT
from test_races import HeldWriter, _lines, _wait_queue

from chat import protocol
from chat.connection import HOLD_RATE, HOLD_WRITER, RECV_SIZE, Connection
from chat.throttle import TokenBucket


def server_side(server, client) -> Connection:
    """The server's Connection object for a test client."""
    port = client.sock.getsockname()[1]
    for _ in range(2000):
        for loop in server.server.loops:
            for handler in list(loop.handlers):
                if isinstance(handler, Connection) and handler.peer.endswith(f":{port}"):
                    return handler
        time.sleep(0.01)
    raise AssertionError("no server-side connection for the client")


def wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"never: {what}")
        time.sleep(0.005)


class FrozenClock:
    """A token bucket's clock that stands still until the test moves it; once thawed, an
    hour passes at each look, so that no wait is ever needed again."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.thawed = False

    def __call__(self) -> float:
        if self.thawed:
            self.now += 3600
        return self.now

    def thaw(self) -> None:
        self.thawed = True


# --- the newline flood ---------------------------------------------------------------------

def test_a_newline_flood_is_parsed_no_further_than_the_error_cut_off(chat_server, monkeypatch):
    """One TLS record of 16,383 newlines used to become 16,383 parsed errors at once."""
    parsed = []
    real = protocol._decoder

    class Counting:
        def decode(self, text):
            parsed.append(len(text))
            return real.decode(text)

    monkeypatch.setattr(protocol, "_decoder", Counting())
    c = chat_server.client()
    c.send_raw(b"\n" * 16383)
    codes = []
    while (frame := c.recv())["type"] == "error":
        codes.append(frame["code"])
    assert codes == ["bad_frame"] * 10 and frame == {"type": "bye", "reason": "too_many_errors"}
    assert len(parsed) == 10  # not one line more than the cut-off needed


def test_the_decoder_holds_at_most_one_read_of_unhandled_bytes(server_factory):
    server = server_factory(frames_per_second=5, frame_burst=1)
    c = server.client()
    conn = server_side(server, c)
    clock = FrozenClock()
    conn.bucket = TokenBucket(5, 1, clock=clock)  # no token comes back: frozen
    c.send_raw(_lines(*[{"type": "ping", "id": i} for i in range(20000)]))  # ~520 KB
    assert c.recv() == {"type": "pong", "re": 0}
    wait_for(lambda: conn._holds & HOLD_RATE, "held for its rate")
    # What the client sent beyond that waits in TCP's buffers, not in ours.
    assert conn.decoder.buffered <= RECV_SIZE + server.settings.max_frame_bytes


# --- the frame rate: paced, never refused --------------------------------------------------

def test_frames_over_the_rate_wait_for_tokens_and_are_all_handled(server_factory):
    server = server_factory(frames_per_second=10, frame_burst=3)
    c = server.client()
    conn = server_side(server, c)
    clock = FrozenClock()
    conn.bucket = TokenBucket(10, 3, clock=clock)
    c.send_raw(_lines(*[{"type": "ping", "id": i} for i in range(8)]))
    assert [c.recv()["re"] for _ in range(3)] == [0, 1, 2]  # the burst
    wait_for(lambda: conn._holds & HOLD_RATE, "held for its rate")
    clock.now += 0.2  # two tokens
    assert [c.recv()["re"] for _ in range(2)] == [3, 4]
    clock.now += 10
    assert [c.recv() for _ in range(3)] == [{"type": "pong", "re": i} for i in (5, 6, 7)]


def test_quit_and_owed_pongs_never_wait(server_factory):
    server = server_factory(frames_per_second=10, frame_burst=3)
    c = server.client()
    conn = server_side(server, c)
    clock = FrozenClock()
    conn.bucket = TokenBucket(10, 3, clock=clock)
    conn._pongs_owed = 1  # as if the server had pinged
    c.send_raw(_lines({"type": "pong"}, {"type": "ping", "id": 1}, {"type": "ping", "id": 2},
                      {"type": "quit"}))
    assert c.recv() == {"type": "pong", "re": 1}
    assert c.recv() == {"type": "pong", "re": 2}
    assert c.recv() == {"type": "bye", "reason": "quit"}  # with the bucket empty


def test_quits_that_are_refused_still_spend_their_tokens(server_factory):
    """A quit never waits, so a refused one (a bad id) used to cost nothing: nine of them
    and a ping, over and over, made ten times the frame rate."""
    server = server_factory(frames_per_second=10, frame_burst=5)
    c = server.client()
    conn = server_side(server, c)
    clock = FrozenClock()
    conn.bucket = TokenBucket(10, 5, clock=clock)
    c.send_raw(_lines(*[{"type": "quit", "id": True}] * 9, {"type": "ping", "id": "p"}))
    assert [c.recv()["code"] for _ in range(9)] == ["invalid_field"] * 9
    wait_for(lambda: conn._holds & HOLD_RATE, "the ping waits for the tokens the quits spent")
    clock.now += 0.5  # 5 tokens: the debt of 4 paid, one for the ping
    conn.loop.call_soon(conn._release, HOLD_RATE)
    assert c.recv() == {"type": "pong", "re": "p"}


def test_frames_are_also_paced_by_the_bytes_they_take_to_parse(server_factory):
    """A frame of thousands of numbers takes a millisecond to parse, an empty line
    microseconds: the frame rate alone let 128 connections take a whole core."""
    server = server_factory(read_bytes_per_second=1000)
    c = server.client()
    conn = server_side(server, c)
    clock = FrozenClock()
    conn.read_budget = TokenBucket(1000, 25000, clock=clock)
    heavy = {"type": "ping", "pad": [1.5] * 2000}  # about 10 KB
    c.send_raw(_lines(*[{**heavy, "id": i} for i in range(5)]))
    # Two fit; the third puts the budget in debt, and waits for it to be paid.
    assert [c.recv()["re"] for _ in range(2)] == [0, 1]
    wait_for(lambda: conn._holds & HOLD_RATE, "held until the bytes are paid for")
    assert conn.read_budget.wait(0.0) > 0
    clock.thaw()
    conn.loop.call_soon(conn._release, HOLD_RATE)
    assert [c.recv()["re"] for _ in range(3)] == [2, 3, 4]


def test_a_send_flood_is_delivered_whole_and_in_order(server_factory):
    server = server_factory(frames_per_second=200, frame_burst=10)
    flooder = server.user("flooder")
    watcher = server.user("watcher")
    flooder.send_raw(b"".join(
        b'{"type":"send","room":"general","message":"flood %d","id":%d}\n' % (i, i)
        for i in range(100)))
    echoes = [flooder.recv_until("message") for _ in range(100)]
    assert [f["re"] for f in echoes] == list(range(100))
    seen = [watcher.recv_until("message")["message"] for _ in range(100)]
    assert seen == [f"flood {i}" for i in range(100)]


def test_a_peer_that_keeps_sending_after_the_bye_is_reset(chat_server):
    """The server reads what a peer sends after our bye only up to a bound, so that a
    flooder cannot keep it copying bytes until the close deadline."""
    c = chat_server.client()
    c.send_raw(b"\n" * 10)
    assert c.recv_until("bye")["reason"] == "too_many_errors"
    sent = 0
    with pytest.raises(OSError):
        while sent < 32 * 1024 * 1024:  # far more than the socket buffers hold
            c.sock.sendall(b"x" * 16384)
            sent += 16384


# --- reply bytes ---------------------------------------------------------------------------

def test_history_replies_are_weighed_and_a_connection_in_debt_waits(server_factory):
    server = server_factory(max_history_bytes=64 * 1024, reply_bytes_burst=64 * 1024,
                            reply_bytes_per_second=1000)
    writer = server.user("writer")
    for i in range(20):
        writer.request({"type": "send", "room": "general", "message": f"{i} " + "h" * 1500})
    reader = server.user("reader")
    conn = server_side(server, reader)
    clock = FrozenClock()
    conn.reply_budget = TokenBucket(1000, 64 * 1024, clock=clock)  # nothing comes back
    reader.send_raw(_lines(*[{"type": "history", "room": "general", "limit": 20, "id": i}
                             for i in range(4)], {"type": "ping", "id": "after"}))
    # Four pages of about 32 KB against a 64 KiB budget: the connection goes into debt
    # and is held, with the ping still unread.
    wait_for(lambda: conn._holds & HOLD_RATE and conn.reply_budget.wait(0.0) > 0,
             "held until the debt is paid")
    clock.thaw()  # the debt is paid quickly from now on; the loop's timer is told at once
    conn.loop.call_soon(conn._release, HOLD_RATE)
    replies = {r["re"]: r for r in (reader.recv() for _ in range(5))}  # any order
    assert replies["after"] == {"type": "pong", "re": "after"}
    assert all(len(replies[i]["messages"]) == 20 for i in range(4))


# --- the writer's queue --------------------------------------------------------------------

def test_a_connection_with_too_much_in_the_writer_is_read_no_further(server_factory):
    server = server_factory(max_requests_in_flight=4)
    c = server.user("eager")
    conn = server_side(server, c)
    with HeldWriter(server):
        c.send_raw(_lines(*[{"type": "send", "room": "general", "message": f"m{i}", "id": i}
                            for i in range(20)]))
        wait_for(lambda: conn._holds & HOLD_WRITER, "held for the writer")
        _wait_queue(server, 4)
        assert server.server.store.backlog == 4  # and it reads no more while held
    assert [c.recv_until("message")["re"] for _ in range(20)] == list(range(20))


def test_a_long_writer_queue_holds_every_connection_that_adds_to_it(server_factory):
    server = server_factory(writer_queue_limit=3)
    a, b = server.user("alpha"), server.user("bravo")
    ca, cb = server_side(server, a), server_side(server, b)
    with HeldWriter(server):
        for c in (a, b):
            c.send_raw(_lines(*[{"type": "send", "room": "general", "message": "x", "id": i}
                                for i in range(5)]))
        wait_for(lambda: ca._holds & HOLD_WRITER and cb._holds & HOLD_WRITER, "both held")
        assert server.server.store.backlog <= 3 + 2  # the bound, plus one job each
    for c, name in ((a, "alpha"), (b, "bravo")):
        assert [c.recv_until("message", username=name)["re"] for _ in range(5)] == [
            0, 1, 2, 3, 4]


# --- what a closed connection leaves ------------------------------------------------------

def test_a_reset_connection_is_freed_at_once_not_at_its_next_deadline(chat_server):
    c = chat_server.user("leaver")
    conn = server_side(chat_server, c)
    ref = weakref.ref(conn)
    loop = conn.loop
    del conn
    c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    c.close()  # a reset: no goodbye

    def gone() -> bool:
        gc.collect()
        return ref() is None

    # Its idle deadline is 90 s away: before, the loop's timer heap kept it until then.
    wait_for(gone, "the connection object freed")
    assert loop._timers  # the heap still has the entry, emptied


# --- TLS: a write that wants a read -------------------------------------------------------

def test_a_write_that_wants_a_read_is_retried_when_the_peer_sends(chat_server):
    """OpenSSL may answer a write with WANT_READ (it needs the peer's bytes first): the
    next read event must retry the write, even if no other frame is ever sent."""
    import ssl

    alice = chat_server.user("alice")
    bob = chat_server.user("bob")
    conn = server_side(chat_server, bob)
    real = conn.sock
    refusing = [True]
    class WantsRead:
        def __getattr__(self, name):
            return getattr(real, name)

        def send(self, data):
            if refusing[0]:
                raise ssl.SSLWantReadError()
            return real.send(data)

    conn.sock = WantsRead()  # type: ignore[assignment]
    alice.request({"type": "send", "to": "bob", "message": "are you there?"})
    # Until the loop itself was told to wait for a read (the writer's own direct send, if
    # it tried, is retried by the loop without one), then the next write may go.
    wait_for(lambda: conn._write_wants_read, "the loop's write told to wait for a read")
    refusing[0] = False
    bob.send({"type": "pong"})  # readable; a pong gets no reply, so nothing else writes
    assert bob.recv_until("message")["message"] == "are you there?"
    conn.sock = real


def test_no_io_loop_waits_for_a_fan_out(chat_server):
    """A fan-out to a big room used to run under the hub's lock, which a `join` on an I/O
    loop also took: that loop, and every connection on it, waited for the fan-out."""
    from chat.hub import Session
    from chat.store import Job

    alice = chat_server.user("alice")
    bob = chat_server.user("bob")
    stuck, entered = threading.Event(), threading.Event()

    class SlowReader:
        def deliver(self, data: bytes) -> bool:
            entered.set()
            stuck.wait(3 * TIMEOUT)  # longer than a client waits for its pong
            return True

        def accepting(self) -> bool:
            return True

        def end(self, reason: str) -> None:
            pass

    hub = chat_server.server.hub
    slow = Session(999, "slow", "slow", "x", out=SlowReader())
    done = threading.Event()
    chat_server.server.store.submit(Job(
        lambda db: (lambda: (hub.attach(slow, ["general"], []), done.set())), lambda e: None))
    assert done.wait(TIMEOUT)
    entered.clear()
    try:
        alice.send({"type": "send", "room": "general", "message": "to everyone"})
        assert entered.wait(TIMEOUT)  # the writer is inside the fan-out
        bob.send({"type": "join", "room": "elsewhere", "id": "j"})
        assert bob.request({"type": "ping"})["type"] == "pong"  # bob's loop is free
    finally:
        stuck.set()
    assert bob.recv_until("ok")["re"] == "j"


# --- found by the second review ------------------------------------------------------------

def test_one_history_read_at_a_time_per_connection(chat_server):
    """The read pool is everyone's: a connection pipelining history requests has one read
    on it at a time, the next waits (it used to fill the pool's queue, and others got
    server_busy)."""
    writer = chat_server.user("writer")
    for i in range(5):
        writer.request({"type": "send", "room": "general", "message": f"m{i}"})
    reader = chat_server.user("reader")
    conn = server_side(chat_server, reader)
    started = []
    real = chat_server.server.read_pool.submit

    def submit(fn):
        started.append(conn.reads_in_flight)
        real(fn)

    chat_server.server.read_pool.submit = submit
    reader.send_raw(_lines(*[{"type": "history", "room": "general", "id": i}
                             for i in range(6)]))
    replies = [reader.recv_until("history") for _ in range(6)]
    assert [r["re"] for r in replies] == list(range(6))  # and so in order
    assert started == [1] * 6  # never two of its reads on the pool at once


def test_a_history_page_of_short_messages_is_charged_for_its_rows(server_factory):
    server = server_factory(history_row_cost=1000)
    writer = server.user("writer")
    for i in range(10):
        writer.request({"type": "send", "room": "general", "message": f"m{i}"})
    reader = server.user("reader")
    conn = server_side(server, reader)
    clock = FrozenClock()
    conn.reply_budget = TokenBucket(1000, 1_000_000, clock=clock)
    page = reader.request({"type": "history", "room": "general", "limit": 10})
    assert len(page["messages"]) == 10
    # The pool thread delivers the reply, then has the loop settle the charge: under load
    # the client can read the reply (and a ping come back) before that. Each ping is a
    # turn of the loop; the charge is settled within a few.
    for _ in range(1000):
        reader.request({"type": "ping"})
        if conn.reads_in_flight == 0:
            break
    spent = 1_000_000 - conn.reply_budget._tokens
    assert 10 * 1000 < spent < 10 * 1000 + 5000  # the rows, and the reply's ~1 KB


def test_a_session_whose_detach_was_in_a_failed_batch_still_leaves_the_hub(chat_server):
    """A detach is no database work; when the batch it is in fails to commit, it must
    still happen, or the user stays online for good."""
    alice = chat_server.user("alice")
    carol = chat_server.user("carol")
    alice.recv_until("presence", username="carol")
    store = chat_server.server.store
    real = store._insert_rows

    def failing(conn, rows):
        raise RuntimeError("database is locked")

    with HeldWriter(chat_server):
        store._insert_rows = failing
        alice.send({"type": "send", "room": "general", "message": "lost", "id": 1})
        carol.close()
        _wait_queue(chat_server, 2)  # alice's message, then carol's detach: one batch
    assert alice.recv_until("error")["code"] == "internal"
    store._insert_rows = real
    assert alice.recv_until("presence", username="carol")["event"] == "leave"
    assert alice.request({"type": "who", "room": "general"})["users"] == ["alice"]


def test_a_send_between_a_join_and_a_leave_in_one_write_is_answered(chat_server):
    alice = chat_server.user("alice")
    alice.send_raw(_lines({"type": "join", "room": "brief", "id": 1},
                          {"type": "send", "room": "brief", "message": "hi", "id": 2},
                          {"type": "leave", "room": "brief", "id": 3}))
    replies = {}
    while len(replies) < 3:
        frame = alice.recv()
        if "re" in frame:
            replies[frame["re"]] = frame
    assert replies[2]["type"] == "message" and replies[2]["message"] == "hi"


def test_who_pipelined_after_a_join_includes_the_joiner(chat_server):
    bob = chat_server.user("bob")
    assert bob.request({"type": "join", "room": "den"})["type"] == "ok"
    alice = chat_server.user("alice")
    alice.send_raw(_lines({"type": "join", "room": "den", "id": 1},
                          {"type": "who", "room": "den", "id": 2}))
    assert alice.recv_until("who")["users"] == ["alice", "bob"]

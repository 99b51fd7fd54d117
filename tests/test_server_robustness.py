"""Bad peers and lifecycle: plaintext, silence, timeouts, slow readers, shutdown, restart."""

from __future__ import annotations

import socket
import ssl
import threading
import time
import warnings

import pytest
from alembic.script import ScriptDirectory
from conftest import TIMEOUT, Client

from chat.config import Settings
from chat.db import alembic_config, make_engine, upgrade_to_head
from chat.server import Server


def _raw(server) -> socket.socket:
    return socket.create_connection((server.host, server.port), timeout=TIMEOUT)


def test_plaintext_gets_no_json_and_is_closed(chat_server):
    s = _raw(chat_server)
    s.sendall(b'{"type":"ping"}\n')
    data = b""
    try:
        while chunk := s.recv(4096):
            data += chunk
    except ConnectionResetError:
        pass  # closing with our bytes unread makes the kernel send a reset: also a close
    assert b"{" not in data  # a TLS alert at most, never a JSON frame
    # The server still serves others.
    assert chat_server.client().request({"type": "ping"})["type"] == "pong"


def test_old_tls_versions_refused(chat_server):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(chat_server.cafile)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = ssl.TLSVersion.TLSv1
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    ctx.set_ciphers("ALL:@SECLEVEL=0")
    with pytest.raises(ssl.SSLError), _raw(chat_server) as s:
        ctx.wrap_socket(s, server_hostname="localhost")


def test_silent_client_does_not_block_others_and_times_out(server_factory):
    server = server_factory(handshake_timeout=1.0)
    silent = _raw(server)  # never starts the handshake
    start = time.monotonic()
    c = server.client()
    assert c.request({"type": "ping"})["type"] == "pong"
    assert silent.recv(1) == b""  # closed by the server after the handshake timeout
    assert time.monotonic() - start >= 0.9


def test_login_timeout(server_factory):
    server = server_factory(login_timeout=1.0)
    c = server.client()
    # Trickling pings does not extend the absolute login deadline.
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        c.send({"type": "ping"})
        frame = c.recv()
        if frame["type"] == "bye":
            assert frame["reason"] == "login_timeout"
            break
        time.sleep(0.2)
    else:
        pytest.fail("no login_timeout bye")
    assert c.at_eof()


def test_idle_client_pinged_then_dropped(server_factory):
    server = server_factory(idle_timeout=2.0)
    c = server.user("idler")
    assert c.recv() == {"type": "ping"}
    assert c.recv() == {"type": "bye", "reason": "idle"}


def test_answering_pings_keeps_connection(server_factory):
    # Exact timers: the ping comes at 3 s and leaves the pong 1 s, even on a loaded machine.
    server = server_factory(idle_timeout=4.0, timer_slack=0.0)
    c = server.user("awake")
    for _ in range(2):
        assert c.recv() == {"type": "ping"}
        c.send({"type": "pong"})
    assert c.request({"type": "ping"})["type"] == "pong"


def test_slow_consumer_dropped_others_unaffected(server_factory):
    server = server_factory(max_outbound_bytes=64 * 1024, shutdown_grace=1.0)
    stuck = server.user("stuck", rcvbuf=4096)  # logs in, then never reads again
    reader = server.user("reader")
    sender = server.user("sender")
    text = "z" * 3000
    sent = 0
    # Kernel buffers absorb a few MB first; keep going until the server gives up on it.
    while server.server.hub.sessions_of("stuck") and sent < 20000:
        reply = sender.request({"type": "send", "room": "general", "message": f"{sent} {text}"})
        assert reply["type"] == "message"
        frame = reader.recv_until("message")
        assert frame["message"] == f"{sent} {text}"  # nobody else lost or waited for anything
        sent += 1
    assert server.server.hub.sessions_of("stuck") == []
    frames = []
    try:
        while True:
            frames.append(stuck.recv())
    except (EOFError, ConnectionError, ssl.SSLError, TimeoutError):
        pass
    assert len(frames) < sent  # it was cut off, not fed everything
    # What it did get is intact and in order; a bye, if it got that far, says why.
    texts = [f["message"] for f in frames if f["type"] == "message"]
    assert texts == [f"{i} {text}" for i in range(len(texts))]
    if frames[-1]["type"] == "bye":
        assert frames[-1]["reason"] == "slow_consumer"
    assert reader.request({"type": "ping"})["type"] == "pong"


def test_shutdown_says_bye_and_keeps_messages(server_factory):
    server = server_factory()
    a = server.user("alice")
    ids = [a.request({"type": "send", "room": "general", "message": f"keep {i}"})["msg_id"]
           for i in range(20)]
    for i in range(30):  # unacknowledged sends in flight at shutdown
        a.send({"type": "send", "room": "general", "message": f"late {i}"})
    stopper = threading.Thread(target=server.server.stop)
    stopper.start()
    frames = []
    while True:
        frame = a.recv()
        frames.append(frame)
        if frame["type"] == "bye":
            break
    stopper.join(TIMEOUT)
    assert frames[-1] == {"type": "bye", "reason": "shutdown"}
    echoed = [f["msg_id"] for f in frames if f["type"] == "message"]
    # Restart on the same database: everything acknowledged is there.
    again = server_factory()
    c = again.user("alice", register=False)
    history = c.request({"type": "history", "room": "general", "limit": 200})
    stored = {m["msg_id"] for m in history["messages"]}
    assert set(ids) <= stored and set(echoed) <= stored


def test_restart_keeps_users_rooms_and_undelivered(server_factory):
    first = server_factory()
    a = first.user("alice")
    assert a.request({"type": "join", "room": "keep"})["type"] == "ok"
    first.register("bob")
    assert a.request({"type": "send", "to": "bob", "message": "later"})["type"] == "message"
    first.server.stop()
    second = server_factory()
    a2 = second.user("alice", register=False)
    b = second.client()
    assert b.login("bob")["type"] == "welcome"
    assert b.recv()["message"] == "later"
    assert sorted(a2.request({"type": "who", "room": "keep"})["users"]) == ["alice"]


def test_max_connections(server_factory):
    server = server_factory(max_connections=2)
    c1, c2 = server.client(), server.client()
    with pytest.raises((ssl.SSLError, ConnectionError, OSError, EOFError)):
        Client(server.host, server.port, server.cafile)
    assert c1.request({"type": "ping"})["type"] == "pong"
    c2.close()
    deadline = time.monotonic() + TIMEOUT
    while server.server.connection_count > 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.client().request({"type": "ping"})["type"] == "pong"


def test_migration_from_empty_to_head(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'm.db'}")
    upgrade_to_head(engine)
    upgrade_to_head(engine)  # idempotent
    with engine.connect() as conn:
        tables = {r[0] for r in conn.exec_driver_sql(
            "SELECT name FROM sqlite_master WHERE type='table'")}
        version = conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalar()
        mode = conn.exec_driver_sql("PRAGMA journal_mode").scalar()
    assert {"users", "memberships", "messages", "alembic_version"} <= tables
    assert version == ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()
    assert mode == "wal"


def test_dev_certificates_made_when_missing(tmp_path):
    settings = Settings(host="127.0.0.1", port=0, data_dir=str(tmp_path / "d"), bcrypt_rounds=4)
    server = Server(settings)
    server.start()
    try:
        ca = tmp_path / "d" / "certs" / "ca.crt"
        assert ca.exists()
        c = Client("127.0.0.1", server.address[1], ca)
        assert c.hello["type"] == "hello"
        assert (tmp_path / "d" / "pepper").stat().st_mode & 0o777 == 0o600
    finally:
        server.stop()


def test_a_batch_that_cannot_be_stored_is_answered_internal_and_the_next_one_works(
    chat_server, monkeypatch
):
    import sqlite3

    store = chat_server.server.store
    real = store._insert_rows
    calls = []

    def failing_once(conn, rows):
        calls.append(len(rows))
        if len(calls) == 1:
            raise sqlite3.OperationalError("disk I/O error")
        return real(conn, rows)

    monkeypatch.setattr(store, "_insert_rows", failing_once)
    alice = chat_server.user("alice")
    bob = chat_server.user("bob")
    reply = alice.request({"type": "send", "room": "general", "message": "lost"})
    assert reply["type"] == "error" and reply["code"] == "internal"
    reply = alice.request({"type": "send", "room": "general", "message": "kept"})
    assert reply["type"] == "message" and reply["message"] == "kept"
    assert bob.recv_until("message")["message"] == "kept"  # nothing of the failed one
    history = bob.request({"type": "history", "room": "general"})["messages"]
    assert [m["message"] for m in history] == ["kept"]

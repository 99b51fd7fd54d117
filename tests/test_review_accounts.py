"""Review of the account administration (commits d1952ec, 7e8a90e): regression tests for
what the review found.

Each test names its finding (see the review report) and fails on the code as reviewed.
They drive a live in-process server as tests/test_admin.py does; where a race has to be
forced, the test holds the store's writer with a job of its own until the racing requests
are queued behind it, so that they are decided in one batch, in a known order (the
WriterGate of tests/test_review_v11.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import PASSWORD, make_settings
from writer_gate import WriterGate, reply_to

from chat import admin, control
from chat import rooms as rooms_module
from chat.config import SettingError
from chat.server import Server

TIMEOUT = 20.0
NEW_PASSWORD = "another horse battery staple 43"


class Operator:
    """One control-socket request, in a thread of its own (it waits for the writer)."""

    def __init__(self, server: Any, action: str, args: dict[str, Any]) -> None:
        self.answer: dict[str, Any] = {}
        path = control.socket_path(Path(server.settings.data_dir))

        def call() -> None:
            self.answer = control.call(path, action, args)

        self.thread = threading.Thread(target=call)
        self.thread.start()

    def result(self) -> dict[str, Any]:
        self.thread.join(TIMEOUT)
        assert self.answer.get("ok"), self.answer
        return self.answer["result"]


def run_admin(capsys: Any, data_dir: str, *argv: str) -> tuple[int, dict[str, Any]]:
    code = admin.main(["--data-dir", data_dir, "--json", *argv])
    out = capsys.readouterr().out.strip().splitlines()
    return code, json.loads(out[-1]) if out else {}


def db_of(server: Any) -> sqlite3.Connection:
    return sqlite3.connect(f"{server.settings.data_dir}/chat.db")


# Finding 1: the moderation verbs (kick, ban, unban, set_role, invite, topic, set_history)
# never look at `UserState.ended`: they check membership in the RoomBook (the database),
# which a disable leaves as it was. An owner's `ban` pipelined after `user disable` (decided
# after it, in the writer's order) is carried out and audited under the disabled account,
# although protocol.md says what a session sends after the disable "is refused (forbidden,
# this session is ending)". A stolen session can thus still ban, demote or re-topic after
# the operator cut it off.
def test_review_a_ban_decided_after_the_owners_disable_is_refused(chat_server):
    alice, bob = chat_server.user("alice"), chat_server.user("bob")
    assert alice.request({"type": "create", "room": "dev"})["type"] == "ok"
    assert bob.request({"type": "join", "room": "dev"})["type"] == "ok"
    gate = WriterGate(chat_server.server)
    op = Operator(chat_server.server, "user_disable", {"name": "alice"})
    gate.wait_queued(1)
    alice.send({"type": "ban", "room": "dev", "username": "bob", "id": "b"})
    alice.send({"type": "topic", "room": "dev", "topic": "pwned", "id": "t"})
    gate.wait_queued(3)
    gate.open()
    assert op.result()["sessions_ended"] == 1
    db = db_of(chat_server)
    assert db.execute("SELECT count(*) FROM bans WHERE room = 'dev'").fetchone() == (0,)
    assert db.execute("SELECT topic FROM rooms WHERE name = 'dev'").fetchone() != ("pwned",)
    assert db.execute("SELECT count(*) FROM audit WHERE actor = 'alice' AND action IN "
                      "('ban', 'topic')").fetchone() == (0,)


# Finding 2: `passwd` (chat/login.py) checks neither `UserState.ended` nor the disabled
# flag: a `passwd` sent by a session just before the operator disabled the account, decided
# after the disable, changes the password of the disabled account. The attacker whose
# session was cut off then knows the password when the operator re-enables the account.
def test_review_a_passwd_decided_after_the_disable_changes_nothing(chat_server):
    alice = chat_server.user("alice")
    db = db_of(chat_server)
    before = db.execute("SELECT password_hash FROM users WHERE username = 'alice'").fetchone()
    gate = WriterGate(chat_server.server)
    op = Operator(chat_server.server, "user_disable", {"name": "alice"})
    gate.wait_queued(1)
    alice.send({"type": "passwd", "old": PASSWORD, "new": NEW_PASSWORD, "id": "p"})
    gate.wait_queued(2)  # after the bcrypt work, its job waits behind the disable
    gate.open()
    op.result()
    time.sleep(0.3)
    after = db.execute("SELECT password_hash FROM users WHERE username = 'alice'").fetchone()
    assert after == before


# Finding 3: `list_rooms` (chat/rooms.py) is the one read whose writer job does not call
# `_user`: a session being ended (disable, logout) still has its list read, private rooms
# and pending invitations included, after the point protocol.md says it reads nothing more.
def test_review_list_rooms_decided_after_the_disable_reads_nothing(chat_server, monkeypatch):
    alice = chat_server.user("alice")
    assert alice.request({"type": "create", "room": "secret",
                          "visibility": "private"})["type"] == "ok"
    reads: list[int] = []
    real = rooms_module.rooms_listed

    def spy(db: Any, user_id: int, *args: Any) -> Any:
        reads.append(user_id)
        return real(db, user_id, *args)

    monkeypatch.setattr(rooms_module, "rooms_listed", spy)
    gate = WriterGate(chat_server.server)
    op = Operator(chat_server.server, "user_disable", {"name": "alice"})
    gate.wait_queued(1)
    alice.send({"type": "list_rooms", "id": "l"})
    gate.wait_queued(2)
    gate.open()
    op.result()
    time.sleep(0.3)
    assert reads == []


# Finding 4: a login decided right after an operator's `user logout` (in the same batch; a
# second device logging in, or a client reconnecting) reads its rooms from the hub's
# UserState, which `_end_sessions` has just emptied: the new session is welcomed with
# `rooms: []`, gets nothing of general and its sends are refused (`join general` answers ok
# and changes nothing) until every session of the user has closed.
def test_review_a_login_right_after_a_logout_keeps_the_users_rooms(chat_server):
    first = chat_server.user("alice")
    # Kept open: a client dropped here closes whenever it is collected, and its detach
    # job, queued behind the gate, passed for the operator's in wait_queued below.
    bob = chat_server.user("bob")
    gate = WriterGate(chat_server.server)
    op = Operator(chat_server.server, "user_logout", {"name": "alice"})
    gate.wait_queued(1)
    second = chat_server.client()
    second.send({"type": "login", "username": "alice", "password": PASSWORD, "id": "L"})
    gate.wait_queued(2)
    gate.open()
    op.result()
    assert first.recv_until("bye")["reason"] == "logged_out"
    welcome = reply_to(second, "L")
    assert welcome["type"] == "welcome"
    assert welcome["rooms"] == ["general"]
    sent = second.request({"type": "send", "room": "general", "message": "still here"})
    assert sent["type"] == "message", sent
    bob.close()


# Finding 5: "operator" (the actor the server writes for everything chat-admin does) is an
# ordinary username: anyone may register it (or "Operator") in open mode. As a room's owner
# that user's kicks and bans then reach their targets as `removed ... "by": "operator"`, and
# the audit log holds entries by "operator" that are not the operator's: who did what can
# no longer be told apart.
@pytest.mark.parametrize("name", ["operator", "Operator"])
def test_review_the_operators_name_cannot_be_registered(chat_server, name):
    c = chat_server.client()
    reply = c.request({"type": "register", "username": name, "password": PASSWORD})
    assert reply["type"] == "error", reply


# Finding 6: `chat-admin user add` / `reset-password` hash the password in chat-admin with
# the pepper chat-admin finds, and the server stores the hash without looking at its pepper
# id. Run with other settings than the server's (here the server has --pepper-file, and an
# old pepper lies in the data directory), chat-admin says "done" and prints a password that
# can never log in; it should fail clearly (or let the server hash).
def test_review_chat_admin_user_add_under_another_pepper_fails_clearly(
        server_factory, capsys, tmp_path):
    server = server_factory(pepper_file=str(tmp_path / "server-pepper"))
    data_dir = server.settings.data_dir
    stale = Path(data_dir) / "pepper"
    stale.write_text(os.urandom(32).hex() + "\n")
    stale.chmod(0o600)
    code = admin.main(["--data-dir", data_dir, "user", "add", "dana"])
    captured = capsys.readouterr()
    if code == 0:
        password = captured.out.split("password for dana: ")[1].split()[0]
        assert server.client().login("dana", password)["type"] == "welcome"
    else:
        assert "pepper" in captured.err


# Finding 7: chat-admin decides "the server is stopped" from the control socket alone (no
# socket, or one refusing connections) and then writes on the database directly (after
# running the migrations on it). Nothing stops that while a server uses the database (its
# socket removed, a --db given to a server with another data_dir, a second start racing
# the first's bind): here `user disable` reports success "on the database", the user's
# session lives on and the server's caches no longer agree with the database. The server
# should hold a lock on the database (or data_dir) that offline mode takes or is refused by.
def test_review_chat_admin_does_not_work_offline_under_a_running_server(chat_server, capsys):
    alice = chat_server.user("alice")
    os.unlink(os.path.join(chat_server.settings.data_dir, "control.sock"))
    code, out = run_admin(capsys, chat_server.settings.data_dir, "user", "disable", "alice")
    if code == 0:
        # Done, then only live: the session must have ended.
        assert out["live"] is True
        assert alice.recv_until("bye")["reason"] == "account_disabled"
    else:
        assert out["ok"] is False


def _clean_up_failed_start(server: Server) -> None:
    for name in ("store", "auth_pool", "read_pool", "checkpointer"):
        part = getattr(server, name, None)
        if part is not None:
            with contextlib.suppress(Exception):
                part.stop()
    with contextlib.suppress(Exception):
        server.listen_sock.close()
    with contextlib.suppress(Exception):
        server.engine.dispose()


# Finding 7 (b): the same gap at start: a second server on the same data_dir is refused
# only by the control socket, the last step of Server.start, after it has run the
# migrations on the database the first one uses (a newer release would upgrade the schema
# under the running one), started a writer and a checkpointer on it and taken a TCP port.
# The lock of finding 7, taken first, would refuse it before it touches anything.
def test_review_a_second_server_on_the_data_dir_is_refused_before_it_opens_the_database(
        server_factory, tmp_path, cert_dir):
    server_factory()
    second = Server(make_settings(tmp_path, cert_dir))
    try:
        with pytest.raises(SettingError, match="another server"):
            second.start()
        assert getattr(second, "engine", None) is None
        assert getattr(second, "listen_sock", None) is None
    finally:
        _clean_up_failed_start(second)


# Finding 8: a data_dir whose control socket path passes AF_UNIX's 108 bytes stops the
# start with a bare OSError ("AF_UNIX path too long", a traceback for the operator), after
# the port, the database and every thread were taken, instead of a SettingError naming
# data_dir (or binding the socket relative to the directory).
def test_review_a_control_socket_path_too_long_is_a_clear_setting_error(tmp_path, cert_dir):
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    server = Server(make_settings(tmp_path, cert_dir, data_dir=str(deep)))
    try:
        with pytest.raises(SettingError) as err:
            server.start()
        assert "data_dir" in err.value.names
    finally:
        _clean_up_failed_start(server)


# Finding 9: `chat-admin backup` into a directory that does not exist, or onto a dangling
# symlink (Path.exists() is False for it; O_EXCL then fails), ends in a Python traceback
# (FileNotFoundError, FileExistsError) instead of a message and exit code 2.
@pytest.mark.parametrize("kind", ["missing directory", "dangling symlink"])
def test_review_backup_refusals_are_messages_not_tracebacks(chat_server, capsys, tmp_path,
                                                            kind):
    if kind == "missing directory":
        target = tmp_path / "nowhere" / "copy.db"
    else:
        target = tmp_path / "link.db"
        target.symlink_to(tmp_path / "elsewhere.db")
    code, out = run_admin(capsys, chat_server.settings.data_dir, "backup", str(target))
    assert code == 2 and out["ok"] is False
    assert not (tmp_path / "elsewhere.db").exists()


# Finding 10: a token lifetime or a number of uses beyond what the database column holds
# (`--expires inf`, `--expires 1e300`, `--uses 10**20`) passes chat-admin's checks and
# fails inside the writer: the operator reads "internal error" (exit 1) and the server
# logs a traceback, where a usage error (exit 2) naming the option is due.
@pytest.mark.parametrize("argv", [("--expires", "inf"), ("--expires", "1e300"),
                                  ("--uses", str(10**20))])
def test_review_token_create_out_of_range_is_a_usage_error(chat_server, capsys, argv):
    code, out = run_admin(capsys, chat_server.settings.data_dir, "token", "create", *argv)
    assert code == 2, out
    assert argv[0].lstrip("-") in out["error"]


# Finding 11: the control socket answers a malformed request with nothing: an action that
# is not a string (`{"action": []}`) raises TypeError outside the handler's except clause
# (the thread dies with a traceback), and arguments of the wrong type (`"name": 5`) fail
# inside the writer as an unexpected exception ("internal error", a traceback in the log).
# Each should be a `{"ok": false, "error": ...}` saying what is wrong.
@pytest.mark.parametrize("request_", [{"action": []},
                                      {"action": "user_show", "args": {"name": 5}}])
def test_review_control_socket_answers_malformed_requests(chat_server, request_):
    path = os.path.join(chat_server.settings.data_dir, "control.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(TIMEOUT)
        sock.connect(path)
        sock.sendall(json.dumps(request_).encode() + b"\n")
        data = sock.makefile("rb").readline()
    assert data, "no answer at all"
    answer = json.loads(data)
    assert answer["ok"] is False
    assert "internal" not in answer["error"], answer


# Finding 12: `chat-admin user add` takes any name: one the protocol refuses (too short,
# spaces, control characters) makes an account nobody can log in to, listed as if it were
# one (a name with escape sequences also reaches the operator's terminal in `user list`).
@pytest.mark.parametrize("name", ["x", "two words", "bad\x1b[2Jname"])
def test_review_chat_admin_user_add_refuses_names_the_protocol_refuses(chat_server, capsys,
                                                                      name):
    code, out = run_admin(capsys, chat_server.settings.data_dir, "user", "add", name)
    assert code == 1 and out["ok"] is False


# Finding 13: the audit log has no "why" for several operator actions that end sessions or
# change standing: `user logout`, `user reset-password`, `user enable`, `room unban` and
# `room set-owner` take no --reason (argparse exits 2), although disable, kick, ban and
# delete do. security.md promises every operator action in the log.
@pytest.mark.parametrize("argv", [("user", "logout", "alice"),
                                  ("user", "reset-password", "alice"),
                                  ("user", "enable", "alice")])
def test_review_session_ending_operator_actions_record_a_reason(chat_server, capsys, argv):
    chat_server.register("alice")
    with contextlib.suppress(SystemExit):
        code, _ = run_admin(capsys, chat_server.settings.data_dir, *argv, "--reason",
                            "ticket 42")
        assert code == 0
    entries = run_admin(capsys, chat_server.settings.data_dir, "audit", "--user",
                        "alice")[1]["result"]["entries"]
    assert [e["reason"] for e in entries] == ["ticket 42"]

"""chat-admin against a live and a stopped server; registration policy and tokens."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from typing import Any

import pytest
from conftest import PASSWORD

from chat import admin
from chat.config import SettingError, Settings

# Storage is what these exercise: each runs on SQLite and on PostgreSQL (conftest).
pytestmark = pytest.mark.both_engines


def run_admin(capsys: Any, data_dir: str, *argv: str) -> tuple[int, dict[str, Any]]:
    code = admin.main(["--data-dir", data_dir, "--json", *argv])
    out = capsys.readouterr().out.strip().splitlines()
    return code, json.loads(out[-1]) if out else {}


def data_dir(server: Any) -> str:
    return server.settings.data_dir


def test_disable_ends_every_session_and_refuses_the_next_login(chat_server, capsys):
    sessions = [chat_server.user("alice")] + [chat_server.client() for _ in range(2)]
    for c in sessions[1:]:
        c.login("alice")
    started = time.monotonic()
    code, out = run_admin(capsys, data_dir(chat_server), "user", "disable", "alice",
                          "--reason", "stolen laptop")
    assert code == 0 and out["live"] is True and out["result"]["sessions_ended"] == 3
    for c in sessions:
        assert c.recv_until("bye") == {"type": "bye", "reason": "account_disabled"}
        assert c.at_eof()
    assert time.monotonic() - started < 5  # the issue asks 1 s; a loaded CI machine is slower
    assert chat_server.client().login("alice")["code"] == "account_disabled"
    assert chat_server.client().login("alice", "wrong" * 4)["code"] == "invalid_credentials"
    assert run_admin(capsys, data_dir(chat_server), "user", "enable", "alice")[0] == 0
    assert chat_server.client().login("alice")["type"] == "welcome"
    code, out = run_admin(capsys, data_dir(chat_server), "audit", "--user", "alice")
    actions = [(e["action"], e["reason"]) for e in out["result"]["entries"]]
    assert actions == [("disable", "stolen laptop"), ("enable", "")]


def test_a_disable_racing_the_users_sends_lets_nothing_through_after_it(chat_server, capsys):
    """3 sessions send as fast as they can while the account is disabled: every message
    stored reached the other member before the disable; none is stored after it."""
    bob = chat_server.user("bob")
    senders = [chat_server.user("alice")] + [chat_server.client() for _ in range(2)]
    for c in senders[1:]:
        c.login("alice")
    burst = b"".join(json.dumps({"type": "send", "room": "general",
                                 "message": f"m{i}"}).encode() + b"\n" for i in range(300))
    threads = [threading.Thread(target=c.send_raw, args=(burst,)) for c in senders]
    for t in threads:
        t.start()
    assert run_admin(capsys, data_dir(chat_server), "user", "disable", "alice")[0] == 0
    for t in threads:
        t.join()
    bob.send({"type": "send", "room": "general", "message": "after"})
    seen = []
    while (frame := bob.recv()).get("message") != "after":
        if frame["type"] == "message":
            seen.append(frame["msg_id"])
    stored = chat_server.query("SELECT id FROM messages WHERE sender_name = 'alice' ORDER BY id")
    assert [r[0] for r in stored] == seen  # whatever was stored was delivered, in order
    assert chat_server.query("SELECT count(*) FROM audit WHERE action = 'disable'") == [(1,)]


def test_logout_and_reset_password_end_sessions_with_logged_out(chat_server, capsys):
    alice = chat_server.user("alice")
    assert run_admin(capsys, data_dir(chat_server), "user", "logout", "alice")[0] == 0
    assert alice.recv_until("bye")["reason"] == "logged_out"
    alice = chat_server.client()
    alice.login("alice")
    code = admin.main(["--data-dir", data_dir(chat_server), "user", "reset-password", "alice"])
    out = capsys.readouterr().out
    assert code == 0 and "password for alice: " in out
    new = out.split("password for alice: ")[1].split()[0]
    assert alice.recv_until("bye")["reason"] == "logged_out"
    assert chat_server.client().login("alice")["code"] == "invalid_credentials"
    assert chat_server.client().login("alice", new)["type"] == "welcome"


def test_registration_with_tokens(server_factory, capsys):
    server = server_factory(registration="token")
    c = server.client()
    assert c.hello["registration"] == "token" and c.hello["features"] == ["acl", "devices", "e2e"]
    reg = {"type": "register", "username": "newbie", "password": PASSWORD}
    assert c.request(reg)["code"] == "invalid_token"
    assert c.request({**reg, "token": "x" * 43})["code"] == "invalid_token"
    _, out = run_admin(capsys, data_dir(server), "token", "create", "--uses", "2")
    token = out["result"]["token"]
    assert len(token) >= 43  # 256 bits
    assert c.request({**reg, "token": token})["type"] == "ok"
    # a taken name gives the use back
    assert c.request({**reg, "token": token})["code"] == "username_taken"
    assert c.request({**reg, "username": "second", "token": token})["type"] == "ok"
    assert c.request({**reg, "username": "third", "token": token})["code"] == "invalid_token"
    tokens = run_admin(capsys, data_dir(server), "token", "list")[1]["result"]["tokens"]
    assert [(t["uses"], t["state"]) for t in tokens] == [(2, "used up")]
    assert token not in json.dumps(tokens)
    assert server.query("SELECT count(*) FROM registration_tokens WHERE token_hash = :t",
                        t=token) == [(0,)]  # only its hash is kept
    tid = run_admin(capsys, data_dir(server), "token", "create")[1]["result"]["id"]
    assert run_admin(capsys, data_dir(server), "token", "revoke", str(tid))[0] == 0


def test_fifty_parallel_registrations_on_a_one_use_token_make_one_account(
        server_factory, capsys):
    server = server_factory(registration="token")
    token = run_admin(capsys, data_dir(server), "token", "create")[1]["result"]["token"]
    clients = [server.client() for _ in range(50)]
    for i, c in enumerate(clients):
        c.send({"type": "register", "username": f"racer{i}", "password": PASSWORD,
                "token": token, "id": 1})
    answers = [c.recv() for c in clients]
    assert sorted(a["type"] for a in answers) == ["error"] * 49 + ["ok"]
    assert {a.get("code") for a in answers if a["type"] == "error"} == {"invalid_token"}
    assert server.query("SELECT count(*) FROM users") == [(1,)]


def test_closed_registration(server_factory):
    server = server_factory(registration="closed")
    c = server.client()
    assert c.hello["registration"] == "closed"
    assert c.request({"type": "register", "username": "newbie",
                      "password": PASSWORD})["code"] == "registration_closed"


def test_unset_registration_is_open_on_loopback_only():
    assert Settings(host="127.0.0.1").registration_policy == "open"
    assert Settings(host="::1").registration_policy == "open"
    assert Settings(host="0.0.0.0", registration="token").registration_policy == "token"
    with pytest.raises(SettingError) as err:
        Settings(host="0.0.0.0").registration_policy  # noqa: B018
    assert err.value.exit_code == 2
    assert all(word in str(err.value) for word in ("open", "token", "closed"))


def test_room_moderation_by_the_operator_is_live(chat_server, capsys):
    alice, bob = chat_server.user("alice"), chat_server.user("bob")
    alice.request({"type": "create", "room": "vip", "visibility": "private"})
    alice.request({"type": "invite", "room": "vip", "username": "bob"})
    bob.request({"type": "join", "room": "vip"})
    d = data_dir(chat_server)
    assert run_admin(capsys, d, "room", "ban", "vip", "bob", "--reason", "spam")[0] == 0
    assert bob.recv_until("removed") == {"type": "removed", "room": "vip", "by": "operator",
                                         "how": "ban", "reason": "spam"}
    shown = run_admin(capsys, d, "room", "show", "vip")[1]["result"]
    assert [m["username"] for m in shown["members"]] == ["alice"]
    assert shown["bans"] == [{"username": "bob", "by": "operator", "reason": "spam"}]
    assert run_admin(capsys, d, "room", "set-owner", "vip", "bob")[0] == 0  # lifts the ban
    assert bob.request({"type": "room_info", "room": "vip"})["role"] == "owner"
    alice.request({"type": "send", "room": "vip", "message": "old"})
    assert run_admin(capsys, d, "room", "delete", "vip")[0] == 0
    assert alice.recv_until("removed")["room"] == "vip"
    assert alice.request({"type": "create", "room": "vip"})["type"] == "ok"
    assert alice.request({"type": "history", "room": "vip"})["messages"] == []
    assert run_admin(capsys, d, "room", "kick", "general", "nobody")[0] == 1


def test_chat_admin_works_on_a_stopped_server(server_factory, capsys):
    server = server_factory()
    server.register("alice")
    server.server.stop()
    d = data_dir(server)
    code, out = run_admin(capsys, d, "user", "disable", "alice")
    assert code == 0 and out["live"] is False
    assert [u["disabled"] for u in run_admin(capsys, d, "user", "list")[1]["result"]["users"]
            ] == [True]
    restarted = server_factory()
    assert restarted.client().login("alice")["code"] == "account_disabled"


@pytest.mark.sqlite_only  # SQLite's backup API; on PostgreSQL, see the test below
def test_backup_while_messages_flow_holds_everything_acknowledged_before(
        chat_server, capsys, tmp_path):
    alice = chat_server.user("alice")
    acked = [alice.request({"type": "send", "room": "general", "message": f"m{i}"})["msg_id"]
             for i in range(50)]
    stop = threading.Event()
    flow = chat_server.user("bob")

    def keep_sending() -> None:
        i = 0
        while not stop.is_set():
            flow.request({"type": "send", "room": "general", "message": f"more {i}"})
            i += 1

    sender = threading.Thread(target=keep_sending)
    sender.start()
    try:
        code = admin.main(["--data-dir", data_dir(chat_server), "backup",
                           str(tmp_path / "copy.db")])
    finally:
        stop.set()
        sender.join()
    out = capsys.readouterr().out
    assert code == 0 and "the pepper is not in the copy" in out
    copy = sqlite3.connect(tmp_path / "copy.db")
    assert copy.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    ids = {r[0] for r in copy.execute("SELECT id FROM messages")}
    assert set(acked) <= ids
    assert (tmp_path / "copy.db").stat().st_mode & 0o077 == 0


def test_backup_on_postgresql_says_to_use_pg_dump(tmp_path, capsys):
    """No server needed: the refusal comes before the database is opened."""
    code = admin.main(["--data-dir", str(tmp_path / "data"), "--db",
                       "postgresql+psycopg://chat@db.invalid/chat", "backup",
                       str(tmp_path / "copy.db")])
    err = capsys.readouterr().err
    assert code == 2 and "pg_dump" in err and "Traceback" not in err
    assert not (tmp_path / "copy.db").exists()


def test_the_control_socket_is_private_and_refused_where_others_could_replace_it(
        server_factory, tmp_path):
    import os
    import stat

    server = server_factory()
    sock = os.path.join(server.settings.data_dir, "control.sock")
    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
    server.server.stop()
    assert not os.path.exists(sock)
    os.chmod(server.settings.data_dir, 0o777)
    with pytest.raises(SettingError, match="writable by no one else"):
        server_factory()


def test_options_may_follow_the_command_and_general_keeps_everyone(chat_server, capsys):
    chat_server.register("bob")
    d = data_dir(chat_server)
    assert admin.main(["user", "list", "--data-dir", d, "--json"]) == 0
    users = json.loads(capsys.readouterr().out)["result"]["users"]
    assert [u["username"] for u in users] == ["bob"]
    code, out = run_admin(capsys, d, "room", "kick", "general", "bob")
    assert code == 1 and "disable the account" in out["error"]


def test_no_token_starts_like_a_command_line_option(chat_server):
    """1 in 64 of URL-safe tokens would start with '-': `chat-client register --token -x`
    would then read it as an option (a test failed that way, once)."""
    import contextlib

    from chat.accounts import create_token

    with contextlib.closing(chat_server.server.engine.connect()) as db:
        tokens = [create_token(db, 1, 60, "", 0)[1] for _ in range(300)]
        db.rollback()
    assert not any(t.startswith("-") for t in tokens)

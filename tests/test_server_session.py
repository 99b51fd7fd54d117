"""Integration tests over real TLS: hello, register, login, sessions, errors and framing."""

from __future__ import annotations

import json

import pytest
from conftest import PASSWORD

from chat.errors import ERROR_CODES

# Registration, login, DMs with offline delivery, history: each on SQLite and PostgreSQL.
pytestmark = pytest.mark.both_engines


def test_hello_announces_limits(server_factory):
    c = server_factory(frames_per_second=10.0, frame_burst=30,
                       read_bytes_per_second=16384).client()
    assert c.hello == {
        "type": "hello", "protocol": 1, "server": "chat/0.1.0",
        "max_frame_bytes": 16384, "min_password_length": 15,
        "features": ["acl", "devices", "e2e"], "registration": "open",
        "limits": {
            "frames_per_second": 10.0, "frame_burst": 30,
            "read_bytes_per_second": 16384, "read_bytes_burst": 32768,
            "reply_bytes_per_second": 1048576, "reply_bytes_burst": 2097152,
            "max_message_chars": 4000, "max_history_limit": 200,
        },
    }


def test_welcome_says_where_the_store_stands(chat_server):
    """Every message newer than `last_msg_id` reaches the session live: catch-up starts there."""
    chat_server.register("alice")
    chat_server.register("bob")
    a = chat_server.client()
    assert a.login("alice")["last_msg_id"] == 0
    sent = a.request({"type": "send", "room": "general", "message": "one"})
    assert chat_server.client().login("bob")["last_msg_id"] == sent["msg_id"]


def test_welcome_announces_the_stored_direct_messages_that_follow(chat_server):
    chat_server.register("bob")
    alice = chat_server.user("alice")
    first = alice.request({"type": "send", "to": "bob", "message": "one"})["msg_id"]
    alice.request({"type": "send", "to": "bob", "message": "two"})
    bob = chat_server.client()
    welcome = bob.login("bob")
    assert welcome["backlog"] == {"count": 2, "first_msg_id": first}
    assert [bob.recv_until("message")["message"] for _ in range(2)] == ["one", "two"]
    assert "backlog" not in chat_server.client().login("bob")  # handed over: none left


def test_history_direct_is_every_direct_message_of_the_user(chat_server):
    a, b, c = (chat_server.user(name) for name in ("alice", "bob", "carol"))
    ids = [a.request({"type": "send", "to": "bob", "message": "a to b"})["msg_id"],
           a.request({"type": "send", "room": "general", "message": "room"})["msg_id"],
           c.request({"type": "send", "to": "alice", "message": "c to a"})["msg_id"],
           b.request({"type": "send", "to": "carol", "message": "b to c"})["msg_id"]]
    reply = a.request({"type": "history", "direct": True})
    assert reply["direct"] is True and "room" not in reply and "with" not in reply
    assert [m["msg_id"] for m in reply["messages"]] == [ids[0], ids[2]]
    after = a.request({"type": "history", "direct": True, "after": ids[0]})
    assert [m["message"] for m in after["messages"]] == ["c to a"]
    for bad in ({"direct": True, "room": "general"}, {"direct": True, "with": "bob"},
                {"direct": 1}, {"direct": False}):
        assert a.request({"type": "history", **bad})["code"] == "invalid_field"


def test_history_direct_pages_through_sent_and_received_alike(chat_server):
    """Sent and received are read apart (an index each) and merged: paging sees each once."""
    a, b = chat_server.user("alice"), chat_server.user("bob")
    ids = []
    for i in range(7):
        sender, to = (a, "bob") if i % 3 else (b, "alice")
        ids.append(sender.request({"type": "send", "to": to, "message": str(i)})["msg_id"])
    ids.append(a.request({"type": "send", "to": "alice", "message": "to self"})["msg_id"])
    seen, before = [], None
    while True:
        page = a.request({"type": "history", "direct": True, "limit": 2,
                          **({"before": before} if before else {})})["messages"]
        if not page:
            break
        seen = [m["msg_id"] for m in page] + seen
        before = page[0]["msg_id"]
    assert seen == ids
    forward, after = [], 0
    while page := a.request({"type": "history", "direct": True, "limit": 3,
                             "after": after})["messages"]:
        forward += [m["msg_id"] for m in page]
        after = page[-1]["msg_id"]
    assert forward == ids


def test_register_then_login(chat_server):
    c = chat_server.client()
    reply = c.request({"type": "register", "username": "Alice", "password": PASSWORD})
    assert reply == {"type": "ok", "op": "register", "username": "Alice", "re": 1}
    # register does not log in
    assert c.request({"type": "who", "room": "general"})["code"] == "auth_required"
    welcome = c.login("alice")
    assert welcome["type"] == "welcome"
    assert welcome["username"] == "Alice"  # shown as registered
    assert welcome["rooms"] == ["general"]
    assert len(welcome["session"]) >= 22  # at least 128 random bits, base64


@pytest.mark.parametrize(
    ("username", "password", "code"),
    [
        ("ab", PASSWORD, "invalid_username"),
        ("-abc", PASSWORD, "invalid_username"),
        ("a" * 33, PASSWORD, "invalid_username"),
        ("bad name", PASSWORD, "invalid_username"),
        ("carol", "short pass", "weak_password"),
        ("carol", "carol and more words", "weak_password"),
        ("carol", "x" * 257, "weak_password"),
    ],
)
def test_register_refusals(chat_server, username, password, code):
    c = chat_server.client()
    reply = c.request({"type": "register", "username": username, "password": password})
    assert reply["type"] == "error" and reply["code"] == code


def test_username_unique_regardless_of_case(chat_server):
    chat_server.register("Dave")
    c = chat_server.client()
    reply = c.request({"type": "register", "username": "dAVE", "password": PASSWORD})
    assert reply["code"] == "username_taken"


def test_invalid_credentials_same_reply_for_unknown_user(chat_server):
    chat_server.register("erin")
    c = chat_server.client()
    wrong = c.login("erin", "not the right password at all")
    unknown = c.login("nobody-here", PASSWORD)
    malformed = c.login("x", PASSWORD)
    for reply in (wrong, unknown, malformed):
        assert reply["type"] == "error" and reply["code"] == "invalid_credentials"
    assert wrong["message"] == unknown["message"] == malformed["message"]


def test_password_longer_than_72_bytes_counts_in_full(chat_server):
    long_pw = "w" * 80 + " tail one"
    chat_server.register("frank", long_pw)
    c = chat_server.client()
    assert c.login("frank", "w" * 80 + " tail two")["code"] == "invalid_credentials"
    assert c.login("frank", long_pw)["type"] == "welcome"


def test_password_nfkc_normalised(chat_server):
    chat_server.register("gina", "ﬁne ﬁne ﬁne ﬁne passphrase")  # 'ﬁ' ligatures
    c = chat_server.client()
    assert c.login("gina", "fine fine fine fine passphrase")["type"] == "welcome"


def test_already_authenticated(chat_server):
    c = chat_server.user("hank")
    assert c.login("hank")["code"] == "already_authenticated"
    reply = c.request({"type": "register", "username": "other", "password": PASSWORD})
    assert reply["code"] == "already_authenticated"


def test_before_login_only_some_frames(chat_server):
    c = chat_server.client()
    for frame in (
        {"type": "send", "room": "general", "message": "hi"},
        {"type": "join", "room": "x"},
        {"type": "who", "room": "general"},
        {"type": "history", "room": "general"},
        {"type": "passwd", "old": "a", "new": "b"},
    ):
        assert c.request(frame)["code"] == "auth_required"
    assert c.request({"type": "ping"}) == {"type": "pong", "re": 5 + 1}


def test_quit_any_time(chat_server):
    c = chat_server.client()
    c.send({"type": "quit"})
    assert c.recv() == {"type": "bye", "reason": "quit"}
    assert c.at_eof()


def test_ids_echoed_as_re(chat_server):
    c = chat_server.user("ivan")
    for rid in ("abc", 7, "x" * 64, -3):
        c.send({"type": "ping", "id": rid})
        assert c.recv() == {"type": "pong", "re": rid}
    c.send({"type": "send", "room": "general", "message": "hello", "id": "m1"})
    echo = c.recv()
    assert echo["type"] == "message" and echo["re"] == "m1"


@pytest.mark.parametrize("bad_id", ["x" * 65, 1.5, True, [1], {"a": 1}, 2**60])
def test_bad_id_is_invalid_field(chat_server, bad_id):
    c = chat_server.client()
    c.send({"type": "ping", "id": bad_id})
    reply = c.recv()
    assert reply["code"] == "invalid_field" and "re" not in reply


def test_client_cannot_speak_as_someone_else(chat_server):
    alice = chat_server.user("alice")
    bob = chat_server.user("bob")
    alice.recv_until("presence", username="bob")
    bob.send({"type": "send", "room": "general", "message": "hi", "username": "alice"})
    got = alice.recv_until("message")
    assert got["username"] == "bob"


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b"not json\n", "bad_frame"),
        (b"[1,2]\n", "bad_frame"),
        (b'"str"\n', "bad_frame"),
        (b"\xff\xfe{}\n", "bad_frame"),
        (b'{"type":"ping","x":NaN}\n', "bad_frame"),
        (b'{"type":"ping","type":"quit"}\n', "bad_frame"),
        (b"[" * 3000 + b"]" * 3000 + b"\n", "bad_frame"),
        (b'{"type":"ping","n":' + b"9" * 5000 + b"}\n", "bad_frame"),
        (b"{}\n", "invalid_field"),
        (b'{"type":5}\n', "invalid_field"),
        (b'{"type":"dance"}\n', "unknown_type"),
        (b'{"type":"ping","id":"\\ud800"}\n', "invalid_field"),
    ],
)
def test_bad_frames_answered_and_connection_stays(chat_server, raw, code):
    c = chat_server.client()
    c.send_raw(raw)
    reply = c.recv()
    assert reply["type"] == "error" and reply["code"] == code
    assert c.request({"type": "ping"})["type"] == "pong"


def test_frame_too_large_then_connection_usable(chat_server):
    c = chat_server.client()
    big = json.dumps({"type": "ping", "pad": "x" * 20000}).encode() + b"\n"
    c.send_raw(big)
    assert c.recv()["code"] == "frame_too_large"
    # Exactly max_frame_bytes, newline included, is accepted.
    frame = b'{"type":"ping","pad":"'
    frame += b"y" * (16384 - len(frame) - 3) + b'"}\n'
    assert len(frame) == 16384
    c.send_raw(frame)
    assert c.recv() == {"type": "pong"}
    c.send_raw(b"\r\n".join([b'{"type":"ping","id":1}', b'{"type":"ping","id":2}', b""]))
    assert c.recv()["re"] == 1 and c.recv()["re"] == 2


def test_ten_protocol_errors_in_a_row_close(chat_server):
    c = chat_server.client()
    c.send_raw(b"junk\n" * 12)
    codes = [c.recv() for _ in range(10)]
    assert all(f["code"] == "bad_frame" for f in codes)
    assert c.recv() == {"type": "bye", "reason": "too_many_errors"}
    assert c.at_eof()


def test_errors_not_in_a_row_do_not_close(chat_server):
    c = chat_server.client()
    for _ in range(3):
        c.send_raw(b"junk\n" * 9)
        for _ in range(9):
            assert c.recv()["code"] == "bad_frame"
        assert c.request({"type": "ping"})["type"] == "pong"


def test_error_codes_are_the_protocol_list():
    assert {
        "bad_frame", "frame_too_large", "unknown_type", "invalid_field", "auth_required",
        "already_authenticated", "invalid_credentials", "invalid_username", "weak_password",
        "username_taken", "rate_limited", "no_such_user", "not_in_room", "server_busy",
        "internal",
        # v1.1
        "forbidden", "no_such_room", "room_taken", "banned", "last_owner", "blocked",
        "registration_closed", "invalid_token", "account_disabled",
    } == ERROR_CODES


def test_passwd(chat_server):
    c = chat_server.user("judy")
    other = chat_server.client()
    assert other.login("judy")["type"] == "welcome"
    new = "a completely new passphrase 7"
    bad = c.request({"type": "passwd", "old": "wrong wrong wrong wrong", "new": new})
    assert bad["code"] == "invalid_credentials"
    weak = c.request({"type": "passwd", "old": PASSWORD, "new": "short"})
    assert weak["code"] == "weak_password"
    ok = c.request({"type": "passwd", "old": PASSWORD, "new": new})
    assert ok["type"] == "ok"
    # Other sessions stay open.
    assert other.request({"type": "ping"})["type"] == "pong"
    fresh = chat_server.client()
    assert fresh.login("judy", PASSWORD)["code"] == "invalid_credentials"
    assert fresh.login("judy", new)["type"] == "welcome"


def test_pipelined_requests_keep_order(chat_server):
    chat_server.register("kim")
    c = chat_server.client()
    frames = [
        {"type": "login", "username": "kim", "password": PASSWORD, "id": 1},
        {"type": "join", "room": "Pipes", "id": 2},
        {"type": "send", "room": "pipes", "message": "first", "id": 3},
        {"type": "history", "room": "pipes", "id": 4},
    ]
    c.send_raw(b"".join(json.dumps(f).encode() + b"\n" for f in frames))
    replies = [f for f in (c.recv() for _ in range(5)) if "re" in f]
    assert [r["re"] for r in replies] == [1, 2, 3, 4]
    assert replies[0]["type"] == "welcome"
    assert replies[2]["type"] == "message"
    assert [m["message"] for m in replies[3]["messages"]] == ["first"]


def test_passwd_can_end_other_sessions(chat_server):
    c = chat_server.user("lena")
    others = [chat_server.client() for _ in range(2)]
    for o in others:
        assert o.login("lena")["type"] == "welcome"
    new = "another fresh passphrase 99"
    reply = c.request({"type": "passwd", "old": PASSWORD, "new": new, "logout_others": True})
    assert reply["type"] == "ok"
    for o in others:
        assert o.recv_until("bye") == {"type": "bye", "reason": "quit"}
    assert c.request({"type": "ping"})["type"] == "pong"


def test_pepper_rotation_upgrades_hash_at_login(server_factory, tmp_path):
    from chat.auth import SCHEME

    old = server_factory()
    old.register("mona")
    old.server.stop()
    data = tmp_path / "data"
    (data / "pepper").rename(data / "pepper.old")
    rotated = server_factory(previous_pepper_files=str(data / "pepper.old"))
    new_id = rotated.server.hasher.pepper_id

    def stored() -> str:
        rec = rotated.server.store.find_user("mona")
        assert rec is not None
        return rec.password_hash

    assert not stored().startswith(f"{SCHEME}${new_id}$")
    c = rotated.client()
    assert c.login("mona")["type"] == "welcome"
    assert stored().startswith(f"{SCHEME}${new_id}$")
    c.close()
    # Without the old pepper the upgraded hash still works.
    rotated.server.stop()
    (data / "pepper.old").unlink()
    after = server_factory()
    assert after.client().login("mona")["type"] == "welcome"


def test_raised_bcrypt_cost_upgrades_hash_at_login(server_factory):
    cheap = server_factory(bcrypt_rounds=4)
    cheap.register("nina")
    cheap.server.stop()
    dearer = server_factory(bcrypt_rounds=5)
    assert dearer.client().login("nina")["type"] == "welcome"
    rec = dearer.server.store.find_user("nina")
    assert rec is not None and "$2b$05$" in rec.password_hash


def test_missing_type_error_still_carries_re(chat_server):
    c = chat_server.client()
    c.send({"id": "no-type"})
    assert c.recv()["re"] == "no-type"


def test_an_unknown_user_is_named_the_same_way_by_send_and_history(chat_server):
    alice = chat_server.user("alice")
    for request in ({"type": "send", "to": "nosuch", "message": "hi"},
                    {"type": "history", "with": "nosuch"}):
        reply = alice.request(request)
        assert (reply["code"], reply["message"]) == ("no_such_user", "no user named 'nosuch'")

"""Integration tests over real TLS: rooms, direct messages, presence, who and history."""

from __future__ import annotations

import re

import pytest

# Storage is what these exercise: each runs on SQLite and on PostgreSQL (conftest).
pytestmark = pytest.mark.both_engines

TS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z\Z")


def test_room_message_reaches_every_member_once(chat_server):
    alice = chat_server.user("alice")
    bob = chat_server.user("bob")
    alice.recv_until("presence", username="bob", event="join")
    alice.send({"type": "send", "room": "general", "message": "hello\n\tworld", "id": "x"})
    mine = alice.recv_until("message")
    theirs = bob.recv_until("message")
    assert mine.pop("re") == "x"
    assert mine == theirs
    assert theirs["username"] == "alice" and theirs["room"] == "general"
    assert theirs["message"] == "hello\n\tworld"
    assert isinstance(theirs["msg_id"], int) and TS.match(theirs["ts"])


@pytest.mark.parametrize(
    "text", ["", "   \n\t ", "x" * 4001, "bell\x07", "esc\x1b[2J", "del\x7f", "c1\x85", "cr\r"]
)
def test_bad_message_text_refused(chat_server, text):
    c = chat_server.user("alice")
    reply = c.request({"type": "send", "room": "general", "message": text})
    assert reply["code"] == "invalid_field"
    history = c.request({"type": "history", "room": "general"})
    assert history["messages"] == []  # a refused request changes nothing


def test_message_of_4000_chars_accepted(chat_server):
    c = chat_server.user("alice")
    assert c.request({"type": "send", "room": "general", "message": "é" * 4000})["type"] == (
        "message"
    )


def test_send_to_room_not_joined(chat_server):
    """v1.1: a public room one is not in is `not_in_room`; a name nobody uses, `no_such_room`."""
    c = chat_server.user("alice")
    chat_server.user("bob").request({"type": "join", "room": "elsewhere"})
    for name, code in (("elsewhere", "not_in_room"), ("nowhere", "no_such_room")):
        assert c.request({"type": "send", "room": name, "message": "x"})["code"] == code
        assert c.request({"type": "who", "room": name})["code"] == code
        assert c.request({"type": "history", "room": name})["code"] == code
        assert c.request({"type": "leave", "room": name})["code"] == code
    for bad in ("", "a" * 33, "no spaces", "dot.ted"):
        assert c.request({"type": "join", "room": bad})["code"] == "invalid_field"


def test_join_leave_presence_and_who(chat_server):
    alice = chat_server.user("alice")
    bob = chat_server.user("Bob")
    joined = alice.request({"type": "join", "room": "Dev"})
    assert (joined["type"], joined["op"], joined["room"]) == ("ok", "join", "dev")
    alice.recv_until("presence", room="dev", username="alice", event="join")
    assert bob.request({"type": "join", "room": "dev"})["type"] == "ok"
    alice.recv_until("presence", room="dev", username="Bob", event="join")
    who = alice.request({"type": "who", "room": "dev"})
    assert who["users"] == ["alice", "Bob"]
    assert bob.request({"type": "leave", "room": "DEV"})["type"] == "ok"
    alice.recv_until("presence", room="dev", username="Bob", event="leave")
    assert alice.request({"type": "who", "room": "dev"})["users"] == ["alice"]
    # Membership persists across logins.
    alice.close()
    again = chat_server.user("alice", register=False)
    assert again.request({"type": "who", "room": "dev"})["users"] == ["alice"]


def test_presence_on_first_and_last_session(chat_server):
    watcher = chat_server.user("watcher")
    chat_server.register("multi")
    one = chat_server.client()
    one.login("multi")
    watcher.recv_until("presence", username="multi", event="join")
    two = chat_server.client()
    two.login("multi")
    one.close()
    two.request({"type": "ping"})
    two.close()
    got = watcher.recv_until("presence", username="multi")
    assert got["event"] == "leave"  # no leave for the first session, no second join
    assert watcher.request({"type": "who", "room": "general"})["users"] == ["watcher"]


def test_every_session_gets_the_users_messages(chat_server):
    chat_server.register("carol")
    sessions = [chat_server.client() for _ in range(3)]
    for s in sessions:
        assert s.login("carol")["type"] == "welcome"
    dave = chat_server.user("dave")
    dave.send({"type": "send", "to": "CAROL", "message": "psst"})
    for s in sessions:
        got = s.recv_until("message")
        assert got["to"] == "carol" and got["username"] == "dave" and got["message"] == "psst"
    # The sender's own sessions get the direct message too.
    echo = dave.recv_until("message")
    assert echo["to"] == "carol"


def test_direct_message_stored_and_delivered_once(chat_server):
    chat_server.register("offline")
    sender = chat_server.user("sender")
    ids = []
    for text in ("one", "two", "three"):
        reply = sender.request({"type": "send", "to": "offline", "message": text})
        assert reply["type"] == "message"
        ids.append(reply["msg_id"])
    c = chat_server.client()
    c.send({"type": "login", "username": "offline", "password": "correct horse battery staple 42"})
    assert c.recv()["type"] == "welcome"
    got = [c.recv() for _ in range(3)]
    assert [m["message"] for m in got] == ["one", "two", "three"]
    assert [m["msg_id"] for m in got] == ids
    assert all(m["to"] == "offline" and "re" not in m for m in got)
    c.close()
    # Next login: nothing is delivered again.
    again = chat_server.client()
    again.login("offline")
    assert again.request({"type": "ping"})["type"] == "pong"
    history = again.request({"type": "history", "with": "sender"})
    assert [m["message"] for m in history["messages"]] == ["one", "two", "three"]
    assert history["with"] == "sender"


def test_direct_message_to_unknown_user(chat_server):
    c = chat_server.user("alice")
    for to in ("ghost", "x", "bad name!"):
        assert c.request({"type": "send", "to": to, "message": "hi"})["code"] == "no_such_user"
    assert c.request({"type": "history", "with": "ghost"})["code"] == "no_such_user"


def test_history_before_after_limit(chat_server):
    c = chat_server.user("alice")
    ids = [
        c.request({"type": "send", "room": "general", "message": f"m{i}"})["msg_id"]
        for i in range(10)
    ]
    newest = c.request({"type": "history", "room": "general", "limit": 3})
    assert [m["msg_id"] for m in newest["messages"]] == ids[-3:]
    before = c.request({"type": "history", "room": "general", "before": ids[5], "limit": 2})
    assert [m["msg_id"] for m in before["messages"]] == ids[3:5]
    after = c.request({"type": "history", "room": "general", "after": ids[5], "limit": 2})
    assert [m["msg_id"] for m in after["messages"]] == ids[6:8]
    full = c.request({"type": "history", "room": "GENERAL"})
    assert [m["message"] for m in full["messages"]] == [f"m{i}" for i in range(10)]
    assert full["room"] == "general"
    assert all(m["type"] == "message" and m["username"] == "alice" for m in full["messages"])
    for bad in ({"limit": 0}, {"limit": "5"}, {"before": 1, "after": 2}, {"before": -1}):
        reply = c.request({"type": "history", "room": "general", **bad})
        assert reply["code"] == "invalid_field", bad
    big = c.request({"type": "history", "room": "general", "limit": 100000})
    assert len(big["messages"]) == 10


def test_history_limit_capped_at_200(chat_server):
    c = chat_server.user("alice")
    for i in range(205):
        c.send({"type": "send", "room": "general", "message": f"n{i}"})
    last = c.request({"type": "send", "room": "general", "message": "last"})
    history = c.request({"type": "history", "room": "general", "limit": 500})
    assert len(history["messages"]) == 200
    assert history["messages"][-1]["msg_id"] == last["msg_id"]


def test_msg_ids_grow(chat_server):
    c = chat_server.user("alice")
    ids = [c.request({"type": "send", "room": "general", "message": "x"})["msg_id"]
           for _ in range(5)]
    assert ids == sorted(ids) and len(set(ids)) == 5


def test_history_reply_bounded_in_bytes(server_factory):
    server = server_factory(max_history_bytes=64 * 1024)
    c = server.user("alice")
    text = "ü" * 4000
    ids = [c.request({"type": "send", "room": "general", "message": text})["msg_id"]
           for _ in range(12)]
    page = c.request({"type": "history", "room": "general", "limit": 200})["messages"]
    assert 0 < len(page) < 12
    assert [m["msg_id"] for m in page] == ids[-len(page):]  # the newest, oldest first
    older = c.request({"type": "history", "room": "general", "before": page[0]["msg_id"]})
    assert [m["msg_id"] for m in older["messages"]][-1] == ids[-len(page) - 1]
    first = c.request({"type": "history", "room": "general", "after": 0})["messages"]
    assert [m["msg_id"] for m in first] == ids[: len(first)]


def test_rooms_per_user_and_room_members_limits(server_factory):
    server = server_factory(max_rooms_per_user=3, max_room_members=2)
    a = server.user("alice")
    for room in ("r1", "r2"):
        assert a.request({"type": "join", "room": room})["type"] == "ok"
    full = a.request({"type": "join", "room": "r3"})  # general + r1 + r2 = 3
    assert full["code"] == "invalid_field" and "3 rooms" in full["message"]
    b = server.user("bob")
    assert b.request({"type": "join", "room": "r1"})["type"] == "ok"
    c = server.user("carl")
    refused = c.request({"type": "join", "room": "r1"})
    assert refused["code"] == "invalid_field" and "full" in refused["message"]
    # A refused join changes nothing.
    assert c.request({"type": "send", "room": "r1", "message": "x"})["code"] == "not_in_room"
    assert sorted(a.request({"type": "who", "room": "r1"})["users"]) == ["alice", "bob"]

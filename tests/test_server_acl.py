"""Protocol v1.1 over TLS: private rooms, roles, moderation and its ordering, blocks."""

from __future__ import annotations

import json
import threading
from typing import Any

import pytest

# Storage is what these exercise: each runs on SQLite and on PostgreSQL (conftest).
pytestmark = pytest.mark.both_engines

VERBS_ABOUT_A_ROOM = [
    {"type": "send", "message": "hi"},
    {"type": "who"},
    {"type": "history"},
    {"type": "history", "after": 0},
    {"type": "leave"},
    {"type": "invite", "username": "carol"},
    {"type": "kick", "username": "alice"},
    {"type": "ban", "username": "alice"},
    {"type": "unban", "username": "alice"},
    {"type": "set_role", "username": "alice", "role": "member"},
    {"type": "topic", "topic": "x"},
    {"type": "set_history", "history": "shared"},
    {"type": "room_info"},
    {"type": "members"},
]


def raw_reply(client: Any, frame: dict[str, Any]) -> bytes:
    """The reply's bytes exactly as the server sent them (the id is fixed by the caller)."""
    client.send(frame)
    while True:
        line = client.file.readline()
        if json.loads(line).get("re") == frame["id"]:
            return line


def listed(client: Any) -> dict[str, Any]:
    return {r["room"]: r for r in client.request({"type": "list_rooms"})["rooms"]}


def test_a_private_room_answers_outsiders_as_a_room_that_does_not_exist(chat_server):
    alice = chat_server.user("alice")
    chat_server.register("carol")
    created = alice.request({"type": "create", "room": "vip", "visibility": "private"})
    assert (created["type"], created["op"], created["room"]) == ("ok", "create", "vip")
    alice.request({"type": "topic", "room": "vip", "topic": "the secret plan"})
    alice.request({"type": "send", "room": "vip", "message": "secret"})
    mallory = chat_server.user("mallory")
    # a banned outsider is an outsider like any other
    assert alice.request({"type": "ban", "room": "vip", "username": "mallory"})["type"] == "ok"
    for verb in VERBS_ABOUT_A_ROOM:
        private = raw_reply(mallory, {**verb, "room": "vip", "id": 7})
        nothing = raw_reply(mallory, {**verb, "room": "nosuchroom", "id": 7})
        assert private == nothing, verb
        assert json.loads(private)["code"] == "no_such_room"
    assert raw_reply(mallory, {"type": "join", "room": "vip", "id": 7}) == nothing
    assert "vip" not in listed(mallory)
    assert alice.request({"type": "create", "room": "VIP"})["code"] == "room_taken"
    # and nothing was changed by any of it
    info = alice.request({"type": "room_info", "room": "vip"})
    assert (info["topic"], info["members"], info["role"]) == ("the secret plan", 1, "owner")


def test_invitation_lets_one_in_once_and_a_kick_needs_a_new_one(chat_server):
    alice, bob = chat_server.user("alice"), chat_server.user("bob")
    alice.request({"type": "create", "room": "vip", "visibility": "private"})
    assert alice.request({"type": "invite", "room": "vip", "username": "Bob"})["type"] == "ok"
    assert bob.recv_until("invited") == {"type": "invited", "room": "vip", "by": "alice"}
    assert listed(bob)["vip"]["role"] is None  # invited, not in
    assert bob.request({"type": "room_info", "room": "vip"})["code"] == "not_in_room"
    assert bob.request({"type": "join", "room": "vip"})["type"] == "ok"
    assert listed(bob)["vip"] == {"room": "vip", "topic": "", "members": 2,
                                  "visibility": "private", "role": "member"}
    kicked = alice.request({"type": "kick", "room": "vip", "username": "bob", "reason": "bye"})
    assert kicked | {"re": 0} == {"type": "ok", "op": "kick", "room": "vip", "username": "bob",
                                  "re": 0}
    assert bob.recv_until("removed") == {"type": "removed", "room": "vip", "by": "alice",
                                         "how": "kick", "reason": "bye"}
    assert bob.request({"type": "join", "room": "vip"})["code"] == "no_such_room"  # used up
    assert "vip" not in listed(bob)


def test_a_kicked_user_gets_removed_then_nothing_more_of_the_room(chat_server):
    alice, carol = chat_server.user("alice"), chat_server.user("carol")
    bob1 = chat_server.user("bob")
    bob2 = chat_server.client()
    bob2.login("bob")
    for c in (alice, bob1, carol):
        assert c.request({"type": "join", "room": "dev"})["type"] == "ok"
    before = carol.request({"type": "send", "room": "dev", "message": "before"})["msg_id"]
    alice.request({"type": "kick", "room": "dev", "username": "bob"})
    after = carol.request({"type": "send", "room": "dev", "message": "after"})["msg_id"]
    alice.request({"type": "send", "to": "bob", "message": "sentinel"})
    for bob in (bob1, bob2):
        seen = []
        while (frame := bob.recv())["type"] != "message" or frame.get("to") != "bob":
            seen.append(frame)
        removed = [i for i, f in enumerate(seen) if f["type"] == "removed"]
        assert len(removed) == 1
        ids = [f["msg_id"] for f in seen if f["type"] == "message"]
        assert after not in ids
        assert before in ids or bob is bob2  # bob2 was not in dev when it was sent
        assert not any(f.get("room") == "dev" and f["type"] == "message"
                       for f in seen[removed[0]:])
    # and every read path is closed to him
    for verb in ({"type": "history", "room": "dev", "after": 0}, {"type": "who", "room": "dev"},
                 {"type": "members", "room": "dev"}, {"type": "room_info", "room": "dev"},
                 {"type": "send", "room": "dev", "message": "x"}):
        assert bob1.request(verb)["code"] == "not_in_room", verb
    assert bob1.request({"type": "join", "room": "dev"})["type"] == "ok"  # a kick is not a ban


def test_a_ban_keeps_one_out_until_unbanned(chat_server):
    alice, bob = chat_server.user("alice"), chat_server.user("bob")
    alice.request({"type": "join", "room": "dev"})
    bob.request({"type": "join", "room": "dev"})
    assert alice.request({"type": "ban", "room": "dev", "username": "bob",
                          "reason": "spam"})["type"] == "ok"
    assert bob.recv_until("removed")["how"] == "ban"
    assert bob.request({"type": "join", "room": "dev"})["code"] == "banned"
    assert alice.request({"type": "invite", "room": "dev", "username": "bob"})["code"] == "banned"
    assert alice.request({"type": "unban", "room": "dev", "username": "bob"})["type"] == "ok"
    assert bob.request({"type": "join", "room": "dev"})["type"] == "ok"


def test_joined_history_starts_at_the_current_join(chat_server):
    alice, bob = chat_server.user("alice"), chat_server.user("bob")
    alice.request({"type": "create", "room": "vip", "visibility": "private"})
    alice.request({"type": "send", "room": "vip", "message": "one"})
    alice.request({"type": "invite", "room": "vip", "username": "bob"})
    bob.request({"type": "join", "room": "vip"})
    alice.request({"type": "send", "room": "vip", "message": "two"})

    def readable() -> list[str]:
        reply = bob.request({"type": "history", "room": "vip", "after": 0})
        return [m["message"] for m in reply["messages"]]

    assert readable() == ["two"]
    assert [m["message"] for m in bob.request(
        {"type": "history", "room": "vip"})["messages"]] == ["two"]
    bob.request({"type": "leave", "room": "vip"})
    alice.request({"type": "send", "room": "vip", "message": "three"})
    alice.request({"type": "invite", "room": "vip", "username": "bob"})
    bob.request({"type": "join", "room": "vip"})
    assert readable() == []  # even "two", which he saw then
    # shared from now on: the whole history, for reads from then on
    assert alice.request({"type": "set_history", "room": "vip",
                          "history": "shared"})["type"] == "ok"
    assert bob.recv_until("room")["history"] == "shared"
    assert readable() == ["one", "two", "three"]


def test_roles_act_only_downwards_and_a_room_keeps_an_owner(chat_server):
    owner, mod, mem = (chat_server.user(n) for n in ("olivia", "moe", "mel"))
    for c in (owner, mod, mem):
        c.request({"type": "join", "room": "dev"})
    assert owner.request({"type": "set_role", "room": "dev", "username": "moe",
                          "role": "moderator"})["type"] == "ok"
    for c in (mod, mem):  # (the owner's came before its `ok`)
        assert c.recv_until("role") == {"type": "role", "room": "dev", "username": "moe",
                                        "role": "moderator", "by": "olivia"}
    assert mem.request({"type": "kick", "room": "dev", "username": "moe"})["code"] == "forbidden"
    assert mod.request({"type": "kick", "room": "dev",
                        "username": "olivia"})["code"] == "forbidden"
    assert mod.request({"type": "set_role", "room": "dev", "username": "mel",
                        "role": "moderator"})["code"] == "forbidden"
    assert owner.request({"type": "leave", "room": "dev"})["code"] == "last_owner"
    assert owner.request({"type": "set_role", "room": "dev", "username": "olivia",
                          "role": "member"})["code"] == "last_owner"
    assert mod.request({"type": "topic", "room": "dev", "topic": "hello"})["type"] == "ok"
    # each member's `room` frame carries that member's own role
    assert owner.recv_until("room")["role"] == "owner"  # (the moderator's came before its ok)
    assert mem.recv_until("room") == {"type": "room", "room": "dev", "visibility": "public",
                                      "history": "shared", "topic": "hello",
                                      "role": "member", "members": 3, "by": "moe"}
    members = owner.request({"type": "members", "room": "dev"})["members"]
    assert members == [{"username": "mel", "role": "member", "online": True},
                       {"username": "moe", "role": "moderator", "online": True},
                       {"username": "olivia", "role": "owner", "online": True}]
    # general: nobody moderates it from inside
    assert owner.request({"type": "kick", "room": "general",
                          "username": "mel"})["code"] == "forbidden"


def test_a_block_refuses_direct_messages_and_invitations(chat_server):
    alice, bob = chat_server.user("alice"), chat_server.user("bob")
    alice.request({"type": "create", "room": "vip", "visibility": "private"})
    assert bob.request({"type": "block", "username": "alice"})["type"] == "ok"
    assert alice.request({"type": "send", "to": "bob", "message": "hi"})["code"] == "blocked"
    assert alice.request({"type": "invite", "room": "vip", "username": "bob"})["code"] == (
        "blocked")
    assert bob.request({"type": "send", "to": "alice", "message": "hi"})["type"] == "message"
    assert bob.request({"type": "unblock", "username": "alice"})["type"] == "ok"
    assert alice.request({"type": "send", "to": "bob", "message": "hi"})["type"] == "message"
    assert bob.request({"type": "block", "username": "bob"})["code"] == "invalid_field"


@pytest.mark.parametrize("verb", ["ban", "kick"])
def test_a_ban_in_the_middle_of_a_burst_cuts_the_target_off_at_one_point(chat_server, verb):
    """500 messages pipelined by one member while the owner bans another, who has 3
    sessions: each session gets the same prefix of the burst, then `removed`, then none
    of it; every other member gets all 500."""
    owner, sender = chat_server.user("owner"), chat_server.user("sender")
    target = [chat_server.user("target")] + [chat_server.client() for _ in range(2)]
    for c in target[1:]:
        c.login("target")
    for c in (owner, sender, target[0]):
        assert c.request({"type": "join", "room": "race"})["type"] == "ok"
    burst = 500
    data = b"".join(json.dumps({"type": "send", "room": "race", "message": f"m{i}",
                                "id": i}).encode() + b"\n" for i in range(burst))
    moderator = chat_server.client()  # another session of the owner's: `request` skips frames
    moderator.login("owner")
    banner = threading.Thread(target=lambda: moderator.request(
        {"type": verb, "room": "race", "username": "target"}))
    sender.send_raw(data[: len(data) // 4])
    banner.start()
    sender.send_raw(data[len(data) // 4:])
    banner.join()
    sent = {}
    while len(sent) < burst:
        frame = sender.recv()
        if frame["type"] == "message" and "re" in frame:
            sent[frame["re"]] = frame["msg_id"]
    assert sorted(sent) == list(range(burst))
    sender.send({"type": "send", "to": "target", "message": "sentinel"})
    prefixes = []
    for c in target:
        got, removed_at = [], None
        while (frame := c.recv()).get("to") != "target":
            if frame["type"] == "removed":
                removed_at = len(got)
            elif frame["type"] == "message" and frame.get("room") == "race":
                got.append(frame["msg_id"])
        assert removed_at == len(got), "room traffic after removed"
        prefixes.append(got)
    assert prefixes[0] == prefixes[1] == prefixes[2]
    ids = sorted(sent.values())
    assert prefixes[0] == ids[: len(prefixes[0])]  # a prefix of the burst, in order
    # the owner, still a member, got all of it
    got = []
    while len(got) < burst:
        frame = owner.recv()
        if frame["type"] == "message" and frame.get("room") == "race":
            got.append(frame["msg_id"])
    assert got == ids


def test_invite_ban_join_race_ends_as_if_the_join_came_after_the_ban(chat_server):
    """Whatever order the writer takes them in, a user banned after an invitation ends
    up out of the room, banned, and told so if the join got in first."""
    owner, target = chat_server.user("owner"), chat_server.user("target")
    for i in range(20):
        room = f"race{i}"
        owner.request({"type": "create", "room": room, "visibility": "private"})
        owner.request({"type": "invite", "room": room, "username": "target"})
        ban = {"type": "ban", "room": room, "username": "target", "id": "b"}
        join = {"type": "join", "room": room, "id": "j"}
        # Sent as near together as two connections allow, in both orders.
        if i % 2:
            owner.send(ban)
            target.send(join)
        else:
            target.send(join)
            owner.send(ban)
        while True:
            frame = target.recv()
            if frame.get("re") == "j":
                joined = frame
                break
        assert joined["type"] == "ok" or joined["code"] == "no_such_room"
        if joined["type"] == "ok":
            assert target.recv_until("removed")["how"] == "ban"
        assert target.request({"type": "room_info", "room": room})["code"] == "no_such_room"
        assert owner.request({"type": "join", "room": room})["type"] == "ok"  # owner, still in


def test_a_join_that_makes_the_room_says_so(chat_server):
    alice, bob = chat_server.user("alice"), chat_server.user("bob")
    assert alice.request({"type": "join", "room": "typo"}).get("created") is True
    assert "created" not in bob.request({"type": "join", "room": "typo"})
    assert "created" not in alice.request({"type": "create", "room": "made"})


def test_room_info_names_the_banned_to_moderators_only(chat_server):
    owner, mod, mem = (chat_server.user(n) for n in ("olivia", "moe", "mel"))
    chat_server.register("eve")
    for c in (owner, mod, mem):
        c.request({"type": "join", "room": "dev"})
    owner.request({"type": "set_role", "room": "dev", "username": "moe", "role": "moderator"})
    assert owner.request({"type": "ban", "room": "dev", "username": "Eve"})["type"] == "ok"
    assert owner.request({"type": "room_info", "room": "dev"})["bans"] == ["eve"]
    assert mod.request({"type": "room_info", "room": "dev"})["bans"] == ["eve"]
    assert "bans" not in mem.request({"type": "room_info", "room": "dev"})

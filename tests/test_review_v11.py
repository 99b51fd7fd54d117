"""Review of "Rooms v1.1, step 2" (commit 1108e12): regression tests for what the review found.

Each test names its finding (see the review report). They drive a live in-process server
over TLS, as tests/test_server_acl.py does; where a race has to be forced, the test holds
the store's writer with a job of its own until the racing requests are queued behind it,
so that they are decided in one batch, in a known order.
"""

from __future__ import annotations

import json
import time
from typing import Any

from writer_gate import WriterGate, reply_to

TIMEOUT = 20.0


# Finding 1: a kick and the target's re-join decided in one batch leave the target a
# member (database, RoomBook, hub fan-out) whom the writer's `UserState.rooms` says is out:
# `hub.removed` (the kick's continuation) discards the room from `user.rooms` again, after
# the join's `run` had put it back. The user then gets the room's messages but every
# `send` to it is refused, and a further `join` answers `ok` without repairing anything.
def test_review_kick_then_rejoin_in_one_batch_leaves_the_member_able_to_send(chat_server):
    alice, bob = chat_server.user("alice"), chat_server.user("bob")
    assert alice.request({"type": "join", "room": "dev"})["type"] == "ok"
    assert bob.request({"type": "join", "room": "dev"})["type"] == "ok"
    gate = WriterGate(chat_server.server)
    alice.send({"type": "kick", "room": "dev", "username": "bob", "id": "k"})
    gate.wait_queued(1)
    bob.send({"type": "join", "room": "dev", "id": "j"})
    gate.wait_queued(2)
    gate.open()
    assert reply_to(alice, "k")["type"] == "ok"
    assert reply_to(bob, "j")["type"] == "ok"  # the join came after the kick: he is back in
    members = [m["username"] for m in alice.request({"type": "members", "room": "dev"})["members"]]
    assert "bob" in members
    sent = bob.request({"type": "send", "room": "dev", "message": "back again"})
    assert sent["type"] == "message", sent


# Finding 2: `list_rooms` reads on the shared read pool (the one `history` uses) with no
# "one read at a time" rule and nothing reserved beforehand: its writer job ends at once,
# so a single connection can pipeline list_rooms as fast as it may send frames, each a full
# scan of rooms and memberships, and fill the pool's queue; then every other user's
# `history` is refused with `server_busy`. (The scan is slowed here, as a large database
# makes it, so that the queue is seen full; auth_queue=1 makes the read queue 4 long.)
def test_review_pipelined_list_rooms_cannot_starve_other_users_history(server_factory,
                                                                        monkeypatch):
    from chat import rooms

    real = rooms.rooms_listed

    def slow(*args: Any, **kw: Any) -> Any:
        time.sleep(1.0)
        return real(*args, **kw)

    monkeypatch.setattr(rooms, "rooms_listed", slow)
    srv = server_factory(auth_queue=1)
    mallory, alice = srv.user("mallory"), srv.user("alice")
    alice.request({"type": "send", "room": "general", "message": "hello"})
    for wave in range(3):  # the queue is full once the two readers have taken theirs
        mallory.send_raw(b"".join(b'{"type":"list_rooms","id":%d}\n' % (100 * wave + i)
                                  for i in range(10)))
        time.sleep(0.1)
    reply = alice.request({"type": "history", "room": "general"})
    assert reply["type"] == "history", reply


# Finding 3: `members` sorts the whole room on the writer thread and checks every member's
# presence there too, uncached (unlike `who`), and is weighed only once its reply exists
# (unlike `history`, which reserves its cost before it starts). So a burst of pipelined
# `members` of a big room (general: everyone) is all computed by the one writer, and all
# sent, whatever the reply budget: the budget only starts to bite afterwards.
def test_review_pipelined_members_are_paced_by_the_reply_budget(server_factory):
    srv = server_factory(max_history_bytes=16384, reply_bytes_burst=16384,
                         reply_bytes_per_second=4096)
    for i in range(60):
        srv.register(f"user{i:03d}")
    c = srv.user("mallory")
    one = c.request({"type": "members", "room": "general"})
    size = len(json.dumps(one))
    assert size > 3000  # each reply is a few KB; the budget allows about one a second
    time.sleep(size / 4096 + 1)  # the first one's cost is paid back
    c.send_raw(b"".join(b'{"type":"members","room":"general","id":%d}\n' % i
                        for i in range(100, 120)))
    got, start = 0, time.monotonic()
    c.sock.settimeout(0.2)
    try:
        while time.monotonic() - start < 1.0:
            try:
                frame = c.recv()
            except (TimeoutError, OSError):
                continue
            if frame.get("type") == "members":
                got += 1
    finally:
        c.sock.settimeout(TIMEOUT)
    # 16 KiB of burst and 4 KiB a second allow about 6 of them within the second.
    assert got <= 8, f"{got} members replies of {size} bytes in one second"


# Finding 4: a job whose savepoint is rolled back by a database error after it changed the
# writer's RoomBook leaves the RoomBook holding what the database does not. Only a failed
# COMMIT makes the store forget the book (`RoomBook.forget`) and run the undo steps; a
# single job that fails inside its SAVEPOINT (`Store._run_job`, any non-ChatError) keeps
# its in-memory changes while the rest of the batch commits. Here a ban whose audit row
# cannot be written: the database still has bob as a member and not banned, but the book
# says he is out and banned (and the hub still fans the room out to him).
def test_review_a_job_failing_in_its_savepoint_leaves_no_trace_in_the_roombook(
        chat_server, monkeypatch):
    from sqlalchemy.exc import OperationalError

    from chat import moderation

    alice, bob = chat_server.user("alice"), chat_server.user("bob")
    for c in (alice, bob):
        assert c.request({"type": "join", "room": "dev"})["type"] == "ok"
    real = moderation.audit

    def failing(db: Any, ms: int, actor: str, action: str, **kw: Any) -> None:
        if action == "ban":
            raise OperationalError("INSERT INTO audit", {}, Exception("disk I/O error"))
        real(db, ms, actor, action, **kw)

    monkeypatch.setattr(moderation, "audit", failing)
    refused = alice.request({"type": "ban", "room": "dev", "username": "bob"})
    assert refused["code"] == "internal"
    monkeypatch.setattr(moderation, "audit", real)
    # Nothing was stored: bob is still a member, and not banned.
    members = [m["username"] for m in alice.request({"type": "members", "room": "dev"})["members"]]
    assert "bob" in members
    assert bob.request({"type": "history", "room": "dev"})["type"] == "history"
    assert bob.request({"type": "room_info", "room": "dev"})["type"] == "room"


# Finding 5: an empty private room can never be entered again, so `create` then `leave`
# (the owner alone may leave) burns a room name for good: the name stays taken
# (`room_taken`), `join` answers `no_such_room`, nobody can be invited (inviting needs a
# member), and nothing but the operator removes it. Rooms are never deleted when emptied,
# and nothing bounds how many one user makes (`max_rooms_per_user` counts only the rooms
# one is in), so a script can squat every short or wanted name, at the frame rate.
def test_review_an_abandoned_private_room_does_not_burn_its_name(chat_server):
    mallory, alice = chat_server.user("mallory"), chat_server.user("alice")
    assert mallory.request({"type": "create", "room": "announcements",
                            "visibility": "private"})["type"] == "ok"
    mallory.request({"type": "send", "room": "announcements", "message": "old"})
    assert mallory.request({"type": "leave", "room": "announcements"})["type"] == "ok"
    # Nobody is in it, nobody is invited: it is gone, history and all, and its name free.
    made = alice.request({"type": "create", "room": "announcements"})
    assert made["type"] == "ok", made
    assert alice.request({"type": "history", "room": "announcements"})["messages"] == []
    # and a join of such a room makes a new public one, as for any free name
    mallory.request({"type": "create", "room": "notes", "visibility": "private"})
    mallory.request({"type": "leave", "room": "notes"})
    assert alice.request({"type": "join", "room": "notes"})["type"] == "ok"
    assert alice.request({"type": "room_info", "room": "notes"})["visibility"] == "public"


# Finding 6: invitations have no bound, and `list_rooms` always lists every room the user
# is invited to, whatever `max_listed_rooms` says. Anyone may invite anyone to a public
# room they are in, and a room outlives its last member, so one account (create, invite,
# leave, again) grows a stranger's `list_rooms` reply, and the read it costs, without
# limit for `invite_ttl` (7 days); an invitation to a public room grants nothing either.
def test_review_invitations_cannot_grow_a_strangers_list_rooms_without_bound(server_factory):
    srv = server_factory(max_listed_rooms=3, max_rooms_per_user=5)
    mallory, victim = srv.user("mallory"), srv.user("victim")
    for i in range(30):
        name = f"spam{i:02d}"
        assert mallory.request({"type": "create", "room": name})["type"] == "ok"
        assert mallory.request({"type": "invite", "room": name,
                                "username": "victim"})["type"] == "ok"
        assert mallory.request({"type": "leave", "room": name})["type"] == "ok"
    listed = victim.request({"type": "list_rooms"})["rooms"]
    # at most: the public rooms listed (3), the rooms one may be in (5, and general),
    # and as many pending invitations as one may have rooms
    assert len(listed) <= 3 + 5 + 1 + 5, f"{len(listed)} rooms listed"


# Finding 7: `hello` does not announce version 1.1 (`"features":["acl"]`,
# `"registration"`), as docs/protocol.md says it does; a client cannot tell a v1.1 server
# (with `no_such_room`, `last_owner`, `removed`) from a version 1 one.
def test_review_hello_announces_the_v11_features(chat_server):
    hello = chat_server.client().hello
    assert "acl" in hello.get("features", []), hello
    assert hello.get("registration") in ("open", "token", "closed"), hello

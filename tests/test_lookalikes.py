"""Look-alike usernames (Unicode TS #39 skeletons) and the migration that brings them in."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from chat.auth import username_skeleton
from chat.db import make_engine, upgrade, upgrade_to_head


@pytest.mark.parametrize("other", ["aIice", "al1ce", "alice.", "a.lice", "al_ice", "ALICE",
                                   "AL1CE", "a-l-i-c-e"])
def test_look_alikes_of_alice_share_her_skeleton(other):
    assert username_skeleton(other) == username_skeleton("alice")


@pytest.mark.parametrize(("a", "b"), [("b0b", "bob"), ("B0B", "bob"), ("rnary", "mary"),
                                      ("wil1", "will"), ("Iouis", "louis")])
def test_ts39_pairs_look_alike(a, b):
    assert username_skeleton(a) == username_skeleton(b)


@pytest.mark.parametrize(("a", "b"), [("alice", "alicia"), ("bob", "bobby"), ("ann", "anne"),
                                      ("user2", "user3"), ("mary", "many")])
def test_different_names_stay_apart(a, b):
    assert username_skeleton(a) != username_skeleton(b)


def test_registering_a_look_alike_is_refused(chat_server):
    chat_server.register("alice")
    c = chat_server.client()
    for name in ("aIice", "al1ce", "alice.", "al_ice"):
        reply = c.request({"type": "register", "username": name,
                           "password": "another fine passphrase 7"})
        assert reply["code"] == "username_taken", name
        assert "looks too much like" in reply["message"]
    assert c.request({"type": "register", "username": "ALICE",
                      "password": "another fine passphrase 7"})["message"] == (
        "that username is taken")


def test_upgrade_keeps_every_user_and_gives_old_look_alikes_their_own_skeleton(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'old.db'}")
    upgrade(engine, "0001")
    with engine.begin() as conn:
        conn.execute(sa.text(
            "INSERT INTO users (id, username_key, username, password_hash, created_ms, "
            "updated_ms) VALUES (1, 'alice', 'alice', 'h', 0, 0), (2, 'al1ce', 'al1ce', 'h', "
            "0, 0), (3, 'bob', 'bob', 'h', 0, 0)"))
        # bob left general, which an older release allowed
        conn.execute(sa.text("INSERT INTO memberships VALUES (1, 'general', 0), "
                             "(2, 'general', 0), (3, 'dev', 0)"))
        conn.execute(sa.text(
            "INSERT INTO messages (ts_ms, sender_id, sender_name, room, body, delivered) "
            "VALUES (0, 3, 'bob', 'dev', 'kept', 1)"))
    upgrade_to_head(engine)  # as the server does at start
    with engine.connect() as conn:
        users = conn.execute(sa.text(
            "SELECT id, username, username_skeleton FROM users ORDER BY id")).all()
        rooms = conn.execute(sa.text(
            "SELECT user_id, room FROM memberships ORDER BY user_id, room")).all()
        bodies = conn.execute(sa.text("SELECT body FROM messages")).scalars().all()
    assert users == [(1, "alice", "allce"), (2, "al1ce", "allce#2"), (3, "bob", "bob")]
    assert rooms == [(1, "general"), (2, "general"), (3, "dev"), (3, "general")]
    assert bodies == ["kept"]  # a table rebuilt by the migration cascaded into none of it
    # and a new look-alike cannot get in beside them
    with pytest.raises(sa.exc.IntegrityError), engine.begin() as conn:
        conn.execute(sa.text(
            "INSERT INTO users (username_key, username, username_skeleton, password_hash, "
            "created_ms, updated_ms) VALUES ('aiice', 'aIice', 'allce', 'h', 0, 0)"))

"""The migrations build exactly the schema the models describe, on both engines."""

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from chat.db import make_engine, upgrade, upgrade_to_head
from chat.models import Base

pytestmark = pytest.mark.both_engines


@pytest.fixture
def engine(db_url, tmp_path):
    engine = make_engine(db_url or f"sqlite:///{tmp_path / 'm.db'}")
    yield engine
    engine.dispose()


def test_models_and_migrations_agree(engine):
    upgrade_to_head(engine)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == [], f"models differ from migrations; run scripts/new_migration.sh: {diff}"


def test_upgrade_to_rooms_keeps_every_user_message_and_membership(engine):
    """A database of the previous release (0002) upgrades with everything kept: each
    room becomes a public, shared room, owned by its first member (general by nobody)."""
    upgrade(engine, "0002")
    with engine.begin() as conn:
        conn.execute(sa.text(
            "INSERT INTO users (id, username_key, username, username_skeleton, password_hash, "
            "created_ms, updated_ms) VALUES (1, 'alice', 'alice', 'allce', 'h', 0, 0), "
            "(2, 'bob', 'bob', 'bob', 'h', 0, 0)"))
        conn.execute(sa.text("INSERT INTO memberships VALUES (1, 'general', 1), "
                             "(2, 'general', 2), (2, 'dev', 5), (1, 'dev', 9)"))
        conn.execute(sa.text(
            "INSERT INTO messages (ts_ms, sender_id, sender_name, room, body, delivered) "
            "VALUES (0, 2, 'bob', 'dev', 'kept', :t), (0, 1, 'alice', 'gone', 'old', :t)"),
            {"t": True})
        conn.execute(sa.text(
            "INSERT INTO messages (ts_ms, sender_id, sender_name, recipient_id, "
            "recipient_name, dm_pair, body, delivered) VALUES (0, 1, 'alice', 2, 'bob', '1:2', "
            "'dm', :f)"), {"f": False})
    upgrade_to_head(engine)
    with engine.connect() as conn:
        rooms = conn.execute(sa.text(
            "SELECT name, visibility, history, topic FROM rooms ORDER BY name")).all()
        members = conn.execute(sa.text(
            "SELECT user_id, room, role FROM memberships ORDER BY room, user_id")).all()
        bodies = conn.execute(sa.text("SELECT body, delivered FROM messages ORDER BY id")).all()
        users = conn.execute(sa.text("SELECT username, disabled_ms FROM users")).all()
    assert rooms == [("dev", "public", "shared", ""), ("general", "public", "shared", ""),
                     ("gone", "public", "shared", "")]
    assert members == [(1, "dev", "member"), (2, "dev", "owner"), (1, "general", "member"),
                       (2, "general", "member")]
    assert bodies == [("kept", 1), ("old", 1), ("dm", 0)]
    assert users == [("alice", None), ("bob", None)]


def test_ids_that_grow_for_ever_are_64_bit(engine):
    """messages.id and to_device.seq outlive 2^31 (days of the busiest load)."""
    upgrade_to_head(engine)
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            types = dict(conn.execute(sa.text(
                "SELECT table_name || '.' || column_name, data_type FROM information_schema"
                ".columns WHERE table_schema = current_schema() AND (table_name, column_name)"
                " IN (('messages', 'id'), ('to_device', 'seq'))")).all())
            assert types == {"messages.id": "bigint", "to_device.seq": "bigint"}
            tops = conn.execute(sa.text(
                "SELECT max_value FROM pg_sequences WHERE schemaname = current_schema() AND "
                "sequencename IN ('messages_id_seq', 'to_device_seq_seq')")).scalars().all()
            assert len(tops) == 2 and min(tops) > 2**31
            conn.execute(sa.text("SELECT setval('messages_id_seq', :n)"), {"n": 2**40})
        conn.execute(sa.text(
            "INSERT INTO users (id, username_key, username, username_skeleton, password_hash, "
            "created_ms, updated_ms) VALUES (1, 'alice', 'alice', 'allce', 'h', 0, 0)"))
        if engine.dialect.name != "postgresql":
            conn.execute(sa.text(
                "INSERT INTO messages (id, ts_ms, sender_id, sender_name, room, body, delivered)"
                " VALUES (:n, 0, 1, 'alice', 'general', 'far', :t)"), {"n": 2**40, "t": True})
        conn.execute(sa.text(
            "INSERT INTO messages (ts_ms, sender_id, sender_name, room, body, delivered) "
            "VALUES (0, 1, 'alice', 'general', 'next', :t)"), {"t": True})
        top = conn.execute(sa.text("SELECT max(id) FROM messages")).scalar_one()
    assert top == 2**40 + 1

"""rooms with roles and moderation, registration tokens, disabled accounts, audit

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-06

Protocol v1.1:
- `rooms`: one row per live room (visibility, history, topic). Every room that has a
  member or a message becomes a public room with `shared` history, as v1 rooms were.
- `memberships` gain `role` and `since_msg_id` and point at their room. In each room
  but `general`, the member who joined first becomes its owner (v1 made the first joiner
  the room's creator); nobody owns `general`.
- `bans`, `invites`, `blocks`, `registration_tokens`, `audit`; `users.disabled_ms`.
"""

import time
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

GENERAL = "general"


def upgrade() -> None:
    conn = op.get_bind()
    with op.batch_alter_table("users", schema=None) as batch_op:
        batch_op.add_column(sa.Column("disabled_ms", sa.BigInteger(), nullable=True))

    rooms = op.create_table(
        "rooms",
        sa.Column("name", sa.String(length=32), nullable=False),
        sa.Column("visibility", sa.String(length=8), nullable=False),
        sa.Column("history", sa.String(length=8), nullable=False),
        sa.Column("topic", sa.Text(), nullable=False),
        sa.Column("created_ms", sa.BigInteger(), nullable=False),
        sa.Column("first_msg_id", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )
    memberships = sa.table("memberships", sa.column("user_id", sa.Integer),
                           sa.column("room", sa.String), sa.column("joined_ms", sa.BigInteger),
                           sa.column("role", sa.String))
    messages = sa.table("messages", sa.column("room", sa.String))
    first_joined = dict(conn.execute(
        sa.select(memberships.c.room, sa.func.min(memberships.c.joined_ms))
        .group_by(memberships.c.room)).all())
    names = set(first_joined) | {GENERAL} | set(conn.execute(
        sa.select(messages.c.room).where(messages.c.room.is_not(None)).distinct()).scalars())
    now_ms = time.time_ns() // 1_000_000
    if names:
        op.bulk_insert(rooms, [
            {"name": name, "visibility": "public", "history": "shared", "topic": "",
             "created_ms": first_joined.get(name, now_ms), "first_msg_id": 0}
            for name in sorted(names)])

    with op.batch_alter_table("memberships", schema=None) as batch_op:
        batch_op.add_column(sa.Column("role", sa.String(length=16), nullable=False,
                                      server_default="member"))
        batch_op.add_column(sa.Column("since_msg_id", sa.BigInteger(), nullable=False,
                                      server_default="0"))
        batch_op.create_foreign_key("fk_memberships_room_rooms", "rooms", ["room"], ["name"],
                                    ondelete="CASCADE")
    with op.batch_alter_table("memberships", schema=None) as batch_op:
        # The defaults were for the rows already there; the server always says.
        batch_op.alter_column("role", server_default=None)
        batch_op.alter_column("since_msg_id", server_default=None)

    for room in sorted(first_joined):
        if room == GENERAL:
            continue
        first = conn.execute(
            sa.select(memberships.c.user_id).where(memberships.c.room == room)
            .order_by(memberships.c.joined_ms, memberships.c.user_id).limit(1)).scalar()
        conn.execute(sa.update(memberships).where(sa.and_(
            memberships.c.room == room, memberships.c.user_id == first)).values(role="owner"))

    op.create_table(
        "bans",
        sa.Column("room", sa.String(length=32), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("by_name", sa.String(length=64), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("created_ms", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(["room"], ["rooms.name"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("room", "user_id"),
    )
    op.create_table(
        "invites",
        sa.Column("room", sa.String(length=32), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("by_name", sa.String(length=64), nullable=False),
        sa.Column("expires_ms", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(["room"], ["rooms.name"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("room", "user_id"),
    )
    op.create_index("ix_invites_user_id", "invites", ["user_id"], unique=False)
    op.create_table(
        "blocks",
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("blocked_id", sa.Integer(), nullable=False),
        sa.Column("created_ms", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(["blocked_id"], ["users.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("user_id", "blocked_id"),
    )
    op.create_table(
        "registration_tokens",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("uses_allowed", sa.Integer(), nullable=False),
        sa.Column("uses", sa.Integer(), nullable=False),
        sa.Column("created_ms", sa.BigInteger(), nullable=False),
        sa.Column("expires_ms", sa.BigInteger(), nullable=False),
        sa.Column("revoked_ms", sa.BigInteger(), nullable=True),
        sa.Column("note", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("token_hash"),
    )
    op.create_table(
        "audit",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("ts_ms", sa.BigInteger(), nullable=False),
        sa.Column("actor", sa.String(length=64), nullable=False),
        sa.Column("action", sa.String(length=32), nullable=False),
        sa.Column("target", sa.String(length=64), nullable=True),
        sa.Column("room", sa.String(length=32), nullable=True),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_audit_ts_ms", "audit", ["ts_ms"], unique=False)
    op.create_index("ix_audit_room", "audit", ["room"], unique=False)
    op.create_index("ix_audit_target", "audit", ["target"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_audit_target", table_name="audit")
    op.drop_index("ix_audit_room", table_name="audit")
    op.drop_index("ix_audit_ts_ms", table_name="audit")
    op.drop_table("audit")
    op.drop_table("registration_tokens")
    op.drop_table("blocks")
    op.drop_index("ix_invites_user_id", table_name="invites")
    op.drop_table("invites")
    op.drop_table("bans")
    with op.batch_alter_table("memberships", schema=None) as batch_op:
        batch_op.drop_constraint("fk_memberships_room_rooms", type_="foreignkey")
        batch_op.drop_column("since_msg_id")
        batch_op.drop_column("role")
    op.drop_table("rooms")
    with op.batch_alter_table("users", schema=None) as batch_op:
        batch_op.drop_column("disabled_ms")

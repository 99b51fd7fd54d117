"""username skeletons, direct-message indexes, everyone in general

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-05

- `users.username_skeleton` (unique): a look-alike of an existing name cannot register.
  Existing users get theirs here; where two already look alike, the later account's
  skeleton is suffixed with its id, so both keep working and no third can join them.
- Indexes for every direct message of one user (`history` with `direct`), and the
  direct-message indexes made partial: a room message writes no entry in them.
- Every account is in `general` (the protocol says so; an older release let users leave).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# A frozen copy of chat.auth.username_skeleton as of this revision: a migration must do
# tomorrow what it did today, whatever the code becomes.
_CONFUSABLE = str.maketrans({"0": "o", "1": "l", "i": "l", ".": None, "_": None, "-": None})


def _skeleton(name: str) -> str:
    return name.lower().translate(_CONFUSABLE).replace("m", "rn")


def upgrade() -> None:
    conn = op.get_bind()
    with op.batch_alter_table("users", schema=None) as batch_op:
        batch_op.add_column(sa.Column("username_skeleton", sa.String(length=64), nullable=True))
    users = sa.table("users", sa.column("id", sa.Integer), sa.column("username", sa.String),
                     sa.column("username_skeleton", sa.String))
    seen: set[str] = set()
    for uid, name in conn.execute(sa.select(users.c.id, users.c.username)
                                  .order_by(users.c.id)).all():
        skeleton = _skeleton(name)
        if skeleton in seen:
            skeleton = f"{skeleton}#{uid}"  # an old look-alike keeps its account
        seen.add(skeleton)
        conn.execute(sa.update(users).where(users.c.id == uid)
                     .values(username_skeleton=skeleton))
    with op.batch_alter_table("users", schema=None) as batch_op:
        batch_op.alter_column("username_skeleton", existing_type=sa.String(length=64),
                              nullable=False)
        batch_op.create_unique_constraint("uq_users_username_skeleton", ["username_skeleton"])

    # Partial: room messages, nearly every INSERT, write no entry in them (the two
    # indexes of direct messages that 0001 made whole are made partial too).
    direct_only = {"sqlite_where": sa.text("room IS NULL"),
                   "postgresql_where": sa.text("room IS NULL")}
    with op.batch_alter_table("messages", schema=None) as batch_op:
        batch_op.drop_index("ix_messages_dm_pair_id")
        batch_op.drop_index("ix_messages_undelivered")
        batch_op.create_index("ix_messages_dm_pair_id", ["dm_pair", "id"], unique=False,
                              sqlite_where=sa.text("dm_pair IS NOT NULL"),
                              postgresql_where=sa.text("dm_pair IS NOT NULL"))
        batch_op.create_index("ix_messages_undelivered", ["recipient_id", "delivered"],
                              unique=False,
                              sqlite_where=sa.text("recipient_id IS NOT NULL"),
                              postgresql_where=sa.text("recipient_id IS NOT NULL"))
        batch_op.create_index("ix_messages_recipient_id", ["recipient_id", "id"], unique=False,
                              **direct_only)
        batch_op.create_index("ix_messages_sender_id", ["sender_id", "id"], unique=False,
                              **direct_only)

    memberships = sa.table("memberships", sa.column("user_id", sa.Integer),
                           sa.column("room", sa.String), sa.column("joined_ms", sa.BigInteger))
    in_general = sa.select(memberships.c.user_id).where(memberships.c.room == "general")
    missing = conn.execute(sa.select(users.c.id).where(users.c.id.not_in(in_general))).all()
    if missing:
        conn.execute(sa.insert(memberships), [
            {"user_id": uid, "room": "general", "joined_ms": 0} for (uid,) in missing])


def downgrade() -> None:
    with op.batch_alter_table("messages", schema=None) as batch_op:
        batch_op.drop_index("ix_messages_sender_id")
        batch_op.drop_index("ix_messages_recipient_id")
        batch_op.drop_index("ix_messages_undelivered")
        batch_op.drop_index("ix_messages_dm_pair_id")
        batch_op.create_index("ix_messages_dm_pair_id", ["dm_pair", "id"], unique=False)
        batch_op.create_index("ix_messages_undelivered", ["recipient_id", "delivered"],
                              unique=False)
    with op.batch_alter_table("users", schema=None) as batch_op:
        batch_op.drop_constraint("uq_users_username_skeleton", type_="unique")
        batch_op.drop_column("username_skeleton")

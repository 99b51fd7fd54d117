"""encrypted rooms and messages, to-device queues (end-to-end encryption, step 2)

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06

- `rooms.encrypted`, `messages.encrypted`: a room that holds only ciphertext, and which
  stored bodies are Megolm envelopes rather than text.
- `to_device`: Olm messages queued per device until it acknowledges them.
- `to_device_sends`: each device's recent `send_id`s, so that a repeat queues nothing.
- `devices.removed_ms`: a device the operator removed is remembered, so that the lost
  device cannot register its keys again.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("devices") as batch:
        batch.add_column(sa.Column("removed_ms", sa.BigInteger(), nullable=True))
    with op.batch_alter_table("rooms") as batch:
        batch.add_column(sa.Column("encrypted", sa.Boolean(), nullable=False,
                                   server_default=sa.false()))
    with op.batch_alter_table("messages") as batch:
        batch.add_column(sa.Column("encrypted", sa.Boolean(), nullable=False,
                                   server_default=sa.false()))
    op.create_table(
        "to_device",
        sa.Column("seq", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("device", sa.String(length=32), nullable=False),
        sa.Column("sender_name", sa.String(length=32), nullable=False),
        sa.Column("sender_device", sa.String(length=32), nullable=False),
        sa.Column("olm", sa.Text(), nullable=False),
        sa.Column("created_ms", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(["user_id", "device"], ["devices.user_id", "devices.device"],
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("seq"),
        sqlite_autoincrement=True,  # a seq is never given out again
    )
    op.create_index("ix_to_device_target", "to_device", ["user_id", "device", "seq"])
    op.create_table(
        "to_device_sends",
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("device", sa.String(length=32), nullable=False),
        sa.Column("send_id", sa.String(length=64), nullable=False),
        sa.Column("answer", sa.Text(), nullable=False),
        sa.Column("created_ms", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(["user_id", "device"], ["devices.user_id", "devices.device"],
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("user_id", "device", "send_id"),
    )
    op.create_index("ix_to_device_sends_age", "to_device_sends",
                    ["user_id", "device", "created_ms"])


def downgrade() -> None:
    op.drop_table("to_device_sends")
    op.drop_table("to_device")
    with op.batch_alter_table("messages") as batch:
        batch.drop_column("encrypted")
    with op.batch_alter_table("rooms") as batch:
        batch.drop_column("encrypted")
    with op.batch_alter_table("devices") as batch:
        batch.drop_column("removed_ms")

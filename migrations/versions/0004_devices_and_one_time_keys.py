"""devices and their one-time keys (end-to-end encryption, step 1)

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-06

- `devices`: each user's client installations, by their public identity keys.
- `one_time_keys`: each device's signed one-time keys and its fallback key.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "devices",
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("device", sa.String(length=32), nullable=False),
        sa.Column("curve25519", sa.String(length=43), nullable=False),
        sa.Column("ed25519", sa.String(length=43), nullable=False),
        sa.Column("signature", sa.String(length=86), nullable=False),
        sa.Column("created_ms", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("user_id", "device"),
    )
    op.create_table(
        "one_time_keys",
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("device", sa.String(length=32), nullable=False),
        sa.Column("key_id", sa.String(length=32), nullable=False),
        sa.Column("key", sa.String(length=43), nullable=False),
        sa.Column("signature", sa.String(length=86), nullable=False),
        sa.Column("fallback", sa.Boolean(), nullable=False),
        sa.ForeignKeyConstraint(["user_id", "device"], ["devices.user_id", "devices.device"],
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("user_id", "device", "fallback", "key_id"),
    )


def downgrade() -> None:
    op.drop_table("one_time_keys")
    op.drop_table("devices")

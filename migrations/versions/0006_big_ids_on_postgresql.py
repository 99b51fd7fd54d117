"""64-bit message and to-device ids on PostgreSQL

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06

`messages.id` and `to_device.seq` were PostgreSQL `integer`s (and their sequences too):
2^31 ids, a few days of the busiest load the benchmarks make. They become `bigint`, with
their sequences. SQLite's are 64-bit already (INTEGER PRIMARY KEY is the rowid), so
nothing changes there.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_IDS = (("messages", "id"), ("to_device", "seq"))


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for table, column in _IDS:
        op.alter_column(table, column, type_=sa.BigInteger(), existing_type=sa.Integer(),
                        existing_nullable=False)
        op.execute(f"ALTER SEQUENCE {table}_{column}_seq AS bigint")


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for table, column in _IDS:
        op.execute(f"ALTER SEQUENCE {table}_{column}_seq AS integer")
        op.alter_column(table, column, type_=sa.Integer(), existing_type=sa.BigInteger(),
                        existing_nullable=False)

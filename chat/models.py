"""SQLAlchemy 2.0 models. The schema itself is created only by the Alembic migrations.

Usernames never change after registration, so messages keep the sender's and recipient's
display names beside their ids: history needs no join.
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Boolean, ForeignKey, Index, Integer, String, Text, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    # Lower-case canonical form: uniqueness regardless of case lives in the database.
    username_key: Mapped[str] = mapped_column(String(32), unique=True)
    username: Mapped[str] = mapped_column(String(32))
    # auth.username_skeleton: a look-alike of an existing name is refused, in the database
    # too, so that two servers on one database cannot both let one in.
    username_skeleton: Mapped[str] = mapped_column(String(64), unique=True)
    # Wide enough for a scheme prefix, a pepper id and tomorrow's algorithm.
    password_hash: Mapped[str] = mapped_column(String(255))
    created_ms: Mapped[int] = mapped_column(BigInteger)
    updated_ms: Mapped[int] = mapped_column(BigInteger)


class Membership(Base):
    __tablename__ = "memberships"

    user_id: Mapped[int] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), primary_key=True
    )
    room: Mapped[str] = mapped_column(String(32), primary_key=True)
    joined_ms: Mapped[int] = mapped_column(BigInteger)

    __table_args__ = (Index("ix_memberships_room", "room"),)


class Message(Base):
    __tablename__ = "messages"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    ts_ms: Mapped[int] = mapped_column(BigInteger)
    sender_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    sender_name: Mapped[str] = mapped_column(String(32))
    # A room message has `room`; a direct message has the recipient and `dm_pair`
    # ("<low id>:<high id>"), so one index serves history in both directions.
    room: Mapped[str | None] = mapped_column(String(32))
    recipient_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    recipient_name: Mapped[str | None] = mapped_column(String(32))
    dm_pair: Mapped[str | None] = mapped_column(String(24))
    body: Mapped[str] = mapped_column(Text)
    # For direct messages: False until handed to one of the recipient's sessions.
    delivered: Mapped[bool] = mapped_column(Boolean, default=True)

    __table_args__ = (
        Index("ix_messages_room_id", "room", "id"),
        # Partial, as the ones below: only direct messages have entries in them.
        Index("ix_messages_dm_pair_id", "dm_pair", "id",
              sqlite_where=text("dm_pair IS NOT NULL"),
              postgresql_where=text("dm_pair IS NOT NULL")),
        Index("ix_messages_undelivered", "recipient_id", "delivered",
              sqlite_where=text("recipient_id IS NOT NULL"),
              postgresql_where=text("recipient_id IS NOT NULL")),
        # Every direct message of one user (history direct: catching up after a reconnect).
        # Partial: a room message, nearly every INSERT, has no entry to write in them
        # (two more index entries per message cost bench (b) a tenth of its rate).
        Index("ix_messages_recipient_id", "recipient_id", "id",
              sqlite_where=text("room IS NULL"), postgresql_where=text("room IS NULL")),
        Index("ix_messages_sender_id", "sender_id", "id",
              sqlite_where=text("room IS NULL"), postgresql_where=text("room IS NULL")),
        # msg_id must grow with every message and never be reused.
        {"sqlite_autoincrement": True},
    )

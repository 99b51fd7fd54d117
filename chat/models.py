"""SQLAlchemy 2.0 models. The schema itself is created only by the Alembic migrations.

Usernames never change after registration, so messages keep the sender's and recipient's
display names beside their ids: history needs no join.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    ForeignKey,
    ForeignKeyConstraint,
    Index,
    Integer,
    String,
    Text,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# An id that grows for ever (messages, to-device messages): see Message.id.
BIG_ID = BigInteger().with_variant(Integer(), "sqlite")


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
    # Set by the operator: the account cannot log in, and its sessions were ended.
    disabled_ms: Mapped[int | None] = mapped_column(BigInteger)


class Room(Base):
    """A room by its (lower-case) name: one live room per name. Deleting a room deletes
    its row, members, bans, invitations and messages, so a new room of the same name
    starts empty; `first_msg_id` keeps even a leftover message out of its history."""

    __tablename__ = "rooms"

    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    visibility: Mapped[str] = mapped_column(String(8))  # public | private
    history: Mapped[str] = mapped_column(String(8))  # shared | joined
    topic: Mapped[str] = mapped_column(Text, default="")
    created_ms: Mapped[int] = mapped_column(BigInteger)
    # Messages of this room have ids above it (the newest id when the room was made).
    first_msg_id: Mapped[int] = mapped_column(BigInteger, default=0)
    # End-to-end encrypted (a private room made so): only ciphertext is stored, for ever.
    encrypted: Mapped[bool] = mapped_column(Boolean, default=False)


class Membership(Base):
    __tablename__ = "memberships"

    user_id: Mapped[int] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), primary_key=True
    )
    room: Mapped[str] = mapped_column(
        ForeignKey("rooms.name", ondelete="CASCADE"), primary_key=True)
    joined_ms: Mapped[int] = mapped_column(BigInteger)
    role: Mapped[str] = mapped_column(String(16), default="member")
    # The newest msg_id at this join: a `joined` room's history starts after it.
    since_msg_id: Mapped[int] = mapped_column(BigInteger, default=0)

    __table_args__ = (Index("ix_memberships_room", "room"),)


class Ban(Base):
    __tablename__ = "bans"

    room: Mapped[str] = mapped_column(
        ForeignKey("rooms.name", ondelete="CASCADE"), primary_key=True)
    user_id: Mapped[int] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), primary_key=True)
    by_name: Mapped[str] = mapped_column(String(64))  # a username, or "operator"
    reason: Mapped[str] = mapped_column(Text, default="")
    created_ms: Mapped[int] = mapped_column(BigInteger)


class Invite(Base):
    __tablename__ = "invites"

    room: Mapped[str] = mapped_column(
        ForeignKey("rooms.name", ondelete="CASCADE"), primary_key=True)
    user_id: Mapped[int] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), primary_key=True)
    by_name: Mapped[str] = mapped_column(String(64))
    expires_ms: Mapped[int] = mapped_column(BigInteger)

    # list_rooms: the rooms a user is invited to.
    __table_args__ = (Index("ix_invites_user_id", "user_id"),)


class Block(Base):
    """`user_id` takes no direct messages or invitations from `blocked_id`."""

    __tablename__ = "blocks"

    user_id: Mapped[int] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), primary_key=True)
    blocked_id: Mapped[int] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), primary_key=True)
    created_ms: Mapped[int] = mapped_column(BigInteger)


class RegistrationToken(Base):
    """Only the SHA-256 of a token is kept: the token itself is shown once, at creation."""

    __tablename__ = "registration_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    uses_allowed: Mapped[int] = mapped_column(Integer)
    uses: Mapped[int] = mapped_column(Integer, default=0)
    created_ms: Mapped[int] = mapped_column(BigInteger)
    expires_ms: Mapped[int] = mapped_column(BigInteger)
    revoked_ms: Mapped[int | None] = mapped_column(BigInteger)
    note: Mapped[str] = mapped_column(Text, default="")


class AuditEntry(Base):
    """Every moderation and operator action: who, what, whom, where, why, when."""

    __tablename__ = "audit"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    ts_ms: Mapped[int] = mapped_column(BigInteger)
    actor: Mapped[str] = mapped_column(String(64))  # a username, or "operator"
    action: Mapped[str] = mapped_column(String(32))
    target: Mapped[str | None] = mapped_column(String(64))  # a username, or a token id
    room: Mapped[str | None] = mapped_column(String(32))
    reason: Mapped[str] = mapped_column(Text, default="")
    detail: Mapped[str] = mapped_column(Text, default="")

    __table_args__ = (Index("ix_audit_ts_ms", "ts_ms"), Index("ix_audit_room", "room"),
                      Index("ix_audit_target", "target"))


class Message(Base):
    __tablename__ = "messages"

    # 64-bit on PostgreSQL (2^31 ids are a few days of the busiest load); SQLite's
    # INTEGER PRIMARY KEY is 64-bit already, and must stay INTEGER to be the rowid.
    id: Mapped[int] = mapped_column(BIG_ID, primary_key=True, autoincrement=True)
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
    # `body` is a Megolm envelope (canonical JSON) the server cannot read, not text.
    encrypted: Mapped[bool] = mapped_column(Boolean, default=False)

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


class Device(Base):
    """One client installation of a user, by its public identity keys (chat.devices)."""

    __tablename__ = "devices"

    user_id: Mapped[int] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), primary_key=True)
    device: Mapped[str] = mapped_column(String(32), primary_key=True)
    curve25519: Mapped[str] = mapped_column(String(43))
    ed25519: Mapped[str] = mapped_column(String(43))
    signature: Mapped[str] = mapped_column(String(86))
    created_ms: Mapped[int] = mapped_column(BigInteger)
    # Set when the operator removed it (a lost phone): kept so that its keys, which
    # the lost device still holds, can never be registered again.
    removed_ms: Mapped[int | None] = mapped_column(BigInteger)


# A device the operator has not removed: the only kind keys are given out for or
# messages queued to (a removed one's row stays, so its keys never come back).
DEVICE_LIVE = Device.__table__.c.removed_ms.is_(None)


class OneTimeKey(Base):
    """A device's signed one-time keys, each handed out once; and its fallback key
    (`fallback`), handed out when none is left and kept until the device replaces it."""

    __tablename__ = "one_time_keys"

    user_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    device: Mapped[str] = mapped_column(String(32), primary_key=True)
    # Olm numbers one-time and fallback keys apart: the same id may be one of each.
    fallback: Mapped[bool] = mapped_column(Boolean, primary_key=True, default=False)
    key_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    key: Mapped[str] = mapped_column(String(43))
    signature: Mapped[str] = mapped_column(String(86))

    __table_args__ = (
        ForeignKeyConstraint(["user_id", "device"], ["devices.user_id", "devices.device"],
                             ondelete="CASCADE"),
    )


class ToDevice(Base):
    """An Olm message queued for one device until that device acknowledges it. `seq` is
    the order the device gets its queue in; the sender is as the server authenticated it."""

    __tablename__ = "to_device"

    seq: Mapped[int] = mapped_column(BIG_ID, primary_key=True, autoincrement=True)
    user_id: Mapped[int] = mapped_column(Integer)
    device: Mapped[str] = mapped_column(String(32))
    sender_name: Mapped[str] = mapped_column(String(32))
    sender_device: Mapped[str] = mapped_column(String(32))
    olm: Mapped[str] = mapped_column(Text)  # the `olm` object, canonical JSON
    created_ms: Mapped[int] = mapped_column(BigInteger)

    __table_args__ = (
        ForeignKeyConstraint(["user_id", "device"], ["devices.user_id", "devices.device"],
                             ondelete="CASCADE"),
        Index("ix_to_device_target", "user_id", "device", "seq"),
        # `seq` never goes back, even once the queue is empty (SQLite reuses rowids).
        {"sqlite_autoincrement": True},
    )


class ToDeviceSend(Base):
    """A `send_id` a device used lately, with its answer: a repeat queues nothing again."""

    __tablename__ = "to_device_sends"

    user_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    device: Mapped[str] = mapped_column(String(32), primary_key=True)
    send_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    answer: Mapped[str] = mapped_column(Text)  # the `ok`'s queued and skipped, JSON
    created_ms: Mapped[int] = mapped_column(BigInteger)

    __table_args__ = (
        ForeignKeyConstraint(["user_id", "device"], ["devices.user_id", "devices.device"],
                             ondelete="CASCADE"),
        Index("ix_to_device_sends_age", "user_id", "device", "created_ms"),
    )

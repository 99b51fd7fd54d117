"""The rooms as the store's writer knows them: members and roles, bans, invitations.

Theory of operation
-------------------
Membership and permissions are decided in one place: the writer thread, in the order
requests came. `RoomBook` is that place's memory. A room is read from the database the
first time a job touches it and kept; from then on the writer changes the copy and the
database together, inside the job's transaction. If a batch's COMMIT fails, the whole
book is forgotten (`forget`) and read again on next use, so the copy never holds what the
database does not. Only the writer thread calls anything here; nothing else may look at
a room (a read path asks the writer, which asks this).

What a user may do is `chat.acl`'s to say; this module gives it the facts (`view`).

Every action here also writes its audit row, in the same transaction: a moderation step
and its record commit together or not at all.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, and_, delete, func, insert, select, update

from chat import acl
from chat.models import AuditEntry, Ban, Block, Invite, Membership, Message, Room, User

rooms_t = Room.__table__
members_t = Membership.__table__
bans_t = Ban.__table__
invites_t = Invite.__table__
blocks_t = Block.__table__
audit_t = AuditEntry.__table__
users_t = User.__table__
messages_t = Message.__table__

OPERATOR = "operator"  # the actor of what `chat-admin` does


@dataclass(slots=True)
class Member:
    name: str
    role: str
    since_msg_id: int  # the newest message at this join


@dataclass(eq=False)
class RoomState:
    name: str
    visibility: str
    history: str
    topic: str
    first_msg_id: int
    encrypted: bool = False
    members: dict[int, Member] = field(default_factory=dict)  # by user id
    bans: set[int] = field(default_factory=set)
    invites: dict[int, int] = field(default_factory=dict)  # user id -> expires_ms
    # Derived from `members`, kept until they change (`members_changed`), so that asking
    # of a room of thousands (its member list, an owner's every request) costs the writer
    # nothing after the first: (name, role) sorted by name, and the count of owners.
    listed: tuple[tuple[str, str], ...] | None = None
    _owners: int | None = None

    @property
    def private(self) -> bool:
        return self.visibility == acl.PRIVATE

    def members_changed(self) -> None:
        self.listed = self._owners = None

    def owners(self) -> int:
        if self._owners is None:
            self._owners = sum(1 for m in self.members.values() if m.role == acl.OWNER)
        return self._owners

    def view(self, user_id: int, now_ms: int) -> acl.View:
        member = self.members.get(user_id)
        expires = self.invites.get(user_id)
        return acl.View(
            room=self.name, visibility=self.visibility,
            role=member.role if member else None,
            invited=expires is not None and expires > now_ms,
            banned=user_id in self.bans,
            owners=self.owners() if member and member.role == acl.OWNER else 0,
            members=len(self.members),
        )

    def member_list(self) -> tuple[tuple[str, str], ...]:
        if self.listed is None:
            self.listed = tuple(sorted(((m.name, m.role) for m in self.members.values()),
                                       key=lambda nr: nr[0].lower()))
        return self.listed

    def abandoned(self, now_ms: int) -> bool:
        """A private room nobody is in or may enter: nobody could ever reach it again."""
        return (self.private and not self.members
                and not any(exp > now_ms for exp in self.invites.values()))

    def readable_after(self, user_id: int) -> int:
        """History of this room for a member: messages with ids above this."""
        member = self.members[user_id]
        if self.history == acl.JOINED:
            return max(self.first_msg_id, member.since_msg_id)
        return self.first_msg_id

    def info(self, role: str | None) -> dict[str, Any]:
        """The `room` frame (room_info's reply) as a member of `role` sees it."""
        info = {"type": "room", "room": self.name, "visibility": self.visibility,
                "history": self.history, "topic": self.topic, "role": role,
                "members": len(self.members)}
        if self.encrypted:
            info["encrypted"] = True
        return info


# A room that does not exist, as `acl` sees it: invisible to everyone.
def missing(name: str) -> acl.View:
    return acl.View(room=name, visibility=acl.PRIVATE, role=None)


class RoomBook:
    """Writer thread only. At most `cache_rooms` rooms are kept; the rest are read again
    when next touched (the database is the truth, and only this thread writes it)."""

    def __init__(self, cache_rooms: int = 10_000) -> None:
        self._rooms: OrderedDict[str, RoomState] = OrderedDict()
        self._blocks: OrderedDict[int, set[int]] = OrderedDict()
        self.cache_rooms = cache_rooms
        # The names of every encrypted room, read once: each room message asks (the
        # server refuses plaintext there), and the room cache may not hold its room.
        self._encrypted: set[str] | None = None
        # Counts changes to what is held: a job that fails after changing something has
        # the book forgotten (Store._run_job), one refused before any change does not.
        self.changes = 0
        # Over a cluster (Store.order_with_others): takes a room's lock before it is read,
        # so that two nodes decide about one room one after the other.
        self.lock: Callable[[Connection, str], None] | None = None

    def forget(self) -> None:
        """A batch failed: what was changed in memory may not be in the database."""
        self._rooms.clear()
        self._blocks.clear()
        self._encrypted = None

    # --- reading --------------------------------------------------------------------
    def get(self, db: Connection, name: str) -> RoomState | None:
        room = self._rooms.get(name)
        if room is not None:
            self._rooms.move_to_end(name)
            return room
        if self.lock is not None:
            self.lock(db, name)
        row = db.execute(select(rooms_t).where(rooms_t.c.name == name)).first()
        if row is None:
            return None
        room = RoomState(row.name, row.visibility, row.history, row.topic, row.first_msg_id,
                         row.encrypted)
        for uid, uname, role, since in db.execute(
                select(members_t.c.user_id, users_t.c.username, members_t.c.role,
                       members_t.c.since_msg_id)
                .join(users_t, users_t.c.id == members_t.c.user_id)
                .where(members_t.c.room == name)):
            room.members[uid] = Member(uname, role, since)
        room.bans.update(db.execute(select(bans_t.c.user_id).where(bans_t.c.room == name))
                         .scalars())
        room.invites.update(db.execute(
            select(invites_t.c.user_id, invites_t.c.expires_ms)
            .where(invites_t.c.room == name)).all())
        self._keep(name, room)
        return room

    def encrypted(self, db: Connection, name: str) -> bool:
        if self._encrypted is None:
            self._encrypted = set(db.execute(
                select(rooms_t.c.name).where(rooms_t.c.encrypted.is_(True))).scalars())
        return name in self._encrypted

    def _keep(self, name: str, room: RoomState) -> None:
        self._rooms[name] = room
        while len(self._rooms) > self.cache_rooms:
            self._rooms.popitem(last=False)

    def blocked(self, db: Connection, user_id: int, by_id: int) -> bool:
        """Has `by_id` blocked `user_id`?"""
        blocked = self._blocks.get(by_id)
        if blocked is None:
            blocked = set(db.execute(select(blocks_t.c.blocked_id)
                                     .where(blocks_t.c.user_id == by_id)).scalars())
            self._blocks[by_id] = blocked
            while len(self._blocks) > self.cache_rooms:
                self._blocks.popitem(last=False)
        else:
            self._blocks.move_to_end(by_id)
        return user_id in blocked

    def banned_names(self, db: Connection, room: RoomState) -> list[str]:
        if not room.bans:
            return []
        names = db.execute(select(users_t.c.username).where(users_t.c.id.in_(room.bans))
                           ).scalars().all()
        return sorted(names, key=str.lower)

    # --- changing (inside the writer's transaction) ----------------------------------
    def create(self, db: Connection, name: str, visibility: str, history: str,
               first_msg_id: int, now_ms: int, encrypted: bool = False) -> RoomState:
        self.changes += 1
        db.execute(insert(rooms_t).values(name=name, visibility=visibility, history=history,
                                          topic="", created_ms=now_ms,
                                          first_msg_id=first_msg_id, encrypted=encrypted))
        room = RoomState(name, visibility, history, "", first_msg_id, encrypted)
        self._keep(name, room)
        if encrypted:
            self.encrypted(db, name)  # loaded before the new name goes in
            assert self._encrypted is not None
            self._encrypted.add(name)
        return room

    def add_member(self, db: Connection, room: RoomState, user_id: int, name: str,
                   role: str, since_msg_id: int, now_ms: int) -> None:
        self.changes += 1
        db.execute(insert(members_t).values(user_id=user_id, room=room.name, joined_ms=now_ms,
                                            role=role, since_msg_id=since_msg_id))
        room.members[user_id] = Member(name, role, since_msg_id)
        room.members_changed()
        if room.invites.pop(user_id, None) is not None:  # used up by the join
            db.execute(delete(invites_t).where(and_(invites_t.c.room == room.name,
                                                    invites_t.c.user_id == user_id)))

    def remove_member(self, db: Connection, room: RoomState, user_id: int) -> None:
        self.changes += 1
        db.execute(delete(members_t).where(and_(members_t.c.room == room.name,
                                                members_t.c.user_id == user_id)))
        room.members.pop(user_id, None)
        room.members_changed()

    def set_role(self, db: Connection, room: RoomState, user_id: int, role: str) -> None:
        self.changes += 1
        db.execute(update(members_t).where(and_(members_t.c.room == room.name,
                                                members_t.c.user_id == user_id))
                   .values(role=role))
        room.members[user_id].role = role
        room.members_changed()

    def invite(self, db: Connection, room: RoomState, user_id: int, by: str,
               expires_ms: int, cap: int) -> None:
        """Invite; past `cap` pending invitations, the user's oldest ones lapse (a user
        who is spammed can block the sender; an unbounded list would be everyone's cost)."""
        self.changes += 1
        db.execute(delete(invites_t).where(and_(invites_t.c.room == room.name,
                                                invites_t.c.user_id == user_id)))
        pending = db.execute(select(invites_t.c.room).where(invites_t.c.user_id == user_id)
                             .order_by(invites_t.c.expires_ms)).scalars().all()
        for old in pending[:max(0, len(pending) - cap + 1)]:
            db.execute(delete(invites_t).where(and_(invites_t.c.room == old,
                                                    invites_t.c.user_id == user_id)))
            cached = self._rooms.get(old)
            if cached is not None:
                cached.invites.pop(user_id, None)
        db.execute(insert(invites_t).values(room=room.name, user_id=user_id, by_name=by,
                                            expires_ms=expires_ms))
        room.invites[user_id] = expires_ms

    def ban(self, db: Connection, room: RoomState, user_id: int, by: str, reason: str,
            now_ms: int) -> None:
        self.changes += 1
        if user_id in room.bans:
            return
        db.execute(insert(bans_t).values(room=room.name, user_id=user_id, by_name=by,
                                         reason=reason, created_ms=now_ms))
        room.bans.add(user_id)
        if room.invites.pop(user_id, None) is not None:
            db.execute(delete(invites_t).where(and_(invites_t.c.room == room.name,
                                                    invites_t.c.user_id == user_id)))

    def unban(self, db: Connection, room: RoomState, user_id: int) -> None:
        self.changes += 1
        db.execute(delete(bans_t).where(and_(bans_t.c.room == room.name,
                                             bans_t.c.user_id == user_id)))
        room.bans.discard(user_id)

    def set_topic(self, db: Connection, room: RoomState, topic: str) -> None:
        self.changes += 1
        db.execute(update(rooms_t).where(rooms_t.c.name == room.name).values(topic=topic))
        room.topic = topic

    def set_history(self, db: Connection, room: RoomState, history: str) -> None:
        self.changes += 1
        db.execute(update(rooms_t).where(rooms_t.c.name == room.name).values(history=history))
        room.history = history

    def delete(self, db: Connection, room: RoomState) -> int:
        """The room, its members, bans, invitations and messages; how many messages."""
        self.changes += 1
        deleted = db.execute(delete(messages_t).where(messages_t.c.room == room.name)).rowcount
        for table in (members_t, bans_t, invites_t):
            db.execute(delete(table).where(table.c.room == room.name))
        db.execute(delete(rooms_t).where(rooms_t.c.name == room.name))
        self._rooms.pop(room.name, None)
        if self._encrypted is not None:
            self._encrypted.discard(room.name)
        return deleted

    def block(self, db: Connection, user_id: int, blocked_id: int, now_ms: int) -> None:
        self.changes += 1
        if self.blocked(db, blocked_id, user_id):
            return
        db.execute(insert(blocks_t).values(user_id=user_id, blocked_id=blocked_id,
                                           created_ms=now_ms))
        self._blocks[user_id].add(blocked_id)

    def unblock(self, db: Connection, user_id: int, blocked_id: int) -> None:
        self.changes += 1
        self.blocked(db, blocked_id, user_id)  # loads the set
        db.execute(delete(blocks_t).where(and_(blocks_t.c.user_id == user_id,
                                               blocks_t.c.blocked_id == blocked_id)))
        self._blocks[user_id].discard(blocked_id)


def audit(db: Connection, now_ms: int, actor: str, action: str, *, target: str | None = None,
          room: str | None = None, reason: str = "", detail: str = "") -> None:
    db.execute(insert(audit_t).values(ts_ms=now_ms, actor=actor, action=action, target=target,
                                      room=room, reason=reason, detail=detail))


def rooms_listed(db: Connection, user_id: int, now_ms: int,
                 limit: int) -> tuple[list[dict[str, Any]], bool]:
    """`list_rooms`: the public rooms (the fullest `limit` of them), and every private room
    the user is in or invited to, by name; each with its member count and the user's role
    (None where only invited). The flag says whether public rooms were left out."""
    mine = dict(db.execute(select(members_t.c.room, members_t.c.role)
                           .where(members_t.c.user_id == user_id)).all())
    invited = set(db.execute(select(invites_t.c.room).where(and_(
        invites_t.c.user_id == user_id, invites_t.c.expires_ms > now_ms))).scalars())
    counts = (select(members_t.c.room, func.count().label("n"))
              .group_by(members_t.c.room).subquery())
    n = func.coalesce(counts.c.n, 0)
    query = (select(rooms_t.c.name, rooms_t.c.topic, rooms_t.c.visibility, n,
                    rooms_t.c.encrypted)
             .outerjoin(counts, counts.c.room == rooms_t.c.name))
    public = db.execute(query.where(rooms_t.c.visibility == acl.PUBLIC)
                        .order_by(n.desc(), rooms_t.c.name).limit(limit + 1)).all()
    more = len(public) > limit
    own = db.execute(query.where(rooms_t.c.name.in_(set(mine) | invited))).all()
    # (Invitations are kept for private rooms only: a public room needs none.)
    rows = {row[0]: row for row in public[:limit] + own}
    listed = [{"room": name, "topic": topic, "members": count, "visibility": visibility,
               "role": mine.get(name), **({"encrypted": True} if encrypted else {})}
              for name, topic, visibility, count, encrypted in rows.values()]
    listed.sort(key=lambda r: r["room"])
    return listed, more

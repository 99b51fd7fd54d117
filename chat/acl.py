"""Who may do what in a room (protocol v1.1): pure rules over roles and room kinds.

Nothing here touches the database, a socket or a thread: the store's writer thread asks
these functions about the room state it holds, in request order, and they answer by
returning or by raising the `ChatError` the protocol names. So the whole permission table
is tested here, alone (tests/test_acl.py).

Roles, highest first: owner, moderator, member; `None` is not a member. One may act only
on someone of a lower role; nobody acts on an equal (owner disputes are the operator's).
A private room is invisible to whoever is neither a member nor invited: every request
about it gets `no_such_room`, exactly as a room that does not exist. `general` has no
owner, everyone is in it, and only the operator moderates it.
"""

from __future__ import annotations

from dataclasses import dataclass

from chat.errors import Banned, Forbidden, LastOwner, NoSuchRoom, NotInRoom

OWNER, MODERATOR, MEMBER = "owner", "moderator", "member"
ROLES = (OWNER, MODERATOR, MEMBER)
_RANK = {MEMBER: 1, MODERATOR: 2, OWNER: 3}
PUBLIC, PRIVATE = "public", "private"
SHARED, JOINED = "shared", "joined"
GENERAL = "general"


def rank(role: str | None) -> int:
    return _RANK.get(role, 0) if role is not None else 0


@dataclass(frozen=True, slots=True)
class View:
    """One user's standing in one room, as the writer knows it."""

    room: str
    visibility: str
    role: str | None  # the user's role, None if not a member
    invited: bool = False
    banned: bool = False
    owners: int = 0  # how many owners the room has
    members: int = 0  # how many members

    @property
    def member(self) -> bool:
        return self.role is not None

    @property
    def private(self) -> bool:
        return self.visibility == PRIVATE


def visible(v: View) -> None:
    """A private room exists for its members and the invited only."""
    if v.private and not (v.member or v.invited):
        raise NoSuchRoom()


def member(v: View) -> None:
    """Requests that need membership: who, members, room_info, history, send."""
    visible(v)
    if not v.member:
        raise NotInRoom()


def join(v: View) -> None:
    """May this user join (the room exists)? Returns for a member too (nothing to do)."""
    if v.member:
        return
    if v.private:
        if not v.invited or v.banned:
            raise NoSuchRoom()  # a banned user learns no more than anyone else
        return
    if v.banned:
        raise Banned()


def leave(v: View) -> None:
    member(v)
    if v.room == GENERAL:
        raise Forbidden("everyone is in general; it cannot be left")
    if v.role == OWNER and v.owners == 1 and v.members > 1:
        raise LastOwner()


def _moderate(v: View, least: str) -> None:
    member(v)
    if v.room == GENERAL:
        raise Forbidden("only the operator moderates general")
    if rank(v.role) < rank(least):
        raise Forbidden(f"that needs {'an' if least == OWNER else 'a'} {least} of the room")


def invite(v: View, target: View) -> None:
    """`v` invites someone whose standing in the same room is `target`."""
    member(v)
    if v.room == GENERAL:
        raise Forbidden("everyone is in general already")
    if v.private and rank(v.role) < rank(MODERATOR):
        raise Forbidden("in a private room, moderators and owners invite")
    if target.banned:
        raise Banned("that user is banned from the room")


def act_on(v: View, target: View, least: str = MODERATOR) -> None:
    """kick, ban, unban: a moderator or more, on someone of a lower role (or none)."""
    _moderate(v, least)
    if rank(target.role) >= rank(v.role):
        raise Forbidden("you may act only on someone of a lower role")


def kick(v: View, target: View) -> None:
    act_on(v, target)
    if not target.member:
        raise NotInRoom("that user is not in the room")


def topic(v: View) -> None:
    _moderate(v, MODERATOR)


def set_history(v: View) -> None:
    _moderate(v, OWNER)


def set_role(v: View, target: View, role: str, *, yourself: bool) -> None:
    """An owner makes anyone of a lower role anything, and may step down unless last."""
    _moderate(v, OWNER)
    if yourself:
        if role != OWNER and v.owners == 1:  # the room would be left without an owner
            raise LastOwner()
        return
    if not target.member:
        raise NotInRoom("that user is not in the room")
    if rank(target.role) >= rank(v.role):
        raise Forbidden("nobody acts on an equal: owner disputes are for the operator")

"""The permission table of protocol v1.1, rule by rule (chat.acl, alone)."""

from __future__ import annotations

import itertools

import pytest

from chat import acl
from chat.errors import Banned, Forbidden, LastOwner, NoSuchRoom, NotInRoom

ROLES = [acl.OWNER, acl.MODERATOR, acl.MEMBER, None]
KINDS = [acl.PUBLIC, acl.PRIVATE]


def view(role, kind=acl.PUBLIC, room="dev", **kw):
    return acl.View(room, kind, role, **kw)


def outcome(fn, *args, **kw):
    try:
        fn(*args, **kw)
    except (Banned, Forbidden, LastOwner, NoSuchRoom, NotInRoom) as exc:
        return exc.code
    return "ok"


# What a non-member sees of a room: a private one does not exist for them.
@pytest.mark.parametrize(("kind", "invited", "expected"), [
    (acl.PUBLIC, False, "not_in_room"), (acl.PRIVATE, False, "no_such_room"),
    (acl.PUBLIC, True, "not_in_room"), (acl.PRIVATE, True, "not_in_room"),
])
def test_requests_that_need_membership(kind, invited, expected):
    assert outcome(acl.member, view(None, kind, invited=invited)) == expected
    assert outcome(acl.member, view(acl.MEMBER, kind)) == "ok"


@pytest.mark.parametrize(("kind", "invited", "banned", "expected"), [
    (acl.PUBLIC, False, False, "ok"),
    (acl.PUBLIC, False, True, "banned"),
    (acl.PRIVATE, False, False, "no_such_room"),
    (acl.PRIVATE, True, False, "ok"),
    (acl.PRIVATE, False, True, "no_such_room"),  # a banned user learns no more than others
    (acl.PRIVATE, True, True, "no_such_room"),
])
def test_join(kind, invited, banned, expected):
    assert outcome(acl.join, view(None, kind, invited=invited, banned=banned)) == expected


def _expected_act(actor, target):
    if actor is None:
        return None  # filled in by the room kind
    if acl.rank(actor) < acl.rank(acl.MODERATOR):
        return "forbidden"
    if acl.rank(target) >= acl.rank(actor):
        return "forbidden"
    return "ok"


@pytest.mark.parametrize(("actor", "target", "kind"),
                         list(itertools.product(ROLES, ROLES, KINDS)))
def test_kick_ban_unban(actor, target, kind):
    expected = _expected_act(actor, target)
    if actor is None:
        expected = "no_such_room" if kind == acl.PRIVATE else "not_in_room"
    ban = outcome(acl.act_on, view(actor, kind), view(target, kind))
    assert ban == expected
    kick = outcome(acl.kick, view(actor, kind), view(target, kind))
    assert kick == ("not_in_room" if expected == "ok" and target is None else expected)


@pytest.mark.parametrize(("actor", "target", "kind"),
                         list(itertools.product(ROLES, ROLES, KINDS)))
def test_set_role_of_another(actor, target, kind):
    got = outcome(acl.set_role, view(actor, kind, owners=2, members=3), view(target, kind),
                  acl.MODERATOR, yourself=False)
    if actor is None:
        assert got == ("no_such_room" if kind == acl.PRIVATE else "not_in_room")
    elif actor != acl.OWNER:
        assert got == "forbidden"
    elif target is None:
        assert got == "not_in_room"
    elif target == acl.OWNER:
        assert got == "forbidden"  # nobody acts on an equal
    else:
        assert got == "ok"


def test_an_owner_steps_down_unless_last():
    assert outcome(acl.set_role, view(acl.OWNER, owners=2, members=3), view(acl.OWNER),
                   acl.MEMBER, yourself=True) == "ok"
    assert outcome(acl.set_role, view(acl.OWNER, owners=1, members=3), view(acl.OWNER),
                   acl.MEMBER, yourself=True) == "last_owner"
    assert outcome(acl.set_role, view(acl.OWNER, owners=1, members=1), view(acl.OWNER),
                   acl.MODERATOR, yourself=True) == "last_owner"


@pytest.mark.parametrize(("actor", "kind"), list(itertools.product(ROLES, KINDS)))
def test_topic_and_history_settings(actor, kind):
    topic = outcome(acl.topic, view(actor, kind))
    history = outcome(acl.set_history, view(actor, kind))
    if actor is None:
        absent = "no_such_room" if kind == acl.PRIVATE else "not_in_room"
        assert topic == history == absent
        return
    assert topic == ("ok" if acl.rank(actor) >= acl.rank(acl.MODERATOR) else "forbidden")
    assert history == ("ok" if actor == acl.OWNER else "forbidden")


@pytest.mark.parametrize(("actor", "kind"), list(itertools.product(ROLES, KINDS)))
def test_invite(actor, kind):
    got = outcome(acl.invite, view(actor, kind), view(None, kind))
    if actor is None:
        assert got == ("no_such_room" if kind == acl.PRIVATE else "not_in_room")
    elif kind == acl.PRIVATE and actor == acl.MEMBER:
        assert got == "forbidden"
    else:
        assert got == "ok"
    if actor is not None and got == "ok":
        assert outcome(acl.invite, view(actor, kind), view(None, kind, banned=True)) == "banned"


def test_leave_keeps_an_owner_while_there_are_members():
    assert outcome(acl.leave, view(acl.OWNER, owners=1, members=2)) == "last_owner"
    assert outcome(acl.leave, view(acl.OWNER, owners=1, members=1)) == "ok"  # empties it
    assert outcome(acl.leave, view(acl.OWNER, owners=2, members=2)) == "ok"
    assert outcome(acl.leave, view(acl.MEMBER, owners=1, members=2)) == "ok"
    assert outcome(acl.leave, view(None, acl.PRIVATE)) == "no_such_room"


def test_general_is_the_operators():
    for role in (acl.OWNER, acl.MODERATOR, acl.MEMBER):
        g = view(role, room=acl.GENERAL)
        assert outcome(acl.leave, g) == "forbidden"
        assert outcome(acl.topic, g) == "forbidden"
        assert outcome(acl.act_on, g, view(None, room=acl.GENERAL)) == "forbidden"
        assert outcome(acl.invite, g, view(None, room=acl.GENERAL)) == "forbidden"

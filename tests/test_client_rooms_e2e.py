"""The v1.1 room commands against the real server (issue 17, item 6): the library's
methods, line mode's transcript, and the interactive prompt on a pseudo-terminal.

The parsing, hints and rendering are tested without a server in
tests/test_client_roomcommands.py; here each test checks what a user of the client sees
when the server really does it.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest

from chat.client import ChatClient, raise_for_error
from tests.test_client_cli import run_cli, server_args
from tests.test_client_linemode import WAIT, ended, piped, session, typed
from tests.test_client_screen import CLOCK, TAB, interactive, new_name


def new_room(prefix: str = "r") -> str:
    return prefix + uuid.uuid4().hex[:10]


def events_until(client: ChatClient, kind: str) -> dict[str, Any]:
    for frame in client.events(timeout=WAIT):
        if frame.get("type") == kind:
            return frame
    raise AssertionError(f"the connection ended before a {kind!r} event")


def test_the_library_has_a_method_for_each_request(chat_server: Any) -> None:
    owner, guest, room = new_name(), new_name(), new_room()
    chat_server.register(owner)
    chat_server.register(guest)
    with session(chat_server, owner) as alice, session(chat_server, guest) as bob:
        created = alice.create(room, "private", timeout=WAIT)
        assert (created["type"], created["op"], created["room"]) == ("ok", "create", room)
        assert alice.create(room, timeout=WAIT)["code"] == "room_taken"
        raise_for_error(alice.invite(room, guest, WAIT))
        assert events_until(bob, "invited") == {"type": "invited", "room": room, "by": owner}
        listed = raise_for_error(bob.list_rooms(WAIT))["rooms"]
        assert {"room": room, "topic": "", "members": 1, "visibility": "private",
                "role": None} in listed
        raise_for_error(bob.join(room, WAIT))
        raise_for_error(alice.set_role(room, guest, "moderator", WAIT))
        assert events_until(bob, "role")["role"] == "moderator"
        raise_for_error(alice.set_topic(room, "plans", WAIT))
        assert events_until(bob, "room")["topic"] == "plans"
        raise_for_error(alice.set_history(room, "shared", WAIT))
        info = raise_for_error(bob.room_info(room, WAIT))
        assert (info["history"], info["role"], info["members"]) == ("shared", "moderator", 2)
        members = raise_for_error(alice.members(room, WAIT))["members"]
        assert [(m["username"], m["role"]) for m in members] == sorted(
            [(owner, "owner"), (guest, "moderator")], key=lambda m: m[0].lower())
        raise_for_error(alice.set_role(room, guest, "member", WAIT))
        raise_for_error(alice.kick(room, guest, "a test", WAIT))
        removed = events_until(bob, "removed")
        assert (removed["how"], removed["by"], removed["reason"]) == ("kick", owner, "a test")
        raise_for_error(alice.invite(room, guest, WAIT))
        raise_for_error(bob.join(room, WAIT))
        raise_for_error(alice.ban(room, guest, timeout=WAIT))  # no reason: optional
        assert events_until(bob, "removed")["how"] == "ban"
        assert alice.invite(room, guest, WAIT)["code"] == "banned"
        raise_for_error(alice.unban(room, guest, WAIT))
        raise_for_error(bob.block(owner, WAIT))
        assert alice.direct(guest, "hello?", WAIT)["code"] == "blocked"
        raise_for_error(bob.unblock(owner, WAIT))
        assert alice.direct(guest, "hello!", WAIT)["type"] == "message"


def test_line_mode_runs_the_owners_commands_and_explains_refusals(chat_server: Any) -> None:
    me, other, room = new_name(), new_name(), new_room("lab")
    chat_server.register(me)
    chat_server.register(other)
    with session(chat_server, me) as mine, session(chat_server, other) as guest:
        raise_for_error(mine.create(room, "private", timeout=WAIT))
        raise_for_error(mine.invite(room, other, WAIT))
        raise_for_error(guest.join(room, WAIT))
    script = "\n".join([
        f"/role {other} moderator",
        f"/kick {other} #{room} not yet",  # an owner acts on a moderator
        "/topic Deploy on Friday",
        "/info",
        f"/create {room}",  # taken
        "/sethistory shared",
        "/members",
        "/rooms",
        f"/block {other}",
        f"/unblock {other}",
        "",
    ])
    result = run_cli("login", *server_args(chat_server, me), "--recent", "0",
                     "--room", f"#{room}", input=script)
    out, err = result.stdout.splitlines(), result.stderr.splitlines()
    assert result.returncode == 0, result.stderr
    assert f"-- you kicked {other} from #{room}" in out
    # One line for each change the server announces: its event's, not the ok's too.
    assert f"-- you made {other} moderator in #{room}" in out
    assert not any(line.startswith("-- ok: set_") or line.startswith("-- ok: topic")
                   for line in out), out
    assert f"-- you set the topic of #{room}: Deploy on Friday" in out
    assert f"-- #{room}: private, history joined (members read only what came after they " \
           "joined), 1 member, you are owner" in out
    assert "-- topic: Deploy on Friday" in out
    assert any(line.startswith("! error room_taken") for line in err), err
    assert f"-- #{room} exists already: /join #{room}, or /create another name" in err
    assert f"-- you made #{room}'s history shared (members read all of it)" in out
    assert f"-- members of #{room}: 1, 1 online" in out
    assert f"   owner     {me} (online)" in out
    rooms = out.index(f"-- rooms: #general *#{room} (* current)")
    assert any(line.startswith(f"   #{room}") and "owner" in line and "Deploy on Friday" in line
               for line in out[rooms:]), out
    assert f"-- you blocked {other}: no direct messages or invitations from them" in out
    assert f"-- you unblocked {other}" in out


def test_the_last_owner_is_told_how_to_leave(chat_server: Any) -> None:
    me, other, room = new_name(), new_name(), new_room("lab")
    chat_server.register(me)
    chat_server.register(other)
    with session(chat_server, me) as mine, session(chat_server, other) as guest:
        raise_for_error(mine.create(room, timeout=WAIT))
        raise_for_error(guest.join(room, WAIT))
    result = run_cli("login", *server_args(chat_server, me), "--recent", "0",
                     "--room", room, input=f"/leave\n/role {other} owner\n/leave\n")
    err = result.stderr.splitlines()
    assert any(line.startswith("! error last_owner") for line in err), err
    assert f"-- #{room} must keep an owner: make someone else owner first (/role USER owner " \
           f"#{room}), then try again" in err
    assert f"-- ok: leave #{room}" in result.stdout.splitlines()
    assert result.returncode == 0, result.stderr


def test_a_kicked_user_is_told_by_whom_and_why_and_talks_on_elsewhere(chat_server: Any) -> None:
    me, owner, room = new_name(), new_name(), new_room("ops")
    chat_server.register(me)
    chat_server.register(owner)
    with session(chat_server, owner) as alice, piped(chat_server, me) as (proc, out, err):
        out.wait_for(lambda line: line.startswith("-- logged in as"), "logged in")
        raise_for_error(alice.create(room, "private", timeout=WAIT))
        raise_for_error(alice.invite(room, me, WAIT))  # to the sessions online: ours
        out.wait_for(lambda line: line == f"-- {owner} invited you to #{room}: /join #{room} "
                     "to accept", "the invitation")
        typed(proc, f"/join #{room}")
        out.wait_for(lambda line: line == f"-- ok: join #{room}", "joined")
        typed(proc, "in the room")
        out.wait_for(lambda line: line.endswith(f"#{room} {me}: in the room"), "said")
        raise_for_error(alice.kick(room, me, "wrong room", WAIT))
        out.wait_for(lambda line: line == f"-- {owner} kicked you from #{room}: wrong room",
                     "the kick")
        err.wait_for(lambda line: line == "-- now talking in #general", "moved on")
        typed(proc, "back in general")  # goes to general, not refused in the room
        out.wait_for(lambda line: line.endswith(f"#general {me}: back in general"), "general")
        raise_for_error(alice.ban(room, me, "for good", WAIT))  # not in it: no event
        typed(proc, f"/join #{room}")
        err.wait_for(lambda line: line.startswith("! error no_such_room"), "banned: outsider")
        err.wait_for(lambda line: "a private room needs an invitation" in line, "the hint")
        assert ended(proc, err) == 0, err.lines
    assert not any("not_in_room" in line for line in err.lines), err.lines


def test_the_prompt_shows_the_role_and_a_kick_takes_the_room_away(
    chat_server: Any, tmp_path: Path
) -> None:
    me, other, room = new_name(), new_name(), new_room("dev")
    chat_server.register(me)
    peer = chat_server.user(other)
    try:
        with interactive(chat_server, me, tmp_path, "--recent", "0") as term:
            term.wait_for_input("[general]> ")
            term.send(f"/create {room}\r")
            term.wait_for_input(f"[{room} owner]> ")
            assert peer.request({"type": "join", "room": room})["type"] == "ok"
            term.wait_for_line(rf"^{CLOCK} -- {other} joined #{room}$")
            term.send(f"/role {other[:6]}" + TAB)  # a member of the room, from presence
            term.wait_for_input(f"[{room} owner]> ", f"/role {other} ")
            term.send("owner\r")
            term.wait_for_line(rf"^-- you made {other} owner in #{room}$")
            term.send(f"/role {me} moderator\r")  # an owner may step down
            term.wait_for_line(rf"^-- you stepped down to moderator in #{room}$")
            term.wait_for_input(f"[{room} moderator]> ")
            assert not any(line.startswith("-- ok: set_role") for line in term.lines())
            reply = peer.request({"type": "topic", "room": room, "topic": "plans"})
            assert reply["type"] == "ok", reply
            term.wait_for_line(rf"^-- {other} set the topic of #{room}: plans$")
            reply = peer.request({"type": "set_history", "room": room, "history": "joined"})
            assert reply["type"] == "ok", reply
            term.wait_for_line(rf"^-- {other} made #{room}'s history joined \(members read "
                               r"only what came after they joined\)$")
            term.send("/switch general\r")
            term.wait_for_input("[general]> ")
            term.send(f"/switch {room}\r")
            term.wait_for_input(f"[{room} moderator]> ")  # remembered for the room
            reply = peer.request({"type": "ban", "room": room, "username": me,
                                  "reason": "enough"})
            assert reply["type"] == "ok", reply
            term.wait_for_line(rf"^-- {other} banned you from #{room}: enough \(you cannot "
                               r"rejoin until unbanned\)$")
            term.wait_for_line(r"^-- now talking in #general$")
            term.wait_for_input("[general]> ")
            term.send(f"/join {room}\r")
            term.wait_for_line(r"^! error banned")
            term.wait_for_line(rf"^-- you are banned from #{room}; only its moderators can "
                               r"lift that \(/unban\)$")
            term.wait_for_input("[general]> ")
            assert term.quit() == 0
    finally:
        peer.close()


def test_tab_completes_a_user_online_before_login_in_another_room(
    chat_server: Any, tmp_path: Path
) -> None:
    # Online in #general only, before we log in to start in another room: the roster
    # thread's `who` of our other rooms finds them (the banner asks only the current one).
    me, other, room = new_name(), new_name(), new_room("dev")
    chat_server.register(me)
    peer = chat_server.user(other)
    try:
        with interactive(chat_server, me, tmp_path, "--room", room, "--recent", "0") as term:
            term.wait_for_input(f"[{room} owner]> ")
            term.send(f"/msg {other[:6]}" + TAB)
            term.wait_for_input(f"[{room} owner]> ", f"/msg {other} ")
            term.send("\x15")  # Ctrl-U: clear the line
            term.wait_for_input(f"[{room} owner]> ")
            assert term.quit() == 0
    finally:
        peer.close()


def test_a_join_that_made_the_room_is_said_in_line_mode_and_with_room(
    chat_server: Any,
) -> None:
    # The server adds `"created": true` to a join's ok when the join made the room; one
    # that does not (yet) cannot be told from a plain join, so there is nothing to test.
    me, typo, other = new_name(), new_room("typo"), new_room("start")
    chat_server.register(me)
    with session(chat_server, me) as probe:
        if "created" not in raise_for_error(probe.join(new_room("probe"), WAIT)):
            pytest.skip("this server's join reply does not say `created`")
    result = run_cli("login", *server_args(chat_server, me), "--recent", "0",
                     "--room", other, input=f"/join #{typo}\n/join #{other}\n")
    assert result.returncode == 0, result.stderr
    err = result.stderr.splitlines()
    for room in (other, typo):
        note = (f"-- #{room} did not exist: you made it, a public room you own "
                f"(/leave #{room} if that was a typo)")
        assert err.count(note) == 1, err  # not again for the second join of `other`

"""The v1.1 room commands (issue 17, item 6): parsing, hints, rendering, completion.

Pure: no server. The end-to-end tests against the real server are in
tests/test_client_rooms_e2e.py.
"""

from __future__ import annotations

import re

import pytest
from prompt_toolkit.completion import CompleteEvent
from prompt_toolkit.document import Document

from chat.client.commands import (
    NO_ROOM,
    ChatState,
    Invalid,
    Notice,
    Request,
    explain,
    parse_command,
)
from chat.client.completion import ChatCompleter, Roster
from chat.client.format import bye_text, format_event
from chat.client.reconnect import Seen, should_reconnect
from chat.client.roomcommands import ROOM_RULE, USAGE, about_the_asker


def request(line: str, room: str | None = "dev") -> dict[str, object]:
    action = parse_command(line, room)
    assert isinstance(action, Request), action
    return action.frame


@pytest.mark.parametrize(("line", "frame"), [
    ("/create lab", {"type": "create", "room": "lab"}),
    ("/create #lab private", {"type": "create", "room": "lab", "visibility": "private"}),
    ("/create lab joined PUBLIC",
     {"type": "create", "room": "lab", "history": "joined", "visibility": "public"}),
    ("/invite bob", {"type": "invite", "room": "dev", "username": "bob"}),
    ("/invite bob #ops", {"type": "invite", "room": "ops", "username": "bob"}),
    ("/invite bob ops", {"type": "invite", "room": "ops", "username": "bob"}),
    ("/kick bob", {"type": "kick", "room": "dev", "username": "bob"}),
    # Free text after the user: a room only with its `#`, so a reason is never a room.
    ("/kick bob spamming links", {"type": "kick", "room": "dev", "username": "bob",
                                  "reason": "spamming links"}),
    ("/kick bob #ops spamming", {"type": "kick", "room": "ops", "username": "bob",
                                 "reason": "spamming"}),
    ("/ban bob #ops", {"type": "ban", "room": "ops", "username": "bob"}),
    ("/ban bob  for good ", {"type": "ban", "room": "dev", "username": "bob",
                             "reason": "for good"}),
    ("/unban bob", {"type": "unban", "room": "dev", "username": "bob"}),
    ("/unban bob #ops", {"type": "unban", "room": "ops", "username": "bob"}),
    ("/role bob moderator", {"type": "set_role", "room": "dev", "username": "bob",
                             "role": "moderator"}),
    ("/role bob mod #ops", {"type": "set_role", "room": "ops", "username": "bob",
                            "role": "moderator"}),
    ("/role me.2 Owner ops", {"type": "set_role", "room": "ops", "username": "me.2",
                              "role": "owner"}),
    ("/topic Deploy on Friday", {"type": "topic", "room": "dev",
                                 "topic": "Deploy on Friday"}),
    ("/topic #ops Deploy #2 today", {"type": "topic", "room": "ops",
                                     "topic": "Deploy #2 today"}),
    ("/topic -", {"type": "topic", "room": "dev", "topic": ""}),
    ("/topic #ops -", {"type": "topic", "room": "ops", "topic": ""}),
    ("/topic", {"type": "room_info", "room": "dev"}),
    ("/topic #ops", {"type": "room_info", "room": "ops"}),
    ("/sethistory joined", {"type": "set_history", "room": "dev", "history": "joined"}),
    ("/sethistory SHARED #ops", {"type": "set_history", "room": "ops", "history": "shared"}),
    ("/info", {"type": "room_info", "room": "dev"}),
    ("/info #ops", {"type": "room_info", "room": "ops"}),
    ("/members", {"type": "members", "room": "dev"}),
    ("/members ops", {"type": "members", "room": "ops"}),
    ("/rooms", {"type": "list_rooms"}),
    ("/block spammer", {"type": "block", "username": "spammer"}),
    ("/unblock spammer", {"type": "unblock", "username": "spammer"}),
])
def test_each_command_makes_its_request(line: str, frame: dict[str, object]) -> None:
    assert request(line) == frame


@pytest.mark.parametrize(("line", "usage"), [
    ("/create", "create"), ("/create lab secret", "create"),
    ("/create lab private public", "create"),
    ("/invite", "invite"), ("/invite #dev bob", "invite"), ("/invite bob dev ops", "invite"),
    ("/kick", "kick"), ("/kick #dev bob", "kick"), ("/kick bob #no/such", "kick"),
    ("/ban x", "ban"),  # too short for a user name: not one
    ("/unban", "unban"), ("/role bob", "role"), ("/role bob admin", "role"),
    ("/role bob owner dev ops", "role"), ("/topic #a/b text", "topic"),
    ("/sethistory", "sethistory"), ("/sethistory all", "sethistory"),
    ("/info a b", "info"), ("/members #a/b", "members"),
    ("/block", "block"), ("/block a b", "block"), ("/unblock", "unblock"),
])
def test_a_misplaced_word_gets_the_usage(line: str, usage: str) -> None:
    assert parse_command(line, "dev") == Invalid(USAGE[usage])


@pytest.mark.parametrize("name", ["ünï", "a" * 72, "a#b", "a/b"])
def test_create_says_the_naming_rule_for_a_name_that_cannot_be_a_room(name: str) -> None:
    refusal = parse_command(f"/create {name}", "dev")
    assert refusal == Invalid(f"{ROOM_RULE}, not {name}; {USAGE['create']}")
    assert "1 to 32" in ROOM_RULE and "_ and -" in ROOM_RULE


def in_rooms(line: str, *rooms: str, current: str = "general") -> object:
    state = ChatState.start(current, rooms)
    return parse_command(line, state.room, state=state)


@pytest.mark.parametrize(("line", "meant"), [
    ("/ban bob dev rude", "/ban bob #dev rude"),
    ("/kick bob Dev", "/kick bob #Dev"),
    ("/topic dev release friday", "/topic #dev release friday"),
    ("/topic dev", "/topic #dev"),
])
def test_a_room_written_without_its_hash_before_free_text_is_refused(
    line: str, meant: str,
) -> None:
    room = meant.split("#")[1].split()[0]
    assert in_rooms(line, "dev") == Invalid(
        f"did you mean #{room}? write the room with its #: {meant}")


def test_free_text_may_start_with_a_room_name_when_the_room_is_given() -> None:
    assert in_rooms("/ban bob #general dev rude", "dev") == Request(
        {"type": "ban", "room": "general", "username": "bob", "reason": "dev rude"})
    assert in_rooms("/topic #general dev news", "dev") == Request(
        {"type": "topic", "room": "general", "topic": "dev news"})
    # A word that names no room of the user's is just text.
    assert in_rooms("/kick bob ops spam", "dev") == Request(
        {"type": "kick", "room": "general", "username": "bob", "reason": "ops spam"})


def test_with_no_current_room_a_room_must_be_named() -> None:
    for line in ("/invite bob", "/kick bob", "/topic hello", "/info", "/members",
                 "/sethistory joined", "/role bob owner", "/unban bob"):
        assert parse_command(line, None) == Notice(NO_ROOM), line
    assert request("/kick bob #ops", None)["room"] == "ops"
    assert request("/rooms", None) == {"type": "list_rooms"}


# -- hints --------------------------------------------------------------------------------------


def error(code: str) -> dict[str, object]:
    return {"type": "error", "code": code, "message": "server text", "re": 1}


@pytest.mark.parametrize(("line", "code", "hint"), [
    ("/leave dev", "last_owner", "make someone else owner first (/role USER owner #dev)"),
    ("/role alice member", "last_owner", "/role USER owner #dev"),
    ("/join dev", "banned", "you are banned from #dev"),
    ("/invite bob", "banned", "/unban bob #dev first"),
    ("/kick bob", "forbidden", "only moderators and owners of #dev"),
    ("/role bob owner", "forbidden", "only an owner of #dev"),
    ("/topic #general hi", "forbidden", "#general is moderated by the server's operator"),
    ("/info #secret", "no_such_room", "a private room needs an invitation"),
    ("/create dev", "room_taken", "#dev exists already: /join #dev"),
    ("/msg bob hi", "blocked", "bob does not take direct messages from you"),
    ("/invite bob", "blocked", "bob does not take invitations from you"),
    ("/members #ops", "not_in_room", "/join #ops first"),
])
def test_v11_refusals_say_what_helps(line: str, code: str, hint: str) -> None:
    note = explain(request(line), error(code))
    assert note is not None and hint in note, note


def test_no_hint_where_none_helps_and_a_kick_refusal_is_not_about_the_asker() -> None:
    # "everyone is in general already": the operator-only hint would not fit.
    assert explain(request("/invite bob", "general"), error("forbidden")) is None
    assert explain(request("/kick bob"), error("no_such_user")) is None
    assert explain(request("/kick bob"), {"type": "ok", "op": "kick"}) is None
    # `not_in_room` to a kick may be about bob: it proves nothing of our membership.
    assert not about_the_asker(request("/kick bob"), error("not_in_room"))
    assert about_the_asker(request("/who"), error("not_in_room"))


def test_a_hint_shows_a_typed_name_inert() -> None:
    frame = {"type": "create", "room": "dev\x1b[2J"}
    note = explain(frame, error("room_taken"))
    assert note is not None and "\x1b" not in note and "\\x1b[2J" in note


# -- what is shown ------------------------------------------------------------------------------


def show(frame: dict[str, object], **kwargs: object) -> str:
    text = format_event(frame, me="me", **kwargs)  # type: ignore[arg-type]
    assert text is not None
    return text


def test_events_say_who_did_what_and_what_to_do() -> None:
    assert show({"type": "invited", "room": "secret", "by": "alice"}) == (
        "-- alice invited you to #secret: /join #secret to accept")
    assert show({"type": "removed", "room": "dev", "by": "alice", "how": "kick",
                 "reason": "spam\x1b[2J"}) == "-- alice kicked you from #dev: spam\\x1b[2J"
    assert show({"type": "removed", "room": "dev", "by": "alice", "how": "ban",
                 "reason": ""}) == (
        "-- alice banned you from #dev (you cannot rejoin until unbanned)")
    assert show({"type": "role", "room": "dev", "username": "bob", "role": "moderator",
                 "by": "alice"}) == "-- alice made bob moderator in #dev"
    assert show({"type": "role", "room": "dev", "username": "Me", "role": "owner",
                 "by": "alice"}) == "-- alice made you owner in #dev"
    assert show({"type": "role", "room": "dev", "username": "me", "role": "member",
                 "by": "me"}) == "-- you stepped down to member in #dev"
    assert show({"type": "role", "room": "dev", "username": "alice", "role": "moderator",
                 "by": "Alice"}) == "-- alice stepped down to moderator in #dev"
    # A server that does not say who, or what changed: what the room is now.
    assert show({"type": "room", "room": "dev", "visibility": "public", "history": "joined",
                 "topic": "Friday", "role": "owner", "members": 3}) == (
        "-- #dev is now: topic: Friday; history joined "
        "(members read only what came after they joined)")


def test_info_and_rooms_say_which_rooms_are_encrypted() -> None:
    info = show({"type": "room", "room": "dev", "visibility": "private", "history": "joined",
                 "topic": "", "role": "owner", "members": 2, "encrypted": True, "re": 1})
    assert info.startswith("-- #dev: private, end-to-end encrypted, history joined")
    rooms = show({"type": "rooms", "rooms": [
        {"room": "dev", "topic": "", "members": 2, "visibility": "private", "role": "owner",
         "encrypted": True}], "re": 2})
    assert "private encrypted" in rooms


ROOM_EVENT = {"type": "room", "room": "dev", "visibility": "public", "history": "joined",
              "topic": "release friday", "role": "member", "members": 3, "by": "carol"}


def test_a_room_event_says_who_changed_what() -> None:
    assert show(ROOM_EVENT, changed=frozenset({"topic"})) == (
        "-- carol set the topic of #dev: release friday")
    assert show({**ROOM_EVENT, "topic": ""}, changed=frozenset({"topic"})) == (
        "-- carol cleared the topic of #dev")
    assert show({**ROOM_EVENT, "by": "me"}, changed=frozenset({"history"})) == (
        "-- you made #dev's history joined (members read only what came after they joined)")
    assert show({**ROOM_EVENT, "by": "operator"}, changed=frozenset({"topic"})) == (
        "-- the operator set the topic of #dev: release friday")
    assert show(ROOM_EVENT) == (  # not known what changed
        "-- carol changed #dev; #dev is now: topic: release friday; history joined "
        "(members read only what came after they joined)")


def test_the_state_knows_which_setting_a_room_event_changed() -> None:
    state = ChatState.start("dev", ["general", "dev"])
    assert state.changes(ROOM_EVENT, "me") is None  # nothing known of #dev yet
    state.observe({**ROOM_EVENT, "re": 3, "topic": "old"}, "me")  # an /info reply
    assert state.changes(ROOM_EVENT, "me") == {"topic"}
    state.observe(ROOM_EVENT, "me")
    assert state.changes({**ROOM_EVENT, "history": "shared"}, "me") == {"history"}
    # This session's own request says it, even where the settings were not known.
    state = ChatState.start("dev", ["general", "dev"])
    state.asking({"type": "set_history", "room": "Dev", "history": "joined"})
    assert state.changes({**ROOM_EVENT, "by": "me"}, "me") == {"history"}
    assert state.echoed({"type": "ok", "op": "set_history", "room": "dev", "re": 2}, "me")


def test_the_ok_of_an_announced_change_is_not_shown_again() -> None:
    state = ChatState.start("dev", ["general", "dev"])
    asked = {"type": "set_role", "room": "dev", "username": "Bob", "role": "moderator"}
    ok = {"type": "ok", "op": "set_role", "room": "dev", "username": "bob",
          "role": "moderator", "re": 7}
    state.asking(asked)
    assert not state.echoed({"type": "role", "room": "dev", "username": "bob",
                             "role": "moderator", "by": "me"}, "me")
    assert state.echoed(ok, "me")  # "-- you made bob moderator in #dev" said it
    # A role bob held already: no event, so the ok says it.
    state.asking(asked)
    assert not state.echoed(ok, "me")
    assert show(ok) == "-- bob is moderator in #dev"
    # A refused request leaves nothing behind for a later ok.
    state.asking({"type": "topic", "room": "dev", "topic": "x"})
    state.forget({"type": "topic", "room": "dev", "topic": "x"})
    assert state.changes({**ROOM_EVENT, "by": "me"}, "me") is None


@pytest.mark.parametrize(("ok", "line"), [
    ({"op": "passwd"}, "-- password changed; your other sessions stay logged in"),
    ({"op": "kick", "room": "dev", "username": "bob"}, "-- you kicked bob from #dev"),
    ({"op": "ban", "room": "dev", "username": "bob"}, "-- you banned bob from #dev"),
    ({"op": "unban", "room": "dev", "username": "bob"}, "-- bob is not banned from #dev"),
    ({"op": "invite", "room": "dev"}, "-- invitation to #dev sent"),
    ({"op": "create", "room": "dev"}, "-- you made #dev; you own it"),
    ({"op": "create", "room": "dev", "encrypted": True},
     "-- you made #dev, private and end-to-end encrypted (for good); you own it"),
    ({"op": "unblock", "username": "bob"}, "-- you unblocked bob"),
    ({"op": "kick", "room": "dev"}, "-- ok: kick #dev"),  # a reply short of a field: as is
    ({"op": "join", "room": "dev"}, "-- ok: join #dev"),
])
def test_the_ok_of_a_request_is_a_sentence(ok: dict[str, object], line: str) -> None:
    assert show({"type": "ok", **ok}) == line


def test_a_join_that_made_the_room_says_so() -> None:
    state = ChatState.start("general", ["general"])
    note = ("#no-such did not exist: you made it, a public room you own "
            "(/leave #no-such if that was a typo)")
    assert state.observe({"type": "ok", "op": "join", "room": "no-such", "created": True,
                          "re": 1}, "me") == [note]
    assert state.room == "no-such"
    assert state.observe({"type": "ok", "op": "join", "room": "dev", "re": 2}, "me") == []


def test_info_rooms_and_members_replies() -> None:
    info = {"type": "room", "re": 4, "room": "dev", "visibility": "private",
            "history": "shared", "topic": "", "role": "moderator", "members": 1}
    assert show(info).splitlines() == [
        "-- #dev: private, history shared (members read all of it), 1 member, "
        "you are moderator",
        "-- no topic",
    ]
    # a moderator's or owner's reply names who is banned
    assert show({**info, "bans": ["bob", "eve"]}).splitlines()[-1] == "-- banned: bob, eve"
    assert show({**info, "bans": []}).splitlines()[-1] == "-- nobody is banned"
    listed = {"type": "rooms", "re": 5, "more": True, "rooms": [
        {"room": "dev", "topic": "Deploy Friday", "members": 3, "visibility": "public",
         "role": "owner"},
        {"room": "general", "topic": "", "members": 10, "visibility": "public",
         "role": "member"},
        {"room": "lobby", "topic": "", "members": 1, "visibility": "public", "role": None},
        {"room": "secret", "topic": "", "members": 2, "visibility": "private", "role": None},
    ]}
    assert show(listed, current="general").splitlines() == [
        "-- rooms: #dev *#general (* current)",
        "   #dev      owner    public    3 members  Deploy Friday",
        "   #general  member   public   10 members",
        "   #lobby    -        public    1 member",
        "   #secret   invited  private   2 members",
        "-- invited: /join ROOM to accept",
        "-- more public rooms than listed: the fullest are shown",
    ]
    members = {"type": "members", "room": "dev", "re": 6, "members": [
        {"username": "alice", "role": "owner", "online": True},
        {"username": "bob", "role": "member", "online": False},
    ]}
    assert show(members).splitlines() == [
        "-- members of #dev: 2, 1 online",
        "   owner     alice (online)",
        "   member    bob",
    ]


def test_the_rooms_table_stays_aligned_in_colour() -> None:
    listed = {"type": "rooms", "re": 5, "rooms": [
        {"room": "a-long-room-name", "topic": "", "members": 3, "visibility": "public",
         "role": "moderator"},
        {"room": "qa", "topic": "tests", "members": 120, "visibility": "private",
         "role": "owner"},
    ]}
    plain = show(listed, current="qa")
    coloured = re.sub(r"\x1b\[[0-9;]*m", "", show(listed, current="qa", color=True))
    assert coloured == plain
    assert plain.splitlines()[1:] == [
        "   #a-long-room-name  moderator  public     3 members",
        "   #qa                owner      private  120 members  tests",
    ]


def test_a_disabled_account_or_logged_out_session_is_said_and_not_reconnected() -> None:
    assert "disabled" in bye_text("account_disabled")
    assert "logged out" in bye_text("logged_out")
    assert not should_reconnect("account_disabled")
    assert not should_reconnect("logged_out")
    assert should_reconnect("shutdown")


# -- the state: roles and removals --------------------------------------------------------------


def test_the_prompt_names_a_role_above_member() -> None:
    state = ChatState.start("dev", ["general", "dev"])
    assert state.prompt == "[dev]> "
    state.observe({"type": "room", "room": "dev", "role": "owner", "re": 1}, "me")
    assert state.prompt == "[dev owner]> "
    state.observe({"type": "role", "room": "dev", "username": "bob", "role": "member",
                   "by": "me"}, "me")
    assert state.prompt == "[dev owner]> "  # about someone else
    state.observe({"type": "role", "room": "dev", "username": "ME", "role": "member",
                   "by": "me"}, "me")
    assert state.prompt == "[dev]> "
    state.follow({"type": "create", "room": "lab"}, {"type": "ok", "op": "create", "room": "lab"})
    assert (state.room, state.prompt) == ("lab", "[lab owner]> ")


def test_a_removal_drops_the_room_and_moves_on() -> None:
    state = ChatState.start("dev", ["general", "dev", "ops"])
    state.set_role("dev", "moderator")
    notes = state.observe({"type": "removed", "room": "DEV", "by": "a", "how": "ban"}, "me")
    assert notes == ["now talking in #general"]
    assert (state.room, state.rooms, state.roles) == ("general", {"general", "ops"}, {})
    # Nothing of the room is asked for when catching up after a reconnect.
    asked = Seen("me").catch_up_requests(state.rooms, position=5)
    assert {r.get("room") for r in asked} == {"general", "ops", None}  # None: the direct ones
    assert state.observe({"type": "removed", "room": "ops", "by": "a", "how": "kick"},
                         "me") == []  # not the current room: the event line says it all
    assert state.observe({"type": "removed", "room": "ops", "by": "a", "how": "kick"},
                         "me") == []


# -- Tab ----------------------------------------------------------------------------------------


def offered(completer: ChatCompleter, text: str) -> list[str]:
    document = Document(text, len(text))
    return [c.text for c in completer.get_completions(document, CompleteEvent())]


def test_tab_offers_members_listed_and_rooms_listed_or_invited_to() -> None:
    state = ChatState.start("general", ["general"])
    roster = Roster()
    completer = ChatCompleter(state, roster)
    roster.note({"type": "members", "room": "dev", "members": [
        {"username": "olga", "role": "member", "online": False},
        {"username": "oscar", "role": "owner", "online": True}]})
    roster.note({"type": "rooms", "rooms": [{"room": "Lobby", "role": None}]})
    roster.note({"type": "invited", "room": "secret", "by": "oscar"})
    for command in ("kick", "ban", "unban", "invite", "role", "block", "unblock", "msg"):
        assert offered(completer, f"/{command} o") == ["olga ", "oscar "], command
    assert offered(completer, "/join ") == ["general ", "lobby ", "secret "]
    assert offered(completer, "/info #s") == ["#secret "]
    assert offered(completer, "/kick olga #l") == ["#lobby "]  # a room after the user
    assert offered(completer, "/kick olga l") == []  # a reason, not a room
    assert offered(completer, "/msg olga #l") == []  # a message
    assert offered(completer, "o") == []  # in a message: only who is online in the room

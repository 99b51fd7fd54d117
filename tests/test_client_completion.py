"""chat.client.completion: what Tab offers, checked on Documents without a terminal."""

from __future__ import annotations

from prompt_toolkit.completion import CompleteEvent
from prompt_toolkit.document import Document

from chat.client.commands import ChatState
from chat.client.completion import ChatCompleter, Roster


def offered(completer: ChatCompleter, text: str) -> list[tuple[str, int]]:
    document = Document(text, len(text))
    return [(c.text, c.start_position)
            for c in completer.get_completions(document, CompleteEvent(completion_requested=True))]


def make() -> tuple[ChatCompleter, ChatState, Roster]:
    state = ChatState.start("general", ["general", "dev"])
    roster = Roster()
    return ChatCompleter(state, roster), state, roster


def test_command_names_after_a_slash_with_a_space_to_go_on() -> None:
    completer, _, _ = make()
    assert offered(completer, "/j") == [("join ", -1)]
    assert offered(completer, "/Sw") == [("switch ", -2)]
    names = [text.strip() for text, _ in offered(completer, "/")]
    assert {"join", "leave", "me", "msg", "passwd", "rooms", "switch", "who"} <= set(names)
    assert offered(completer, "hello /j") == []
    assert offered(completer, "//j") == []


def test_rooms_after_room_commands() -> None:
    completer, state, roster = make()
    roster.note({"type": "who", "room": "ops", "users": ["carol"]})
    for command in ("join", "leave", "switch", "who"):
        assert offered(completer, f"/{command} ") == [
            ("dev ", 0), ("general ", 0), ("ops ", 0)]
    assert offered(completer, "/switch D") == [("dev ", -1)]
    state.joined("devops")
    assert offered(completer, "/leave dev") == [("dev ", -3), ("devops ", -3)]
    assert offered(completer, "/msg ") == [("carol ", 0)]
    assert offered(completer, "/switch dev x") == []


def test_a_room_typed_with_its_hash_keeps_it() -> None:
    completer, _, _ = make()
    assert offered(completer, "/join #g") == [("#general ", -2)]
    assert offered(completer, "/switch #") == [("#dev ", -1), ("#general ", -1)]


def test_history_offers_users_and_rooms() -> None:
    completer, _, roster = make()
    roster.note({"type": "who", "room": "general", "users": ["dave", "erin"]})
    assert offered(completer, "/history d") == [("#dev ", -1), ("dave ", -1)]
    assert offered(completer, "/history #g") == [("#general ", -2)]


def test_users_after_msg_follow_who_and_presence() -> None:
    completer, _, roster = make()
    roster.note({"type": "who", "room": "general", "users": ["alice", "Bob"]})
    roster.note({"type": "presence", "room": "dev", "username": "bert", "event": "join"})
    assert offered(completer, "/msg b") == [("bert ", -1), ("Bob ", -1)]
    roster.note({"type": "presence", "room": "general", "username": "Bob", "event": "leave"})
    assert offered(completer, "/msg b") == [("bert ", -1)]
    assert offered(completer, "/msg bert hello") == []
    roster.note({"type": "who", "room": "general", "users": "not a list"})
    roster.note({"type": "message", "room": "general", "username": "zed"})
    assert [t for t, _ in offered(completer, "/msg ")] == ["alice ", "bert "]


def test_a_name_in_a_message_completes_from_the_current_room() -> None:
    completer, state, roster = make()
    roster.note({"type": "who", "room": "general", "users": ["alice", "albert"]})
    roster.note({"type": "who", "room": "dev", "users": ["alex"]})
    assert offered(completer, "al") == [("albert: ", -2), ("alice: ", -2)]  # addressing
    assert offered(completer, "ask Ali") == [("alice ", -3)]
    assert offered(completer, "hello ") == []
    state.switch("dev")
    assert offered(completer, "al") == [("alex: ", -2)]

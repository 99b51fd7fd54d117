"""The interactive client on a real (pseudo) terminal: what the screen shows.

Each test runs `python -m chat.client.cli login ...` in a pty with pexpect against the
ephemeral server from tests/conftest.py, and feeds every byte the client writes into a
`pyte` terminal emulator of the pty's size. The assertions are on the emulated screen
(`screen.display`, and `screen.buffer` for attributes), so they check what a person would
see after prompt_toolkit's cursor moves and redraws, not the byte stream. No test sleeps:
`Terminal.wait_for` reads the child's output until a condition on the screen holds, or
fails after a generous timeout (a loaded 2-core machine) showing the screen as it was.
"""

from __future__ import annotations

import os
import re
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from conftest import PASSWORD

from tests.test_client_reconnect_catchup import Proxy

pexpect = pytest.importorskip("pexpect")
pyte = pytest.importorskip("pyte")

ROOT = Path(__file__).resolve().parent.parent
ROWS, COLS = 50, 120
WAIT = 30.0  # seconds for one condition: Python start-up on a loaded machine included
CLOCK = r"\[\d\d:\d\d\]"
UP = "\x1b[A"  # the up-arrow key as a VT100 terminal sends it
TAB = "\t"


def new_name() -> str:
    return "u" + uuid.uuid4().hex[:12]


class Terminal:
    """A child process on a pty, its output rendered by a pyte screen of the same size."""

    def __init__(self, child: Any) -> None:
        self.child = child
        self.screen = pyte.Screen(COLS, ROWS)
        self.stream = pyte.ByteStream(self.screen)
        self.raw = bytearray()  # everything the child wrote, for the bell
        self.eof = False

    # -- reading the screen -------------------------------------------------------------

    def lines(self) -> list[str]:
        return [line.rstrip() for line in self.screen.display]

    def text(self) -> str:
        numbered = [f"{n:2} |{line}" for n, line in enumerate(self.lines())]
        while numbered and numbered[-1].endswith("|"):
            numbered.pop()
        cursor = self.screen.cursor
        return "\n".join([*numbered, f"(cursor at row {cursor.y}, column {cursor.x})"])

    def cursor_line(self) -> str:
        """The line the cursor is on: the input line while a prompt is up."""
        return self.lines()[self.screen.cursor.y]

    def rows_matching(self, pattern: str) -> list[int]:
        regex = re.compile(pattern)
        return [n for n, line in enumerate(self.lines()) if regex.search(line)]

    def row(self, pattern: str) -> int:
        """The one row matching `pattern` (fails, showing the screen, unless exactly one)."""
        rows = self.rows_matching(pattern)
        assert len(rows) == 1, f"{len(rows)} rows match {pattern!r}:\n{self.text()}"
        return rows[0]

    # -- driving the child --------------------------------------------------------------

    def pump(self, timeout: float) -> None:
        """Feed whatever the child writes within `timeout` seconds into the screen."""
        if self.eof:
            time.sleep(min(timeout, 0.05))
            return
        try:
            data = self.child.read_nonblocking(65536, timeout)
        except pexpect.TIMEOUT:
            return
        except pexpect.EOF:
            self.eof = True
            return
        self.raw += data
        self.stream.feed(data)

    def wait_for(
        self, condition: Callable[[], object], what: str, timeout: float = WAIT
    ) -> None:
        """Read output until `condition()` is true; fail after `timeout`, showing the screen."""
        deadline = time.monotonic() + timeout
        while not condition():
            left = deadline - time.monotonic()
            if left <= 0:
                pytest.fail(f"timed out after {timeout:g} s waiting for {what}; "
                            f"the screen:\n{self.text()}")
            if self.eof:
                pytest.fail(f"the client exited while waiting for {what}; "
                            f"the screen:\n{self.text()}")
            self.pump(min(left, 0.25))

    def wait_for_line(self, pattern: str, timeout: float = WAIT) -> int:
        """Wait until a line matches `pattern`; its row."""
        self.wait_for(lambda: self.rows_matching(pattern), f"a line matching {pattern!r}",
                      timeout)
        return self.rows_matching(pattern)[-1]

    def wait_for_input(self, prompt: str, typed: str = "") -> None:
        """Wait until the cursor's line is exactly `prompt` + `typed`, cursor at its end."""
        want = (prompt + typed).rstrip()

        def ready() -> bool:
            return (self.cursor_line() == want
                    and self.screen.cursor.x == len(prompt + typed))

        self.wait_for(ready, f"the input line {prompt + typed!r}")

    def settle(self, quiet: float = 0.5, timeout: float = WAIT) -> None:
        """Read until the child has written nothing for `quiet` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self.eof:
            before = len(self.raw)
            self.pump(quiet)
            if len(self.raw) == before:
                return

    def send(self, keys: str) -> None:
        self.child.send(keys)

    def quit(self) -> int:
        """Type /quit, wait for the child to end; its exit status."""
        self.send("/quit\r")
        self.wait_for(lambda: self.eof, "the client to exit")
        self.child.close()
        return self.child.exitstatus


def client_env(tmp_path: Path, *, color: bool = False) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k != "NO_COLOR" and not k.startswith("CHAT_")}
    env.update(
        CHAT_PASSWORD=PASSWORD,
        XDG_CONFIG_HOME=str(tmp_path / "config"),  # no client.toml of the machine's
        PROMPT_TOOLKIT_NO_CPR="1",  # the pty answers no cursor-position requests
        TERM="xterm-256color" if color else "xterm",
        LANG="C.UTF-8", LC_ALL="C.UTF-8",
    )
    if not color:
        env["NO_COLOR"] = "1"
    return env


@contextmanager
def interactive(
    server: Any, username: str, tmp_path: Path, *extra: str, color: bool = False,
    e2e: bool = False,
) -> Iterator[Terminal]:
    """The interactive client logged in as `username`, with its prompt up (end-to-end
    encryption off unless `e2e`: most tests here are about the rest)."""
    args = ["-m", "chat.client.cli", "login", *([] if e2e else ["--no-e2e"]),
            "--server", server.address, "--cafile", str(server.cafile),
            "--username", username, *extra]
    env = client_env(tmp_path, color=color)
    if e2e:  # the key store's directory (tmp_path / "data" is the server's)
        (tmp_path / "keys").mkdir(exist_ok=True)
        env["XDG_DATA_HOME"] = str(tmp_path / "keys")
    child = pexpect.spawn(
        sys.executable, args, env=env, cwd=str(ROOT), dimensions=(ROWS, COLS), timeout=WAIT,
    )
    term = Terminal(child)
    try:
        term.wait_for_line(r"-- type /help for commands")
        yield term
    finally:
        if child.isalive():
            child.terminate(force=True)
        child.close(force=True)


def say(client: Any, room: str, text: str) -> None:
    reply = client.request({"type": "send", "room": room, "message": text})
    assert reply["type"] == "message", reply


# -- the input line -----------------------------------------------------------------------------


def test_incoming_messages_never_garble_a_half_typed_line(
    chat_server: Any, tmp_path: Path
) -> None:
    me, other = new_name(), new_name()
    chat_server.register(me)
    peer = chat_server.user(other)
    try:
        with interactive(chat_server, me, tmp_path) as term:
            term.wait_for_input("[general]> ")
            term.send("half a thou")
            term.wait_for_input("[general]> ", "half a thou")
            for n in range(1, 6):  # a burst: each line redraws the prompt below it
                say(peer, "general", f"interruption {n}")
            term.wait_for_line(rf"^{CLOCK} #general {other}: interruption 5$")
            term.wait_for_input("[general]> ", "half a thou")
            rows = [term.row(rf"^{CLOCK} #general {other}: interruption {n}$")
                    for n in range(1, 6)]
            prompt_row = term.screen.cursor.y
            assert rows == sorted(rows) and rows[-1] < prompt_row, term.text()
            assert term.rows_matching("half a thou") == [prompt_row], term.text()
            assert not any(term.lines()[prompt_row + 1:]), term.text()  # the bottom line

            # Typing on between two messages loses no key and mixes nothing in.
            term.send("gh")
            term.wait_for_input("[general]> ", "half a though")
            say(peer, "general", "one more")
            term.wait_for_line(rf"^{CLOCK} #general {other}: one more$")
            term.send("t, finished")
            term.wait_for_input("[general]> ", "half a thought, finished")

            term.send("\r")
            sent = term.wait_for_line(rf"^{CLOCK} #general {me}: half a thought, finished$")
            term.wait_for_input("[general]> ")
            # The accepted line stays on the screen, as typed, with the server's echo below.
            accepted = term.row(r"^\[general\]> half a thought, finished$")
            assert accepted < sent < term.screen.cursor.y, term.text()
            assert term.rows_matching("half a thou") == [accepted, sent], term.text()
            assert peer.recv_until("message", username=me)["message"] == (
                "half a thought, finished")
            assert term.quit() == 0
    finally:
        peer.close()


def test_up_arrow_recalls_earlier_lines(chat_server: Any, tmp_path: Path) -> None:
    me = new_name()
    chat_server.register(me)
    with interactive(chat_server, me, tmp_path) as term:
        term.wait_for_input("[general]> ")
        for line in ("the first line", "the second line"):
            term.send(line + "\r")
            term.wait_for_line(rf"^{CLOCK} #general {me}: {line}$")
            term.wait_for_input("[general]> ")
        term.send(UP)
        term.wait_for_input("[general]> ", "the second line")
        term.send(UP)
        term.wait_for_input("[general]> ", "the first line")
        term.send(" again\r")  # a recalled line can be edited before it is sent
        term.wait_for_line(rf"^{CLOCK} #general {me}: the first line again$")
        term.wait_for_input("[general]> ")
        assert len(term.rows_matching(rf"{me}: the first line")) == 2, term.text()
        assert term.quit() == 0


# -- login --------------------------------------------------------------------------------------


def test_login_shows_the_rooms_last_messages_then_what_came_while_away(
    chat_server: Any, tmp_path: Path
) -> None:
    alice, bob, room = new_name(), new_name(), "r" + uuid.uuid4().hex[:8]
    chat_server.register(bob)
    sender = chat_server.user(alice)
    try:
        assert sender.request({"type": "join", "room": room})["type"] == "ok"
        for n in (1, 2, 3):
            say(sender, room, f"room message {n}")
        reply = sender.request({"type": "send", "to": bob, "message": "while you were out"})
        assert reply["type"] == "message", reply
    finally:
        sender.close()
    with interactive(chat_server, bob, tmp_path, "--room", room) as term:
        dm = term.wait_for_line(rf"^{CLOCK} \(dm\) {alice} -> {bob}: while you were out$")
        term.wait_for_input(f"[{room}]> ")
        header = term.row(rf"^-- last messages in #{room}$")
        said = [term.row(rf"^{CLOCK} #{room} {alice}: room message {n}$") for n in (1, 2, 3)]
        away = term.row(r"^-- while you were away$")
        assert said == [header + 1, header + 2, header + 3], term.text()
        assert said[-1] < away < dm == away + 1, term.text()
        assert term.row(r"^-- type /help for commands") > dm, term.text()  # after, not inside
        assert len(term.rows_matching("while you were out")) == 1, term.text()
        assert term.quit() == 0


# -- what each kind of line looks like ----------------------------------------------------------


def test_direct_messages_presence_errors_and_multi_line_messages_look_distinct(
    chat_server: Any, tmp_path: Path
) -> None:
    me, other = new_name(), new_name()
    chat_server.register(me)
    chat_server.register(other)
    with interactive(chat_server, me, tmp_path) as term:
        term.wait_for_input("[general]> ")
        peer = chat_server.user(other, register=False)
        try:
            term.wait_for_line(rf"^{CLOCK} -- {other} is online$")  # not "joined": it logged in
            reply = peer.request({"type": "send", "to": me, "message": "psst, a secret"})
            assert reply["type"] == "message", reply
            term.wait_for_line(rf"^{CLOCK} \(dm\) {other} -> {me}: psst, a secret$")
            say(peer, "general", "first line\nsecond line\n  third, indented more")
            header = term.wait_for_line(rf"^{CLOCK} #general {other}: first line$")
            lines = term.lines()
            indent = " " * len("[HH:MM] ")
            assert lines[header + 1] == indent + "second line", term.text()
            assert lines[header + 2] == indent + "  third, indented more", term.text()

            term.send(f"/msg {other} hello back\r")
            term.wait_for_line(rf"^{CLOCK} \(dm\) {me} -> {other}: hello back$")
            term.send("/msg nobody-here hello?\r")
            term.wait_for_line(r"^! error no_such_user: ")
            term.send("/nonsense\r")
            term.wait_for_line(r"^! unknown command /nonsense \(try /help\)$")
            term.send("/join\r")
            term.wait_for_line(r"^! usage: /join ROOM$")
            term.send(f"/history {other}\r")  # the direct messages with one user
            term.wait_for_line(rf"^-- history with {other}: 2 messages$")
            term.wait_for_input("[general]> ")
            assert peer.request({"type": "join", "room": "dev"})["type"] == "ok"
            term.send("/join #dev\r")
            term.wait_for_input("[dev]> ")
            # dev's owner (its first joiner) hands it on: a room keeps an owner (v1.1)
            assert peer.request({"type": "set_role", "room": "dev", "username": me,
                                 "role": "owner"})["type"] == "ok"
            assert peer.request({"type": "leave", "room": "dev"})["type"] == "ok"
            term.wait_for_line(rf"^{CLOCK} -- {other} left #dev$")  # left the room, still here
        finally:
            peer.close()
        term.wait_for_line(rf"^{CLOCK} -- {other} went offline$")  # not "left #general"
        term.wait_for_input("[dev owner]> ")  # the role event reached the prompt
        assert not term.rows_matching(rf"-- {other} (joined|left) #general"), term.text()
        assert term.quit() == 0


def test_help_lists_every_command_and_me_is_an_action(chat_server: Any, tmp_path: Path) -> None:
    me, other = new_name(), new_name()
    chat_server.register(me)
    peer = chat_server.user(other)
    try:
        with interactive(chat_server, me, tmp_path) as term:
            term.wait_for_input("[general]> ")
            term.send("/help\r")
            term.wait_for_line(r"^  /quit ")
            term.wait_for_input("[general]> ")
            top = term.row(r"^commands")
            for command in ("rooms", "switch", "join", "leave", "history", "who", "msg",
                            "me", "passwd", "help", "quit"):
                assert term.rows_matching(rf"^  /{command}\b")[0] > top, command
            keys = term.row(r"^keys:$")
            for key in ("Tab", "Up, Down", "Ctrl-C", "Ctrl-D"):
                assert term.row(rf"^  {key} ") > keys, key
            bottom = term.screen.cursor.y
            assert all(len(line) < 80 for line in term.lines()[top:bottom]), term.text()
            term.send("/me waves\r")
            term.wait_for_line(rf"^{CLOCK} #general \* {me} waves$")
            assert peer.recv_until("message", username=me)["message"] == "/me waves"
            say(peer, "general", "/me waves back")
            term.wait_for_line(rf"^{CLOCK} #general \* {other} waves back$")
            assert not term.rows_matching(rf"^{CLOCK} .*/me"), term.text()
            assert term.quit() == 0
    finally:
        peer.close()


def test_tab_completes_commands_rooms_and_user_names(chat_server: Any, tmp_path: Path) -> None:
    me, other, room = new_name(), new_name(), "tab" + uuid.uuid4().hex[:8]
    chat_server.register(me)
    chat_server.register(other)
    with interactive(chat_server, me, tmp_path) as term:
        term.wait_for_input("[general]> ")
        term.send("/swi" + TAB)
        term.wait_for_input("[general]> ", "/switch ")  # a space to type the room at once
        term.send("\x15")  # Ctrl-U: clear the line
        term.wait_for_input("[general]> ")
        term.send(f"/join {room}\r")
        term.wait_for_input(f"[{room} owner]> ")  # the first to join a new room owns it
        term.send("/switch gen" + TAB)
        term.wait_for_input(f"[{room} owner]> ", "/switch general ")
        term.send("\r")
        term.wait_for_line(r"^-- now talking in #general$")
        term.wait_for_input("[general]> ")
        term.send(f"/switch #{room[:5]}" + TAB)  # with the # the client shows rooms with
        term.wait_for_input("[general]> ", f"/switch #{room} ")
        term.send("\r")
        term.wait_for_input(f"[{room} owner]> ")

        peer = chat_server.user(other, register=False)  # online: the roster learns the name
        try:
            term.wait_for_line(rf"^{CLOCK} -- {other} is online$")
            term.send(f"/msg {other[:6]}" + TAB)
            term.wait_for_input(f"[{room} owner]> ", f"/msg {other} ")
            term.send("completed\r")
            term.wait_for_line(rf"^{CLOCK} \(dm\) {me} -> {other}: completed$")
            term.wait_for_input(f"[{room} owner]> ")
        finally:
            peer.close()
        assert term.quit() == 0


def test_passwd_asks_without_echo_while_messages_go_on(chat_server: Any, tmp_path: Path) -> None:
    me, other = new_name(), new_name()
    new_password = "a different long passphrase 77"
    chat_server.register(me)
    peer = chat_server.user(other)
    try:
        with interactive(chat_server, me, tmp_path) as term:
            term.wait_for_input("[general]> ")
            term.send("/passwd\r")
            term.wait_for_input("current password: ")
            term.send(PASSWORD[:10])
            term.settle()
            # Nothing of it shows, not even a * a character (as for the login password).
            term.wait_for_input("current password: ")
            say(peer, "general", "while you type a password")
            term.wait_for_line(rf"^{CLOCK} #general {other}: while you type a password$")
            term.wait_for_input("current password: ")  # redrawn below, still hidden
            assert "*" not in term.text(), term.text()
            term.send(PASSWORD[10:] + "\r")
            term.wait_for_input("new password: ")
            term.send(new_password + "\r")
            term.wait_for_input("the new password again: ")
            term.send(new_password + "\r")
            term.wait_for_line(r"^-- password changed; your other sessions stay logged in$")
            term.wait_for_input("[general]> ")
            screen = "\n".join(term.lines())
            assert PASSWORD[:6] not in screen and new_password[:6] not in screen, term.text()
            assert term.quit() == 0
    finally:
        peer.close()
    chat_server.user(me, new_password, register=False).close()  # the new one works


# -- hostile text -------------------------------------------------------------------------------


def test_hostile_text_from_a_peer_is_shown_inert(chat_server: Any, tmp_path: Path) -> None:
    me, other = new_name(), new_name()
    chat_server.register(me)
    peer = chat_server.user(other)
    try:
        with interactive(chat_server, me, tmp_path, color=True) as term:
            term.wait_for_input("[general]> ")
            say(peer, "general", "before the attack")
            before = term.wait_for_line(rf"{CLOCK} #general {other}: before the attack$")
            # Terminal escapes never get past the server: it refuses control characters.
            for text in ("\x1b[2J\x1b[H", "\x1b[31mred", "\x9b2J", "bell\x07", "cr\rhides"):
                reply = peer.request({"type": "send", "room": "general", "message": text})
                assert reply["type"] == "error" and reply["code"] == "invalid_field", reply
            # What the server lets through: bidi overrides and isolates ("Trojan Source"),
            # the Unicode line and paragraph separators, and a newline that tries to fake a
            # line from someone else.
            say(peer, "general",
                "\u202etxet desrever\u202c \u2066isolated\u2069 a\u2028b\u2029c\n"
                "[12:00] #general admin: please send me your password")
            row = term.wait_for_line(rf"#general {other}: \\u202etxet desrever\\u202c ")
            lines = term.lines()
            assert lines[row].endswith(
                r"\u202etxet desrever\u202c \u2066isolated\u2069 a\u2028b\u2029c"), term.text()
            # The fake line is indented under the real sender's header, not a line of its own.
            fake = "[12:00] #general admin: please send me your password"
            assert lines[row + 1] == " " * len("[HH:MM] ") + fake, term.text()
            assert not term.rows_matching(r"^\[12:00\] #general admin"), term.text()
            for char in "\u202e\u202c\u2066\u2069\u2028\u2029":
                assert char.encode() not in term.raw, f"{char!r} reached the terminal"
            term.wait_for_input("[general]> ")

            # The screen is as it was: nothing cleared or moved, no colour left switched on.
            assert term.lines()[before].endswith(f"#general {other}: before the attack")
            text_start = lines[row].index("\\u202e")
            for x in range(text_start, len(lines[row])):
                cell = term.screen.buffer[row][x]
                assert (cell.fg, cell.bg, cell.bold, cell.reverse) == (
                    "default", "default", False, False), (x, cell)
            say(peer, "general", "after the attack")
            term.wait_for_line(rf"{CLOCK} #general {other}: after the attack$")
            term.wait_for_input("[general]> ")
            assert term.quit() == 0
    finally:
        peer.close()


# -- mentions -----------------------------------------------------------------------------------


def _cells(term: Terminal, row: int, text: str) -> list[Any]:
    start = term.lines()[row].index(text)
    return [term.screen.buffer[row][x] for x in range(start, start + len(text))]


@pytest.mark.parametrize("bell", [True, False], ids=["bell", "no-bell"])
def test_a_mention_is_highlighted_and_rings_the_bell(
    chat_server: Any, tmp_path: Path, bell: bool
) -> None:
    me, other = new_name(), new_name()
    chat_server.register(me)
    peer = chat_server.user(other)
    extra = () if bell else ("--no-bell",)
    try:
        with interactive(chat_server, me, tmp_path, *extra, color=True) as term:
            term.wait_for_input("[general]> ")
            say(peer, "general", "just chatting")
            plain = term.wait_for_line(rf"{CLOCK} #general {other}: just chatting$")
            term.wait_for_input("[general]> ")
            assert b"\x07" not in term.raw  # nothing rang so far
            say(peer, "general", f"hey {me}, look")
            mention = term.wait_for_line(rf"{CLOCK} #general {other}: hey {me}, look$")
            term.wait_for_input("[general]> ")
            term.settle()
            assert term.raw.count(b"\x07") == (1 if bell else 0)

            highlighted = _cells(term, mention, f"hey {me}, look")
            assert all(c.reverse and c.bold for c in highlighted), highlighted
            ordinary = _cells(term, plain, "just chatting")
            assert not any(c.reverse or c.bold for c in ordinary), ordinary
            # The sender's name has a colour of its own; the time stamp is not highlighted.
            assert {c.fg for c in _cells(term, mention, other)} != {"default"}
            assert not any(c.reverse for c in _cells(term, mention, term.lines()[mention][:7]))

            # Errors stand out too: red and bold.
            term.send("/msg nobody-here hi\r")
            error = term.wait_for_line(r"^! error no_such_user: ")
            assert all(c.fg == "red" and c.bold for c in _cells(term, error, "! error"))
            # One's own line mentioning oneself neither rings nor is highlighted.
            term.send(f"note to {me}\r")
            own = term.wait_for_line(rf"{CLOCK} #general {me}: note to {me}$")
            term.wait_for_input("[general]> ")
            term.settle()
            assert term.raw.count(b"\x07") == (1 if bell else 0)
            assert not any(c.reverse for c in _cells(term, own, f"note to {me}"))
            assert all(c.bold for c in _cells(term, own, me))  # one's own name is bold
            assert term.quit() == 0
    finally:
        peer.close()


# -- login, /join and presence (issue 15) -------------------------------------------------------


def test_with_recent_0_the_banner_is_in_order_and_says_who_is_online(
    chat_server: Any, tmp_path: Path
) -> None:
    me, other = new_name(), new_name()
    chat_server.register(me)
    peer = chat_server.user(other)
    try:
        reply = peer.request({"type": "send", "to": me, "message": "while you were out"})
        assert reply["type"] == "message", reply
        with interactive(chat_server, me, tmp_path, "--recent", "0") as term:
            term.wait_for_input("[general]> ")
            rows = [term.row(r"^-- logged in as "), term.row(r"^-- while you were away$"),
                    term.row(rf"^{CLOCK} \(dm\) {other} -> {me}: while you were out$"),
                    term.row(rf"^-- online in #general: {other}$"),
                    term.row(r"^-- type /help for commands")]
            assert rows == sorted(rows) and rows[-1] == rows[0] + 4, term.text()
            assert term.quit() == 0
    finally:
        peer.close()


def test_a_user_online_before_login_completes_and_room_takes_its_hash(
    chat_server: Any, tmp_path: Path
) -> None:
    me, other, room = new_name(), new_name(), "dev" + uuid.uuid4().hex[:8]
    chat_server.register(me)
    peer = chat_server.user(other)
    try:
        assert peer.request({"type": "join", "room": room})["type"] == "ok"
        with interactive(chat_server, me, tmp_path, "--room", f"#{room}") as term:
            term.wait_for_input(f"[{room}]> ")
            hint = term.row(r"^-- type /help for commands")
            assert term.row(rf"^-- online in #{room}: {other}$") == hint - 1, term.text()
            term.send(f"/msg {other[:6]}" + TAB)  # no /who needed: login asked
            term.wait_for_input(f"[{room}]> ", f"/msg {other} ")
            term.send("\x15")
            term.wait_for_input(f"[{room}]> ")
            term.send(other[:6] + TAB)  # a name at the start of a message: "name: "
            term.wait_for_input(f"[{room}]> ", f"{other}: ")
            term.send("hello\r")
            term.wait_for_line(rf"^{CLOCK} #{room} {me}: {other}: hello$")
            assert term.quit() == 0
    finally:
        peer.close()


def test_join_shows_the_rooms_last_messages_and_who_is_there(
    chat_server: Any, tmp_path: Path
) -> None:
    me, other, room = new_name(), new_name(), "r" + uuid.uuid4().hex[:8]
    chat_server.register(me)
    peer = chat_server.user(other)
    try:
        assert peer.request({"type": "join", "room": room})["type"] == "ok"
        for n in (1, 2, 3):
            say(peer, room, f"earlier {n}")
        with interactive(chat_server, me, tmp_path, "--recent", "2") as term:
            term.wait_for_input("[general]> ")
            term.send(f"/join #{room}\r")
            term.wait_for_input(f"[{room}]> ")
            ok = term.row(rf"^-- ok: join #{room}$")
            view = term.lines()[ok + 1:ok + 5]
            assert view[0] == f"-- last messages in #{room}", term.text()
            for line, n in zip(view[1:3], (2, 3), strict=True):
                assert re.fullmatch(rf"{CLOCK} #{room} {other}: earlier {n}", line), term.text()
            assert view[3] == f"-- online in #{room}: {other}", term.text()
            assert not term.rows_matching("earlier 1"), term.text()  # --recent 2
            assert not term.rows_matching(rf"-- {me} joined"), term.text()  # our own: no line
            assert term.quit() == 0
    finally:
        peer.close()


def test_a_burst_of_logins_is_announced_once_each(chat_server: Any, tmp_path: Path) -> None:
    me, others = new_name(), [new_name() for _ in range(4)]
    chat_server.register(me)
    for name in others:
        chat_server.register(name)
    peers = [chat_server.client() for _ in others]
    try:
        with interactive(chat_server, me, tmp_path) as term:
            term.wait_for_input("[general]> ")
            for peer, name in zip(peers, others, strict=True):  # pipelined: a burst
                peer.send({"type": "login", "username": name, "password": PASSWORD})
            for peer in peers:
                assert peer.recv_until("welcome")["type"] == "welcome"

            def announced() -> list[str]:
                rows = term.rows_matching(r" -- (\d+ people came online: .*|\S+ is online)$")
                return [term.lines()[n] for n in rows]

            term.wait_for(lambda: all(any(n in line for line in announced()) for n in others),
                          "every login announced")
            for name in others:
                assert sum(name in line for line in announced()) == 1, term.text()
            assert not term.rows_matching(r"joined #general"), term.text()
            assert term.quit() == 0
    finally:
        for peer in peers:
            peer.close()


# -- two sessions of one user (issue 15, item 3) ------------------------------------------------


def test_two_sessions_of_one_user_follow_each_others_rooms(
    chat_server: Any, tmp_path: Path
) -> None:
    me, room = new_name(), "ops" + uuid.uuid4().hex[:8]
    chat_server.register(me)
    with interactive(chat_server, me, tmp_path) as first, \
            interactive(chat_server, me, tmp_path) as second:
        first.wait_for_input("[general]> ")
        second.wait_for_input("[general]> ")
        second.send(f"/join {room}\r")
        second.wait_for_input(f"[{room} owner]> ")
        first.wait_for_line(rf"^-- you joined #{room} in another session$")
        first.send(f"/switch {room}\r")  # known at once: not "you are not in it"
        first.wait_for_input(f"[{room} owner]> ")  # the role asked for on learning of it
        first.send("from the first\r")
        first.wait_for_line(rf"^{CLOCK} #{room} {me}: from the first$")
        second.wait_for_line(rf"^{CLOCK} #{room} {me}: from the first$")

        second.send("/leave\r")
        second.wait_for_input("[general]> ")
        first.wait_for_line(
            rf"^-- you left #{room} in another session; now talking in #general$")
        first.wait_for_input("[general]> ")
        first.send("still heard\r")  # goes to #general, not refused with not_in_room
        first.wait_for_line(rf"^{CLOCK} #general {me}: still heard$")
        first.send(f"/switch {room}\r")
        first.wait_for_line(rf"^! you are not in #{room}; /join it first$")
        first.wait_for_input("[general]> ")
        assert not first.rows_matching("not_in_room"), first.text()
        assert second.quit() == 0
        assert first.quit() == 0


# -- keys and leaving ---------------------------------------------------------------------------


def test_ctrl_c_clears_a_half_typed_line_and_leaves_on_an_empty_one(
    chat_server: Any, tmp_path: Path
) -> None:
    me = new_name()
    chat_server.register(me)
    with interactive(chat_server, me, tmp_path) as term:
        term.wait_for_input("[general]> ")
        term.send("a half-typed thought")
        term.wait_for_input("[general]> ", "a half-typed thought")
        term.send("\x03")
        term.wait_for_input("[general]> ")  # cleared, the session goes on
        term.send("after all\r")
        term.wait_for_line(rf"^{CLOCK} #general {me}: after all$")
        term.wait_for_input("[general]> ")
        assert not term.rows_matching("half-typed thought$"), term.text()
        term.send("\x03")  # on an empty line: leave
        term.wait_for(lambda: term.eof, "the client to exit")
        term.child.close()
        assert term.child.exitstatus == 130


def test_quit_while_reconnecting_is_the_users_quit(
    server_factory: Any, tmp_path: Path
) -> None:
    server = server_factory()
    me = new_name()
    server.register(me)
    with interactive(server, me, tmp_path) as term:
        term.wait_for_input("[general]> ")
        server.server.stop()
        term.wait_for_line(r"^-- connection lost; reconnecting in \d+ s$")
        term.wait_for_input("[general]> ")
        assert term.quit() == 0
        assert not term.rows_matching("server closed the connection"), term.text()


def test_after_reconnecting_the_rooms_are_the_servers(chat_server: Any, tmp_path: Path) -> None:
    # While the connection is down, another session of mine leaves #dev, the current room,
    # and joins #ops, where something is said: on reconnecting, the screen says so, talks
    # in #general, and #ops is caught up; #dev is not joined again (issue 15, item 1).
    me, other = new_name(), new_name()
    dev, ops = "dev" + uuid.uuid4().hex[:8], "ops" + uuid.uuid4().hex[:8]
    chat_server.register(me)
    peer = chat_server.user(other)
    proxy = Proxy(chat_server.port)
    relayed = SimpleNamespace(address=f"127.0.0.1:{proxy.port}", cafile=chat_server.cafile)
    try:
        with interactive(relayed, me, tmp_path, "--room", dev) as term:
            term.wait_for_input(f"[{dev} owner]> ")  # joined first: owner
            proxy.hold()
            proxy.cut()
            term.wait_for_line(r"^-- connection lost; reconnecting in \d+ s$")
            elsewhere = chat_server.user(me, register=False)
            try:
                for request in ({"type": "leave", "room": dev}, {"type": "join", "room": ops}):
                    assert elsewhere.request(request)["type"] == "ok"
            finally:
                elsewhere.close()
            assert peer.request({"type": "join", "room": ops})["type"] == "ok"
            say(peer, ops, "said in ops meanwhile")
            proxy.wait_held()
            proxy.release()
            reconnected = term.wait_for_line(rf"^-- reconnected as {me}$")
            left = term.wait_for_line(rf"^-- while you were away you stopped being in #{dev}; "
                                      r"now talking in #general$")
            joined = term.wait_for_line(rf"^-- while you were away you joined #{ops} \(in "
                                        r"another session\)$")
            caught = term.wait_for_line(rf"^{CLOCK} #{ops} {other}: said in ops meanwhile$")
            assert reconnected < left < joined < caught, term.text()
            term.wait_for_input("[general]> ")
            term.send(f"/switch {ops}\r")
            term.wait_for_input(f"[{ops} owner]> ")  # the roles asked for again
            term.send("/rooms\r")
            term.wait_for_line(rf"^-- rooms: #general \*#{ops} \(\* current\)$")
            assert term.quit() == 0
    finally:
        proxy.close()
        peer.close()


def test_a_message_longer_than_the_server_takes_is_sent_in_parts(
    chat_server: Any, tmp_path: Path
) -> None:
    me, other = new_name(), new_name()
    chat_server.register(me)
    peer = chat_server.user(other)
    text = " ".join(f"w{n:04}" for n in range(1000))  # 5999 characters: two messages
    try:
        with interactive(chat_server, me, tmp_path) as term:
            term.wait_for_input("[general]> ")
            pasted = "\x1b[200~" + text + "\x1b[201~"  # a bracketed paste, as terminals send
            for start in range(0, len(pasted), 512):  # and read what it draws meanwhile
                term.send(pasted[start:start + 512])
                term.pump(0.05)
            term.send("\r")
            term.wait_for_line(r"^-- long message sent as 2 parts$")
            parts = [peer.recv_until("message", username=me)["message"] for _ in range(2)]
            assert " ".join(parts) == text and all(len(p) <= 4000 for p in parts)
            assert term.quit() == 0
    finally:
        peer.close()

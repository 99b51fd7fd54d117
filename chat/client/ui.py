"""The interactive terminal UI: a prompt_toolkit prompt, incoming frames printed above it.

Theory of operation
-------------------
The main thread runs the prompt and the slash commands (chat.client.commands). A daemon
thread, the printer, takes every frame from the ChatClient and shows it formatted. Only the
main thread reads or changes `state` (the current room, the rooms joined).

Every line the UI shows, from either thread, goes through one `Screen`, which knows whether
a prompt is on the terminal. With no prompt up, it writes at once. While a prompt is up it
queues the text and has the prompt's own event loop write it with `run_in_terminal`, which
erases the prompt, writes, and draws the prompt again below. The switch between the two
happens under the screen's lock, in the prompt's `pre_run` hook (before its first drawing)
and after the prompt returns (whatever is still queued is written then), so no line is
ever written by another thread while the prompt is being drawn: a line never lands on the
prompt line, and every line ends with a newline. (patch_stdout stays on as a safety net for
stray writes by anything else.)

The printer never touches the prompt except to end it when the connection has ended: it
sets `ended`, then asks the prompt's event loop to exit it; a prompt that starts after
that sees `ended` in its pre_run hook and exits at once.

Unless reconnecting is off (--no-reconnect), a connection that ends without our quit is
taken up again by the printer (chat.client.reconnect.Link): `-- connection lost;
reconnecting in N s`, a new login with the password kept in memory (updated by a successful
/passwd), the rooms rejoined, `-- reconnected as NAME`, then the messages missed, each
message shown once (by msg_id). Only then does `ended` get set, if it gave up. A command
typed while reconnecting is not sent (it says so); /quit or Ctrl-D stop it (0), Ctrl-C (130).
"""

from __future__ import annotations

import asyncio
import sys
import threading
from collections.abc import Callable, Iterable

from prompt_toolkit import PromptSession
from prompt_toolkit.application import run_in_terminal
from prompt_toolkit.history import InMemoryHistory
from prompt_toolkit.patch_stdout import patch_stdout

from chat.client.backlog import login_backlog, show_backlog
from chat.client.commands import (
    HELP,
    ChatState,
    Help,
    Invalid,
    Notice,
    Passwd,
    Quit,
    Request,
    Rooms,
    Switch,
    parse_command,
    run_local,
)
from chat.client.commands import perform as perform_command
from chat.client.completion import ChatCompleter, Roster
from chat.client.connection import DEFAULT_TIMEOUT, ChatClient
from chat.client.errors import ConnectionClosed, Frame, TimedOut
from chat.client.format import format_event, is_mention, sanitize
from chat.client.reconnect import Link


class Screen:
    """The one way text reaches the terminal while the UI runs; `show` is thread-safe."""

    def __init__(self, write: Callable[[str], None]) -> None:
        self._write = write  # writes and flushes; called only under _lock
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None  # the prompt's, while it is up
        self._is_running: Callable[[], bool] = lambda: False
        self._queued: list[str] = []

    def show(self, text: str) -> None:
        """Print `text` (maybe several lines) above the prompt, or at once if none is up."""
        with self._lock:
            if self._loop is None:
                self._write(text + "\n")
                return
            self._queued.append(text)
            if len(self._queued) == 1:  # else a drain is already on its way
                try:
                    self._loop.call_soon_threadsafe(self._drain)
                except RuntimeError:
                    pass  # that loop has just closed: prompt_ended writes the queue

    def prompt_started(
        self, loop: asyncio.AbstractEventLoop, is_running: Callable[[], bool]
    ) -> None:
        """Called in the prompt's loop before it first draws: from now on, queue."""
        with self._lock:
            self._loop = loop
            self._is_running = is_running

    def prompt_ended(self) -> None:
        """Called once the prompt has returned: write what is queued, then write directly."""
        with self._lock:
            self._loop = None
            self._write_queued()

    def call_in_prompt(self, callback: Callable[[], None]) -> None:
        """Run `callback` in the prompt's loop if a prompt is up (from any thread)."""
        with self._lock:
            if self._loop is not None:
                try:
                    self._loop.call_soon_threadsafe(callback)
                except RuntimeError:
                    pass  # that prompt has just finished

    def _drain(self) -> None:  # in the prompt's loop
        with self._lock:
            if self._loop is None or not self._queued:
                return  # prompt_ended has written it already
            if not self._is_running():
                self._write_queued()  # the prompt is drawn as done: write below it
                return
        run_in_terminal(self._drain_in_terminal, in_executor=False)

    def _drain_in_terminal(self) -> None:  # in the prompt's loop, the prompt erased
        with self._lock:
            self._write_queued()

    def _write_queued(self) -> None:  # under _lock
        if self._queued:
            text = "".join(f"{t}\n" for t in self._queued)
            self._queued.clear()
            self._write(text)


BELL = "\a"


def with_bell(text: str, frame: Frame, me: str | None, bell: bool) -> str:
    """`text`, led by the terminal bell when it is a live message mentioning `me`."""
    return BELL + text if bell and is_mention(frame, me) else text


def change_password_frame(ask: Callable[[str], str]) -> Frame | str:
    """Ask for the old password and the new one twice; the passwd frame, or why not."""
    old = ask("current password: ")
    if not old:
        return "password not changed: empty"
    new = ask("new password: ")
    if not new:
        return "password not changed: empty"
    if ask("the new password again: ") != new:
        return "password not changed: the two new passwords differ"
    return {"type": "passwd", "old": old, "new": new}


def run_interactive(
    client: ChatClient,
    *,
    room: str,
    rooms: Iterable[object] = (),
    color: bool,
    bell: bool = True,
    timeout: float = DEFAULT_TIMEOUT,
    connect: Callable[[], ChatClient] | None = None,
    password: str = "",
    recent: int = 0,
) -> int:
    """Chat until /quit or Ctrl-D (0), Ctrl-C (130) or the server ends the connection (3).

    With `connect`, a lost connection is reconnected, logging in with `password` (kept in
    memory only, and replaced by a successful /passwd). With `recent`, the last `recent`
    messages of the room are shown first, then the direct messages stored while away
    (chat.client.backlog).
    """
    state = ChatState.start(room, rooms)
    kept = [password]  # the password to log in again with; never written anywhere
    link = Link(client, state, connect=connect, password=lambda: kept[0], timeout=timeout)
    backlog = login_backlog(client, link.seen, state.room, recent, timeout)
    roster = Roster()
    session: PromptSession[str] = PromptSession(
        history=InMemoryHistory(), completer=ChatCompleter(state, roster),
        complete_while_typing=False,  # Tab asks; typing a message stays undisturbed
    )
    output = session.app.output

    def write(text: str) -> None:
        output.enable_autowrap()
        output.write_raw(text)  # raw: our colours pass; peers' text is already sanitized
        output.flush()

    screen = Screen(write)
    ended = threading.Event()

    def end_prompt() -> None:
        app = session.app
        if app.is_running and not app.is_done:
            app.exit(exception=EOFError())

    def show(frame: Frame) -> None:
        roster.note(frame)
        me = link.client.username
        text = format_event(frame, me=me, color=color)
        if text is not None:
            screen.show(with_bell(text, frame, me, bell))

    def notify(text: str) -> None:
        screen.show(f"-- {sanitize(text, multiline=False)}")

    def print_events() -> None:
        show_backlog(backlog, show, notify)
        # From this thread, so the hint never lands inside the backlog's block.
        screen.show("-- type /help for commands, /quit or Ctrl-D to leave")
        while True:
            for frame in link.client.events():
                if link.seen.fresh(frame):
                    show(frame)
            if not link.resume(show, notify):
                break
        ended.set()
        screen.call_in_prompt(end_prompt)  # a prompt not up yet sees `ended` in pre_run

    def pre_run() -> None:
        loop = session.app.loop
        if loop is not None:
            screen.prompt_started(loop, lambda: session.app.is_running)
        if ended.is_set():
            end_prompt()

    def prompt() -> str:
        try:
            return session.prompt(lambda: state.prompt, pre_run=pre_run)
        finally:
            screen.prompt_ended()

    def ask_secret(message: str) -> str:
        # A session of its own, so no password lands in the line history, and the main
        # session's settings (prompt_toolkit keeps a prompt's arguments) stay as they are.
        secret: PromptSession[str] = PromptSession()

        def secret_pre_run() -> None:
            loop = secret.app.loop
            if loop is not None:
                screen.prompt_started(loop, lambda: secret.app.is_running)

        try:
            return secret.prompt(message, is_password=True, pre_run=secret_pre_run)
        finally:
            screen.prompt_ended()

    with patch_stdout(raw=True):
        printer = threading.Thread(target=print_events, name="chat-client-printer", daemon=True)
        printer.start()
        server_ended = False
        while not ended.is_set():
            try:
                line = prompt()
            except EOFError:
                break
            except KeyboardInterrupt:
                link.stop()
                link.client.close()
                return 130
            action = parse_command(line, state.room)
            if isinstance(action, Quit):
                break
            if isinstance(action, Help):
                screen.show(HELP)
            elif isinstance(action, Invalid):
                screen.show(f"! {action.message}")
            elif isinstance(action, Notice):
                screen.show(f"-- {action.message}")
            elif isinstance(action, Rooms | Switch):
                screen.show(run_local(action, state))
            elif isinstance(action, Passwd):
                try:
                    frame = change_password_frame(ask_secret)
                except (EOFError, KeyboardInterrupt):
                    screen.show("-- password not changed")
                    continue
                if isinstance(frame, str):
                    screen.show(f"! {frame}")
                    continue
                action = Request(frame)
            if isinstance(action, Request):
                current = link.current(wait=False)
                if current is None:
                    screen.show("! not sent: reconnecting (/quit to give up)")
                    continue
                try:
                    reply = perform_command(current, action, state, timeout)
                except ValueError as exc:
                    screen.show(f"! {exc}")
                except ConnectionClosed:
                    if not link.enabled:
                        server_ended = True
                        break
                    screen.show("! the connection was lost before the reply; "
                                "it may or may not have been carried out")
                except TimedOut as exc:
                    screen.show(f"! {exc}")
                else:
                    if action.frame.get("type") == "passwd" and reply.get("type") == "ok":
                        kept[0] = str(action.frame["new"])
        link.stop()
        if link.interrupted:  # quit while reconnecting: the user's choice, not the server's
            return 0
        current = link.client
        if server_ended or ended.is_set() or link.reconnecting or current.closed:
            current.close(timeout)
            printer.join(timeout)
            current = link.client
            reason = current.bye_reason and f" ({sanitize(current.bye_reason, multiline=False)})"
            print(f"-- the server closed the connection{reason or ''}", file=sys.stderr, flush=True)
            return 3
        current.quit(timeout)  # the printer shows the server's bye before the stream ends
        printer.join(timeout)
        if link.client is not current:  # reconnected just as we quit
            link.client.close(timeout)
    return 0

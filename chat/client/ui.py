"""The interactive terminal UI: a prompt_toolkit prompt, incoming frames printed above it.

Theory of operation
-------------------
The main thread runs the prompt and the slash commands (chat.client.commands). A daemon
thread, the printer (chat.client.printer), takes every frame from the ChatClient and shows
it formatted, and follows from those frames the rooms the user is in (`state`, shared, with
its own lock). The main thread waits, after each request, until the printer has shown its
reply, so the next prompt names the right room.

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
sets `ended`, then asks the prompt's event loop to exit it (with `SessionEnded`, never
mistaken for the user's Ctrl-D); a prompt that starts after that sees `ended` in its
pre_run hook and exits at once.

Unless reconnecting is off (--no-reconnect), a connection that ends without our quit is
taken up again by the printer (chat.client.reconnect.Link): `-- connection lost;
reconnecting in N s`, a new login with the password kept in memory (updated by a successful
/passwd), `-- reconnected as NAME`, the rooms the server lists taken as the user's (with a
note on each left or joined in another session meanwhile, never joined again), then the
messages missed, each message shown once (by msg_id). Only then does `ended` get set, if
it gave up. A command typed while reconnecting is not sent (it says so). Leaving is the
user's choice whenever it comes: /quit or Ctrl-D exit 0, Ctrl-C on an empty line 130,
reconnecting or not; only the server ending the session (or reconnecting giving up)
exits 3.
"""

from __future__ import annotations

import asyncio
import sys
import threading
from collections.abc import Callable, Iterable

from prompt_toolkit import PromptSession
from prompt_toolkit.application import run_in_terminal
from prompt_toolkit.history import InMemoryHistory
from prompt_toolkit.key_binding import KeyBindings, KeyPressEvent
from prompt_toolkit.layout.processors import Processor, Transformation, TransformationInput
from prompt_toolkit.patch_stdout import patch_stdout

from chat.client.backlog import login_backlog
from chat.client.commands import (
    DEFAULT_HISTORY,
    HELP,
    HELP_KEYS,
    ChatState,
    Help,
    Invalid,
    Notice,
    Passwd,
    Quit,
    Request,
    Switch,
    explain,
    parse_command,
    run_local,
)
from chat.client.commands import perform as perform_command
from chat.client.completion import ChatCompleter, Roster
from chat.client.connection import DEFAULT_TIMEOUT, ChatClient, split_message
from chat.client.errors import ConnectionClosed, Frame, TimedOut
from chat.client.format import ENDING_BYES, ME_PREFIX, bye_text, sanitize
from chat.client.printer import Printer
from chat.client.reconnect import Link
from chat.client.roomcommands import about_the_asker

EXIT_OK, EXIT_ENDED, EXIT_INTERRUPTED = 0, 3, 130  # as chat.client.cli documents them


class Hidden(Processor):
    """Shows nothing of what is typed, as getpass does for `register` and the login
    password: not even a `*` a character, which would tell an onlooker the length."""

    def apply_transformation(self, transformation_input: TransformationInput
                             ) -> Transformation:
        return Transformation([], source_to_display=lambda i: 0, display_to_source=lambda i: 0)


class SessionEnded(Exception):
    """The prompt was ended because the session is over (not by the user)."""


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


def message_parts(frame: Frame, limit: int) -> list[Frame]:
    """A `send` frame as frames whose texts fit `limit`; an action stays one in every part."""
    text = frame.get("message")
    if frame.get("type") != "send" or not isinstance(text, str) or len(text) <= limit:
        return [frame]
    prefix = ME_PREFIX if text.startswith(ME_PREFIX) and limit > len(ME_PREFIX) else ""
    return [{**frame, "message": prefix + part}
            for part in split_message(text[len(prefix):], limit - len(prefix))]


def clear_or_quit(event: KeyPressEvent) -> None:
    """Ctrl-C: clear a half-typed line, as a shell does; on an empty line, leave."""
    buffer = event.app.current_buffer
    if buffer.text:
        buffer.reset()
    else:
        event.app.exit(exception=KeyboardInterrupt, style="class:aborting")


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
    (chat.client.backlog), and as many of a room's on /join.
    """
    state = ChatState.start(room, rooms)
    kept = [password]  # the password to log in again with; never written anywhere
    link = Link(client, state, connect=connect, password=lambda: kept[0], timeout=timeout)
    backlog = login_backlog(client, link.seen, state.room, recent, timeout)
    roster = Roster()
    keys = KeyBindings()
    keys.add("c-c")(clear_or_quit)
    session: PromptSession[str] = PromptSession(
        history=InMemoryHistory(), completer=ChatCompleter(state, roster),
        complete_while_typing=False,  # Tab asks; typing a message stays undisturbed
        key_bindings=keys,
    )
    output = session.app.output

    def write(text: str) -> None:
        output.enable_autowrap()
        output.write_raw(text)  # raw: our colours pass; peers' text is already sanitized
        output.flush()

    screen = Screen(write)
    ended = threading.Event()
    printer = Printer(link, state, roster, screen.show, color=color, bell=bell,
                      recent=recent, timeout=timeout)

    def end_prompt() -> None:
        app = session.app
        if app.is_running and not app.is_done:
            app.exit(exception=SessionEnded())

    def print_events() -> None:
        try:
            printer.run(backlog)
        finally:
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
        secret: PromptSession[str] = PromptSession(input_processors=[Hidden()])

        def secret_pre_run() -> None:
            loop = secret.app.loop
            if loop is not None:
                screen.prompt_started(loop, lambda: secret.app.is_running)

        try:
            return secret.prompt(message, pre_run=secret_pre_run)
        finally:
            screen.prompt_ended()

    class ServerEnded(Exception):
        """The connection ended under a request, and it is not reconnected."""

    def send(current: ChatClient, request: Request) -> Frame | None:
        """One request, its reply shown by the printer; None if there was no reply."""
        try:
            reply = perform_command(current, request, state, timeout, follow_rooms=False)
        except ValueError as exc:  # refused here: larger than the server takes
            screen.show(f"! {exc}")
            return None
        except ConnectionClosed:
            if not link.enabled:
                raise ServerEnded from None
            screen.show("! the connection was lost before the reply; "
                        "it may or may not have been carried out")
            return None
        except TimedOut as exc:
            screen.show(f"! {exc}")
            return None
        printer.handled.wait(current, reply.get("re"), timeout)
        room = request.frame.get("room")
        if about_the_asker(request.frame, reply) and isinstance(room, str):
            note = state.lost(room)  # left elsewhere, and no presence said so (yet)
            if note is not None:
                screen.show(f"-- {note}")
        hint = explain(request.frame, reply)
        if hint is not None:
            screen.show(f"-- {hint}")
        return reply

    def carry_out(request: Request) -> None:
        current = link.current(wait=False)
        if current is None:
            screen.show("! not sent: reconnecting; Up recalls the line (/quit to give up)")
            return
        parts = message_parts(request.frame, current.limits.max_message_chars)
        for n, part in enumerate(parts):
            reply = send(current, Request(part))
            if reply is None or reply.get("type") == "error":
                if n:
                    screen.show(f"! only {n} of the {len(parts)} parts were sent")
                return
            if part.get("type") == "passwd" and reply.get("type") == "ok":
                kept[0] = str(part["new"])
            elif part.get("type") == "history" and reply.get("type") == "history":
                listed = reply.get("messages")
                count = len(listed) if isinstance(listed, list) else 0
                if count and count >= part.get("limit", DEFAULT_HISTORY):
                    screen.show("-- older messages: /history more")
        if len(parts) > 1:
            screen.show(f"-- long message sent as {len(parts)} parts")

    quit_code: int | None = None
    with patch_stdout(raw=True):
        printer_thread = threading.Thread(
            target=print_events, name="chat-client-printer", daemon=True)
        printer_thread.start()
        try:
            while True:
                try:
                    line = prompt()
                except SessionEnded:
                    break
                except EOFError:  # Ctrl-D on an empty line
                    quit_code = EXIT_OK
                    break
                except KeyboardInterrupt:  # Ctrl-C on an empty line
                    quit_code = EXIT_INTERRUPTED
                    break
                action = parse_command(line, state.room, state=state)
                if isinstance(action, Quit):
                    quit_code = EXIT_OK
                    break
                if isinstance(action, Help):
                    screen.show(f"{HELP}\n{HELP_KEYS}")
                elif isinstance(action, Invalid):
                    screen.show(f"! {action.message}")
                elif isinstance(action, Notice):
                    screen.show(f"-- {action.message}")
                elif isinstance(action, Switch):
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
                    carry_out(Request(frame))
                elif isinstance(action, Request):
                    carry_out(action)
        except ServerEnded:
            pass
        link.stop()
        printer.stopping.set()
        current = link.client
        if quit_code is None:  # the session ended under us
            current.close(timeout)
            printer_thread.join(timeout)
            current = link.client
            reason = current.bye_reason and f" ({sanitize(current.bye_reason, multiline=False)})"
            ended_by = "the server closed the connection"
            if current.bye_reason in ENDING_BYES:
                text = bye_text(current.bye_reason).removeprefix("disconnected: ")
                ended_by = f"the server ended the session: {text}"
            print(f"-- {ended_by}{reason or ''}", file=sys.stderr, flush=True)
            return EXIT_ENDED
        if link.interrupted:
            # Quit while reconnecting: nobody to say goodbye to, and the printer (a daemon)
            # may sit in a TLS handshake that stop() closes only once it is made.
            screen.show("-- stopped reconnecting")
            return quit_code
        if link.reconnecting or current.closed:
            if link.reconnecting:
                screen.show("-- stopped reconnecting")
            current.close(timeout)
        else:
            current.quit(timeout)  # the printer shows the server's bye before the stream ends
        printer_thread.join(timeout)
        if link.client is not current:  # reconnected just as we quit
            link.client.close(timeout)
    return quit_code

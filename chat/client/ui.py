"""The interactive terminal UI: a prompt_toolkit prompt, incoming frames printed above it.

Theory of operation
-------------------
The main thread runs the prompt and the slash commands (chat.client.commands). A daemon
thread, the printer, takes every frame from the ChatClient and prints it formatted; under
`patch_stdout` its prints land above the input line instead of through it. The printer never
touches the prompt except to end it when the connection has ended: it sets `ended`, then asks
the prompt's own event loop (call_soon_threadsafe) to exit; a prompt that starts after that
sees `ended` in its pre_run hook and exits at once. Only the main thread reads or changes
`state.room`.
"""

from __future__ import annotations

import sys
import threading

from prompt_toolkit import PromptSession
from prompt_toolkit.history import InMemoryHistory
from prompt_toolkit.patch_stdout import patch_stdout

from chat.client.commands import HELP, ChatState, Help, Invalid, Quit, Request, parse_command
from chat.client.commands import perform as perform_command
from chat.client.connection import DEFAULT_TIMEOUT, ChatClient
from chat.client.errors import ConnectionClosed, TimedOut
from chat.client.format import format_event, sanitize


def run_interactive(
    client: ChatClient, *, room: str, color: bool, timeout: float = DEFAULT_TIMEOUT
) -> int:
    """Chat until /quit or Ctrl-D (0), Ctrl-C (130) or the server ends the connection (3)."""
    state = ChatState(room)
    session: PromptSession[str] = PromptSession(history=InMemoryHistory())
    ended = threading.Event()

    def end_prompt() -> None:
        app = session.app
        if app.is_running and not app.is_done:
            app.exit(exception=EOFError())

    def print_events() -> None:
        for frame in client.events():
            text = format_event(frame, me=client.username, color=color)
            if text is not None:
                print(text, flush=True)
        ended.set()
        loop = session.app.loop
        if loop is not None:
            try:
                loop.call_soon_threadsafe(end_prompt)
            except RuntimeError:
                pass  # that prompt has just finished; the next one's pre_run sees `ended`

    def pre_run() -> None:
        if ended.is_set():
            end_prompt()

    with patch_stdout(raw=True):  # raw: our colours pass; peers' text is already sanitized
        printer = threading.Thread(target=print_events, name="chat-client-printer", daemon=True)
        printer.start()
        print("-- type /help for commands, /quit or Ctrl-D to leave", flush=True)
        server_ended = False
        while not ended.is_set():
            try:
                line = session.prompt(lambda: f"[{state.room}]> ", pre_run=pre_run)
            except EOFError:
                break
            except KeyboardInterrupt:
                client.close()
                return 130
            action = parse_command(line, state.room)
            if isinstance(action, Quit):
                break
            if isinstance(action, Help):
                print(HELP, flush=True)
            elif isinstance(action, Invalid):
                print(f"! {action.message}", flush=True)
            elif isinstance(action, Request):
                try:
                    perform_command(client, action, state, timeout)
                except ValueError as exc:
                    print(f"! {exc}", flush=True)
                except ConnectionClosed:
                    server_ended = True
                    break
                except TimedOut as exc:
                    print(f"! {exc}", flush=True)
        if server_ended or ended.is_set():
            printer.join(timeout)
            reason = client.bye_reason and f" ({sanitize(client.bye_reason, multiline=False)})"
            print(f"-- the server closed the connection{reason or ''}", file=sys.stderr, flush=True)
            return 3
        client.quit(timeout)  # the printer shows the server's bye before the stream ends
        printer.join(timeout)
    return 0

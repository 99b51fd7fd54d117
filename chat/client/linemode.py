"""Line mode: commands from a pipe or a file, every received frame printed one per line.

Theory of operation
-------------------
Three threads. The main thread runs the commands: it takes the next input from `inputs`, a
queue fed by the stdin reader (a line, or the end of input) and by the printer (the
connection has ended), sends it as a request and waits for the reply before taking the next,
so a script sees the same transcript every time. The printer prints every frame received,
replies included, in the order they arrived: it alone writes events; /help and local
complaints are written under the same `lock`, so lines never interleave. The stdin reader is a
daemon thread: a blocking read cannot be interrupted and must not keep the process alive.

At the end of input the client sends `quit`, lets the printer drain everything up to the
server's `bye` and the close, and exits 0. If the server ends the connection first, the
transcript is still printed in full and the exit code is 3.
"""

from __future__ import annotations

import json
import queue
import threading
from collections.abc import Iterable
from typing import Any, TextIO

from chat.client.commands import (
    HELP,
    INTERACTIVE_ONLY,
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
    perform,
    run_local,
)
from chat.client.connection import DEFAULT_TIMEOUT, ChatClient
from chat.client.errors import ConnectionClosed, TimedOut
from chat.client.format import format_event, sanitize

_END_OF_INPUT = object()
_CONNECTION_ENDED = object()


def run_line_mode(
    client: ChatClient,
    *,
    stdin: TextIO,
    stdout: TextIO,
    stderr: TextIO,
    room: str,
    rooms: Iterable[object] = (),
    as_json: bool = False,
    color: bool = False,
    timeout: float = DEFAULT_TIMEOUT,
) -> int:
    """Run commands from `stdin` until it ends; return the process exit code.

    `room` is the current room to start with, `rooms` the others the user is in (the
    `welcome`'s list).
    """
    state = ChatState.start(room, rooms)
    inputs: queue.SimpleQueue[Any] = queue.SimpleQueue()
    lock = threading.Lock()
    printer = threading.Thread(
        target=_print_events,
        args=(client, stdout, lock, inputs, as_json, color),
        name="chat-client-printer",
        daemon=True,
    )
    reader = threading.Thread(
        target=_read_lines, args=(stdin, inputs), name="chat-client-stdin", daemon=True
    )
    printer.start()
    reader.start()

    def complain(text: str) -> None:
        _write(stderr, lock, f"chat-client: {text}")

    quitting = False
    while not quitting:
        item = inputs.get()
        if item is _CONNECTION_ENDED:
            break
        if item is _END_OF_INPUT:
            quitting = True
            break
        action = parse_command(item, state.room)
        if isinstance(action, Quit):
            quitting = True
        elif isinstance(action, Help):
            _write(stderr if as_json else stdout, lock, HELP)  # stdout stays pure JSON
        elif isinstance(action, Invalid):
            complain(action.message)
        elif isinstance(action, Notice):  # nothing was sent; a note, like /help's text
            _write(stderr if as_json else stdout, lock, f"-- {action.message}")
        elif isinstance(action, Rooms | Switch):
            text = run_local(action, state)
            if text.startswith("! "):
                complain(text[2:])
            else:
                _write(stderr if as_json else stdout, lock, text)
        elif isinstance(action, Passwd):
            complain(INTERACTIVE_ONLY)
        elif isinstance(action, Request):
            try:
                perform(client, action, state, timeout)
            except ValueError as exc:  # refused locally: larger than the server accepts
                complain(str(exc))
            except ConnectionClosed:
                break
            except TimedOut as exc:
                complain(f"{exc}; giving up")
                client.close()
                printer.join(timeout)
                return 3
    if quitting:
        try:
            client.send({"type": "quit"})
        except ConnectionClosed:
            quitting = False
    printer.join(timeout)  # the server closes after its bye; the printer then ends
    client.close()
    printer.join(timeout)
    if quitting:
        return 0
    complain(_ended_by_server(client))
    return 3


def _ended_by_server(client: ChatClient) -> str:
    if client.bye_reason is None:
        return "the server closed the connection"
    return f"the server closed the connection ({sanitize(client.bye_reason, multiline=False)})"


def _read_lines(stdin: TextIO, inputs: queue.SimpleQueue[Any]) -> None:
    try:
        for line in stdin:
            inputs.put(line)
    finally:
        inputs.put(_END_OF_INPUT)


def _print_events(
    client: ChatClient,
    stdout: TextIO,
    lock: threading.Lock,
    inputs: queue.SimpleQueue[Any],
    as_json: bool,
    color: bool,
) -> None:
    try:
        if as_json:
            _write(stdout, lock, json.dumps(client.hello))
        for frame in client.events():
            if as_json:
                # ensure_ascii (the default) escapes every non-ASCII and control character.
                text: str | None = json.dumps(frame)
            else:
                text = format_event(frame, me=client.username, color=color)
            if text is not None:
                _write(stdout, lock, text)
    finally:
        inputs.put(_CONNECTION_ENDED)


def _write(stream: TextIO, lock: threading.Lock, text: str) -> None:
    with lock:
        try:
            stream.write(text + "\n")
            stream.flush()
        except (BrokenPipeError, ValueError):
            pass  # the reader went away (or the stream is closed): keep draining silently

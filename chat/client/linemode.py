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

With `connect` (the CLI's --reconnect), a connection that ends without our quit is taken up
again by the printer (chat.client.reconnect.Link): it prints `-- connection lost;
reconnecting in N s`, logs in again, rejoins, prints `-- reconnected as NAME` and the
messages missed, each message shown once (by msg_id). Meanwhile the next command waits for
the new connection. A command whose reply was lost with the connection is reported, not
repeated (it may have been carried out). The end of input while reconnecting stops it: 3.
"""

from __future__ import annotations

import json
import queue
import threading
from collections.abc import Callable, Iterable
from typing import Any, TextIO

from chat.client.backlog import login_backlog, show_backlog
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
from chat.client.errors import ConnectionClosed, Frame, TimedOut
from chat.client.format import format_event, sanitize
from chat.client.reconnect import Link

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
    connect: Callable[[], ChatClient] | None = None,
    password: Callable[[], str] = lambda: "",
    recent: int = 0,
) -> int:
    """Run commands from `stdin` until it ends; return the process exit code.

    `room` is the current room to start with, `rooms` the others the user is in (the
    `welcome`'s list). With `connect`, a lost connection is reconnected (see above), logging
    in with `password()`. With `recent` (not in JSON mode), the last `recent` messages of
    the room are shown first, then the direct messages stored while away
    (chat.client.backlog).
    """
    state = ChatState.start(room, rooms)
    link = Link(client, state, connect=connect, password=password, timeout=timeout)
    backlog = login_backlog(client, link.seen, state.room, 0 if as_json else recent, timeout)
    inputs: queue.SimpleQueue[Any] = queue.SimpleQueue()
    lock = threading.Lock()
    printer = threading.Thread(
        target=_print_events,
        args=(link, stdout, stderr, lock, inputs, as_json, color, backlog),
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
        action = parse_command(item, state.room, state=state)
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
            client = link.current()  # waits out a reconnection in progress
            try:
                perform(client, action, state, timeout)
            except ValueError as exc:  # refused locally: larger than the server accepts
                complain(str(exc))
            except ConnectionClosed:
                if link.next_client(client) is None:
                    break
                complain(f"the connection was lost before the reply to {item.strip()!r}; "
                         "it may or may not have been carried out")
            except TimedOut as exc:
                complain(f"{exc}; giving up")
                link.stop()
                client.close()
                printer.join(timeout)
                return 3
    link.stop()
    client = link.client
    if quitting:
        try:
            client.send({"type": "quit"})
        except ConnectionClosed:
            quitting = False
    printer.join(timeout)  # the server closes after its bye; the printer then ends
    client.close()
    printer.join(timeout)
    if quitting and link.client is not client:  # reconnected just as we quit
        link.client.close()
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
    link: Link,
    stdout: TextIO,
    stderr: TextIO,
    lock: threading.Lock,
    inputs: queue.SimpleQueue[Any],
    as_json: bool,
    color: bool,
    backlog: list[Frame | str],
) -> None:
    def show(frame: Any) -> None:
        if as_json:
            # ensure_ascii (the default) escapes every non-ASCII and control character.
            text: str | None = json.dumps(frame)
        else:
            text = format_event(frame, me=link.client.username, color=color)
        if text is not None:
            _write(stdout, lock, text)

    def notify(text: str) -> None:  # stdout stays pure JSON
        _write(stderr if as_json else stdout, lock, f"-- {sanitize(text, multiline=False)}")

    try:
        if as_json:
            _write(stdout, lock, json.dumps(link.client.hello))
        show_backlog(backlog, show, notify)
        while True:
            for frame in link.client.events():
                if link.seen.fresh(frame):
                    show(frame)
            if not link.resume(show, notify):
                break
    finally:
        link.stop()
        inputs.put(_CONNECTION_ENDED)


def _write(stream: TextIO, lock: threading.Lock, text: str) -> None:
    with lock:
        try:
            stream.write(text + "\n")
            stream.flush()
        except (BrokenPipeError, ValueError):
            pass  # the reader went away (or the stream is closed): keep draining silently

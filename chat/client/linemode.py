"""Line mode: commands from a pipe or a file, every received frame printed one per line.

What goes where
---------------
stdout carries what the server sent, messages, presence and the replies to commands, one
per line, and the answers to /help, /rooms and /switch (with --json: every frame as a JSON
line, errors included, and nothing else). stderr carries the errors, the server's
(`! error CODE: ...`) and the client's own (`chat-client: ...`), and the client's own
notes (`-- ...`: the login backlog's headings, the connection lost and taken up again, a
long message split, a pause the server asked for). So `2>/dev/null` leaves the
conversation, and `>/dev/null` what went wrong.

Every line is delivered or said not to be. Sending is paced to the server's limits and a
refusal for the rate is waited out and sent again (chat.client.connection); a message
longer than the server takes is sent as several (chat.client.limits.split_message), in
order, with a note. When the input has ended, the exit code is EXIT_UNDELIVERED if a
message (a plain line, /me, /msg) was refused, could not be sent, or was lost with the
connection before its reply, or if any command was still refused for the rate after the
resends; 0 if all went through.

Theory of operation
-------------------
Three threads. The main thread runs the commands: it takes the next input from `inputs`, a
queue fed by the stdin reader (a line, or the end of input) and by the printer (the
connection has ended), sends it as a request and waits until the printer has printed the
reply before taking the next, so a script sees the same transcript every time. The printer
prints every frame received, replies included, in the order they arrived: it alone writes
events; /help and local complaints are written under the same `lock`, so lines never
interleave. The printer also follows the rooms the user is in from those frames, as the
terminal UI does (chat.client.commands.ChatState.observe): this session's joins and leaves
from their `ok`, another session's from its presence (`-- you left #dev in another
session; now talking in #general` on stderr) or from a message in a room not known; and a
`not_in_room` refusal for a room the client thought it was in corrects it too. Since the
main thread waits for the printer, the next plain line goes to the room the transcript
says is current. The stdin reader is a
daemon thread: a blocking read cannot be interrupted and must not keep the process alive.

At the end of input the client sends `quit`, lets the printer drain everything up to the
server's `bye` and the close, and exits 0 (or EXIT_UNDELIVERED). If the server ends the
connection first, the transcript is still printed in full and the exit code is 3.

With `connect` (the CLI's --reconnect), a connection that ends without our quit is taken up
again by the printer (chat.client.reconnect.Link): it prints `-- connection lost;
reconnecting in N s`, logs in again, prints `-- reconnected as NAME`, takes the rooms the
server lists as the user's (saying which were left or joined in another session meanwhile,
and the new current room if the old one is gone), then prints the messages missed in each,
each message shown once (by msg_id). Meanwhile the next command waits for
the new connection, so no line is sent into the gap. A command whose reply was lost with
the connection is reported, not repeated (it may have been carried out). The end of input
(or /quit) while reconnecting stops it, and the exit code is 3: unlike a person at the
prompt, who saw the connection go and chose to leave, a script learns only from the exit
code that what was said while the connection was down never reached its output.
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
    NOTES_AFTER,
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
    perform,
    run_local,
)
from chat.client.connection import DEFAULT_TIMEOUT, ChatClient
from chat.client.errors import ConnectionClosed, Frame, TimedOut
from chat.client.format import ENDING_BYES, ME_PREFIX, bye_text, format_event, sanitize
from chat.client.limits import split_message, split_note
from chat.client.printer import Handled
from chat.client.reconnect import Link
from chat.client.roomcommands import about_the_asker

EXIT_OK, EXIT_CONNECTION = 0, 3
EXIT_UNDELIVERED = 4  # the input ended, but not every message was delivered (see above)

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
    handled = Handled()
    printer = threading.Thread(
        target=_print_events,
        args=(link, handled, stdout, stderr, lock, inputs, as_json, color, backlog),
        name="chat-client-printer",
        daemon=True,
    )
    reader = threading.Thread(
        target=_read_lines, args=(stdin, inputs), name="chat-client-stdin", daemon=True
    )
    printer.start()
    reader.start()

    answers = stderr if as_json else stdout  # for /help, /rooms, /switch: stdout stays JSON

    def complain(text: str) -> None:
        _write(stderr, lock, f"chat-client: {text}")

    def note(text: str) -> None:
        _write(stderr, lock, f"-- {text}")

    undelivered = 0
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
            _write(answers, lock, HELP)
        elif isinstance(action, Invalid):
            complain(action.message)
        elif isinstance(action, Notice):  # nothing was sent
            complain(f"not sent: {action.message}")
            undelivered += _is_message(item)
        elif isinstance(action, Switch):
            text = run_local(action, state)
            if text.startswith("! "):
                complain(text[2:])
            else:
                _write(answers, lock, text)
        elif isinstance(action, Passwd):
            complain(INTERACTIVE_ONLY)
        elif isinstance(action, Request):
            outcome = _carry_out(action, item, link, handled, timeout, note, complain)
            if outcome is _ENDED:
                break
            if outcome is _TIMED_OUT:
                link.stop()
                link.client.close()
                printer.join(timeout)
                return EXIT_CONNECTION
            assert isinstance(outcome, int)
            undelivered += outcome
    link.stop()
    if link.interrupted:  # the printer may be in a TLS handshake: no waiting for it
        complain("the input ended while reconnecting: what was said since the connection "
                 "was lost was not caught up")
        return EXIT_CONNECTION
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
    if not quitting:
        complain(_ended_by_server(client))
        return EXIT_CONNECTION
    if undelivered:
        complain(f"{undelivered} message{'' if undelivered == 1 else 's'} not delivered "
                 "(each is said above)")
        return EXIT_UNDELIVERED
    return EXIT_OK


_ENDED = object()  # the connection ended for good
_TIMED_OUT = object()  # no reply in time: the client gives up


def _carry_out(
    action: Request, line: str, link: Link, handled: Handled, timeout: float,
    note: Callable[[str], None], complain: Callable[[str], None],
) -> int | object:
    """Send `action`, split if too long; how many messages were not delivered, or
    _ENDED (the connection is gone for good) or _TIMED_OUT.

    Each reply is waited for until the printer has printed it and followed what it changed
    (a join's or a leave's current room), so the next line goes where the transcript says.
    """
    state = link.state

    def paused(frame: Frame, wait: float) -> None:
        note(f"the server asked to slow down: sending again in {wait:g} s")

    client: ChatClient | None = link.current()  # waits out a reconnection in progress
    assert client is not None
    client.on_resend = paused
    limit = client.limits.max_message_chars
    requests = _split(action, limit)
    if len(requests) > 1:
        note(split_note(len(str(action.frame["message"])), len(requests), limit))
    undelivered = 0
    for request in requests:
        try:
            # The printer follows the rooms from the replies it prints (and from what other
            # sessions do), in the order the frames came; a client whose replies are not
            # events (a library caller's) leaves it to this thread.
            reply = perform(client, request, state, timeout,
                            follow_rooms=not client.replies_are_events)
        except ValueError as exc:  # refused locally: larger than the server accepts
            complain(str(exc))
            undelivered += _is_send(request)
            continue
        except ConnectionClosed:
            client = link.next_client(client)
            if client is None:
                return _ENDED
            client.on_resend = paused
            complain(f"the connection was lost before the reply to {line.strip()!r}; "
                     "it may or may not have been carried out")
            undelivered += _is_send(request)
            continue
        except TimedOut as exc:
            complain(f"{exc}; giving up")
            return _TIMED_OUT
        if client.replies_are_events:
            handled.wait(client, reply.get("re"), timeout)
        room = request.frame.get("room")
        if about_the_asker(request.frame, reply) and isinstance(room, str):
            lost = state.lost(room)  # left in another session, and no presence said so yet
            if lost is not None:
                note(lost)
        hint = explain(request.frame, reply)
        if hint is not None:
            note(hint)
        if reply.get("type") == "error" and (
            _is_send(request) or reply.get("code") == "rate_limited"
        ):
            undelivered += 1  # the server said why; the printer shows it
    return undelivered


def _split(action: Request, limit: int) -> list[Request]:
    """A message longer than `limit` as several requests, in order (a /me one stays /me)."""
    frame = action.frame
    text = frame.get("message")
    if frame.get("type") != "send" or not isinstance(text, str) or len(text) <= limit:
        return [action]
    prefix = ME_PREFIX if text.startswith(ME_PREFIX) else ""
    pieces = split_message(text[len(prefix):], limit - len(prefix))
    return [Request({**frame, "message": prefix + piece}) for piece in pieces]


def _is_send(request: Request) -> bool:
    return request.frame.get("type") == "send"


def _is_message(line: str) -> bool:
    """Whether `line` asks to send a message (in a room it could have been sent to)."""
    action = parse_command(line, "any")
    return isinstance(action, Request) and _is_send(action)


def _ended_by_server(client: ChatClient) -> str:
    if client.bye_reason is None:
        return "the server closed the connection"
    reason = sanitize(client.bye_reason, multiline=False)
    if client.bye_reason in ENDING_BYES:  # said plainly: the session will not come back
        text = bye_text(reason).removeprefix("disconnected: ")
        return f"the server ended the session ({reason}): {text}"
    return f"the server closed the connection ({reason})"


def _read_lines(stdin: TextIO, inputs: queue.SimpleQueue[Any]) -> None:
    try:
        for line in stdin:
            inputs.put(line)
    finally:
        inputs.put(_END_OF_INPUT)


def _print_events(
    link: Link,
    handled: Handled,
    stdout: TextIO,
    stderr: TextIO,
    lock: threading.Lock,
    inputs: queue.SimpleQueue[Any],
    as_json: bool,
    color: bool,
    backlog: list[Frame | str],
) -> None:
    def show(frame: Any, changed: frozenset[str] | None = None) -> None:
        if as_json:
            # ensure_ascii (the default) escapes every non-ASCII and control character.
            _write(stdout, lock, json.dumps(frame))
            return
        text = format_event(frame, me=link.client.username, color=color,
                            current=link.state.room, changed=changed)
        if text is not None:
            warning = frame.get("type") == "error" or (
                frame.get("type") == "e2e" and frame.get("loud") is True)
            _write(stderr if warning else stdout, lock, text)

    def notify(text: str) -> None:
        _write(stderr, lock, f"-- {sanitize(text, multiline=False)}")

    def follow(frame: Frame) -> None:
        # The rooms follow what the frames say (this session's joins and leaves from their
        # `ok`, another session's from its presence or messages), with a note on stderr:
        # before the line it explains, or after an `ok`, which it follows from.
        me = link.client.username
        changed = link.state.changes(frame, me)  # before observing, which keeps the new
        # An `ok` whose event said it already is not repeated (not in JSON: every frame).
        quiet = link.state.echoed(frame, me) and not as_json
        notes = link.state.observe(frame, me)
        after = frame.get("type") in NOTES_AFTER
        if not after:
            for text in notes:
                notify(text)
        if not quiet:
            show(frame, changed)
        if after:
            for text in notes:
                notify(text)

    try:
        if as_json:
            _write(stdout, lock, json.dumps(link.client.hello))
        show_backlog(backlog, follow, notify)
        while True:
            client = link.client
            for frame in client.events():
                if link.seen.fresh(frame):
                    follow(frame)
                handled.mark(client, frame.get("re"))
            if not link.resume(follow, notify):
                break
    finally:
        link.stop()
        handled.close()
        inputs.put(_CONNECTION_ENDED)


def _write(stream: TextIO, lock: threading.Lock, text: str) -> None:
    with lock:
        try:
            stream.write(text + "\n")
            stream.flush()
        except (BrokenPipeError, ValueError):
            pass  # the reader went away (or the stream is closed): keep draining silently

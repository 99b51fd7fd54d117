"""The client library for protocol v1: requests, replies and events over one connection.

Theory of operation
-------------------
The socket belongs to a Transport (chat.client.transport) and its one I/O thread; this
module only ever hands it encoded bytes. Any thread may call `send` and `request` (frames are
encoded in the caller, so a bad frame fails there), and any thread may read events.

In the I/O thread, `_on_data` decodes bytes with a FrameDecoder and routes each frame. Every
frame after `hello`, replies included, goes on the event queue in the order received (unless
`replies_as_events=False`); a reply whose `re` matches a waiting `request` is also handed to
that waiter, after it is queued, so whoever reads events sees it in its place. A server
`ping` is answered with `pong` right there. When the transport ends, `_on_close` fails every
waiting request with ConnectionClosed and queues the end-of-stream marker after the last
frame, so `events()` ends only after it has delivered everything, `bye` included.

`_lock` guards `_waiters`; a request registers its waiter before its bytes are queued, and
the transport refuses bytes once closed, so no waiter is ever left behind.
"""

from __future__ import annotations

import itertools
import queue
import ssl
import threading
import time
from collections.abc import Iterator
from types import TracebackType
from typing import Any

from chat.client.errors import (
    ClientError,
    ConnectionClosed,
    Frame,
    IncompatibleServer,
    ServerError,
    TimedOut,
)
from chat.client.limits import ServerLimits, split_message
from chat.client.transport import Transport, open_tls, remaining
from chat.errors import ProtocolError
from chat.protocol import DEFAULT_MAX_FRAME_BYTES, PROTOCOL_VERSION, FrameDecoder, encode

DEFAULT_TIMEOUT = 10.0  # seconds; the server's own TLS handshake timeout is also 10 s

# Server frames can be far larger than client frames: a history reply holds up to 200
# messages of up to 4000 characters, and a server that escapes non-ASCII as \uXXXX surrogate
# pairs spends 12 bytes on a character: about 9.6 MB. A client can afford 16 MiB; an
# unbounded buffer, which a broken server could fill, it cannot.
MAX_SERVER_FRAME_BYTES = 16 * 1024 * 1024

_END = object()  # end-of-stream marker on the event queue

__all__ = ["DEFAULT_TIMEOUT", "ChatClient", "ServerLimits", "split_message"]


class _Waiter:
    """One pending request: the I/O thread sets `reply` (a frame or an error), then `done`."""

    __slots__ = ("done", "quiet", "reply")

    def __init__(self, quiet: bool = False) -> None:
        self.done = threading.Event()
        self.quiet = quiet  # the reply goes to the waiter only, never on the event queue
        self.reply: Frame | ClientError | None = None


class ChatClient:
    """A connected, greeted protocol-v1 session. Build one with `ChatClient.connect`."""

    def __init__(self, sock: ssl.SSLSocket, *, replies_as_events: bool = True) -> None:
        self._replies_as_events = replies_as_events
        self._decoder = FrameDecoder(MAX_SERVER_FRAME_BYTES)  # I/O thread only
        self._events: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._waiters: dict[int, _Waiter] = {}
        self._ids = itertools.count(1)
        self._transport = Transport(sock, on_data=self._on_data, on_close=self._on_close)
        self.hello: Frame = {}
        self.limits = ServerLimits()  # what `hello` announced, else the v1 defaults
        self.username: str | None = None  # set by a successful `login`
        self.bye_reason: str | None = None
        self.bad_frames = 0  # undecodable lines from the server, dropped (a server bug)

    # -- connecting -------------------------------------------------------------------------

    @classmethod
    def connect(
        cls,
        host: str,
        port: int,
        *,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        replies_as_events: bool = True,
    ) -> ChatClient:
        """Connect, complete the TLS handshake and read the server's `hello` (see `.hello`).

        `timeout` bounds each step. Raises ConnectFailed, TLSFailed (CertificateNotTrusted
        when verification fails), IncompatibleServer, ServerError (the server refused us,
        e.g. server_busy), ConnectionClosed or TimedOut.
        """
        deadline = time.monotonic() + timeout
        sock = open_tls(
            host, port, ssl_context, server_hostname=server_hostname, timeout=timeout
        )
        client = cls(sock, replies_as_events=replies_as_events)
        client._transport.start()
        try:
            client._greet(remaining(deadline))
        except BaseException:
            client.close()
            raise
        return client

    def _greet(self, timeout: float) -> None:
        try:
            first = self.next_event(timeout)
        except TimedOut:
            raise TimedOut(f"no hello from the server within {timeout:.0f} s") from None
        kind = first.get("type")
        if kind == "error":
            raise ServerError.from_frame(first)
        if kind == "bye":
            raise ConnectionClosed(
                f"the server said bye before hello: {first.get('reason')}",
                reason=first.get("reason"),
            )
        if kind != "hello":
            raise IncompatibleServer(f"expected a hello frame, got {kind!r}")
        if first.get("protocol") != PROTOCOL_VERSION:
            raise IncompatibleServer(
                f"the server speaks protocol {first.get('protocol')!r}, "
                f"this client speaks {PROTOCOL_VERSION}"
            )
        self.hello = first
        self.limits = ServerLimits.from_hello(first)

    # -- sending and requests ---------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """True once the connection has ended (the event queue may still hold frames)."""
        return self._transport.closed

    def send(self, frame: Frame) -> None:
        """Queue `frame` for sending and return at once (fire and forget)."""
        self._enqueue(self._encode(frame))

    def request(
        self, frame: Frame, timeout: float = DEFAULT_TIMEOUT, *, quiet: bool = False
    ) -> Frame:
        """Send `frame` with a fresh integer `id` and return the reply whose `re` matches.

        The reply is returned whatever its type, `error` included (see `raise_for_error`).
        With `quiet`, the reply is not also queued as an event (for requests the user did
        not type, such as a reconnect's catch-up).
        Raises TimedOut if none comes within `timeout`, ConnectionClosed if the connection
        ends first.
        """
        with self._lock:
            request_id = next(self._ids)
        data = self._encode({**frame, "id": request_id})
        waiter = _Waiter(quiet)
        self._enqueue(data, request_id, waiter)
        if not waiter.done.wait(timeout):
            with self._lock:
                self._waiters.pop(request_id, None)
            if not waiter.done.is_set():  # the reply may have raced the timeout
                raise TimedOut(f"no reply to {frame.get('type')!r} within {timeout:g} s")
        if isinstance(waiter.reply, ClientError):
            raise waiter.reply
        assert waiter.reply is not None
        return waiter.reply

    def _encode(self, frame: Frame) -> bytes:
        data = encode(frame)
        limit = self.hello.get("max_frame_bytes", DEFAULT_MAX_FRAME_BYTES)
        if type(limit) is int and 0 < limit < len(data):  # not bool; a nonsense limit is none
            # The server would discard it anyway; saying so here names the real problem.
            raise ValueError(f"frame of {len(data)} bytes exceeds the server's limit of {limit}")
        return data

    def _enqueue(
        self, data: bytes, request_id: int | None = None, waiter: _Waiter | None = None
    ) -> None:
        if waiter is not None and request_id is not None:
            with self._lock:
                self._waiters[request_id] = waiter
        try:
            self._transport.send(data)
        except ConnectionClosed:
            if request_id is not None:
                with self._lock:
                    self._waiters.pop(request_id, None)
            raise self._closed_error() from None

    # -- convenience requests (each returns the reply frame, errors included) ---------------

    def register(self, username: str, password: str, timeout: float = DEFAULT_TIMEOUT) -> Frame:
        return self.request(
            {"type": "register", "username": username, "password": password}, timeout
        )

    def login(self, username: str, password: str, timeout: float = DEFAULT_TIMEOUT) -> Frame:
        reply = self.request({"type": "login", "username": username, "password": password}, timeout)
        if reply.get("type") == "welcome":
            self.username = str(reply.get("username", username))
        return reply

    def say(self, room: str, text: str, timeout: float = DEFAULT_TIMEOUT) -> Frame:
        return self.request({"type": "send", "room": room, "message": text}, timeout)

    def direct(self, user: str, text: str, timeout: float = DEFAULT_TIMEOUT) -> Frame:
        return self.request({"type": "send", "to": user, "message": text}, timeout)

    def join(self, room: str, timeout: float = DEFAULT_TIMEOUT) -> Frame:
        return self.request({"type": "join", "room": room}, timeout)

    def leave(self, room: str, timeout: float = DEFAULT_TIMEOUT) -> Frame:
        return self.request({"type": "leave", "room": room}, timeout)

    def who(self, room: str, timeout: float = DEFAULT_TIMEOUT) -> Frame:
        return self.request({"type": "who", "room": room}, timeout)

    def ping(self, timeout: float = DEFAULT_TIMEOUT) -> Frame:
        return self.request({"type": "ping"}, timeout)

    def history(
        self,
        room: str | None = None,
        with_: str | None = None,
        before: int | None = None,
        after: int | None = None,
        limit: int | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> Frame:
        """A room's history, or with `with_` the direct messages exchanged with that user."""
        if (room is None) == (with_ is None):
            raise ValueError("give exactly one of room and with_")
        if before is not None and after is not None:
            raise ValueError("give at most one of before and after")
        frame: Frame = {"type": "history"}
        for key, value in (
            ("room", room), ("with", with_), ("before", before), ("after", after),
            ("limit", limit),
        ):
            if value is not None:
                frame[key] = value
        return self.request(frame, timeout)

    # -- events -----------------------------------------------------------------------------

    def next_event(self, timeout: float | None = None) -> Frame:
        """The next frame received. Raises TimedOut, or ConnectionClosed once all are read."""
        try:
            item = self._events.get(timeout=timeout)
        except queue.Empty:
            raise TimedOut(f"no event within {timeout:g} s") from None
        if item is _END:
            self._events.put(_END)  # keep the end visible to every later call
            raise self._closed_error()
        return item

    def pending_events(self) -> list[Frame]:
        """The frames received and not yet read, without waiting (the end stays queued)."""
        frames: list[Frame] = []
        while True:
            try:
                item = self._events.get_nowait()
            except queue.Empty:
                return frames
            if item is _END:
                self._events.put(_END)
                return frames
            frames.append(item)

    def events(self, timeout: float | None = None) -> Iterator[Frame]:
        """Every frame received, in order, until the connection ends.

        `timeout` bounds each wait; TimedOut is raised if nothing comes within it.
        """
        while True:
            try:
                frame = self.next_event(timeout)
            except ConnectionClosed:
                return
            yield frame

    # -- ending -----------------------------------------------------------------------------

    def quit(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Say `quit`, wait (at most `timeout`) for the server to close, then close."""
        try:
            self.send({"type": "quit"})
        except ConnectionClosed:
            pass
        else:
            self._transport.join(timeout)
        self.close(timeout)

    def close(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Close now, without a goodbye; frames already received stay readable."""
        self._transport.close()
        self._transport.join(timeout)

    def __enter__(self) -> ChatClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<ChatClient {state} user={self.username!r}>"

    def _closed_error(self) -> ConnectionClosed:
        if self.bye_reason is not None:
            message = f"the server closed the connection ({self.bye_reason})"
        else:
            message = "the connection is closed"
        return ConnectionClosed(message, reason=self.bye_reason)

    # -- in the I/O thread --------------------------------------------------------------------

    def _on_data(self, data: bytes) -> None:
        for item in self._decoder.feed(data):
            if isinstance(item, ProtocolError):
                self.bad_frames += 1
            else:
                self._route(item)

    def _route(self, frame: Frame) -> None:
        kind = frame.get("type")
        if kind == "ping":
            pong: Frame = {"type": "pong"}
            if "id" in frame:
                pong["re"] = frame["id"]
            self._transport.send(encode(pong))
        elif kind == "bye":
            self.bye_reason = str(frame.get("reason"))
        waiter = None
        re_id = frame.get("re")
        if type(re_id) is int:  # not bool, which would match id 1
            with self._lock:
                waiter = self._waiters.pop(re_id, None)
        if waiter is None or (self._replies_as_events and not waiter.quiet):
            self._events.put(frame)  # queued before the waiter wakes: order is kept
        if waiter is not None:
            waiter.reply = frame
            waiter.done.set()

    def _on_close(self) -> None:
        with self._lock:
            waiters = list(self._waiters.values())
            self._waiters.clear()
        self._events.put(_END)
        for waiter in waiters:
            waiter.reply = self._closed_error()
            waiter.done.set()

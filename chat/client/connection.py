"""The client library for protocol v1 and v1.1: requests, replies, events over one connection.

What a caller sees
------------------
`request` (and `login`, `say`, `history`, and v1.1's `create`, `invite`, `kick`, `ban`,
`set_role`, `list_rooms`, ...) sends a frame and returns its reply, an `error` frame
included (`raise_for_error` turns one into an exception). `events()` yields what the
server says of its own accord: messages, presence, v1.1's `invited`, `removed`, `role`
and `room`, and last the `bye`, if any;
it ends when the connection does. The sender's own copy of a message it sent is yielded
too: it is a message in the room like any other. Other replies (`welcome`, `ok`, `who`,
...) are not events, and keep-alive pings are answered here and never yielded.
`replies_as_events=True` makes every reply an event as well, in wire order (the CLI
prints its transcripts from that); `replies_as_events=False` keeps even the sender's own
message out. A quiet period is not an error: `events()` waits as long as it takes, unless
given `idle` (stop the iteration, without an error, after that many quiet seconds) or
`timeout` (raise TimedOut instead, as before).

Earlier versions yielded the keep-alive `ping` frames and every reply (`welcome`
included) by default; `replies_as_events=True` gives the replies back, the pings are gone
for good (the library answers them; they were never news).

Sending is paced: every frame but `quit` and `pong` first waits for a token from a
SendPacer (chat.client.limits) set a little under the rate the server announced in
`hello`, so a script piping hundreds of lines waits here rather than being refused there.
A request refused with `rate_limited` anyway (frames bunched on the way, an older
server, a login throttled for a few seconds) is sent again once `retry_after` has passed,
up to MAX_RESENDS times and only for waits up to MAX_RESEND_WAIT; those refusals are not
events, and `on_resend`, if set, is told of each wait. Only the last refusal reaches the
caller. A frame sent with `send` (no id, no reply to match) is paced but never resent.

Theory of operation
-------------------
The socket belongs to a Transport (chat.client.transport) and its one I/O thread; this
module only ever hands it encoded bytes. Any thread may call `send` and `request` (frames are
encoded, and paced, in the caller, so a bad frame fails there), and any thread may read
events.

In the I/O thread, `_on_data` decodes bytes with a FrameDecoder and routes each frame. A
frame that is an event goes on the event queue in the order received; a reply whose `re`
matches a waiting `request` is handed to that waiter after it is queued (if it is queued
at all), so whoever reads events sees it in its place. A server `ping` is answered with
`pong` right there. The I/O thread also follows `last_msg_id`: the `welcome`'s, raised by
every `message` received; and it counts the stored direct messages the `welcome`
announced as they come (`direct_position`). When the transport ends, `_on_close` fails
every waiting request with ConnectionClosed and queues the end-of-stream marker after the
last frame, so `events()` ends only after it has delivered everything, `bye` included.

`_lock` guards `_waiters`; a request registers its waiter before its bytes are queued, and
the transport refuses bytes once closed, so no waiter is ever left behind.
"""

from __future__ import annotations

import itertools
import queue
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Any

from chat.client.errors import (
    ClientError,
    ConnectionClosed,
    Frame,
    IncompatibleServer,
    ServerError,
    TimedOut,
    certificate_refusal,
)
from chat.client.limits import SendPacer, ServerLimits, split_message
from chat.client.positions import Positions
from chat.client.transport import Transport, open_tls, remaining, where
from chat.errors import ProtocolError
from chat.protocol import DEFAULT_MAX_FRAME_BYTES, PROTOCOL_VERSION, FrameDecoder, encode

DEFAULT_TIMEOUT = 10.0  # seconds; the server's own TLS handshake timeout is also 10 s

# Server frames can be far larger than client frames: a history reply holds up to 200
# messages of up to 4000 characters, and a server that escapes non-ASCII as \uXXXX surrogate
# pairs spends 12 bytes on a character: about 9.6 MB. A client can afford 16 MiB; an
# unbounded buffer, which a broken server could fill, it cannot.
MAX_SERVER_FRAME_BYTES = 16 * 1024 * 1024

# A `rate_limited` refusal is waited out and the request sent again at most this many
# times: with the client pacing itself, one resend nearly always goes through; a request
# refused five times running is refused for a reason pacing cannot cure.
MAX_RESENDS = 5
# ... and only when the server asks for at most this wait. The frame rate asks for a
# second or two, a login slowed after failures for a few; longer waits (registrations per
# address and hour, an account locked after many failures) are refusals the user should
# hear about, not a silent pause.
MAX_RESEND_WAIT = 10.0  # seconds
RESEND_WAIT = 1.0  # seconds, when a `rate_limited` names no usable `retry_after`

# Frames the server never refuses for the rate (quit ends a flood; a pong answers its ping),
# and which must not wait: the I/O thread itself sends the pong.
_UNPACED = frozenset({"quit", "pong"})

_END = object()  # end-of-stream marker on the event queue

__all__ = ["DEFAULT_TIMEOUT", "ChatClient", "ServerLimits", "split_message"]


def _with_reason(kind: str, room: str, username: str, reason: str | None) -> Frame:
    frame: Frame = {"type": kind, "room": room, "username": username}
    if reason is not None:
        frame["reason"] = reason
    return frame


def resend_wait(reply: Frame) -> float | None:
    """The seconds to wait before sending a request again, or None: `reply` is final."""
    if reply.get("type") != "error" or reply.get("code") != "rate_limited":
        return None
    wait = reply.get("retry_after")
    if isinstance(wait, bool) or not isinstance(wait, int | float) or not 0 <= wait < 1e9:
        return RESEND_WAIT
    return float(wait) if wait <= MAX_RESEND_WAIT else None


class _Waiter:
    """One pending request: the I/O thread sets `reply` (a frame or an error), then `done`."""

    __slots__ = ("done", "quiet", "reply", "resendable")

    def __init__(self, quiet: bool = False, resendable: bool = False) -> None:
        self.done = threading.Event()
        self.quiet = quiet  # the reply goes to the waiter only, never on the event queue
        self.resendable = resendable  # a refusal that will be waited out is no event either
        self.reply: Frame | ClientError | None = None


class ChatClient:
    """A connected, greeted protocol-v1 session. Build one with `ChatClient.connect`."""

    def __init__(
        self, sock: ssl.SSLSocket, *, replies_as_events: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._replies_as_events = replies_as_events
        self._decoder = FrameDecoder(MAX_SERVER_FRAME_BYTES)  # I/O thread only
        self._events: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._waiters: dict[int, _Waiter] = {}
        self._ids = itertools.count(1)
        self._ended = threading.Event()  # set once the transport has ended
        self._clock = clock
        self._transport = Transport(sock, on_data=self._on_data, on_close=self._on_close)
        self.hello: Frame = {}
        self.limits = ServerLimits()  # what `hello` announced, else the v1 defaults
        self.pacer = SendPacer.for_server(self.limits, clock)
        self.username: str | None = None  # set by a successful `login`
        # The newest msg_id this session is known to have had: the welcome's `last_msg_id`,
        # raised by each message received. None before login, or from a server that does
        # not say. Where a catch-up after a lost connection starts (chat.client.reconnect).
        self.last_msg_id: int | None = None
        # Over several nodes ids commit in order only within a conversation, and the
        # welcome says where each stands (`positions`): then the catch-up starts from
        # each room's and the direct messages' own, raised by what came in each. None
        # from a server that does not say (one node: `last_msg_id` is every one's).
        self.positions: Positions | None = None
        # The stored direct messages the welcome announced (`backlog`): the id before the
        # first, how many, and how many of them came (direct messages at or below
        # `_backlog_upto`, the welcome's last_msg_id or, over several nodes, its direct
        # position, read before it: later ones are live). Written by the I/O thread only,
        # read (direct_position) once the connection has ended.
        self._backlog_before: int | None = None
        self._backlog_count = 0
        self._backlog_received = 0
        self._backlog_upto: int | None = None
        self.bye_reason: str | None = None
        self.bad_frames = 0  # undecodable lines from the server, dropped (a server bug)
        # Called (frame, seconds) in the requesting thread before a refused request is
        # waited out and sent again; for telling the user why nothing happens meanwhile.
        self.on_resend: Callable[[Frame, float], None] | None = None

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
        replies_as_events: bool | None = None,
    ) -> ChatClient:
        """Connect, complete the TLS handshake and read the server's `hello` (see `.hello`).

        `timeout` bounds each step. Raises ConnectFailed, TLSFailed (CertificateNotTrusted
        when the server's certificate does not verify, ClientCertificateRefused when the
        server wants a client certificate and got none or refused it), IncompatibleServer,
        ServerError (the server refused us, e.g. server_busy), ConnectionClosed or TimedOut.
        `replies_as_events`: see the module's docstring.
        """
        deadline = time.monotonic() + timeout
        sock = open_tls(
            host, port, ssl_context, server_hostname=server_hostname, timeout=timeout
        )
        client = cls(sock, replies_as_events=replies_as_events)
        client._transport.start()
        try:
            client._greet(remaining(deadline), where(host, port))
        except BaseException:
            client.close()
            raise
        return client

    def _greet(self, timeout: float, peer: str) -> None:
        try:
            first = self.next_event(timeout)
        except TimedOut:
            raise TimedOut(f"no hello from the server within {timeout:.0f} s") from None
        except ConnectionClosed:
            # With TLS 1.3 a server that wants a client certificate says so only after
            # our side of the handshake is done: as an alert, on our first read.
            refusal = certificate_refusal(self._transport.failure, peer)
            if refusal is not None:
                raise refusal from self._transport.failure
            raise
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
        self.pacer = SendPacer.for_server(self.limits, self._clock)

    # -- sending and requests ---------------------------------------------------------------

    @property
    def direct_position(self) -> int | None:
        """Where this session's direct messages stand, if short of `last_msg_id`.

        None unless the `welcome` announced stored direct messages (`backlog`) and fewer
        of them came than it said (the connection was lost while they were being handed
        over): then the id just before the first, from which a catch-up of the direct
        messages must start, as the rest are older than `last_msg_id`.
        """
        if self._backlog_before is None or self._backlog_received >= self._backlog_count:
            return None
        return self._backlog_before

    @property
    def replies_are_events(self) -> bool:
        """Whether every reply is also an event (`replies_as_events=True`)."""
        return self._replies_as_events is True

    @property
    def closed(self) -> bool:
        """True once the connection has ended (the event queue may still hold frames)."""
        return self._transport.closed

    def send(self, frame: Frame) -> None:
        """Send `frame` (fire and forget): paced, but with no reply to wait for or resend."""
        data = self._encode(frame)
        if frame.get("type") not in _UNPACED:
            self._pace()
        self._enqueue(data)

    def request(
        self, frame: Frame, timeout: float = DEFAULT_TIMEOUT, *, quiet: bool = False
    ) -> Frame:
        """Send `frame` with a fresh integer `id` and return the reply whose `re` matches.

        The reply is returned whatever its type, `error` included (see `raise_for_error`);
        a `rate_limited` refusal is first waited out and the frame sent again (see the
        module's docstring). With `quiet`, the reply is not an event even with
        `replies_as_events` (for requests the user did not type, such as a reconnect's
        catch-up).
        Raises TimedOut if no reply comes within `timeout` (each attempt),
        ConnectionClosed if the connection ends first.
        """
        attempt = 0
        while True:
            resendable = attempt < MAX_RESENDS
            reply = self._request_once(frame, timeout, quiet, resendable)
            wait = resend_wait(reply) if resendable else None
            if wait is None:
                return reply
            attempt += 1
            self.pacer.hold(wait)
            if self.on_resend is not None:
                self.on_resend(frame, wait)

    def _request_once(
        self, frame: Frame, timeout: float, quiet: bool, resendable: bool
    ) -> Frame:
        with self._lock:
            request_id = next(self._ids)
        data = self._encode({**frame, "id": request_id})
        self._pace()
        waiter = _Waiter(quiet, resendable)
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

    def _pace(self) -> None:
        """Wait for the pacer's token; ConnectionClosed if the connection ends meanwhile."""
        delay = self.pacer.reserve()
        if delay > 0 and self._ended.wait(delay):
            raise self._closed_error()

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

    def register(
        self, username: str, password: str, timeout: float = DEFAULT_TIMEOUT, *,
        token: str | None = None,
    ) -> Frame:
        """Create an account; `token` for a server whose registration needs one (v1.1:
        hello's `"registration":"token"`)."""
        frame: Frame = {"type": "register", "username": username, "password": password}
        if token is not None:
            frame["token"] = token
        return self.request(frame, timeout)

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

    # -- version 1.1: rooms with access control (docs/protocol.md) ----------------------------

    def create(
        self, room: str, visibility: str | None = None, history: str | None = None,
        timeout: float = DEFAULT_TIMEOUT, *, encrypted: bool = False,
    ) -> Frame:
        """Make `room` ("public" or "private"; history "shared" or "joined"), owned by us;
        left out, the server's defaults (public; shared, or joined for a private room).
        `encrypted` makes it private and end-to-end encrypted for good (a SecureClient
        then encrypts what is said there)."""
        frame: Frame = {"type": "create", "room": room}
        if encrypted:
            frame["visibility"], frame["encrypted"] = "private", True
        if visibility is not None:
            frame["visibility"] = visibility
        if history is not None:
            frame["history"] = history
        return self.request(frame, timeout)

    def invite(self, room: str, username: str, timeout: float = DEFAULT_TIMEOUT) -> Frame:
        return self.request({"type": "invite", "room": room, "username": username}, timeout)

    def kick(
        self, room: str, username: str, reason: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> Frame:
        return self.request(_with_reason("kick", room, username, reason), timeout)

    def ban(
        self, room: str, username: str, reason: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> Frame:
        return self.request(_with_reason("ban", room, username, reason), timeout)

    def unban(self, room: str, username: str, timeout: float = DEFAULT_TIMEOUT) -> Frame:
        return self.request({"type": "unban", "room": room, "username": username}, timeout)

    def set_role(
        self, room: str, username: str, role: str, timeout: float = DEFAULT_TIMEOUT
    ) -> Frame:
        """Make `username` "owner", "moderator" or "member" of `room` (owners only)."""
        return self.request(
            {"type": "set_role", "room": room, "username": username, "role": role}, timeout
        )

    def set_topic(self, room: str, topic: str, timeout: float = DEFAULT_TIMEOUT) -> Frame:
        """Set the topic ("" clears it)."""
        return self.request({"type": "topic", "room": room, "topic": topic}, timeout)

    def set_history(self, room: str, history: str, timeout: float = DEFAULT_TIMEOUT) -> Frame:
        """"shared" (members read all) or "joined" (only since their join); owners only."""
        return self.request({"type": "set_history", "room": room, "history": history}, timeout)

    def room_info(self, room: str, timeout: float = DEFAULT_TIMEOUT) -> Frame:
        """The `room` frame: visibility, history, topic, members, our role."""
        return self.request({"type": "room_info", "room": room}, timeout)

    def members(self, room: str, timeout: float = DEFAULT_TIMEOUT) -> Frame:
        return self.request({"type": "members", "room": room}, timeout)

    def list_rooms(self, timeout: float = DEFAULT_TIMEOUT) -> Frame:
        """The public rooms and ours (and those we are invited to): the `rooms` frame."""
        return self.request({"type": "list_rooms"}, timeout)

    def block(self, username: str, timeout: float = DEFAULT_TIMEOUT) -> Frame:
        return self.request({"type": "block", "username": username}, timeout)

    def unblock(self, username: str, timeout: float = DEFAULT_TIMEOUT) -> Frame:
        return self.request({"type": "unblock", "username": username}, timeout)

    def history(
        self,
        room: str | None = None,
        with_: str | None = None,
        before: int | None = None,
        after: int | None = None,
        limit: int | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        *,
        direct: bool = False,
    ) -> Frame:
        """A room's history; with `with_`, the direct messages exchanged with that user;
        with `direct`, the user's direct messages with anyone (for catching up)."""
        if (room is not None) + (with_ is not None) + direct != 1:
            raise ValueError("give exactly one of room, with_ and direct")
        if before is not None and after is not None:
            raise ValueError("give at most one of before and after")
        frame: Frame = {"type": "history"}
        for key, value in (
            ("room", room), ("with", with_), ("direct", direct or None), ("before", before),
            ("after", after), ("limit", limit),
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

    def events(
        self, timeout: float | None = None, *, idle: float | None = None
    ) -> Iterator[Frame]:
        """Every event received, in order, until the connection ends (see the docstring).

        By default it waits as long as it takes. With `idle`, the iteration stops, without
        an error, once nothing has come for `idle` seconds; with `timeout`, TimedOut is
        raised instead.
        """
        waits = [t for t in (idle, timeout) if t is not None]
        quiet_ends = idle is not None and (timeout is None or idle <= timeout)
        while True:
            try:
                frame = self.next_event(min(waits, default=None))
            except ConnectionClosed:
                return
            except TimedOut:
                if quiet_ends:
                    return
                raise
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
            return  # answered: a keep-alive is no news to anyone
        if kind == "bye":
            self.bye_reason = str(frame.get("reason"))
        elif kind == "welcome":
            self._note_welcome(frame)
        elif kind == "message":
            self._note_backlog(frame)
            self._note_msg_id(frame.get("msg_id"))
            if self.positions is not None:
                self.positions.note(frame)
        waiter = None
        re_id = frame.get("re")
        if type(re_id) is int:  # not bool, which would match id 1
            with self._lock:
                waiter = self._waiters.pop(re_id, None)
        if waiter is None or self._reply_is_event(frame, waiter):
            self._events.put(frame)  # queued before the waiter wakes: order is kept
        if waiter is not None:
            waiter.reply = frame
            waiter.done.set()

    def _reply_is_event(self, frame: Frame, waiter: _Waiter) -> bool:
        if waiter.quiet or (waiter.resendable and resend_wait(frame) is not None):
            return False
        if self._replies_as_events is None:
            return frame.get("type") == "message"  # the sender's own copy of its message
        return self._replies_as_events

    def _note_welcome(self, frame: Frame) -> None:
        last, backlog = frame.get("last_msg_id"), frame.get("backlog")
        self._note_msg_id(last)
        if type(last) is int:
            self.positions = Positions.from_welcome(frame.get("positions"), last)
        if type(last) is not int or not isinstance(backlog, dict):
            return
        count, first = backlog.get("count"), backlog.get("first_msg_id")
        if type(count) is int and type(first) is int and count > 0:
            self._backlog_upto = last if self.positions is None else self.positions.direct
            self._backlog_count = count
            self._backlog_before = first - 1

    def _note_backlog(self, frame: Frame) -> None:
        msg_id = frame.get("msg_id")
        if (self._backlog_upto is not None and "to" in frame and type(msg_id) is int
                and msg_id <= self._backlog_upto):
            self._backlog_received += 1

    def _note_msg_id(self, msg_id: object) -> None:
        if type(msg_id) is int and (self.last_msg_id is None or msg_id > self.last_msg_id):
            self.last_msg_id = msg_id  # one int store: readers in other threads see either

    def _on_close(self) -> None:
        with self._lock:
            waiters = list(self._waiters.values())
            self._waiters.clear()
        self._ended.set()
        self._events.put(_END)
        for waiter in waiters:
            waiter.reply = self._closed_error()
            waiter.done.set()

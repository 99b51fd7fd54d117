"""One client connection's life: TLS handshake, frames in, requests dispatched, bytes out.

Theory of operation
-------------------
A `Connection` lives on one `IOLoop` thread. Only that thread changes `state`, the
decoder or the inbox, and it does every read, handshake and close of the SSLSocket.

Other threads talk to it in two ways only:
- `deliver(bytes)` (the hub, the store writer, the auth workers). When nothing is queued
  or half-written and no thread is in the TLS object (`_ssl_lock`, tried, never waited
  for), the caller writes the bytes itself with one non-blocking `send`; whatever the
  socket does not take then waits for the loop. Otherwise the bytes are appended to the
  outbound queue under `_olock` and the loop is asked to flush. It never blocks. When
  the queue holds more than `max_outbound_bytes`, the client is not reading: the loop
  drops what is queued, sends `bye slow_consumer` and closes, and no one else waits.
- `loop.call_soon(...)` continuations, e.g. when a login has been checked.

Writing from the store writer saves, for each recipient of a fan-out, the loop's
wake-up and the GIL handoff between threads it costs; bench (a), 3 runs each: p99 10.2
ms before, 6.4 ms after, with (b) unchanged. `_ssl_lock` keeps OpenSSL's rule that one
SSL object is never used by two threads at once.

The loop writes everything queued in one `send` (one TLS write of many frames), and
retries a write that would block with the very same bytes, as OpenSSL requires.

Requests that need a password check (register, login, passwd) pause the connection: no
further frame is handled until the answer is out, so replies keep request order and a
client may pipeline. Everything that touches the database or fans out goes through the
store's writer queue, in order, so a `send` after a `join` always sees the join.

Errors become `error` frames in exactly one place: `_handle`.
"""

from __future__ import annotations

import collections
import enum
import logging
import selectors
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from chat import login, rooms
from chat import messages as m
from chat.errors import (
    AuthRequired,
    ChatError,
    Internal,
    ProtocolError,
    RateLimited,
    ServerBusy,
)
from chat.hub import Session
from chat.protocol import PROTOCOL_VERSION, FrameDecoder, encode
from chat.store import Job
from chat.throttle import TokenBucket

if TYPE_CHECKING:
    from chat.ioloop import IOLoop
    from chat.server import Server

log = logging.getLogger(__name__)

READ, WRITE = selectors.EVENT_READ, selectors.EVENT_WRITE
RECV_SIZE = 65536
# Reads per readiness event before other connections get a turn.
READS_PER_WAKE = 8
# Frames handled per turn before other connections of the loop get theirs.
FRAMES_PER_TURN = 64
# One TLS write holds at most this much; the rest follows when it is done.
MAX_WRITE = 256 * 1024


class State(enum.IntEnum):
    HANDSHAKE = 0
    OPEN = 1  # TLS up, not logged in
    READY = 2  # logged in
    CLOSING = 3  # flushing the last frames
    DRAINING = 4  # our side shut, reading until the peer closes
    CLOSED = 5


PING = encode({"type": "ping"})  # the same bytes every time
# What a write under _ssl_lock can end in, besides done (None) and an error.
_BLOCKED, _WANTS_READ = object(), object()


class Connection:
    def __init__(self, server: Server, loop: IOLoop, raw: socket.socket, addr: Any) -> None:
        self.server = server
        self.loop = loop
        self.settings = settings = server.settings
        self.peer = f"{addr[0]}:{addr[1]}" if isinstance(addr, tuple) else str(addr)
        self.ip = server.address_key(addr)  # what per-address limits count: IPv6 by network
        raw.setblocking(False)
        self.sock: ssl.SSLSocket = server.ssl_context.wrap_socket(
            raw, server_side=True, do_handshake_on_connect=False
        )
        now = time.monotonic()
        self.state = State.HANDSHAKE
        self.handshake_deadline = now + settings.handshake_timeout
        # Absolute from connect: trickling bytes cannot extend it.
        self.login_deadline = now + settings.login_timeout
        self.close_deadline = 0.0
        self.last_recv = now
        self.ping_sent = False
        # Three quarters of the way to the idle deadline: every ping is a TLS round trip
        # for the server, and what is left (30 s at the defaults, less the loop's timer
        # slack, which is at most an eighth) is still ample time for a pong.
        self._ping_after = settings.idle_timeout * 0.75
        self.decoder = FrameDecoder(settings.max_frame_bytes)
        self.bucket = TokenBucket(settings.frames_per_second, settings.frame_burst)
        self.inbox: collections.deque[Any] = collections.deque()
        self.paused = False
        self._read_scheduled = False
        self._pongs_owed = 0  # pings we sent that were not answered yet
        self.taking_requests = True
        self.errors_in_row = 0
        self.session: Session | None = None
        # A login in progress: its session exists (so a close can detach it) but is not
        # attached to the hub until the writer says so.
        self.pending_session: Session | None = None
        self.backlog_more = False  # stored direct messages still to hand over
        self.close_reason = ""
        # Outbound state, shared with other threads under _olock.
        self._olock = threading.Lock()
        self._out: collections.deque[bytes] = collections.deque()
        self._out_bytes = 0
        self._flush_scheduled = False
        self._out_closed = False
        self._overflowed = False
        # Held by whichever thread is inside the TLS object: the loop for every read,
        # handshake and close, any thread for a write (see `deliver`). OpenSSL forbids
        # two threads in one SSL object at once. Taken before _olock, never after it.
        self._ssl_lock = threading.Lock()
        # Bytes a write left half-sent, to be retried as they are; under _ssl_lock.
        self._wbuf: bytes | None = None
        # Loop-thread-only write state.
        self._want = 0
        self._handshake_wants = READ
        self._registered = 0  # the selector events currently registered
        self._update_interest()
        loop.handlers.add(self)
        loop.schedule(self, min(self.handshake_deadline, self.login_deadline))

    def __repr__(self) -> str:
        who = self.session.name if self.session else "-"
        return f"<Connection {self.peer} {self.state.name} user={who}>"

    # --- from any thread ------------------------------------------------------------
    def accepting(self) -> bool:
        return not (self._out_closed or self._overflowed)

    def deliver(self, data: bytes) -> bool:
        """Queue bytes for this client, or write them now; False if they will never be sent.

        From any thread. When nothing is queued or half-written and no other thread is in
        the TLS object, the bytes go out at once from the calling thread: for the store
        writer's fan-out that saves each recipient's loop a wake-up and the GIL handoffs
        that come with it. The attempt never waits, for the lock or for the socket.
        """
        if self._ssl_lock.acquire(blocking=False):
            try:
                took = self._send_now(data)
            finally:
                self._ssl_lock.release()
            if took is not None:
                return took
        with self._olock:
            if self._out_closed or self._overflowed:
                return False
            if self._out_bytes + len(data) > self.settings.max_outbound_bytes:
                # Take nothing more: the loop drops the queue and says bye.
                self._overflowed = True
                self.loop.call_soon(self._slow_consumer)
                return False
            self._out.append(data)
            self._out_bytes += len(data)
            ask = self._claim_flush()
        if ask:
            self.loop.call_soon(self._flush)
        return True

    def _send_now(self, data: bytes) -> bool | None:
        """Under _ssl_lock: write `data` unless something is ahead of it (then None)."""
        state = self.state
        if state is not State.READY and state is not State.OPEN:
            return None
        with self._olock:
            if self._out_closed or self._overflowed:
                return False
            if self._out or self._wbuf is not None:
                return None
            if len(data) > self.settings.max_outbound_bytes:
                return None  # the queue's path says slow_consumer
        try:
            sent = self.sock.send(data)
        except (ssl.SSLWantWriteError, ssl.SSLWantReadError):
            sent = 0
        except (ssl.SSLError, OSError):
            # The loop meets the same error when it retries, and closes the connection.
            sent = 0
        if sent == len(data):
            return True
        # The rest waits for the loop, which retries with these very bytes, as OpenSSL
        # requires after a write that would block.
        rest = data[sent:] if sent else data
        with self._olock:
            self._wbuf = rest
            self._out_bytes += len(rest)
            ask = self._claim_flush()
        if ask:
            self.loop.call_soon(self._flush)
        return True

    def _claim_flush(self) -> bool:
        """Under _olock: True if the caller is the one to ask the loop for a flush.

        One pending _flush per connection, however many threads deliver meanwhile; the
        caller schedules it after leaving _olock, which the loop's thread also takes.
        """
        if self._flush_scheduled:
            return False
        self._flush_scheduled = True
        return True

    def end(self, reason: str) -> None:
        """Close this connection with `bye reason`; from any thread."""
        self.loop.call_soon(self.close, reason)

    def send_frame(self, frame: dict[str, Any]) -> None:
        self.deliver(encode(frame))

    def reply(self, rid: m.RequestId, frame: dict[str, Any]) -> None:
        if rid is not None:
            frame["re"] = rid
        self.deliver(encode(frame))

    def send_error(self, exc: ChatError, rid: m.RequestId = None) -> None:
        self.deliver(encode(exc.to_frame(rid)))

    # --- selector events (loop thread) ----------------------------------------------
    def on_io(self, mask: int) -> None:
        if self.state == State.HANDSHAKE:
            self._handshake()
            return
        if mask & WRITE:
            self._write()
        if mask & READ and self.state != State.CLOSED:
            if self.state == State.DRAINING:
                self._drain()
            else:
                self._read()

    def tick(self, now: float) -> float | None:
        """Enforce this connection's deadlines; returns when to look again."""
        state = self.state
        if state == State.HANDSHAKE:
            if now > self.handshake_deadline:
                log.info("%s: TLS handshake timed out", self.peer)
                self._abort()
                return None
            return self.handshake_deadline
        if state in (State.CLOSING, State.DRAINING):
            if now > self.close_deadline:
                self._abort()
                return None
            return self.close_deadline
        if state == State.CLOSED:
            return None
        if state == State.OPEN:
            if now > self.login_deadline:
                self.close("login_timeout")
                return self.close_deadline
            return self.login_deadline
        silent = now - self.last_recv
        if silent > self.settings.idle_timeout:
            self.close("idle")
            return self.close_deadline
        if silent > self._ping_after and not self.ping_sent:
            self.ping_sent = True
            self._pongs_owed += 1
            self.deliver(PING)
        if self.ping_sent:
            return self.last_recv + self.settings.idle_timeout
        return self.last_recv + self._ping_after

    # --- handshake ------------------------------------------------------------------
    def _handshake(self) -> None:
        try:
            with self._ssl_lock:
                self.sock.do_handshake()
                version, cipher = self.sock.version(), (self.sock.cipher() or ("?",))[0]
        except ssl.SSLWantReadError:
            self._handshake_wants = READ
        except ssl.SSLWantWriteError:
            self._handshake_wants = WRITE
        except (ssl.SSLError, OSError) as exc:
            # Plaintext, a wrong protocol version or a client that hung up: no JSON answer.
            log.info("%s: TLS handshake failed: %s", self.peer, exc)
            self._abort()
            return
        else:
            self.state = State.OPEN
            log.info("%s: connected (%s, %s)", self.peer, version, cipher)
            self.send_frame({
                "type": "hello", "protocol": PROTOCOL_VERSION,
                "server": self.server.server_id,
                "max_frame_bytes": self.settings.max_frame_bytes,
                "min_password_length": self.settings.min_password_length,
            })
            self._read()
        self._update_interest()

    # --- reading --------------------------------------------------------------------
    def _schedule_read(self) -> None:
        if not self._read_scheduled:
            self._read_scheduled = True
            self.loop.call_soon(self._read)

    def _read(self) -> None:
        self._read_scheduled = False
        if self.inbox and not self._process_inbox():
            # Frames from the last turn still wait: handle them before reading more, so a
            # client that floods is slowed by TCP instead of growing our memory.
            self._schedule_read()
            return
        for _ in range(READS_PER_WAKE):
            if self.paused or self.state not in (State.OPEN, State.READY):
                return
            try:
                with self._ssl_lock:
                    data = self.sock.recv(RECV_SIZE)
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                return
            except (ssl.SSLError, OSError) as exc:
                log.info("%s: connection error: %s", self.peer, exc)
                self._abort()
                return
            if not data:
                self.close(None, "client closed the connection")
                return
            self.last_recv = time.monotonic()
            self.ping_sent = False
            self.inbox.extend(self.decoder.feed(data))
            if not self._process_inbox():
                break
        # Not finished: let the other connections of this loop have a turn first.
        self._schedule_read()

    def _process_inbox(self) -> bool:
        """Handle up to FRAMES_PER_TURN frames; True unless some are left for later."""
        for _ in range(FRAMES_PER_TURN):
            if not self.inbox or self.paused or self.state not in (State.OPEN, State.READY):
                return True
            self._handle(self.inbox.popleft())
        return not self.inbox

    def _pause(self) -> None:
        self.paused = True
        self._update_interest()

    def stop_reading(self) -> None:
        """Shutdown, step one: take no more requests (what is queued still goes out)."""
        self.taking_requests = False
        self._pause()

    def _resume(self) -> None:
        if not self.taking_requests:
            return
        self.paused = False
        if self.state in (State.OPEN, State.READY):
            self._update_interest()
            # Frames may wait in the inbox, and the TLS layer may hold bytes the selector
            # will not report again: _read sees to both.
            self._read()

    def _handle(self, event: Any) -> None:
        rid: m.RequestId = None
        try:
            # quit is never refused (it ends the flood), nor a pong answering our ping.
            kind = event.get("type") if isinstance(event, dict) else None
            exempt = kind == "quit" or (kind == "pong" and self._pongs_owed > 0)
            if exempt and kind == "pong":
                self._pongs_owed -= 1
            wait = 0.0 if exempt else self.bucket.take()
            if wait:
                # Not delivered and not a protocol error; the id is echoed when it is valid.
                if isinstance(event, dict):
                    rid = _id_or_none(event)
                raise RateLimited(wait, "too many frames; slow down")
            if isinstance(event, ProtocolError):
                if event.frame is not None:
                    rid = _id_or_none(event.frame)
                raise event
            rid = m.request_id(event)
            request = m.parse_request(event, rid)
            handler = _HANDLERS[type(request)]
            if self.session is None and not handler.before_login:
                raise AuthRequired()
            self.errors_in_row = 0
            handler.fn(self, request)
        except ProtocolError as exc:
            self.send_error(exc, rid)
            self.errors_in_row += 1
            if self.errors_in_row >= self.settings.max_errors_in_row:
                self.close("too_many_errors")
        except ChatError as exc:
            self.send_error(exc, rid)
        except Exception:
            log.exception("%s: unexpected error handling a request", self.peer)
            self.send_error(Internal(), rid)

    # --- request handlers (loop thread) ---------------------------------------------
    def _on_ping(self, req: m.Ping) -> None:
        self.reply(req.id, {"type": "pong"})

    def _on_pong(self, req: m.Pong) -> None:
        pass  # receiving it already reset the idle clock

    def _on_quit(self, req: m.Quit) -> None:
        self.close("quit")

    # --- helpers --------------------------------------------------------------------
    def require_session(self) -> Session:
        if self.session is None:
            raise AuthRequired()
        return self.session

    def in_order(self, rid: m.RequestId, fn: Callable[[], None]) -> None:
        """Run fn on the writer thread after everything this connection queued before."""
        self.server.store.submit(Job(lambda db: fn, lambda exc: self.send_error(exc, rid)))

    def submit_auth(
        self, work: Callable[[], None], on_busy: Callable[[], object] | None = None
    ) -> None:
        """Run a password check on the pool and pause until `finish_auth` or `logged_in`."""
        try:
            self.server.auth_pool.submit(work)
        except ServerBusy:
            if on_busy is not None:
                on_busy()
            raise  # answered at once by _handle; nothing is paused
        self._pause()

    def finish_auth(
        self, rid: m.RequestId, result: dict[str, Any] | ChatError, *, clear_pending: bool = False
    ) -> None:
        """From any thread: answer a paused auth request and resume reading."""
        if isinstance(result, ChatError):
            self.send_error(result, rid)
        else:
            self.reply(rid, result)
        self.loop.call_soon(self._resumed_after_auth, clear_pending)

    def _resumed_after_auth(self, clear_pending: bool) -> None:
        if clear_pending:
            self.pending_session = None
        self._resume()

    def clear_pending(self) -> None:
        self.pending_session = None

    def logged_in(self, session: Session, attached: bool, more: bool) -> None:
        """Loop thread: the writer attached (or could not attach) the new session."""
        self.pending_session = None
        if not attached or self.state not in (State.OPEN, State.READY):
            self.server.hub.detach(session)
            return
        self.session = session
        self.state = State.READY
        # From here the idle deadlines apply, earlier than the login deadline's timer.
        self.loop.schedule(self, self.last_recv + self._ping_after)
        self.backlog_more = more
        log.info("%s: %s logged in", self.peer, session.name)
        self._resume()
        if more:
            self._write()  # asks for the next page once the first has gone out

    def _next_backlog_page(self) -> None:
        """The queue has drained: hand over the next page of stored direct messages."""
        session, store = self.session, self.server.store
        if session is None:
            return
        self.backlog_more = False
        budget = self.settings.max_outbound_bytes // 4

        def run(db: Any) -> Callable[[], None]:
            frames, more = store.take_undelivered(db, session.user_id, budget)

            def after() -> None:
                taken = [f["msg_id"] for f in frames]
                if not all([session.out.deliver(encode(f)) for f in frames]):
                    store.correct_marks(taken, False)
                elif more:
                    self.loop.call_soon(self._want_more_backlog)

            return after

        store.submit(Job(run, lambda exc: log.error("%s: backlog: %s", self.peer, exc)))

    def _want_more_backlog(self) -> None:
        self.backlog_more = True
        self._write()

    def _detach(self) -> None:
        """Leave the hub: at once when stopping, else after this user's queued work.

        Going through the writer keeps the order: a `presence leave` never overtakes the
        user's last messages. A login in progress is detached at once, so that its
        attach, whenever the writer gets to it, fails and keeps the direct messages.
        """
        hub = self.server.hub
        if self.pending_session is not None:
            hub.detach(self.pending_session)
        session = self.session
        if session is None:
            return
        if self.server.stopping:
            hub.detach(session, quiet=True)
            return
        self.server.store.submit(Job(lambda db: (lambda: hub.detach(session)),
                                     lambda exc: hub.detach(session)))

    # --- writing (loop thread) ------------------------------------------------------
    def _flush(self) -> None:
        with self._olock:
            self._flush_scheduled = False
        self._write()

    def _write(self) -> None:
        if self.state in (State.HANDSHAKE, State.DRAINING, State.CLOSED):
            return
        with self._ssl_lock:
            outcome = self._send_queued()
        if outcome is _BLOCKED:
            self._want_write(True)
            return
        if outcome is _WANTS_READ:
            return  # TLS wants the peer first (a key update); reading resumes it
        if outcome is not None:
            log.info("%s: write failed: %s", self.peer, outcome)
            self._abort()
            return
        self._want_write(False)
        if self.state == State.CLOSING:
            self._shut_down()
        elif self.backlog_more and self.state == State.READY:
            self._next_backlog_page()

    def _send_queued(self) -> object:
        """Under _ssl_lock: write until the queue is empty (None) or the socket is full."""
        while True:
            if self._wbuf is None:
                with self._olock:
                    if not self._out:
                        return None
                    out = self._out
                    if self._out_bytes <= MAX_WRITE:
                        chunk = b"".join(out)
                        out.clear()
                    else:
                        parts, size = [], 0
                        while out and size < MAX_WRITE:
                            part = out.popleft()
                            parts.append(part)
                            size += len(part)
                        chunk = b"".join(parts)
                self._wbuf = chunk
            try:
                sent = self.sock.send(self._wbuf)
            except ssl.SSLWantWriteError:
                return _BLOCKED
            except ssl.SSLWantReadError:
                return _WANTS_READ
            except (ssl.SSLError, OSError) as exc:
                return exc
            with self._olock:
                self._out_bytes -= sent
            self._wbuf = self._wbuf[sent:] or None

    def _want_write(self, want: bool) -> None:
        flag = WRITE if want else 0
        if (self._want & WRITE) != flag:
            self._want = (self._want & ~WRITE) | flag
            self._update_interest()

    def _slow_consumer(self) -> None:
        if self.state >= State.CLOSING:
            return
        with self._ssl_lock, self._olock:
            dropped = self._out_bytes - (len(self._wbuf) if self._wbuf else 0)
            self._out.clear()
            self._out_bytes -= dropped
            self._overflowed = False  # so that close() can queue the bye
        log.warning("%s: not reading; dropped %d queued bytes", self.peer, dropped)
        self.close("slow_consumer")

    # --- closing (loop thread) ------------------------------------------------------
    def close(self, reason: str | None, detail: str = "") -> None:
        """Say bye (if reason), flush, shut down our side, then close. Idempotent."""
        if self.state >= State.CLOSING:
            return
        if self.state == State.HANDSHAKE:
            self._abort()
            return
        self.state = State.CLOSING
        self.close_reason = reason or detail
        self.close_deadline = time.monotonic() + self.settings.shutdown_grace
        self.loop.schedule(self, self.close_deadline)
        self._detach()
        with self._olock:
            if reason is not None:
                bye = encode({"type": "bye", "reason": reason})
                self._out.append(bye)
                self._out_bytes += len(bye)
            self._out_closed = True
        log.info("%s: closing (%s)", self.peer, self.close_reason or "closed")
        self._update_interest()
        self._write()

    def _shut_down(self) -> None:
        """Everything is written: send close_notify and FIN, then wait for the peer's close.

        Closing with unread bytes from the peer would make the kernel send a reset, which
        can destroy our last frames (the bye) before the client reads them.
        """
        try:
            with self._ssl_lock:
                self.sock.unwrap()
        except (ssl.SSLError, OSError, ValueError):
            pass  # close_notify is out, or the peer is gone: either way we are done
        try:
            with self._ssl_lock:
                self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._abort()
            return
        self.state = State.DRAINING
        self._want = 0
        self._update_interest()

    def _drain(self) -> None:
        try:
            with self._ssl_lock:
                while self.sock.recv(RECV_SIZE):
                    pass
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            pass
        self._abort()

    def _abort(self) -> None:
        """Close the socket now, without a goodbye."""
        if self.state == State.CLOSED:
            return
        prev, self.state = self.state, State.CLOSED
        # The loop's timers may hold this object a while yet: keep it small.
        self.inbox.clear()
        if prev < State.CLOSING:
            self._detach()
        with self._olock:
            self._out_closed = True
            self._out.clear()
        if self._registered:
            self.loop.selector.unregister(self.sock)
            self._registered = 0
        self.loop.handlers.discard(self)
        try:
            with self._ssl_lock:
                self.sock.close()
        except OSError:
            pass
        self.server.connection_closed(self.ip)
        if prev >= State.OPEN and prev < State.CLOSING:
            log.info("%s: disconnected", self.peer)

    def _update_interest(self) -> None:
        state = self.state
        if state == State.CLOSED:
            return
        if state == State.HANDSHAKE:
            events = self._handshake_wants
        elif state == State.DRAINING:
            events = READ
        else:
            reading = state in (State.OPEN, State.READY) and not self.paused
            events = (READ if reading else 0) | (self._want & WRITE)
        if events == self._registered:
            return
        if not self._registered:
            self.loop.selector.register(self.sock, events, self)
        elif events:
            self.loop.selector.modify(self.sock, events, self)
        else:
            self.loop.selector.unregister(self.sock)
        self._registered = events


def _id_or_none(frame: dict[str, Any]) -> m.RequestId:
    try:
        return m.request_id(frame)
    except ProtocolError:
        return None


class _Handler:
    __slots__ = ("before_login", "fn")

    def __init__(self, fn: Callable[[Connection, Any], None], before_login: bool) -> None:
        self.fn = fn
        self.before_login = before_login


# An explicit table from request type to handler: nothing is looked up by a name the
# client sent.
_HANDLERS: dict[type, _Handler] = {
    m.Register: _Handler(login.register, True),
    m.Login: _Handler(login.login, True),
    m.Ping: _Handler(Connection._on_ping, True),
    m.Pong: _Handler(Connection._on_pong, True),
    m.Quit: _Handler(Connection._on_quit, True),
    m.Send: _Handler(rooms.send, False),
    m.Join: _Handler(rooms.join, False),
    m.Leave: _Handler(rooms.leave, False),
    m.Who: _Handler(rooms.who, False),
    m.History: _Handler(rooms.history, False),
    m.Passwd: _Handler(login.passwd, False),
}

"""One client connection's life: TLS handshake, frames in, requests dispatched, bytes out.

Theory of operation
-------------------
A `Connection` lives on one `IOLoop` thread. Only that thread changes `state`, the
decoder and the holds, and it does every read, handshake and close of the SSLSocket.

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
    ServerBusy,
)
from chat.hub import Session
from chat.protocol import FrameDecoder, encode
from chat.store import Job, MessageJob
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
# What a peer may still send after our side closed, while we wait for its close so that
# our last frames are not lost to a reset: a flooder gets the reset instead.
DRAIN_LIMIT = 256 * 1024


class State(enum.IntEnum):
    HANDSHAKE = 0
    OPEN = 1  # TLS up, not logged in
    READY = 2  # logged in
    CLOSING = 3  # flushing the last frames
    DRAINING = 4  # our side shut, reading until the peer closes
    CLOSED = 5


# Why a connection handles no frame for now (a bit mask, `Connection._holds`).
HOLD_AUTH = 1  # a password check is running: replies keep request order
HOLD_RATE = 2  # over its frame rate or reply budget, until the tokens are there
HOLD_WRITER = 4  # too much of its work waits for the store's writer
HOLD_SHUTDOWN = 8  # the server is stopping

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
        # What this connection's replies (history, who) may cost; see `charge_reply`.
        self.reply_budget = TokenBucket(settings.reply_bytes_per_second,
                                        settings.reply_bytes_burst)
        self._holds = 0  # why no frame is handled now: a mask of the HOLD_* reasons
        self._waiting: Any = None  # a parsed frame waiting for its token
        self._read_scheduled = False
        # Requests handed to the store's writer, and how many it has finished: the
        # difference is what this connection has in flight there. Each is written by one
        # thread only (the loop, the writer).
        self._submitted = 0
        self._completed = 0
        self._writer_release_at = -1  # held for the writer until in flight <= this
        self._drained = 0  # bytes read and dropped after our side closed
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
        # A write ended in "want read": TLS needs the peer's bytes first, so the next
        # read event must retry the write too (nothing else may ever ask for it).
        self._write_wants_read = False
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
        if mask & WRITE or (mask & READ and self._write_wants_read):
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
            self.deliver(self.server.hello)
            self._read()
        self._update_interest()

    # --- reading --------------------------------------------------------------------
    def _schedule_read(self) -> None:
        if not self._read_scheduled:
            self._read_scheduled = True
            self.loop.call_soon(self._read)

    def _read(self) -> None:
        self._read_scheduled = False
        # Frames already buffered come first: a client that sends faster than its
        # limits allow is slowed by TCP, not by our memory.
        if not self._process():
            return
        for _ in range(READS_PER_WAKE):
            if self._holds or self.state not in (State.OPEN, State.READY):
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
            self.decoder.push(data)
            if not self._process():
                return
        # Not finished: let the other connections of this loop have a turn first.
        self._schedule_read()

    def _process(self) -> bool:
        """Handle buffered frames; True when none is left, False if held or out of turn.

        Frames are parsed one at a time, and each is handled only once the frame rate
        and the reply budget allow, so whatever one read brought in, a connection costs
        what its limits allow and no more: at most one frame is parsed ahead. Over the
        rate nothing is refused: the connection is held until the tokens are there, and
        TCP holds back the rest.
        """
        for _ in range(FRAMES_PER_TURN):
            if self._holds or self.state not in (State.OPEN, State.READY):
                return False
            event, self._waiting = self._waiting, None
            if event is None:
                event = self.decoder.next_event()
                if event is None:
                    return True
            # A pong to our ping and a quit cost no token: keeping the connection alive
            # or ending it never uses up what the user has for chatting.
            kind = event.get("type") if isinstance(event, dict) else None
            if kind == "pong" and self._pongs_owed > 0:
                self._pongs_owed -= 1
            elif kind != "quit":
                wait = self.bucket.wait(1.0) or self.reply_budget.wait(0.0)
                if wait:
                    self._waiting = event  # parsed once; handled when its token is there
                    self._hold(HOLD_RATE)
                    self.loop.call_later(wait, self._release, HOLD_RATE)
                    return False
                self.bucket.spend(1.0)
            self._handle(event)
        self._schedule_read()
        return False

    def _hold(self, reason: int) -> None:
        if not self._holds:
            self._holds = reason
            self._update_interest()
        else:
            self._holds |= reason

    def _release(self, reason: int) -> None:
        if not self._holds & reason:
            return
        self._holds &= ~reason
        if not self._holds and self.state in (State.OPEN, State.READY):
            # Time spent held was ours, not the client's silence.
            self.last_recv = time.monotonic()
            self._update_interest()
            # Frames may wait in the decoder, and the TLS layer may hold bytes the
            # selector will not report again: _read sees to both.
            self._read()

    def stop_reading(self) -> None:
        """Shutdown, step one: take no more requests (what is queued still goes out)."""
        self._hold(HOLD_SHUTDOWN)

    def _handle(self, event: Any) -> None:
        rid: m.RequestId = None
        try:
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

    def submit(self, job: Job | MessageJob) -> None:
        """Hand a job to the store's writer, after this connection's earlier ones.

        Back-pressure: while too much of this connection's work waits for the writer, or
        the writer's queue as a whole is long, the connection handles no more frames, so
        a client that outpaces the writer is slowed by TCP and the queue stays bounded
        (by `writer_queue_limit`, plus one job per connection).
        """
        self._submitted += 1
        store = self.server.store
        store.submit(job)
        limit = self.settings.max_requests_in_flight
        if store.backlog > self.settings.writer_queue_limit:
            self._hold_for_writer(0)
        elif self._submitted - self._completed >= limit:
            self._hold_for_writer(limit // 2)

    def _hold_for_writer(self, release_at: int) -> None:
        self._writer_release_at = release_at
        self._hold(HOLD_WRITER)
        # The writer may have caught up between the count above and the flag.
        if self._submitted - self._completed <= release_at:
            self._writer_release_at = -1
            self._release(HOLD_WRITER)

    def job_done(self) -> None:
        """Writer thread: one of this connection's jobs is finished (done or refused)."""
        self._completed += 1
        release_at = self._writer_release_at
        if release_at >= 0 and self._submitted - self._completed <= release_at:
            self._writer_release_at = -1
            self.loop.call_soon(self._release, HOLD_WRITER)

    def in_order(self, rid: m.RequestId, fn: Callable[[], None]) -> None:
        """Run fn on the writer thread after everything this connection queued before."""
        self.submit(Job(lambda db: fn, lambda exc: self.send_error(exc, rid), owner=self))

    def charge_reply(self, reserved: int, actual: int) -> None:
        """Loop thread: a reply weighed `actual` bytes, of which `reserved` were spent."""
        self.reply_budget.spend(actual - reserved)
        if actual < reserved:
            self._release(HOLD_RATE)  # it may be enough now; _process checks again

    def submit_auth(
        self, work: Callable[[], None], on_busy: Callable[[], object] | None = None
    ) -> None:
        """Run a password check on the pool; hold until `finish_auth` or `logged_in`."""
        try:
            self.server.auth_pool.submit(work)
        except ServerBusy:
            if on_busy is not None:
                on_busy()
            raise  # answered at once by _handle; nothing is held
        self._hold(HOLD_AUTH)

    def finish_auth(
        self, rid: m.RequestId, result: dict[str, Any] | ChatError, *, clear_pending: bool = False
    ) -> None:
        """From any thread: answer a held auth request and resume reading."""
        if isinstance(result, ChatError):
            self.send_error(result, rid)
        else:
            self.reply(rid, result)
        self.loop.call_soon(self._resumed_after_auth, clear_pending)

    def _resumed_after_auth(self, clear_pending: bool) -> None:
        if clear_pending:
            self.pending_session = None
        self._release(HOLD_AUTH)

    def clear_pending(self) -> None:
        self.pending_session = None

    def logged_in(self, session: Session, attached: bool, more: bool) -> None:
        """Loop thread: the writer attached (or could not attach) the new session."""
        self.pending_session = None
        if not attached or self.state not in (State.OPEN, State.READY):
            self._leave_hub(session)
            return
        self.session = session
        self.state = State.READY
        # From here the idle deadlines apply, earlier than the login deadline's timer.
        self.loop.schedule(self, self.last_recv + self._ping_after)
        self.backlog_more = more
        log.info("%s: %s logged in", self.peer, session.name)
        self._release(HOLD_AUTH)
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
        """Leave the hub, through the writer, after this connection's queued work.

        Going through the writer keeps the order: a `presence leave` never overtakes the
        user's last messages. A login in progress is marked closed at once, so that its
        attach, if the writer has not got to it yet, fails and keeps the direct messages.
        """
        if self.pending_session is not None:
            self._leave_hub(self.pending_session)
        if self.session is not None:
            self._leave_hub(self.session)

    def _leave_hub(self, session: Session) -> None:
        session.closed = True
        if self.server.stopping:
            return  # nobody is told of a shutdown's leaves, and the writer is finishing
        hub = self.server.hub
        # The hub belongs to the writer thread; a refusal (shutdown) leaves it alone.
        self.server.store.submit(Job(lambda db: (lambda: hub.detach(session)),
                                     lambda exc: None))

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
        self._write_wants_read = outcome is _WANTS_READ
        if outcome is _BLOCKED:
            self._want_write(True)
            return
        if outcome is _WANTS_READ:
            # TLS needs the peer's bytes first (a key update, say): the next read event
            # retries this write (on_io), and reading must be on even while held.
            self._want_write(False)
            self._update_interest()
            return
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
                while data := self.sock.recv(RECV_SIZE):
                    self._drained += len(data)
                    if self._drained > DRAIN_LIMIT:
                        break  # still sending after our bye: it gets a reset instead
                else:
                    data = b""
            if data:
                log.info("%s: still sending after the close; reset", self.peer)
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
        # Other threads may hold this object a while yet (a history read, a fan-out's
        # list of recipients): free what it holds now, and its timer.
        self.loop.cancel(self)
        self.decoder = FrameDecoder(2)
        self._waiting = None
        if prev < State.CLOSING:
            self._detach()
        with self._ssl_lock, self._olock:
            self._out_closed = True
            self._out.clear()
            self._out_bytes = 0
            self._wbuf = None
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
            reading = state in (State.OPEN, State.READY) and not self._holds
            events = ((READ if reading or self._write_wants_read else 0)
                      | (self._want & WRITE))
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

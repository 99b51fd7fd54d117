"""One client connection's requests: frames in, paced, dispatched; sessions in and out.

Theory of operation
-------------------
A `Connection` is a `TlsStream` (chat.tls_stream: the socket, bytes out from any thread,
the close) that speaks the chat protocol. It lives on one `IOLoop` thread, and only that
thread changes its state, its decoder and its holds. Other threads reach it through
`deliver(bytes)` and `loop.call_soon(...)` continuations (a checked password, a
finished writer job).

Frames are parsed one at a time and handled only when the connection's limits allow: the
frame rate and the reply budget (held until the tokens are there, never refused), a
password check in progress (held, so replies keep request order and a client may
pipeline), too much of its work waiting for the store's writer (held: back-pressure).
While held, the connection reads nothing more, so TCP slows the client instead of our
memory growing.

Everything that touches the database or fans out goes through the store's writer queue,
in order, so a `send` after a `join` always sees the join; membership is decided there.

Errors become `error` frames in exactly one place: `_handle`.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from chat import keys, login, moderation, rooms, todevice
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
from chat.tls_stream import RECV_SIZE, State, TlsStream

if TYPE_CHECKING:
    from chat.ioloop import IOLoop
    from chat.server import Server

log = logging.getLogger(__name__)

__all__ = ["HOLD_AUTH", "HOLD_RATE", "HOLD_READ", "HOLD_SHUTDOWN", "HOLD_WRITER", "RECV_SIZE",
           "Connection", "State"]

# Reads per readiness event before other connections get a turn.
READS_PER_WAKE = 8
# Frames handled per turn before other connections of the loop get theirs.
FRAMES_PER_TURN = 64

# Why a connection handles no frame for now (a bit mask, `Connection._holds`).
HOLD_AUTH = 1  # a password check is running: replies keep request order
HOLD_RATE = 2  # over its frame rate or reply budget, until the tokens are there
HOLD_WRITER = 4  # too much of its work waits for the store's writer
HOLD_SHUTDOWN = 8  # the server is stopping
HOLD_READ = 16  # its history read is running; the next history waits for it
# Requests whose reply is read or built apart and charged to the reply budget when done:
# one at a time per connection (`reads_in_flight`).
WEIGHED_READS = frozenset({"history", "list_rooms", "members"})

PING = encode({"type": "ping"})  # the same bytes every time
# Seconds before asking again for a page of stored direct messages whose job failed.
BACKLOG_RETRY = 1.0


class Connection(TlsStream):
    def __init__(self, server: Server, loop: IOLoop, raw: socket.socket, addr: Any) -> None:
        self.settings = settings = server.settings
        super().__init__(
            server.ssl_context, loop, raw,
            f"{addr[0]}:{addr[1]}" if isinstance(addr, tuple) else str(addr),
            handshake_timeout=settings.handshake_timeout,
            max_outbound_bytes=settings.max_outbound_bytes,
            shutdown_grace=settings.shutdown_grace,
        )
        self.server = server
        self.ip = server.address_key(addr)  # what per-address limits count: IPv6 by network
        now = time.monotonic()
        # Absolute from connect: trickling bytes cannot extend it.
        self.login_deadline = now + settings.login_timeout
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
        # What parsing its frames may cost, in bytes read: a frame's CPU grows with its size.
        self.read_budget = TokenBucket(settings.read_bytes_per_second,
                                       2 * settings.max_frame_bytes)
        self._holds = 0  # why no frame is handled now: a mask of the HOLD_* reasons
        self.reads_in_flight = 0  # history reads on the read pool (loop thread only)
        self._waiting: Any = None  # a parsed frame waiting for its token
        self._read_scheduled = False
        # Requests handed to the store's writer, and how many it has finished: the
        # difference is what this connection has in flight there. Each is written by one
        # thread only (the loop, the writer).
        self._submitted = 0
        self._completed = 0
        self._writer_release_at = -1  # held for the writer until in flight <= this
        self._pongs_owed = 0  # pings we sent that were not answered yet
        self.errors_in_row = 0
        self.session: Session | None = None
        # A login in progress: its session exists (so a close can detach it) but is not
        # attached to the hub until the writer says so.
        self.pending_session: Session | None = None
        self.backlog_more = False  # stored direct messages still to hand over
        self.close_reason = ""
        self._update_interest()
        loop.handlers.add(self)
        loop.schedule(self, min(self.handshake_deadline, self.login_deadline))

    def __repr__(self) -> str:
        who = self.session.name if self.session else "-"
        return f"<Connection {self.peer} {self.state.name} user={who}>"

    # --- from any thread ------------------------------------------------------------
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

    # --- the stream's hooks (loop thread) -------------------------------------------
    def _on_open(self) -> None:
        self.deliver(self.server.hello)
        self._read()

    def _on_readable(self) -> None:
        self._read()

    def _reading_wanted(self) -> bool:
        return not self._holds

    def _on_flushed(self) -> None:
        if self.backlog_more and self.state == State.READY:
            self._next_backlog_page()

    def _on_closing(self) -> None:
        self._detach()

    def _on_slow_consumer(self) -> None:
        self.close("slow_consumer")

    def _on_closed(self, prev: State) -> None:
        self.decoder = FrameDecoder(2)
        self._waiting = None
        if prev < State.CLOSING:
            self._detach()
        self.server.connection_closed(self.ip)
        if prev >= State.OPEN and prev < State.CLOSING:
            log.info("%s: disconnected", self.peer)

    def tick(self, now: float) -> float | None:
        """Enforce this connection's deadlines; returns when to look again."""
        state = self.state
        if state == State.OPEN:
            if now > self.login_deadline:
                self.close("login_timeout")
                return self.close_deadline
            return self.login_deadline
        if state != State.READY:
            return self.stream_tick(now)
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
            data = self._recv()
            if data is None:
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
                # What it took to parse, whatever it was: a frame of thousands of
                # numbers costs a millisecond, an empty line microseconds.
                self.read_budget.spend(self.decoder.last_size)
            # A pong to our ping and a quit never wait: keeping the connection alive or
            # ending it must not queue behind the user's chatting. They still spend their
            # token (into debt if need be), so a flood of them is paced all the same:
            # the next frame that may wait, waits for it.
            kind = event.get("type") if isinstance(event, dict) else None
            if kind in WEIGHED_READS and self.reads_in_flight:
                # One weighed read at a time per connection: the read pool is everyone's,
                # and each reply is charged before the next one starts.
                self._waiting = event
                self._hold(HOLD_READ)
                return False
            if kind == "pong" and self._pongs_owed > 0:
                self._pongs_owed -= 1
            elif kind != "quit":
                wait = (self.bucket.ready(1.0) or self.reply_budget.ready(0.0)
                        or self.read_budget.ready(0.0))
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
        """Loop thread: a history read is over; it weighed `actual`, `reserved` was spent."""
        self.reads_in_flight -= 1
        self.reply_budget.spend(actual - reserved)
        self._release(HOLD_READ)
        if actual < reserved:
            self._release(HOLD_RATE)  # it may be enough now; _process checks again

    def reply_charged(self, rid: m.RequestId, frame: dict[str, Any]) -> None:
        """Any thread (the writer's continuation): send a reply now, in the caller's order,
        and charge its size to the reply budget on the loop (`keys`, which a later
        `device_list` notice must not overtake)."""
        if rid is not None:
            frame["re"] = rid
        data = encode(frame)
        self.deliver(data)
        self.loop.call_soon(self.reply_budget.spend, len(data))

    def reply_weighed(self, rid: m.RequestId, frame: dict[str, Any]) -> None:
        """Loop thread: encode and send a reply whose size is what it costs (`who`)."""
        if rid is not None:
            frame["re"] = rid
        data = encode(frame)
        self.deliver(data)
        self.reply_budget.spend(len(data))

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

        def failed(exc: ChatError) -> None:
            # The page stays stored (its marks were rolled back): try again in a while,
            # not never, nor at once against a database that just failed.
            log.error("%s: backlog: %s", self.peer, exc)
            self.loop.call_soon(self.loop.call_later, BACKLOG_RETRY, self._want_more_backlog)

        store.submit(Job(run, failed))

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
        hub, store = self.server.hub, self.server.store

        def failed(exc: ChatError) -> None:
            # A batch that failed to commit still detaches (nothing was to be stored),
            # or the session stays in the hub for good; a refusal at shutdown comes on
            # this thread, and then the hub, the writer's, is left alone.
            if store.on_writer_thread():
                hub.detach(session)

        store.submit(Job(lambda db: (lambda: hub.detach(session)), failed))

    # --- closing (loop thread) ------------------------------------------------------
    def close(self, reason: str | None, detail: str = "") -> None:
        """Say bye (if reason), flush, shut down our side, then close. Idempotent."""
        if self.state >= State.CLOSING:
            return
        self.close_reason = reason or detail
        bye = encode({"type": "bye", "reason": reason}) if reason is not None else None
        self.close_with(bye, self.close_reason or "closed")


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
    m.Create: _Handler(rooms.create, False),
    m.RoomInfo: _Handler(rooms.room_info, False),
    m.Members: _Handler(rooms.members, False),
    m.ListRooms: _Handler(rooms.list_rooms, False),
    m.Invite: _Handler(moderation.invite, False),
    m.Kick: _Handler(moderation.kick, False),
    m.Ban: _Handler(moderation.ban, False),
    m.Unban: _Handler(moderation.unban, False),
    m.SetRole: _Handler(moderation.set_role, False),
    m.Topic: _Handler(moderation.topic, False),
    m.SetHistory: _Handler(moderation.set_history, False),
    m.BlockUser: _Handler(moderation.block, False),
    m.UnblockUser: _Handler(moderation.unblock, False),
    m.UploadDevice: _Handler(keys.upload_device, False),
    m.UploadOneTimeKeys: _Handler(keys.upload_one_time_keys, False),
    m.QueryKeys: _Handler(keys.query_keys, False),
    m.ClaimKey: _Handler(keys.claim_key, False),
    m.ToDevice: _Handler(todevice.send, False),
    m.ToDeviceAck: _Handler(todevice.ack, False),
}

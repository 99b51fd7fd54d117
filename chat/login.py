"""The password-checked requests: register, login and passwd.

Theory of operation
-------------------
Each starts on the connection's loop thread, which checks what is cheap (field rules,
password strength, throttling) and pauses the connection. The bcrypt work then runs on
the bounded auth pool; what it decides is written by the store's writer thread; the
writer's continuation answers and resumes the connection (`Connection.finish_auth`).

Every path out of a started request ends in exactly one `finish_auth` (or, for a login,
`logged_in`), and settles its throttling admission, whatever fails on the way: a refusal,
a commit that fails, an unexpected exception.

Races the writer settles: a login whose password was checked against a hash that a
`passwd` has replaced since is refused; a login whose connection closed meanwhile finds
its session detached, and its stored direct messages are put back for the next login.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from chat import messages as m
from chat.accounts import consume_token, token_usable
from chat.auth import check_new_password
from chat.conversations import user_conv
from chat.errors import (
    AccountDisabled,
    AlreadyAuthenticated,
    ChatError,
    Internal,
    InvalidCredentials,
    InvalidToken,
    InvalidUsername,
    RegistrationClosed,
    ServerBusy,
)
from chat.hub import Session
from chat.moderation import reachable
from chat.protocol import encode
from chat.roombook import audit
from chat.store import Job, now_ms

if TYPE_CHECKING:
    from chat.connection import Connection

log = logging.getLogger(__name__)

# Session ids: 192 random bits (ASVS 5.0 7.2.3 asks at least 128).
SESSION_ID_BYTES = 24


def _guarded(conn: Connection, rid: m.RequestId, work: Callable[[], None],
             on_error: Callable[[], None] = lambda: None,
             clear_pending: bool = False) -> Callable[[], None]:
    """Run `work` on the pool; any unexpected exception still answers and resumes."""

    def run() -> None:
        try:
            work()
        except Exception:
            log.exception("%s: password check failed", conn.peer)
            on_error()
            conn.finish_auth(rid, Internal(), clear_pending=clear_pending)

    return run


def _serving(conn: Connection) -> None:
    if conn.server.fenced:
        # Cut off from the cluster's other nodes (chat.cluster): a session here could miss
        # what they decide. The balancer sends the client to another node.
        raise ServerBusy("this node cannot reach the rest of the cluster; try again")


def register(conn: Connection, req: m.Register) -> None:
    if conn.session is not None:
        raise AlreadyAuthenticated()
    _serving(conn)
    if not m.valid_username(req.username):
        raise InvalidUsername()
    server, rid = conn.server, req.id
    password = check_new_password(
        req.password, req.username, min_length=conn.settings.min_password_length,
        service_name=server.name,
    )
    ip = conn.ip
    counted_at = server.throttle.register_attempt(ip)
    # After the count: refusals by policy count toward the address's limit, so that
    # guessing tokens is as slow as registering.
    token = req.token if server.registration == "token" else None
    if server.registration == "closed":
        raise RegistrationClosed()
    if server.registration == "token" and not token:
        raise InvalidToken()
    hashed = False

    def give_back() -> None:
        # Once the bcrypt work is done the attempt counts, whatever the answer (a taken
        # name included: it tells the client something). Before it, a refusal is ours.
        if not hashed:
            server.throttle.registration_released(ip, counted_at)

    def work() -> None:
        nonlocal hashed
        if token is not None:
            with server.store.engine.connect() as db:
                usable = token_usable(db, token, now_ms())
            if not usable:  # not worth a bcrypt hash; consumed for real below
                conn.finish_auth(rid, InvalidToken())
                return
        # Hash first, even for a taken name: the reply takes as long either way.
        password_hash = server.hasher.hash(password)
        hashed = True

        def run(db: Any) -> Callable[[], None]:
            ms = now_ms()
            # In this job's savepoint: a name found taken below gives the use back.
            token_id = consume_token(db, token, ms) if token is not None else None
            rec = server.store.create_user(db, req.username, password_hash)
            if token_id is not None:
                audit(db, ms, rec.name, "register", target=rec.name, detail=f"token {token_id}")
            log.info("%s: registered %s", conn.peer, rec.name)
            return lambda: conn.finish_auth(
                rid, {"type": "ok", "op": "register", "username": rec.name}
            )

        server.store.submit(Job(run, lambda exc: conn.finish_auth(rid, exc)))

    conn.submit_auth(_guarded(conn, rid, work, on_error=give_back), on_busy=give_back)


def login(conn: Connection, req: m.Login) -> None:
    if conn.session is not None or conn.pending_session is not None:
        raise AlreadyAuthenticated()
    _serving(conn)
    server, rid, ip = conn.server, req.id, conn.ip
    key = req.username.lower()
    server.throttle.check_login(ip, key)
    # Made here, on the loop thread, so that a close from now on detaches it.
    session = Session(0, key, req.username, secrets.token_urlsafe(SESSION_ID_BYTES), out=conn)
    settled = False

    def settle(outcome: Callable[[str, str], None]) -> None:
        nonlocal settled
        if not settled:
            settled = True
            outcome(ip, key)

    def refuse(exc: ChatError) -> None:
        conn.finish_auth(rid, exc, clear_pending=True)

    def work() -> None:
        rec = server.store.find_user(key) if m.valid_username(req.username) else None
        if not server.hasher.verify(req.password, rec.password_hash if rec else None):
            log.info("%s: failed login for %r", conn.peer, req.username[:40])
            settle(server.throttle.login_failed)
            refuse(InvalidCredentials())
            return
        assert rec is not None
        settle(server.throttle.login_succeeded)
        session.user_id, session.name = rec.id, rec.name
        new_hash = server.hasher.hash(req.password) if server.hasher.needs_rehash(
            rec.password_hash) else None
        budget = conn.settings.max_outbound_bytes // 4

        def run(db: Any) -> Callable[[], None]:
            if not server.store.password_hash_is(db, rec.id, rec.password_hash):
                raise InvalidCredentials()  # a passwd got in between: check again
            if server.store.disabled(db, rec.id):
                raise AccountDisabled()  # only now: the right password was given
            if new_hash is not None:
                server.store.set_password_hash(db, rec.id, new_hash)
            # The user's rooms as of this point in the writer's order: an online user's
            # are in the hub (the writer's own), else in the database.
            # (Not from a state whose sessions the operator is ending: it holds none.)
            online = server.hub.user_state(rec.key)
            rooms = (sorted(online.rooms) if online and not online.ended
                     else server.store.rooms_of(db, rec.id))
            waiting, first_waiting = server.store.undelivered(db, rec.id)
            backlog, more = server.store.take_undelivered(db, rec.id, budget)
            # Over a cluster: where this node starts following the session's
            # conversations, if it did not yet, and where their live messages begin for
            # the session (chat.cluster).
            cursors = server.store.follow(db, rooms, rec.id)
            # Everything stored after this reaches the session live (the writer attaches
            # it before any later fan-out), so a client catching up after a reconnect
            # asks for what is newer than the larger of this and the last id it got.
            # Read after the cursors: another node may commit a message between the two
            # reads, which must not be above this and yet at or below its room's cursor
            # (it would reach the session neither live nor in the client's catching up).
            last_msg_id = server.store.newest(db)
            # No direct message stored before the session began reaches it live, as on
            # one node: over a cluster a node may still be delivering one to the user's
            # other sessions. The backlog's came with it, the others are history; and a
            # client counts its backlog as the direct messages up to last_msg_id.
            session.dm_floor = max(backlog[-1]["msg_id"] if backlog else 0,
                                   cursors.get(user_conv(rec.id), 0))

            def after() -> None:
                welcome = {"type": "welcome", "username": rec.name, "rooms": rooms,
                           "session": session.session_id, "last_msg_id": last_msg_id}
                if cursors:
                    # Over a cluster ids commit in order only within a conversation, so
                    # one number cannot say where the session stands: each conversation's
                    # newest id when it began (docs/protocol.md, "Here: several nodes").
                    welcome["positions"] = positions(cursors, rec.id)
                if waiting:
                    # The stored direct messages that follow, in pages: a client whose
                    # connection drops before it has them all catches up from `first`.
                    welcome["backlog"] = {"count": waiting, "first_msg_id": first_waiting}
                if rid is not None:
                    welcome["re"] = rid
                first = [encode(welcome)] + [encode(f) for f in backlog]
                attached = server.hub.attach(session, rooms, first, cursors)
                if not attached and backlog:
                    server.store.correct_marks([f["msg_id"] for f in backlog], False)
                conn.loop.call_soon(conn.logged_in, session, attached, more)

            return after

        server.store.submit(Job(run, refuse, logs_in=key))

    conn.pending_session = session
    conn.submit_auth(
        _guarded(conn, rid, work, on_error=lambda: settle(server.throttle.release),
                 clear_pending=True),
        on_busy=lambda: (settle(server.throttle.release), conn.clear_pending()),
    )


def positions(cursors: dict[str, int], user_id: int) -> dict[str, Any]:
    """The welcome's `positions`: from the cursors a login read over a cluster (keyed by
    conversation, chat.conversations), each room's and the direct messages' newest id."""
    direct = user_conv(user_id)
    return {"rooms": {c[2:]: n for c, n in sorted(cursors.items()) if c != direct},
            "direct": cursors.get(direct, 0)}


def passwd(conn: Connection, req: m.Passwd) -> None:
    session = conn.require_session()
    server, rid, ip = conn.server, req.id, conn.ip
    password = check_new_password(
        req.new, session.name, min_length=conn.settings.min_password_length,
        service_name=server.name,
    )
    # Guessing the old password from a stolen session is guessing all the same.
    server.throttle.check_login(ip, session.key)
    settled = False

    def settle(outcome: Callable[[str, str], None]) -> None:
        nonlocal settled
        if not settled:
            settled = True
            outcome(ip, session.key)

    def work() -> None:
        rec = server.store.find_user(session.key)
        if rec is None or not server.hasher.verify(req.old, rec.password_hash):
            settle(server.throttle.login_failed)
            conn.finish_auth(rid, InvalidCredentials())
            return
        settle(server.throttle.login_succeeded)
        password_hash = server.hasher.hash(password)

        def run(db: Any) -> Callable[[], None]:
            user = session.user
            if user is None or user.ended or server.store.disabled(db, rec.id):
                raise AccountDisabled("this session is ending")
            if req.logout_others:
                # Over a cluster, refused (before anything changed) while the other nodes
                # cannot be told: their sessions would stay.
                reachable(server.hub)
            if not server.store.password_hash_is(db, rec.id, rec.password_hash):
                raise InvalidCredentials()  # changed by another session meanwhile
            server.store.set_password_hash(db, rec.id, password_hash)
            log.info("%s: %s changed their password", conn.peer, rec.name)
            ok = {"type": "ok", "op": "passwd"}

            def after() -> None:
                if not req.logout_others:
                    conn.finish_auth(rid, ok)
                    return
                # `quit`: the user asked for these sessions to end, from another.
                server.hub.end_sessions(session.key, "quit", keep=session)
                # Over a cluster, once the other nodes have ended theirs too.
                server.hub.sync(lambda: conn.finish_auth(rid, ok))

            return after

        server.store.submit(Job(run, lambda exc: conn.finish_auth(rid, exc)))

    conn.submit_auth(
        _guarded(conn, rid, work, on_error=lambda: settle(server.throttle.release)),
        on_busy=lambda: settle(server.throttle.release),
    )

"""Reconnecting after a lost connection: the backoff schedule, catch-up and dedupe.

Theory of operation
-------------------
Where a session stands is the ChatClient's `last_msg_id`: the `welcome`'s, raised by every
message received (the server sends a session every message it may see in msg_id order, so
nothing at or below that id was missed on that connection). That, not what happened to be
shown, is where the catch-up starts: each room the user is in, and the direct messages,
are asked for `history ... after` it, page by page, until a page comes back empty (a page
may stop short of its `limit` to keep under the server's byte limit, so a short page does
not mean the end). A server on several nodes commits ids in order only within a
conversation, and says so with `positions` in its `welcome`: then each room, and the
direct messages, start from their own position (chat.client.positions). A server too old
to say `last_msg_id` gets the old way: each room and each peer from the last message
shown there.

`Seen` follows the `message` frames shown (its `fresh` is called only by the thread that
prints events): a bounded set of recent ids, so that a message that comes twice (in a
catch-up page and live, or as a stored direct message and in `history with`) is shown
once, and the highest `msg_id` per room and per peer for an old server's catch-up.

The direct messages stored while the user had no session are handed to the first session
after its `welcome`, which announces them (`backlog`: how many, the first id); they are
older than its `last_msg_id`. A connection lost before all of them came has missed the
rest for good (the server counts them delivered), so its direct messages are caught up
from just before the first (`ChatClient.direct_position`); those already shown are
dropped by `Seen`.

`reconnect` runs in the thread that noticed the end (the printer): it waits out the
backoff schedule (1 s doubling to 60 s, each +-20% jitter; `sleep` and `rng` injectable),
connects with the `connect` callable, logs in with the password kept in memory (never
written anywhere), and catches up on the rooms the new `welcome` lists. Those rooms, not
the ones the client thought it was in, are the user's from then on (`ChatState.adopt`): a
room left or joined in another session while the connection was down stays so, and the
user is told. Nothing is ever joined again on the user's behalf. The replies to these
requests are `quiet`: they are not queued as events, so nothing is shown but the missed
messages, which it returns, oldest first per room, for the printer to show through `Seen`.
Until it succeeds the position stays the lost connection's: a failed attempt's messages
were never shown, so they are caught up again.

When to reconnect: the connection ended without a `bye`, or with `bye` `shutdown`, `idle`
or `slow_consumer`. Not after `quit` (ours, or another session's `passwd` logging us out),
nor `too_many_errors` or `login_timeout` (reconnecting would only repeat them). It gives up
when the password is refused (`invalid_credentials`): it may have been changed elsewhere.

`Link.stop` (the user quits) cancels a reconnection wherever it is: the backoff wait ends
at once, a connection being logged in on is closed under it, and `interrupted` tells the
UI that the session ended by the user's choice, not the server's.
"""

from __future__ import annotations

import random
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from chat.client.commands import ChatState
from chat.client.errors import ClientError, Frame
from chat.client.positions import Positions

BASE_DELAY = 1.0  # seconds before the first attempt
MAX_DELAY = 60.0  # the delay doubles up to this: a restarting server is back within a minute
JITTER = 0.2  # +-20%, so that clients cut off together do not all come back together
CATCH_UP_LIMIT = 200  # the server's largest history page
MAX_CATCH_UP_PAGES = 50  # 10,000 messages a room at most: past that, the rest is in /history
SEEN_IDS = 10_000  # recent msg_ids remembered for dedupe
# What the connection may be taken up again after: a connection lost without a bye, a
# restart, a pause. Never after a `bye` that ends the session on purpose: our own quit, an
# account disabled or a session logged out by the operator (v1.1), errors of ours.
RECONNECT_BYES = frozenset({None, "shutdown", "idle", "slow_consumer"})
FINAL_REFUSALS = frozenset({"account_disabled"})  # a login refused so is refused again
DIRECT = "direct messages"  # how the catch-up of direct messages is named in notes


def should_reconnect(bye_reason: str | None) -> bool:
    return bye_reason in RECONNECT_BYES


def backoff_delays(
    rng: Callable[[float, float], float] = random.uniform,
    *, base: float = BASE_DELAY, cap: float = MAX_DELAY, jitter: float = JITTER,
) -> Iterator[float]:
    """1, 2, 4, ... 60, 60, ... seconds, each times a random factor in [1-jitter, 1+jitter]."""
    delay = base
    while True:
        yield delay * rng(1 - jitter, 1 + jitter)
        delay = min(delay * 2, cap)


class Seen:
    """Which messages have been shown: per-room and per-peer high marks, recent ids."""

    def __init__(self, me: str | None = None, capacity: int = SEEN_IDS) -> None:
        self.me = me
        self.rooms: dict[str, int] = {}
        self.peers: dict[str, int] = {}
        self._ids: set[int] = set()
        self._order: deque[int] = deque()
        self._capacity = capacity

    def fresh(self, frame: Frame) -> bool:
        """Note a frame about to be shown; False if it is a message already shown."""
        msg_id = frame.get("msg_id")
        if frame.get("type") != "message" or type(msg_id) is not int:
            return True
        e2e = frame.get("e2e")
        if isinstance(e2e, dict) and e2e.get("late"):
            return True  # shown before as "cannot decrypt yet"; now its text
        if msg_id in self._ids:
            return False
        self._ids.add(msg_id)
        self._order.append(msg_id)
        if len(self._order) > self._capacity:
            self._ids.discard(self._order.popleft())
        key, marks = self._key(frame)
        if key is not None:
            marks[key] = max(marks.get(key, 0), msg_id)
        return True

    def _key(self, frame: Frame) -> tuple[str | None, dict[str, int]]:
        room = frame.get("room")
        if isinstance(room, str):
            return room.lower(), self.rooms
        sender, to = frame.get("username"), frame.get("to")
        me = (self.me or "").casefold()
        peer = to if isinstance(sender, str) and sender.casefold() == me else sender
        return (peer.lower() if isinstance(peer, str) else None), self.peers

    def catch_up_requests(
        self, rooms: set[str], position: int | None, direct: int | None = None,
        positions: Positions | None = None,
    ) -> list[Frame]:
        """The history requests to catch up on `rooms` and the direct messages.

        From `position` (the lost connection's `last_msg_id`) when the server said one:
        each room, and the direct messages with everyone, those from `direct` if it is
        earlier (the connection was lost before all the stored direct messages announced
        in its `welcome` came: the rest are older than `position`). Else from what was
        shown: a room with no message shown uses the highest id shown anywhere (msg_id
        grows across all rooms, and a session sees messages in msg_id order); with none
        shown at all there is nothing to catch up from, and the room is left to /history.
        With `positions` (the server runs on several nodes), each room from its own
        position and the direct messages from theirs (chat.client.positions).
        """
        if positions is not None:
            requests = [{"type": "history", "room": room, "after": positions.room(room)}
                        for room in sorted(rooms)]
            after = positions.direct if direct is None else min(direct, positions.direct)
            requests.append({"type": "history", "direct": True, "after": after})
            return requests
        if position is not None:
            requests: list[Frame] = [
                {"type": "history", "room": room, "after": position} for room in sorted(rooms)
            ]
            after = position if direct is None else min(direct, position)
            requests.append({"type": "history", "direct": True, "after": after})
            return requests
        everywhere = max([*self.rooms.values(), *self.peers.values()], default=None)
        requests = []
        for room in sorted(rooms):
            after = self.rooms.get(room, everywhere)
            if after is not None:
                requests.append({"type": "history", "room": room, "after": after})
        requests.extend(self.peer_requests(None))
        return requests

    def peer_requests(self, after: int | None) -> list[Frame]:
        """`history with` each peer a direct message was shown with, from `after` or its mark."""
        return [
            {"type": "history", "with": peer, "after": mark if after is None else after}
            for peer, mark in sorted(self.peers.items())
        ]


class Client(Protocol):
    username: str | None

    def request(self, frame: Frame, timeout: float = ..., *, quiet: bool = ...) -> Frame: ...

    def close(self, timeout: float = ...) -> None: ...


def catch_up(
    client: Client, seen: Seen, rooms: set[str], timeout: float, *,
    position: int | None = None, direct: int | None = None,
    positions: Positions | None = None,
    notify: Callable[[str], None] = lambda text: None,
) -> list[Frame]:
    """Every message missed in `rooms` and the direct messages, oldest first per request."""
    missed: list[Frame] = []
    requests = seen.catch_up_requests(rooms, position, direct, positions)
    while requests:
        request = requests.pop(0)
        for _ in range(MAX_CATCH_UP_PAGES):
            reply = client.request({**request, "limit": CATCH_UP_LIMIT}, timeout, quiet=True)
            if reply.get("type") != "history":
                if request.get("direct"):  # a server without `history direct`: by peer
                    requests.extend(seen.peer_requests(request["after"]))
                break
            listed = reply.get("messages")
            messages = [m for m in listed if isinstance(m, dict)] if isinstance(
                listed, list) else []
            # A page's messages as `message` frames: a room's pages do not always say so.
            missed.extend({"type": "message", **m} for m in messages)
            ids = [m["msg_id"] for m in messages if type(m.get("msg_id")) is int]
            if not ids:
                break
            request = {**request, "after": max(ids)}
        else:
            what = f"#{request['room']}" if "room" in request else DIRECT
            notify(f"more was missed in {what} than the catch-up shows; /history for the rest")
    return missed


class GaveUp(Exception):
    """Reconnecting stopped: the login was refused for good."""


def reconnect(
    connect: Callable[[], Any],
    username: str,
    password: Callable[[], str],
    state: ChatState,
    seen: Seen,
    *,
    notify: Callable[[str], None],
    timeout: float,
    position: int | None = None,
    direct: int | None = None,
    positions: Positions | None = None,
    sleep: Callable[[float], None] = time.sleep,
    delays: Iterator[float] | None = None,
    max_attempts: int | None = None,
) -> tuple[Any, list[Frame]]:
    """Connect and log in again, take the server's rooms, catch up: (the new client, the
    missed messages).

    `position` is the lost connection's `last_msg_id` (None: the server did not say);
    `direct`, if earlier, where its direct messages stand (see `Seen.catch_up_requests`);
    `positions`, where each of its conversations stands, if the server said (several nodes).
    """
    attempts = 0
    failed: str | None = None  # why the last attempt failed: said with the next wait
    for delay in delays if delays is not None else backoff_delays():
        attempts += 1
        if max_attempts is not None and attempts > max_attempts:
            break
        if failed is None:
            notify(f"connection lost; reconnecting in {delay:.0f} s")
        else:
            notify(f"{failed}; trying again in {delay:.0f} s")
        sleep(delay)
        try:
            client = connect()
        except ClientError as exc:
            failed = f"reconnect failed: {exc}"
            continue
        try:
            welcome = client.request(
                {"type": "login", "username": username, "password": password()},
                timeout, quiet=True,
            )
            if welcome.get("type") != "welcome":
                client.close()
                if welcome.get("code") == "invalid_credentials":
                    raise GaveUp("the password was refused on reconnecting")
                if welcome.get("code") in FINAL_REFUSALS:  # trying again cannot help
                    raise GaveUp(f"the login was refused on reconnecting: {welcome.get('code')}")
                failed = f"reconnect refused: {welcome.get('code')}"
                continue
            client.username = str(welcome.get("username", username))
            listed = welcome.get("rooms")
            # The server's rooms, never ours: a room left in another session meanwhile is
            # not joined again, and one joined elsewhere is caught up too.
            rooms = {r.lower() for r in listed if isinstance(r, str)} if isinstance(
                listed, list) else None
            missed = catch_up(
                client, seen, state.rooms if rooms is None else rooms, timeout,
                position=position, direct=direct, positions=positions, notify=notify,
            )
        except ClientError as exc:
            client.close()
            failed = f"reconnect failed: {exc}"
            continue
        notify(f"reconnected as {client.username}")
        for note in state.adopt(rooms) if rooms is not None else []:
            notify(note)
        return client, missed
    raise GaveUp("gave up reconnecting" + (f" ({failed})" if failed else ""))


class Link:
    """The session's current connection, replaced when the printer reconnects.

    The printer thread owns the replacing (`resume`, when the events of `client` end); the
    command thread takes `current()` for each request. `connect` None means never reconnect.
    `password` is read only when logging in again, so a /passwd can update what it returns;
    it is kept in memory only. `_cond` guards `client`, `reconnecting`, `ended`, the
    connection being tried (`_attempt`) and `interrupted`.
    """

    def __init__(
        self,
        client: Any,
        state: ChatState,
        *,
        connect: Callable[[], Any] | None,
        password: Callable[[], str],
        timeout: float,
        delays: Callable[[], Iterator[float]] = backoff_delays,
    ) -> None:
        self.client = client
        self.state = state
        self.seen = Seen(client.username)
        self._connect = connect
        self._password = password
        self._timeout = timeout
        self._delays = delays  # a fresh schedule for each loss: 1 s again after a success
        self._cond = threading.Condition()
        self._stopping = threading.Event()
        self._attempt: Any | None = None  # the connection a reconnection is logging in on
        self.reconnecting = False
        self.ended = False  # the printer has stopped for good
        self.interrupted = False  # the user stopped it while the connection was lost

    @property
    def enabled(self) -> bool:
        return self._connect is not None

    def current(self, wait: bool = True) -> Any | None:
        """The client to send on; None if reconnecting and not `wait`ing (else wait it out)."""
        with self._cond:
            if not wait:
                return None if self.reconnecting else self.client
            self._cond.wait_for(lambda: not self.reconnecting)
            return self.client

    def next_client(self, old: Any) -> Any | None:
        """Wait until the printer replaced `old` (the new client) or stopped (None)."""
        with self._cond:
            self._cond.wait_for(lambda: self.client is not old or self.ended)
            return None if self.client is old else self.client

    def stop(self) -> None:
        """The user is leaving: reconnect no more, and cancel a reconnection under way.

        The backoff wait ends at once and a connection being logged in on is closed; one
        being opened (a TLS handshake) is closed as soon as it is made. `interrupted` says
        whether the connection was lost (and would have been taken up again) at that
        moment: then the session ended by the user's choice, and the UI says so (exit 0),
        not that the server closed it.
        """
        with self._cond:
            self._stopping.set()
            lost = self.client.closed and should_reconnect(self.client.bye_reason)
            self.interrupted = self.enabled and not self.ended and (self.reconnecting or lost)
            attempt = self._attempt
        if attempt is not None:
            attempt.close(self._timeout)

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def _sleep(self, delay: float) -> None:
        if self._stopping.wait(delay):
            raise GaveUp("stopped reconnecting: quitting")

    def _connect_attempt(self) -> Any:
        assert self._connect is not None
        client = self._connect()
        with self._cond:
            stopping = self.stopping
            if not stopping:
                self._attempt = client
        if stopping:
            client.close(self._timeout)
            raise GaveUp("stopped reconnecting: quitting")
        return client

    def resume(self, show: Callable[[Frame], None], notify: Callable[[str], None]) -> bool:
        """In the printer, once the events of `client` have ended: reconnect if it should.

        True with `client` replaced and the missed messages shown (each once, through
        `seen`); False when the session is over.
        """
        old = self.client
        if self._connect is None or self.stopping or not should_reconnect(old.bye_reason):
            self._end()
            return False
        with self._cond:
            self.reconnecting = True

        def tell(text: str) -> None:  # once the user is leaving, the attempts are no news
            if not self.stopping:
                notify(text)

        try:
            client, missed = reconnect(
                self._connect_attempt, old.username or "", self._password, self.state,
                self.seen, notify=tell, timeout=self._timeout, sleep=self._sleep,
                delays=self._delays(), position=getattr(old, "last_msg_id", None),
                direct=getattr(old, "direct_position", None),
                positions=getattr(old, "positions", None),
            )
        except GaveUp as exc:
            tell(str(exc))
            self._end()
            return False
        finally:
            with self._cond:
                self._attempt = None
        with self._cond:  # one step with `stop`: either the user left, or we are back
            stale = self.stopping
            if not stale:
                self.client = client
                self.reconnecting = False
                self._cond.notify_all()
        if stale:
            client.close(self._timeout)
            self._end()
            return False
        # Shown before any event of the new client, by this same thread: in order, even if
        # a command goes out on the new connection meanwhile.
        for frame in missed:
            if self.seen.fresh(frame):
                show(frame)
        return True

    def _end(self) -> None:
        with self._cond:
            self.reconnecting = False
            self.ended = True
            self._cond.notify_all()

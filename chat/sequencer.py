"""Ordered, once-only delivery of a conversation's messages on one node of several.

Sans-IO: no sockets, no database, no threads. `chat.cluster.ClusterHub` offers it each
message with its `prev` (the id before it in its conversation, read under the
conversation's lock when it was stored); what is next goes out at once, what is older is
a duplicate, what is newer waits for its predecessor, `gap_wait` at most, and then a
repair is asked for (`ask_fill`), whose rows come back through `filled`.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable
from dataclasses import dataclass, field

# Other nodes' messages one conversation holds behind a gap at most; past it they are
# dropped (they are committed: the repair, or the reconcile, reads them in order).
MAX_HELD = 10_000

Deliver = Callable[[], None]


@dataclass(slots=True)
class _Item:
    prev: int
    id: int
    deliver: Deliver


@dataclass(slots=True)
class _Conv:
    cursor: int
    held: dict[int, _Item] = field(default_factory=dict)  # by id
    order: list[int] = field(default_factory=list)  # a heap of held ids (some gone since)
    since: float = 0.0  # when the oldest held item began to wait
    filling: float = 0.0  # when a repair was asked for (0: none in flight)
    following: bool = True  # False: untracked while items waited; forgotten once they went


class Sequencer:
    """Per conversation: deliver each id once, in order, with the gaps filled."""

    def __init__(self, gap_wait: float, ask_fill: Callable[[str, int, int], None],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.gap_wait = gap_wait
        self._ask_fill = ask_fill
        self._clock = clock
        self.convs: dict[str, _Conv] = {}
        self.repairs = 0  # gaps read from the database (a metric)

    def track(self, conv: str, cursor: int) -> None:
        """The node's sessions are now in `conv`: its messages after `cursor` go out."""
        state = self.convs.get(conv)
        if state is None:
            self.convs[conv] = _Conv(cursor)
        else:
            state.following = True

    def untrack(self, conv: str) -> None:
        """No session here is in `conv` any more (kept while items wait: an origin's own
        copy must still reach it; forgotten once they went)."""
        state = self.convs.get(conv)
        if state is not None:
            state.following = False
            self._settle(conv, state)

    def _settle(self, conv: str, state: _Conv) -> None:
        if not state.following and not state.held:
            del self.convs[conv]

    def cursor(self, conv: str) -> int | None:
        state = self.convs.get(conv)
        return None if state is None else state.cursor

    def in_order(self, conv: str, prev: int) -> bool:
        """Would an item after `prev` go out at once (the common case: nothing waits)?"""
        state = self.convs.get(conv)
        return state is None or (not state.held and prev <= state.cursor)

    def advance(self, conv: str, last: int) -> None:
        """The caller delivered a run that `in_order` allowed, ending at `last`."""
        state = self.convs.get(conv)
        if state is not None and last > state.cursor:
            state.cursor = last

    def offer(self, conv: str, prev: int, msg_id: int, deliver: Deliver,
              local: bool = False) -> None:
        state = self.convs.get(conv)
        if state is None:
            if local:
                deliver()  # nobody here follows it; the sender's own copy still goes
            return
        if msg_id <= state.cursor or msg_id in state.held:
            return  # had it already
        if prev <= state.cursor:
            deliver()
            state.cursor = msg_id
            self._drain(state)
            self._settle(conv, state)
            return
        if not local and len(state.held) >= MAX_HELD:
            return  # read from the database with the rest (this node's own are kept)
        if not state.held:
            state.since = self._clock()
        state.held[msg_id] = _Item(prev, msg_id, deliver)
        heapq.heappush(state.order, msg_id)

    def _drain(self, state: _Conv) -> None:
        order = state.order
        while state.held:
            nxt = order[0]
            item = state.held.get(nxt)
            if item is None:  # delivered by a repair meanwhile
                heapq.heappop(order)
                continue
            if item.prev > state.cursor:
                return
            heapq.heappop(order)
            del state.held[nxt]
            if nxt > state.cursor:
                item.deliver()
                state.cursor = nxt
        order.clear()
        state.since = 0.0

    def filled(self, conv: str, after: int, upto: int,
               rows: list[tuple[int, Deliver]]) -> None:
        """A repair read everything of `conv` in (after, upto]: `rows` (id, delivery)."""
        state = self.convs.get(conv)
        if state is None:
            return
        state.filling = 0.0
        if after > state.cursor:
            return  # read from further on than we are: cannot vouch for what is between
        self.repairs += 1
        for msg_id, deliver in rows:
            if msg_id <= state.cursor:
                continue
            held = state.held.pop(msg_id, None)
            (held.deliver if held is not None else deliver)()
            state.cursor = msg_id
        state.cursor = max(state.cursor, upto)
        self._drain(state)
        if state.held:
            state.since = self._clock()
        self._settle(conv, state)

    def due(self) -> float | None:
        waits = [s.since for s in self.convs.values() if s.held and not s.filling]
        if not waits:
            return None
        return max(0.0, min(waits) + self.gap_wait - self._clock())

    def tick(self) -> None:
        now = self._clock()
        for conv, state in self.convs.items():
            if state.held and not state.filling and now >= state.since + self.gap_wait:
                state.filling = now
                upto = min(item.prev for item in state.held.values())
                self._ask_fill(conv, state.cursor, upto)

    def retry(self, conv: str) -> None:
        """A repair failed (the database): ask again at the next gap deadline."""
        state = self.convs.get(conv)
        if state is not None:
            state.filling = 0.0
            state.since = self._clock()



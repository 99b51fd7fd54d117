"""Living within the server's limits: what `hello` announces, and long messages split to fit.

The server announces its limits in `hello` (`limits`, see docs/protocol.md); an older
server does not, and then the protocol's v1 defaults hold. `ServerLimits.from_hello`
reads them, ignoring any value that makes no sense (a broken server must not make the
client divide by zero or send nothing).

`SendPacer` is the client's own token bucket, a little slower than the server's, which
every frame the client sends passes (chat.client.connection): a script piping 500 lines
or a long paste then waits on the client's side instead of being refused on the server's.

`split_message` is what the client does with a message longer than the server accepts:
several messages, in order, cut at a line break or a space where possible, so that what
the user typed is delivered rather than refused.
"""

from __future__ import annotations

import math
import threading
import time
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

# The protocol's v1 defaults, which hold when `hello` carries no `limits`.
V1_FRAMES_PER_SECOND = 10.0
V1_FRAME_BURST = 30
V1_MAX_MESSAGE_CHARS = 4000
V1_MAX_HISTORY_LIMIT = 200

# A piece cut at a line break or a space must still hold at least this share of the
# limit; otherwise (one early break, then a long run without one) the cut is made at the
# limit itself, so a 10,000-character line with a space near its start is not sent as a
# word followed by two full pieces and a remainder, but as full pieces.
MIN_FILL = 0.5


# The client paces itself a little under the server's limits: its clock runs when a frame
# is sent, the server's when the frame is read, and frames that left evenly can be read
# together (a busy network or a busy server). Sending at 90% of the rate, and keeping in
# reserve the part of the burst that half a second of such bunching could use up, makes a
# refusal rare; when one still comes, the frame is resent (see ChatClient.request).
PACE_SHARE = 0.9
BUNCHING_ALLOWANCE = 0.5  # seconds


@dataclass(frozen=True)
class ServerLimits:
    """The limits the server announced (or the v1 defaults for those it did not)."""

    frames_per_second: float = V1_FRAMES_PER_SECOND
    frame_burst: int = V1_FRAME_BURST
    max_message_chars: int = V1_MAX_MESSAGE_CHARS
    max_history_limit: int = V1_MAX_HISTORY_LIMIT

    @classmethod
    def from_hello(cls, hello: Mapping[str, Any]) -> ServerLimits:
        """The limits in `hello`; a missing or nonsensical value falls back to its default."""
        given = hello.get("limits")
        if not isinstance(given, Mapping):
            return cls()
        rate = given.get("frames_per_second")
        return cls(
            frames_per_second=float(rate) if _positive_number(rate) else V1_FRAMES_PER_SECOND,
            frame_burst=_positive_int(given.get("frame_burst"), V1_FRAME_BURST),
            max_message_chars=_positive_int(given.get("max_message_chars"), V1_MAX_MESSAGE_CHARS),
            max_history_limit=_positive_int(given.get("max_history_limit"), V1_MAX_HISTORY_LIMIT),
        )


class SendPacer:
    """A token bucket that frames wait on before they are sent; thread-safe.

    `reserve` takes the next token, letting the balance go below zero, and returns how
    long the caller must wait before sending: callers that reserve one after another are
    given slots one after another, so their frames leave in the order they reserved.
    `hold` is for a refusal (`rate_limited`, `retry_after`): nothing more is sent until the
    wait is over, and then the bucket starts empty. `clock` is injectable for tests.
    """

    def __init__(
        self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if not rate > 0 or burst < 1:
            raise ValueError(f"a pacer needs a positive rate and burst, not {rate}, {burst}")
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._lock = threading.Lock()
        self._tokens = float(burst)  # below zero: slots already promised
        self._last = clock()

    @classmethod
    def for_server(
        cls, limits: ServerLimits, clock: Callable[[], float] = time.monotonic
    ) -> SendPacer:
        """A pacer a little under the server's limits (see PACE_SHARE)."""
        rate = limits.frames_per_second * PACE_SHARE
        reserve = math.ceil(limits.frames_per_second * BUNCHING_ALLOWANCE)
        return cls(rate, max(1, limits.frame_burst - reserve), clock)

    def _refill(self) -> None:  # under _lock
        now = self._clock()
        self._tokens = min(float(self.burst), self._tokens + (now - self._last) * self.rate)
        self._last = now

    def reserve(self) -> float:
        """Take a token; the seconds to wait before sending (0.0: send now)."""
        with self._lock:
            self._refill()
            self._tokens -= 1.0
            return 0.0 if self._tokens >= 0 else -self._tokens / self.rate

    def hold(self, seconds: float) -> None:
        """Send nothing for `seconds` more than already promised, then from an empty bucket."""
        with self._lock:
            self._refill()
            self._tokens = min(self._tokens, 0.0) - seconds * self.rate


def _positive_number(value: object) -> bool:
    return (
        isinstance(value, int | float) and not isinstance(value, bool)
        and math.isfinite(value) and value > 0
    )


def _positive_int(value: object, default: int) -> int:
    return value if type(value) is int and value > 0 else default


def split_message(text: str, limit: int) -> list[str]:
    """`text` as messages of at most `limit` characters each, in order.

    Each cut is made at the last line break in reach, else the last space, and that one
    character is dropped (the cut stands for it); where neither is found in the second
    half of a piece, the cut is made at the limit (never between a character and the
    combining marks that follow it). Pieces that would be only white space are left out:
    the server refuses them and they carry nothing. A text within the limit is returned
    as it is, alone. For `/me` actions, split the action's text with the limit less the
    prefix and put the prefix before each piece.
    """
    if limit < 1:
        raise ValueError(f"limit must be at least 1, not {limit}")
    pieces: list[str] = []
    rest = text
    while len(rest) > limit:
        piece, rest = _cut(rest, limit)
        if piece.strip():
            pieces.append(piece)
    if rest.strip() or not pieces:
        pieces.append(rest)
    return pieces


def _cut(text: str, limit: int) -> tuple[str, str]:
    """The first piece of `text` (longer than `limit`) and what follows it."""
    window = text[: limit + 1]  # a break just after `limit` characters still fits
    least = max(1, math.ceil(limit * MIN_FILL))
    for separator in ("\n", " "):
        at = window.rfind(separator)
        if at >= least:
            return text[:at], text[at + 1:]
    at = limit
    while at > 1 and _joins_previous(text[at]):
        at -= 1
    return text[:at], text[at:]


def _joins_previous(char: str) -> bool:
    # Marks (combining, spacing, enclosing), the joiner and the variation selectors: each
    # belongs with the character before it.
    return unicodedata.category(char).startswith("M") or char in "\u200d\ufe0e\ufe0f"


def split_note(length: int, count: int, limit: int) -> str:
    """What to tell the user when a message was split: one line, no leading `--`."""
    return (
        f"the message of {length} characters was sent as {count} messages "
        f"(the server takes at most {limit} characters in one)"
    )

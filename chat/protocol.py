"""Sans-IO framing for protocol v1: bytes in, frames out; frames in, bytes out.

Nothing here touches a socket, a thread or the database, so tests (and fuzzers) feed it
bytes directly. A `FrameDecoder` belongs to one connection and is used by one thread.

The decoder parses lazily, one frame per `next_event()`, so a connection's limits (its
frame rate, its error cut-off) act before the next frame costs anything, however many a
single read brought. It never holds more than `max_frame_bytes` of an unfinished frame:
once a frame cannot fit, it reports `FrameTooLarge` at once and discards bytes up to the
next newline.
"""

from __future__ import annotations

import json
import math
from typing import Any

from chat.errors import BadFrame, FrameTooLarge, InvalidField, ProtocolError

PROTOCOL_VERSION = 1
DEFAULT_MAX_FRAME_BYTES = 16384

Frame = dict[str, Any]


def _reject_constant(name: str) -> Any:
    # NaN, Infinity and -Infinity are not JSON; Python's parser accepts them by default.
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    # 1e999 is valid JSON text but becomes inf, which JSON cannot carry back out.
    value = float(text)
    if math.isinf(value):
        raise ValueError("number out of range")
    return value


def _object_without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # A duplicated key is ambiguous (which one wins differs between parsers), so refuse it
    # rather than let two readers of the same frame disagree.
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise ValueError("duplicate key in object")
    return obj


_decoder = json.JSONDecoder(
    parse_constant=_reject_constant,
    parse_float=_finite_float,
    object_pairs_hook=_object_without_duplicates,
)


def parse_frame(line: bytes) -> Frame:
    """Parse one line (without its newline) into a frame dict, or raise a ProtocolError."""
    result = _parse(line)
    if isinstance(result, ProtocolError):
        raise result
    return result


def _parse(line: bytes | bytearray) -> Frame | ProtocolError:
    # Errors are returned, not raised: an error object that was never raised carries no
    # traceback, and one that chained the parser's exception would keep its frames alive.
    if line.endswith(b"\r"):
        line = line[:-1]
    try:
        obj = _decoder.decode(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        # ValueError covers JSONDecodeError, NaN, duplicate keys and integers longer
        # than Python's int-parsing limit; RecursionError covers deep nesting.
        return BadFrame()
    if not isinstance(obj, dict):
        return BadFrame("a frame must be a JSON object")
    if not isinstance(obj.get("type"), str):
        exc = InvalidField("every frame needs a string field 'type'")
        exc.frame = obj  # so the reply can still carry the frame's id as `re`
        return exc
    return obj


class FrameDecoder:
    """Splits a byte stream into frames, one at a time, on demand.

    `push(data)` only stores bytes; `next_event()` parses the next complete frame (or
    reports the next framing error) and returns None when no complete frame is left. So
    the work a peer can cause is paced by whoever calls `next_event`: a server handles a
    frame, checks the peer's rate and error count, and only then parses the next one,
    whatever a single read brought in. `feed(data)` is the eager form for a peer that is
    trusted to be reasonable (the client reading its server).

    Memory: the bytes pushed and not yet consumed, plus at most `max_frame_bytes` of an
    unfinished frame; a frame that cannot fit is reported at once and its bytes are
    dropped up to its newline.
    """

    def __init__(self, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> None:
        if max_frame_bytes < 2:
            raise ValueError("max_frame_bytes must leave room for a newline")
        self.max_frame_bytes = max_frame_bytes
        self._buf = bytearray()
        self._pos = 0  # where the unconsumed bytes start
        self._scanned = 0  # bytes from _pos on known to hold no newline
        self._discarding = False  # inside an oversized frame, reported already
        self.last_size = 0  # bytes the last event took from the stream (its cost to parse)

    @property
    def buffered(self) -> int:
        """Bytes held and not yet consumed."""
        return len(self._buf) - self._pos

    def push(self, data: bytes) -> None:
        if self._pos:
            # Deleting a bytearray's head only moves its start: no copy.
            del self._buf[:self._pos]
            self._pos = 0
        self._buf += data

    def next_event(self) -> Frame | ProtocolError | None:
        buf, limit = self._buf, self.max_frame_bytes
        while True:
            start = self._pos
            nl = buf.find(b"\n", start + self._scanned)
            if nl < 0:
                held = len(buf) - start
                if self._discarding:
                    del buf[:]  # the oversized frame goes on: drop what came of it
                    self._pos = self._scanned = 0
                    return None
                if held >= limit:
                    # A frame of `limit` bytes includes its newline, so an unfinished
                    # frame that already holds `limit` bytes can never fit.
                    del buf[:]
                    self._pos = self._scanned = 0
                    self._discarding = True
                    self.last_size = held
                    return FrameTooLarge()
                self._scanned = held
                return None
            self._pos, self._scanned = nl + 1, 0
            if self._discarding:
                self._discarding = False  # the oversized frame ends here; reported
                continue
            self.last_size = nl + 1 - start
            if self.last_size > limit:
                return FrameTooLarge()
            return _parse(buf[start:nl])  # a bytearray parses as well: no second copy

    def feed(self, data: bytes) -> list[Frame | ProtocolError]:
        """Push `data` and return every event it completes, in order."""
        self.push(data)
        events = []
        while (event := self.next_event()) is not None:
            events.append(event)
        return events


# One encoder for every frame: json.dumps with options builds a new one per call, which
# cost as much as the encoding itself (about 40% of json.dumps on a message frame).
_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def encode(frame: Frame | int | str) -> bytes:
    """Serialise one frame (or one JSON value) to its wire bytes, newline included."""
    return _ENCODER.encode(frame).encode("utf-8") + b"\n"

"""Sans-IO framing for protocol v1: bytes in, frames out; frames in, bytes out.

Nothing here touches a socket, a thread or the database, so tests (and fuzzers) feed it
bytes directly. A `FrameDecoder` belongs to one connection and is used by one thread.

The decoder never holds more than `max_frame_bytes` of an unfinished frame: once a frame
cannot fit, it reports `FrameTooLarge` at once and discards bytes up to the next newline.
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
    if line.endswith(b"\r"):
        line = line[:-1]
    try:
        text = line.decode("utf-8")
        obj = _decoder.decode(text)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        # ValueError covers JSONDecodeError, NaN, duplicate keys and integers longer
        # than Python's int-parsing limit; RecursionError covers deep nesting.
        raise BadFrame() from exc
    if not isinstance(obj, dict):
        raise BadFrame("a frame must be a JSON object")
    if not isinstance(obj.get("type"), str):
        exc = InvalidField("every frame needs a string field 'type'")
        exc.frame = obj  # so the reply can still carry the frame's id as `re`
        raise exc
    return obj


class FrameDecoder:
    """Splits a byte stream into frames. `feed` returns frames and ProtocolErrors in order."""

    def __init__(self, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> None:
        if max_frame_bytes < 2:
            raise ValueError("max_frame_bytes must leave room for a newline")
        self.max_frame_bytes = max_frame_bytes
        self._buf = bytearray()
        self._discarding = False

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> list[Frame | ProtocolError]:
        events: list[Frame | ProtocolError] = []
        limit = self.max_frame_bytes
        start = 0
        while True:
            nl = data.find(b"\n", start)
            if nl < 0:
                break
            if self._discarding:
                self._discarding = False  # the oversized frame ends here; already reported
            elif len(self._buf) + (nl + 1 - start) > limit:
                self._buf.clear()
                events.append(FrameTooLarge())
            else:
                if self._buf:
                    self._buf += data[start:nl]
                    line = bytes(self._buf)
                    self._buf.clear()
                else:
                    line = data[start:nl]
                try:
                    events.append(parse_frame(line))
                except ProtocolError as exc:
                    events.append(exc)
            start = nl + 1
        if start < len(data) and not self._discarding:
            # A frame of `limit` bytes includes its newline, so an unfinished frame that
            # already holds `limit` bytes can never fit.
            if len(self._buf) + (len(data) - start) >= limit:
                self._buf.clear()
                self._discarding = True
                events.append(FrameTooLarge())
            else:
                self._buf += data[start:]
        return events


# One encoder for every frame: json.dumps with options builds a new one per call, which
# cost as much as the encoding itself (about 40% of json.dumps on a message frame).
_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def encode(frame: Frame | int | str) -> bytes:
    """Serialise one frame (or one JSON value) to its wire bytes, newline included."""
    return _ENCODER.encode(frame).encode("utf-8") + b"\n"

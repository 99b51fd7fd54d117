"""Tests for chat.protocol: the sans-IO frame decoder, parse_frame and encode. No sockets."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chat.errors import BadFrame, FrameTooLarge, InvalidField, ProtocolError
from chat.protocol import DEFAULT_MAX_FRAME_BYTES, FrameDecoder, encode, parse_frame

PROPERTY = settings(
    deadline=None, max_examples=150, suppress_health_check=[HealthCheck.too_slow]
)


def feed_chunks(decoder: FrameDecoder, chunks: list[bytes]) -> list[Any]:
    events: list[Any] = []
    for chunk in chunks:
        events.extend(decoder.feed(chunk))
    return events


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts})
    chunks, prev = [], 0
    for p in points:
        chunks.append(data[prev:p])
        prev = p
    chunks.append(data[prev:])
    return chunks


def normalise(events: list[Any]) -> list[Any]:
    """Frames by value, errors by type: what must not depend on how bytes were chunked."""
    return [type(e) if isinstance(e, ProtocolError) else e for e in events]


def padded_frame(total: int, end: bytes = b"\n") -> bytes:
    """A valid frame of exactly `total` bytes, `end` included."""
    head = b'{"type":"ping","pad":"'
    tail = b'"}' + end
    return head + b"x" * (total - len(head) - len(tail)) + tail


# --- splitting into frames -------------------------------------------------------------


def test_one_frame() -> None:
    assert FrameDecoder().feed(b'{"type":"ping"}\n') == [{"type": "ping"}]


def test_several_frames_in_one_chunk() -> None:
    data = b'{"type":"a"}\n{"type":"b","n":1}\n{"type":"c"}\n'
    assert FrameDecoder().feed(data) == [{"type": "a"}, {"type": "b", "n": 1}, {"type": "c"}]


def test_unfinished_frame_is_held_until_its_newline() -> None:
    d = FrameDecoder()
    assert d.feed(b'{"type":') == []
    assert d.buffered == len(b'{"type":')
    assert d.feed(b'"ping"}') == []
    assert d.feed(b"\n") == [{"type": "ping"}]
    assert d.buffered == 0


def test_frame_fed_one_byte_at_a_time() -> None:
    data = b'{"type":"send","room":"general","message":"h\xc3\xa9llo"}\n{"type":"ping"}\n'
    d = FrameDecoder()
    events = feed_chunks(d, [data[i : i + 1] for i in range(len(data))])
    assert events == [
        {"type": "send", "room": "general", "message": "h\u00e9llo"},
        {"type": "ping"},
    ]
    assert d.buffered == 0


def test_multibyte_character_split_between_chunks() -> None:
    data = '{"type":"x","m":"\u20ac\U0001f600"}\n'.encode()
    for cut in range(1, len(data)):
        d = FrameDecoder()
        assert d.feed(data[:cut]) + d.feed(data[cut:]) == [
            {"type": "x", "m": "\u20ac\U0001f600"}
        ]


def test_crlf_is_tolerated() -> None:
    d = FrameDecoder()
    assert d.feed(b'{"type":"a"}\r\n{"type":"b"}\r') == [{"type": "a"}]
    assert d.feed(b"\n") == [{"type": "b"}]


def test_empty_feed_is_harmless() -> None:
    d = FrameDecoder()
    assert d.feed(b"") == []
    assert d.buffered == 0


def test_decoder_refuses_a_limit_without_room_for_the_newline() -> None:
    with pytest.raises(ValueError):
        FrameDecoder(max_frame_bytes=1)


# --- the size limit --------------------------------------------------------------------


@pytest.mark.parametrize("end", [b"\n", b"\r\n"])
def test_frame_of_exactly_max_frame_bytes_is_accepted(end: bytes) -> None:
    frame = padded_frame(DEFAULT_MAX_FRAME_BYTES, end)
    assert len(frame) == DEFAULT_MAX_FRAME_BYTES
    events = FrameDecoder().feed(frame)
    assert len(events) == 1 and events[0]["type"] == "ping"


def test_frame_of_exactly_max_frame_bytes_accepted_in_pieces() -> None:
    frame = padded_frame(DEFAULT_MAX_FRAME_BYTES)
    d = FrameDecoder()
    assert d.feed(frame[:-1]) == []
    assert d.buffered == DEFAULT_MAX_FRAME_BYTES - 1
    events = d.feed(frame[-1:])
    assert len(events) == 1 and events[0]["type"] == "ping"


@pytest.mark.parametrize("pieces", [1, 2, 7, 1000])
def test_one_byte_too_many_is_reported_once_and_the_next_frame_parses(pieces: int) -> None:
    big = padded_frame(DEFAULT_MAX_FRAME_BYTES + 1)
    data = b'{"type":"before"}\n' + big + b'{"type":"after"}\n'
    size = -(-len(data) // pieces)
    d = FrameDecoder()
    events = feed_chunks(d, [data[i : i + size] for i in range(0, len(data), size)])
    assert len(events) == 3
    assert events[0] == {"type": "before"}
    assert isinstance(events[1], FrameTooLarge)
    assert events[2] == {"type": "after"}
    assert d.buffered == 0


def test_oversized_frame_discarded_up_to_its_newline_even_if_it_looks_like_json() -> None:
    d = FrameDecoder(max_frame_bytes=32)
    # The tail of the oversized line is a valid frame on its own; it must not be parsed.
    events = d.feed(b"x" * 40)
    assert [type(e) for e in events] == [FrameTooLarge]
    assert d.feed(b'{"type":"sneaky"}') == []
    assert d.feed(b'\n{"type":"ok"}\n') == [{"type": "ok"}]


def test_unterminated_frame_reported_as_soon_as_it_cannot_fit() -> None:
    d = FrameDecoder(max_frame_bytes=16)
    assert d.feed(b"a" * 15) == []  # 15 bytes + a newline still fits
    events = d.feed(b"a")
    assert [type(e) for e in events] == [FrameTooLarge]
    assert d.buffered == 0
    assert d.feed(b"a" * 100) == []  # still the same frame: not reported again
    assert d.feed(b"\n") == []


def test_buffer_stays_bounded_when_fed_megabytes_without_newline() -> None:
    limit = DEFAULT_MAX_FRAME_BYTES
    d = FrameDecoder(limit)
    errors = 0
    for chunk_size in (1, 3, 1000, limit - 1, limit, limit + 1, 1 << 20):
        for _ in range(3 if chunk_size > 1000 else 50):
            errors += sum(isinstance(e, FrameTooLarge) for e in d.feed(b"A" * chunk_size))
            assert d.buffered < limit
    assert errors == 1  # one endless frame, one report
    assert d.feed(b'\n{"type":"ping"}\n') == [{"type": "ping"}]


def test_buffer_bounded_with_many_fresh_oversized_frames() -> None:
    d = FrameDecoder(max_frame_bytes=64)
    data = (b"B" * 200 + b"\n") * 50
    events = feed_chunks(d, [data[i : i + 37] for i in range(0, len(data), 37)])
    assert [type(e) for e in events] == [FrameTooLarge] * 50
    assert d.buffered == 0


# --- parse_frame: what counts as a frame -----------------------------------------------


@pytest.mark.parametrize(
    "line",
    [
        pytest.param(b'{"type":"x","m":"\xff"}', id="invalid-utf8"),
        pytest.param(b'{"type":"x","m":"\xc3"}', id="truncated-utf8"),
        pytest.param(b'{"type":"x","m":"\xed\xa0\x80"}', id="utf8-encoded-surrogate"),
        pytest.param(b'{"type":"x","n":NaN}', id="nan"),
        pytest.param(b'{"type":"x","n":Infinity}', id="infinity"),
        pytest.param(b'{"type":"x","n":-Infinity}', id="minus-infinity"),
        pytest.param(b'{"type":"x","type":"y"}', id="duplicate-type"),
        pytest.param(b'{"type":"x","a":{"k":1,"k":2}}', id="duplicate-nested-key"),
        pytest.param(b'{"type":"x","a":' + b"[" * 5000 + b"]" * 5000 + b"}", id="deep"),
        pytest.param(b"[" * 5000, id="deep-unclosed"),
        pytest.param(b'{"type":"x","n":' + b"7" * 5000 + b"}", id="huge-int"),
        pytest.param(b"7" * 5000, id="huge-int-top-level"),
        pytest.param(b'["type","x"]', id="array"),
        pytest.param(b'"type"', id="string"),
        pytest.param(b"42", id="number"),
        pytest.param(b"null", id="null"),
        pytest.param(b"", id="empty"),
        pytest.param(b"\r", id="empty-crlf"),
        pytest.param(b"   ", id="blank"),
        pytest.param(b'{"type":"x"', id="unclosed"),
        pytest.param(b'{"type":"x"} {"type":"y"}', id="two-objects"),
        pytest.param(b"{'type':'x'}", id="single-quotes"),
        pytest.param(b'\xef\xbb\xbf{"type":"x"}', id="bom"),
    ],
)
def test_bad_frames(line: bytes) -> None:
    with pytest.raises(BadFrame) as info:
        parse_frame(line)
    assert info.value.code == "bad_frame"


@pytest.mark.parametrize(
    "line",
    [
        b"{}",
        b'{"kind":"ping"}',
        b'{"type":null}',
        b'{"type":1}',
        b'{"type":true}',
        b'{"type":["ping"]}',
        b'{"type":{"ping":1}}',
    ],
)
def test_missing_or_non_string_type_is_invalid_field(line: bytes) -> None:
    with pytest.raises(InvalidField) as info:
        parse_frame(line)
    assert info.value.code == "invalid_field"


def test_errors_are_reported_in_the_stream_and_decoding_continues() -> None:
    data = b'{"type":"a"}\n\xff\n{}\nnot json\n[1]\n{"type":"b"}\n'
    events = FrameDecoder().feed(data)
    assert normalise(events) == [
        {"type": "a"}, BadFrame, InvalidField, BadFrame, BadFrame, {"type": "b"},
    ]


def test_deep_nesting_within_the_limit_is_a_bad_frame_in_the_stream() -> None:
    line = b'{"type":"x","a":' + b"[" * 5000 + b"]" * 5000 + b"}\n"
    assert len(line) <= DEFAULT_MAX_FRAME_BYTES
    assert normalise(FrameDecoder().feed(line + b'{"type":"y"}\n')) == [BadFrame, {"type": "y"}]


def test_lone_surrogate_escape_parses() -> None:
    # Rejected later, by chat.messages; the framing layer only checks JSON syntax.
    frame = parse_frame(b'{"type":"send","message":"\\ud800"}')
    assert frame == {"type": "send", "message": "\ud800"}


def test_escapes_and_unknown_fields_kept() -> None:
    frame = parse_frame(b'{"type":"x","m":"a\\nb\\u00e9\\ud83d\\ude00","extra":[1,2.5,null]}')
    assert frame == {"type": "x", "m": "a\nb\u00e9\U0001f600", "extra": [1, 2.5, None]}


def test_whitespace_around_the_object_is_allowed() -> None:
    assert parse_frame(b' \t{"type" : "x"} \r') == {"type": "x"}


def test_large_but_legal_integer_parses() -> None:
    n = int("9" * 4000)
    assert parse_frame(b'{"type":"x","n":' + str(n).encode() + b"}")["n"] == n


# --- encode ----------------------------------------------------------------------------


def test_encode_is_one_compact_utf8_line() -> None:
    frame = {"type": "message", "message": "h\u00e9llo \u2603\nnext", "n": [1, 2]}
    data = encode(frame)
    assert data.endswith(b"\n")
    assert data.count(b"\n") == 1  # the newline inside the message is escaped
    assert b", " not in data and b": " not in data
    assert "h\u00e9llo \u2603".encode() in data  # raw UTF-8, not \u escapes
    assert data == b'{"type":"message","message":"h\xc3\xa9llo \xe2\x98\x83\\nnext","n":[1,2]}\n'
    assert json.loads(data) == frame
    assert parse_frame(data[:-1]) == frame


def test_encode_refuses_nan() -> None:
    with pytest.raises(ValueError):
        encode({"type": "x", "n": float("nan")})


def test_encode_round_trips_through_the_decoder() -> None:
    frames = [{"type": "a", "x": None}, {"type": "b", "s": "\u0000\u001f\u007f\r"}]
    assert FrameDecoder().feed(b"".join(encode(f) for f in frames)) == frames


# --- properties ------------------------------------------------------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=4),
    max_leaves=12,
)
frames = st.builds(
    lambda type_, rest: {**rest, "type": type_},
    st.text(max_size=12),
    st.dictionaries(st.text(max_size=8), json_values, max_size=5),
)
limits = st.sampled_from([2, 3, 16, 64, 256, DEFAULT_MAX_FRAME_BYTES])
# Bytes that often form lines, near-JSON, CRs and odd UTF-8, as well as plain noise.
streamy_bytes = st.lists(
    st.sampled_from([b"\n", b"\r\n", b"\r", b'{"type":"x"}', b"{", b"}", b'"', b"[", b"\xff",
                     b"\xc3", b"\xa9", b"x" * 30, b'{"type":1}', b"NaN"])
    | st.binary(max_size=20),
    max_size=40,
).map(b"".join)
any_bytes = st.binary(max_size=2000) | streamy_bytes


def check_events(events: list[Any]) -> None:
    for event in events:
        assert isinstance(event, dict | ProtocolError), event
        if isinstance(event, dict):
            assert isinstance(event["type"], str)
        else:
            assert isinstance(event, BadFrame | FrameTooLarge | InvalidField)


@PROPERTY
@given(data=any_bytes, limit=limits)
def test_arbitrary_bytes_never_raise(data: bytes, limit: int) -> None:
    d = FrameDecoder(limit)
    check_events(d.feed(data))
    assert d.buffered < limit


@PROPERTY
@given(chunks=st.lists(any_bytes, max_size=10), limit=limits)
def test_arbitrary_chunks_never_raise_and_buffer_stays_bounded(
    chunks: list[bytes], limit: int
) -> None:
    d = FrameDecoder(limit)
    for chunk in chunks:
        check_events(d.feed(chunk))
        assert d.buffered < limit


@PROPERTY
@given(
    data=any_bytes,
    cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=12),
    limit=limits,
)
def test_chunking_does_not_change_the_events(data: bytes, cuts: list[int], limit: int) -> None:
    whole = FrameDecoder(limit).feed(data)
    d = FrameDecoder(limit)
    pieces = feed_chunks(d, split_at(data, cuts))
    assert normalise(pieces) == normalise(whole)


@PROPERTY
@given(
    data=any_bytes,
    cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=12),
    limit=limits,
)
def test_chunking_leaves_the_same_state(data: bytes, cuts: list[int], limit: int) -> None:
    whole, pieces = FrameDecoder(limit), FrameDecoder(limit)
    whole.feed(data)
    feed_chunks(pieces, split_at(data, cuts))
    assert pieces.buffered == whole.buffered
    # And the same future: what follows is decoded alike.
    after = b'{"type":"next"}\n{"type":"again"}\n'
    assert normalise(pieces.feed(after)) == normalise(whole.feed(after))


@PROPERTY
@given(
    frame_list=st.lists(frames, max_size=8),
    cuts=st.lists(st.integers(min_value=0, max_value=4000), max_size=12),
)
def test_encoded_frames_decode_to_equal_frames(
    frame_list: list[dict[str, Any]], cuts: list[int]
) -> None:
    limit = 512
    fitting = [f for f in frame_list if len(encode(f)) <= limit]
    data = b"".join(encode(f) for f in fitting)
    for encoded in map(encode, fitting):
        assert encoded.endswith(b"\n") and encoded.count(b"\n") == 1
    d = FrameDecoder(limit)
    assert feed_chunks(d, split_at(data, cuts)) == fitting
    assert d.buffered == 0


@PROPERTY
@given(frame_list=st.lists(frames, min_size=1, max_size=6), limit=st.integers(16, 300))
def test_encoded_frames_over_the_limit_are_each_reported(
    frame_list: list[dict[str, Any]], limit: int
) -> None:
    data = b"".join(encode(f) for f in frame_list)
    expected = [f if len(encode(f)) <= limit else FrameTooLarge for f in frame_list]
    assert normalise(FrameDecoder(limit).feed(data)) == expected

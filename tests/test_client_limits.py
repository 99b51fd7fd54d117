"""chat.client.limits: the limits read from `hello`, and long messages split to fit them."""

from __future__ import annotations

import pytest

from chat.client.connection import split_message as exported
from chat.client.limits import (
    PACE_SHARE,
    V1_FRAME_BURST,
    V1_FRAMES_PER_SECOND,
    V1_MAX_MESSAGE_CHARS,
    SendPacer,
    ServerLimits,
    split_message,
    split_note,
)


def test_the_limits_come_from_hello() -> None:
    hello = {"type": "hello", "limits": {
        "frames_per_second": 2.5, "frame_burst": 4, "max_message_chars": 100,
        "max_history_limit": 50, "reply_bytes_per_second": 1}}
    assert ServerLimits.from_hello(hello) == ServerLimits(2.5, 4, 100, 50)


@pytest.mark.parametrize(
    "limits",
    [None, "fast", {}, {"frames_per_second": 0, "frame_burst": -1, "max_message_chars": True},
     {"frames_per_second": float("inf"), "frame_burst": 2.5, "max_message_chars": "4000"}],
)
def test_an_old_or_broken_server_gets_the_v1_defaults(limits: object) -> None:
    hello = {"type": "hello"} if limits is None else {"type": "hello", "limits": limits}
    got = ServerLimits.from_hello(hello)
    assert (got.frames_per_second, got.frame_burst, got.max_message_chars) == (
        V1_FRAMES_PER_SECOND, V1_FRAME_BURST, V1_MAX_MESSAGE_CHARS)


def test_a_message_within_the_limit_is_one_message() -> None:
    assert split_message("hello", 5) == ["hello"]
    assert split_message("", 5) == [""]  # not ours to refuse: the server says why
    assert exported is split_message


def test_cuts_fall_on_line_breaks_first_and_the_break_is_dropped() -> None:
    text = "first line here\nsecond line, longer\nthird"
    assert split_message(text, 20) == ["first line here", "second line, longer", "third"]


def test_without_a_line_break_cuts_fall_on_spaces() -> None:
    assert split_message("aaaa bbbb cccc dddd", 10) == ["aaaa bbbb", "cccc dddd"]


def test_a_long_word_is_cut_at_the_limit() -> None:
    assert split_message("x" * 25, 10) == ["x" * 10, "x" * 10, "x" * 5]


def test_an_early_break_does_not_make_a_tiny_piece() -> None:
    # The only space is near the start: the cut goes at the limit instead.
    assert split_message("ab " + "x" * 20, 10) == ["ab " + "x" * 7, "x" * 10, "x" * 3]


def test_a_combining_mark_stays_with_its_letter() -> None:
    text = "x" * 9 + "e\u0301" + "y"
    pieces = split_message(text, 10)
    assert pieces == ["x" * 9, "e\u0301y"]


def test_every_character_but_the_cut_breaks_survives_in_order() -> None:
    words = [f"word{i}" for i in range(2000)]
    text = "\n".join(" ".join(words[i:i + 17]) for i in range(0, len(words), 17))
    pieces = split_message(text, 4000)
    assert all(1 <= len(p) <= 4000 for p in pieces)
    assert " ".join(pieces).split() == text.split()


def test_white_space_only_pieces_are_left_out() -> None:
    text = "a" * 10 + "\n" + " " * 10 + "\n" + "b"
    assert split_message(text, 10) == ["a" * 10, "b"]


def test_a_bad_limit_is_refused() -> None:
    with pytest.raises(ValueError):
        split_message("text", 0)


def test_the_note_names_the_length_count_and_limit() -> None:
    note = split_note(9000, 3, 4000)
    assert "9000" in note and "3 messages" in note and "4000" in note


# -- the pacer --------------------------------------------------------------------------------


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_burst_goes_at_once_then_one_frame_per_slot() -> None:
    clock = Clock()
    pacer = SendPacer(10.0, 3, clock)
    assert [pacer.reserve() for _ in range(3)] == [0.0, 0.0, 0.0]
    # Reserved one after another, without waiting: slots 0.1 s apart, in order.
    assert [pacer.reserve() for _ in range(3)] == pytest.approx([0.1, 0.2, 0.3])


def test_tokens_come_back_with_time_up_to_the_burst() -> None:
    clock = Clock()
    pacer = SendPacer(10.0, 3, clock)
    for _ in range(3):
        pacer.reserve()
    clock.now += 0.25  # two and a half tokens
    assert [pacer.reserve() for _ in range(3)] == pytest.approx([0.0, 0.0, 0.05])
    clock.now += 3600  # a long quiet: the bucket is full again, and no fuller
    assert [pacer.reserve() for _ in range(4)] == pytest.approx([0.0, 0.0, 0.0, 0.1])


def test_a_refusal_holds_everything_for_its_wait_then_starts_empty() -> None:
    clock = Clock()
    pacer = SendPacer(10.0, 3, clock)
    pacer.hold(2.0)
    assert pacer.reserve() == pytest.approx(2.1)
    clock.now += 2.1
    assert pacer.reserve() == pytest.approx(0.1)


def test_the_pace_is_a_little_under_the_servers() -> None:
    limits = ServerLimits(frames_per_second=10.0, frame_burst=30)
    pacer = SendPacer.for_server(limits)
    assert pacer.rate == pytest.approx(10.0 * PACE_SHARE) and pacer.rate < 10.0
    assert 1 <= pacer.burst < 30
    tiny = SendPacer.for_server(ServerLimits(frames_per_second=50.0, frame_burst=2))
    assert tiny.burst == 1  # never below one frame


def test_a_pacer_needs_a_rate_and_a_burst() -> None:
    with pytest.raises(ValueError):
        SendPacer(0.0, 1)
    with pytest.raises(ValueError):
        SendPacer(1.0, 0)

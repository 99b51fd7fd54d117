"""Start-up checks: the open-files limit, and what the server says about it."""

from __future__ import annotations

import logging

import pytest

from chat import server as server_mod


class FakeLimits:
    """Stands in for the resource module: a soft and a hard open-files limit."""

    RLIM_INFINITY = -1
    RLIMIT_NOFILE = 7

    def __init__(self, soft: int, hard: int) -> None:
        self.soft, self.hard = soft, hard

    def getrlimit(self, which: int) -> tuple[int, int]:
        return self.soft, self.hard

    def setrlimit(self, which: int, limits: tuple[int, int]) -> None:
        soft, hard = limits
        if hard != self.hard or soft > self.hard:
            raise ValueError("not allowed")
        self.soft = soft


@pytest.mark.parametrize(
    ("soft", "hard", "wanted", "cap", "level"),
    [
        # An ordinary desktop or older distribution: thousands, plenty for a new server.
        (1024, 4096, 20000, 4032, logging.INFO),
        (1024, 524288, 20000, 20000, None),  # raised as far as needed: nothing to say
        # Really low: under 1,000 connections...
        (1024, 1024, 20000, 960, logging.WARNING),
        (256, 256, 500, 192, logging.WARNING),
        # ...or under a tenth of what max_connections asks for.
        (1024, 4096, 100000, 4032, logging.WARNING),
    ],
)
def test_open_files_cap_is_a_warning_only_when_really_low(
    monkeypatch, caplog, soft, hard, wanted, cap, level
) -> None:
    monkeypatch.setattr(server_mod, "resource", FakeLimits(soft, hard))
    caplog.set_level(logging.DEBUG, logger="chat.server")
    assert server_mod._connection_cap(wanted) == cap
    said = [r for r in caplog.records if "open-files limit" in r.getMessage()]
    if level is None:
        assert said == []
    else:
        assert [r.levelno for r in said] == [level]
        assert f"at most {cap} connections" in said[0].getMessage()

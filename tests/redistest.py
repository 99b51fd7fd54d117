"""Private Redis servers for the cluster tests, and unique key prefixes.

A test that needs Redis starts its own `redis-server` on a free loopback port, keeping
nothing on disk, and stops it at teardown: so a test may stop and start it, or kill its
clients, without touching anyone else's, and two runs never share keys or channels.
(The machine's own Redis on 6379 is left alone; Pub/Sub channels ignore the database
number, so only a server of one's own isolates them.) Each test's cluster also gets a
prefix of its own (`redis_prefix`).

Where redis-server is: `CHAT_TEST_REDIS_SERVER`, else on PATH. Without it (or without
redis-py), the Redis tests are skipped with one reason, except under CI (`CI` set to
true, as `.ci/run` does), where they fail: CI must not pass without them.
"""

from __future__ import annotations

import functools
import os
import shutil
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from pgtest import required

START_TIMEOUT = 10.0


def server_binary() -> str | None:
    """redis-server as CHAT_TEST_REDIS_SERVER names it (if it can be run), else on PATH."""
    return shutil.which(os.environ.get("CHAT_TEST_REDIS_SERVER") or "redis-server")


@functools.cache
def unavailable() -> str | None:
    """Why Redis cannot be used here, once per run; None when it can."""
    try:
        import redis  # noqa: F401
    except ImportError as exc:
        return f"the cluster tests need redis-py ({exc})"
    if server_binary() is None:
        return ("the cluster tests: no redis-server on PATH (CHAT_TEST_REDIS_SERVER may "
                "name one)")
    return None


def need_redis() -> None:
    """Skip the calling test (fail it under CI) when Redis is not usable."""
    why = unavailable()
    if why is not None:
        if required():
            pytest.fail(f"{why} (CI=true: the cluster tests are mandatory)", pytrace=False)
        pytest.skip(why)


def one_skip_line(report: pytest.TestReport) -> None:
    """As pgtest's: every Redis skip reported at one place, so -ra shows one line."""
    why = unavailable()
    if (why is not None and report.skipped and isinstance(report.longrepr, tuple)
            and report.longrepr[2] == f"Skipped: {why}"):
        report.longrepr = (__file__, need_redis.__code__.co_firstlineno, report.longrepr[2])


def unique_prefix() -> str:
    return f"chat-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """One redis-server of the test's own, on loopback; `stop` and `start` again keep
    its port (and, as Redis without persistence does, lose its data)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = server_binary()
        assert binary is not None
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir), "--protected-mode", "yes"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start on port {self.port}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def client(self):  # type: ignore[no-untyped-def]
        import redis

        return redis.Redis.from_url(self.url)

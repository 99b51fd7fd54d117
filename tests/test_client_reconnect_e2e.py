"""`chat-client login --reconnect` in line mode, across a real server restart on the same port.

The client runs as a subprocess with its stdin a pipe kept open; a thread collects its stdout
lines, and the test waits (polling, bounded) for the lines it expects. Both messages, one sent
before the restart and one after, must be printed exactly once, with the reconnect notices.
"""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parent.parent
PASSWORD = "correct horse battery staple 42"
WAIT = 60.0  # seconds for any one step: Python start-up on a loaded 2-core machine included


def new_name() -> str:
    return "u" + uuid.uuid4().hex[:12]


class Lines:
    """The lines a stream gives, collected by a daemon thread; `wait_for` polls them."""

    def __init__(self, stream: IO[str]) -> None:
        self.lines: list[str] = []
        self._queue: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for(self, test: Callable[[str], bool], what: str, timeout: float = WAIT) -> str:
        for line in self.lines:
            if test(line):
                return line
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self._queue.get(timeout=min(left, 0.1))
            except queue.Empty:
                continue
            if line is None:
                break
            self.lines.append(line)
            if test(line):
                return line
        raise AssertionError(f"no line with {what!r} in:\n" + "\n".join(self.lines))

    def rest(self, timeout: float = WAIT) -> list[str]:
        """Every line, once the stream has ended (within `timeout`)."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self._queue.get(timeout=min(left, 0.1))
            except queue.Empty:
                continue
            if line is None:
                break
            self.lines.append(line)
        return self.lines


@contextmanager
def spawn_cli(args: list[str], env: dict[str, str]) -> Iterator[
        tuple[subprocess.Popen[str], Lines, Lines]]:
    """`chat-client ARGS` with pipes kept open, the environment's CHAT_* variables replaced
    by `env`: (process, stdout, stderr); killed if still running at the end."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("CHAT_")}
    full.update(env)
    proc = subprocess.Popen(
        [sys.executable, "-m", "chat.client.cli", *args],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=full, cwd=ROOT,
    )
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    try:
        yield proc, Lines(proc.stdout), Lines(proc.stderr)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=WAIT)


def send(server: Any, username: str, text: str) -> None:
    client = server.user(username, register=False)
    try:
        reply = client.request({"type": "send", "room": "general", "message": text})
        assert reply["type"] != "error", reply
    finally:
        client.close()


def test_line_mode_reconnects_after_a_server_restart(server_factory: Any) -> None:
    first = server_factory()
    port = first.port
    me, other = new_name(), new_name()
    first.register(me)
    first.register(other)
    env = {k: v for k, v in os.environ.items() if k != "CHAT_PASSWORD"}
    env["CHAT_PASSWORD"] = PASSWORD
    proc = subprocess.Popen(
        [sys.executable, "-m", "chat.client.cli", "login", "--no-e2e", "--reconnect",
         "--server", f"127.0.0.1:{port}", "--cafile", str(first.cafile), "--username", me],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=env, cwd=ROOT,
    )
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    out, err = Lines(proc.stdout), Lines(proc.stderr)
    try:
        proc.stdin.write("ready\n")  # once shown, the client is in #general
        proc.stdin.flush()
        out.wait_for(lambda line: line.endswith(f"{me}: ready"), "ready")
        send(first, other, "before the restart")
        out.wait_for(lambda line: line.endswith(f"{other}: before the restart"), "before")

        first.server.stop()
        err.wait_for(lambda line: line.startswith("-- connection lost; reconnecting in "),
                     "connection lost")
        second = server_factory(port=port)  # the same data directory
        send(second, other, "after the restart")
        err.wait_for(lambda line: line.startswith(f"-- reconnected as {me}"), "reconnected")
        out.wait_for(lambda line: line.endswith(f"{other}: after the restart"), "after")

        proc.stdin.write("done\n")  # the new connection carries commands
        proc.stdin.flush()
        out.wait_for(lambda line: line.endswith(f"{me}: done"), "done")
        proc.stdin.close()
        assert proc.wait(timeout=WAIT) == 0, "\n".join(err.lines)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=WAIT)
    lines = out.rest()
    for text in ("before the restart", "after the restart"):
        assert sum(line.endswith(f"{other}: {text}") for line in lines) == 1, lines
    # The client's notes go to stderr, the conversation to stdout.
    assert not any(line.startswith("-- connection lost") for line in lines), lines
    assert any(line.startswith("-- connection lost; reconnecting in ") and line.endswith(" s")
               for line in err.rest()), err.lines

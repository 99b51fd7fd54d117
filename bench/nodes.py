"""What workload (f) needs besides our server: a PostgreSQL database and a Redis of the
run's own, and the CPU of the processes behind them.

Every setup gets a new database (`chat_bench_<pid>_<n>`, dropped with its connections
when the setup stops) on the local PostgreSQL, and a cluster gets a redis-server of its
own on a free loopback port, keeping nothing on disk (as tests/redistest.py does): the
machine's Redis on 6379, and every other run's data, are left alone.
"""

from __future__ import annotations

import itertools
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

# A database the bench may create databases from (trust auth on loopback).
ADMIN_URL = os.environ.get("CHAT_BENCH_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_START_TIMEOUT = 10.0
_numbers = itertools.count()


def _admin():  # type: ignore[no-untyped-def]
    import psycopg

    return psycopg.connect(ADMIN_URL, autocommit=True, connect_timeout=3)


def create_database() -> tuple[str, str]:
    """A new, empty database: (its name, the server's --db URL for it)."""
    name = f"chat_bench_{os.getpid()}_{next(_numbers)}"
    with _admin() as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    host = ADMIN_URL.split("://", 1)[1].rsplit("/", 1)[0]
    return name, f"postgresql+psycopg://{host}/{name}"


def drop_database(name: str) -> None:
    assert name.startswith("chat_bench_"), name  # never anything else
    with _admin() as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def backend_pids(database: str) -> list[int]:
    """The PostgreSQL backends serving `database` now (one per pooled connection)."""
    with _admin() as conn:
        rows = conn.execute("SELECT pid FROM pg_stat_activity WHERE datname = %s",
                            (database,)).fetchall()
    return [pid for (pid,) in rows]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Redis:
    """A redis-server of our own on loopback, no persistence."""

    def __init__(self, workdir: Path) -> None:
        binary = os.environ.get("CHAT_BENCH_REDIS_SERVER") or shutil.which("redis-server")
        if binary is None:
            raise SystemExit("workload (f) needs redis-server on PATH")
        self.port = free_port()
        workdir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(workdir), "--protected-mode", "yes"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + REDIS_START_TIMEOUT
        while not self._answers():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise SystemExit(f"redis-server did not start on port {self.port}")
            time.sleep(0.05)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

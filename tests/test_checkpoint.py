"""SQLite's WAL is copied into the database by the checkpointer, not inside commits."""

from __future__ import annotations

import time
from pathlib import Path

from sqlalchemy import text

from chat.db import WalCheckpointer, make_engine


def _wal_pages(engine) -> tuple[int, int]:  # type: ignore[no-untyped-def]
    # A checkpoint with nothing allowed to copy: (pages in the WAL, pages copied so far).
    raw = engine.raw_connection()
    try:
        _busy, pages, copied = raw.cursor().execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    finally:
        raw.close()
    return pages, copied


def _write(engine, rows: int) -> None:  # type: ignore[no-untyped-def]
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE IF NOT EXISTS t (x TEXT)"))
    for i in range(rows):  # one commit each, as the writer's batches are
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO t VALUES (:x)"), {"x": f"{i:04d}" * 250})


def test_commits_leave_the_wal_alone_without_autocheckpoint(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'db.sqlite'}", autocheckpoint=False)
    # 1,500 commits of a 1 KB row pass SQLite's 1,000-page automatic checkpoint.
    _write(engine, 1500)
    assert (tmp_path / "db.sqlite").stat().st_size < 100_000  # all still in the WAL
    pages, copied = WalCheckpointer(engine, 1.0).checkpoint()[1:]
    assert pages > 1000 and copied == pages
    assert (tmp_path / "db.sqlite").stat().st_size > 1_500_000
    engine.dispose()


def test_the_checkpointer_thread_copies_the_wal_into_the_database(tmp_path: Path) -> None:
    db = tmp_path / "db.sqlite"
    engine = make_engine(f"sqlite:///{db}", autocheckpoint=False)
    _write(engine, 300)
    assert db.stat().st_size < 100_000  # the 300 KB are only in the WAL so far
    cp = WalCheckpointer(engine, 0.05)
    cp.start()
    try:
        deadline = time.monotonic() + 30
        while db.stat().st_size < 300_000 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert db.stat().st_size >= 300_000  # copied by the thread, not only on stop
    finally:
        cp.stop()
    engine.dispose()


def test_with_autocheckpoint_sqlite_does_it_in_the_commit(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    _write(engine, 1500)
    pages, _copied = _wal_pages(engine)
    # SQLite checkpointed at 1,000 pages and began the WAL again from its start.
    assert pages < 1000
    engine.dispose()

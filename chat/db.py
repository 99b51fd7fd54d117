"""Engine creation, SQLite pragmas, bringing the schema to the Alembic head, and the
database lock of a PostgreSQL server."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url

log = logging.getLogger(__name__)


def _sqlite_connect(dbapi_conn, _record) -> None:  # type: ignore[no-untyped-def]
    # pysqlite's own transaction handling breaks SAVEPOINT; SQLAlchemy's documented
    # recipe is to switch it off here and emit BEGIN ourselves (see _sqlite_begin).
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    # WAL lets history reads run beside the writer; synchronous=NORMAL keeps every
    # committed transaction across a process crash (kill -9), losing at most the last
    # ones on a power cut, which is the usual trade for chat.
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=5000")
    cur.close()


def _no_autocheckpoint(dbapi_conn, _record) -> None:  # type: ignore[no-untyped-def]
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA wal_autocheckpoint=0")
    cur.close()


def _sqlite_begin(conn) -> None:  # type: ignore[no-untyped-def]
    # Straight to the driver: exec_driver_sql builds an execution context and cursor
    # wrapper for a statement with no result, about a quarter of the writer's CPU for a
    # one-message batch.
    conn.connection.driver_connection.execute("BEGIN")


def make_engine(url: str, pool_size: int = 5, autocheckpoint: bool = True) -> Engine:
    """An engine whose pool has room for every thread that may hold a connection.

    With autocheckpoint=False, commits never copy the WAL into the database (SQLite
    otherwise does it inside whichever commit crosses 1,000 pages, and that one commit
    then waits for the copy and its fsyncs): run a `WalCheckpointer` beside it.
    """
    parsed = make_url(url)
    # Without it, every database error quotes the statement's parameters, and the log
    # would then hold whatever was being written: a failed register logged its bcrypt hash.
    common: dict[str, Any] = {"pool_size": pool_size, "hide_parameters": True}
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            path = Path(parsed.database).expanduser()
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            # The database holds password hashes: readable by the server's user only.
            path.touch(mode=0o600, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False}, **common)
        event.listen(engine, "connect", _sqlite_connect)
        if not autocheckpoint:
            event.listen(engine, "connect", _no_autocheckpoint)
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    return create_engine(url, pool_pre_ping=True, **common)


def alembic_config(url: str) -> Config:
    cfg = Config()
    # The migrations travel inside the installed package as chat.migrations.
    cfg.set_main_option("script_location", str(resources.files("chat.migrations")))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade_to_head(engine: Engine) -> None:
    """Apply every pending migration; the server calls this before it listens."""
    upgrade(engine, "head")


def upgrade(engine: Engine, revision: str) -> None:
    """Bring the schema to `revision`, in one transaction.

    On SQLite, foreign keys are off while it runs: a batch migration rebuilds a table
    (copy, drop, rename), and with the keys on, dropping `users` would cascade into every
    membership and message that refers to it. SQLite's own advice for schema changes is
    to switch them off outside the transaction and check them before committing.
    """
    cfg = alembic_config(engine.url.render_as_string(hide_password=False))
    sqlite = engine.dialect.name == "sqlite"
    with engine.connect() as conn:
        driver = conn.connection.driver_connection
        if sqlite:
            driver.execute("PRAGMA foreign_keys=OFF")  # type: ignore[union-attr]
        try:
            with conn.begin():
                cfg.attributes["connection"] = conn
                command.upgrade(cfg, revision)
                if sqlite:
                    broken = conn.exec_driver_sql("PRAGMA foreign_key_check").all()
                    if broken:
                        raise RuntimeError(f"the migration left {len(broken)} rows whose "
                                           f"foreign keys point nowhere; nothing was changed")
        finally:
            if sqlite:
                driver.execute("PRAGMA foreign_keys=ON")  # type: ignore[union-attr]


# How long a cluster node waits for another node's migrations before it gives up.
JOIN_WAIT = 30.0


class SchemaMismatch(Exception):
    """Running cluster nodes use another schema than this node's: the message says which
    way round, and what to do."""


def schema_mismatch(engine: Engine) -> str | None:
    """None if the database's schema is at this code's newest migration; else why not."""
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    cfg = alembic_config(engine.url.render_as_string(hide_password=False))
    scripts = ScriptDirectory.from_config(cfg)
    heads = set(scripts.get_heads())
    with engine.connect() as conn:
        current = set(MigrationContext.configure(conn).get_current_heads())
    if current == heads:
        return None
    known = {rev.revision for rev in scripts.walk_revisions()}
    if current - known:
        return ("the database's schema is newer than this node's code (another node was "
                "upgraded): upgrade this node to the same release")
    return ("the cluster's running nodes use an older schema than this node's code: stop "
            "them all, then start one upgraded node to migrate")


# The first key of our advisory locks: "chat" in ASCII, apart from other programs' locks.
_LOCK_CLASS = 0x63686174


def _advisory(conn: Any, function: str) -> Any:
    """One of PostgreSQL's advisory-lock functions on this schema's key, on `conn`."""
    return conn.execute(text(f"SELECT {function}(:c, hashtext(current_schema()))"),
                        {"c": _LOCK_CLASS}).scalar()


class DatabaseLock:
    """PostgreSQL's side of `files.DataLock`: a session advisory lock on the database's
    schema, held on a connection of its own by a running server for its life (and by
    chat-admin while it works on a stopped server's database). The file lock cannot see a
    server with another data directory, or on another host, that uses the same database;
    this one can. A lone server (and chat-admin offline) holds it exclusively: its writer's
    caches rely on being the only writer. The nodes of a cluster (`redis` set) hold it
    shared (`acquire_shared`): they order themselves through the database's row locks, but
    no lone server or offline chat-admin may come in beside them. On SQLite it does
    nothing: the file lock is enough.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._conn: Any = None
        self._shared = False
        self._taken = False  # acquired once: `held` takes it again when it is lost

    def acquire(self) -> bool:
        """Take the lock; False if someone else holds it."""
        if self.engine.dialect.name != "postgresql":
            return True
        conn = self.engine.connect()
        try:
            got = _advisory(conn, "pg_try_advisory_lock")
            conn.commit()  # a session lock outlives the transaction
        except BaseException:
            conn.close()
            raise
        if not got:
            conn.close()
            return False
        self._conn = conn
        self._taken = True
        return True

    def acquire_shared(self, migrate: Callable[[], None],
                       mismatch: Callable[[], str | None]) -> bool:
        """A cluster node's lock: shared with the other nodes. The first node (nobody else
        holds the lock) runs `migrate` while it holds it exclusively; a node that joins
        running ones must find the schema at its own newest migration (`mismatch` says
        None), since changing it under them is not safe: a migration means stopping every
        node. False if a lone server or chat-admin holds it."""
        if self.engine.dialect.name != "postgresql":
            migrate()
            return True
        conn = self.engine.connect()
        try:
            # A node that starts while another migrates finds the lock exclusive for a
            # moment: it waits that out, as it would not wait out a lone server's.
            deadline = time.monotonic() + JOIN_WAIT
            while True:
                first = _advisory(conn, "pg_try_advisory_lock")
                got = _advisory(conn, "pg_try_advisory_lock_shared")
                conn.commit()
                if got or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            if got and first:
                try:
                    migrate()
                finally:
                    _advisory(conn, "pg_advisory_unlock")
                    conn.commit()
            elif got and (why := mismatch()) is not None:
                raise SchemaMismatch(why)
        except BaseException:
            conn.close()
            raise
        if not got:
            conn.close()
            return False
        self._conn = conn
        self._shared = True
        self._taken = True
        return True

    def held(self) -> bool:
        """Still held, or taken again (from the lock keeper's thread, every few seconds).

        A session lock lives as long as its connection: a PostgreSQL restart (or a
        dropped connection) ends it, and a lone server could then start beside us.
        So the connection is checked, and when it is gone a new one takes the lock again,
        the same kind; False if that fails (someone else has it now, or no database)."""
        if not self._taken or self.engine.dialect.name != "postgresql":
            return True
        if self._conn is not None:
            try:
                self._conn.execute(text("SELECT 1"))
                self._conn.commit()
                return True
            except Exception:
                log.warning("the database lock's connection is gone; taking the lock again")
            try:
                self._conn.invalidate()
                self._conn.close()
            except Exception:
                log.debug("closing the database lock's old connection failed", exc_info=True)
            self._conn = None
        take = "pg_try_advisory_lock_shared" if self._shared else "pg_try_advisory_lock"
        try:
            conn = self.engine.connect()
            got = _advisory(conn, take)
            conn.commit()
        except Exception:
            log.warning("the database lock cannot be taken again yet", exc_info=True)
            return False
        if not got:
            conn.close()
            log.error("the database lock is held by another server now: this one stops "
                      "taking work")
            return False
        self._conn = conn
        return True

    def release(self) -> None:
        self._taken = False
        conn, self._conn = self._conn, None
        if conn is None:
            return
        unlock = "pg_advisory_unlock_shared" if self._shared else "pg_advisory_unlock"
        try:
            _advisory(conn, unlock)
            conn.commit()
        except Exception:
            # Back in the pool it would still hold the lock: close it for good instead.
            log.exception("could not release the database lock; closing its connection")
            conn.invalidate()
        conn.close()


class WalCheckpointer:
    """Copies SQLite's WAL into the database every `interval` seconds, on its own thread.

    In (a) of the benchmarks, the commit that happened to run SQLite's automatic
    checkpoint held up every message behind it: p99 13 ms, 7 ms without. This is the
    same PASSIVE checkpoint SQLite runs on its own, so the WAL starts over from its
    beginning as it did before (at the first write after a complete checkpoint); it takes
    no lock that the writer or a reader waits for. (A first version escalated to RESTART,
    which holds the write lock while it waits for readers, once the WAL passed 64 MiB:
    bench (c)'s 10,000 registrations then failed one with `internal`.)
    """

    def __init__(self, engine: Engine, interval: float) -> None:
        self.engine = engine
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="wal-checkpoint", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def checkpoint(self) -> tuple[int, int, int]:
        """One checkpoint now: (busy, pages in the WAL, pages copied), as SQLite says."""
        raw = self.engine.raw_connection()
        try:
            cur = raw.cursor()
            busy, pages, copied = cur.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            cur.close()
        finally:
            raw.close()  # back to the pool
        return busy, pages, copied

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.checkpoint()
            except Exception:
                # The WAL only grows meanwhile; the next round tries again.
                log.exception("WAL checkpoint failed")
        try:
            self.checkpoint()  # leave a short WAL behind
        except Exception:
            log.exception("WAL checkpoint failed")

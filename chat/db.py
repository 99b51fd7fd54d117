"""Engine creation, SQLite pragmas, and bringing the schema to the Alembic head."""

from __future__ import annotations

import logging
from importlib import resources
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event
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


def _sqlite_begin(conn) -> None:  # type: ignore[no-untyped-def]
    conn.exec_driver_sql("BEGIN")


def make_engine(url: str, pool_size: int = 5) -> Engine:
    """An engine whose pool has room for every thread that may hold a connection."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            path = Path(parsed.database).expanduser()
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            # The database holds password hashes: readable by the server's user only.
            path.touch(mode=0o600, exist_ok=True)
        engine = create_engine(
            url, connect_args={"check_same_thread": False}, pool_size=pool_size
        )
        event.listen(engine, "connect", _sqlite_connect)
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=pool_size)


def alembic_config(url: str) -> Config:
    cfg = Config()
    # The migrations travel inside the installed package as chat.migrations.
    cfg.set_main_option("script_location", str(resources.files("chat.migrations")))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade_to_head(engine: Engine) -> None:
    """Apply every pending migration; the server calls this before it listens."""
    cfg = alembic_config(engine.url.render_as_string(hide_password=False))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")

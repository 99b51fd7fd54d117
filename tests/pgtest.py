"""Throwaway PostgreSQL databases for the tests that run on both engines.

Each test gets a database of its own, created from the maintenance database under a
name no other run can take (`chat_test_<pid>_<8 hex>`) and dropped at teardown, after
ending whatever connections are left on it: two runs at once never see each other's data.

Where PostgreSQL is: `CHAT_TEST_POSTGRES`, a SQLAlchemy URL of a database the tests may
connect to and CREATE DATABASE from (by default the local server's `postgres`). If it does
not answer, the PostgreSQL tests are skipped with one reason, except under CI (`CI` set
to true, as `.ci/run` does), where they fail: CI must not pass without them.
"""

from __future__ import annotations

import functools
import os
import uuid

import pytest
from sqlalchemy.engine import make_url

DEFAULT_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
# A server that is there answers at once; this only bounds a host that drops packets.
CONNECT_TIMEOUT = 3


def admin_url() -> str:
    return os.environ.get("CHAT_TEST_POSTGRES") or DEFAULT_URL


def required() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _conninfo(url: str) -> str:
    """The libpq form of a SQLAlchemy URL (psycopg takes `postgresql://...`)."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def _connect(url: str):  # type: ignore[no-untyped-def]
    import psycopg

    return psycopg.connect(_conninfo(url), autocommit=True, connect_timeout=CONNECT_TIMEOUT)


@functools.cache
def unavailable() -> str | None:
    """Why PostgreSQL cannot be used here, once per run; None when it can."""
    url = admin_url()
    shown = make_url(url).render_as_string(hide_password=True)
    try:
        import psycopg  # noqa: F401
    except ImportError as exc:
        return f"PostgreSQL tests need psycopg ({exc})"
    try:
        with _connect(url):
            pass
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return (f"PostgreSQL tests: no server at {shown} ({first}); "
                f"set CHAT_TEST_POSTGRES to a URL of one")
    return None


def need_postgres() -> None:
    """Skip the calling test (fail it under CI) when PostgreSQL is not usable."""
    why = unavailable()
    if why is not None:
        if required():
            pytest.fail(f"{why} (CI=true: the PostgreSQL tests are mandatory)", pytrace=False)
        pytest.skip(why)


def create_database() -> str:
    """A new, empty database; its SQLAlchemy URL. Drop it with `drop_database`."""
    name = f"chat_test_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    with _connect(admin_url()) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return make_url(admin_url()).set(database=name).render_as_string(hide_password=False)


def drop_database(url: str) -> None:
    name = make_url(url).database
    assert name and name.startswith("chat_test_"), name  # never anything else
    with _connect(admin_url()) as conn:
        # A server that failed to stop, or an engine a test forgot, must not keep it alive.
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                     "WHERE datname = %s AND pid <> pg_backend_pid()", (name,))
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

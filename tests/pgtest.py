"""Throwaway PostgreSQL schemas for the tests that run on both engines.

Each test gets a schema of its own in one database, under a name no other run can take
(`chat_test_<pid>_<8 hex>`): its URL puts the schema first on the search path, so the
migrations, the server and chat-admin all work inside it, and names its connections
after it (`application_name`). At teardown those connections are ended and the schema
dropped: two runs at once never see each other's data. A schema rather than a database:
CREATE and DROP DATABASE cost half a second a test, which doubled these tests' time.

Where PostgreSQL is: `CHAT_TEST_POSTGRES`, a SQLAlchemy URL of a database the tests may
create schemas in (by default the local server's `test`). If it does not answer, the
PostgreSQL tests are skipped with one reason, except under CI (`CI` set to true, as
`.ci/run` does), where they fail: CI must not pass without them.
"""

from __future__ import annotations

import functools
import os
import uuid

import pytest
from sqlalchemy.engine import make_url

DEFAULT_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
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
        return f"the [postgresql] tests need psycopg ({exc})"
    try:
        with _connect(url):
            pass
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return (f"the [postgresql] tests: no PostgreSQL at {shown} ({first}); "
                f"CHAT_TEST_POSTGRES may name another")
    return None


def need_postgres() -> None:
    """Skip the calling test (fail it under CI) when PostgreSQL is not usable."""
    why = unavailable()
    if why is not None:
        if required():
            pytest.fail(f"{why} (CI=true: the PostgreSQL tests are mandatory)", pytrace=False)
        pytest.skip(why)


def one_skip_line(report: pytest.TestReport) -> None:
    """Our skips all at one place, so that pytest's summary (-ra) shows them as one line,
    `SKIPPED [N] tests/pgtest.py:..: the [postgresql] tests: no PostgreSQL at ...`,
    not one line a test."""
    why = unavailable()
    if (why is not None and report.skipped and isinstance(report.longrepr, tuple)
            and report.longrepr[2] == f"Skipped: {why}"):
        report.longrepr = (__file__, need_postgres.__code__.co_firstlineno, report.longrepr[2])


def create_schema() -> tuple[str, str]:
    """A new, empty schema: (its name, the SQLAlchemy URL that works in it)."""
    name = f"chat_test_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    with _connect(admin_url()) as conn:
        conn.execute(f'CREATE SCHEMA "{name}"')
    url = make_url(admin_url()).update_query_dict(
        {"options": f"-csearch_path={name}", "application_name": name})
    return name, url.render_as_string(hide_password=False)


def drop_schema(name: str) -> None:
    assert name.startswith("chat_test_"), name  # never anything else
    with _connect(admin_url()) as conn:
        # A server that failed to stop, or an engine a test forgot, must not hold a lock
        # the DROP would wait for.
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                     "WHERE application_name = %s AND pid <> pg_backend_pid()", (name,))
        conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')

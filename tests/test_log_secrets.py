"""Nothing secret reaches the log, even when the database fails in the middle of a write.

A locked SQLite database once logged an INSERT's parameters, bcrypt hash included: the
engine's errors quote their parameters unless it is made with `hide_parameters=True`.
"""

from __future__ import annotations

import logging
import sqlite3
from typing import Any

import pytest
from conftest import PASSWORD
from sqlalchemy import event

from chat import db
from chat.auth import SCHEME


def _all_log_text(caplog: pytest.LogCaptureFixture) -> str:
    # Each record as a handler would write it, traceback and exception text included.
    formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
    return "\n".join(formatter.format(record) for record in caplog.records)


def test_a_failed_register_insert_logs_neither_hash_nor_password(chat_server, caplog):
    server = chat_server.server
    hashes: list[str] = []
    real_hash = server.hasher.hash

    def recording_hash(password: str) -> str:
        digest = real_hash(password)
        hashes.append(digest)
        return digest

    server.hasher.hash = recording_hash  # type: ignore[method-assign]

    def locked(cursor: Any, statement: str, parameters: Any, context: Any) -> bool | None:
        # What SQLite says when another process holds the write lock past busy_timeout;
        # raised from the driver's own call, so SQLAlchemy wraps it as it would a real one.
        if statement.lstrip().upper().startswith("INSERT INTO USERS"):
            raise sqlite3.OperationalError("database is locked")
        return None

    event.listen(server.engine, "do_execute", locked)
    caplog.set_level(logging.DEBUG)
    try:
        c = chat_server.client()
        reply = c.request({"type": "register", "username": "mallory", "password": PASSWORD})
    finally:
        event.remove(server.engine, "do_execute", locked)
    assert reply["type"] == "error" and reply["code"] == "internal"
    assert hashes, "the register never got as far as hashing"
    text = _all_log_text(caplog)
    assert "database is locked" in text  # the failure itself is logged...
    for secret in (PASSWORD, *hashes, *(h.rsplit("$", 1)[-1] for h in hashes)):
        assert secret not in text  # ...but none of what it was storing
    assert SCHEME not in text and "$2b$" not in text
    # And the next registration works: the failure left nothing behind.
    assert c.request({"type": "register", "username": "mallory", "password": PASSWORD})[
        "type"] == "ok"


@pytest.mark.parametrize(
    "url", ["postgresql+psycopg://chat@db.example/chat", "mysql+pymysql://chat@db.example/chat"]
)
def test_every_dialect_hides_parameters(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Their drivers need not be installed here: only what make_engine asks for matters.
    asked: dict[str, Any] = {}

    def fake_create_engine(u: str, **kwargs: Any) -> object:
        asked.update(kwargs)
        return object()

    monkeypatch.setattr(db, "create_engine", fake_create_engine)
    db.make_engine(url)
    assert asked.get("hide_parameters") is True


def test_sqlite_engine_hides_parameters(tmp_path) -> None:
    engine = db.make_engine(f"sqlite:///{tmp_path / 'x.db'}")
    try:
        assert engine.hide_parameters is True
    finally:
        engine.dispose()

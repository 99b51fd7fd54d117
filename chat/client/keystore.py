"""The client's key store: one SQLite file per device (per server and username).

Theory of operation. The store is the only place the client keeps end-to-end state:
its Olm account, Olm sessions, Megolm sessions (outbound and inbound), the devices it
has seen (trust on first use), the replay table and the messages it cannot decrypt yet.
vodozemac pickles are encrypted by vodozemac with a 32-byte pickle key, which lives in a
0600 key file beside the database, or is derived from a passphrase with scrypt. The
rest (who one talks to, device keys, message ids) is metadata kept in plain SQLite,
protected by the file's mode only: the database and its directory must be the user's
own and closed to group and others (0600, 0700), or the store refuses to open.

One `KeyStore` belongs to one thread (the crypto machine's caller). Writes happen
inside `transaction()`; nested transactions join the outer one, so a caller groups
everything one to-device message changes into one commit, and acknowledges the message
to the server only after `transaction()` returned ("commit, then ack"). SQLite runs
in WAL mode with synchronous=FULL so that a returned commit survives a crash.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
import sqlite3
import stat
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

APP_DIR = "chat-client"  # under $XDG_DATA_HOME, apart from the server's `chat/`
PICKLE_KEY_BYTES = 32  # what vodozemac's pickle() takes
# scrypt for a passphrase: n=2**17, r=8 (128 MiB, about half a second) is the cost
# OWASP and the scrypt paper's "interactive login" guidance point at; it is paid once
# per start of the client, and makes each guess at a stolen store as dear.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**17, 8, 1
SCRYPT_SALT_BYTES = 16
_CHECK_LABEL = b"chat-client key store check v1"
SCHEMA_VERSION = 1

# Device states (trust on first use): "ok" is the key first seen; "changed" means the
# directory later offered other keys under the same id, which is never used again;
# "blocked" is the user's choice; "gone" is a device no longer in its owner's list.
DEVICE_STATES = ("ok", "changed", "blocked", "gone")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS account (id INTEGER PRIMARY KEY CHECK (id = 1),
    pickle TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS olm_sessions (session_id TEXT PRIMARY KEY,
    sender_key TEXT NOT NULL, pickle TEXT NOT NULL, last_used REAL NOT NULL);
CREATE INDEX IF NOT EXISTS olm_by_key ON olm_sessions (sender_key, last_used);
CREATE TABLE IF NOT EXISTS outbound_group (conversation TEXT PRIMARY KEY,
    session_id TEXT NOT NULL, pickle TEXT NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS shared_with (session_id TEXT NOT NULL, username TEXT NOT NULL,
    device TEXT NOT NULL, PRIMARY KEY (session_id, username, device));
CREATE TABLE IF NOT EXISTS inbound_group (session_id TEXT PRIMARY KEY,
    conversation TEXT NOT NULL, sender TEXT NOT NULL, sender_device TEXT NOT NULL,
    sender_key TEXT NOT NULL, sender_ed25519 TEXT NOT NULL, forwarded INTEGER NOT NULL,
    first_index INTEGER NOT NULL, pickle TEXT NOT NULL, received REAL NOT NULL);
CREATE TABLE IF NOT EXISTS devices (username TEXT NOT NULL, device TEXT NOT NULL,
    ed25519 TEXT NOT NULL, curve25519 TEXT NOT NULL, first_seen REAL NOT NULL,
    verified INTEGER NOT NULL DEFAULT 0, state TEXT NOT NULL DEFAULT 'ok',
    PRIMARY KEY (username, device));
CREATE TABLE IF NOT EXISTS replay (session_id TEXT NOT NULL, message_index INTEGER NOT NULL,
    msg_id INTEGER NOT NULL, PRIMARY KEY (session_id, message_index));
CREATE TABLE IF NOT EXISTS pending (msg_id INTEGER PRIMARY KEY, session_id TEXT NOT NULL,
    frame TEXT NOT NULL, reason TEXT NOT NULL, received REAL NOT NULL);
CREATE INDEX IF NOT EXISTS pending_by_session ON pending (session_id);
CREATE TABLE IF NOT EXISTS outbox (send_id TEXT PRIMARY KEY, request TEXT NOT NULL,
    created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS encrypted_conversations (conversation TEXT PRIMARY KEY,
    since REAL NOT NULL);
"""


class KeyStoreError(Exception):
    """The key store cannot be used: wrong permissions, wrong key or passphrase, or a
    file that is not a key store. The message names the file."""


@dataclass(frozen=True, slots=True)
class Device:
    """A device of another user (or of one's own), as first seen."""
    username: str  # lower-case: usernames are unique regardless of case
    device: str
    ed25519: str
    curve25519: str
    first_seen: float
    verified: bool
    state: str

    @property
    def trusted(self) -> bool:
        """Usable: not changed, blocked or gone (verified or not)."""
        return self.state == "ok"


@dataclass(frozen=True, slots=True)
class InboundRecord:
    """A Megolm room key as received, with whom it came from and what it is for."""
    session_id: str
    conversation: str
    sender: str
    sender_device: str
    sender_key: str
    sender_ed25519: str
    forwarded: bool
    first_index: int
    pickle: str


def data_home(environ: Mapping[str, str]) -> Path:
    base = environ.get("XDG_DATA_HOME")
    if base and Path(base).is_absolute():  # the XDG spec: a relative value is ignored
        return Path(base)
    home = environ.get("HOME")
    return (Path(home) if home else Path.home()) / ".local" / "share"


def store_path(server: str, username: str, environ: Mapping[str, str]) -> Path:
    """Where the store of `username` on `server` lives: one directory per server (its
    name quoted so that any host:port is one safe, distinct file name)."""
    return (data_home(environ) / APP_DIR / quote(server.lower(), safe="")
            / f"{username.lower()}.sqlite3")


def _check_private(path: Path, *, directory: bool = False) -> None:
    st = path.stat()
    if st.st_uid != os.getuid():
        raise KeyStoreError(f"{path}: not owned by this user; refusing to use it")
    # A directory others may enter would let them see the names; one they may write
    # lets them swap the files. Either way the store is not private.
    if stat.S_IMODE(st.st_mode) & 0o077:
        want = "0700" if directory else "0600"
        raise KeyStoreError(f"{path}: group or others may access it "
                            f"(mode {stat.S_IMODE(st.st_mode):04o}); chmod {want} it")


def _create_private(path: Path, data: bytes = b"") -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


class KeyStore:
    """One device's end-to-end state in one SQLite file. Open it with `open`."""

    def __init__(self, path: Path, conn: sqlite3.Connection, pickle_key: bytes) -> None:
        self.path = path
        self._db = conn
        self._key = pickle_key
        self._depth = 0

    def __repr__(self) -> str:  # never the pickle key
        return f"KeyStore({str(self.path)!r})"

    # -- opening --------------------------------------------------------------------

    @classmethod
    def open(cls, path: Path, *, passphrase: str | None = None) -> KeyStore:
        """Open the store at `path`, creating it (and its 0700 directory) if missing.

        Without a passphrase the pickle key is the key file `<path>.key`; with one, it
        is derived with scrypt, whose salt and parameters the store keeps. A store made
        one way opens only that way."""
        path = Path(path)
        # The directory above (chat-client/, naming the servers one uses) is private too;
        # any missing above that are made as the user's umask says (the XDG data home).
        path.parent.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        path.parent.mkdir(mode=0o700, exist_ok=True)
        _check_private(path.parent, directory=True)
        keyfile = path.with_suffix(".key")
        new = not path.exists()
        if new:
            _create_private(path)
        _check_private(path)
        # Not tied to the opening thread: the client library serialises every use under
        # its own lock (chat.client.secure), from its reader and its sender threads.
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.executescript(_SCHEMA)
            meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
            if new or "key_check" not in meta:
                key, meta_new = cls._new_key(keyfile, passphrase)
                meta_new["schema"] = str(SCHEMA_VERSION)
                meta_new["key_check"] = _key_check(key)
                conn.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                                 meta_new.items())
            else:
                key = cls._existing_key(path, keyfile, meta, passphrase)
                if not hmac.compare_digest(_key_check(key), meta["key_check"]):
                    raise KeyStoreError(
                        f"{path}: wrong passphrase" if passphrase is not None
                        else f"{keyfile}: not the key of this store")
        except sqlite3.DatabaseError as e:
            conn.close()
            raise KeyStoreError(f"{path}: not a key store ({e})") from None
        except BaseException:
            conn.close()
            raise
        return cls(path, conn, key)

    @classmethod
    def for_device(cls, server: str, username: str, environ: Mapping[str, str] = os.environ,
                   *, passphrase: str | None = None) -> KeyStore:
        return cls.open(store_path(server, username, environ), passphrase=passphrase)

    @staticmethod
    def _new_key(keyfile: Path, passphrase: str | None) -> tuple[bytes, dict[str, str]]:
        if passphrase is None:
            key = secrets.token_bytes(PICKLE_KEY_BYTES)
            if keyfile.exists():
                raise KeyStoreError(f"{keyfile}: a key file without its store; move it away")
            _create_private(keyfile, base64.b64encode(key) + b"\n")
            return key, {"key_mode": "file"}
        salt = secrets.token_bytes(SCRYPT_SALT_BYTES)
        params = {"key_mode": "passphrase", "scrypt_salt": base64.b64encode(salt).decode(),
                  "scrypt_n": str(SCRYPT_N), "scrypt_r": str(SCRYPT_R),
                  "scrypt_p": str(SCRYPT_P)}
        return _derive(passphrase, params), params

    @staticmethod
    def _existing_key(path: Path, keyfile: Path, meta: dict[str, str],
                      passphrase: str | None) -> bytes:
        if meta.get("key_mode") == "passphrase":
            if passphrase is None:
                raise KeyStoreError(f"{path}: this store is protected by a passphrase")
            return _derive(passphrase, meta)
        if passphrase is not None:
            raise KeyStoreError(f"{path}: this store uses a key file, not a passphrase")
        if not keyfile.exists():
            raise KeyStoreError(f"{keyfile}: missing; the store cannot be read without it")
        _check_private(keyfile)
        try:
            key = base64.b64decode(keyfile.read_bytes().strip(), validate=True)
        except ValueError:
            key = b""
        if len(key) != PICKLE_KEY_BYTES:
            raise KeyStoreError(f"{keyfile}: not a key file")
        return key

    def close(self) -> None:
        self._db.close()

    # -- transactions ---------------------------------------------------------------

    @contextmanager
    def transaction(self, *, durable: bool = True) -> Iterator[None]:
        """Everything inside is committed together, or not at all. Nested uses join
        the outermost, which commits when it ends: durably (synced to disk), unless
        `durable=False` says a power cut may lose it (an application crash may not):
        what each decrypted message records costs a sync otherwise, five times the
        decryption itself."""
        if self._depth:
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
            return
        if not durable:
            self._db.execute("PRAGMA synchronous=NORMAL")
        try:
            self._db.execute("BEGIN IMMEDIATE")
            self._depth = 1
            try:
                yield
            except BaseException:
                self._depth = 0
                self._db.execute("ROLLBACK")
                raise
            self._depth = 0
            self._db.execute("COMMIT")
        finally:
            if not durable:
                self._db.execute("PRAGMA synchronous=FULL")

    def _write(self, sql: str, args: tuple[Any, ...] = ()) -> None:
        # Writes outside a transaction would commit on their own and break the
        # "commit then ack" promise, so they are a programming error.
        assert self._depth, "key store writes belong in a transaction()"
        self._db.execute(sql, args)

    # -- meta -----------------------------------------------------------------------

    def get_meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        self._write("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    # -- pickles --------------------------------------------------------------------
    # Objects come in and out as vodozemac objects with a pickle()/from_pickle(); the
    # key never leaves this class.

    def load_account(self, cls: Any) -> Any | None:
        row = self._db.execute("SELECT pickle FROM account").fetchone()
        return cls.from_pickle(row[0], self._key) if row else None

    def save_account(self, account: Any) -> None:
        self._write("INSERT OR REPLACE INTO account VALUES (1, ?)",
                    (account.pickle(self._key),))

    def olm_sessions(self, cls: Any, sender_key: str) -> list[Any]:
        """The Olm sessions with a device, the most recently used first."""
        rows = self._db.execute("SELECT pickle FROM olm_sessions WHERE sender_key = ? "
                                "ORDER BY last_used DESC", (sender_key,)).fetchall()
        return [cls.from_pickle(r[0], self._key) for r in rows]

    def save_olm_session(self, sender_key: str, session: Any) -> None:
        self._write("INSERT OR REPLACE INTO olm_sessions VALUES (?, ?, ?, ?)",
                    (session.session_id, sender_key, session.pickle(self._key), time.time()))

    def load_outbound(self, cls: Any, conversation: str) -> tuple[Any, float] | None:
        row = self._db.execute("SELECT pickle, created FROM outbound_group "
                               "WHERE conversation = ?", (conversation,)).fetchone()
        return (cls.from_pickle(row[0], self._key), row[1]) if row else None

    def save_outbound(self, conversation: str, session: Any, created: float) -> None:
        self._write("INSERT OR REPLACE INTO outbound_group VALUES (?, ?, ?, ?)",
                    (conversation, session.session_id, session.pickle(self._key), created))

    def drop_outbound(self, conversation: str) -> None:
        self._write("DELETE FROM outbound_group WHERE conversation = ?", (conversation,))

    def outbound_shared_with(self, username: str, device: str) -> list[str]:
        """The conversations whose current outbound session that device was given."""
        rows = self._db.execute(
            "SELECT o.conversation FROM outbound_group o JOIN shared_with s "
            "ON o.session_id = s.session_id WHERE s.username = ? AND s.device = ?",
            (username.lower(), device)).fetchall()
        return [r[0] for r in rows]

    def shared_with(self, session_id: str) -> set[tuple[str, str]]:
        rows = self._db.execute("SELECT username, device FROM shared_with "
                                "WHERE session_id = ?", (session_id,)).fetchall()
        return {(r[0], r[1]) for r in rows}

    def mark_shared(self, session_id: str, username: str, device: str) -> None:
        self._write("INSERT OR IGNORE INTO shared_with VALUES (?, ?, ?)",
                    (session_id, username.lower(), device))

    def inbound(self, session_id: str) -> InboundRecord | None:
        row = self._db.execute("SELECT session_id, conversation, sender, sender_device, "
                               "sender_key, sender_ed25519, forwarded, first_index, pickle "
                               "FROM inbound_group WHERE session_id = ?",
                               (session_id,)).fetchone()
        return InboundRecord(*row[:6], bool(row[6]), *row[7:]) if row else None

    def inbound_sessions(self) -> list[InboundRecord]:
        rows = self._db.execute("SELECT session_id FROM inbound_group ORDER BY received")
        return [r for (sid,) in rows.fetchall() if (r := self.inbound(sid)) is not None]

    def load_inbound(self, cls: Any, record: InboundRecord) -> Any:
        return cls.from_pickle(record.pickle, self._key)

    def save_inbound(self, record: InboundRecord, session: Any) -> None:
        self._write("INSERT OR REPLACE INTO inbound_group VALUES (?,?,?,?,?,?,?,?,?,?)",
                    (record.session_id, record.conversation, record.sender.lower(),
                     record.sender_device, record.sender_key, record.sender_ed25519,
                     int(record.forwarded), record.first_index, session.pickle(self._key),
                     time.time()))

    # -- devices (trust on first use) -----------------------------------------------

    def device(self, username: str, device: str) -> Device | None:
        row = self._db.execute("SELECT * FROM devices WHERE username = ? AND device = ?",
                               (username.lower(), device)).fetchone()
        return _device(row) if row else None

    def devices_of(self, username: str) -> list[Device]:
        rows = self._db.execute("SELECT * FROM devices WHERE username = ? ORDER BY device",
                                (username.lower(),)).fetchall()
        return [_device(r) for r in rows]

    def known_users(self) -> list[str]:
        """Everyone whose devices we know: whom we encrypt for, to ask about again."""
        rows = self._db.execute("SELECT DISTINCT username FROM devices ORDER BY username")
        return [r[0] for r in rows.fetchall()]

    def add_device(self, username: str, device: str, ed25519: str, curve25519: str) -> None:
        self._write("INSERT INTO devices (username, device, ed25519, curve25519, first_seen) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (username.lower(), device, ed25519, curve25519, time.time()))

    def set_device_state(self, username: str, device: str, state: str) -> None:
        assert state in DEVICE_STATES
        self._write("UPDATE devices SET state = ? WHERE username = ? AND device = ?",
                    (state, username.lower(), device))

    def set_verified(self, username: str, device: str, verified: bool = True) -> None:
        self._write("UPDATE devices SET verified = ? WHERE username = ? AND device = ?",
                    (int(verified), username.lower(), device))

    # -- replay protection and pending messages -------------------------------------

    def seen_index(self, session_id: str, message_index: int) -> int | None:
        """The msg_id a Megolm message index was first seen with, if any."""
        row = self._db.execute("SELECT msg_id FROM replay WHERE session_id = ? AND "
                               "message_index = ?", (session_id, message_index)).fetchone()
        return row[0] if row else None

    def record_index(self, session_id: str, message_index: int, msg_id: int) -> None:
        self._write("INSERT OR IGNORE INTO replay VALUES (?, ?, ?)",
                    (session_id, message_index, msg_id))

    def add_pending(self, msg_id: int, session_id: str, frame: dict[str, Any],
                    reason: str) -> None:
        self._write("INSERT OR REPLACE INTO pending VALUES (?, ?, ?, ?, ?)",
                    (msg_id, session_id, json.dumps(frame), reason, time.time()))

    def drop_pending(self, msg_id: int) -> None:
        self._write("DELETE FROM pending WHERE msg_id = ?", (msg_id,))

    def pending(self, session_id: str | None = None) -> list[dict[str, Any]]:
        """Stored frames not decrypted yet (of one session, or all), in msg_id order."""
        if session_id is None:
            rows = self._db.execute("SELECT frame FROM pending ORDER BY msg_id")
        else:
            rows = self._db.execute("SELECT frame FROM pending WHERE session_id = ? "
                                    "ORDER BY msg_id", (session_id,))
        return [json.loads(r[0]) for r in rows.fetchall()]

    # -- the outbox: to-device requests committed before they are sent ---------------

    def add_outbox(self, send_id: str, request: dict[str, Any]) -> None:
        self._write("INSERT INTO outbox VALUES (?, ?, ?)",
                    (send_id, json.dumps(request), time.time()))

    def drop_outbox(self, send_id: str) -> None:
        self._write("DELETE FROM outbox WHERE send_id = ?", (send_id,))

    def outbox(self) -> list[dict[str, Any]]:
        rows = self._db.execute("SELECT request FROM outbox ORDER BY created, send_id")
        return [json.loads(r[0]) for r in rows.fetchall()]

    # -- conversations seen encrypted (never downgraded) -----------------------------

    def pin_encrypted(self, conversation: str) -> None:
        self._write("INSERT OR IGNORE INTO encrypted_conversations VALUES (?, ?)",
                    (conversation, time.time()))

    def is_pinned(self, conversation: str) -> bool:
        return self._db.execute("SELECT 1 FROM encrypted_conversations WHERE "
                                "conversation = ?", (conversation,)).fetchone() is not None


def _device(row: tuple[Any, ...]) -> Device:
    return Device(row[0], row[1], row[2], row[3], row[4], bool(row[5]), row[6])


def _derive(passphrase: str, params: Mapping[str, str]) -> bytes:
    kdf = Scrypt(salt=base64.b64decode(params["scrypt_salt"]), length=PICKLE_KEY_BYTES,
                 n=int(params["scrypt_n"]), r=int(params["scrypt_r"]),
                 p=int(params["scrypt_p"]))
    return kdf.derive(passphrase.encode())


def _key_check(key: bytes) -> str:
    """A value that tells a right key from a wrong one without revealing it (an HMAC
    of a fixed label): a wrong passphrase is reported as such, not as broken pickles."""
    return hmac.new(key, _CHECK_LABEL, hashlib.sha256).hexdigest()

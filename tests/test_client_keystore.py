"""The client's key store: private files, encrypted pickles, durable transactions."""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path

import pytest
import vodozemac

from chat.client import keystore
from chat.client.keystore import InboundRecord, KeyStore, KeyStoreError, store_path


@pytest.fixture(autouse=True)
def cheap_scrypt(monkeypatch):
    # The real cost is half a second and 128 MiB; tests only need the same code path.
    monkeypatch.setattr(keystore, "SCRYPT_N", 2**10)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_store_and_its_key_are_private(tmp_path):
    path = tmp_path / "chat-client" / "srv" / "alice.sqlite3"
    store = KeyStore.open(path)
    assert mode(path) == 0o600 and mode(path.with_suffix(".key")) == 0o600
    assert mode(path.parent) == 0o700
    with store.transaction():
        store.set_meta("x", "y")
    store.close()
    for extra in path.parent.iterdir():  # WAL and shared-memory files too
        assert mode(extra) & 0o077 == 0, extra


@pytest.mark.parametrize("which", ["db", "key", "dir"])
def test_a_store_others_may_read_is_refused(tmp_path, which):
    path = tmp_path / "s" / "alice.sqlite3"
    KeyStore.open(path).close()
    target = {"db": path, "key": path.with_suffix(".key"), "dir": path.parent}[which]
    os.chmod(target, 0o755 if which == "dir" else 0o644)
    with pytest.raises(KeyStoreError, match="chmod"):
        KeyStore.open(path)


def test_the_path_is_per_server_and_user_under_xdg_data_home(tmp_path):
    env = {"XDG_DATA_HOME": str(tmp_path), "HOME": "/nonexistent"}
    path = store_path("Chat.example:7072", "Alice", env)
    assert path == tmp_path / "chat-client" / "chat.example%3A7072" / "alice.sqlite3"
    assert store_path("x", "alice", {"HOME": "/h"}) == Path(
        "/h/.local/share/chat-client/x/alice.sqlite3")
    assert store_path("x", "a", {"XDG_DATA_HOME": "rel", "HOME": "/h"}).parts[1] == "h"


def test_pickles_survive_a_reopen_and_are_encrypted_on_disk(tmp_path):
    path = tmp_path / "s" / "alice.sqlite3"
    store = KeyStore.open(path)
    account, group = vodozemac.Account(), vodozemac.GroupSession()
    inbound = vodozemac.InboundGroupSession(group.session_key)
    record = InboundRecord(group.session_id, "general", "alice", "laptop", "C", "E", False,
                           0, "")
    with store.transaction():
        store.save_account(account)
        store.save_inbound(record, inbound)
        store.save_outbound("general", group, 1.0)
    store.close()

    store = KeyStore.open(path)
    assert store.load_account(vodozemac.Account).ed25519_key == account.ed25519_key
    again = store.load_inbound(vodozemac.InboundGroupSession, store.inbound(group.session_id))
    assert again.session_id == group.session_id
    loaded, created = store.load_outbound(vodozemac.GroupSession, "general")
    assert loaded.session_key.to_base64() == group.session_key.to_base64() and created == 1.0
    key = base64.b64decode(path.with_suffix(".key").read_bytes())
    store.close()
    on_disk = b"".join(p.read_bytes() for p in path.parent.iterdir() if p.suffix != ".key")
    secret_key = group.session_key.to_base64().encode()
    assert key not in on_disk and base64.b64encode(key) not in on_disk
    assert secret_key[:40] not in on_disk


def test_a_wrong_or_missing_key_file_is_told(tmp_path):
    path = tmp_path / "s" / "alice.sqlite3"
    KeyStore.open(path).close()
    keyfile = path.with_suffix(".key")
    keyfile.write_bytes(base64.b64encode(b"\1" * 32))
    with pytest.raises(KeyStoreError, match="not the key of this store"):
        KeyStore.open(path)
    keyfile.unlink()
    with pytest.raises(KeyStoreError, match="missing"):
        KeyStore.open(path)


def test_passphrase_mode(tmp_path):
    path = tmp_path / "s" / "bob.sqlite3"
    store = KeyStore.open(path, passphrase="correct horse battery staple")
    assert not path.with_suffix(".key").exists()
    assert store.get_meta("scrypt_n") == str(2**10) and store.get_meta("scrypt_salt")
    account = vodozemac.Account()
    with store.transaction():
        store.save_account(account)
    store.close()
    with pytest.raises(KeyStoreError, match="wrong passphrase"):
        KeyStore.open(path, passphrase="wrong horse")
    with pytest.raises(KeyStoreError, match="protected by a passphrase"):
        KeyStore.open(path)
    store = KeyStore.open(path, passphrase="correct horse battery staple")
    assert store.load_account(vodozemac.Account).curve25519_key == account.curve25519_key
    assert "correct" not in repr(store)


def test_a_transaction_commits_all_or_nothing(tmp_path):
    store = KeyStore.open(tmp_path / "s" / "a.sqlite3")
    with pytest.raises(RuntimeError), store.transaction():
        store.add_device("bob", "phone", "E", "C")
        with store.transaction():  # nested: joins the outer one
            store.record_index("sid", 0, 17)
        raise RuntimeError("crash before the commit")
    assert store.device("bob", "phone") is None and store.seen_index("sid", 0) is None
    with store.transaction():
        store.add_device("Bob", "phone", "E", "C")
    assert store.device("BOB", "phone").state == "ok"
    with pytest.raises(AssertionError):
        store.set_meta("outside", "a transaction")


def test_a_transaction_not_synced_commits_and_leaves_the_store_synced(tmp_path):
    """durable=False (what a decrypted message records) skips the sync of that one
    commit only: every other transaction, above all the one before a to-device ack, is
    synced to disk."""
    store = KeyStore.open(tmp_path / "s" / "a.sqlite3")
    full = store._db.execute("PRAGMA synchronous").fetchone()[0]
    with store.transaction(durable=False):
        store.record_index("sid", 0, 17)
    assert store.seen_index("sid", 0) == 17
    with pytest.raises(RuntimeError), store.transaction(durable=False):
        store.record_index("sid", 1, 18)
        raise RuntimeError("rolled back")
    assert store.seen_index("sid", 1) is None
    assert store._db.execute("PRAGMA synchronous").fetchone()[0] == full == 2  # FULL


def test_pending_messages_are_kept_by_session(tmp_path):
    store = KeyStore.open(tmp_path / "s" / "a.sqlite3")
    with store.transaction():
        store.add_pending(5, "s1", {"msg_id": 5}, "no key")
        store.add_pending(3, "s1", {"msg_id": 3}, "no key")
        store.add_pending(4, "s2", {"msg_id": 4}, "no key")
    assert [f["msg_id"] for f in store.pending("s1")] == [3, 5]
    with store.transaction():
        store.drop_pending(3)
    assert [f["msg_id"] for f in store.pending()] == [4, 5]


def test_not_a_key_store_is_told(tmp_path):
    path = tmp_path / "s" / "a.sqlite3"
    path.parent.mkdir(mode=0o700)
    path.write_bytes(b"not sqlite at all, just some bytes" * 100)
    os.chmod(path, 0o600)
    with pytest.raises(KeyStoreError, match="not a key store"):
        KeyStore.open(path)

"""Start-up: the open-files limit, errors that say what is wrong and where, file modes."""

from __future__ import annotations

import importlib.util
import logging
import os
import socket
from pathlib import Path

import pytest
from conftest import ENGINES, make_settings
from cryptography.hazmat.primitives import serialization

from chat import certs
from chat import server as server_mod


class FakeLimits:
    """Stands in for the resource module: a soft and a hard open-files limit."""

    RLIM_INFINITY = -1
    RLIMIT_NOFILE = 7

    def __init__(self, soft: int, hard: int) -> None:
        self.soft, self.hard = soft, hard

    def getrlimit(self, which: int) -> tuple[int, int]:
        return self.soft, self.hard

    def setrlimit(self, which: int, limits: tuple[int, int]) -> None:
        soft, hard = limits
        if hard != self.hard or soft > self.hard:
            raise ValueError("not allowed")
        self.soft = soft


@pytest.mark.parametrize(
    ("soft", "hard", "wanted", "cap", "level"),
    [
        # An ordinary desktop or older distribution: thousands, plenty for a new server.
        (1024, 4096, 20000, 4032, logging.INFO),
        (1024, 524288, 20000, 20000, None),  # raised as far as needed: nothing to say
        # Really low: under 1,000 connections...
        (1024, 1024, 20000, 960, logging.WARNING),
        (256, 256, 500, 192, logging.WARNING),
        # ...or under a tenth of what max_connections asks for.
        (1024, 4096, 100000, 4032, logging.WARNING),
    ],
)
def test_open_files_cap_is_a_warning_only_when_really_low(
    monkeypatch, caplog, soft, hard, wanted, cap, level
) -> None:
    monkeypatch.setattr(server_mod, "resource", FakeLimits(soft, hard))
    caplog.set_level(logging.DEBUG, logger="chat.server")
    assert server_mod._connection_cap(wanted) == cap
    said = [r for r in caplog.records if "open-files limit" in r.getMessage()]
    if level is None:
        assert said == []
    else:
        assert [r.levelno for r in said] == [level]
        assert f"at most {cap} connections" in said[0].getMessage()


# --- errors that say which setting, where it was set, which file and what is wrong ------


@pytest.fixture
def run_main(monkeypatch, caplog):
    """`chat.server.main(argv)` -> (exit code, what it wrote to stderr and the log).

    Only for starts that must fail: one that succeeds is stopped and fails the test,
    instead of serving forever.
    """
    for name in [n for n in os.environ if n.startswith("CHAT_")]:
        monkeypatch.delenv(name)
    real_start = server_mod.Server.start

    def start_or_fail(self):
        real_start(self)
        self.stop()
        raise AssertionError("the server started")

    monkeypatch.setattr(server_mod.Server, "start", start_or_fail)
    caplog.set_level(logging.INFO)

    def run(*argv: str) -> tuple[int, str]:
        caplog.clear()
        code = server_mod.main(list(argv))
        return code, caplog.text

    return run


@pytest.mark.parametrize(
    ("how", "expected"),
    [
        ("flag", "port must be a whole number, not 'abc' (port set by the flag --port)"),
        ("env", "port must be a whole number, not 'abc' "
                "(port set by the environment variable CHAT_PORT)"),
        ("toml", "port must be a whole number, not 'seventy' (port set in {path})"),
    ],
)
def test_a_bad_value_names_setting_and_source_and_exits_2(
    run_main, monkeypatch, capsys, tmp_path, how, expected
):
    path = tmp_path / "config.toml"
    argv = ["--data-dir", str(tmp_path / "data")]
    if how == "flag":
        argv += ["--port", "abc"]
    elif how == "env":
        monkeypatch.setenv("CHAT_PORT", "abc")
    else:
        path.write_text('port = "seventy"\n')
        argv += ["--config", str(path)]
    code, _ = run_main(*argv)
    assert code == 2
    assert capsys.readouterr().err == f"chat-server: {expected.format(path=path)}\n"


def test_a_toml_file_that_does_not_parse_or_is_missing_exits_2(run_main, capsys, tmp_path):
    path = tmp_path / "config.toml"
    path.write_text("port = = 3\n")
    assert run_main("--config", str(path))[0] == 2
    err = capsys.readouterr().err
    assert f"config file {path} is not valid TOML" in err and "line 1" in err
    assert err.rstrip().endswith("(config set by the flag --config)")
    assert run_main("--config", str(tmp_path / "absent.toml"))[0] == 2
    assert capsys.readouterr().err == (
        f"chat-server: config file {tmp_path / 'absent.toml'} does not exist "
        "(config set by the flag --config)\n")


def _pair(tmp_path: Path, cert_dir: certs.CertPaths, *, cert: bytes | None = None,
          key: bytes | None = None, key_mode: int = 0o600) -> tuple[Path, Path]:
    certfile, keyfile = tmp_path / "server.crt", tmp_path / "server.key"
    certfile.write_bytes(cert if cert is not None else cert_dir.server_cert.read_bytes())
    keyfile.write_bytes(key if key is not None else cert_dir.server_key.read_bytes())
    keyfile.chmod(key_mode)
    return certfile, keyfile


def _start_argv(tmp_path: Path, certfile: Path, keyfile: Path, *more: str) -> list[str]:
    return ["--port", "0", "--data-dir", str(tmp_path / "data"), "--bcrypt-rounds", "4",
            "--certfile", str(certfile), "--keyfile", str(keyfile), *more]


def test_garbage_certificate_is_named(run_main, tmp_path, cert_dir):
    certfile, keyfile = _pair(tmp_path, cert_dir, cert=b"not a certificate\n")
    code, log_text = run_main(*_start_argv(tmp_path, certfile, keyfile))
    assert code == 1
    assert f"certfile {certfile} is not a PEM certificate" in log_text
    assert "(certfile set by the flag --certfile)" in log_text
    assert "PEM lib" not in log_text


def test_missing_key_file_is_named(run_main, monkeypatch, tmp_path, cert_dir):
    certfile, _ = _pair(tmp_path, cert_dir)
    monkeypatch.setenv("CHAT_KEYFILE", str(tmp_path / "absent.key"))
    argv = ["--port", "0", "--data-dir", str(tmp_path / "data"), "--certfile", str(certfile)]
    code, log_text = run_main(*argv)
    assert code == 1
    assert (f"keyfile {tmp_path / 'absent.key'} does not exist "
            "(keyfile set by the environment variable CHAT_KEYFILE)") in log_text
    assert "Errno" not in log_text


def test_key_file_without_a_private_key_is_named(run_main, tmp_path, cert_dir):
    certfile, keyfile = _pair(tmp_path, cert_dir, key=cert_dir.server_cert.read_bytes())
    config = tmp_path / "config.toml"
    config.write_text(f'keyfile = "{keyfile}"\n')
    code, log_text = run_main("--port", "0", "--data-dir", str(tmp_path / "data"),
                              "--certfile", str(certfile), "--config", str(config))
    assert code == 1
    assert f"keyfile {keyfile} holds no PEM private key" in log_text
    assert f"(keyfile set in {config})" in log_text


def test_key_that_does_not_match_the_certificate_is_named(run_main, tmp_path, cert_dir):
    certfile, keyfile = _pair(tmp_path, cert_dir, key=cert_dir.ca_key.read_bytes())
    code, log_text = run_main(*_start_argv(tmp_path, certfile, keyfile))
    assert code == 1
    assert f"keyfile {keyfile} does not match certfile {certfile}" in log_text
    assert ("(certfile set by the flag --certfile; keyfile set by the flag --keyfile)"
            in log_text)


def test_encrypted_key_is_named_not_prompted_for(run_main, tmp_path, cert_dir):
    key = serialization.load_pem_private_key(cert_dir.server_key.read_bytes(), None)
    locked = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                               serialization.BestAvailableEncryption(b"passphrase"))
    certfile, keyfile = _pair(tmp_path, cert_dir, key=locked)
    code, log_text = run_main(*_start_argv(tmp_path, certfile, keyfile))
    assert code == 1
    assert f"keyfile {keyfile} holds an encrypted private key" in log_text


def test_key_file_that_is_a_directory_is_named(run_main, tmp_path, cert_dir):
    certfile, _ = _pair(tmp_path, cert_dir)
    keydir = tmp_path / "keys"
    keydir.mkdir(mode=0o700)
    code, log_text = run_main(*_start_argv(tmp_path, certfile, keydir))
    assert code == 1
    assert f"keyfile {keydir} is a directory, not a file" in log_text


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0,
                    reason="root reads files whatever their mode")
def test_unreadable_key_file_is_named(run_main, tmp_path, cert_dir):
    certfile, keyfile = _pair(tmp_path, cert_dir, key_mode=0o000)
    code, log_text = run_main(*_start_argv(tmp_path, certfile, keyfile))
    assert code == 1
    assert f"keyfile {keyfile} cannot be read: permission denied" in log_text


def test_missing_client_cafile_is_named(run_main, tmp_path, cert_dir):
    certfile, keyfile = _pair(tmp_path, cert_dir)
    absent = tmp_path / "clients-ca.crt"
    code, log_text = run_main(*_start_argv(tmp_path, certfile, keyfile,
                                           "--client-cafile", str(absent)))
    assert code == 1
    assert (f"client_cafile {absent} does not exist "
            "(client_cafile set by the flag --client-cafile)") in log_text


def test_garbage_pepper_file_is_named(run_main, tmp_path, cert_dir):
    certfile, keyfile = _pair(tmp_path, cert_dir)
    pepper = tmp_path / "pepper"
    pepper.write_text("not hex\n")
    pepper.chmod(0o600)
    code, log_text = run_main(*_start_argv(tmp_path, certfile, keyfile,
                                           "--pepper-file", str(pepper)))
    assert code == 1
    assert (f"pepper file {pepper} holds more than hex digits "
            "(pepper_file set by the flag --pepper-file)") in log_text
    absent = tmp_path / "old-pepper"
    code, log_text = run_main(*_start_argv(tmp_path, certfile, keyfile,
                                           "--previous-pepper-files", str(absent)))
    assert code == 1
    assert f"previous pepper file {absent} does not exist" in log_text


def test_a_port_that_is_taken_is_named(run_main, tmp_path, cert_dir):
    certfile, keyfile = _pair(tmp_path, cert_dir)
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        argv = _start_argv(tmp_path, certfile, keyfile)
        argv[1] = str(port)
        code, log_text = run_main(*argv)
    assert code == 1
    assert f"cannot listen on 127.0.0.1 port {port}" in log_text
    assert "already listening there?" in log_text and "--port" in log_text
    assert "(host at its default; port set by the flag --port)" in log_text
    assert "while attempting to bind" not in log_text  # said once, not twice


def test_a_database_url_that_cannot_work_is_named_without_its_password(
    run_main, tmp_path, cert_dir
):
    certfile, keyfile = _pair(tmp_path, cert_dir)
    code, log_text = run_main(*_start_argv(tmp_path, certfile, keyfile,
                                           "--db", "nosuchdb://chat:s3cret-pw@host/chat"))
    assert code == 2
    assert "db is not a database URL this server can use" in log_text
    assert "(db set by the flag --db)" in log_text
    assert "s3cret-pw" not in log_text



def test_a_redis_url_that_cannot_work_is_named_without_its_password(
    run_main, tmp_path, cert_dir
):
    certfile, keyfile = _pair(tmp_path, cert_dir)
    code, log_text = run_main(*_start_argv(tmp_path, certfile, keyfile,
                                           "--redis", "redis://chat:s3cret@host:port/0"))
    assert code == 2
    assert "redis is not a Redis URL this server can use" in log_text
    assert "(redis set by the flag --redis)" in log_text
    assert "s3cret" not in log_text


def test_a_database_file_that_cannot_be_made_is_named(run_main, tmp_path, cert_dir):
    certfile, keyfile = _pair(tmp_path, cert_dir)
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    code, log_text = run_main(*_start_argv(tmp_path, certfile, keyfile,
                                           "--db", f"sqlite:///{blocker}/chat.db"))
    assert code == 1
    assert f"the database file {blocker} cannot be made" in log_text
    assert "(db set by the flag --db)" in log_text


# --- file modes: private directories, secrets no one else may read ---------------------

posix_only = pytest.mark.skipif(os.name != "posix", reason="file modes are POSIX")


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


@posix_only
def test_a_fresh_data_directory_and_its_certs_are_private(tmp_path):
    old = os.umask(0)  # the widest umask: the modes must not depend on it
    try:
        data = tmp_path / "new" / "data"
        server = server_mod.Server(
            server_mod.Settings(host="127.0.0.1", port=0, data_dir=str(data), bcrypt_rounds=4))
        server.start()
        server.stop()
    finally:
        os.umask(old)
    assert _mode(data) == 0o700
    assert _mode(data / "certs") == 0o700
    assert _mode(data / "pepper") == 0o600
    assert _mode(data / "certs" / "server.key") == 0o600


@posix_only
def test_an_existing_open_data_directory_is_left_alone_with_a_warning(
    server_factory, tmp_path, caplog
):
    data = tmp_path / "data"
    data.mkdir()
    data.chmod(0o755)
    caplog.set_level(logging.INFO)
    server_factory()
    assert _mode(data) == 0o755
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(f"directory {data} is readable by others (mode 0755)" in m
               and f"chmod 700 {data}" in m for m in warned)


@posix_only
@pytest.mark.parametrize(("mode", "who"), [(0o644, "readable"), (0o602, "writable"),
                                           (0o606, "readable and writable")])
def test_a_pepper_file_others_may_use_is_refused(run_main, tmp_path, cert_dir, mode, who):
    certfile, keyfile = _pair(tmp_path, cert_dir)
    pepper = tmp_path / "pepper"
    pepper.write_text(os.urandom(32).hex() + "\n")
    pepper.chmod(mode)
    code, log_text = run_main(*_start_argv(tmp_path, certfile, keyfile,
                                           "--pepper-file", str(pepper)))
    assert code == 2
    assert (f"pepper file {pepper} is {who} by others (mode {mode:04o}); "
            f"run chmod 600 {pepper} (pepper_file set by the flag --pepper-file)") in log_text
    assert _mode(pepper) == mode  # refused, not changed behind the operator's back


@posix_only
def test_a_retired_pepper_file_others_may_read_is_refused(run_main, tmp_path, cert_dir):
    certfile, keyfile = _pair(tmp_path, cert_dir)
    old = tmp_path / "old-pepper"
    old.write_text(os.urandom(32).hex() + "\n")
    old.chmod(0o604)
    code, log_text = run_main(*_start_argv(tmp_path, certfile, keyfile,
                                           "--previous-pepper-files", str(old)))
    assert code == 2
    assert f"previous pepper file {old} is readable by others" in log_text
    assert f"chmod 600 {old}" in log_text


@posix_only
def test_a_private_key_others_may_read_is_refused(run_main, tmp_path, cert_dir):
    certfile, keyfile = _pair(tmp_path, cert_dir, key_mode=0o644)
    code, log_text = run_main(*_start_argv(tmp_path, certfile, keyfile))
    assert code == 2
    assert (f"keyfile {keyfile} is readable by others (mode 0644); run chmod 600 {keyfile} "
            "(keyfile set by the flag --keyfile)") in log_text


@posix_only
def test_the_development_key_is_checked_too(run_main, tmp_path):
    data = tmp_path / "data"
    argv = ["--port", "0", "--data-dir", str(data), "--bcrypt-rounds", "4"]
    certs.generate_dev_certs(data / "certs")
    (data / "certs" / "server.key").chmod(0o640 | 0o004)
    code, log_text = run_main(*argv)
    assert code == 2
    assert f"keyfile {data / 'certs' / 'server.key'} is readable by others" in log_text
    assert "(data_dir set by the flag --data-dir)" in log_text


@posix_only
def test_group_readable_secrets_start_with_a_warning(server_factory, tmp_path, cert_dir, caplog):
    certfile, keyfile = _pair(tmp_path, cert_dir, key_mode=0o640)
    pepper = tmp_path / "pepper"
    pepper.write_text(os.urandom(32).hex() + "\n")
    pepper.chmod(0o640)
    caplog.set_level(logging.INFO)
    running = server_factory(certfile=str(certfile), keyfile=str(keyfile),
                             pepper_file=str(pepper))
    assert running.client().hello["type"] == "hello"
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    for what, path in (("keyfile", keyfile), ("pepper file", pepper)):
        assert any(m.startswith(f"{what} {path} is readable by its group (mode 0640)")
                   and f"chmod 600 {path}" in m for m in warned), warned


def test_a_database_driver_that_is_not_installed_is_named(run_main, tmp_path, cert_dir):
    certfile, keyfile = _pair(tmp_path, cert_dir)
    # A dialect SQLAlchemy knows, with a driver no one would install for tests.
    if importlib.util.find_spec("pymssql") is not None:
        pytest.skip("pymssql is installed here")
    url = "mssql+pymssql://chat:s3cret-pw@db.example/chat"
    code, log_text = run_main(*_start_argv(tmp_path, certfile, keyfile, "--db", url))
    assert code == 1
    assert "db needs a database driver that is not installed" in log_text
    assert "(db set by the flag --db)" in log_text
    assert "s3cret-pw" not in log_text


def test_a_database_from_a_newer_version_is_named(run_main, tmp_path, cert_dir):
    import sqlite3

    certfile, keyfile = _pair(tmp_path, cert_dir)
    db = tmp_path / "chat.db"
    with sqlite3.connect(db) as conn:  # as a later version would leave it
        conn.execute("CREATE TABLE alembic_version (version_num VARCHAR(32) PRIMARY KEY)")
        conn.execute("INSERT INTO alembic_version VALUES ('from_the_future')")
    code, log_text = run_main(*_start_argv(tmp_path, certfile, keyfile, "--db", f"sqlite:///{db}"))
    assert code == 1
    assert f"database sqlite:///{db} cannot be used" in log_text
    assert "from_the_future" in log_text


def test_a_failed_reload_names_the_file_and_its_source(server_factory, tmp_path, cert_dir,
                                                       caplog):
    certfile, keyfile = _pair(tmp_path, cert_dir)
    running = server_factory(certfile=str(certfile), keyfile=str(keyfile))
    server = running.server
    server.sources = {"keyfile": "by the flag --keyfile"}
    keyfile.write_bytes(cert_dir.ca_key.read_bytes())  # a key for another certificate
    caplog.set_level(logging.INFO)
    server.reload_certificates()
    assert (f"certificate reload failed, keeping the old one: keyfile {keyfile} does not "
            f"match certfile {certfile}") in caplog.text
    assert "keyfile set by the flag --keyfile" in caplog.text
    assert running.client().hello["type"] == "hello"  # still serving, on the old pair


def test_a_relative_xdg_data_home_is_ignored(monkeypatch, tmp_path):
    from chat.config import default_data_dir

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("XDG_DATA_HOME", "relative/dir")  # the XDG spec: ignore it
    assert default_data_dir() == tmp_path / ".local" / "share" / "chat"
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "abs"))
    assert default_data_dir() == tmp_path / "abs" / "chat"


@pytest.mark.parametrize("db_url", [ENGINES[1]], indirect=True)
def test_one_server_per_postgresql_database_whatever_its_data_dir(
        server_factory, db_url, tmp_path, cert_dir, capsys):
    """The data directory's lock cannot see a server elsewhere on the same database; the
    database's own lock can: a second server, and chat-admin without the first's control
    socket, are refused, and the database is free again once the first stops."""
    from chat import admin
    from chat.config import SettingError
    from chat.server import Server

    first = server_factory()
    first.register("alice")
    other = make_settings(tmp_path / "other", cert_dir, db=db_url)
    with pytest.raises(SettingError, match=r"another server .* is using this database"):
        Server(other).start()
    assert admin.main(["--data-dir", other.data_dir, "user", "list"]) == 3
    assert "its lock is held" in capsys.readouterr().err
    first.server.stop()
    assert admin.main(["--data-dir", other.data_dir, "--json", "user", "list"]) == 0
    assert '"alice"' in capsys.readouterr().out
    second = Server(other)
    second.start()
    second.stop()

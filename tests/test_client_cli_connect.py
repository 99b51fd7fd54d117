"""`chat-client` connecting: defaults, what a failure says, client certificates, the password.

Issue 15, items 5, 10 and the friction list: the server defaults to localhost:7072 and the
development CA to chat-server's own; a URL, a port that does not speak TLS or never
answers, and a server that wants a client certificate each say what is wrong and what to
try; the password is asked for only once the server has answered, with its minimum length.
The CLI runs as a subprocess (`run_cli`), or on a pty (pexpect) where a prompt is tested.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from chat import certs
from tests.test_client_cli import (
    NOWHERE,
    PASSWORD,
    ROOT,
    WAIT,
    closed_port,
    new_name,
    run_cli,
    server_args,
)
from tests.tls_helpers import client_certificate

pexpect = pytest.importorskip("pexpect")


# -- the server's address -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "suggested"),
    [("https://localhost:7072", "localhost:7072"), ("http://chat.example/", "chat.example:7072"),
     ("chat://[::1]:7000/x", "[::1]:7000")],
)
def test_a_url_says_to_give_host_and_port(given: str, suggested: str) -> None:
    result = run_cli("login", "--server", given, "--username", "alice")
    assert result.returncode == 2
    assert "is a URL" in result.stderr and f"try {suggested}" in result.stderr


@contextmanager
def listener(serve: Callable[[socket.socket], None]) -> Iterator[int]:
    """A plain TCP listener on 127.0.0.1 that runs `serve` on each connection; its port."""
    sock = socket.create_server(("127.0.0.1", 0))
    done = threading.Event()

    def accept() -> None:
        while not done.is_set():
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(WAIT)
                try:
                    serve(conn)
                except OSError:
                    pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield sock.getsockname()[1]
    finally:
        done.set()
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()
        thread.join(WAIT)


def test_a_plain_http_port_does_not_speak_tls(cert_dir: certs.CertPaths) -> None:
    def http(conn: socket.socket) -> None:
        conn.recv(4096)
        conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")

    with listener(http) as port:
        result = run_cli("login", "--server", f"127.0.0.1:{port}", "--cafile",
                         str(cert_dir.ca_cert), "--username", "alice")
    assert result.returncode == 3
    assert f"the server at 127.0.0.1:{port} does not speak TLS" in result.stderr
    assert "is it a chat server? The chat port is 7072." in result.stderr


def test_a_port_that_never_answers_says_what_a_handshake_timeout_means(
    cert_dir: certs.CertPaths,
) -> None:
    def silent(conn: socket.socket) -> None:
        conn.recv(4096)  # the ClientHello; no answer, until the client gives up
        conn.recv(4096)

    with listener(silent) as port:
        result = run_cli("login", "--server", f"127.0.0.1:{port}", "--cafile",
                         str(cert_dir.ca_cert), "--username", "alice", "--timeout", "0.5")
    assert result.returncode == 3
    assert "TLS handshake with" in result.stderr and "timed out after 0.5 s" in result.stderr
    assert "never answered" in result.stderr and "7072" in result.stderr


def test_nothing_listening_says_so() -> None:
    port = closed_port()
    result = run_cli("login", "--server", f"127.0.0.1:{port}", "--username", "alice")
    assert result.returncode == 3
    assert f"nothing listens on 127.0.0.1:{port}" in result.stderr


# -- the development CA -------------------------------------------------------------------------


def test_a_server_on_this_machine_is_checked_against_the_development_ca(
    chat_server: Any, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    (data / "chat" / "certs").mkdir(parents=True)
    (data / "chat" / "certs" / "ca.crt").write_bytes(chat_server.cafile.read_bytes())
    name = new_name()
    args = ["--server", f"localhost:{chat_server.port}", "--username", name]
    result = run_cli("register", *args, XDG_DATA_HOME=str(data))
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("using chat-server's development CA") == 1
    assert str(data / "chat" / "certs" / "ca.crt") in result.stderr
    # The login it suggests finds the development CA too: no --cafile to copy.
    assert "now log in with" in result.stdout and "--cafile" not in result.stdout
    # No development CA: the system trust store, which does not know the test CA.
    elsewhere = run_cli("login", *args, XDG_DATA_HOME=NOWHERE)
    assert elsewhere.returncode == 3 and "system trust store" in elsewhere.stderr


# -- client certificates (mutual TLS) ----------------------------------------------------------


@pytest.fixture
def mtls_server(server_factory: Any, cert_dir: certs.CertPaths) -> Any:
    return server_factory(client_cafile=str(cert_dir.ca_cert))


def test_a_server_that_wants_a_client_certificate_says_so_and_how(mtls_server: Any) -> None:
    result = run_cli("register", *server_args(mtls_server, new_name()))
    assert result.returncode == 3
    assert "requires a client certificate (mutual TLS) and none was given" in result.stderr
    assert "--certfile" in result.stderr and "--keyfile" in result.stderr
    assert "the connection is closed" not in result.stderr


def test_a_client_certificate_from_the_flags_or_the_config_file_is_used(
    mtls_server: Any, cert_dir: certs.CertPaths, tmp_path: Path
) -> None:
    cert, key = client_certificate(tmp_path / "mine", cert_dir)
    name = new_name()
    flags = run_cli("register", *server_args(mtls_server, name, "--certfile", str(cert),
                                             "--keyfile", str(key)))
    assert flags.returncode == 0, flags.stderr
    config = tmp_path / "config"
    (config / "chat").mkdir(parents=True)
    (config / "chat" / "client.toml").write_text(
        f'certfile = "{cert}"\nkeyfile = "{key}"\n', encoding="utf-8")
    login = run_cli("login", *server_args(mtls_server, name), input="/who\n",
                    XDG_CONFIG_HOME=str(config))
    assert login.returncode == 0, login.stderr
    assert f"-- online in #general: {name}" in login.stdout


def test_a_client_certificate_the_server_does_not_trust_is_said_to_be_refused(
    mtls_server: Any, tmp_path: Path
) -> None:
    stranger = certs.generate_dev_certs(tmp_path / "stranger")
    cert, key = client_certificate(tmp_path / "wrong", stranger)
    result = run_cli("register", *server_args(mtls_server, new_name(), "--certfile", str(cert),
                                              "--keyfile", str(key)))
    assert result.returncode == 3
    assert "refused the client certificate" in result.stderr
    assert f"{cert} must be issued by the CA the server trusts" in result.stderr


def test_an_unreadable_client_certificate_is_a_usage_error(
    chat_server: Any, tmp_path: Path
) -> None:
    garbage = tmp_path / "client.crt"
    garbage.write_text("not a certificate\n")
    result = run_cli("login", *server_args(chat_server, "alice", "--certfile", str(garbage)))
    assert result.returncode == 2
    assert f"cannot load the client certificate {garbage}" in result.stderr
    assert "PEM" in result.stderr
    missing = run_cli("login", *server_args(chat_server, "alice", "--certfile",
                                            str(tmp_path / "none.crt")))
    assert missing.returncode == 2 and "No such file" in missing.stderr


# -- the password, asked once the server has answered ----------------------------------------


def spawn(*args: str, env: dict[str, str] | None = None) -> Any:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("CHAT_")}
    environ.update(XDG_CONFIG_HOME=NOWHERE, XDG_DATA_HOME=NOWHERE, TERM="xterm",
                   NO_COLOR="1", PROMPT_TOOLKIT_NO_CPR="1")
    environ.update(env or {})
    if args[:1] == ("login",):  # these tests are about connecting, not encryption
        args = ("login", "--no-e2e", *args[1:])
    return pexpect.spawn(sys.executable, ["-m", "chat.client.cli", *args], env=environ,
                         cwd=str(ROOT), timeout=WAIT, encoding="utf-8", dimensions=(24, 120))


def test_with_the_server_down_no_password_is_asked_for() -> None:
    child = spawn("register", "--server", f"127.0.0.1:{closed_port()}", "--username", "alice")
    try:
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 3
    assert "cannot connect" in child.before and "password" not in child.before


def test_register_says_how_long_a_password_must_be_and_asks_again(chat_server: Any) -> None:
    name = new_name()
    child = spawn("register", *server_args(chat_server, name))
    try:
        child.expect(r"choose a password for \w+ \(at least 15 characters")
        child.sendline("too short")
        child.expect("that is 9 characters; the server wants at least 15")
        child.expect("choose a password")
        child.sendline(PASSWORD)
        child.expect("the same password again")
        child.sendline(PASSWORD)
        child.expect(f"registered {name}")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


def test_register_asks_again_for_a_password_the_server_finds_weak(chat_server: Any) -> None:
    name = new_name()
    child = spawn("register", *server_args(chat_server, name))
    try:
        weak = f"{name} is my name"  # holds the username: the server refuses it
        child.expect("choose a password")
        child.sendline(weak)
        child.expect("the same password again")
        child.sendline(weak)
        child.expect("the server refused that password: .*username")
        child.expect("choose a password")  # asked again, the command goes on
        child.sendline(PASSWORD)
        child.expect("the same password again")
        child.sendline(PASSWORD)
        child.expect(f"registered {name}")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


def test_a_slow_typist_outlasting_the_login_timeout_is_still_logged_in(
    server_factory: Any,
) -> None:
    server = server_factory(login_timeout=0.5)
    name = new_name()
    server.register(name, PASSWORD)
    child = spawn("login", *server_args(server, name, "--recent", "0"))
    try:
        child.expect("password for")
        # Typed only once the server has given up on this connection (its login timeout).
        deadline_reached = wait_until(lambda: server.server.connection_count == 0)
        assert deadline_reached, "the server never closed the idle connection"
        child.sendline(PASSWORD)
        child.expect(f"logged in as {name}")
        child.sendline("/quit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


def wait_until(condition: Callable[[], bool]) -> bool:
    """Poll `condition` (on a signal we cannot wait on directly), for at most WAIT."""
    event = threading.Event()
    for _ in range(int(WAIT / 0.05)):
        if condition():
            return True
        event.wait(0.05)
    return condition()

"""`chat-client`: argument and password handling, exit codes, line mode and the terminal UI.

The CLI runs as a real subprocess (`python -m chat.client.cli`) with stdin given and a
timeout; the end-to-end tests use the `chat_server` fixture from tests/conftest.py. Nothing
here sleeps: line mode waits for each reply, so its transcript is deterministic.
"""

from __future__ import annotations

import io
import json
import os
import socket
import ssl
import subprocess
import sys
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest

from chat import certs
from chat.client import ChatClient, raise_for_error
from chat.client.cli import (
    DEFAULT_PORT,
    UsageError,
    main,
    parse_server,
    read_password,
    report_refusal,
)
from chat.client.commands import (
    CANNOT_LEAVE_DEFAULT,
    NO_ROOM,
    ChatState,
    Help,
    Invalid,
    Notice,
    Quit,
    Request,
    parse_command,
)
from chat.tls import client_context, server_context

ROOT = Path(__file__).resolve().parent.parent
PASSWORD = "correct horse battery staple 42"
WAIT = 60.0  # seconds for one CLI run: Python start-up on a loaded 2-core machine included


# Where no test's files are: the user's own config file and development CA stay out of
# the tests unless a test points XDG_CONFIG_HOME or XDG_DATA_HOME somewhere itself.
NOWHERE = "/nonexistent/chat-client-tests"


def run_cli(
    *args: str, input: str = "", password: str | None = PASSWORD, merged: bool = False,
    **env: str,
) -> subprocess.CompletedProcess[str]:
    """Run chat-client; with `merged`, stderr goes into stdout, so their order is kept."""
    environ = {k: v for k, v in os.environ.items()
               if k != "CHAT_PASSWORD" and not k.startswith("CHAT_")}
    environ.update(XDG_CONFIG_HOME=NOWHERE, XDG_DATA_HOME=NOWHERE)
    if password is not None:
        environ["CHAT_PASSWORD"] = password
    environ.update(env)
    if args[:1] == ("login",):  # these tests are about the rest; tests/*_e2e.py encrypt
        args = ("login", "--no-e2e", *args[1:])
    return subprocess.run(
        [sys.executable, "-m", "chat.client.cli", *args],
        input=input, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT if merged else subprocess.PIPE,
        text=True, timeout=WAIT, env=environ, cwd=ROOT,
    )


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def new_name() -> str:
    return "u" + uuid.uuid4().hex[:12]


# -- arguments ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("chat.example:7000", ("chat.example", 7000)),
        ("127.0.0.1:9", ("127.0.0.1", 9)),
        ("[::1]:7000", ("::1", 7000)),
        ("[::1]", ("::1", DEFAULT_PORT)),
        ("chat.example", ("chat.example", DEFAULT_PORT)),
        ("::1", ("::1", DEFAULT_PORT)),
    ],
)
def test_server_addresses(text: str, expected: tuple[str, int]) -> None:
    assert parse_server(text) == expected


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["chat"],
        ["login", "--server", "https://localhost:7072", "--username", "alice"],
        ["login", "--server", "localhost"],  # no --username
        ["login", "--server", "localhost:0", "--username", "alice"],
        ["login", "--server", "localhost:70000", "--username", "alice"],
        ["login", "--server", "localhost:http", "--username", "alice"],
        ["login", "--server", "[::1", "--username", "alice"],
        ["login", "--server", ":7072", "--username", "alice"],
        ["register", "--server", "localhost", "--username", "alice", "--json"],
        ["login", "--server", "localhost", "--username", "alice", "--timeout", "0"],
    ],
)
def test_usage_errors_exit_2(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(args) == 2
    assert "usage:" in capsys.readouterr().err


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["login", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--cafile" in out and "--password-file" in out
    assert "insecure" not in out.lower()


@pytest.mark.parametrize("args", [["--help"], ["login", "--help"], ["register", "--help"]])
def test_help_lists_every_exit_code(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(args) == 0
    out = capsys.readouterr().out
    table = out[out.index("exit codes:"):]
    for code, words in [
        ("0", "end of stdin"), ("1", "refused by the server"), ("2", "usage error"),
        ("3", "server ended the session"), ("130", "Ctrl-C"),
    ]:
        assert any(line.split()[:1] == [code] for line in table.splitlines()), code
        assert words in table
    assert "shutdown" in table and "idle" in table


def test_a_missing_password_without_a_terminal_is_a_usage_error() -> None:
    result = run_cli(
        "login", "--server", f"127.0.0.1:{closed_port()}", "--username", "alice",
        password=None,
    )
    assert result.returncode == 2
    assert "CHAT_PASSWORD" in result.stderr and "--password-file" in result.stderr
    assert "Traceback" not in result.stderr


def test_an_unreadable_password_file_is_a_usage_error(tmp_path: Path) -> None:
    result = run_cli(
        "login", "--server", f"127.0.0.1:{closed_port()}", "--username", "alice",
        "--password-file", str(tmp_path / "missing"),
    )
    assert result.returncode == 2
    assert "password file" in result.stderr


def test_a_missing_ca_file_is_a_usage_error(tmp_path: Path) -> None:
    result = run_cli(
        "login", "--server", f"127.0.0.1:{closed_port()}", "--username", "alice",
        "--cafile", str(tmp_path / "nope.crt"),
    )
    assert result.returncode == 2
    assert "nope.crt" in result.stderr


def test_an_unreachable_server_exits_3() -> None:
    port = closed_port()
    result = run_cli("login", "--server", f"127.0.0.1:{port}", "--username", "alice")
    assert result.returncode == 3
    assert f"127.0.0.1:{port}" in result.stderr and "cannot connect" in result.stderr
    assert "Traceback" not in result.stderr


class _Stdin(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self._tty = tty

    def isatty(self) -> bool:
        return self._tty


def test_password_sources_in_order(tmp_path: Path) -> None:
    file = tmp_path / "pw"
    file.write_text("from the file\r\nsecond line\n", encoding="utf-8")
    env = {"CHAT_PASSWORD": "from the environment"}
    pipe = _Stdin(tty=False)
    assert read_password(file, username="a", environ=env, stdin=pipe) == "from the file"
    assert read_password(None, username="a", environ=env, stdin=pipe) == "from the environment"
    with pytest.raises(UsageError):
        read_password(None, username="a", environ={}, stdin=pipe)
    file.write_text("\n", encoding="utf-8")
    with pytest.raises(UsageError, match="empty"):
        read_password(file, username="a", environ=env, stdin=pipe)


def test_a_refusal_names_the_code_and_when_to_retry(capsys: pytest.CaptureFixture[str]) -> None:
    reply = {
        "type": "error", "code": "rate_limited", "message": "too many\x1b[2J", "retry_after": 9,
    }
    assert report_refusal("login refused", reply) == 1
    err = capsys.readouterr().err
    assert "login refused: rate_limited: too many" in err and "try again in 9 s" in err
    assert "\x1b" not in err


@pytest.mark.parametrize("retry_after", [10**400, -1, True, "9", float("inf")])
def test_a_nonsense_retry_after_is_left_out(
    retry_after: object, capsys: pytest.CaptureFixture[str]
) -> None:
    reply = {"type": "error", "code": "rate_limited", "message": "slow", "retry_after": retry_after}
    assert report_refusal("login refused", reply) == 1
    err = capsys.readouterr().err
    assert "login refused: rate_limited: slow" in err and "try again" not in err


# -- slash commands -----------------------------------------------------------------------------


def test_plain_lines_go_to_the_current_room() -> None:
    assert parse_command("hello there\n", "dev") == Request(
        {"type": "send", "room": "dev", "message": "hello there"}
    )
    assert parse_command("//not a command", "dev") == Request(
        {"type": "send", "room": "dev", "message": "/not a command"}
    )
    assert parse_command("   \n", "dev") is None


def test_commands_become_requests() -> None:
    assert parse_command("/join Dev", "general") == Request({"type": "join", "room": "Dev"})
    assert parse_command("/leave", "dev") == Request({"type": "leave", "room": "dev"})
    assert parse_command("/leave other", "dev") == Request({"type": "leave", "room": "other"})
    assert parse_command("/msg bob hi  there", "dev") == Request(
        {"type": "send", "to": "bob", "message": "hi  there"}
    )
    assert parse_command("/who", "dev") == Request({"type": "who", "room": "dev"})
    assert parse_command("/who x", "dev") == Request({"type": "who", "room": "x"})
    assert parse_command("/history 5", "dev") == Request(
        {"type": "history", "room": "dev", "limit": 5}
    )
    assert parse_command("/help", "dev") == Help()
    assert parse_command("/QUIT", "dev") == Quit()


@pytest.mark.parametrize(
    "line", ["/join", "/join a b", "/msg bob", "/msg", "/history a!b", "/history 0", "/nope"]
)
def test_bad_commands_say_how(line: str) -> None:
    assert isinstance(parse_command(line, "general"), Invalid)


@pytest.mark.parametrize("line", ["hello", "//hello", "/leave", "/who", "/history", "/history 3"])
def test_in_no_room_a_line_that_needs_one_is_not_sent(line: str) -> None:
    assert parse_command(line, None) == Notice(NO_ROOM)


def test_in_no_room_the_commands_that_name_a_room_still_work() -> None:
    assert parse_command("/join dev", None) == Request({"type": "join", "room": "dev"})
    assert parse_command("/who dev", None) == Request({"type": "who", "room": "dev"})
    assert parse_command("/leave dev", None) == Request({"type": "leave", "room": "dev"})
    assert parse_command("/msg bob hi", None) == Request(
        {"type": "send", "to": "bob", "message": "hi"}
    )


def ok(op: str, room: str) -> dict[str, Any]:
    return {"type": "ok", "op": op, "room": room, "re": 1}


def test_the_state_follows_joins_and_leaves() -> None:
    state = ChatState.start("general", ["general", "Dev", 7, None])  # non-names are ignored
    assert (state.room, state.rooms, state.prompt) == ("general", {"general", "dev"}, "[general]> ")
    state.follow({"type": "join", "room": "Ops"}, ok("join", "ops"))
    assert (state.room, state.rooms) == ("ops", {"general", "dev", "ops"})
    state.follow({"type": "leave", "room": "dev"}, ok("leave", "dev"))  # not the current one
    assert (state.room, state.rooms) == ("ops", {"general", "ops"})
    state.follow({"type": "leave", "room": "ops"}, ok("leave", "ops"))  # the current one
    assert (state.room, state.prompt) == ("general", "[general]> ")  # #general comes first
    state.follow({"type": "leave", "room": "general"}, ok("leave", "general"))
    assert (state.room, state.rooms, state.prompt) == (None, set(), "[-]> ")
    state.follow({"type": "join", "room": "x"}, ok("join", "x"))
    assert (state.room, state.prompt) == ("x", "[x]> ")


def test_after_leaving_the_current_room_another_of_the_users_rooms_becomes_current() -> None:
    state = ChatState.start("zeta", ["beta", "alpha", "zeta"])
    state.follow({"type": "leave", "room": "zeta"}, ok("leave", "zeta"))
    assert state.room == "alpha"


def test_refusals_and_odd_replies_change_nothing() -> None:
    state = ChatState.start("dev", ["general"])
    refusal = {"type": "error", "code": "not_in_room", "message": "no", "re": 1}
    state.follow({"type": "leave", "room": "dev"}, refusal)
    state.follow({"type": "leave", "room": "dev"}, {"type": "ok", "op": "leave", "room": 5})
    state.follow({"type": "leave", "room": "dev"}, {"type": "ok", "op": "join", "room": "dev"})
    state.follow({"type": "who", "room": "dev"}, {"type": "who", "room": "dev", "users": []})
    assert (state.room, state.rooms) == ("dev", {"dev", "general"})
    # A room name a broken server sends cannot reach the terminal raw through the prompt.
    state.follow({"type": "join", "room": "x"}, ok("join", "a\x1b[2Jb"))
    assert "\x1b" not in state.prompt and "\\x1b" in state.prompt


# -- against the real server --------------------------------------------------------------------


def server_args(server: Any, username: str, *extra: str) -> list[str]:
    return ["--server", server.address, "--cafile", str(server.cafile), "--username", username,
            *extra]


def test_register_then_register_again(chat_server: Any) -> None:
    name = new_name()
    first = run_cli("register", *server_args(chat_server, name))
    assert first.returncode == 0, first.stderr
    assert f"registered {name}" in first.stdout
    # The login line it suggests works as printed: the same server and CA.
    assert f"--server {chat_server.address}" in first.stdout
    assert f"--cafile {chat_server.cafile}" in first.stdout
    again = run_cli("register", *server_args(chat_server, name))
    assert again.returncode == 1
    assert "username_taken" in again.stderr


def test_register_with_a_weak_password_is_refused(chat_server: Any) -> None:
    result = run_cli("register", *server_args(chat_server, new_name()), password="short")
    assert result.returncode == 1
    assert "weak_password" in result.stderr


def test_login_with_a_wrong_password_is_refused(chat_server: Any) -> None:
    name = new_name()
    chat_server.register(name, PASSWORD)
    result = run_cli("login", *server_args(chat_server, name), password=PASSWORD + "!")
    assert result.returncode == 1
    assert "invalid_credentials" in result.stderr


def test_line_mode_transcript(chat_server: Any, tmp_path: Path) -> None:
    name, other = new_name(), new_name()
    chat_server.register(name, PASSWORD)
    chat_server.register(other, PASSWORD)
    password_file = tmp_path / "pw"
    password_file.write_text(PASSWORD + "\n", encoding="utf-8")
    script = "\n".join([
        "hello everyone",
        "/join dev",
        "in dev now",
        "/who",
        f"/msg {other} psst",
        "/leave nowhere",
        "/bogus",
        "/history 1",
        "",
    ])
    result = run_cli(
        "login", *server_args(chat_server, name, "--password-file", str(password_file)),
        input=script, password=None,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"-- logged in as {name}; rooms: #general"
    assert any(line.endswith(f"#general {name}: hello everyone") for line in lines)
    assert any(line.endswith(f"#dev {name}: in dev now") for line in lines)
    assert f"-- online in #dev: {name}" in lines
    assert any(line.endswith(f"(dm) {name} -> {other}: psst") for line in lines)
    # Errors go to stderr, the server's and the client's alike; messages to stdout.
    assert not any("error" in line for line in lines), lines
    assert "! error no_such_room" in result.stderr  # v1.1: no room by that name
    assert "unknown command /bogus" in result.stderr
    history = lines.index("-- history #dev: 1 message")
    assert lines[history + 1].endswith(f"#dev {name}: in dev now")
    assert lines[-1] == "-- bye"
    # The transcript is in command order: each reply came before the next command went.
    order = [lines.index(x) for x in (f"-- online in #dev: {name}", "-- history #dev: 1 message")]
    assert order == sorted(order)


def test_json_mode_prints_every_frame(chat_server: Any) -> None:
    name = new_name()
    chat_server.register(name, PASSWORD)
    result = run_cli(
        "login", *server_args(chat_server, name, "--json", "--room", "lobby"),
        input="hi \x1b[31m\n",
    )
    # A control character is refused by the server: the message was not delivered.
    assert result.returncode == 4, result.stderr
    assert "1 message not delivered" in result.stderr
    frames = [json.loads(line) for line in result.stdout.splitlines()]
    kinds = [f["type"] for f in frames]
    assert kinds[0] == "hello" and kinds[1] == "welcome" and kinds[-1] == "bye"
    assert any(f.get("type") == "ok" and f.get("room") == "lobby" for f in frames)
    # The refusal is in the transcript, which stays every frame as JSON.
    assert any(f["type"] == "error" and f["code"] == "invalid_field" for f in frames)


def test_a_message_sent_from_the_cli_reaches_another_client(chat_server: Any) -> None:
    sender, listener = new_name(), new_name()
    chat_server.register(sender, PASSWORD)
    chat_server.register(listener, PASSWORD)
    with ChatClient.connect(
        chat_server.host, chat_server.port, ssl_context=client_context(chat_server.cafile),
        timeout=20,
    ) as bob:
        raise_for_error(bob.login(listener, PASSWORD, timeout=20))
        result = run_cli("login", *server_args(chat_server, sender), input="ping from cli\n")
        assert result.returncode == 0, result.stderr
        for frame in bob.events(timeout=20):
            if frame.get("type") == "message" and frame.get("username") == sender:
                assert frame["message"] == "ping from cli"
                break


def test_an_untrusted_certificate_exits_3_and_says_what_to_do(
    chat_server: Any, tmp_path: Path
) -> None:
    other_ca = certs.generate_dev_certs(tmp_path / "other").ca_cert
    args = ["login", "--server", chat_server.address, "--username", "alice"]
    result = run_cli(*args, "--cafile", str(other_ca))
    assert result.returncode == 3
    assert "not trusted" in result.stderr and str(other_ca) in result.stderr
    assert "--cafile" in result.stderr and "ca.crt" in result.stderr
    assert "Traceback" not in result.stderr
    system = run_cli(*args)  # no --cafile: the system trust store knows no development CA
    assert system.returncode == 3
    assert "system trust store" in system.stderr


def test_interactive_session_in_a_terminal(chat_server: Any) -> None:
    pexpect = pytest.importorskip("pexpect")
    name = new_name()
    chat_server.register(name, PASSWORD)
    env = {k: v for k, v in os.environ.items() if k != "NO_COLOR"}
    env.update(
        CHAT_PASSWORD=PASSWORD, TERM="xterm", NO_COLOR="1",
        PROMPT_TOOLKIT_NO_CPR="1",  # the pty answers no cursor-position requests
    )
    child = pexpect.spawn(
        sys.executable,
        ["-m", "chat.client.cli", "login", "--no-e2e", *server_args(chat_server, name)],
        env=env, cwd=str(ROOT), timeout=30, encoding="utf-8", dimensions=(24, 120),
    )
    child.logfile_read = transcript = io.StringIO()
    try:
        child.expect_exact("[general]>")  # the renderer moves the cursor, not a space
        child.sendline("hello from a terminal")
        child.expect_exact(f"{name}: hello from a terminal")
        child.sendline("/join dev")
        child.expect_exact("[dev owner]>")  # the first to join a new room owns it
        child.sendline("/leave")  # the current room: back to #general, still joined
        child.expect_exact("-- ok: leave #dev")
        child.expect_exact("[general]>")
        child.sendline("/leave")  # #general: refused here, as the server would
        child.expect_exact(CANNOT_LEAVE_DEFAULT)
        child.sendline("/join dev")
        child.expect_exact("[dev owner]>")  # a room nobody is in: the first to join owns it
        child.sendcontrol("d")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0
    assert "not_in_room" not in transcript.getvalue()


def test_line_mode_follows_the_room_after_leaving_it(chat_server: Any) -> None:
    name = new_name()
    chat_server.register(name, PASSWORD)
    script = "\n".join([
        "/join dev",
        "/leave",  # the current room: #general, still joined, becomes current
        "back in general",
        "/leave general",  # refused here: everyone is in #general
        "/join Lobby",
        "in the lobby",
        "",
    ])
    result = run_cli("login", *server_args(chat_server, name), input=script, merged=True)
    assert result.returncode == 0, result.stdout
    lines = result.stdout.splitlines()
    assert "-- ok: leave #dev" in lines and CANNOT_LEAVE_DEFAULT in result.stdout
    assert any(line.endswith(f"#general {name}: back in general") for line in lines)
    assert any(line.endswith(f"#lobby {name}: in the lobby") for line in lines)
    assert not any("error" in line for line in lines), lines


# -- a certificate for another name -------------------------------------------------------------


def _cert_for(names: list[str], tmp_path: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate (and key) signed by it for `names` only: no localhost."""
    from datetime import UTC, datetime, timedelta

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.now(UTC) - timedelta(minutes=5)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=False, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(now + timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]),
                       critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = tmp_path / "ca.crt", tmp_path / "server.crt", tmp_path / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ))
    return paths


class _HandshakeOnly:
    """A TLS listener on 127.0.0.1:0 that completes handshakes and says nothing."""

    def __init__(self, certfile: Path, keyfile: Path) -> None:
        self.context = server_context(certfile, keyfile)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(WAIT)
        self.port = self.listener.getsockname()[1]
        self.handshakes = 0  # the ones that completed
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            try:
                conn.settimeout(WAIT)
                with self.context.wrap_socket(conn, server_side=True) as tls:
                    self.handshakes += 1
                    tls.recv(1)  # until the client hangs up
            except OSError:
                pass  # the client refused our certificate, as it should
            finally:
                conn.close()

    def __enter__(self) -> _HandshakeOnly:
        self.thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop.set()
        try:
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accept (close alone does not)
        except OSError:
            pass
        self.listener.close()
        self.thread.join(WAIT)
        assert not self.thread.is_alive()


def test_a_host_name_mismatch_names_the_certificates_names(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    ca, cert, key = _cert_for(["other.example", "chat.other.example"], tmp_path)
    monkeypatch.setenv("CHAT_PASSWORD", PASSWORD)
    with _HandshakeOnly(cert, key) as server:
        code = main([
            "login", "--server", f"127.0.0.1:{server.port}", "--cafile", str(ca),
            "--username", "alice",
        ])
    err = capsys.readouterr().err
    assert code == 3
    assert "mismatch" in err and "not trusted" in err
    assert "hint: the certificate is for other.example, chat.other.example, not 127.0.0.1" in err
    assert "localhost" not in err and "e.g." not in err
    assert server.handshakes == 1  # the names' connection; the real one never completed


def test_a_mismatch_hint_without_the_names_does_not_guess(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from chat.client import CertificateNotTrusted
    from chat.client.cli import _report, build_parser

    args = build_parser().parse_args(
        ["login", "--server", f"127.0.0.1:{closed_port()}", "--username", "alice"]
    )
    mismatch = CertificateNotTrusted(
        "not trusted", verify_message="Hostname mismatch, certificate is not valid for 'x'."
    )
    assert _report(mismatch, args) == 3
    err = capsys.readouterr().err
    assert "hint: connect by a name the certificate was issued for\n" in err
    assert "localhost" not in err and "e.g." not in err


def test_the_names_are_read_only_over_a_verified_chain(tmp_path: Path) -> None:
    from chat.client.cli import names_in_certificate
    from chat.client.transport import certificate_names

    ca, cert, key = _cert_for(["other.example"], tmp_path)
    stranger = certs.generate_dev_certs(tmp_path / "stranger").ca_cert
    with _HandshakeOnly(cert, key) as server:
        assert names_in_certificate("127.0.0.1", server.port, ca, WAIT) == ["other.example"]
        # Signed by a CA we do not trust: no names, however the server spells them.
        assert names_in_certificate("127.0.0.1", server.port, stranger, WAIT) == []
    unverified = client_context(ca)
    unverified.check_hostname = False
    unverified.verify_mode = ssl.CERT_NONE
    with pytest.raises(ValueError, match="verifies the chain"):
        certificate_names("127.0.0.1", 1, unverified, timeout=WAIT)


def _alice_leaves_messages(server: Any, alice: str, bob: str, room: str) -> None:
    with ChatClient.connect(
        server.host, server.port, ssl_context=client_context(server.cafile), timeout=20,
    ) as client:
        raise_for_error(client.login(alice, PASSWORD, timeout=20))
        raise_for_error(client.join(room, timeout=20))
        for n in (1, 2, 3):
            raise_for_error(client.say(room, f"room message {n}", timeout=20))
        raise_for_error(client.direct(bob, "a word while you were out", timeout=20))
        client.quit(20)


def test_login_shows_the_rooms_last_messages_then_what_came_while_away(
    chat_server: Any,
) -> None:
    alice, bob, room = new_name(), new_name(), "r" + uuid.uuid4().hex[:8]
    chat_server.register(alice, PASSWORD)
    chat_server.register(bob, PASSWORD)
    _alice_leaves_messages(chat_server, alice, bob, room)
    result = run_cli("login", *server_args(chat_server, bob, "--room", room), input="",
                     merged=True)
    assert result.returncode == 0, result.stdout
    lines = result.stdout.splitlines()
    assert lines[0] == f"-- logged in as {bob}; rooms: #general"
    header = lines.index(f"-- last messages in #{room}")
    said = [i for i, line in enumerate(lines) if f"#{room} {alice}: room message" in line]
    assert [lines[i].rsplit(" ", 1)[-1] for i in said] == ["1", "2", "3"]
    assert said == [header + 1, header + 2, header + 3]
    away = lines.index("-- while you were away")
    dms = [i for i, line in enumerate(lines) if "a word while you were out" in line]
    assert len(dms) == 1 and lines[dms[0]].endswith(
        f"(dm) {alice} -> {bob}: a word while you were out")
    assert said[-1] < away < dms[0]
    assert lines[-1] == "-- bye"


def test_recent_0_shows_neither_header(chat_server: Any) -> None:
    alice, bob, room = new_name(), new_name(), "r" + uuid.uuid4().hex[:8]
    chat_server.register(alice, PASSWORD)
    chat_server.register(bob, PASSWORD)
    _alice_leaves_messages(chat_server, alice, bob, room)
    result = run_cli(
        "login", *server_args(chat_server, bob, "--room", room, "--recent", "0"), input="",
    )
    assert result.returncode == 0, result.stderr
    assert "-- last messages" not in result.stdout and "while you were away" not in result.stdout
    assert "room message" not in result.stdout
    # The stored direct message is still shown, once, as it comes.
    assert result.stdout.count("a word while you were out") == 1


def test_json_mode_shows_no_backlog(chat_server: Any) -> None:
    alice, bob, room = new_name(), new_name(), "r" + uuid.uuid4().hex[:8]
    chat_server.register(alice, PASSWORD)
    chat_server.register(bob, PASSWORD)
    _alice_leaves_messages(chat_server, alice, bob, room)
    result = run_cli("login", *server_args(chat_server, bob, "--room", room, "--json"))
    assert result.returncode == 0, result.stderr
    frames = [json.loads(line) for line in result.stdout.splitlines()]
    assert not any(f.get("type") == "history" for f in frames)
    assert [f["message"] for f in frames if f.get("type") == "message"] == [
        "a word while you were out"]

"""v1.1 administration as the client sees it: registration tokens, a closed registration,
a disabled account and a session logged out by the operator.

Most run against the real server and `chat-admin`; where a reply is hard to bring about
(a token refused after the client sent it), the test makes the server say it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from chat import admin, errors, messages
from chat.client.cli import registration_closed
from chat.client.commands import ChatState
from chat.client.reconnect import GaveUp, Seen, reconnect
from tests.test_client_cli import NOWHERE, PASSWORD, ROOT, run_cli, server_args
from tests.test_client_linemode import WAIT
from tests.test_client_screen import interactive, new_name


def end_sessions(server: Any, username: str, reason: str) -> None:
    """The operator ends every session of `username`: chat-admin, through the server."""
    command = {"account_disabled": "disable", "logged_out": "logout"}[reason]
    assert admin.main(["--data-dir", server.settings.data_dir, "user", command,
                       username]) == 0


@pytest.fixture
def tokens_seen(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """The `token` of every register frame the (in-process) server parses."""
    seen: list[object] = []
    parse = messages._PARSERS["register"]

    def recording(rid: Any, frame: dict[str, Any]) -> Any:
        seen.append(frame.get("token"))
        return parse(rid, frame)

    monkeypatch.setitem(messages._PARSERS, "register", recording)
    return seen


def test_register_sends_the_token_from_the_flag_the_environment_or_the_file(
    chat_server: Any, tokens_seen: list[object], tmp_path: Path
) -> None:
    first, second, third = new_name(), new_name(), new_name()
    assert run_cli("register", *server_args(chat_server, first), "--token", "t-flag"
                   ).returncode == 0
    assert run_cli("register", *server_args(chat_server, second), CHAT_TOKEN="t-env"
                   ).returncode == 0
    config = tmp_path / "chat" / "client.toml"
    config.parent.mkdir()
    config.write_text('token = "t-file"\n', encoding="utf-8")
    result = run_cli("register", *server_args(chat_server, third),
                     XDG_CONFIG_HOME=str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert tokens_seen == ["t-flag", "t-env", "t-file"]
    shown = run_cli("config", XDG_CONFIG_HOME=str(tmp_path)).stdout
    assert "t-file" not in shown and "(set)" in shown  # a token is not printed


def test_a_token_from_chat_admin_registers_once_end_to_end(
    server_factory: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    server = server_factory(registration="token")
    assert admin.main(["--data-dir", server.settings.data_dir, "--json", "token",
                       "create"]) == 0
    token = json.loads(capsys.readouterr().out)["result"]["token"]
    ok = run_cli("register", *server_args(server, new_name()), "--token", token)
    assert ok.returncode == 0, ok.stderr
    again = run_cli("register", *server_args(server, new_name()), CHAT_TOKEN=token)
    assert again.returncode != 0 and "invalid_token" in again.stderr
    assert "no account was made: the token in $CHAT_TOKEN is unknown, used up, expired or " \
           "revoked" in again.stderr
    none = run_cli("register", *server_args(server, new_name()))
    assert none.returncode != 0 and "token" in none.stderr


def test_hello_says_before_a_password_is_asked_that_registering_cannot_work(
    server_factory: Any, tokens_seen: list[object]
) -> None:
    with_tokens = server_factory(registration="token")
    result = run_cli("register", *server_args(with_tokens, new_name()))
    assert result.returncode == 1
    assert "registers only with a token from its operator: give --token TOKEN" in result.stderr
    closed = server_factory(registration="closed", port=0, data_dir=str(
        Path(with_tokens.settings.data_dir).parent / "closed"))
    result = run_cli("register", *server_args(closed, new_name()), "--token", "x")
    assert result.returncode == 1 and "takes no new accounts" in result.stderr
    assert tokens_seen == []  # nothing was sent
    assert registration_closed({"registration": "open"}, None) is None
    assert registration_closed({}, None) is None  # a v1 server does not say
    assert registration_closed({"registration": "token"}, "abc") is None


@pytest.mark.parametrize("code", ["invalid_token", "registration_closed"])
def test_a_refused_token_is_explained(
    chat_server: Any, monkeypatch: pytest.MonkeyPatch, code: str
) -> None:
    error = {"invalid_token": errors.InvalidToken,
             "registration_closed": errors.RegistrationClosed}[code]

    def refuse(rid: Any, frame: dict[str, Any]) -> Any:
        raise error()

    monkeypatch.setitem(messages._PARSERS, "register", refuse)
    result = run_cli("register", *server_args(chat_server, new_name()), "--token", "old")
    assert result.returncode == 1
    assert f"registration refused: {code}: " in result.stderr
    hint = {"invalid_token": "hint: no account was made: the token given with --token is "
            "unknown, used up, expired or revoked (the server does not say which); ask the "
            "server's operator for a new one",
            "registration_closed": "hint: this server takes no new accounts"}[code]
    assert hint in result.stderr


def test_a_login_to_a_disabled_account_is_explained(
    chat_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    me = new_name()
    chat_server.register(me)

    def refuse(rid: Any, frame: dict[str, Any]) -> Any:
        raise errors.AccountDisabled()

    monkeypatch.setitem(messages._PARSERS, "login", refuse)
    result = run_cli("login", *server_args(chat_server, me), input="")
    assert result.returncode == 1
    assert "login refused: account_disabled: " in result.stderr
    assert "hint: your account has been disabled by the server's operator" in result.stderr


@pytest.mark.parametrize("reason", ["account_disabled", "logged_out"])
def test_line_mode_ends_at_once_on_an_ending_bye_even_with_reconnect(
    chat_server: Any, reason: str
) -> None:
    me = new_name()
    chat_server.register(me)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHAT_")}
    env.update(CHAT_PASSWORD=PASSWORD, XDG_CONFIG_HOME=NOWHERE, XDG_DATA_HOME=NOWHERE)
    proc = subprocess.Popen(
        [sys.executable, "-m", "chat.client.cli", "login", "--no-e2e",
         *server_args(chat_server, me),
         "--reconnect", "--recent", "0"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=env, cwd=ROOT,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith("-- logged in as")
        end_sessions(chat_server, me, reason)
        proc.wait(timeout=WAIT)  # stdin still open: the server ended it, not the input
        assert proc.stderr is not None
        out, err = proc.stdout.read(), proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 3, err
    assert "reconnecting" not in err
    assert f"the server ended the session ({reason})" in err
    assert ("disabled" if reason == "account_disabled" else "logged out") in out + err


def test_the_prompt_ends_on_a_disabled_account_and_says_why(
    chat_server: Any, tmp_path: Path
) -> None:
    me = new_name()
    chat_server.register(me)
    with interactive(chat_server, me, tmp_path) as term:
        term.wait_for_input("[general]> ")
        end_sessions(chat_server, me, "account_disabled")
        term.wait_for_line(r"^-- disconnected: your account has been disabled by the server's "
                           r"operator$")
        term.wait_for(lambda: term.eof, "the client to exit")
        term.child.close()
        assert term.child.exitstatus == 3
        assert not term.rows_matching("reconnecting"), term.text()
        assert term.rows_matching(r"^-- the server ended the session: .*disabled"), term.text()


def test_a_disabled_account_is_not_logged_in_again_and_again() -> None:
    # What reconnecting meets once the account is disabled: the login refused for good.
    class Refusing:
        username = "me"

        def request(self, frame: Any, timeout: float = 0, *, quiet: bool = False) -> Any:
            return {"type": "error", "code": "account_disabled", "message": "disabled"}

        def close(self, timeout: float = 0) -> None:
            pass

    attempts: list[int] = []

    def connect() -> Refusing:
        attempts.append(1)
        return Refusing()

    with pytest.raises(GaveUp, match="account_disabled"):
        reconnect(connect, "me", lambda: "pw", ChatState.start("general"), Seen("me"),
                  notify=lambda text: None, timeout=1, sleep=lambda s: None,
                  delays=iter([0.0] * 5))
    assert attempts == [1]


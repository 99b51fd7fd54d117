"""`chat-client` with end-to-end encryption against the real server: two people in line
mode talk in an encrypted private room and an encrypted DM without doing anything
special, look at fingerprints and devices, and verify each other by SAS.

The parsing and rendering are also tested without a server, at the end of this file.
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from chat.client.commands import Invalid, Request, parse_command
from chat.client.format import format_event
from chat.client.roomcommands import create
from tests.test_client_cli import NOWHERE, PASSWORD, ROOT, new_name, server_args
from tests.test_client_linemode import WAIT, typed
from tests.test_client_reconnect_e2e import Lines, spawn_cli
from tests.test_client_screen import interactive


@contextmanager
def cli(server: Any, username: str, data: Path) -> Iterator[tuple[Any, Lines, Lines]]:
    """`chat-client login` in line mode, its key store under `data` (which the client
    makes if it is missing, as on a fresh account with no ~/.local/share)."""
    with spawn_cli(["login", *server_args(server, username), "--recent", "0",
                    "--timeout", str(WAIT)],
                   {"CHAT_PASSWORD": PASSWORD, "XDG_CONFIG_HOME": NOWHERE,
                    "XDG_DATA_HOME": str(data)}) as spawned:
        yield spawned


def test_two_cli_users_talk_encrypted_and_verify_each_other(
        chat_server: Any, tmp_path: Path) -> None:
    alice, bob, room = new_name(), new_name(), "s" + new_name()[:10]
    chat_server.register(alice)
    chat_server.register(bob)
    fresh = tmp_path / "fresh" / "share"  # no data directory at all yet
    with cli(chat_server, alice, fresh) as (pa, out_a, err_a), \
            cli(chat_server, bob, tmp_path / "b") as (pb, out_b, err_b):
        for out in (out_a, out_b):  # both in general before anything is said there
            out.wait_for(lambda line: "logged in as" in line, "the login")
        typed(pa, "hello, general")  # a plain room: in clear, as ever
        out_b.wait_for(lambda line: line.endswith(f"#general {alice}: hello, general"),
                       "the plain room message")
        typed(pa, f"/create {room} encrypted")
        typed(pa, f"/invite {bob} {room}")
        out_a.wait_for(lambda line: f"invitation to #{room} sent" in line, "the invitation")
        typed(pb, f"/join {room}")
        out_a.wait_for(lambda line: f"{bob} joined #{room}" in line, "bob's join")
        typed(pa, f"/switch {room}")
        typed(pa, "hello, secretly")
        out_b.wait_for(lambda line: line.endswith(
            f"#{room} {alice} [e2e, unverified]: hello, secretly"), "the room message")
        out_a.wait_for(lambda line: line.endswith(f"#{room} {alice} [e2e]: hello, secretly"),
                       "alice's own copy")
        typed(pb, f"/msg {alice} psst")
        out_a.wait_for(lambda line: line.endswith(
            f"(dm) {bob} [e2e, unverified] -> {alice}: psst"), "the DM")

        typed(pa, "/fingerprint")
        own = out_a.wait_for(lambda line: "this device" in line, "the fingerprint")
        assert re.search(r"(\S{4} ){10}", own)
        typed(pb, f"/devices {alice}")
        out_b.wait_for(lambda line: "[not verified]" in line, "alice's device")

        typed(pa, f"/verify {bob}")
        codes_a = out_a.wait_for(lambda line: "compare" in line, "alice's codes")
        codes_b = out_b.wait_for(lambda line: "compare" in line, "bob's codes")
        assert codes_a.split("compare")[1] == codes_b.split("compare")[1]
        typed(pa, "/verify confirm")
        typed(pb, "/verify confirm")
        out_a.wait_for(lambda line: f"{bob}/" in line and "is verified" in line, "verified")
        out_b.wait_for(lambda line: f"{alice}/" in line and "is verified" in line, "verified")
        typed(pb, f"/switch {room}")
        typed(pb, "now you know it is me")
        out_a.wait_for(lambda line: line.endswith(
            f"#{room} {bob} [e2e]: now you know it is me"), "a verified message")
        typed(pb, f"/devices {alice}")
        out_b.wait_for(lambda line: "[verified]" in line, "alice's device, verified")
        for proc, err in ((pa, err_a), (pb, err_b)):
            assert proc.stdin is not None
            proc.stdin.close()
            assert proc.wait(timeout=WAIT) == 0, err.rest()
            assert not [line for line in err.lines if line.startswith("!!")], err.lines
    (store,) = (fresh / "chat-client").glob("*/*.sqlite3")  # made with its directories
    assert stat.S_IMODE(store.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(store.parent.parent.stat().st_mode) == 0o700  # chat-client/


def test_the_prompt_shows_encrypted_messages_and_warnings(
        chat_server: Any, tmp_path: Path) -> None:
    me, room = new_name(), "s" + new_name()[:10]
    chat_server.register(me)
    with interactive(chat_server, me, tmp_path, "--recent", "0", e2e=True) as term:
        term.send(f"/create {room} encrypted\r")
        term.wait_for_line(rf"you made #{room}")
        term.send(f"/switch {room}\r")
        term.send("for my eyes only\r")
        term.wait_for_line(rf"#{room} {me} \[e2e\]: for my eyes only$")
        term.send("/fingerprint\r")
        term.wait_for_line(r"this device \S+: (\S{4} ){10}")
        term.send("/verify confirm\r")
        term.wait_for_line(r"no verification in progress")
        assert term.quit() == 0


def test_a_passphrase_protects_the_key_store(chat_server: Any, tmp_path: Path) -> None:
    me = new_name()
    chat_server.register(me)
    secret = tmp_path / "passphrase"
    secret.write_text("correct horse battery staple\n")
    data = tmp_path / "keys"
    data.mkdir()

    def run(*extra: str) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CHAT_")}
        env.update(CHAT_PASSWORD=PASSWORD, XDG_CONFIG_HOME=NOWHERE, XDG_DATA_HOME=str(data))
        return subprocess.run(
            [sys.executable, "-m", "chat.client.cli", "login", *server_args(chat_server, me),
             "--recent", "0", *extra], input="/fingerprint\n", capture_output=True,
            text=True, env=env, cwd=ROOT, timeout=WAIT)

    first = run("--key-passphrase-file", str(secret))
    assert first.returncode == 0 and "this device" in first.stdout, first.stderr
    assert not list(data.rglob("*.key"))  # no key file: the passphrase is the key
    again = run("--key-passphrase-file", str(secret))
    assert again.stdout == first.stdout  # the same device
    # Without it, or with another one, the client stops before the session: carrying on
    # without encryption would send direct messages in clear.
    without = run()
    assert without.returncode == 2 and "this device" not in without.stdout
    assert "encryption cannot start" in without.stderr and "passphrase" in without.stderr
    assert "--no-e2e" in without.stderr
    secret.write_text("a wrong guess\n")
    wrong = run("--key-passphrase-file", str(secret))
    assert wrong.returncode == 2 and "wrong passphrase" in wrong.stderr


def test_the_create_command_makes_encrypted_rooms_private() -> None:
    assert create("dev encrypted", None) == {"type": "create", "room": "dev",
                                             "encrypted": True, "visibility": "private"}
    assert create("dev --encrypted joined", None)["history"] == "joined"
    assert "only a private room" in str(create("dev public encrypted", None))
    assert create("dev private", None) == {"type": "create", "room": "dev",
                                           "visibility": "private"}


def test_the_e2e_commands_parse() -> None:
    assert parse_command("/fingerprint", "general") == Request({"type": "e2e_fingerprint"})
    assert parse_command("/devices bob", "general") == Request(
        {"type": "e2e_devices", "username": "bob"})
    assert parse_command("/verify bob phone", "general") == Request(
        {"type": "e2e_verify", "username": "bob", "device": "phone"})
    assert parse_command("/verify confirm", "general") == Request(
        {"type": "e2e_verify", "action": "confirm"})
    assert isinstance(parse_command("/verify", "general"), Invalid)


def message(**e2e: Any) -> dict[str, Any]:
    return {"type": "message", "room": "dev", "username": "bob", "msg_id": 1,
            "ts": "2026-12-06T10:00:00.000Z", "message": "hi", "e2e": e2e}


def test_encrypted_messages_are_marked_and_undecryptable_ones_are_warnings() -> None:
    assert format_event(message(status="ok", verified=True)).endswith("#dev bob [e2e]: hi")
    assert format_event(message(status="ok", verified=False)).endswith(
        "#dev bob [e2e, unverified]: hi")
    assert format_event(message(status="ok", verified=True, late=True)).endswith(
        "#dev bob [e2e, decrypted late]: hi")  # its key came after it
    pending = format_event(message(status="pending", reason="no key for this session"))
    assert pending.endswith("#dev bob: ! [cannot decrypt: no key for this session]")
    refused = format_event({**message(status="refused", reason="a replay"),
                            "message": "evil"})
    assert "REFUSED" in refused and "evil" not in refused
    dm = {**message(status="plaintext"), "to": "alice"}
    del dm["room"]
    assert "(not encrypted)" in format_event(dm)
    loud = format_event({"type": "e2e", "kind": "changed_key", "loud": True,
                         "text": "WARNING: keys changed"})
    assert loud == "!! WARNING: keys changed"

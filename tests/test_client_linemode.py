"""Line mode delivers every line or says which was not (issue 15, items 1 and friction).

Some tests run the CLI as a subprocess (tests/test_client_cli.py's `run_cli`); the ones
that must make the client outrun the server run `run_line_mode` in-process, on a
ChatClient whose pacer is taken away, so that every refusal is the server's.
"""

from __future__ import annotations

import io
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from chat.client import ChatClient, raise_for_error
from chat.client.commands import Request, parse_command
from chat.client.limits import SendPacer
from chat.client.linemode import EXIT_UNDELIVERED, run_line_mode
from chat.tls import client_context
from tests.test_client_cli import NOWHERE, PASSWORD, new_name, run_cli, server_args
from tests.test_client_reconnect_e2e import Lines, spawn_cli

WAIT = 30.0


def session(server: Any, username: str, **kwargs: Any) -> ChatClient:
    client = ChatClient.connect(server.host, server.port,
                                ssl_context=client_context(server.cafile), timeout=WAIT,
                                **kwargs)
    raise_for_error(client.login(username, PASSWORD, timeout=WAIT))
    return client


def received(reader: ChatClient, sender: str, count: int) -> list[str]:
    """The texts of the next `count` messages from `sender` that `reader` gets."""
    texts: list[str] = []
    for frame in reader.events(timeout=WAIT):
        if frame.get("type") == "message" and frame.get("username") == sender:
            texts.append(frame["message"])
            if len(texts) == count:
                break
    return texts


def test_fifty_piped_lines_are_all_delivered_in_order(server_factory: Any) -> None:
    # The v1 limits scaled down, so that 50 lines are well over the burst.
    server = server_factory(frames_per_second=20.0, frame_burst=10)
    me, other = new_name(), new_name()
    server.register(me)
    server.register(other)
    lines = [f"line {n}" for n in range(1, 51)]
    with session(server, other) as reader:
        result = run_cli("login", *server_args(server, me), input="\n".join(lines) + "\n")
        assert result.returncode == 0, result.stderr
        assert "rate_limited" not in result.stdout + result.stderr
        assert received(reader, me, len(lines)) == lines


def run_in_process(client: ChatClient, script: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = run_line_mode(client, stdin=io.StringIO(script), stdout=out, stderr=err,
                         room="general", rooms=["general"], timeout=WAIT)
    return code, out.getvalue(), err.getvalue()


def test_lines_the_server_refused_for_the_rate_are_sent_again_in_order(
    server_factory: Any, refusing_sends: Any,
) -> None:
    # A server that refuses frames over its rate, as older releases did (ours paces).
    refusing_sends(every=3)
    server = server_factory()
    me, other = new_name(), new_name()
    server.register(me)
    server.register(other)
    lines = [f"paste {n}" for n in range(1, 11)]
    with session(server, other) as reader:
        writer = session(server, me, replies_as_events=True)
        writer.pacer = SendPacer(1e9, 10**9)  # as an older client: no pacing of its own
        code, out, err = run_in_process(writer, "\n".join(lines) + "\n")
        assert code == 0, err
        assert received(reader, me, len(lines)) == lines
    assert "the server asked to slow down: sending again in" in err
    assert "rate_limited" not in out + err  # waited out: no refusal is shown


def test_a_line_the_server_still_refuses_makes_the_exit_code_non_zero(
    server_factory: Any, refusing_sends: Any,
) -> None:
    # The server asks for a wait the client will not sit out.
    refusing_sends(every=1, retry_after=100)
    server = server_factory()
    me = new_name()
    server.register(me)
    writer = session(server, me, replies_as_events=True)
    writer.pacer = SendPacer(1e9, 10**9)
    code, out, err = run_in_process(writer, "one\ntwo\nthree\n")
    assert code == EXIT_UNDELIVERED
    assert "! error rate_limited" in err and "rate_limited" not in out
    assert "not delivered" in err


def test_a_message_over_the_limit_is_split_and_said_so(chat_server: Any) -> None:
    me, other = new_name(), new_name()
    chat_server.register(me)
    chat_server.register(other)
    words = [f"w{n:04}" for n in range(1800)]  # 5 characters and a space each: 10,800
    text = " ".join(words)
    with session(chat_server, other) as reader:
        result = run_cli("login", *server_args(chat_server, me), input=text + "\n/me "
                         + "x" * 4100 + "\n")
        assert result.returncode == 0, result.stderr
        got = received(reader, me, 5)
    assert " ".join(got[:3]).split() == words  # cut at spaces: not a word lost or broken
    assert all(len(p) <= 4000 for p in got)
    assert got[3].startswith("/me ") and got[4].startswith("/me ")  # an action stays one
    assert "".join(p.removeprefix("/me ") for p in got[3:]) == "x" * 4100
    assert f"the message of {len(text)} characters was sent as 3 messages" in result.stderr


def test_stdout_has_the_conversation_stderr_the_errors_and_notes(chat_server: Any) -> None:
    me = new_name()
    chat_server.register(me)
    script = "hello\n/leave nowhere\n/bogus\n/msg nosuchuser hi\n"
    result = run_cli("login", *server_args(chat_server, me, "--recent", "5"), input=script)
    assert result.returncode == EXIT_UNDELIVERED  # the direct message had no one to go to
    out, err = result.stdout.splitlines(), result.stderr.splitlines()
    assert any(line.endswith(f"#general {me}: hello") for line in out)
    assert not any(line.startswith(("!", "chat-client:")) for line in out), out
    assert any(line.startswith("! error no_such_room") for line in err)
    assert any(line.startswith("! error no_such_user") for line in err)
    assert "chat-client: unknown command /bogus (try /help)" in err
    assert not any(f"{me}: hello" in line for line in err)


def test_history_with_a_user_is_shown_in_line_mode(chat_server: Any) -> None:
    if not isinstance(parse_command("/history bob", "general"), Request):
        pytest.skip("/history USER comes with the commands' half of issue 15")
    me, other = new_name(), new_name()
    chat_server.register(me)
    chat_server.register(other)
    result = run_cli("login", *server_args(chat_server, me),
                     input=f"/msg {other} first\n/history {other}\n")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    header = lines.index(f"-- history with {other}: 1 message")
    assert lines[header + 1].endswith(f"(dm) {me} -> {other}: first")


def test_history_of_a_room_written_without_its_hash_is_explained(chat_server: Any) -> None:
    # Found trying it as a new user: `/history dev` for a room one has left asks for the
    # direct messages with a user `dev` ("no such user"), and `/history qa` was a usage error.
    me, room = new_name(), "dev" + new_name()[:6]
    chat_server.register(me)
    result = run_cli("login", *server_args(chat_server, me, "--recent", "0"),
                     input=f"/join {room}\n/leave {room}\n/history {room}\n/history qa\n")
    assert result.returncode == 0, result.stderr
    err = result.stderr.splitlines()
    assert f"-- /history {room} is for your direct messages with a user; for the room, " \
        f"write /history #{room}" in err, err
    assert any(line.startswith("! error no_such_room") for line in err), err  # qa: a room
    assert "usage" not in result.stderr


def test_two_threads_sending_through_one_paced_client_each_keep_their_order(
    server_factory: Any,
) -> None:
    server = server_factory(frames_per_second=30.0, frame_burst=5)
    me, other = new_name(), new_name()
    server.register(me)
    server.register(other)
    with session(server, other) as reader, session(server, me) as writer:
        def send(tag: str) -> None:
            for n in range(15):
                raise_for_error(writer.say("general", f"{tag}{n}", timeout=WAIT))

        threads = [threading.Thread(target=send, args=(tag,)) for tag in "ab"]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(WAIT)
        got = received(reader, me, 30)
    for tag in "ab":
        assert [t for t in got if t.startswith(tag)] == [f"{tag}{n}" for n in range(15)]


# -- following the user's other sessions (issue 15, item 3) ----------------------------------


@contextmanager
def piped(server: Any, username: str) -> Iterator[tuple[subprocess.Popen[str], Lines, Lines]]:
    """`chat-client login` in line mode with a pipe kept open: (process, stdout, stderr)."""
    with spawn_cli(["login", "--no-e2e", *server_args(server, username), "--recent", "0",
                    "--timeout", str(WAIT)],
                   {"CHAT_PASSWORD": PASSWORD, "XDG_CONFIG_HOME": NOWHERE,
                    "XDG_DATA_HOME": NOWHERE}) as spawned:
        yield spawned


def typed(proc: subprocess.Popen[str], line: str) -> None:
    assert proc.stdin is not None
    proc.stdin.write(line + "\n")
    proc.stdin.flush()


def ended(proc: subprocess.Popen[str], err: Lines) -> int:
    assert proc.stdin is not None
    proc.stdin.close()
    code = proc.wait(timeout=WAIT)
    err.rest()
    return code


def test_line_mode_follows_joins_and_leaves_made_in_another_session(chat_server: Any) -> None:
    me, room = new_name(), "ops" + new_name()[:8]
    chat_server.register(me)
    with piped(chat_server, me) as (proc, out, err):
        typed(proc, "/who")
        out.wait_for(lambda line: line.startswith("-- online in #general"), "who")
        elsewhere = session(chat_server, me)
        try:
            raise_for_error(elsewhere.join(room, WAIT))
            err.wait_for(lambda line: line == f"-- you joined #{room} in another session",
                         "the join elsewhere")
            typed(proc, f"/switch {room}")  # known: not "you are not in it"
            typed(proc, "hello there")
            out.wait_for(lambda line: line.endswith(f"#{room} {me}: hello there"), "hello")
            raise_for_error(elsewhere.leave(room, WAIT))
            err.wait_for(lambda line: line == f"-- you left #{room} in another session; "
                         "now talking in #general", "the leave elsewhere")
            typed(proc, "still heard")  # to #general, not refused with not_in_room
            out.wait_for(lambda line: line.endswith(f"#general {me}: still heard"), "heard")
        finally:
            elsewhere.close()
        assert ended(proc, err) == 0, err.lines
    assert not any("not_in_room" in line for line in err.lines), err.lines
    assert f"-- now talking in #{room}" in out.lines


def test_line_mode_learns_from_a_message_and_from_not_in_room(server_factory: Any) -> None:
    # Presence held back for the whole test (it is coalesced): a join elsewhere shows only
    # as a message in the room, and a leave elsewhere only as a refusal.
    server = server_factory(presence_interval=3600.0)
    me, other, room = new_name(), new_name(), "qa" + new_name()[:8]
    server.register(me)
    server.register(other)
    with piped(server, me) as (proc, out, err), session(server, other) as talker:
        raise_for_error(talker.join(room, WAIT))
        typed(proc, "/who")
        out.wait_for(lambda line: line.startswith("-- online in #general"), "who")
        with session(server, me) as elsewhere:
            raise_for_error(elsewhere.join(room, WAIT))
            raise_for_error(talker.say(room, "anyone here?", WAIT))
            err.wait_for(lambda line: line == f"-- you are in #{room}: joined in another "
                         "session", "the message's room")
            out.wait_for(lambda line: line.endswith(f"#{room} {other}: anyone here?"), "asked")
            raise_for_error(elsewhere.leave(room, WAIT))
        typed(proc, f"/switch {room}")
        typed(proc, "too late")
        err.wait_for(lambda line: line == f"-- you are no longer in #{room}; now talking in "
                     "#general", "the refusal's correction")
        typed(proc, "here instead")
        out.wait_for(lambda line: line.endswith(f"#general {me}: here instead"), "instead")
        assert ended(proc, err) == EXIT_UNDELIVERED  # "too late" was refused, and said so
    assert any(line.startswith("! error not_in_room") for line in err.lines), err.lines

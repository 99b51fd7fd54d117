"""Catch-up after a lost connection, end to end: what was said in the gap is shown, once.

The client runs as a subprocess (`chat-client login --reconnect`, line mode) and reaches
the server through `Proxy`, a TCP relay the test controls: it can cut the connections
through it (a lost network, the server staying up) and hold new ones until the test has
said what the client is to catch up on, so nothing here races the client's backoff. The
client logs in with `--recent 0` and shows no message before the loss: the catch-up must
not depend on what happened to be shown (issue 15, item 2).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from chat.client import ChatClient, raise_for_error
from chat.tls import client_context
from tests.test_client_reconnect_e2e import PASSWORD, ROOT, WAIT, Lines, new_name, spawn_cli

pexpect = pytest.importorskip("pexpect")


class Proxy:
    """A TCP relay on 127.0.0.1:<free port> to 127.0.0.1:`target`, which the test steers.

    `hold()` makes new connections wait (accepted, nothing relayed) until `release()`;
    `cut()` closes every connection relayed so far; `held` counts the waiting ones, so a
    test can wait for the client's reconnection attempt instead of sleeping.
    `cut_after(n)` makes the next connection end after n bytes from the server (a TLS
    record cut in the middle, as a lost network does).
    """

    def __init__(self, target: int) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self._passing = threading.Event()
        self._passing.set()
        self._cond = threading.Condition()
        self._sockets: list[socket.socket] = []
        self._budget: int | None = None  # bytes from the server the next connection gets
        self.held = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._relay, args=(conn,), daemon=True).start()

    def _relay(self, conn: socket.socket) -> None:
        with self._cond:
            self._sockets.append(conn)
            self.held += not self._passing.is_set()
            budget, self._budget = self._budget, None
            self._cond.notify_all()
        if not self._passing.wait(WAIT):
            conn.close()
            return
        try:
            upstream = socket.create_connection(("127.0.0.1", self.target), timeout=WAIT)
        except OSError:
            conn.close()
            return
        upstream.settimeout(None)
        with self._cond:
            self._sockets.append(upstream)
        for source, sink, limit in ((conn, upstream, None), (upstream, conn, budget)):
            threading.Thread(target=self._pump, args=(source, sink, limit),
                             daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket, limit: int | None) -> None:
        try:
            while data := source.recv(65536):
                if limit is not None:
                    data = data[:limit]
                    limit -= len(data)
                sink.sendall(data)
                if limit == 0:
                    break
        except OSError:
            pass
        for sock in (source, sink):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def hold(self) -> None:
        with self._cond:
            self.held = 0
            self._passing.clear()

    def cut_after(self, nbytes: int) -> None:
        with self._cond:
            self._budget = nbytes

    def release(self) -> None:
        self._passing.set()

    def cut(self) -> None:
        with self._cond:
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def wait_held(self) -> None:
        """Wait until a connection is being held: the client is trying to reconnect."""
        with self._cond:
            assert self._cond.wait_for(lambda: self.held > 0, WAIT), "no reconnection came"

    def close(self) -> None:
        self.release()
        self.listener.close()
        self.cut()


@contextmanager
def line_client(
    proxy: Proxy, cafile: Path, username: str, *extra: str
) -> Iterator[tuple[subprocess.Popen[str], Lines, Lines]]:
    """`chat-client login --reconnect --recent 0` through `proxy`: (process, stdout, stderr)."""
    with spawn_cli(["login", "--no-e2e", "--reconnect", "--recent", "0", "--timeout",
                    str(WAIT), "--server", f"127.0.0.1:{proxy.port}", "--cafile",
                    str(cafile), "--username", username, *extra],
                   {"CHAT_PASSWORD": PASSWORD}) as spawned:
        yield spawned


def session(server: Any, username: str) -> ChatClient:
    client = ChatClient.connect(server.host, server.port,
                                ssl_context=client_context(server.cafile), timeout=WAIT)
    raise_for_error(client.login(username, PASSWORD, timeout=WAIT))
    return client


def ready(proc: subprocess.Popen[str], out: Lines, room: str = "general") -> None:
    """Wait until the client is logged in, without showing any message (a /who)."""
    assert proc.stdin is not None
    proc.stdin.write("/who\n")
    proc.stdin.flush()
    out.wait_for(lambda line: line.startswith(f"-- online in #{room}"), "who")


def finish(proc: subprocess.Popen[str], out: Lines, err: Lines) -> list[str]:
    assert proc.stdin is not None
    proc.stdin.close()
    assert proc.wait(timeout=WAIT) == 0, "\n".join(err.rest())
    return out.rest()


def test_a_room_message_and_a_dm_sent_during_a_server_restart_are_caught_up(
    server_factory: Any,
) -> None:
    first = server_factory()
    port = first.port
    me, other = new_name(), new_name()
    first.register(me)
    first.register(other)
    proxy = Proxy(port)
    try:
        with line_client(proxy, first.cafile, me) as (proc, out, err):
            ready(proc, out)
            proxy.hold()
            first.server.stop()
            err.wait_for(lambda line: line.startswith("-- connection lost"), "connection lost")
            second = server_factory(port=port)  # the same data directory
            proxy.wait_held()  # the client is reconnecting, and waits for us
            with session(second, other) as talker:
                raise_for_error(talker.say("general", "said while restarting", WAIT))
                raise_for_error(talker.direct(me, "a word while restarting", WAIT))
            proxy.release()
            err.wait_for(lambda line: line == f"-- reconnected as {me}", "reconnected")
            out.wait_for(lambda line: line.endswith(f"#general {other}: said while restarting"),
                         "the room message")
            out.wait_for(lambda line: line.endswith(f"{other} -> {me}: a word while restarting"),
                         "the direct message")
            lines = finish(proc, out, err)
    finally:
        proxy.close()
    for text in ("said while restarting", "a word while restarting"):
        assert sum(line.endswith(text) for line in lines) == 1, lines


def test_a_dm_another_session_of_mine_received_meanwhile_is_caught_up(
    chat_server: Any,
) -> None:
    # The server stays up; only this client's connection is lost. The direct message goes
    # live to my other session, so it is not stored for my next login: only the catch-up
    # (`history direct`) can bring it.
    me, other = new_name(), new_name()
    chat_server.register(me)
    chat_server.register(other)
    proxy = Proxy(chat_server.port)
    try:
        with (
            session(chat_server, me) as elsewhere,
            line_client(proxy, chat_server.cafile, me) as (proc, out, err),
        ):
            ready(proc, out)
            proxy.hold()
            proxy.cut()
            err.wait_for(lambda line: line.startswith("-- connection lost"), "connection lost")
            with session(chat_server, other) as talker:
                raise_for_error(talker.direct(me, "to all your sessions", WAIT))
                raise_for_error(talker.say("general", "and to the room", WAIT))
            for frame in elsewhere.events(timeout=WAIT):  # delivered live: nothing stored
                if frame.get("message") == "to all your sessions":
                    break
            proxy.wait_held()
            proxy.release()
            out.wait_for(lambda line: line.endswith(f"{other} -> {me}: to all your sessions"),
                         "the direct message")
            out.wait_for(lambda line: line.endswith(f"#general {other}: and to the room"),
                         "the room message")
            lines = finish(proc, out, err)
    finally:
        proxy.close()
    for text in ("to all your sessions", "and to the room"):
        assert sum(line.endswith(text) for line in lines) == 1, lines


def test_after_reconnecting_the_rooms_are_the_servers_never_rejoined(chat_server: Any) -> None:
    # While the connection is down, another session of mine leaves #dev (this client's
    # current room) and joins #ops, where something is said (issue 15, item 1).
    me, other = new_name(), new_name()
    dev, ops = "dev" + new_name()[:8], "ops" + new_name()[:8]
    chat_server.register(me)
    chat_server.register(other)
    proxy = Proxy(chat_server.port)
    try:
        with line_client(proxy, chat_server.cafile, me, "--room", dev) as (proc, out, err):
            ready(proc, out, dev)
            proxy.hold()
            proxy.cut()
            err.wait_for(lambda line: line.startswith("-- connection lost"), "connection lost")
            with session(chat_server, me) as elsewhere, session(chat_server, other) as talker:
                raise_for_error(elsewhere.leave(dev, WAIT))
                raise_for_error(elsewhere.join(ops, WAIT))
                raise_for_error(talker.join(ops, WAIT))
                raise_for_error(talker.say(ops, "said in ops meanwhile", WAIT))
            proxy.wait_held()
            proxy.release()
            err.wait_for(lambda line: line == f"-- reconnected as {me}", "reconnected")
            err.wait_for(lambda line: line == f"-- while you were away you stopped being in "
                         f"#{dev}; now talking in #general", "left")
            err.wait_for(lambda line: line == f"-- while you were away you joined #{ops} (in "
                         "another session)", "joined")
            out.wait_for(lambda line: line.endswith(f"#{ops} {other}: said in ops meanwhile"),
                         "the message in the room joined elsewhere")
            assert proc.stdin is not None
            proc.stdin.write("/rooms\nback in general\n")
            proc.stdin.flush()
            out.wait_for(lambda line: line.endswith(f"#general {me}: back in general"), "back")
            lines = finish(proc, out, err)
            with session(chat_server, me) as check:  # #dev was not joined again
                assert check.who(dev, WAIT).get("code") == "not_in_room"
    finally:
        proxy.close()
    assert f"-- rooms: *#general #{ops} (* current)" in lines, lines


def test_the_end_of_input_while_reconnecting_exits_3_and_says_why(chat_server: Any) -> None:
    me = new_name()
    chat_server.register(me)
    proxy = Proxy(chat_server.port)
    try:
        with line_client(proxy, chat_server.cafile, me) as (proc, out, err):
            ready(proc, out)
            proxy.hold()
            proxy.cut()
            proxy.wait_held()
            assert proc.stdin is not None
            proc.stdin.close()
            assert proc.wait(timeout=WAIT) == 3
            lines = err.rest()
    finally:
        proxy.close()
    assert any("the input ended while reconnecting" in line for line in lines), lines
    assert not any("the server closed the connection" in line for line in lines), lines


def test_quit_at_the_prompt_while_reconnecting_exits_0(chat_server: Any, tmp_path: Path) -> None:
    me = new_name()
    chat_server.register(me)
    proxy = Proxy(chat_server.port)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHAT_")}
    env.update(CHAT_PASSWORD=PASSWORD, XDG_CONFIG_HOME=str(tmp_path), NO_COLOR="1",
               PROMPT_TOOLKIT_NO_CPR="1", TERM="xterm", LANG="C.UTF-8", LC_ALL="C.UTF-8")
    child = pexpect.spawn(
        sys.executable,
        ["-m", "chat.client.cli", "login", "--no-e2e", "--server", f"127.0.0.1:{proxy.port}",
         "--cafile", str(chat_server.cafile), "--username", me, "--timeout", str(WAIT)],
        env=env, cwd=str(ROOT), dimensions=(40, 120), timeout=WAIT, encoding="utf-8",
    )
    try:
        child.expect("type /help for commands")
        proxy.hold()
        proxy.cut()
        child.expect("connection lost; reconnecting in")
        proxy.wait_held()  # in the middle of reconnecting: the TLS handshake waits on us
        child.send("/quit\r")
        child.expect(pexpect.EOF)
        child.close()
        assert child.exitstatus == 0, child.before
        assert "closed the connection" not in (child.before or "")
    finally:
        if child.isalive():
            child.terminate(force=True)
        proxy.close()


def test_stored_direct_messages_cut_off_mid_backlog_are_caught_up(chat_server: Any) -> None:
    # The direct messages stored while I was away are handed over after the welcome, and
    # counted delivered as they are queued for me. The connection is cut a little way into
    # them: the rest are older than where the catch-up would start from (welcome's
    # last_msg_id), so only `backlog.first_msg_id` can bring them (issue 15, item 2).
    me, other = new_name(), new_name()
    chat_server.register(me)
    chat_server.register(other)
    count = 60
    texts = [f"stored {n:03} " + "x" * 3000 for n in range(count)]  # 60 x 3 KB
    with session(chat_server, other) as talker:
        for text in texts:
            raise_for_error(talker.direct(me, text, WAIT))
    proxy = Proxy(chat_server.port)
    proxy.cut_after(48 * 1024)  # the handshake, hello, welcome and a dozen of them
    try:
        with line_client(proxy, chat_server.cafile, me) as (proc, out, err):
            err.wait_for(lambda line: line.startswith("-- connection lost"), "connection lost")
            err.wait_for(lambda line: line == f"-- reconnected as {me}", "reconnected")
            out.wait_for(lambda line: texts[-1][:10] in line, "the last stored message")
            ready(proc, out)  # every catch-up line comes before the /who reply
            lines = finish(proc, out, err)
    finally:
        proxy.close()
    for text in texts:
        assert sum(line.endswith(f"{other} -> {me}: {text}") for line in lines) == 1, (
            text[:10], [line[:60] for line in lines])

"""The `chat-server` command as a process: ready line, SIGTERM shutdown, exit code."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from conftest import TIMEOUT, Client

LISTENING = re.compile(r"listening on 127\.0\.0\.1:(\d+)")


def start_server(tmp_path: Path, *args: str) -> tuple[subprocess.Popen, int]:
    cmd = [sys.executable, "-m", "chat.server", "--port", "0", "--data-dir",
           str(tmp_path / "data"), "--bcrypt-rounds", "4", *args]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env)
    assert proc.stderr is not None
    for line in proc.stderr:  # waits on the ready line, never on a sleep
        if m := LISTENING.search(line):
            return proc, int(m.group(1))
    raise AssertionError(f"server exited with {proc.wait(TIMEOUT)} before listening")


def test_sigterm_says_bye_and_exits_zero(tmp_path):
    proc, port = start_server(tmp_path, "--shutdown-grace", "2")
    try:
        ca = tmp_path / "data" / "certs" / "ca.crt"
        c = Client("127.0.0.1", port, ca)
        reg = c.request({"type": "register", "username": "alice",
                         "password": "correct horse battery staple 42"})
        assert reg["type"] == "ok"
        assert c.login("alice")["type"] == "welcome"
        sent = c.request({"type": "send", "room": "general", "message": "before the end"})
        proc.send_signal(signal.SIGTERM)
        assert c.recv_until("bye") == {"type": "bye", "reason": "shutdown"}
        c.close()
        assert proc.wait(TIMEOUT) == 0
        # Restart: the message is still there.
        proc, port = start_server(tmp_path)
        c = Client("127.0.0.1", port, ca)
        assert c.login("alice")["type"] == "welcome"
        history = c.request({"type": "history", "room": "general"})
        assert [m["msg_id"] for m in history["messages"]] == [sent["msg_id"]]
        c.close()
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C is a clean shutdown too
        assert proc.wait(TIMEOUT) == 0


def test_bad_setting_is_a_usage_error(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "chat.server", "--bcrypt-rounds", "3", "--data-dir",
         str(tmp_path)], capture_output=True, text=True, timeout=TIMEOUT,
    )
    assert result.returncode == 2
    assert "bcrypt_rounds" in result.stderr


def test_a_signal_during_a_signal_neither_nests_nor_deadlocks():
    # Two SIGTERMs close together hung a node: the second one's handler ran inside the
    # first's Event.set, on its lock. The handlers now do nothing; the numbers are read.
    from chat.server import wait_for_signals

    watched = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    saved = {signum: signal.getsignal(signum) for signum in watched}
    for signum in watched:  # harmless until wait_for_signals installs its own
        signal.signal(signum, lambda *_: None)
    depth, reloads = [0], []

    def reload() -> None:
        depth[0] += 1
        reloads.append(depth[0])
        if len(reloads) == 1:
            # Signals in the middle of a reload: each is read after it returns.
            for signum in (signal.SIGHUP, signal.SIGTERM, signal.SIGTERM):
                os.kill(os.getpid(), signum)
        depth[0] -= 1

    def knock() -> None:  # SIGHUP until the loop is listening and has reloaded
        while not reloads:
            os.kill(os.getpid(), signal.SIGHUP)
            time.sleep(0.01)

    knocker = threading.Thread(target=knock)
    knocker.start()
    try:
        wait_for_signals(reload)  # returns at the first SIGTERM
    finally:
        knocker.join()
        for signum, handler in saved.items():
            signal.signal(signum, handler)
    assert reloads and max(reloads) == 1, reloads

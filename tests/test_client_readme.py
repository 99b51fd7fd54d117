"""The README's Python example runs as written against a server and ends cleanly (issue 15,
item 4).

The example is taken from README.md as it stands, and only the port is changed (the test
server listens on a free one). It runs under this interpreter, as `.venv/bin/python
hello.py` would, with HOME pointing at a directory that holds the test CA where
scripts/serve keeps its development CA, and CHAT_PASSWORD set, as the README says.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from chat.client import ChatClient, raise_for_error
from chat.tls import client_context
from tests.test_client_reconnect_e2e import PASSWORD, ROOT, WAIT, Lines

README = ROOT / "README.md"
CONNECT = 'ChatClient.connect("localhost", 7072,'


def python_example() -> str:
    text = README.read_text(encoding="utf-8")
    section = text[text.index("### From Python"):]
    found = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert found, "no python example under '### From Python' in README.md"
    return found.group(1)


def test_the_readme_python_example_runs_and_ends_cleanly(
    server_factory: Any, tmp_path: Path
) -> None:
    server = server_factory()
    server.register("alice")
    server.register("bob")
    code = python_example()
    assert code.count(CONNECT) == 1, "the example no longer connects as this test expects"
    script = tmp_path / "hello.py"
    script.write_text(code.replace(CONNECT, f'ChatClient.connect("localhost", {server.port},'))
    home = tmp_path / "home"
    ca = home / ".local" / "share" / "chat" / "certs" / "ca.crt"
    ca.parent.mkdir(parents=True)
    ca.write_bytes(server.cafile.read_bytes())
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("CHAT_", "XDG_")) and k != "PYTHONPATH"}
    env.update(HOME=str(home), CHAT_PASSWORD=PASSWORD)
    proc = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env=env, cwd=tmp_path,  # not the repository: the installed package
    )
    assert proc.stdout is not None and proc.stderr is not None
    out, err = Lines(proc.stdout), Lines(proc.stderr)
    try:
        out.wait_for(lambda line: line == "alice hello from Python", "its own message")
        with ChatClient.connect(server.host, server.port,
                                ssl_context=client_context(server.cafile), timeout=WAIT) as bob:
            raise_for_error(bob.login("bob", PASSWORD, timeout=WAIT))
            raise_for_error(bob.say("general", "hi alice", timeout=WAIT))
        out.wait_for(lambda line: line == "bob hi alice", "bob's message")
        server.server.stop()  # the session ends (bye shutdown): the example must end too
        assert proc.wait(timeout=WAIT) == 0, "\n".join(err.rest())
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=WAIT)
    assert err.rest() == [], err.lines  # no traceback, no warning
    # Only messages were printed: no welcome, no ping, no presence frame as a message.
    assert out.rest() == ["alice hello from Python", "bob hi alice"]

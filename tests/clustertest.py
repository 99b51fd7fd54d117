"""Several chat-server processes on one PostgreSQL schema and one Redis, optionally behind
HAProxy: the harness of the cluster tests (issue 19).

Theory of operation
-------------------
A `Cluster` is N `Node`s and at most one `Balancer`, all child processes of the test, all
on loopback. The nodes share what every node of a real cluster must share: one database
(a throwaway schema, tests/pgtest.py), one Redis (the test's own, tests/redistest.py)
under a prefix of the cluster's own, one pepper file and one certificate. Each has its
own data directory, its own TOML file (as deploy/node.toml.example), and a chat port and
a metrics port chosen once, free, when the cluster is made: a node started again after
`kill()` comes back on the same ports, so the balancer's configuration stays true.

A node is ready when its log says `listening on`: a thread per node reads its stderr into
`node.log` in its directory (the pipe must be drained for the node's whole life, or a
node logging at DEBUG would block on a full pipe) and sets an event on that line or at
EOF. The balancer is ready when its statistics page answers and every running node is UP
there. Nothing sleeps a fixed time: every wait polls a condition against a deadline of
`conftest.TIMEOUT` (generous, for a loaded 2-core machine) and fails saying what it
waited for.

HAProxy is found as `CHAT_TEST_HAPROXY`, on PATH, or in /usr/sbin (where Debian puts it,
which is not on every user's PATH). Without it the tests that want a balancer are skipped
with one reason, except under CI (tests/pgtest.py's `required`), where they fail.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
import redistest
from conftest import PASSWORD, TIMEOUT, Client, make_settings
from pgtest import required

from chat import certs
from chat.config import Settings

REPO = Path(__file__).resolve().parent.parent
LISTENING = re.compile(r" listening on (\S+):(\d+) ")
# A node imports, migrates (the first one) or waits for the one migrating (the others,
# up to chat.db.JOIN_WAIT), then listens: more than a request takes on a loaded machine.
START_TIMEOUT = 3 * TIMEOUT
# How often a wait looks at its condition again: often enough not to slow the tests,
# seldom enough not to load the machine they wait for.
POLL = 0.05


def wait_until(condition: Callable[[], Any], what: str, timeout: float = TIMEOUT) -> Any:
    """Poll `condition` until it returns something true, and return that; fail after
    `timeout` seconds saying `what` was awaited."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {timeout:g} s for {what}")
        time.sleep(POLL)


# --- HAProxy: found, or skipped with one reason ------------------------------------------

def haproxy_binary() -> str | None:
    named = os.environ.get("CHAT_TEST_HAPROXY")
    if named:
        return shutil.which(named)  # as named, if it can be run
    return (shutil.which("haproxy")
            or shutil.which("haproxy", path="/usr/sbin:/usr/local/sbin"))


@functools.cache
def haproxy_unavailable() -> str | None:
    """Why there is no balancer for the tests, once per run; None when there is."""
    if haproxy_binary() is None:
        return ("the cluster tests behind a balancer: no haproxy on PATH or in /usr/sbin "
                "(CHAT_TEST_HAPROXY may name one; Debian: apt-get install haproxy)")
    return None


def need_haproxy() -> None:
    """Skip the calling test (fail it under CI) when HAProxy is not there."""
    why = haproxy_unavailable()
    if why is not None:
        if required():
            pytest.fail(f"{why} (CI=true: the cluster tests are mandatory)", pytrace=False)
        pytest.skip(why)


def one_skip_line(report: pytest.TestReport) -> None:
    """As pgtest's: every HAProxy skip reported at one place, so -ra shows one line."""
    why = haproxy_unavailable()
    if (why is not None and report.skipped and isinstance(report.longrepr, tuple)
            and report.longrepr[2] == f"Skipped: {why}"):
        report.longrepr = (__file__, need_haproxy.__code__.co_firstlineno, report.longrepr[2])


# --- nodes -------------------------------------------------------------------------------

class NodeExited(RuntimeError):
    """A node's process ended before it listened; `returncode` and `log` say why."""

    def __init__(self, name: str, returncode: int | None, log: str) -> None:
        tail = "\n".join(log.splitlines()[-20:])
        super().__init__(f"{name} exited with {returncode} before listening:\n{tail}")
        self.returncode = returncode
        self.log = log


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    # A JSON string is a TOML basic string: the same quotes and backslash escapes.
    return json.dumps(str(value))


def settings_toml(settings: Settings) -> str:
    """The TOML file of `settings`: every setting not at its default, plus data_dir."""
    defaults = Settings()
    lines = []
    for f in fields(Settings):
        value = getattr(settings, f.name)
        if f.name == "data_dir" or (f.name != "config" and value != getattr(defaults, f.name)):
            lines.append(f"{f.name} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


class Node:
    """One chat-server process, `python -m chat.server --config DIR/NAME.toml`.

    `start()` returns once it listens (NodeExited if it ended first); `stop()` is SIGTERM
    and returns the exit code; `kill()` is SIGKILL (`kill -9`); `pause()` and `resume()`
    are SIGSTOP and SIGCONT: a node that hangs, or whose host stopped answering. A node
    may be started again after any of them: same name, ports and data directory.
    """

    def __init__(self, name: str, directory: Path, settings: Settings, cafile: Path) -> None:
        self.name = name
        self.dir = directory
        self.settings = settings
        self.cafile = cafile
        self.config_path = directory / f"{name}.toml"
        self.log_path = directory / "node.log"
        self.proc: subprocess.Popen[str] | None = None
        self._listening = False
        self._terminating = False
        self._reader: threading.Thread | None = None
        directory.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(settings_toml(settings))

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<Node {self.name} port {self.port} metrics {self.metrics_port} {state}>"

    @property
    def host(self) -> str:
        return self.settings.host

    @property
    def port(self) -> int:
        return self.settings.port

    @property
    def metrics_port(self) -> int:
        return int(self.settings.metrics_address.rpartition(":")[2])

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        """Start the process and wait for its ready line."""
        self.launch()
        self.wait_listening()

    def launch(self) -> None:
        """Start the process without waiting (start several, then `wait_listening` each)."""
        assert not self.running, f"{self.name} is already running"
        # Only the node's own file: a CHAT_* variable of the test's environment (CHAT_DB,
        # say) would quietly override it.
        env = {k: v for k, v in os.environ.items() if not k.startswith("CHAT_")}
        env["PYTHONPATH"] = str(REPO)
        # A node that will not stop is sent SIGABRT: this makes it write every thread's
        # stack into its log first.
        env["PYTHONFAULTHANDLER"] = "1"
        self._listening = False
        ready = threading.Event()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "chat.server", "--config", str(self.config_path)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True, env=env)
        self._ready = ready
        self._reader = threading.Thread(target=self._drain, args=(self.proc, ready),
                                        name=f"{self.name}-log", daemon=True)
        self._reader.start()

    def _drain(self, proc: subprocess.Popen[str], ready: threading.Event) -> None:
        assert proc.stderr is not None
        with self.log_path.open("a") as log:
            log.write(f"--- {self.name} pid {proc.pid}\n")
            for line in proc.stderr:
                log.write(line)
                log.flush()
                if not ready.is_set() and LISTENING.search(line):
                    self._listening = True
                    ready.set()
        ready.set()  # EOF: the process ended

    def wait_listening(self, timeout: float = START_TIMEOUT) -> None:
        assert self.proc is not None
        if not self._ready.wait(timeout):
            raise AssertionError(f"waited {timeout:g} s for {self.name} to listen:\n"
                                 f"{self.log()[-3000:]}")
        if not self._listening:
            code = self.proc.wait(TIMEOUT)
            if self._reader is not None:
                self._reader.join(TIMEOUT)
            self.proc = None
            raise NodeExited(self.name, code, self.log())

    def terminate(self) -> None:
        """SIGTERM, once, without waiting: stop several nodes side by side, then `stop()`
        each. (Never twice: the second signal is not a test of anything.)"""
        if self.running and not self._terminating:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGCONT)  # a paused node could not act on it
            self.proc.send_signal(signal.SIGTERM)
            self._terminating = True

    def stop(self) -> int | None:
        """SIGTERM, as systemd stops a node, and wait: its exit code (None if it was not
        running). One that has not ended in TIMEOUT fails the test with its threads'
        stacks."""
        self.terminate()
        return self._reap("SIGTERM")

    def kill(self) -> None:
        """SIGKILL: the node dies at once, as in `kill -9`, with no goodbye to anyone."""
        if self.running:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGKILL)
        self._reap("SIGKILL")

    def _reap(self, what: str) -> int | None:
        proc, self.proc, self._terminating = self.proc, None, False
        if proc is None:
            return None
        try:
            code = proc.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGABRT)  # where it hangs, in its log (faulthandler)
            try:
                proc.wait(TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if self._reader is not None:
                self._reader.join(TIMEOUT)
            raise AssertionError(f"{self.name} did not end within {TIMEOUT:g} s of "
                                 f"{what}; its threads:\n{self.log()[-6000:]}") from None
        if self._reader is not None:
            self._reader.join(TIMEOUT)
        return code

    def pause(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def health(self, timeout: float = TIMEOUT) -> int | None:
        """The HTTP status of the node's /health (200 or 503); None if nothing answers."""
        url = f"http://127.0.0.1:{self.metrics_port}/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as reply:
                return int(reply.status)
        except urllib.error.HTTPError as exc:
            return exc.code
        except OSError:
            return None

    def metrics(self) -> dict[str, float]:
        """The node's /metrics: each sample by its name and labels as Prometheus writes
        them (`chat_connections`, `chat_messages_stored_total`, ...)."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=TIMEOUT) as reply:
            text = reply.read().decode()
        samples = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                samples[name] = float(value)
        return samples

    def client(self, **kw: Any) -> Client:
        """A client connected to this node itself, not through the balancer."""
        return Client(self.host, self.port, self.cafile, **kw)

    def log(self) -> str:
        """Everything the node has logged, across its restarts."""
        try:
            return self.log_path.read_text()
        except FileNotFoundError:
            return ""


# --- the balancer ------------------------------------------------------------------------

# Where HAProxy connects to the nodes from (deploy/haproxy.cfg's one-host variant): the
# nodes believe a PROXY header from there only, and the tests' own direct connections,
# from 127.0.0.1, need none.
BALANCER_SOURCE = "127.0.0.2"


def haproxy_config(port: int, stats_port: int, nodes: Sequence[Node]) -> str:
    """deploy/haproxy.cfg's choices, with the tests' timings: a node is checked every
    200 ms and is DOWN after two failures (one slow answer on a loaded machine must not
    cut a healthy node's clients) and UP again after one success."""
    servers = "\n".join(
        f"    server {n.name} {n.host}:{n.port} send-proxy-v2 source {BALANCER_SOURCE} "
        f"check addr {n.host} port {n.metrics_port}"
        for n in nodes)
    return f"""\
global
    nbthread 1
    log stdout format raw local0 info

defaults
    mode tcp
    log global
    timeout connect 2s
    timeout client 10m
    timeout server 10m
    timeout tunnel 10m
    timeout client-fin 30s
    timeout server-fin 30s
    timeout check 3s
    retries 2
    option redispatch 1

frontend chat
    bind 127.0.0.1:{port}
    option tcplog
    default_backend nodes

backend nodes
    balance leastconn
    option httpchk GET /health
    http-check expect status 200
    default-server inter 200ms fall 2 rise 1 on-marked-down shutdown-sessions
{servers}

frontend stats
    mode http
    no log
    bind 127.0.0.1:{stats_port}
    stats enable
    stats uri /stats
"""


class Balancer:
    """HAProxy in TCP mode in front of `nodes`, with its statistics on a port of its own:
    `servers()` is each node's state there (UP, DOWN, ...), `sessions()` how many
    connections it forwards to each."""

    def __init__(self, directory: Path, nodes: Sequence[Node]) -> None:
        self.dir = directory
        self.nodes = list(nodes)
        self.port = redistest.free_port()
        self.stats_port = redistest.free_port()
        self.config_path = directory / "haproxy.cfg"
        self.log_path = directory / "haproxy.log"
        self.proc: subprocess.Popen[bytes] | None = None
        directory.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(haproxy_config(self.port, self.stats_port, self.nodes))

    def start(self) -> None:
        """Start HAProxy; returns once every running node is UP behind it."""
        binary = haproxy_binary()
        assert binary is not None, "need_haproxy() first"
        with self.log_path.open("ab") as log:
            # -db: in the foreground, a child of the test, logging to our file.
            self.proc = subprocess.Popen([binary, "-db", "-f", str(self.config_path)],
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        running = [n.name for n in self.nodes if n.running]

        def all_up() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"haproxy exited with {self.proc.returncode}:\n"
                                     f"{self.log_path.read_text()[-3000:]}")
            states = self.servers(quiet=True)
            return states is not None and all(states.get(n) == "UP" for n in running)

        wait_until(all_up, f"haproxy to see {', '.join(running)} UP")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def _stats(self, quiet: bool = False) -> list[dict[str, str]] | None:
        url = f"http://127.0.0.1:{self.stats_port}/stats;csv"
        try:
            with urllib.request.urlopen(url, timeout=TIMEOUT) as reply:
                text = reply.read().decode()
        except OSError:
            if quiet:
                return None
            raise
        return list(csv.DictReader(io.StringIO(text.removeprefix("# "))))

    def servers(self, quiet: bool = False) -> dict[str, str] | None:
        """Each node's state in the balancer: "UP", "DOWN", "UP 1/2" (going down), ...
        With `quiet`, None while the statistics do not answer."""
        rows = self._stats(quiet)
        if rows is None:
            return None
        return {r["svname"]: r["status"] for r in rows
                if r["pxname"] == "nodes" and r["svname"] not in ("FRONTEND", "BACKEND")}

    def sessions(self) -> dict[str, int]:
        """Connections the balancer forwards to each node now."""
        rows = self._stats() or []
        return {r["svname"]: int(r["scur"] or 0) for r in rows
                if r["pxname"] == "nodes" and r["svname"] not in ("FRONTEND", "BACKEND")}

    def wait_status(self, name: str, status: str) -> None:
        """Wait until the balancer says `status` ("UP", "DOWN") of node `name`."""
        wait_until(lambda: (self.servers(quiet=True) or {}).get(name) == status,
                   f"haproxy to see {name} {status}")


# --- the cluster -------------------------------------------------------------------------

class Cluster:
    """`size` nodes named node1, node2, ... on one database and one Redis, with one pepper
    and one certificate, and (with `balancer`) HAProxy in front of them.

    `overrides` are settings of every node (conftest.make_settings's test-friendly limits
    are the base). `start()` starts the nodes side by side, then the balancer, and returns
    once every node listens and is UP behind it; `stop()` stops everything it started.
    `client()`, `register()` and `user()` go through the balancer, as a user's would.
    """

    def __init__(self, directory: Path, cert_paths: certs.CertPaths, db_url: str,
                 redis_url: str, *, size: int = 3, balancer: bool = True,
                 **overrides: Any) -> None:
        self.dir = directory
        self.cert_paths = cert_paths
        self.cafile = cert_paths.ca_cert
        self.db_url = db_url
        self.redis_url = redis_url
        self.redis_prefix = overrides.pop("redis_prefix", None) or redistest.unique_prefix()
        self.overrides = overrides
        directory.mkdir(parents=True, exist_ok=True)
        # One pepper for every node: a password hashed on one must check on the others.
        self.pepper_path = directory / "pepper"
        fd = os.open(self.pepper_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32) + "\n")
        self._made = 0
        self.extra: list[Node] = []  # made by new_node: not behind the balancer
        self.nodes = [self._node() for _ in range(size)]
        self.balancer = Balancer(directory / "haproxy", self.nodes) if balancer else None

    def _node(self, **overrides: Any) -> Node:
        self._made += 1
        name = f"node{self._made}"
        shared = {"db": self.db_url, "redis": self.redis_url,
                  "redis_prefix": self.redis_prefix, "pepper_file": str(self.pepper_path),
                  # The balancer names each client (send-proxy-v2) from its own address.
                  "proxy_protocol": BALANCER_SOURCE}
        settings = make_settings(
            self.dir / name, self.cert_paths, port=redistest.free_port(),
            metrics_address=f"127.0.0.1:{redistest.free_port()}",
            **{**shared, **self.overrides, **overrides})
        return Node(name, self.dir / name, settings, self.cafile)

    def new_node(self, **overrides: Any) -> Node:
        """One more node with the cluster's settings and these, not started and not behind
        the balancer (a node that should be refused, say); stopped with the cluster."""
        node = self._node(**overrides)
        self.extra.append(node)
        return node

    def start(self) -> Cluster:
        try:
            for node in self.nodes:
                node.launch()
            for node in self.nodes:
                node.wait_listening()
            if self.balancer is not None:
                self.balancer.start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop the balancer and every node, even when one of them fails to stop (then
        its error is raised, after the others are stopped)."""
        if self.balancer is not None:
            self.balancer.stop()
        nodes = [*self.nodes, *self.extra]
        for node in nodes:  # all told at once, so that their shutdowns overlap
            node.terminate()
        failed: AssertionError | None = None
        for node in nodes:
            try:
                node.stop()
            except AssertionError as exc:
                failed = failed or exc
        if failed is not None:
            raise failed

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def node(self, name: str) -> Node:
        return next(n for n in [*self.nodes, *self.extra] if n.name == name)

    @property
    def port(self) -> int:
        """The balancer's port: where clients connect."""
        assert self.balancer is not None, "a cluster without a balancer"
        return self.balancer.port

    def client(self, **kw: Any) -> Client:
        """A client connected through the balancer."""
        return Client("127.0.0.1", self.port, self.cafile, **kw)

    def register(self, username: str, password: str = PASSWORD) -> None:
        c = self.client()
        try:
            reply = c.request({"type": "register", "username": username, "password": password})
            assert reply["type"] == "ok", reply
        finally:
            c.close()

    def user(self, username: str, password: str = PASSWORD, register: bool = True,
             **kw: Any) -> Client:
        """A logged-in client through the balancer (registering the user first unless
        told not to)."""
        if register:
            self.register(username, password)
        c = self.client(**kw)
        welcome = c.login(username, password)
        assert welcome["type"] == "welcome", welcome
        return c

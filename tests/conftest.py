"""Fixtures: throwaway certificates, an ephemeral in-process TLS server, blocking test clients.

The server listens on 127.0.0.1 port 0 with a temporary SQLite database and bcrypt cost 4;
`Server.start()` returns only once the socket is listening, so no test sleeps to wait.

Tests marked `both_engines` (a module's `pytestmark`, say) that use a server or `db_url` run
twice: `[sqlite]` as every other test, and `[postgresql]` in a schema of their own
(tests/pgtest.py says where, and what happens without PostgreSQL). `sqlite_only` keeps one
test of such a module on SQLite (SQLite's own files, its backup API).
"""

from __future__ import annotations

import json
import socket
import ssl
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pgtest
import pytest
import redistest
from sqlalchemy import create_engine, text

from chat import certs, tls
from chat.config import Settings
from chat.server import Server

PASSWORD = "correct horse battery staple 42"
# Generous: the suite must pass on a loaded 2-core machine. Only failures wait this long.
TIMEOUT = 20.0


@pytest.fixture(scope="session")
def cert_dir(tmp_path_factory: pytest.TempPathFactory) -> certs.CertPaths:
    return certs.generate_dev_certs(tmp_path_factory.mktemp("certs"))


class Client:
    """A blocking test client: one thread only, so one SSL object in one thread."""

    def __init__(
        self, host: str, port: int, cafile: Path, *, read_hello: bool = True,
        rcvbuf: int | None = None, preamble: bytes = b"",
    ) -> None:
        ctx = tls.client_context(cafile)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        raw = socket.socket(family, socket.SOCK_STREAM)
        if rcvbuf is not None:
            # Before connect, so the advertised window really is small.
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        raw.settimeout(TIMEOUT)
        raw.connect((host, port))
        raw.sendall(preamble)  # a balancer's PROXY header, say, before the TLS handshake
        self.sock = ctx.wrap_socket(raw, server_hostname="localhost")
        self.file = self.sock.makefile("rwb")
        self.hello = self.recv() if read_hello else None
        self._next_id = 0

    def send_raw(self, data: bytes) -> None:
        self.file.write(data)
        self.file.flush()

    def send(self, frame: dict[str, Any]) -> None:
        self.send_raw(json.dumps(frame, ensure_ascii=False).encode() + b"\n")

    def recv(self) -> dict[str, Any]:
        line = self.file.readline()
        if not line:
            raise EOFError("server closed the connection")
        return json.loads(line)

    def request(self, frame: dict[str, Any]) -> dict[str, Any]:
        """Send with a fresh id; return the reply carrying it (other frames are skipped)."""
        self._next_id += 1
        rid = self._next_id
        self.send({**frame, "id": rid})
        while True:
            reply = self.recv()
            if reply.get("re") == rid:
                return reply

    def recv_until(self, type_: str, **fields: Any) -> dict[str, Any]:
        while True:
            frame = self.recv()
            if frame["type"] == type_ and all(frame.get(k) == v for k, v in fields.items()):
                return frame

    def login(self, username: str, password: str = PASSWORD) -> dict[str, Any]:
        return self.request({"type": "login", "username": username, "password": password})

    def at_eof(self) -> bool:
        try:
            return self.file.readline() == b""
        except (ConnectionError, ssl.SSLError):
            return True

    def close(self) -> None:
        for closer in (self.file.close, self.sock.close):
            try:
                closer()
            except OSError:
                pass


@dataclass
class RunningServer:
    server: Server
    settings: Settings
    cafile: Path
    host: str = "127.0.0.1"

    @property
    def port(self) -> int:
        return self.server.address[1]

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def query(self, sql: str, **params: Any) -> list[tuple[Any, ...]]:
        """Rows of one SELECT on the server's database, whichever engine it is."""
        engine = create_engine(self.settings.db_url)
        try:
            with engine.connect() as conn:
                return [tuple(row) for row in conn.execute(text(sql), params)]
        finally:
            engine.dispose()

    def client(self, **kw: Any) -> Client:
        return Client(self.host, self.port, self.cafile, **kw)

    def register(self, username: str, password: str = PASSWORD) -> None:
        c = self.client()
        try:
            reply = c.request({"type": "register", "username": username, "password": password})
            assert reply["type"] == "ok", reply
        finally:
            c.close()

    def user(
        self, username: str, password: str = PASSWORD, register: bool = True, **kw: Any
    ) -> Client:
        """A logged-in client (registering the user first unless told not to)."""
        if register:
            self.register(username, password)
        c = self.client(**kw)
        welcome = c.login(username, password)
        assert welcome["type"] == "welcome", welcome
        return c


def make_settings(tmp_path: Path, cert_paths: certs.CertPaths, **overrides: Any) -> Settings:
    base = Settings(
        host="127.0.0.1", port=0, data_dir=str(tmp_path / "data"),
        certfile=str(cert_paths.server_cert), keyfile=str(cert_paths.server_key),
        bcrypt_rounds=4, log_level="DEBUG", shutdown_grace=2.0,
        # Every test connects and registers from 127.0.0.1 and sends as fast as it can;
        # the throttling tests set their own limits.
        registrations_per_ip=100000, max_connections_per_ip=1000,
        frames_per_second=1e6, frame_burst=1000000, read_bytes_per_second=1 << 30,
        # Presence still coalesces, but a test waiting for one waits a fifth of a second.
        presence_interval=0.2,
    )
    return base.replace(**overrides)


ENGINES = [pytest.param("sqlite", id="sqlite"),
           pytest.param("postgresql", id="postgresql", marks=pytest.mark.postgresql)]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if ("db_url" in metafunc.fixturenames
            and metafunc.definition.get_closest_marker("both_engines") is not None
            and metafunc.definition.get_closest_marker("sqlite_only") is None):
        metafunc.parametrize("db_url", ENGINES, indirect=True)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if (pgtest.required() and any(item.get_closest_marker("postgresql") for item in items)
            and (why := pgtest.unavailable()) is not None):
        pytest.exit(f"{why} (CI=true: the PostgreSQL tests must run)", returncode=1)
    if (pgtest.required() and any(item.get_closest_marker("redis") for item in items)
            and (why := redistest.unavailable()) is not None):
        pytest.exit(f"{why} (CI=true: the cluster tests must run)", returncode=1)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    pgtest.one_skip_line(outcome.get_result())
    redistest.one_skip_line(outcome.get_result())
    import clustertest  # here: it imports this module

    clustertest.one_skip_line(outcome.get_result())


@pytest.fixture
def db_url(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The `db` setting of this test's servers: "" (SQLite in the data directory) unless
    the test runs `[postgresql]`; then a schema of its own, also in CHAT_DB, so that
    chat-admin finds it as an operator's would."""
    if getattr(request, "param", "sqlite") == "sqlite":
        yield ""
        return
    pgtest.need_postgres()
    schema, url = pgtest.create_schema()
    monkeypatch.setenv("CHAT_DB", url)
    try:
        yield url
    finally:
        pgtest.drop_schema(schema)


@pytest.fixture
def server_factory(
    tmp_path: Path, cert_dir: certs.CertPaths, db_url: str
) -> Iterator[Any]:
    started: list[Server] = []

    def start(**overrides: Any) -> RunningServer:
        if db_url:
            overrides.setdefault("db", db_url)
        settings = make_settings(tmp_path, cert_dir, **overrides)
        server = Server(settings)
        server.start()
        started.append(server)
        return RunningServer(server, settings, cert_dir.ca_cert)

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def chat_server(server_factory: Any) -> RunningServer:
    return server_factory()


@pytest.fixture
def refusing_sends(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Make the test servers refuse `send`s for the rate, as an older release (or another
    implementation) does; ours paces instead. `refuse(every, retry_after)` refuses every
    `every`-th send of each connection (1: all of them), answering `rate_limited`."""
    from chat import connection
    from chat import messages as m
    from chat.errors import RateLimited

    real = connection._HANDLERS[m.Send]

    def refuse(every: int, retry_after: float = 1.0) -> None:
        counts: dict[int, int] = {}

        def send(conn: Any, req: Any) -> None:
            n = counts[id(conn)] = counts.get(id(conn), 0) + 1
            if n % every == 0:
                raise RateLimited(retry_after, "too many frames; slow down")
            real.fn(conn, req)

        monkeypatch.setitem(connection._HANDLERS, m.Send,
                            connection._Handler(send, real.before_login))

    return refuse


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "both_engines: run on SQLite and on PostgreSQL "
                            "(tests that use a server or db_url)")
    config.addinivalue_line("markers", "sqlite_only: in a both_engines module, SQLite only")
    config.addinivalue_line("markers", "redis: needs a redis-server of its own "
                            "(tests/redistest.py); skipped without one, except under CI")
    config.addinivalue_line("markers", "postgresql: the PostgreSQL run of a both_engines test "
                            "(-m 'not postgresql' leaves them out)")
    # Tests run the CLI as `python -m ...`; make sure it is this interpreter's package.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[redistest.RedisServer]:
    """A redis-server of this test's own (tests/redistest.py); mark the test `redis`."""
    redistest.need_redis()
    server = redistest.RedisServer(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def cluster_factory(
    tmp_path: Path, cert_dir: certs.CertPaths, redis_server: redistest.RedisServer
) -> Iterator[Any]:
    """`make(size=3, balancer=True, **settings)` starts a `clustertest.Cluster` of chat
    server processes on one PostgreSQL schema of this test's own and this test's Redis,
    behind HAProxy unless `balancer=False`, and returns it once every node listens (and
    is UP behind the balancer); everything is stopped and the schema dropped at teardown.
    Mark the test `redis`. Skipped without PostgreSQL, Redis or (for a balancer) HAProxy,
    except under CI."""
    import clustertest  # here: it imports this module

    pgtest.need_postgres()
    schema, url = pgtest.create_schema()
    made: list[clustertest.Cluster] = []

    def make(size: int = 3, balancer: bool = True, **overrides: Any) -> clustertest.Cluster:
        if balancer:
            clustertest.need_haproxy()
        cluster = clustertest.Cluster(tmp_path / f"c{len(made)}", cert_dir, url,
                                      redis_server.url, size=size, balancer=balancer,
                                      **overrides)
        made.append(cluster)
        return cluster.start()

    try:
        yield make
    finally:
        try:
            for cluster in made:
                cluster.stop()
        finally:
            pgtest.drop_schema(schema)  # even when a node would not stop

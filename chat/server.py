"""Listening, accepting, start-up and shutdown; the `chat-server` command.

Theory of operation
-------------------
Threads: `io_threads` selector loops (chat.ioloop) hold the connections; loop 0 also
holds the listening socket. Accepting only takes the TCP connection and hands it to a
loop round-robin; the TLS handshake then runs non-blocking on that loop, so a silent
client never holds up accept. Beside the loops run the store's writer thread (all
database writes and message fan-out) and a bounded pool of bcrypt workers.

Shutdown (SIGTERM, Ctrl-C or `stop()`): stop accepting and stop reading requests; let
the auth workers finish what they hold; let the writer store and deliver everything it
was given; then every client gets `bye shutdown`, which is flushed within
`shutdown_grace`; then the threads end.
"""

from __future__ import annotations

import datetime as dt
import errno
import logging
import os
import resource
import selectors
import signal
import socket
import ssl
import sys
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from alembic.util.exc import CommandError
from sqlalchemy import Engine, text
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, SQLAlchemyError

from chat import SERVER_NAME, __version__, certs, files, proxy, tls
from chat.auth import PasswordHasher, load_or_create_pepper, read_pepper
from chat.bus import REDIS_TIMEOUT, Bus
from chat.cluster import ClusterHub
from chat.config import (
    SettingError,
    Settings,
    default_data_dir,
    file_problem,
    load_settings_and_sources,
)
from chat.connection import Connection
from chat.control import ControlServer, check_socket_path, socket_path
from chat.conversations import Filler
from chat.db import (
    DatabaseLock,
    SchemaMismatch,
    WalCheckpointer,
    make_engine,
    schema_mismatch,
    upgrade_to_head,
)
from chat.hub import LocalHub
from chat.ioloop import IOLoop
from chat.messages import MAX_HISTORY_LIMIT, MAX_MESSAGE_CHARS
from chat.metrics import Metrics, MetricsServer, parse_address
from chat.pool import BoundedPool
from chat.protocol import PROTOCOL_VERSION, encode
from chat.store import Store
from chat.throttle import Throttle, address_key

if TYPE_CHECKING:
    from redis import Redis

    from chat.throttle_redis import RedisThrottle

log = logging.getLogger("chat.server")

CERT_EXPIRY_WARNING = dt.timedelta(days=14)
ACCEPT_PAUSE = 0.5
# File descriptors the server needs beside its connections: database, pipes, logs.
FD_HEADROOM = 64
# Holding fewer connections than max_connections is said at INFO: the usual hard limits
# (4096 on older systems, 524288 under systemd, 1048576 in containers) leave thousands,
# more than a new server sees, and an operator cannot act on every start's note. It is a
# WARNING only when the cap is really low: under 1,000, which a modest community's busy
# evening can reach, or under a tenth of max_connections, which is far from what the
# operator planned for.
FD_WARN_BELOW = 1000
FD_WARN_FRACTION = 10
_OUT_OF_RESOURCES = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


class _Listener:
    """The listening socket's handler on loop 0."""

    def __init__(self, server: Server, loop: IOLoop, sock: socket.socket) -> None:
        self.server = server
        self.loop = loop
        self.sock = sock
        self.paused_until = 0.0
        loop.selector.register(sock, selectors.EVENT_READ, self)
        loop.handlers.add(self)

    def on_io(self, mask: int) -> None:
        # A bounded batch per wake-up keeps a connection flood from starving I/O.
        for _ in range(64):
            try:
                raw, addr = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _OUT_OF_RESOURCES:
                    # The backlog stays readable, so retrying now would spin: pause
                    # accepting a moment; those already connected are unaffected.
                    log.error("accept failed (%s); pausing accept for %.1f s", exc, ACCEPT_PAUSE)
                    self.loop.selector.unregister(self.sock)
                    self.paused_until = time.monotonic() + ACCEPT_PAUSE
                    self.loop.schedule(self, self.paused_until)
                else:
                    log.error("accept failed: %s", exc)
                return
            self.server.adopt(raw, addr)

    def tick(self, now: float) -> float | None:
        if self.paused_until and now >= self.paused_until:
            self.paused_until = 0.0
            self.loop.selector.register(self.sock, selectors.EVENT_READ, self)
        return self.paused_until or None

    def close(self) -> None:
        self.loop.handlers.discard(self)
        if not self.paused_until:
            self.loop.selector.unregister(self.sock)
        self.sock.close()


class _ProxyHeader:
    """A balancer's connection until its PROXY header is read (chat.proxy); then the
    server adopts it as the client's. On one loop; exact reads, so the TLS handshake
    behind the header is left for the Connection."""

    def __init__(self, server: Server, loop: IOLoop, raw: socket.socket, addr: Any) -> None:
        self.server, self.loop, self.raw, self.addr = server, loop, raw, addr
        self.data = b""
        self.need = proxy.HEADER
        self.head = b""
        try:
            raw.setblocking(False)
            loop.selector.register(raw, selectors.EVENT_READ, self)
        except (OSError, ValueError):
            self._drop("reset before its header")
            return
        loop.handlers.add(self)
        loop.schedule(self, time.monotonic() + server.settings.handshake_timeout)

    def on_io(self, mask: int) -> None:
        try:
            chunk = self.raw.recv(self.need - len(self.data))
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._drop(f"reset ({exc})")
            return
        if not chunk:
            self._drop("closed before its PROXY header")
            return
        self.data += chunk
        if len(self.data) < self.need:
            return
        try:
            if not self.head:
                self.head, self.data = self.data, b""
                self.need = proxy.body_length(self.head)
                if self.need:
                    return
            client = proxy.client_address(self.head, self.data)
        except proxy.ProxyError as exc:
            self._drop(str(exc))
            return
        self._done()
        self.server.adopt_client(self.raw, client or self.addr, counted=True)

    def tick(self, now: float) -> float | None:
        self._drop("no PROXY header in time")
        return None

    def _done(self) -> None:
        self.loop.handlers.discard(self)
        self.loop.cancel(self)
        self.loop.selector.unregister(self.raw)

    def _drop(self, why: str) -> None:
        log.info("%s: dropped: %s", self.addr, why)
        if self in self.loop.handlers:
            self._done()
        self.raw.close()
        self.server.connection_closed(None)


class Server:
    def __init__(self, settings: Settings, sources: Mapping[str, str] | None = None) -> None:
        self.settings = settings
        # Where each setting was given (load_settings_and_sources), for error messages.
        self.sources = dict(sources or {})
        self.name = SERVER_NAME
        self.server_id = f"{SERVER_NAME}/{__version__}"
        self.address: tuple[str, int] = ("", 0)
        self.stopping = False
        self.checkpointer: WalCheckpointer | None = None
        self.db_lock: DatabaseLock | None = None  # PostgreSQL's (chat.db)
        self.metrics_server: MetricsServer | None = None
        self.bus: Bus | None = None  # several nodes (chat.cluster)
        # Why this server takes no work now ("redis": cut off from the other nodes;
        # "lock": its database lock was lost and taken by another): no sessions.
        self._fences: set[str] = set()
        self._lock_keeper: threading.Thread | None = None
        self._keeper_stop = threading.Event()
        self.redis: Redis | None = None  # the cluster's (chat.throttle_redis.connect)
        self._count = 0
        self._per_ip: dict[str, int] = {}
        self._count_lock = threading.Condition()
        self._next_loop = 0
        self._stopped = threading.Event()

    # --- start-up -------------------------------------------------------------------
    def start(self) -> None:
        """Prepare storage, TLS and threads, then listen. Returns once listening."""
        s = self.settings
        # First: a server on the network must not start open to anyone by accident.
        self.registration = s.registration_policy
        if s.bcrypt_rounds < 10:
            log.warning("bcrypt_rounds=%d is below 10: fine for tests, weak in production",
                        s.bcrypt_rounds)
        # Every file is checked before a thread starts or the database is touched, so a
        # refusal leaves at most the data directory and development certificates behind.
        files.private_dir(s.data_path, "data_dir")
        # Before anything is opened: one server per data directory (and database file).
        self.data_lock = files.DataLock(s.data_path, s.sqlite_path)
        self.data_lock.acquire()
        try:
            self._start()
        except BaseException:
            self._stop_started()
            if self.db_lock is not None:
                self.db_lock.release()
            self.data_lock.release()
            raise

    def _stop_started(self) -> None:
        """A start that failed half-way (the port taken, say): the threads it started
        stop, and over a cluster the node leaves Redis (else, for as long as the process
        lives, it stays registered and beating, a node that serves nobody)."""
        for pool in (getattr(self, "auth_pool", None), getattr(self, "read_pool", None)):
            if pool is not None:
                pool.stop()
        store = getattr(self, "store", None)
        if store is not None and store.running:
            store.stop()
        if self.bus is not None:
            self.bus.stop()
            self.filler.stop()
            self.bus = None
        if self.checkpointer is not None:
            self.checkpointer.stop()
        if self.redis is not None:
            self.redis.close()

    def _start(self) -> None:
        s = self.settings
        check_socket_path(socket_path(s.data_path))
        self.ssl_context = self._make_ssl_context()
        if s.redis:
            self.redis = self._redis_client()
        pepper, previous = self._load_peppers()
        self.max_connections = _connection_cap(s.max_connections)
        self.proxies = proxy.trusted_networks(s.proxy_protocol)
        workers = s.auth_workers or os.cpu_count() or 2
        # One connection more than threads: SQLite's checkpointer, PostgreSQL's lock.
        self.engine = self._open_database(pool_size=workers + READ_WORKERS + 3)
        if self.engine.dialect.name == "sqlite":
            self.checkpointer = WalCheckpointer(self.engine, s.checkpoint_interval)
            self.checkpointer.start()
        self.hasher = PasswordHasher(pepper, s.bcrypt_rounds, previous=previous)
        self.hello = encode(hello_frame(self.server_id, s, self.registration))
        self.metrics = Metrics()
        self.throttle: Throttle | RedisThrottle
        if self.redis is not None:
            from chat.throttle_redis import RedisThrottle

            self.throttle = RedisThrottle(s.throttle_limits(), self.redis, s.redis_prefix,
                                          on_error=self.metrics.redis_errors.inc)
        else:
            self.throttle = Throttle(s.throttle_limits())
        if s.redis:
            self._start_cluster()
        else:
            self.hub = LocalHub(s.presence_interval, s.presence_room_limit)
            self.store = Store(self.engine, self.hub, self.metrics)
            self.store.start()
        self.auth_pool = BoundedPool(workers, s.auth_queue, name="auth", nice=s.auth_nice)
        self.auth_pool.start()
        self.read_pool = BoundedPool(READ_WORKERS, s.auth_queue * 4, name="read")
        self.read_pool.start()
        # Capped so that a ping, due at 3/4 of the idle timeout, still leaves the pong time.
        slack = min(s.timer_slack, s.idle_timeout / 8)
        self.loops = [IOLoop(f"io-{i}", slack) for i in range(s.io_threads)]
        family = socket.AF_INET6 if ":" in s.host else socket.AF_INET
        try:
            self.listen_sock = socket.create_server(
                (s.host, s.port), family=family, backlog=1024, reuse_port=False
            )
        except OSError as exc:
            hint = ""
            if exc.errno == errno.EADDRINUSE:
                hint = ("; is a chat server (or another program) already listening there? "
                        "Stop it, or choose another port with --port")
            raise SettingError(("host", "port"), f"cannot listen on {s.host} port {s.port}: "
                               f"{os.strerror(exc.errno) if exc.errno else exc}{hint}",
                               exit_code=1) from None
        self.listen_sock.setblocking(False)
        # The operator's way in (chat-admin), once the port is ours.
        files.private_dir(s.data_path, "data_dir")
        self.control = ControlServer(socket_path(s.data_path), self.store, self.hub,
                                     self.hasher.pepper_id)
        self.control.start()
        self.address = self.listen_sock.getsockname()[:2]
        self._start_metrics()
        if self.engine.dialect.name == "postgresql":
            self._lock_keeper = threading.Thread(target=self._keep_lock, name="lock-keeper",
                                                 daemon=True)
            self._lock_keeper.start()
        self.listener = _Listener(self, self.loops[0], self.listen_sock)
        for loop in self.loops:
            loop.start()
        host = f"[{self.address[0]}]" if family == socket.AF_INET6 else self.address[0]
        # The ready line is what scripts wait for: shown whatever the log level.
        log.log(max(logging.INFO, log.getEffectiveLevel()),
                "%s listening on %s:%d (TLS %s, db %s)", self.server_id, host,
                 self.address[1], s.tls_profile, self.engine.url.render_as_string())

    def _start_cluster(self) -> None:
        """One node of several (chat.cluster): its hub publishes to Redis and applies what
        the others publish; its store orders itself with theirs in the database."""
        s = self.settings
        hub = ClusterHub(uuid.uuid4().hex[:12], s.presence_interval, s.presence_room_limit,
                         s.cluster_gap_wait, s.cluster_reconcile_interval)
        self.hub = hub
        self.store = Store(self.engine, hub, self.metrics)
        self.store.order_with_others()
        hub.store = self.store
        self.filler = Filler(self.engine, self.store, hub, self.metrics)
        self.bus = Bus(s.redis, s.redis_prefix, hub, self.store, self.filler,
                       s.cluster_node_ttl, self.metrics,
                       lambda on: self._fence("redis", on), s.writer_queue_limit)
        hub.publish = self.bus.publish
        hub.ask_fill = self.filler.fill
        hub.ask_reconcile = self.filler.reconcile
        hub.ask_catch_up = self.filler.catch_up
        hub.sync_then = self.bus.sync
        self.store.start()
        self.filler.start()
        if not self.bus.start(wait=REDIS_TIMEOUT * 3):
            self.bus.stop()
            self.filler.stop()
            self.store.stop()
            self.bus = None
            raise SettingError("redis", "cannot reach Redis (the URL is not shown: it may "
                               "carry a password)", exit_code=1)
        log.info("cluster node %s (redis_prefix %s)", hub.node, s.redis_prefix)

    @property
    def fenced(self) -> bool:
        return bool(self._fences)

    def _fence(self, why: str, on: bool) -> None:
        """Any thread: stop (or start again) taking work, for `why`. This node's sessions
        could miss what others decide (a kick) or write beside another server, so they
        end; clients come back through the balancer to a node that can serve them."""
        was = self.fenced
        (self._fences.add if on else self._fences.discard)(why)
        if not on or was:
            return

        def close_all(loop: IOLoop) -> None:
            for handler in list(loop.handlers):
                if isinstance(handler, Connection):
                    handler.close("shutdown")

        for loop in self.loops:
            loop.call_soon(close_all, loop)

    def _start_metrics(self) -> None:
        """`/metrics` and `/health` on `metrics_address`, if set (chat.metrics)."""
        s = self.settings
        self.metrics.watch(lambda: self._count, lambda: self.auth_pool.waiting,
                           lambda: self.store.backlog)
        if not s.metrics_address:
            return
        try:
            self.metrics_server = MetricsServer(parse_address(s.metrics_address),
                                                self.metrics, self.healthy)
        except OSError as exc:
            raise SettingError("metrics_address", f"cannot listen on {s.metrics_address}: "
                               f"{os.strerror(exc.errno) if exc.errno else exc}",
                               exit_code=1) from None
        self.metrics_server.start()
        host, port = self.metrics_server.address
        log.info("metrics and health on http://%s:%d/metrics and /health",
                 f"[{host}]" if ":" in host else host, port)

    def _keep_lock(self) -> None:
        """Thread: every LOCK_CHECK seconds, the database lock is checked (and taken
        again after a PostgreSQL restart); while it cannot be, this server is fenced."""
        assert self.db_lock is not None
        while not self._keeper_stop.wait(LOCK_CHECK):
            self._fence("lock", not self.db_lock.held())

    def healthy(self) -> bool:
        """Taking work: not stopping, the writer running, the database answering."""
        # A node that lost Redis a moment ago still serves (messages go through the
        # database; what must reach every node is refused): failing here would have the
        # balancer cut every client at each blip. Past cluster_node_ttl it is fenced.
        if self.stopping or not self.store.running or self.fenced:
            return False
        with self.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        return True

    def _make_ssl_context(self) -> ssl.SSLContext:
        s = self.settings
        certfile, keyfile, dev = s.cert_paths
        # The development pair lives in data_dir: that is the setting to blame for it.
        cert_names, key_names = ("data_dir", "data_dir") if dev else ("certfile", "keyfile")
        if dev:
            files.private_dir(certfile.parent, "data_dir")
            if not (certfile.exists() and keyfile.exists()):
                try:
                    paths = certs.generate_dev_certs(certfile.parent)
                except OSError as exc:
                    raise SettingError("data_dir", "cannot make development certificates in "
                                       f"{certfile.parent}: {exc}", exit_code=1) from None
                if Path(s.data_dir) == default_data_dir():
                    log.warning("made development certificates in %s; chat-client on this "
                                "machine trusts them by itself; on another machine, give it "
                                "--cafile %s", certfile.parent, paths.ca_cert)
                else:
                    log.warning("made development certificates in %s; give chat-client "
                                "--cafile %s", certfile.parent, paths.ca_cert)
        files.check_secret_mode(keyfile, key_names, "keyfile")
        files.check_server_pair(certfile, keyfile, cert_names, key_names)
        if s.client_cafile:
            files.check_ca_file(Path(s.client_cafile), "client_cafile")
        try:
            ctx = tls.server_context(
                certfile, keyfile, profile=s.tls_profile, client_cafile=s.client_cafile or None
            )
        except (OSError, ssl.SSLError) as exc:
            # Past the checks above, so something subtler: name every file it read.
            read = [f"certfile {certfile}", f"keyfile {keyfile}"]
            blame = [cert_names, key_names]
            if s.client_cafile:
                read.append(f"client_cafile {s.client_cafile}")
                blame.append("client_cafile")
            raise SettingError(tuple(dict.fromkeys(blame)), f"OpenSSL refused "
                               f"{', '.join(read)}: {exc}", exit_code=1) from None
        self._check_expiry(certfile)
        return ctx

    def _load_peppers(self) -> tuple[bytes, list[bytes]]:
        s = self.settings
        names = "pepper_file" if s.pepper_file else "data_dir"
        files.check_secret_mode(s.pepper_path, names, "pepper file")
        for path in s.previous_pepper_paths:
            files.check_secret_mode(path, "previous_pepper_files", "previous pepper file")
        existed = s.pepper_path.exists()
        try:
            pepper = load_or_create_pepper(s.pepper_path)
        except OSError as exc:
            problem = file_problem(exc) if existed else f"cannot be made: {exc.strerror or exc}"
            raise SettingError(names, f"pepper file {s.pepper_path} {problem}",
                               exit_code=1) from None
        except ValueError as exc:
            raise SettingError(names, str(exc), exit_code=1) from None
        previous = []
        for path in s.previous_pepper_paths:
            try:
                previous.append(read_pepper(path))
            except OSError as exc:
                raise SettingError("previous_pepper_files", f"previous pepper file {path} "
                                   f"{file_problem(exc)}", exit_code=1) from None
            except ValueError as exc:
                raise SettingError("previous_pepper_files", f"previous {exc}",
                                   exit_code=1) from None
        return pepper, previous

    def _redis_client(self) -> Redis:
        """The cluster's Redis client; it connects at its first use, so a node starts
        while Redis is down (and counts logins alone, chat.throttle_redis)."""
        # Imported only here: a single node does not pay for importing redis-py (50 ms).
        from chat.throttle_redis import connect

        try:
            return connect(self.settings.redis)
        except ValueError:
            # Not echoed: a URL may carry a password.
            raise SettingError("redis", "redis is not a Redis URL this server can use (like "
                               "redis://host:6379/0)") from None

    def _open_database(self, pool_size: int) -> Engine:
        s = self.settings
        names = "db" if s.db else "data_dir"
        try:
            engine = make_engine(s.db_url, pool_size=pool_size, autocheckpoint=False)
        except (ArgumentError, NoSuchModuleError, ValueError):
            # Not echoed: a URL may carry a password.
            raise SettingError(names, "db is not a database URL this server can use (like "
                               "sqlite:///path or postgresql://user@host/name)") from None
        except ImportError as exc:
            raise SettingError(names, f"db needs a database driver that is not installed: "
                               f"{exc}", exit_code=1) from None
        except OSError as exc:  # SQLite's file or its directory
            raise SettingError(names, f"the database file {exc.filename} cannot be made: "
                               f"{exc.strerror or exc}", exit_code=1) from None
        try:
            # Before the migrations: a running server's schema is not changed under it.
            self.db_lock = DatabaseLock(engine)
            if s.redis:
                # psycopg 3 itself: the writer pipelines its locks and reads through it
                # (chat.conversations.locked_reads).
                if (engine.dialect.name, engine.dialect.driver) != ("postgresql", "psycopg"):
                    engine.dispose()
                    raise SettingError(("redis", "db"), "the nodes of a cluster (redis) "
                                       "share one PostgreSQL database: set db to a "
                                       "postgresql+psycopg:// URL")
                joined = self.db_lock.acquire_shared(lambda: upgrade_to_head(engine),
                                                     lambda: schema_mismatch(engine))
            else:
                joined = self.db_lock.acquire()
                if joined:
                    upgrade_to_head(engine)
            if not joined:
                engine.dispose()
                raise SettingError(names, "another server (or chat-admin) is using this "
                                   "database: its lock is held", exit_code=1)
        except SchemaMismatch as exc:
            engine.dispose()
            raise SettingError(names, str(exc), exit_code=1) from None
        except (SQLAlchemyError, CommandError) as exc:
            if self.db_lock is not None:
                self.db_lock.release()
            engine.dispose()
            raise SettingError(names, f"database {engine.url.render_as_string()} cannot "
                               f"be used: {getattr(exc, 'orig', None) or exc}",
                               exit_code=1) from None
        return engine

    def _check_expiry(self, certfile: Any) -> None:
        expires = certs.certificate_expiry(certfile)
        left = expires - dt.datetime.now(dt.UTC)
        if left < CERT_EXPIRY_WARNING:
            log.warning("the server certificate %s expires %s (in %s)", certfile,
                        expires.isoformat(), left)

    def reload_certificates(self) -> None:
        """SIGHUP: new connections use the new certificate; open ones are untouched."""
        try:
            self.ssl_context = self._make_ssl_context()
        except SettingError as exc:
            log.error("certificate reload failed, keeping the old one: %s",
                      exc.located(self.sources))
            return
        except (OSError, ssl.SSLError, ValueError) as exc:
            log.error("certificate reload failed, keeping the old one: %s", exc)
            return
        log.info("reloaded the TLS certificate")

    # --- connections ----------------------------------------------------------------
    def address_key(self, addr: Any) -> str:
        """What the per-address limits count a peer under (an IPv6 address by its network)."""
        ip = str(addr[0]) if isinstance(addr, tuple) else str(addr)
        return address_key(ip, self.settings.ipv6_prefix)

    def adopt(self, raw: socket.socket, addr: Any) -> None:
        """Called on loop 0 for each accepted socket."""
        if self.proxies and proxy.is_trusted(str(addr[0]), self.proxies):
            # A balancer's: who the client is comes first (chat.proxy), and the client is
            # what the per-address limits count.
            if self._admit(None, addr):
                loop = self.loops[self._next_loop % len(self.loops)]
                self._next_loop += 1
                loop.call_soon(_ProxyHeader, self, loop, raw, addr)
            else:
                raw.close()
            return
        self.adopt_client(raw, addr)

    def _admit(self, ip: str | None, addr: Any) -> bool:
        """Count a connection in, from `ip` (None: not known yet); False if refused."""
        with self._count_lock:
            per_ip = self._per_ip.get(ip, 0) if ip is not None else 0
            if self.stopping:
                refusal = "shutting down"
            elif ip is None and self._count >= self.max_connections:
                refusal = f"{self._count} connections already"
            elif ip is not None and per_ip >= self.settings.max_connections_per_ip:
                refusal = f"{per_ip} connections from {ip} already"
            else:
                refusal = ""
                if ip is None:
                    self._count += 1
                else:
                    self._per_ip[ip] = per_ip + 1
        if refusal:
            # Before TLS there is no way to say why; the client sees the connection close.
            log.warning("refusing %s: %s", addr, refusal)
        return not refusal

    def adopt_client(self, raw: socket.socket, addr: Any, counted: bool = False) -> None:
        """A socket whose client is `addr` (after a balancer's header, `counted` already
        among the connections): the per-address limit, then a Connection."""
        ip = self.address_key(addr)  # the Connection computes the same as its `ip`
        if not counted and not self._admit(None, addr):
            raw.close()
            return
        if not self._admit(ip, addr):
            self.connection_closed(None)
            raw.close()
            return
        try:
            # Chat frames are small and latency matters: no Nagle delay.
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:  # reset before we got to it
            raw.close()
            self.connection_closed(ip)
            return
        loop = self.loops[self._next_loop % len(self.loops)]
        self._next_loop += 1
        loop.call_soon(self._start_connection, loop, raw, addr)

    def _start_connection(self, loop: IOLoop, raw: socket.socket, addr: Any) -> None:
        try:
            Connection(self, loop, raw, addr)
        except (OSError, ValueError) as exc:
            log.info("%s: could not start connection: %s", addr, exc)
            raw.close()
            self.connection_closed(self.address_key(addr))

    def connection_closed(self, ip: str | None) -> None:
        """Count a connection out; `ip` is its `address_key` (None: a balancer's whose
        header did not come)."""
        with self._count_lock:
            self._count -= 1
            if ip is None:
                self._count_lock.notify_all()
                return
            left = self._per_ip.get(ip, 1) - 1
            if left > 0:
                self._per_ip[ip] = left
            else:
                self._per_ip.pop(ip, None)
            self._count_lock.notify_all()

    @property
    def connection_count(self) -> int:
        return self._count

    # --- shutdown -------------------------------------------------------------------
    def _on_every_loop(self, fn: Callable[[IOLoop], None], timeout: float = 5.0) -> None:
        done = []
        for loop in self.loops:
            ev = threading.Event()

            def call(loop: IOLoop = loop, ev: threading.Event = ev) -> None:
                try:
                    fn(loop)
                finally:
                    ev.set()

            loop.call_soon(call)
            done.append(ev)
        for ev in done:
            ev.wait(timeout)

    def stop(self) -> None:
        if self.stopping:
            return
        self.stopping = True
        log.info("shutting down")

        def stop_reading(loop: IOLoop) -> None:
            if loop is self.loops[0]:
                self.listener.close()
            for handler in list(loop.handlers):
                if isinstance(handler, Connection):
                    handler.stop_reading()

        self._on_every_loop(stop_reading)
        if self.metrics_server is not None:
            self.metrics_server.stop()
        self.control.stop()
        self.auth_pool.stop()
        self.read_pool.stop()
        self.store.stop()  # everything submitted is stored and delivered
        if self.bus is not None:
            self.bus.stop()
            self.filler.stop()
        if self.checkpointer is not None:
            self.checkpointer.stop()

        def say_bye(loop: IOLoop) -> None:
            for handler in list(loop.handlers):
                if isinstance(handler, Connection):
                    handler.close("shutdown")

        self._on_every_loop(say_bye)
        deadline = time.monotonic() + self.settings.shutdown_grace + 1
        with self._count_lock:
            while self._count > 0 and time.monotonic() < deadline:
                self._count_lock.wait(max(0.01, deadline - time.monotonic()))
        for loop in self.loops:
            loop.stop()
        for loop in self.loops:
            loop.join(5)
        if self.redis is not None:
            self.redis.close()
        self._keeper_stop.set()
        if self._lock_keeper is not None:
            self._lock_keeper.join()
        if self.db_lock is not None:
            self.db_lock.release()
        self.engine.dispose()
        self.data_lock.release()
        log.info("stopped")
        self._stopped.set()

    def wait_stopped(self, timeout: float | None = None) -> bool:
        return self._stopped.wait(timeout)


READ_WORKERS = 2  # history reads, beside the writer thread
# Seconds between checks that the PostgreSQL lock is still held (chat.db.DatabaseLock).
LOCK_CHECK = 5.0


def hello_frame(server_id: str, s: Settings, registration: str) -> dict[str, Any]:
    """The greeting: the contract's fields, and the limits a client should pace itself to."""
    return {
        "type": "hello", "protocol": PROTOCOL_VERSION, "server": server_id,
        "max_frame_bytes": s.max_frame_bytes, "min_password_length": s.min_password_length,
        "features": ["acl", "devices", "e2e"], "registration": registration,
        "limits": {
            "frames_per_second": s.frames_per_second, "frame_burst": s.frame_burst,
            "read_bytes_per_second": s.read_bytes_per_second,
            "read_bytes_burst": 2 * s.max_frame_bytes,
            "reply_bytes_per_second": s.reply_bytes_per_second,
            "reply_bytes_burst": s.reply_bytes_burst,
            "max_message_chars": MAX_MESSAGE_CHARS, "max_history_limit": MAX_HISTORY_LIMIT,
        },
    }


def _connection_cap(wanted: int) -> int:
    """Raise the open-files limit as far as allowed; cap connections to what it permits."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted + FD_HEADROOM:
        target = wanted + FD_HEADROOM if hard == resource.RLIM_INFINITY else min(
            hard, wanted + FD_HEADROOM)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    if soft != resource.RLIM_INFINITY and soft < wanted + FD_HEADROOM:
        cap = max(1, soft - FD_HEADROOM)
        low = cap < max(FD_WARN_BELOW, wanted // FD_WARN_FRACTION)
        hint = "; raise it (ulimit -n, or LimitNOFILE= under systemd)" if low else ""
        log.log(logging.WARNING if low else logging.INFO,
                "open-files limit is %d: holding at most %d connections, not %d%s",
                soft, cap, wanted, hint)
        return cap
    return wanted


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # Alembic narrates every start at INFO; only its warnings matter here.
    logging.getLogger("alembic").setLevel(max(logging.WARNING, logging.getLogger().level))


def main(argv: Sequence[str] | None = None) -> int:
    try:
        settings, sources = load_settings_and_sources(argv)
    except (ValueError, OSError) as exc:  # a SettingError names the setting and its source
        print(f"chat-server: {exc}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level)
    server = Server(settings, sources)
    try:
        server.start()
    except SettingError as exc:
        log.error("cannot start: %s", exc.located(sources))
        return exc.exit_code
    except (OSError, ssl.SSLError, ValueError) as exc:
        log.error("cannot start: %s", exc)
        return 1
    wait_for_signals(server.reload_certificates)
    server.stop()
    return 0


def _ignore(_signum: int, _frame: Any) -> None:
    pass


def wait_for_signals(reload: Callable[[], None]) -> None:
    """Return at SIGTERM or SIGINT; call `reload` at each SIGHUP meanwhile. Call it from
    the main thread. Later signals, during the shutdown, are ignored.

    The handlers themselves do nothing: Python runs a handler in the main thread between
    any two bytecodes, even inside another handler, so a handler that takes a lock can
    deadlock. One that set a threading.Event did, when a second SIGTERM came while the
    first one's `set` held the Event's lock: the server never stopped (the cluster tests'
    node logs showed it). Instead, Python's C-level handler writes each signal's number to
    the wake-up socket, and this loop reads them.
    """
    wake_r, wake_w = socket.socketpair()
    wake_w.setblocking(False)
    signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, _ignore)
    try:
        while True:
            for signum in wake_r.recv(64):  # each byte a signal's number
                if signum == signal.SIGHUP:
                    reload()
                elif signum in (signal.SIGTERM, signal.SIGINT):
                    return
    finally:
        signal.set_wakeup_fd(-1)
        wake_r.close()
        wake_w.close()


if __name__ == "__main__":
    raise SystemExit(main())

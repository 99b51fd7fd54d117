"""Prometheus metrics and a health check, on an address of their own (`metrics_address`).

Off unless set; a bare `:PORT` listens on loopback only, since what the metrics tell
(connections, rates, queue depths) is for the operator and the balancer, not the world.
`GET /metrics` is Prometheus' text format; `GET /health` answers 200 `ok` while the
server takes work (its writer runs and its database answers) and 503 otherwise, which
is what a TCP balancer's HTTP check needs to take a node out (deploy/, issue 19).

Each server has its own registry: several servers in one process (the tests) never mix
their figures. What is counted is counted where it happens, once per writer batch, not
per message, so the hot path pays nothing measurable.
"""

from __future__ import annotations

import logging
import socket
import sys
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

log = logging.getLogger(__name__)

# From a fraction of a millisecond (a batch of a few rows) to seconds (a stalled disk).
_SECONDS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
            0.5, 1.0, 2.5, 5.0)


class Metrics:
    """The figures one server keeps; the store and the server feed them."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.messages_stored = Counter(
            "chat_messages_stored", "Messages stored (room and direct)", registry=r)
        self.db_errors = Counter(
            "chat_db_errors", "Writer batches whose transaction failed (all rolled back)",
            registry=r)
        self.redis_errors = Counter(
            "chat_redis_errors", "Redis calls that failed (refused, timed out, or an error), "
            "several nodes only", registry=r)
        self.commit_seconds = Histogram(
            "chat_commit_seconds", "One writer batch, from BEGIN to COMMIT", buckets=_SECONDS,
            registry=r)
        self.fanout_seconds = Histogram(
            "chat_fanout_seconds", "One writer batch's continuations after COMMIT (fan-out "
            "to the sessions' queues)", buckets=_SECONDS, registry=r)
        self.gap_repairs = Counter(
            "chat_cluster_gap_repairs", "Reads of messages Redis did not bring (a gap, or "
            "a conversation whose newest message never came), several nodes only",
            registry=r)
        self.connections = Gauge("chat_connections", "Open client connections", registry=r)
        self.auth_queue = Gauge(
            "chat_auth_queue", "Password checks waiting for a bcrypt worker", registry=r)
        self.writer_queue = Gauge(
            "chat_writer_queue", "Jobs waiting for the store's writer", registry=r)

    def watch(self, connections: Callable[[], float], auth_queue: Callable[[], float],
              writer_queue: Callable[[], float]) -> None:
        """Gauges read when scraped, from the server's own counts."""
        self.connections.set_function(connections)
        self.auth_queue.set_function(auth_queue)
        self.writer_queue.set_function(writer_queue)


def parse_address(value: str) -> tuple[str, int]:
    """`host:port`, `[v6]:port` or `:port` (loopback); ValueError if it is none of them."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError("host:port, or :port for loopback")
    host = host.strip("[]") or "127.0.0.1"
    return host, int(port)


class MetricsServer:
    """`/metrics` and `/health` over plain HTTP, on a thread of their own."""

    def __init__(self, address: tuple[str, int], metrics: Metrics,
                 healthy: Callable[[], bool]) -> None:
        registry = metrics.registry

        class Handler(BaseHTTPRequestHandler):
            # Buffered, so that a reply leaves in one write when the request is done. A
            # balancer's check (HAProxy's) resets the connection as soon as it has read
            # the status line: unbuffered, the body's own write then met the reset.
            wbufsize = -1

            def do_GET(self) -> None:
                if self.path == "/metrics":
                    self._send(200, generate_latest(registry), CONTENT_TYPE_LATEST)
                elif self.path == "/health":
                    ok = _safely(healthy)
                    self._send(200 if ok else 503, b"ok\n" if ok else b"unavailable\n")
                else:
                    self._send(404, b"/metrics or /health\n")

            def _send(self, status: int, body: bytes,
                      kind: str = "text/plain; charset=utf-8") -> None:
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass  # a scrape every few seconds is not news

        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        http = type("_HTTP", (ThreadingHTTPServer,),
                    {"address_family": family, "daemon_threads": True,
                     "handle_error": _handle_error})
        self._http = http(address, Handler)
        self.address: tuple[str, int] = self._http.server_address[:2]  # type: ignore[assignment]
        self._thread = threading.Thread(target=self._http.serve_forever, name="metrics",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._http.shutdown()
        self._http.server_close()


def _handle_error(server: Any, request: Any, client_address: Any) -> None:
    """socketserver prints every handler's exception with its traceback to stderr; a
    client that hung up before the reply was written (a check that timed out, a scanner)
    is not worth one."""
    exc = sys.exc_info()[1]
    if isinstance(exc, ConnectionError):
        log.debug("metrics: %s hung up early: %s", client_address, exc)
    else:
        log.error("metrics: request from %s failed", client_address, exc_info=True)


def _safely(check: Callable[[], bool]) -> bool:
    try:
        return check()
    except Exception:
        log.exception("health check failed")
        return False

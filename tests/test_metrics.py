"""/metrics and /health on metrics_address (chat.metrics): what an operator's Prometheus
and a balancer's health check read."""

from __future__ import annotations

import socket
import struct
import urllib.error
import urllib.request

import pytest

from chat.metrics import parse_address


def get(server, path: str) -> tuple[int, str]:
    host, port = server.server.metrics_server.address
    try:
        with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=10) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def sample(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in the metrics")


def test_metrics_count_what_the_server_does_and_health_says_it_takes_work(server_factory):
    server = server_factory(metrics_address="127.0.0.1:0")
    status, text = get(server, "/metrics")
    assert status == 200 and sample(text, "chat_connections") == 0
    alice = server.user("alice")
    for i in range(3):
        assert alice.request({"type": "send", "room": "general", "message": f"m{i}"})[
            "type"] == "message"
    _, text = get(server, "/metrics")
    assert sample(text, "chat_connections") == 1
    assert sample(text, "chat_messages_stored_total") == 3
    assert sample(text, "chat_commit_seconds_count") >= 3  # a batch per request at least
    assert sample(text, "chat_db_errors_total") == 0
    assert "chat_fanout_seconds_bucket" in text and "chat_auth_queue 0.0" in text
    assert get(server, "/health") == (200, "ok\n")
    assert get(server, "/nothing")[0] == 404
    server.server.stop()  # stopping: the balancer must take the node out first
    with pytest.raises(OSError):
        get(server, "/health")


def test_metrics_are_off_unless_asked_and_a_bare_port_is_loopback(chat_server):
    assert chat_server.server.metrics_server is None
    assert parse_address(":9107") == ("127.0.0.1", 9107)
    assert parse_address("[::1]:9107") == ("::1", 9107)
    for bad in ("9107", "host:", "host:99999"):
        with pytest.raises(ValueError):
            parse_address(bad)


def test_a_check_that_resets_after_the_status_line_leaves_no_traceback(server_factory, capfd):
    # HAProxy's `http-check expect status 200` resets the connection as soon as it has
    # the status line; the node's log showed a ConnectionResetError traceback for some.
    server = server_factory(metrics_address="127.0.0.1:0")
    host, port = server.server.metrics_server.address
    for _ in range(30):
        with socket.create_connection((host, port), timeout=10) as s:
            s.sendall(b"GET /health HTTP/1.0\r\n\r\n")
            assert s.recv(12) == b"HTTP/1.0 200"
            # Linger 0: close() sends a reset, as HAProxy's check does.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    assert get(server, "/health") == (200, "ok\n")  # and the server still answers
    err = capfd.readouterr().err
    assert "Traceback" not in err and "ConnectionResetError" not in err, err

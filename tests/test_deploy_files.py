"""deploy/ still fits the code: the node's TOML is valid settings that agree with the
systemd unit and the balancer, HAProxy accepts its file, and its timeouts outlast the
server's idle timeout."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from clustertest import haproxy_binary, need_haproxy
from conftest import TIMEOUT

from chat.config import Settings, load_settings

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
HAPROXY = DEPLOY / "haproxy.cfg"


def example() -> Settings:
    # Through the real loader: an unknown or misspelt key, or a bad value, is refused.
    return load_settings(["--config", str(DEPLOY / "node.toml.example")], environ={})


def test_the_node_example_is_a_cluster_node_behind_the_balancer():
    node = example()
    assert node.db.startswith("postgresql+psycopg://") and node.redis
    assert node.pepper_file  # one file every node shares, never each its own
    assert node.registration  # required off loopback
    # The balancer names each client (send-proxy-v2), so per-address limits stay as
    # they are and count clients.
    assert node.proxy_protocol
    assert node.max_connections_per_ip == Settings().max_connections_per_ip
    # The unit gives node1 the data directory the example names, and reads its file.
    unit = (DEPLOY / "chat-server@.service").read_text()
    assert "StateDirectory=chat/%i" in unit and node.data_dir == "/var/lib/chat/node1"
    assert "--config /etc/chat/%i.toml" in unit
    # The balancer's node1 is this node: its chat port and, for the check, its metrics.
    server = re.search(r"^\s*server node1 (\S+):(\d+) send-proxy-v2 check addr (\S+) "
                       r"port (\d+)$",
                       HAPROXY.read_text(), re.M)
    assert server is not None
    metrics_host, _, metrics_port = node.metrics_address.rpartition(":")
    assert server.groups() == (node.host, str(node.port), metrics_host, metrics_port)


def test_the_balancer_never_closes_a_connection_the_node_keeps():
    # A node pings a silent client at 3/4 of idle_timeout and closes it at idle_timeout:
    # the balancer's inactivity timeouts must be longer, or it would cut live clients.
    text = HAPROXY.read_text()
    units = {"s": 1, "m": 60, "h": 3600}
    for name in ("client", "server", "tunnel"):
        found = re.search(rf"^\s*timeout {name} (\d+)([smh])$", text, re.M)
        assert found is not None, name
        assert int(found.group(1)) * units[found.group(2)] > Settings().idle_timeout, name


def check(path: Path) -> None:
    binary = haproxy_binary()
    assert binary is not None
    result = subprocess.run([binary, "-c", "-f", str(path)], capture_output=True, text=True,
                            timeout=TIMEOUT)
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "[WARNING]" not in output, output


def test_haproxy_accepts_the_file_and_its_one_host_variant(tmp_path):
    need_haproxy()
    check(HAPROXY)
    # docs/cluster.md's one host: the commented server lines in place of the others.
    text = HAPROXY.read_text()
    one_host = re.sub(r"^    server node\d .*\n", "", text, flags=re.M)
    one_host = re.sub(r"^    #   server ", "    server ", one_host, flags=re.M)
    assert one_host.count("\n    server ") == 3
    (tmp_path / "haproxy.cfg").write_text(one_host)
    check(tmp_path / "haproxy.cfg")

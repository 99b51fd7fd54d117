"""The PROXY protocol v2 from a trusted balancer (chat.proxy): the client's address is the
one per-address limits count; nobody else can claim one."""

from __future__ import annotations

import socket
import ssl
from typing import Any

import pytest
from conftest import Client

from chat import proxy


def test_a_header_names_the_client_in_ipv4_and_ipv6() -> None:
    for src, dst in ((("203.0.113.9", 40001), ("10.0.0.11", 7072)),
                     (("2001:db8::7", 40002), ("2001:db8::1", 7072))):
        data = proxy.header(src, dst)
        head, body = data[:proxy.HEADER], data[proxy.HEADER:]
        assert proxy.body_length(head) == len(body)
        assert proxy.client_address(head, body) == src


def test_a_local_command_keeps_the_connections_own_address() -> None:
    local = proxy.SIGNATURE + bytes([0x20, 0x00]) + b"\x00\x00"
    assert proxy.body_length(local) == 0
    assert proxy.client_address(local, b"") is None


@pytest.mark.parametrize("head", [
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 5,  # a TLS ClientHello
    proxy.SIGNATURE + bytes([0x11, 0x11]) + b"\x00\x0c",  # version 1 in the v2 format
    proxy.SIGNATURE + bytes([0x21, 0x11]) + b"\xff\xff",  # 65535 bytes to follow
])
def test_anything_else_is_refused(head: bytes) -> None:
    with pytest.raises(proxy.ProxyError):
        proxy.body_length(head)


def test_trusted_networks_and_ipv4_mapped_peers() -> None:
    nets = proxy.trusted_networks("127.0.0.1, 10.0.0.0/8 ,::1")
    assert proxy.is_trusted("10.1.2.3", nets) and proxy.is_trusted("::ffff:127.0.0.1", nets)
    assert not proxy.is_trusted("192.0.2.1", nets) and not proxy.is_trusted("junk", nets)
    with pytest.raises(ValueError, match="not an address"):
        proxy.trusted_networks("10.0.0.0/8, balancer")


def via_balancer(server: Any, client_ip: str) -> Client:
    return server.client(preamble=proxy.header((client_ip, 50000), ("127.0.0.1",
                                                                    server.port)))


def test_per_address_limits_count_the_client_the_balancer_names(server_factory: Any) -> None:
    server = server_factory(proxy_protocol="127.0.0.1", max_connections_per_ip=1)
    first = via_balancer(server, "203.0.113.9")
    other = via_balancer(server, "198.51.100.4")  # another client: its own limit
    assert first.hello["type"] == "hello" and other.hello["type"] == "hello"
    assert server.server._per_ip == {"203.0.113.9": 1, "198.51.100.4": 1}
    with pytest.raises((ConnectionError, ssl.SSLError, EOFError, OSError)):
        via_balancer(server, "203.0.113.9")  # that client's second: over its limit
    from conftest import PASSWORD

    assert other.request({"type": "register", "username": "carol",
                          "password": PASSWORD})["type"] == "ok"
    assert first.login("carol")["type"] == "welcome"
    for c in (first, other):
        c.close()


def test_a_trusted_balancer_must_send_the_header(server_factory: Any) -> None:
    server = server_factory(proxy_protocol="127.0.0.1")
    with pytest.raises((ConnectionError, ssl.SSLError, EOFError, OSError)):
        server.client()  # straight TLS from the balancer's address: dropped
    # A header split over several writes is fine.
    raw = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    data = proxy.header(("203.0.113.9", 1), ("127.0.0.1", server.port))
    for i in range(0, len(data), 5):
        raw.sendall(data[i:i + 5])
    from chat import tls

    sock = tls.client_context(server.cafile).wrap_socket(raw, server_hostname="localhost")
    assert b'"hello"' in sock.recv(4096)
    sock.close()


def test_nobody_else_can_claim_an_address(server_factory: Any) -> None:
    server = server_factory(proxy_protocol="192.0.2.1")  # the balancer is elsewhere
    plain = server.client()  # a direct client needs no header...
    assert plain.hello["type"] == "hello"
    with pytest.raises((ConnectionError, ssl.SSLError, EOFError, OSError)):
        via_balancer(server, "203.0.113.9")  # ...and one that sends one is not believed
    plain.close()

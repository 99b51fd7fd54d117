"""The PROXY protocol, version 2: a balancer's word on who the client is. Sans-IO.

Behind a TCP balancer (HAProxy, deploy/) every connection comes from the balancer's
address, and every per-address limit (connections, failed logins, registrations) would
count the whole world as one client. With `send-proxy-v2`, HAProxy first sends a binary
header naming the client's address, then the client's bytes (here, its TLS handshake).

The server believes that header only from the addresses of `proxy_protocol` (the
balancers), and requires it from them; anyone else's connection is taken as it is. The
header is read with exact lengths, so not a byte of the TLS handshake behind it is taken.
Format: https://www.haproxy.org/download/2.6/doc/proxy-protocol.txt, section 2.2.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from collections.abc import Iterable

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
HEADER = 16  # the signature, version and command, family, and the length that follows
# Addresses, and TLVs the balancer may add; a longer header is refused, not read.
MAX_BODY = 512

_LOCAL, _PROXY = 0x20, 0x21  # version 2, and the command
_TCP4, _TCP6 = 0x11, 0x21


class ProxyError(ValueError):
    """Not a PROXY v2 header a balancer would send."""


def body_length(header: bytes) -> int:
    """From the first 16 bytes: how many follow. Raises ProxyError if they are not the
    start of a version 2 header."""
    if len(header) != HEADER or header[:12] != SIGNATURE:
        raise ProxyError("no PROXY protocol v2 signature")
    if header[12] not in (_LOCAL, _PROXY):
        raise ProxyError("not PROXY protocol version 2")
    (length,) = struct.unpack("!H", header[14:16])
    if length > MAX_BODY:
        raise ProxyError(f"a PROXY header of {length} bytes")
    return length


def client_address(header: bytes, body: bytes) -> tuple[str, int] | None:
    """The client's (address, port) from a whole header; None when the header says to
    keep the connection's own (a LOCAL command: the balancer's own health check, or an
    address family other than TCP over IPv4 or IPv6)."""
    if header[12] == _LOCAL:
        return None
    family = header[13]
    if family == _TCP4:
        if len(body) < 12:
            raise ProxyError("a short PROXY IPv4 address block")
        src = socket.inet_ntop(socket.AF_INET, body[0:4])
        (port,) = struct.unpack("!H", body[8:10])
        return src, port
    if family == _TCP6:
        if len(body) < 36:
            raise ProxyError("a short PROXY IPv6 address block")
        src = socket.inet_ntop(socket.AF_INET6, body[0:16])
        (port,) = struct.unpack("!H", body[32:34])
        return src, port
    return None


def trusted_networks(spec: str) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """`proxy_protocol`'s value: addresses or networks, comma-separated. Raises
    ValueError naming a part that is neither."""
    nets = []
    for part in (p.strip() for p in spec.split(",")):
        if part:
            try:
                nets.append(ipaddress.ip_network(part, strict=False))
            except ValueError:
                raise ValueError(f"{part!r} is not an address or a network") from None
    return nets


def is_trusted(ip: str, nets: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network]
               ) -> bool:
    try:
        addr = ipaddress.ip_address(ip.partition("%")[0])
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return any(addr in net for net in nets)


def header(src: tuple[str, int], dst: tuple[str, int]) -> bytes:
    """A PROXY v2 header as a balancer sends it (for tests and tools)."""
    if ":" in src[0]:
        body = (socket.inet_pton(socket.AF_INET6, src[0]) + socket.inet_pton(
            socket.AF_INET6, dst[0]) + struct.pack("!HH", src[1], dst[1]))
        family = _TCP6
    else:
        body = (socket.inet_pton(socket.AF_INET, src[0]) + socket.inet_pton(
            socket.AF_INET, dst[0]) + struct.pack("!HH", src[1], dst[1]))
        family = _TCP4
    return SIGNATURE + bytes([_PROXY, family]) + struct.pack("!H", len(body)) + body

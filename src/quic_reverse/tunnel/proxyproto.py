"""PROXY protocol version 2 headers (HAProxy's specification, ``proxy-protocol.txt`` §2.2).

With ``--proxy-protocol SERVICE`` the edge writes one binary header to that exposed
service's TCP connection before any tunnelled byte, carrying the real client's address
(the relay's TCP client, sent by the relay in the open's ``client`` metadata) and the
address it connected to (the relay's forward, ``via``). nginx (``listen ...
proxy_protocol``), HAProxy (``accept-proxy``) and others read it.

Layout: 12-byte signature, version/command byte (``0x21``: v2, PROXY), family/transport
byte (``0x11`` TCP over IPv4, ``0x21`` TCP over IPv6), 2-byte big-endian length, then
source address, destination address, source port, destination port. When the relay
sent no usable addresses, the header says ``AF_UNSPEC`` (family byte ``0x00``, no
addresses): the receiver then uses the connection's own endpoints, as the
specification requires.
"""

from __future__ import annotations

import ipaddress
import struct

__all__ = ["SIGNATURE", "build_v2_header", "parse_endpoint"]

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_VERSION_PROXY = 0x21
_TCP4, _TCP6, _UNSPEC = 0x11, 0x21, 0x00


Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def parse_endpoint(text: object) -> tuple[Address, int] | None:
    """``"203.0.113.7:50211"`` / ``"[2001:db8::1]:443"`` / ``"2001:db8::1:443"`` ->
    (address, port); ``None`` for anything else (never raises)."""
    if not isinstance(text, str) or ":" not in text:
        return None
    host, _, port_text = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        return None
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    return address, int(port_text)


def build_v2_header(source: object, destination: object) -> bytes:
    """The v2 header for a TCP connection from ``source`` to ``destination`` (both
    ``HOST:PORT`` text as the relay sends them)."""
    src, dst = parse_endpoint(source), parse_endpoint(destination)
    if src is None or dst is None:
        return SIGNATURE + struct.pack("!BBH", _VERSION_PROXY, _UNSPEC, 0)
    (sa, sp), (da, dp) = src, dst
    if sa.version != da.version:  # mixed families: map IPv4 into IPv6
        sa = sa if sa.version == 6 else ipaddress.IPv6Address(f"::ffff:{sa}")
        da = da if da.version == 6 else ipaddress.IPv6Address(f"::ffff:{da}")
    family = _TCP4 if sa.version == 4 else _TCP6
    body = sa.packed + da.packed + struct.pack("!HH", sp, dp)
    return SIGNATURE + struct.pack("!BBH", _VERSION_PROXY, family, len(body)) + body

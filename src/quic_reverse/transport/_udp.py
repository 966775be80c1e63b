"""UDP endpoints with batched I/O for both QUIC stacks.

``qh3.asyncio.serve()`` (and aioquic's) does one ``recvfrom``/``sendto`` per packet
on the server side, which caps a server at ~50 MB/s. :func:`open_udp_endpoint`
puts a socket on qh3's optimized datagram transport instead (``recvmmsg``/GRO on
receive, GSO ``sendmsg`` on send, Linux) which hands the protocol *batches* of
datagrams from one address through ``datagrams_received(list, addr)`` and accepts
``sendto_many(list, addr)``. On other platforms, or if that transport is not
available, it falls back to asyncio's plain datagram endpoint with an adapter that
presents each datagram as a batch of one.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import sys
from typing import Any, Protocol

#: SO_RCVBUF / SO_SNDBUF for UDP sockets.
DEFAULT_SOCKET_BUFFER = 4 * 1024 * 1024

__all__ = [
    "DEFAULT_SOCKET_BUFFER",
    "BatchProtocol",
    "configure_socket",
    "open_udp_endpoint",
    "route_max_udp_payload",
]

logger = logging.getLogger("quic_reverse.transport.udp")


class BatchProtocol(Protocol):
    """What an endpoint delivers to: batches of datagrams from one address."""

    def datagrams_received(self, datagrams: list[bytes], addr: Any) -> None: ...

    def connection_lost(self, exc: Exception | None) -> None: ...


def configure_socket(sock: socket.socket, buffer_size: int = DEFAULT_SOCKET_BUFFER) -> None:
    """Set large UDP socket buffers (best effort: the kernel may cap them)."""
    for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, buffer_size)
        except OSError as exc:  # pragma: no cover - platform specific
            logger.debug("setsockopt(%s, %d) failed: %s", opt, buffer_size, exc)


# getsockopt names for the kernel's path MTU of a connected socket (Linux values;
# Python's socket module does not export IP_MTU).
_IS_LINUX = sys.platform.startswith("linux")
_IP_MTU = int(getattr(socket, "IP_MTU", 14))
_IPV6_MTU = int(getattr(socket, "IPV6_MTU", 24))


def route_max_udp_payload(family: int, sockaddr: Any) -> int | None:
    """Largest UDP payload the kernel's route to ``sockaddr`` carries without
    fragmentation (interface / cached path MTU minus IP and UDP headers), or None
    where the kernel does not tell (non-Linux, errors).

    ``connect()`` on a UDP socket sends nothing; it only looks the route up. On
    loopback this is ~64 KiB, on Ethernet 1472 (IPv4). It is an *upper bound* for
    path MTU discovery, not a promise that the whole path carries it.
    """
    if not _IS_LINUX or family not in (socket.AF_INET, socket.AF_INET6):
        return None
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect(sockaddr)
            if family == socket.AF_INET:
                mtu = probe.getsockopt(socket.IPPROTO_IP, _IP_MTU)
                return int(mtu) - 28
            mtu = probe.getsockopt(socket.IPPROTO_IPV6, _IPV6_MTU)
            return int(mtu) - 48
    except OSError as exc:
        logger.debug("route MTU to %s unknown: %s", sockaddr, exc)
        return None


class _Adapter(asyncio.DatagramProtocol):
    """Plain asyncio datagram protocol forwarding to a :class:`BatchProtocol`."""

    def __init__(self, target: BatchProtocol) -> None:
        self._target = target

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self._target.datagrams_received([data], addr)

    def datagrams_received(self, datagrams: list[bytes], addr: Any) -> None:
        self._target.datagrams_received(datagrams, addr)

    def error_received(self, exc: Exception) -> None:
        logger.debug("UDP error: %s", exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self._target.connection_lost(exc)


def _optimized_factory() -> Any:
    try:
        from qh3.asyncio._transport import create_optimized_datagram_transport
    except ImportError:  # pragma: no cover - qh3 is a hard dependency
        return None
    return create_optimized_datagram_transport


async def open_udp_endpoint(
    target: BatchProtocol,
    host: str,
    port: int,
    *,
    remote: bool = False,
    socket_buffer: int = DEFAULT_SOCKET_BUFFER,
) -> tuple[asyncio.DatagramTransport, Any]:
    """Open a UDP socket delivering batches to ``target``.

    With ``remote=False`` the socket is bound to ``(host, port)`` (a server). With
    ``remote=True`` it is an unconnected client socket bound to an ephemeral port
    of the same address family as ``host``.

    Returns ``(transport, sockaddr)`` where ``sockaddr`` is the resolved address
    of ``(host, port)`` (its family is ``transport.get_extra_info("socket").family``).

    Raises:
        OSError: the address cannot be resolved or bound.
    """
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    if not infos:
        raise OSError(f"cannot resolve {host!r}")
    # UDP gives no "connection refused" to fall back on, so prefer IPv4 when a name
    # resolves to both (``localhost`` -> 127.0.0.1 and ::1): servers here bind IPv4.
    infos.sort(key=lambda info: info[0] != socket.AF_INET)
    family, _, _, _, sockaddr = infos[0]
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        configure_socket(sock, socket_buffer)
        if remote:
            sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", 0))
        else:
            sock.bind(sockaddr)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    adapter = _Adapter(target)
    create = _optimized_factory()
    try:
        if create is not None:
            transport, _ = await create(loop, lambda: adapter, sock=sock)
        else:  # pragma: no cover - non-qh3 fallback
            transport, _ = await loop.create_datagram_endpoint(lambda: adapter, sock=sock)
    except BaseException:
        sock.close()  # the transport never took it over
        raise
    return transport, sockaddr

"""The client side of the QUIC adapters: open a socket, run the handshake."""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, TransportError
from ._driver import StackConnection
from ._errors import stack_call
from ._options import TransportOptions
from ._udp import open_udp_endpoint, route_max_udp_payload

if TYPE_CHECKING:
    from ._stack import QuicConfigurationLike, StackSpec

__all__ = ["client_handshake", "stack_connect"]

logger = logging.getLogger("quic_reverse.transport")


class _ClientEndpoint:
    """Feeds a client socket's datagram batches to its one connection."""

    def __init__(self, conn: StackConnection) -> None:
        self._conn = conn

    def datagrams_received(self, datagrams: list[bytes], addr: Any) -> None:
        self._conn.datagrams_received(datagrams, addr)

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None:
            logger.debug("client socket lost: %s", exc)


async def client_handshake(
    conn: StackConnection, host: str, port: int, options: TransportOptions
) -> None:
    """Open a client socket for ``conn``, start the handshake and wait for it.

    The socket is closed when the connection terminates.

    Raises:
        CertificateError: the peer's certificate was rejected.
        ConnectionClosed: the peer closed the connection during the handshake.
        TransportError: resolution/socket failure, or no handshake within
            ``options.handshake_timeout``.
    """
    loop = asyncio.get_running_loop()
    with stack_call(f"connect to {host}:{port}"):
        transport, addr = await open_udp_endpoint(
            _ClientEndpoint(conn), host, port, remote=True, socket_buffer=options.socket_buffer
        )
    conn.attach(transport, addr)
    conn.on_terminated(lambda _conn: transport.close())
    family = socket.AF_INET6 if len(addr) == 4 else socket.AF_INET
    conn._quic.qr_route_known(route_max_udp_payload(family, addr))
    timeout = options.handshake_timeout
    try:
        with stack_call("starting handshake"):
            conn._quic.connect(addr, now=loop.time())
        conn._transmit()
        async with asyncio.timeout(timeout):
            await conn.wait_handshake()
    except TimeoutError:
        conn.abort()
        transport.close()
        raise TransportError(
            f"QUIC handshake with {host}:{port} timed out after {timeout:g} s: no answer "
            "(is the server running, is UDP blocked?)"
        ) from None
    except BaseException:
        conn.abort()
        transport.close()
        raise
    logger.info("%s: connected to %s:%d", conn.stack_name, host, port)


async def stack_connect(
    spec: StackSpec[Any],
    host: str,
    port: int,
    configuration: QuicConfigurationLike,
    options: TransportOptions,
) -> StackConnection:
    """Create a client connection of ``spec``'s stack and run its handshake.

    Raises:
        ConfigError: ``configuration`` is a server configuration.
        CertificateError: the server's certificate was rejected.
        ConnectionClosed: the server closed the connection during the handshake.
        TransportError: no handshake within the handshake timeout, or
            resolution/socket failure.
    """
    if not configuration.is_client:
        raise ConfigError("connect() needs a client configuration (is_client=True)")
    quic = spec.create(configuration, options.max_streams, None)
    conn = spec.connection_class(
        spec, quic, is_client=True, options=options, receive_high_water=configuration.max_data
    )
    await client_handshake(conn, host, port, options)
    return conn

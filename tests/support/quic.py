"""``quic_pair()``: a connected QUIC (client, server) pair over real UDP on 127.0.0.1.

The server certificate is a generated development certificate (end-entity, SAN
localhost/127.0.0.1), created once per test process in a temporary directory;
the client trusts it through ``cafile``. Everything is cleaned up on exit.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import functools
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from quic_reverse.transport.base import Connection
from quic_reverse.transport.quic import (
    ClientTLS,
    QuicServer,
    ServerTLS,
    Stack,
    TransportOptions,
    connect,
    serve,
)
from quic_reverse.transport.tls import write_self_signed
from tests.support.timing import LONG

__all__ = ["dev_certificate", "quic_pair", "quic_server"]

_TMP: tempfile.TemporaryDirectory[str] | None = None


@functools.cache
def dev_certificate() -> tuple[Path, Path]:
    """``(cert_path, key_path)`` of a development certificate shared by this process."""
    global _TMP
    _TMP = tempfile.TemporaryDirectory(prefix="quic-reverse-test-")
    atexit.register(_TMP.cleanup)
    return write_self_signed(_TMP.name)


@contextlib.asynccontextmanager
async def quic_pair(
    stack: Stack = "qh3", *, client_stack: Stack | None = None, **opts: Any
) -> AsyncIterator[tuple[Connection, Connection]]:
    """Yield ``(client_conn, server_conn)`` connected over loopback UDP.

    ``stack`` is the server's stack and, unless ``client_stack`` is given, the
    client's. ``opts`` are :class:`TransportOptions` fields (e.g. ``max_streams=4``,
    ``stream_window=...``), applied to both sides. A pair of two different stacks
    really is one (``stack_hint`` off, unless given: the server would otherwise follow
    the client's stack).
    """
    if client_stack is not None and client_stack != stack:
        opts.setdefault("stack_hint", False)
    options = TransportOptions(**opts)
    cert, key = dev_certificate()
    loop = asyncio.get_running_loop()
    accepted: asyncio.Future[Connection] = loop.create_future()

    async def on_connection(conn: Connection) -> None:
        if accepted.done():
            conn.close(1, b"unexpected second connection")
            return
        accepted.set_result(conn)
        await conn.wait_closed()

    server = await serve(
        "127.0.0.1",
        0,
        tls=ServerTLS(certfile=cert, keyfile=key),
        on_connection=on_connection,
        stack=stack,
        options=options,
    )
    client: Connection | None = None
    try:
        host, port = server.address
        client = await connect(
            host,
            port,
            tls=ClientTLS(cafile=cert),
            stack=client_stack or stack,
            options=options,
        )
        async with asyncio.timeout(LONG):
            server_conn = await accepted
        yield client, server_conn
    finally:
        if client is not None:
            client.close()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(LONG / 2):
                    await client.wait_closed()
        server.close()
        await server.wait_closed()


@contextlib.asynccontextmanager
async def quic_server(
    on_connection: Any, stack: Stack = "qh3", **opts: Any
) -> AsyncIterator[QuicServer]:
    """A server on 127.0.0.1 (random port) with the shared dev certificate."""
    cert, key = dev_certificate()
    server = await serve(
        "127.0.0.1",
        0,
        tls=ServerTLS(certfile=cert, keyfile=key),
        on_connection=on_connection,
        stack=stack,
        options=TransportOptions(**opts),
    )
    try:
        yield server
    finally:
        server.close()
        await server.wait_closed()

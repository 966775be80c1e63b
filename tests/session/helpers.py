"""Helpers for the session tests: started session pairs over any transport."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Literal

from quic_reverse import Config, Role, Session, SessionHandle
from quic_reverse.transport.base import Connection
from quic_reverse.transport.memory import connection_pair

from ..support.quic import quic_pair
from ..support.timing import LONG

#: Every wait in these tests is bounded by this; generous for a loaded CI box.
WAIT = LONG


async def start_pair(
    client_conn: Connection,
    server_conn: Connection,
    client_config: Config | None = None,
    server_config: Config | None = None,
) -> tuple[SessionHandle, SessionHandle]:
    """Negotiate a client and a server session concurrently."""
    async with asyncio.timeout(WAIT):
        client, server = await asyncio.gather(
            Session(client_conn, Role.CLIENT, client_config or Config(agent="test-client")).start(),
            Session(server_conn, Role.SERVER, server_config or Config(agent="test-server")).start(),
        )
    return client, server


@contextlib.asynccontextmanager
async def session_pair(
    transport: str = "memory",
    client_config: Config | None = None,
    server_config: Config | None = None,
) -> AsyncIterator[tuple[SessionHandle, SessionHandle]]:
    """Yield (client, server) handles over ``transport`` ("memory", "qh3" or "aioquic")."""
    if transport == "memory":
        mc, ms = connection_pair()
        client, server = await start_pair(mc, ms, client_config, server_config)
        try:
            yield client, server
        finally:
            await _close_both(client, server)
    else:
        stack: Literal["qh3", "aioquic"] = "aioquic" if transport == "aioquic" else "qh3"
        async with quic_pair(stack) as (c, s):
            client, server = await start_pair(c, s, client_config, server_config)
            try:
                yield client, server
            finally:
                await _close_both(client, server)


async def _close_both(client: SessionHandle, server: SessionHandle) -> None:
    async with asyncio.timeout(WAIT):
        await asyncio.gather(client.close(), server.close())


async def echo(stream: object) -> None:
    """Echo handler: copy every chunk back, then FIN (via serve's graceful close)."""
    from quic_reverse import Stream

    assert isinstance(stream, Stream)
    async for chunk in stream:
        await stream.send(chunk)

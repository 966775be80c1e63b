"""Sessions over real QUIC on 127.0.0.1 for the API tests."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from quic_reverse import Config, Role, Session, SessionHandle
from tests.support.quic import quic_pair
from tests.support.timing import LONG


@contextlib.asynccontextmanager
async def session_pair() -> AsyncIterator[tuple[SessionHandle, SessionHandle]]:
    """``(client_handle, server_handle)``: negotiated sessions over one QUIC connection,
    entered with the ``async with session.start()`` form and closed on exit."""
    async with quic_pair() as (client_conn, server_conn):
        client = Session(client_conn, Role.CLIENT, Config(agent="api-client"))
        server = Session(server_conn, Role.SERVER, Config(agent="api-server"))
        async with asyncio.timeout(LONG):
            async with contextlib.AsyncExitStack() as stack:
                handles = await asyncio.gather(
                    stack.enter_async_context(client.start()),
                    stack.enter_async_context(server.start()),
                )
                yield handles[0], handles[1]

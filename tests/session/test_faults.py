"""Fault cases of issue 10 at the session level, each a regression test: a failing
service, conflicting roles, a peer that closes the connection without a session close,
a burst of opens beyond the stream limits, and cancelled accepts."""

from __future__ import annotations

import asyncio

import pytest

from quic_reverse import OpenRequest, Stream
from quic_reverse.errors import StreamReset
from quic_reverse.transport.memory import connection_pair
from quic_reverse.wire import CloseCode

from ..support.timing import LONG, SHORT
from .helpers import session_pair, start_pair

TRANSPORTS = ["memory", "qh3"]


async def _fail(stream: Stream) -> None:
    raise RuntimeError("service failed")


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_failing_handler_fails_the_open_at_once(transport: str) -> None:
    """Issue 10 item 5: the opener gets a typed StreamReset at once, not a bind timeout."""
    async with session_pair(transport) as (client, server):
        serving = asyncio.create_task(server.serve({"boom": _fail}))
        async with asyncio.timeout(SHORT):  # the bind deadline is 10 s
            for _ in range(3):
                try:
                    stream = await client.open("boom")
                except StreamReset as exc:
                    assert exc.error_code == CloseCode.ERROR
                    assert "service failed" in str(exc)
                else:
                    # The data stream won the race: it reads as reset.
                    with pytest.raises(StreamReset):
                        await stream.read()
                    stream.reset()
            await client.ping()
        serving.cancel()
        await asyncio.gather(serving, return_exceptions=True)


async def test_cancelled_accept_fails_the_open_at_once() -> None:
    """An accept_open() cancelled while its data stream waits for a stream slot tells
    the opener (StreamClose), which fails at once instead of at its bind deadline."""
    mc, ms = connection_pair(max_streams=1)  # the server may open one data stream
    client, server = await start_pair(mc, ms)
    try:
        async with asyncio.timeout(SHORT):
            first = asyncio.create_task(client.open("a"))
            event = await server.process_message()
            assert isinstance(event, OpenRequest)
            held = await server.accept_open(event.request_id)  # takes the last slot
            await first
            second = asyncio.create_task(client.open("b"))
            event = await server.process_message()
            assert isinstance(event, OpenRequest)
            accept = asyncio.create_task(server.accept_open(event.request_id))
            for _ in range(5):
                await asyncio.sleep(0)
            assert not accept.done()  # waiting in open_bi for a slot
            accept.cancel()
            with pytest.raises(StreamReset):
                await second
            await client.ping()
            held.reset()
    finally:
        async with asyncio.timeout(LONG):
            await asyncio.gather(client.close(), server.close())

"""The datagram part of the transport contract (RFC 9221) on every transport.

``max_datagram_size`` is a positive limit on every pair built with this library's
configurations (both stacks announce ``max_datagram_frame_size``); a datagram of that
size arrives whole, a bigger one is refused with :class:`DatagramTooLarge` before
anything is sent, and a closed connection refuses with :class:`ConnectionClosed`.
"""

from __future__ import annotations

import asyncio

import pytest

from quic_reverse.errors import ConnectionClosed, DatagramsUnavailable, DatagramTooLarge
from quic_reverse.transport.base import Connection
from quic_reverse.transport.memory import connection_pair
from tests.support.timing import LONG

from .conftest import ALL_KINDS, Pair


class _Inbox:
    def __init__(self, conn: Connection) -> None:
        self.items: list[bytes] = []
        self.arrived = asyncio.Event()
        conn.set_datagram_handler(self.push)

    def push(self, data: bytes) -> None:
        self.items.append(data)
        self.arrived.set()

    async def wait_for(self, count: int, within: float) -> None:
        async with asyncio.timeout(within):
            while len(self.items) < count:
                self.arrived.clear()
                await self.arrived.wait()


async def _datagrams_both_ways(client: Connection, server: Connection) -> None:
    limit_c, limit_s = client.max_datagram_size, server.max_datagram_size
    assert limit_c is not None and limit_s is not None
    # Both stacks: a 1280/1200-byte packet minus the worst-case headers.
    assert 1000 <= limit_c <= 1500 and 1000 <= limit_s <= 1500
    at_server, at_client = _Inbox(server), _Inbox(client)
    sent_up = [bytes([i]) * (1 + i * 37 % limit_c) for i in range(20)] + [b"", b"m" * limit_c]
    sent_down = [bytes([i]) * (1 + i * 53 % limit_s) for i in range(20)] + [b"M" * limit_s]
    # Loss is allowed by the contract; on loopback at this rate there is none, and the
    # retry below keeps the test honest without asserting "no loss" on a busy machine.
    for data in sent_up:
        client.send_datagram(data)
    for data in sent_down:
        server.send_datagram(memoryview(data))
    await at_server.wait_for(len(sent_up), LONG)
    await at_client.wait_for(len(sent_down), LONG)
    assert sorted(at_server.items) == sorted(sent_up)
    assert sorted(at_client.items) == sorted(sent_down)


@pytest.mark.parametrize("transport_kind", ALL_KINDS)
async def test_datagrams_arrive_whole_both_ways(transport_pair: Pair) -> None:
    await _datagrams_both_ways(*transport_pair)


async def test_too_large_is_refused_before_sending(transport_pair: Pair) -> None:
    client, server = transport_pair
    at_server = _Inbox(server)
    limit = client.max_datagram_size
    assert limit is not None
    with pytest.raises(DatagramTooLarge) as info:
        client.send_datagram(b"x" * (limit + 1))
    assert (info.value.size, info.value.limit) == (limit + 1, limit)
    client.send_datagram(b"after")  # the connection is unaffected
    await at_server.wait_for(1, LONG)
    assert at_server.items == [b"after"]


async def test_closed_connection_refuses_datagrams(transport_pair: Pair) -> None:
    client, _server = transport_pair
    client.close()
    await client.wait_closed()
    with pytest.raises(ConnectionClosed):
        client.send_datagram(b"x")


async def test_without_handler_datagrams_are_dropped(transport_pair: Pair) -> None:
    """A datagram that arrives before a handler is set is dropped, not queued for the
    handler set later."""
    client, server = transport_pair
    client.send_datagram(b"nobody listens")
    # A stream round trip started after the datagram: once its answer is back, the
    # datagram (no loss here) has been handled by the server, with no handler set.
    send, recv = await client.open_bi()
    await send.write(b"sync")
    async with asyncio.timeout(LONG):
        accepted = await server.accept_bi()
        assert accepted is not None
        assert await accepted[1].read_exactly(4) == b"sync"
        await accepted[0].write(b"back")
        assert await recv.read_exactly(4) == b"back"
    # The in-memory pair delivers a datagram with call_soon and its streams without
    # yielding: one loop turn runs that delivery (deterministic, not a time window).
    await asyncio.sleep(0)
    at_server = _Inbox(server)
    client.send_datagram(b"second")
    await at_server.wait_for(1, LONG)
    assert at_server.items == [b"second"]


async def test_handler_exception_drops_only_that_datagram(transport_pair: Pair) -> None:
    client, server = transport_pair
    got: list[bytes] = []
    arrived = asyncio.Event()

    def handler(data: bytes) -> None:
        if data == b"boom":
            raise RuntimeError("handler bug")
        got.append(data)
        arrived.set()

    server.set_datagram_handler(handler)
    client.send_datagram(b"boom")
    client.send_datagram(b"fine")
    async with asyncio.timeout(LONG):
        await arrived.wait()
    assert got == [b"fine"]


async def test_memory_pair_without_datagrams() -> None:
    client, _server = connection_pair(max_datagram_size=None)
    try:
        assert client.max_datagram_size is None
        with pytest.raises(DatagramsUnavailable):
            client.send_datagram(b"x")
    finally:
        client.close()
    with pytest.raises(ValueError):
        connection_pair(max_datagram_size=0)

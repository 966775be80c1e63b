"""The transport's non-blocking paths the session's hot path uses, over real QUIC.

``Connection.try_open_bi`` (open now or not at all), ``SendStream.call_before_send``
(run once right before the next transmit) and ``RecvStream.set_data_callback`` +
``take_buffered`` (data handed over from the receive path). The in-memory pair has
none of them and says so (the session then takes its task paths, which the rest of
the suite covers).
"""

from __future__ import annotations

import asyncio

import pytest

from quic_reverse.transport.memory import connection_pair
from tests.support.quic import quic_pair
from tests.support.timing import LONG

STACKS = ["qh3", "aioquic"]


@pytest.mark.parametrize("stack", STACKS)
async def test_try_open_bi_opens_at_once_or_not_at_all(stack: str) -> None:
    async with quic_pair(stack, max_streams=2) as (client, server), asyncio.timeout(LONG):  # type: ignore[arg-type]
        first = client.try_open_bi()
        assert first is not None
        await first[0].write(b"a")
        peer = await server.accept_bi()
        assert peer is not None and await peer[1].read_exactly(1) == b"a"
        second = client.try_open_bi()
        assert second is not None
        assert second[0].stream_id != first[0].stream_id
        # The peer allows two streams: a third one would have to wait, so none opens.
        assert client.try_open_bi() is None
        opening = asyncio.create_task(client.open_bi())  # waits for a slot instead
        await asyncio.sleep(0)
        assert not opening.done()
        opening.cancel()
        await asyncio.gather(opening, return_exceptions=True)
        client.close()
        assert client.try_open_bi() is None  # closed: never raises


@pytest.mark.parametrize("stack", STACKS)
async def test_call_before_send_runs_once_before_the_next_transmit(stack: str) -> None:
    async with quic_pair(stack) as (client, server), asyncio.timeout(LONG):  # type: ignore[arg-type]
        send, _ = await client.open_bi()
        calls: list[str] = []

        def before() -> None:
            calls.append("before")
            assert send.try_write(b"joined")  # lands in the transmit about to happen

        assert send.call_before_send(before)
        assert calls == []  # not now: at the transmit
        await asyncio.sleep(0)  # the transmit scheduled by the registration runs
        assert calls == ["before"]
        peer = await server.accept_bi()
        assert peer is not None and await peer[1].read_exactly(6) == b"joined"
        await asyncio.sleep(0)
        assert calls == ["before"]  # once
        client.close()
        assert not send.call_before_send(before)
        assert calls == ["before"]


@pytest.mark.parametrize("stack", STACKS)
async def test_data_callback_takes_data_from_the_receive_path(stack: str) -> None:
    async with quic_pair(stack) as (client, server), asyncio.timeout(LONG):  # type: ignore[arg-type]
        send, _ = await client.open_bi()
        await send.write(b"hello")
        peer = await server.accept_bi()
        assert peer is not None
        recv = peer[1]
        assert await recv.read_exactly(5) == b"hello"
        taken: list[bytes] = []
        arrived = asyncio.Event()

        def on_data() -> None:
            taken.append(recv.take_buffered(3))  # leave the rest for read()
            arrived.set()

        assert recv.set_data_callback(on_data)
        await send.write(b"world")
        await arrived.wait()
        assert taken == [b"wor"]
        assert await recv.read(10) == b"ld"  # what the callback left
        assert recv.take_buffered() == b""  # nothing buffered: b"" (not EOF)
        recv.set_data_callback(None)
        await send.write(b"!")
        await send.finish()
        assert await recv.read_exactly(1) == b"!"
        assert await recv.read() == b""  # FIN goes to read()
        assert taken == [b"wor"]


async def test_memory_transport_has_no_fast_paths() -> None:
    client, server = connection_pair()
    try:
        assert client.try_open_bi() is None
        send, recv = await client.open_bi()
        assert not send.call_before_send(lambda: None)
        assert not recv.set_data_callback(lambda: None)
        assert recv.take_buffered() == b""
    finally:
        client.close()
        server.close()

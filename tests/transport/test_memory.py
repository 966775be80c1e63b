"""Tests of the in-memory transport's own knobs (trickle, delay, limits, numbering).

The contract itself is covered by ``test_conformance.py``, which runs over every
transport; this module covers what only :mod:`quic_reverse.transport.memory` has.
"""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from quic_reverse.errors import (
    ConnectionClosed,
    StreamReset,
    StreamStopped,
    UsageError,
)
from quic_reverse.transport.memory import connection_pair

WAIT = 5.0  # upper bound for anything that should happen promptly


async def test_rejects_bad_knobs() -> None:
    with pytest.raises(ValueError):
        connection_pair(buffer_size=0)
    with pytest.raises(ValueError):
        connection_pair(max_streams=0)
    with pytest.raises(ValueError):
        connection_pair(delay=-1.0)


async def test_quic_stream_numbering() -> None:
    client, server = connection_pair()
    ids = [(await client.open_bi())[0].stream_id for _ in range(3)]
    assert ids == [0, 4, 8]
    send, recv = await server.open_bi()
    assert send.stream_id == recv.stream_id == 1
    assert client.remote_address == ("memory", 0)
    client.close()


async def test_trickle_reads_one_byte_at_a_time() -> None:
    client, server = connection_pair(trickle=True)
    send, _ = await client.open_bi()
    await send.write(b"hello")
    await send.finish()
    accepted = await asyncio.wait_for(server.accept_bi(), WAIT)
    assert accepted is not None
    _, recv = accepted
    chunks = []
    for _ in range(10):
        chunk = await asyncio.wait_for(recv.read(1024), WAIT)
        chunks.append(chunk)
        if not chunk:
            break
    assert chunks == [b"h", b"e", b"l", b"l", b"o", b""]
    assert await recv.read_exactly(0) == b""
    client.close()


async def test_delay_defers_delivery_and_keeps_order() -> None:
    client, server = connection_pair(delay=0.02)
    send, _ = await client.open_bi()
    for i in range(50):
        await send.write(bytes([i]))
    await send.finish()
    # Nothing arrived yet: the stream is still in flight and counted as such.
    assert send.buffered_bytes == 50
    accepted = await asyncio.wait_for(server.accept_bi(), WAIT)
    assert accepted is not None
    _, recv = accepted
    data = bytearray()
    for _ in range(60):
        chunk = await asyncio.wait_for(recv.read(), WAIT)
        if not chunk:
            break
        data += chunk
    assert bytes(data) == bytes(range(50))
    assert send.buffered_bytes == 0
    client.close()


async def test_delay_counts_in_flight_bytes_against_buffer() -> None:
    client, server = connection_pair(delay=0.05, buffer_size=10)
    send, _ = await client.open_bi()
    await send.write(b"0123456789")
    # The next write must wait until the in-flight bytes arrived and are read.
    blocked = asyncio.ensure_future(send.write(b"x"))
    accepted = await asyncio.wait_for(server.accept_bi(), WAIT)
    assert accepted is not None
    assert not blocked.done()
    _, recv = accepted
    assert await asyncio.wait_for(recv.read_exactly(10), WAIT) == b"0123456789"
    await asyncio.wait_for(blocked, WAIT)
    assert await asyncio.wait_for(recv.read_exactly(1), WAIT) == b"x"
    client.close()


async def test_close_loses_bytes_in_flight() -> None:
    client, server = connection_pair(delay=0.05)
    send, _ = await client.open_bi()
    await send.write(b"early")
    accepted = await asyncio.wait_for(server.accept_bi(), WAIT)
    assert accepted is not None
    _, recv = accepted
    assert await asyncio.wait_for(recv.read(), WAIT) == b"early"
    await send.write(b"lost")
    client.close(7, b"bye")
    with pytest.raises(ConnectionClosed) as info:
        await asyncio.wait_for(recv.read(), WAIT)
    assert info.value.error_code == 7
    assert info.value.reason == "bye"
    assert send.buffered_bytes == 0


async def test_delivered_bytes_stay_readable_after_close() -> None:
    client, server = connection_pair()
    send, _ = await client.open_bi()
    await send.write(b"kept")
    accepted = await asyncio.wait_for(server.accept_bi(), WAIT)
    assert accepted is not None
    _, recv = accepted
    server.close()
    assert await recv.read() == b"kept"
    with pytest.raises(ConnectionClosed):
        await recv.read()


async def test_reset_discards_bytes_in_flight() -> None:
    client, server = connection_pair(delay=0.05)
    send, _ = await client.open_bi()
    await send.write(b"doomed")
    send.reset(3)
    assert send.buffered_bytes == 0
    accepted = await asyncio.wait_for(server.accept_bi(), WAIT)
    assert accepted is not None
    _, recv = accepted
    with pytest.raises(StreamReset) as info:
        await asyncio.wait_for(recv.read(), WAIT)
    assert info.value.error_code == 3
    with pytest.raises(UsageError):
        await send.write(b"more")
    client.close()


async def test_stream_slot_released_by_reset_and_stop() -> None:
    client, server = connection_pair(max_streams=1)
    send, recv = await client.open_bi()
    send.reset(1)
    opener = asyncio.ensure_future(client.open_bi())
    accepted = await asyncio.wait_for(server.accept_bi(), WAIT)
    assert accepted is not None
    await asyncio.wait({opener}, timeout=0.05)
    assert not opener.done(), "the opener must wait: the forward direction is still open"
    # Our receive direction ends when we stop it: the slot frees up.
    recv.stop(2)
    send2, _ = await asyncio.wait_for(opener, WAIT)
    assert send2.stream_id == 4
    client.close()


async def test_stop_semantics_on_the_reading_side() -> None:
    client, server = connection_pair()
    send, _ = await client.open_bi()
    await send.write(b"data")
    accepted = await asyncio.wait_for(server.accept_bi(), WAIT)
    assert accepted is not None
    _, recv = accepted
    assert recv.buffered_bytes == 4
    recv.stop(9)
    recv.stop(10)  # idempotent: the first code wins
    assert recv.buffered_bytes == 0  # buffered data is dropped
    with pytest.raises(UsageError):
        await recv.read()
    with pytest.raises(StreamStopped) as info:
        await send.write(b"more")
    assert info.value.error_code == 9
    send.reset(1)  # the direction already ended: a no-op, never raises
    with pytest.raises(StreamStopped):
        await send.finish()
    client.close()


async def test_stop_after_everything_was_read_is_a_no_op() -> None:
    client, server = connection_pair()
    send, _ = await client.open_bi()
    await send.write(b"all")
    await send.finish()
    accepted = await asyncio.wait_for(server.accept_bi(), WAIT)
    assert accepted is not None
    _, recv = accepted
    assert await recv.read() == b"all"
    assert await recv.read() == b""
    recv.stop(4)
    assert await recv.read() == b""  # still just EOF, no error
    client.close()


async def test_data_in_flight_when_stopped_is_discarded() -> None:
    client, server = connection_pair(delay=0.05, max_streams=1)
    send, recv = await client.open_bi()
    await send.write(b"early")
    accepted = await asyncio.wait_for(server.accept_bi(), WAIT)
    assert accepted is not None
    peer_send, peer_recv = accepted
    await send.write(b"in flight")
    peer_recv.stop(2)
    assert send.buffered_bytes == 0
    assert peer_recv.buffered_bytes == 0
    # Finish the other direction: the stream is done and its slot returns.
    await peer_send.finish()
    assert await asyncio.wait_for(recv.read(), WAIT) == b""
    await asyncio.wait_for(client.open_bi(), WAIT)
    client.close()


async def test_stop_before_any_write_makes_the_stream_visible() -> None:
    """As in QUIC, STOP_SENDING on a fresh stream opens it at the peer."""
    client, server = connection_pair()
    send, recv = await client.open_bi()
    recv.stop(6)
    accepted = await asyncio.wait_for(server.accept_bi(), WAIT)
    assert accepted is not None
    peer_send, _ = accepted
    assert peer_send.stream_id == send.stream_id
    with pytest.raises(StreamStopped) as info:
        await peer_send.write(b"x")
    assert info.value.error_code == 6
    client.close()


async def test_one_byte_buffer_still_moves_everything() -> None:
    client, server = connection_pair(buffer_size=1)
    send, _ = await client.open_bi()
    payload = bytes(range(200))

    async def writer() -> None:
        await send.write(payload)
        await send.finish()

    writing = asyncio.ensure_future(writer())
    accepted = await asyncio.wait_for(server.accept_bi(), WAIT)
    assert accepted is not None
    _, recv = accepted
    got = bytearray()
    for _ in range(len(payload) + 1):
        assert recv.buffered_bytes <= 1
        chunk = await asyncio.wait_for(recv.read(), WAIT)
        if not chunk:
            break
        got += chunk
    await asyncio.wait_for(writing, WAIT)
    assert bytes(got) == payload
    client.close()


async def test_stream_slots_are_returned_exactly() -> None:
    """Finished streams give their slot back; nothing leaks over many rounds."""
    limit = 2
    client, server = connection_pair(max_streams=limit)
    for round_no in range(3 * limit):
        send, recv = await asyncio.wait_for(client.open_bi(), WAIT)
        await send.write(bytes([round_no]))
        await send.finish()
        accepted = await asyncio.wait_for(server.accept_bi(), WAIT)
        assert accepted is not None
        peer_send, peer_recv = accepted
        assert await peer_recv.read() == bytes([round_no])
        assert await peer_recv.read() == b""
        await peer_send.finish()
        assert await recv.read() == b""
    # All slots are free again: `limit` opens succeed, the next one waits.
    for _ in range(limit):
        send, _ = await asyncio.wait_for(client.open_bi(), WAIT)
        await send.write(b".")
    extra = asyncio.ensure_future(client.open_bi())
    await asyncio.wait({extra}, timeout=0.05)
    assert not extra.done()
    client.close()
    with pytest.raises(ConnectionClosed):
        await asyncio.wait_for(extra, WAIT)


async def test_delayed_fin_alone_makes_the_stream_visible_later() -> None:
    client, server = connection_pair(delay=0.05)
    send, _ = await client.open_bi()
    await send.finish()
    accepting = asyncio.ensure_future(server.accept_bi())
    accepted = await asyncio.wait_for(accepting, WAIT)
    assert accepted is not None
    assert await accepted[1].read() == b""
    client.close()
    await asyncio.wait_for(server.wait_closed(), WAIT)
    assert not server.is_open
    assert "closed" in repr(server)


@settings(max_examples=40, deadline=None)
@given(
    writes=st.lists(st.binary(min_size=0, max_size=3000), max_size=20),
    read_sizes=st.lists(st.integers(min_value=1, max_value=5000), min_size=1, max_size=8),
    buffer_size=st.integers(min_value=1, max_value=4096),
    trickle=st.booleans(),
    delay=st.sampled_from([0.0, 0.001]),
)
def test_any_write_and_read_pattern_delivers_in_order_and_bounded(
    writes: list[bytes], read_sizes: list[int], buffer_size: int, trickle: bool, delay: float
) -> None:
    """Property: whatever the write sizes, read sizes and knobs, the reader gets exactly
    the bytes written, in order, then EOF; the receive buffer never exceeds its bound."""

    async def scenario() -> None:
        client, server = connection_pair(buffer_size=buffer_size, trickle=trickle, delay=delay)
        send, _ = await client.open_bi()

        async def writer() -> None:
            for data in writes:
                await send.write(data)
            await send.finish()

        writing = asyncio.ensure_future(writer())
        accepted = await asyncio.wait_for(server.accept_bi(), WAIT)
        assert accepted is not None
        _, recv = accepted
        expected = b"".join(writes)
        got = bytearray()
        for i in range(len(expected) + 1):
            assert recv.buffered_bytes <= buffer_size
            size = read_sizes[i % len(read_sizes)]
            chunk = await asyncio.wait_for(recv.read(size), WAIT)
            if not chunk:
                break
            assert len(chunk) <= (1 if trickle else size)
            got += chunk
        await asyncio.wait_for(writing, WAIT)
        assert bytes(got) == expected
        client.close()

    asyncio.run(scenario())

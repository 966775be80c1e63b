"""``SendStream.try_write``: the non-blocking write the session's control writer uses.

It takes all of the data at once (True) when the stream is writable and its send
buffer is under budget, and none of it (False) otherwise, never raising: the caller
then falls back to ``write``. The in-memory transport has no such path (always False).
"""

from __future__ import annotations

import asyncio

import pytest

from quic_reverse.transport.base import Connection, RecvStream, SendStream
from quic_reverse.transport.memory import connection_pair
from tests.support.quic import quic_pair
from tests.support.timing import LONG

KiB = 1024
#: Small windows and budget: a peer that does not read stalls the sender quickly.
OPTS = {"stream_window": 16 * KiB, "connection_window": 64 * KiB, "send_buffer": 16 * KiB}


async def _accept(conn: Connection) -> tuple[SendStream, RecvStream]:
    async with asyncio.timeout(LONG):
        pair = await conn.accept_bi()
    assert pair is not None
    return pair


async def _read_to_eof(recv: RecvStream, limit: int) -> bytes:
    data = bytearray()
    async with asyncio.timeout(LONG):
        for _ in range(limit + 2):  # every read returns >= 1 byte until FIN
            chunk = await recv.read(65536)
            if not chunk:
                return bytes(data)
            data += chunk
            assert len(data) <= limit, "more data than was sent"
    raise AssertionError("no FIN")


@pytest.mark.parametrize("stack", ["qh3", "aioquic"])
async def test_try_write_takes_all_or_nothing(stack: str) -> None:
    async with quic_pair(stack, **OPTS) as (client, server):  # type: ignore[arg-type]
        send, _ = await client.open_bi()
        assert send.try_write(b"a")  # room: taken at once, nothing awaited
        _, peer_recv = await _accept(server)
        async with asyncio.timeout(LONG):
            assert await peer_recv.read_exactly(1) == b"a"

        big = bytes(range(256)) * (2 * 64 * KiB // 256)  # far more than the peer's windows
        assert send.try_write(big)  # under budget before it: taken whole
        assert send.buffered_bytes >= OPTS["send_buffer"]
        assert not send.try_write(b"NOT ACCEPTED")  # over budget: nothing taken

        async def rest() -> None:  # write() still works and comes right after ``big``
            await send.write(b"tail")
            await send.finish()

        _, got = await asyncio.gather(rest(), _read_to_eof(peer_recv, len(big) + 4))
        assert got == big + b"tail"

        assert not send.try_write(b"x")  # after finish: False, no exception
        send2, _ = await client.open_bi()
        send2.reset(3)
        assert not send2.try_write(b"x")  # after reset
        send3, _ = await client.open_bi()
        client.close()
        assert not send3.try_write(b"x")  # connection closed


async def test_try_write_without_a_fast_path_is_false() -> None:
    c, s = connection_pair()
    try:
        send, _ = await c.open_bi()
        assert not send.try_write(b"x")  # the memory transport keeps write() only
        await send.write(b"y")
        await send.finish()
        _, recv = await _accept(s)
        assert await _read_to_eof(recv, 1) == b"y"
    finally:
        c.close()
        await c.wait_closed()

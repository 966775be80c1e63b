"""The control writer's hand-over at the transmit, over real QUIC.

When the writer task is parked (outbox empty, no write pending), bytes queued during
a loop turn are handed to the transport together, right before its next transmit
(``SendStream.call_before_send`` + the all-or-nothing ``SendStream.try_write``): one
transport write for all the frames of a turn, leaving with the transmit a write made
at once would have joined. Otherwise the bytes wait, in order, for the writer task.
Either way the peer decodes every frame: a caller cancelled while its bytes wait
never tears one.
"""

from __future__ import annotations

import asyncio

import pytest

from quic_reverse import Config, Role, Session
from quic_reverse._control import ControlWriter
from quic_reverse.wire import StreamClose
from tests.support.quic import quic_pair
from tests.support.timing import LONG, MS

from .test_hostile import raw_hello

KiB = 1024
OPTS = {"stream_window": 4 * KiB, "connection_window": 16 * KiB, "send_buffer": 4 * KiB}


@pytest.mark.parametrize("stack", ["qh3", "aioquic"])
async def test_parked_writer_hands_a_turns_bytes_over_at_the_transmit(stack: str) -> None:
    async with quic_pair(stack, **OPTS) as (client, server):  # type: ignore[arg-type]
        send, _ = await client.open_bi()
        handed: list[bytes] = []
        try_write = send.try_write

        def counting_try_write(data: bytes) -> bool:
            handed.append(data)
            return try_write(data)

        send.try_write = counting_try_write  # type: ignore[method-assign]
        writer = ControlWriter()
        task = asyncio.create_task(writer.run(send))
        try:
            for _ in range(10):  # let the task start and park (one loop turn is enough)
                if writer._send is not None:
                    break
                await asyncio.sleep(0)
            assert writer._send is send
            for frame in (b"first", b"second", b"third"):  # one loop turn
                writer.buffer += frame
                writer.filled(len(frame))
            assert writer.written == 0 and handed == []  # nothing before the transmit
            await asyncio.sleep(0)  # the transmit scheduled by the first frame runs first
            assert handed == [b"firstsecondthird"], "one transport write for the turn"
            assert writer.written == writer.queued == 16 and not writer.buffer
            await writer.flushed()  # returns at once

            # The peer does not read: the stream's budget fills, then bytes queue.
            peer = await server.accept_bi()
            assert peer is not None
            sent = bytearray(b"firstsecondthird")
            for i in range(200):
                chunk = bytes([i]) * 512
                writer.buffer += chunk
                writer.filled(len(chunk))
                sent += chunk
                await asyncio.sleep(0)
                if writer.written < writer.queued:
                    break
            assert writer.written < writer.queued, "the stream never ran out of room"
            async with asyncio.timeout(LONG):
                got = await peer[1].read_exactly(len(sent))  # reading lets the writer finish
                await writer.flushed()
            assert got == bytes(sent) and writer.written == writer.queued
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


@pytest.mark.parametrize("stack", ["qh3", "aioquic"])
async def test_cancelled_callers_never_tear_the_control_stream_over_quic(stack: str) -> None:
    """Issue 18's reproduction over real QUIC (where the fast path is live): frames
    queued behind a full stream, callers cancelled, every frame arrives whole, in order."""
    config = Config(close_timeout=100 * MS)
    async with quic_pair(stack, **OPTS) as (c, s), asyncio.timeout(LONG):  # type: ignore[arg-type]
        handle, peer = await asyncio.gather(Session(s, Role.SERVER, config).start(), raw_hello(c))
        callers = [
            asyncio.create_task(handle.close_stream(1 + i, reason="r" * 1500)) for i in range(12)
        ]
        await asyncio.sleep(50 * MS)  # the peer does not read: the stream fills
        for task in callers[1::2]:
            task.cancel()
        await asyncio.gather(*callers[1::2], return_exceptions=True)
        seen: list[int] = []
        while len(seen) < 12:  # the peer reads again: the kept callers' bytes flow
            msg = await peer.next()
            assert isinstance(msg, StreamClose), msg
            seen.append(msg.logical_stream_id)
        await asyncio.gather(*callers[::2])
        assert seen == list(range(1, 13))
        c.close()  # the raw peer would never answer the session close
        await handle.close()

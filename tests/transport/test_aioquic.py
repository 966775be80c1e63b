"""The aioquic adapter over real UDP on 127.0.0.1: the aioquic-specific fixes.

* receive credit follows what the application consumed (aioquic alone doubles
  windows as data arrives, read or not);
* the concurrent-stream limit (hard-coded 128) follows ``max_streams``;
* the handshake wait cannot hang when it completes before anyone waits
  (aioquic's ``wait_connected()`` trap).
"""

from __future__ import annotations

import asyncio
import contextlib

from quic_reverse.errors import StreamStopped
from quic_reverse.transport._driver import StackConnection
from quic_reverse.transport.base import Connection
from tests.support.quic import quic_pair

T = 15.0
KiB = 1024


async def _accept(conn: Connection) -> tuple[object, object]:
    pair = await asyncio.wait_for(conn.accept_bi(), T)
    assert pair is not None
    return pair


async def test_receive_window_follows_consumption() -> None:
    window = 128 * KiB
    size = 8 * window
    async with quic_pair(
        "aioquic", stream_window=window, connection_window=4 * window, send_buffer=64 * KiB
    ) as (client, server):
        assert isinstance(server, StackConnection)
        send, _ = await client.open_bi()
        await send.write(b"x")
        pair = await asyncio.wait_for(server.accept_bi(), T)
        assert pair is not None
        _, recv = pair
        assert await asyncio.wait_for(recv.read_exactly(1), T) == b"x"
        writing = asyncio.ensure_future(send.write(bytes(size)))
        try:
            # The receiver does not read: the writer stalls once one window is used.
            async with asyncio.timeout(T):
                while recv.buffered_bytes < window - 1:
                    await server.wait_receive_activity()
            stream = server._quic._streams[recv.stream_id]  # type: ignore[attr-defined]
            assert stream.max_stream_data_local <= 1 + window  # not doubled
            assert recv.buffered_bytes <= window
            assert not writing.done()
            # Reading grants credit again; the whole payload arrives.
            total = 0
            async with asyncio.timeout(T):
                while total < size:
                    total += len(await recv.read())
            await asyncio.wait_for(writing, T)
            assert stream.max_stream_data_local <= 1 + total + window
        finally:
            writing.cancel()


async def test_stream_limit_follows_max_streams() -> None:
    count = 200  # above aioquic's hard-coded 128
    async with quic_pair("aioquic", max_streams=count) as (client, server):
        async with asyncio.timeout(T):
            sends = []
            for _ in range(count):
                send, _ = await client.open_bi()
                await send.write(b".")
                sends.append(send)
            for _ in range(count):
                _, recv = await _accept(server)
                assert await recv.read_exactly(1) == b"."  # type: ignore[attr-defined]
        opener = asyncio.ensure_future(client.open_bi())
        try:
            done, _ = await asyncio.wait({opener}, timeout=0.3)
            assert not done, "open_bi went past the peer's limit"
        finally:
            opener.cancel()


async def test_handshake_wait_after_completion_returns_at_once() -> None:
    async with quic_pair("aioquic") as (client, server):
        # Both handshakes are long finished; waiting again must not hang.
        async with asyncio.timeout(1.0):
            await client.wait_handshake()  # type: ignore[attr-defined]
            await server.wait_handshake()  # type: ignore[attr-defined]
        send, recv = await client.open_bi()
        await send.write(b"ping")
        await send.finish()
        peer_send, peer_recv = await _accept(server)
        assert await peer_recv.read_exactly(4) == b"ping"  # type: ignore[attr-defined]
        await peer_send.write(b"pong")  # type: ignore[attr-defined]
        await peer_send.finish()  # type: ignore[attr-defined]
        assert await asyncio.wait_for(recv.read_exactly(4), T) == b"pong"


async def test_stopped_streams_do_not_leak_connection_credit() -> None:
    window = 128 * KiB
    async with quic_pair(
        "aioquic", stream_window=window, connection_window=2 * window, send_buffer=64 * KiB
    ) as (client, server):
        async with asyncio.timeout(T):
            # Eight streams of one window each, stopped unread: 4x the connection window.
            for _ in range(8):
                send, _ = await client.open_bi()
                writing = asyncio.ensure_future(send.write(bytes(window)))
                peer_send, peer_recv = await _accept(server)
                assert await peer_recv.read_exactly(1) == b"\0"  # type: ignore[attr-defined]
                peer_recv.stop(3)  # type: ignore[attr-defined]
                with contextlib.suppress(StreamStopped):
                    await writing
                await peer_send.finish()  # type: ignore[attr-defined]
            # The connection still has credit for a full transfer.
            send, _ = await client.open_bi()
            payload = bytes(range(256)) * (4 * window // 256)
            writing = asyncio.ensure_future(send.write(payload))
            _, peer_recv = await _accept(server)
            got = bytearray()
            while len(got) < len(payload):
                got += await peer_recv.read()  # type: ignore[attr-defined]
            await writing
        assert bytes(got) == payload

"""qh3 and aioquic talk to each other through the adapters (both directions)."""

from __future__ import annotations

import asyncio
import hashlib

import pytest

from quic_reverse.errors import StreamReset
from quic_reverse.transport.quic import Stack
from tests.support.quic import quic_pair

T = 20.0
MiB = 1024 * 1024


@pytest.mark.parametrize(("server_stack", "client_stack"), [("qh3", "aioquic"), ("aioquic", "qh3")])
async def test_cross_stack_streams(server_stack: Stack, client_stack: Stack) -> None:
    up = bytes(range(256)) * (4 * 1024)  # 1 MiB
    down = up[::-1]
    async with quic_pair(server_stack, client_stack=client_stack) as (client, server):
        async with asyncio.timeout(T):
            # client-opened stream: data both ways, FIN both ways, sha256 checked
            send, recv = await client.open_bi()
            await send.write(up)
            await send.finish()
            pair = await server.accept_bi()
            assert pair is not None
            peer_send, peer_recv = pair
            got = bytearray()
            while chunk := await peer_recv.read():
                got += chunk
            assert hashlib.sha256(got).digest() == hashlib.sha256(up).digest()
            await peer_send.write(down)
            await peer_send.finish()
            back = bytearray()
            while chunk := await recv.read():
                back += chunk
            assert hashlib.sha256(back).digest() == hashlib.sha256(down).digest()
            # server-opened stream, reset seen as a typed error
            s_send, _ = await server.open_bi()
            await s_send.write(b"abc")
            pair = await client.accept_bi()
            assert pair is not None
            assert await pair[1].read_exactly(3) == b"abc"
            s_send.reset(5)
            with pytest.raises(StreamReset) as info:
                await pair[1].read()
            assert info.value.error_code == 5

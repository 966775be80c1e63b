"""Issue 15 item 3: Stream.readline/readuntil/at_eof/get_extra_info over real QUIC,
with asyncio.StreamReader's semantics."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from quic_reverse import (
    IncompleteReadError,
    LimitOverrunError,
    Metadata,
    Role,
    SessionHandle,
    Stream,
)
from tests.api._pair import session_pair
from tests.support.timing import LONG


@contextlib.asynccontextmanager
async def _opened(
    payload: bytes, *, metadata: dict[str, str] | None = None
) -> AsyncIterator[tuple[SessionHandle, Stream, Stream]]:
    """Open ``svc`` from a client session; the server's handler writes ``payload`` then
    FIN. Yields (client handle, opener's stream, handler's stream), all within LONG."""
    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(asyncio.timeout(LONG))
        client, server = await stack.enter_async_context(session_pair())
        stream, peer = await stack.enter_async_context(_serving(client, server, payload, metadata))
        yield client, stream, peer


@contextlib.asynccontextmanager
async def _serving(
    client: SessionHandle,
    server: SessionHandle,
    payload: bytes,
    metadata: dict[str, str] | None,
) -> AsyncIterator[tuple[Stream, Stream]]:
    got: asyncio.Queue[Stream] = asyncio.Queue()

    async def handler(stream: Stream) -> None:
        await got.put(stream)
        await stream.send(payload)
        await stream.write_eof()
        await stream.read()  # until the opener ends its side

    serving = asyncio.create_task(server.serve({"svc": handler}))
    try:
        stream = await client.open("svc", metadata)
        yield stream, await got.get()
        await stream.aclose()
    finally:
        serving.cancel()
        await asyncio.gather(serving, return_exceptions=True)


async def test_readline_readuntil_at_eof() -> None:
    payload = b"one\ntwo\r\nthree--END--tail"
    async with _opened(payload) as (_, stream, _):
        assert not stream.at_eof()
        assert await stream.readline() == b"one\n"
        assert await stream.readuntil(b"\r\n") == b"two\r\n"
        assert await stream.readuntil(b"--END--") == b"three--END--"
        with pytest.raises(asyncio.IncompleteReadError) as info:
            await stream.readuntil(b"\n")
        assert isinstance(info.value, IncompleteReadError)
        assert info.value.partial == b"tail" and info.value.expected is None
        assert await stream.readline() == b""
        assert stream.at_eof()


async def test_readline_returns_rest_at_eof() -> None:
    async with _opened(b"a\nno newline") as (_, stream, _):
        assert await stream.readline() == b"a\n"
        assert await stream.readline() == b"no newline"
        assert stream.at_eof()


async def test_limit_overrun() -> None:
    payload = b"x" * 100 + b"\nnext\n" + b"y" * 100
    async with _opened(payload) as (_, stream, _):
        with pytest.raises(asyncio.LimitOverrunError) as info:
            await stream.readuntil(b"\n", limit=10)
        assert isinstance(info.value, LimitOverrunError)
        # readuntil keeps the data; readline drops the over-long line (as asyncio)
        with pytest.raises(ValueError):
            await stream.readline(limit=10)
        assert await stream.readline() == b"next\n"
        with pytest.raises(ValueError):
            await stream.readline(limit=10)  # no separator at all: buffer dropped
        with pytest.raises(ValueError):
            await stream.readuntil(b"")


async def test_get_extra_info() -> None:
    async with _opened(b"", metadata={"user": "ada"}) as (client, stream, peer):
        for side, role in ((stream, Role.CLIENT), (peer, Role.SERVER)):
            assert side.get_extra_info("service") == "svc"
            assert side.get_extra_info("logical_stream_id") == side.logical_stream_id
            assert side.get_extra_info("quic_stream_id") == side.quic_stream_id
            assert side.get_extra_info("role") is role
            assert side.get_extra_info("stream") is side
            assert side.get_extra_info("metadata") == Metadata.of({"user": "ada"})
            host, port = side.get_extra_info("peername")
            assert host == "127.0.0.1" and port > 0
            assert side.get_extra_info("nope", 42) == 42
        assert stream.get_extra_info("peername") == client.connection.remote_address


async def test_writelines() -> None:
    async with session_pair() as (client, server), asyncio.timeout(LONG):
        echoed: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

        async def handler(stream: Stream) -> None:
            echoed.set_result(await stream.read())

        serving = asyncio.create_task(server.serve({"svc": handler}))
        stream = await client.open("svc")
        assert stream.can_write_eof()
        stream.writelines([b"a", bytearray(b"b"), memoryview(b"c")])
        await stream.drain()
        await stream.write_eof()
        assert await echoed == b"abc"
        await stream.aclose()
        serving.cancel()
        await asyncio.gather(serving, return_exceptions=True)

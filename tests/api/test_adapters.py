"""Issue 15 item 3: reverse streams handed to third-party asyncio code.

An aiohttp web server runs unchanged on the edge side (the side that dialled, like the
tunnel's edge) through :func:`serve_protocol`; an aiohttp client on the relay side
reaches it through a connector that opens one reverse stream per connection
(:func:`attach_protocol`). :func:`stream_pair` gives genuine asyncio streams. All over
real QUIC on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import io

import aiohttp
import pytest
from aiohttp import web
from aiohttp.client_proto import ResponseHandler
from aiohttp.client_reqrep import ClientRequest
from aiohttp.tracing import Trace

from quic_reverse import SessionHandle, Stream
from quic_reverse.adapters import StreamTransport, attach_protocol, serve_protocol, stream_pair
from tests.api._pair import session_pair
from tests.support.timing import LONG


class ReverseConnector(aiohttp.BaseConnector):
    """An aiohttp connector whose connections are reverse streams of a session."""

    def __init__(self, handle: SessionHandle, service: str) -> None:
        super().__init__()
        self._handle = handle
        self._service = service
        self.opened = 0

    async def _create_connection(
        self,
        req: ClientRequest,
        traces: list[Trace],
        timeout: aiohttp.ClientTimeout,  # noqa: ASYNC109
    ) -> ResponseHandler:
        stream = await self._handle.open(self._service)
        self.opened += 1
        _, protocol = attach_protocol(stream, self._factory)
        return protocol


def _app() -> web.Application:
    async def hello(request: web.Request) -> web.Response:
        peer = request.transport.get_extra_info("peername") if request.transport else None
        service = request.transport.get_extra_info("service") if request.transport else None
        return web.Response(text=f"hello {request.query.get('name', '?')} via {service} {peer}")

    async def digest(request: web.Request) -> web.Response:
        body = await request.read()
        return web.Response(text=f"{len(body)} {hashlib.sha256(body).hexdigest()}")

    async def chunks(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        for i in range(int(request.query["n"])):
            await response.write(b"%d\n" % i)
        await response.write_eof()
        return response

    app = web.Application(client_max_size=4 * 1024 * 1024)
    app.add_routes(
        [web.get("/hello", hello), web.post("/digest", digest), web.get("/chunks", chunks)]
    )
    return app


async def test_aiohttp_server_on_edge_reached_by_aiohttp_client_on_relay() -> None:
    runner = web.AppRunner(_app(), handle_signals=False)
    await runner.setup()
    assert runner.server is not None
    # session_pair: (client = the side that dialled = the edge, server = the relay)
    async with session_pair() as (edge, relay), asyncio.timeout(LONG):
        handler = functools.partial(serve_protocol, protocol_factory=runner.server)
        serving = asyncio.create_task(edge.serve({"http": handler}))
        connector = ReverseConnector(relay, "http")
        async with aiohttp.ClientSession("http://edge.invalid", connector=connector) as http:
            async with http.get("/hello", params={"name": "ada"}) as response:
                assert response.status == 200
                text = await response.text()
            assert text == f"hello ada via http {edge.connection.remote_address}"
            body = bytes(range(256)) * 8192  # 2 MiB: flow control in both adapters
            async with http.post("/digest", data=io.BytesIO(body)) as response:
                assert await response.text() == f"{len(body)} {hashlib.sha256(body).hexdigest()}"
            async with http.get("/chunks", params={"n": "500"}) as response:
                lines = (await response.read()).splitlines()
            assert lines == [b"%d" % i for i in range(500)]
            # Concurrent requests: one reverse stream each (keep-alive reuses them after).
            results = await asyncio.gather(
                *(http.get("/hello", params={"name": str(i)}) for i in range(8))
            )
            for i, response in enumerate(results):
                assert (await response.text()).startswith(f"hello {i} via http")
                response.release()
            assert 1 <= connector.opened <= 9
        # Closing the client closed its streams: the edge's handlers all returned.
        for _ in range(200):
            if edge.active_streams == 0:
                break
            await asyncio.sleep(LONG / 2000)
        assert edge.active_streams == 0
        serving.cancel()
        await asyncio.gather(serving, return_exceptions=True)
    await runner.cleanup()


async def _echo_lines(stream: Stream) -> None:
    reader, writer = await stream_pair(stream, limit=1 << 20)
    assert isinstance(reader, asyncio.StreamReader) and isinstance(writer, asyncio.StreamWriter)
    assert writer.get_extra_info("service") == "echo"
    while line := await reader.readline():
        writer.write(line.upper())
        await writer.drain()
    writer.close()
    await writer.wait_closed()


async def test_stream_pair_is_asyncio_streams() -> None:
    async with session_pair() as (edge, relay), asyncio.timeout(LONG):
        serving = asyncio.create_task(edge.serve({"echo": _echo_lines}))
        reader, writer = await stream_pair(await relay.open("echo"))
        assert writer.get_extra_info("peername") == relay.connection.remote_address
        assert isinstance(writer.transport, StreamTransport)
        assert writer.can_write_eof()
        for word in (b"alpha\n", b"beta\n"):
            writer.write(word)
            await writer.drain()
            assert await reader.readline() == word.upper()
        writer.write(b"x" * 300_000 + b"\n")  # over the write buffer's high-water mark
        await writer.drain()
        assert await reader.readexactly(300_001) == b"X" * 300_000 + b"\n"
        writer.write_eof()
        assert await reader.read() == b""  # the echo side closed after our EOF
        assert reader.at_eof()
        writer.close()
        await writer.wait_closed()
        serving.cancel()
        await asyncio.gather(serving, return_exceptions=True)


async def test_peer_reset_reaches_protocol_as_connection_reset() -> None:
    lost: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()

    class Recorder(asyncio.Protocol):
        def connection_lost(self, exc: Exception | None) -> None:
            lost.set_result(exc)

    async with session_pair() as (edge, relay), asyncio.timeout(LONG):
        accepted: asyncio.Queue[Stream] = asyncio.Queue()

        async def handler(stream: Stream) -> None:
            await stream.send(b"hi")
            await accepted.put(stream)
            await asyncio.Event().wait()

        serving = asyncio.create_task(edge.serve({"svc": handler}))
        stream = await relay.open("svc")
        transport, _ = attach_protocol(stream, Recorder)
        (await accepted.get()).reset(5)
        error = await lost
        assert isinstance(error, ConnectionResetError)
        assert transport.is_closing()
        await transport.wait_closed()
        serving.cancel()
        await asyncio.gather(serving, return_exceptions=True)


async def test_abort_resets_and_buffered_protocol() -> None:
    received = bytearray()
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    class Buffered(asyncio.BufferedProtocol):
        def __init__(self) -> None:
            self._buf = bytearray(7)  # smaller than a chunk: several get_buffer calls

        def get_buffer(self, sizehint: int) -> bytearray:
            return self._buf

        def buffer_updated(self, nbytes: int) -> None:
            received.extend(self._buf[:nbytes])

        def eof_received(self) -> bool:
            done.set_result(None)
            return True  # keep the transport open to write back

    async with session_pair() as (edge, relay), asyncio.timeout(LONG):
        peer_saw: asyncio.Future[BaseException] = asyncio.get_running_loop().create_future()

        async def handler(stream: Stream) -> None:
            await stream.send(b"0123456789" * 10)
            await stream.write_eof()
            try:
                await stream.read()
            except ConnectionResetError as exc:
                peer_saw.set_result(exc)

        serving = asyncio.create_task(edge.serve({"svc": handler}))
        transport, _ = attach_protocol(await relay.open("svc"), Buffered)
        await done
        assert bytes(received) == b"0123456789" * 10
        transport.abort()
        assert isinstance(await peer_saw, ConnectionResetError)
        await transport.wait_closed()
        with pytest.raises(ValueError):
            transport.set_write_buffer_limits(high=1, low=2)
        serving.cancel()
        await asyncio.gather(serving, return_exceptions=True)

"""The TCP <-> stream pipe, tested with plain TCP on both legs (real sockets on 127.0.0.1).

The "stream" leg is a TCP connection wrapped in :class:`TcpStream`, which maps the
socket's behaviour onto the stream contract (EOF = FIN, RST = reset), so every pipe
property (throughput, half-close, resets both ways, backpressure) is checked with the
kernel's TCP, independent of the QUIC layers.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest

from quic_reverse.errors import StreamReset
from quic_reverse.tunnel.pipe import CHUNK_SIZE, PipeResult, abort_tcp, pipe
from quic_reverse.wire import CloseCode

from ._tcp import send_all_then_eof

WAIT = 20.0  # upper bound for every wait in this module


class TcpStream:
    """A TCP connection with the stream contract used by :func:`pipe`."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def read(self, n: int = -1) -> bytes:
        try:
            return await self.reader.read(n)
        except ConnectionResetError as exc:
            raise StreamReset(1) from exc

    async def send(self, data: bytes | bytearray | memoryview) -> None:
        self.writer.write(data)
        try:
            await self.writer.drain()
        except ConnectionResetError as exc:
            raise StreamReset(1) from exc

    async def write_eof(self) -> None:
        self.writer.write_eof()

    def reset(self, code: int = 0) -> None:
        abort_tcp(self.writer)

    async def aclose(self) -> None:
        self.writer.close()


@dataclass
class Harness:
    """Client -> [pipe server] -> service. ``results`` receives each PipeResult."""

    pipe_port: int
    results: asyncio.Queue[PipeResult] = field(default_factory=asyncio.Queue)


Service = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def harness(service: Service) -> AsyncIterator[Harness]:
    svc = await asyncio.start_server(service, "127.0.0.1", 0)
    svc_port = svc.sockets[0].getsockname()[1]
    h = Harness(pipe_port=0)
    tasks: set[asyncio.Task[None]] = set()

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        r2, w2 = await asyncio.open_connection("127.0.0.1", svc_port)
        await h.results.put(await pipe(reader, writer, TcpStream(r2, w2)))

    server = await asyncio.start_server(on_client, "127.0.0.1", 0)
    h.pipe_port = server.sockets[0].getsockname()[1]
    try:
        yield h
    finally:
        server.close()
        svc.close()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.write_eof()
    await writer.drain()
    writer.close()


async def test_large_transfer_both_ways_sha256() -> None:
    size = 8 * 1024 * 1024
    payload = os.urandom(size)
    async with harness(echo) as h:
        reader, writer = await asyncio.open_connection("127.0.0.1", h.pipe_port)

        async with asyncio.timeout(WAIT):
            sender = asyncio.create_task(send_all_then_eof(writer, payload))
            received = await reader.read()  # until EOF
            await sender
            result = await h.results.get()
        writer.close()
    assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()
    assert result.outcome == "closed"
    assert result.tcp_to_stream == size and result.stream_to_tcp == size


async def test_half_close_reply_after_client_shutdown() -> None:
    async def count_then_reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read()  # until the client's FIN arrives through the pipe
        writer.write(f"got {len(data)}".encode())
        await writer.drain()
        writer.close()

    async with harness(count_then_reply) as h:
        reader, writer = await asyncio.open_connection("127.0.0.1", h.pipe_port)
        async with asyncio.timeout(WAIT):
            writer.write(b"x" * 100_000)
            writer.write_eof()  # shutdown(SHUT_WR): we still want the reply
            reply = await reader.read()
            result = await h.results.get()
        writer.close()
    assert reply == b"got 100000"
    assert result.outcome == "closed"


async def test_stream_reset_aborts_tcp_client() -> None:
    async def reset_after_hello(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(5)
        abort_tcp(writer)  # RST on the "stream" leg

    async with harness(reset_after_hello) as h:
        reader, writer = await asyncio.open_connection("127.0.0.1", h.pipe_port)
        async with asyncio.timeout(WAIT):
            writer.write(b"hello")
            with pytest.raises(ConnectionResetError):
                await reader.read()
            result = await h.results.get()
        writer.close()
    assert result.outcome == "stream reset"


async def test_tcp_reset_resets_stream() -> None:
    seen: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def watch(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while await reader.read(65536):
                pass
            seen.set_result("eof")
        except ConnectionResetError:
            seen.set_result("reset")

    async with harness(watch) as h:
        _reader, writer = await asyncio.open_connection("127.0.0.1", h.pipe_port)
        async with asyncio.timeout(WAIT):
            writer.write(b"some bytes")
            await writer.drain()
            abort_tcp(writer)  # the TCP client dies with RST
            assert await seen == "reset"  # the other leg saw a reset, not a clean EOF
            result = await h.results.get()
    assert result.outcome == "tcp reset"


class RecordingStream:
    """An in-process stream that keeps a copy of everything sent (nothing to read)."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.eof = False
        self.closed = False

    async def read(self, n: int = -1) -> bytes:
        return b""

    async def send(self, data: bytes | bytearray | memoryview) -> None:
        self.data += data  # copy: the pipe reuses the buffer behind ``data``

    async def write_eof(self) -> None:
        self.eof = True

    def reset(self, code: int = 0) -> None:
        self.closed = True

    async def aclose(self) -> None:
        self.closed = True


async def test_bytes_already_read_by_stream_reader_are_forwarded() -> None:
    """Bytes (and EOF) the StreamReader received before :func:`pipe` took over the
    socket (a client talking before the tunnel stream is open) are not lost."""
    payload = os.urandom(40_000)
    with (
        socket.create_server(("127.0.0.1", 0)) as listener,
        socket.create_connection(listener.getsockname(), timeout=WAIT) as client,
    ):
        client.sendall(payload)  # all queued on the server socket before accept
        client.shutdown(socket.SHUT_WR)
        conn, _ = listener.accept()
        conn.setblocking(False)
        reader, writer = await asyncio.open_connection(sock=conn)
        stream = RecordingStream()
        async with asyncio.timeout(WAIT):
            # One recv took everything: the rest now sits in the reader's buffer.
            assert await reader.readexactly(5) == payload[:5]
            result = await pipe(reader, writer, stream)
        client.settimeout(WAIT)
        assert client.recv(1) == b""  # the (empty) reply direction ended with FIN
    assert bytes(stream.data) == payload[5:]
    assert stream.eof and stream.closed
    assert result.outcome == "closed"
    assert result.tcp_to_stream == len(payload) - 5


async def test_tcp_reset_before_pipe_starts_resets_stream() -> None:
    """A TCP client that died with RST before :func:`pipe` took over: the stream is
    reset at once (no wait for bytes that will never come)."""
    with (
        socket.create_server(("127.0.0.1", 0)) as listener,
        socket.create_connection(listener.getsockname(), timeout=WAIT) as client,
    ):
        conn, _ = listener.accept()
        conn.setblocking(False)
        reader, writer = await asyncio.open_connection(sock=conn)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()  # RST
        stream = RecordingStream()
        async with asyncio.timeout(WAIT):
            with pytest.raises(ConnectionResetError):
                await reader.read(1)
            result = await pipe(reader, writer, stream)
    assert result.outcome == "tcp reset"
    assert stream.closed and not stream.eof and not stream.data


@pytest.mark.parametrize("chunk_size", [4096, CHUNK_SIZE])
async def test_reused_buffers_do_not_corrupt_data(chunk_size: int) -> None:
    """Many chunks through the two reusable (and growing) buffers arrive intact and in
    order."""
    stream = RecordingStream()
    done: asyncio.Future[PipeResult] = asyncio.get_running_loop().create_future()

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        done.set_result(await pipe(reader, writer, stream, chunk_size=chunk_size))

    server = await asyncio.start_server(on_client, "127.0.0.1", 0)
    payload = os.urandom(3 * 1024 * 1024 + 17)
    try:
        _reader, writer = await asyncio.open_connection(
            "127.0.0.1", server.sockets[0].getsockname()[1]
        )
        async with asyncio.timeout(WAIT):
            await send_all_then_eof(writer, payload)
            result = await done
        writer.close()
    finally:
        server.close()
    assert hashlib.sha256(stream.data).digest() == hashlib.sha256(payload).digest()
    assert result.tcp_to_stream == len(payload)


class GatedStream:
    """An in-process stream whose ``send`` blocks until opened (a slow consumer)."""

    def __init__(self) -> None:
        self.written = 0
        self.blocked = asyncio.Event()
        self.gate = asyncio.Event()
        self.eof = asyncio.Event()
        self.closed = False

    async def read(self, n: int = -1) -> bytes:
        await self.eof.wait()
        return b""

    async def send(self, data: bytes | bytearray | memoryview) -> None:
        self.written += len(data)
        if not self.gate.is_set():
            self.blocked.set()
            await self.gate.wait()

    async def write_eof(self) -> None:
        self.eof.set()

    def reset(self, code: int = 0) -> None:
        self.closed = True

    async def aclose(self) -> None:
        self.closed = True


async def test_backpressure_slow_stream_stops_reading_tcp() -> None:
    """While the stream does not drain, the pipe holds at most one chunk and stops
    reading TCP, so the TCP sender's own buffer fills up instead of our memory."""
    stream = GatedStream()
    done: asyncio.Future[PipeResult] = asyncio.get_running_loop().create_future()

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        done.set_result(await pipe(reader, writer, stream))

    server = await asyncio.start_server(on_client, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    total = 32 * 1024 * 1024
    try:
        _reader, writer = await asyncio.open_connection("127.0.0.1", port)
        async with asyncio.timeout(WAIT):
            writer.write(b"\0" * total)  # queued in the client's transport
            await stream.blocked.wait()
            assert stream.written <= CHUNK_SIZE  # one chunk, then blocked in send
            # The unread rest stays in kernel and client buffers, not in the pipe.
            assert writer.transport.get_write_buffer_size() > 0
            stream.gate.set()
            await writer.drain()
            writer.write_eof()
            result = await done
        writer.close()
    finally:
        server.close()
    assert stream.written == total == result.tcp_to_stream


async def test_cancel_while_closing_resets_stream_and_aborts_tcp(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Both directions ended cleanly, then the pipe is cancelled while the TCP leg is
    still closing: the stream must be reset, not left open."""
    import quic_reverse.tunnel.pipe as pipe_module

    closing = asyncio.Event()

    async def stuck_close(writer: asyncio.StreamWriter) -> None:
        closing.set()  # like a TCP peer that never reads what is left
        await asyncio.Event().wait()

    monkeypatch.setattr(pipe_module, "_close_tcp", stuck_close)
    resets: list[int] = []

    class EmptyStream:
        async def read(self, n: int = -1) -> bytes:
            return b""

        async def send(self, data: bytes | bytearray | memoryview) -> None:
            raise AssertionError("nothing to send")

        async def write_eof(self) -> None:
            pass

        def reset(self, code: int = 0) -> None:
            resets.append(code)

        async def aclose(self) -> None:
            raise AssertionError("aclose is not reached while TCP is closing")

    accepted: asyncio.Queue[asyncio.StreamWriter] = asyncio.Queue()
    tasks: list[asyncio.Task[PipeResult]] = []

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        tasks.append(asyncio.create_task(pipe(reader, writer, EmptyStream())))
        await accepted.put(writer)

    server = await asyncio.start_server(on_client, "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        client_reader, client_writer = await asyncio.open_connection("127.0.0.1", port)
        client_writer.write_eof()
        async with asyncio.timeout(WAIT):
            pipe_writer = await accepted.get()
            await closing.wait()
            (task,) = tasks
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            try:  # the pipe's side went away (an RST may surface as an error)
                leftover = await client_reader.read()
            except ConnectionResetError:
                leftover = b""
            assert leftover == b""
        assert resets == [int(CloseCode.RESET)]
        assert pipe_writer.transport.is_closing()
        client_writer.close()
    finally:
        server.close()

"""The TCP <-> stream pipe, tested with plain TCP on both legs (real sockets on 127.0.0.1).

The TCP leg is a :class:`TcpLeg` accepted by a real listener; the "stream" leg is a
TCP connection wrapped in :class:`TcpStream`, which maps the socket's behaviour onto
the stream contract (EOF = FIN, RST = reset), so every pipe property (throughput,
half-close, resets both ways, backpressure, cleanup on cancellation) is checked with
the kernel's TCP, independent of the QUIC layers.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest

from quic_reverse.errors import StreamReset
from quic_reverse.tunnel import pipe as pipe_module
from quic_reverse.tunnel.pipe import CHUNK_SIZE, PipeResult, TcpLeg, abort_tcp, pipe
from quic_reverse.wire import CloseCode

from ..support.timing import LONG, MS, SHORT, eventually
from ._tcp import send_all_then_eof

WAIT = 2 * LONG  # upper bound for every wait in this module


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


@contextlib.asynccontextmanager
async def leg_server(
    chunk_size: int = CHUNK_SIZE,
) -> AsyncIterator[tuple[int, asyncio.Queue[TcpLeg]]]:
    """A TCP listener whose connections arrive as :class:`TcpLeg` on the queue."""
    legs: asyncio.Queue[TcpLeg] = asyncio.Queue()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: TcpLeg(linger=WAIT, chunk_size=chunk_size, on_connected=legs.put_nowait),
        "127.0.0.1",
        0,
    )
    try:
        yield server.sockets[0].getsockname()[1], legs
    finally:
        server.close()
        while not legs.empty():
            legs.get_nowait().abort()


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
    tasks: set[asyncio.Task[None]] = set()

    async with leg_server() as (port, legs):
        h = Harness(pipe_port=port)

        async def run(leg: TcpLeg) -> None:
            r2, w2 = await asyncio.open_connection("127.0.0.1", svc_port)
            await h.results.put(await pipe(leg, TcpStream(r2, w2)))

        async def accept() -> None:
            while True:
                leg = await legs.get()
                tasks.add(asyncio.create_task(run(leg)))

        acceptor = asyncio.create_task(accept())
        try:
            yield h
        finally:
            acceptor.cancel()
            svc.close()
            for t in tasks:
                t.cancel()
            await asyncio.gather(acceptor, *tasks, return_exceptions=True)


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


async def test_bytes_received_before_the_pipe_starts_are_forwarded() -> None:
    """Bytes (and EOF) a client sent before the tunnel stream was open (an SSH banner
    while the relay waits for the edge) are held by the leg (reading pauses once one
    buffer is full) and forwarded when the pipe starts."""
    payload = os.urandom(40_000)
    async with leg_server() as (port, legs):
        with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as client:
            client.sendall(payload)
            client.shutdown(socket.SHUT_WR)
            stream = RecordingStream()
            async with asyncio.timeout(WAIT):
                leg = await legs.get()
                result = await pipe(leg, stream)
            client.settimeout(WAIT)
            assert client.recv(1) == b""  # the (empty) reply direction ended with FIN
    assert bytes(stream.data) == payload
    assert stream.eof and stream.closed
    assert result.outcome == "closed"
    assert result.tcp_to_stream == len(payload)


async def test_tcp_reset_before_pipe_starts_resets_stream() -> None:
    """A TCP client that died with RST before :func:`pipe` started: the stream is
    reset at once (no wait for bytes that will never come)."""
    async with leg_server() as (port, legs):
        with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as client:
            async with asyncio.timeout(WAIT):
                leg = await legs.get()
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                client.close()  # RST
                await leg.closed
                stream = RecordingStream()
                result = await pipe(leg, stream)
    assert result.outcome == "tcp reset"
    assert stream.closed and not stream.eof and not stream.data


@pytest.mark.parametrize("chunk_size", [4096, CHUNK_SIZE])
async def test_reused_buffers_do_not_corrupt_data(chunk_size: int) -> None:
    """Many chunks through the two reusable (and growing) buffers arrive intact and in
    order."""
    stream = RecordingStream()
    payload = os.urandom(3 * 1024 * 1024 + 17)
    async with leg_server(chunk_size) as (port, legs):
        _reader, writer = await asyncio.open_connection("127.0.0.1", port)
        async with asyncio.timeout(WAIT):
            leg = await legs.get()
            done = asyncio.create_task(pipe(leg, stream))
            await send_all_then_eof(writer, payload)
            result = await done
        writer.close()
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
    """While the stream does not drain, the pipe holds at most two buffers and stops
    reading TCP, so the TCP sender's own buffer fills up instead of our memory."""
    stream = GatedStream()
    total = 32 * 1024 * 1024
    async with leg_server() as (port, legs):
        _reader, writer = await asyncio.open_connection("127.0.0.1", port)
        async with asyncio.timeout(WAIT):
            leg = await legs.get()
            done = asyncio.create_task(pipe(leg, stream))
            writer.write(b"\0" * total)  # queued in the client's transport
            await stream.blocked.wait()
            assert stream.written <= CHUNK_SIZE  # one chunk, then blocked in send
            assert leg.buffered <= CHUNK_SIZE  # at most one more buffer, then paused
            # The unread rest stays in kernel and client buffers, not in the pipe.
            assert writer.transport.get_write_buffer_size() > 0
            stream.gate.set()
            await writer.drain()
            writer.write_eof()
            result = await done
        writer.close()
    assert stream.written == total == result.tcp_to_stream


async def test_idle_leg_holds_no_buffer(monkeypatch: pytest.MonkeyPatch) -> None:
    """After a burst the leg keeps its receive buffers for a moment (a busy consumer
    that caught up with the socket must not reallocate them per read), then releases
    them while it waits for more."""
    monkeypatch.setattr(pipe_module, "IDLE_RELEASE", 50 * MS)
    stream = RecordingStream()
    async with leg_server() as (port, legs):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        async with asyncio.timeout(WAIT):
            leg = await legs.get()
            send_done = asyncio.Event()

            class Tracking(RecordingStream):
                async def send(self, data: bytes | bytearray | memoryview) -> None:
                    await super().send(data)
                    send_done.set()

                async def read(self, n: int = -1) -> bytes:
                    await asyncio.Event().wait()
                    return b""

            stream = Tracking()
            task = asyncio.create_task(pipe(leg, stream))
            writer.write(b"z" * 100_000)
            while len(stream.data) < 100_000:
                send_done.clear()
                await send_done.wait()
            for _ in range(100):  # a few loop turns: the reader goes back to waiting
                if leg._waiter is not None:
                    break
                await asyncio.sleep(0)
            assert leg._waiter is not None
            assert leg._fill is not None or leg._spare is not None
            await eventually(
                lambda: leg._fill is None and leg._spare is None,
                within=50 * MS + SHORT,
                what="receive buffers released after IDLE_RELEASE",
            )
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        writer.close()
        del reader


async def test_cancel_while_closing_resets_stream_and_aborts_tcp() -> None:
    """Both directions ended cleanly, then the pipe is cancelled while the stream is
    still closing: the stream must be reset and the TCP leg aborted."""
    resets: list[int] = []
    closing = asyncio.Event()

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
            closing.set()  # like a stream waiting for credit to send its FIN
            await asyncio.Event().wait()

    async with leg_server() as (port, legs):
        client_reader, client_writer = await asyncio.open_connection("127.0.0.1", port)
        client_writer.write_eof()
        async with asyncio.timeout(WAIT):
            leg = await legs.get()
            task = asyncio.create_task(pipe(leg, EmptyStream()))
            await closing.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            try:  # the pipe's side went away (an RST may surface as an error)
                leftover = await client_reader.read()
            except ConnectionResetError:
                leftover = b""
            assert leftover == b""
            await leg.closed
        assert resets == [int(CloseCode.RESET)]
        client_writer.close()


class FailingStream:
    """A stream whose read fails (peer reset) on demand while its send is blocked; a
    cancelled send takes a few loop turns to unwind (like a real stream's cleanup)."""

    def __init__(self) -> None:
        self.fail = asyncio.Event()
        self.failed = asyncio.Event()
        self.sending = asyncio.Event()
        self.resets: list[int] = []

    async def read(self, n: int = -1) -> bytes:
        await self.fail.wait()
        self.failed.set()
        raise StreamReset(int(CloseCode.RESET))

    async def send(self, data: bytes | bytearray | memoryview) -> None:
        self.sending.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            for _ in range(3):
                await asyncio.sleep(0)
            raise

    async def write_eof(self) -> None:
        pass

    def reset(self, code: int = 0) -> None:
        self.resets.append(code)

    async def aclose(self) -> None:
        pass


@pytest.mark.parametrize("turns", range(6))
async def test_cancel_after_stream_failure_closes_tcp(turns: int) -> None:
    """Issue 10 item 1: the pipe is cancelled ``turns`` loop iterations after its stream
    leg failed (the edge cancelling forwards of a lost session): whatever point it is
    at, the TCP peer sees its connection closed and the stream is reset."""
    stream = FailingStream()
    async with leg_server() as (port, legs):
        client_reader, client_writer = await asyncio.open_connection("127.0.0.1", port)
        async with asyncio.timeout(WAIT):
            leg = await legs.get()
            task = asyncio.create_task(pipe(leg, stream))
            client_writer.write(b"x" * 1000)
            await stream.sending.wait()
            stream.fail.set()
            await stream.failed.wait()
            for _ in range(turns):
                await asyncio.sleep(0)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            try:
                leftover = await client_reader.read()
            except ConnectionResetError:
                leftover = b""
            await leg.closed
        assert leftover == b""
        assert stream.resets, "the stream leg was not reset"
        client_writer.close()


async def test_both_directions_failing_logs_no_error(caplog: pytest.LogCaptureFixture) -> None:
    """A peer's STOP_SENDING (send fails) together with its reset (read fails) is an
    ordinary "stream reset" outcome: nothing at ERROR, no "exception never retrieved"."""
    import gc

    from quic_reverse.errors import StreamStopped

    class Stopped:
        async def read(self, n: int = -1) -> bytes:
            raise StreamReset(int(CloseCode.RESET))

        async def send(self, data: bytes | bytearray | memoryview) -> None:
            raise StreamStopped(int(CloseCode.RESET))

        async def write_eof(self) -> None:
            raise StreamStopped(int(CloseCode.RESET))

        def reset(self, code: int = 0) -> None:
            pass

        async def aclose(self) -> None:
            pass

    caplog.set_level(logging.DEBUG)
    async with leg_server() as (port, legs):
        _reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"data")
        async with asyncio.timeout(WAIT):
            leg = await legs.get()
            await asyncio.sleep(0)
            result = await pipe(leg, Stopped())
        writer.close()
    gc.collect()
    assert result.outcome == "stream reset"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text

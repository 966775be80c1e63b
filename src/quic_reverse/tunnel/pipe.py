"""Bidirectional forwarding between one TCP connection and one tunnel stream.

Written against a small structural protocol (:class:`TunnelStream`: ``read(n)``,
``write``/``drain``, ``write_eof``, ``reset``, ``close``) so it works with a session
:class:`~quic_reverse.Stream` and can be tested with plain TCP on both legs.

What it guarantees:

* **Backpressure** both ways: each direction awaits the sink (``drain``) before it
  reads more from the source, so at most one chunk per direction is held here and a
  slow reader slows the sender end to end.
* **Half-close** both ways: TCP EOF -> ``stream.write_eof()`` (FIN); stream EOF ->
  ``shutdown(SHUT_WR)`` on the TCP socket; the other direction keeps flowing.
* **Resets** both ways: a TCP error/RST resets the stream; a stream reset (or a dead
  session) aborts the TCP connection with RST (``SO_LINGER`` 0), so the TCP peer
  sees a failure instead of a clean EOF.
* ``TCP_NODELAY`` on the TCP leg; large reads (256 KiB); byte counters in the result.
* **One copy** on the TCP -> stream path: the TCP transport is switched to a
  :class:`asyncio.BufferedProtocol` (:class:`_TcpSource`) that receives into one of
  two reusable buffers, and a view of that buffer goes straight to ``stream.send``
  (which copies into the QUIC send queue before returning). The ``StreamReader`` path
  copied every byte twice more (into its buffer, then out of it). Memory stays bounded
  at two chunks: reading pauses while the spare buffer is full.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
from dataclasses import dataclass
from typing import Protocol

from ..errors import QuicReverseError
from ..wire import CloseCode

__all__ = [
    "CHUNK_SIZE",
    "PipeResult",
    "TunnelStream",
    "abort_tcp",
    "pipe",
    "tune_tcp",
]

log = logging.getLogger("quic_reverse.tunnel.pipe")

#: Read size on both legs: large enough to amortise per-call overhead.
CHUNK_SIZE = 256 * 1024
#: First size of the two TCP receive buffers; each doubles (up to the chunk size)
#: whenever a read fills it, so idle connections stay small and bulk ones get big reads.
FIRST_BUFFER_SIZE = 16 * 1024
#: asyncio StreamReader limit used for TCP legs (it buffers up to 2x this before pausing).
TCP_READ_LIMIT = 256 * 1024
#: Application code carried by a stream reset caused by the TCP side (CloseCode.RESET).
RESET_CODE = int(CloseCode.RESET)
#: How long a clean TCP close may take before the socket is aborted.
CLOSE_TIMEOUT = 5.0


class TunnelStream(Protocol):
    """What :func:`pipe` needs from a stream (a subset of :class:`quic_reverse.Stream`).

    ``send`` (write + wait for send budget, no intermediate buffer) is used rather than
    ``write``/``drain`` so each chunk goes to the transport without an extra copy.
    """

    async def read(self, n: int = -1) -> bytes: ...

    async def send(self, data: bytes | bytearray | memoryview) -> None:
        """Write all of ``data``; ``data`` must not be used after this returns
        (the pipe reuses the buffer behind it)."""

    async def write_eof(self) -> None: ...

    def reset(self, code: int = ...) -> None: ...

    async def aclose(self) -> None: ...


@dataclass
class PipeResult:
    """What happened on one forwarded connection (for the close log line)."""

    #: Bytes read from TCP and written to the stream.
    tcp_to_stream: int = 0
    #: Bytes read from the stream and written to TCP.
    stream_to_tcp: int = 0
    #: "closed" (both directions finished with FIN), "tcp reset", "stream reset",
    #: "cancelled" or "error".
    outcome: str = "closed"
    #: Human-readable cause when the outcome is not "closed".
    detail: str = ""


class _TcpFailed(Exception):
    """The TCP leg failed (RST, broken pipe): the stream must be reset."""


class _StreamFailed(Exception):
    """The stream leg failed (peer reset, session gone): TCP must be aborted."""


class _TcpSource(asyncio.BufferedProtocol):
    """Takes over reading of a TCP transport that was set up with a ``StreamReader``.

    Received bytes land directly in one of two buffers (``FIRST_BUFFER_SIZE``,
    doubling up to ``chunk_size`` each time a read fills one); :meth:`take`
    hands the filled one to the consumer (as a view) and reading goes on into the
    other; :meth:`give_back` returns it. When the buffer being filled is full and the
    consumer still holds the other, transport reading is paused (backpressure: the
    rest stays in the kernel and the TCP peer's buffers). Write flow control and
    ``connection_lost`` are forwarded to the original protocol, so the
    ``StreamWriter`` (``drain``, ``wait_closed``) keeps working.
    """

    def __init__(
        self,
        reader: asyncio.StreamReader,
        transport: asyncio.Transport,
        inner: asyncio.BaseProtocol,
        chunk_size: int,
    ) -> None:
        self._transport = transport
        self._inner = inner
        self._chunk_size = chunk_size
        first = min(FIRST_BUFFER_SIZE, chunk_size)
        self._fill = bytearray(first)
        self._spare: bytearray | None = bytearray(first)
        self._filled = 0
        self._paused = False
        self._eof = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        # Whatever the StreamReader already received (an SSH banner sent before the
        # tunnel stream was open, even EOF or an error) is taken over first. asyncio
        # offers no public way to read this without waiting, hence the private names.
        pending: bytearray = getattr(reader, "_buffer", bytearray())
        self._pending = bytes(pending)
        pending.clear()
        # A transport already closing reads nothing more (its connection_lost went to
        # the StreamReader's protocol), so that counts as EOF too.
        self._eof = bool(getattr(reader, "_eof", False)) or transport.is_closing()
        self._error = reader.exception()
        transport.set_protocol(self)
        if not self._eof and self._error is None and not transport.is_reading():
            transport.resume_reading()  # the StreamReader may have paused it

    # ------------------------------------------------------------ protocol side

    def get_buffer(self, sizehint: int) -> memoryview:
        return memoryview(self._fill)[self._filled :]

    def buffer_updated(self, nbytes: int) -> None:
        self._filled += nbytes
        if self._filled == len(self._fill) and not self._paused:
            self._paused = True
            self._transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self._eof = True
        self._wake()
        return True  # keep the transport open: the other direction may still write

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None and self._error is None:
            self._error = exc
        self._eof = True
        self._wake()
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    # ------------------------------------------------------------ consumer side

    async def take(self) -> memoryview | bytes:
        """Next received bytes; empty at EOF. Raises the TCP error (``OSError``).

        The view stays valid until :meth:`give_back`; call that before the next take.
        """
        if self._pending:
            data, self._pending = self._pending, b""
            return data
        while not self._filled:
            if self._error is not None:
                raise self._error
            if self._eof:
                return b""
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        if self._error is not None:
            raise self._error
        assert self._spare is not None, "take() called twice without give_back()"
        full, n = self._fill, self._filled
        self._fill, self._spare, self._filled = self._spare, None, 0
        if self._paused:
            self._paused = False
            self._transport.resume_reading()
        return memoryview(full)[:n]

    def give_back(self, data: memoryview | bytes) -> None:
        """Return the buffer behind a view from :meth:`take` for reuse."""
        if isinstance(data, memoryview):
            buf = data.obj
            filled = len(data)
            data.release()
            assert isinstance(buf, bytearray)
            if filled == len(buf) < self._chunk_size:  # it ran full: read more per call
                buf = bytearray(min(2 * len(buf), self._chunk_size))
            self._spare = buf


def tune_tcp(writer: asyncio.StreamWriter) -> None:
    """Set ``TCP_NODELAY`` on the writer's socket (interactive protocols like SSH need it)."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def abort_tcp(writer: asyncio.StreamWriter) -> None:
    """Drop the TCP connection with RST so the peer sees an error, not a clean EOF."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def _close_tcp(writer: asyncio.StreamWriter) -> None:
    writer.close()
    try:
        async with asyncio.timeout(CLOSE_TIMEOUT):
            await writer.wait_closed()
    except (OSError, TimeoutError):
        writer.transport.abort()


def _reset_stream(stream: TunnelStream, code: int) -> None:
    with contextlib.suppress(QuicReverseError, OSError):
        stream.reset(code)


async def _close_stream(stream: TunnelStream) -> None:
    try:
        async with asyncio.timeout(CLOSE_TIMEOUT):
            await stream.aclose()
    except (QuicReverseError, OSError, TimeoutError):
        _reset_stream(stream, RESET_CODE)  # make sure nothing stays open


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


async def pipe(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    stream: TunnelStream,
    *,
    chunk_size: int = CHUNK_SIZE,
) -> PipeResult:
    """Forward bytes both ways until both directions end; returns the counters.

    Never raises for I/O problems (they become the result's ``outcome``); cancellation
    aborts both legs (TCP RST, stream reset) and is re-raised. Both legs are closed on
    return.
    """
    result = PipeResult()
    tune_tcp(writer)

    transport = writer.transport
    assert isinstance(transport, asyncio.Transport)
    source = _TcpSource(reader, transport, transport.get_protocol(), chunk_size)

    async def tcp_to_stream() -> None:
        while True:
            try:
                data = await source.take()
            except OSError as exc:
                raise _TcpFailed(_describe(exc)) from exc
            size = len(data)
            try:
                if not size:
                    await stream.write_eof()
                    return
                await stream.send(data)
            except QuicReverseError as exc:
                raise _StreamFailed(_describe(exc)) from exc
            source.give_back(data)
            result.tcp_to_stream += size

    async def stream_to_tcp() -> None:
        while True:
            try:
                data = await stream.read(chunk_size)
            except QuicReverseError as exc:
                raise _StreamFailed(_describe(exc)) from exc
            try:
                if not data:
                    if writer.can_write_eof():
                        writer.write_eof()
                    return
                writer.write(data)
                await writer.drain()
            except OSError as exc:
                raise _TcpFailed(_describe(exc)) from exc
            result.stream_to_tcp += len(data)

    up = asyncio.create_task(tcp_to_stream(), name="pipe tcp->stream")
    down = asyncio.create_task(stream_to_tcp(), name="pipe stream->tcp")
    tasks = {up, down}
    try:
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    except asyncio.CancelledError:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        result.outcome, result.detail = "cancelled", "forwarding cancelled"
        abort_tcp(writer)
        _reset_stream(stream, RESET_CODE)
        raise
    for t in pending:
        t.cancel()
    await asyncio.gather(*pending, return_exceptions=True)

    failure: BaseException | None = None
    for t in (up, down):
        if t in done and not t.cancelled() and t.exception() is not None:
            failure = t.exception()
            break
    if failure is None:
        try:
            await _close_tcp(writer)
            await _close_stream(stream)
        except asyncio.CancelledError:
            # Cancelled while a leg was still closing (a TCP peer not reading what is
            # left, a stream waiting for credit): neither leg may stay half-open.
            result.outcome, result.detail = "cancelled", "cancelled while closing"
            abort_tcp(writer)
            _reset_stream(stream, RESET_CODE)
            raise
    elif isinstance(failure, _TcpFailed):
        result.outcome, result.detail = "tcp reset", str(failure)
        _reset_stream(stream, RESET_CODE)
        abort_tcp(writer)
    elif isinstance(failure, _StreamFailed):
        result.outcome, result.detail = "stream reset", str(failure)
        abort_tcp(writer)
        _reset_stream(stream, RESET_CODE)
    else:
        log.error("forwarding failed unexpectedly", exc_info=failure)
        result.outcome, result.detail = "error", _describe(failure)
        abort_tcp(writer)
        _reset_stream(stream, RESET_CODE)
    return result

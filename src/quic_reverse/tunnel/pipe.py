"""Bidirectional forwarding between one TCP connection and one tunnel stream.

The TCP side is a :class:`TcpLeg`: an :class:`asyncio.BufferedProtocol` that owns its
connection from the moment it is accepted (relay: ``loop.create_server``) or connected
(edge: ``loop.create_connection``), so nothing is read through a ``StreamReader`` first
and no protocol is swapped half-way. The stream side is anything with the small
structural protocol :class:`TunnelStream` (``read(n)``, ``send``, ``write_eof``,
``reset``, ``aclose``): a session :class:`~quic_reverse.Stream`, or plain TCP in tests.

What :func:`pipe` guarantees:

* **Backpressure** both ways: each direction awaits the sink before it reads more, so
  at most one chunk per direction is held here and a slow reader slows the sender
  end to end.
* **Half-close** both ways: TCP EOF -> ``stream.write_eof()`` (FIN); stream EOF ->
  ``shutdown(SHUT_WR)`` on the TCP socket; the other direction keeps flowing.
* **Resets** both ways: a TCP error/RST resets the stream; a stream reset (or a dead
  session) aborts the TCP connection with RST (``SO_LINGER`` 0).
* **Both legs are closed on every exit**: normal end, failure of either leg, and
  cancellation at any await point (the TCP leg is aborted and the stream reset before
  anything else is awaited).
* **One copy** on the TCP -> stream path: the kernel writes into the leg's buffer and
  a view of it goes straight to ``stream.send`` (which copies into the QUIC send
  queue before returning).
* **Small when idle**: receive buffers are allocated when bytes arrive (16 KiB first,
  doubling up to the chunk size while reads fill them) and released once the consumer
  has waited :data:`IDLE_RELEASE` seconds for more, so an idle leg holds no buffer at
  all, while a busy one (whose consumer often catches up with the socket for a moment)
  does not allocate, zero and free a chunk-sized buffer per read.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from ..errors import QuicReverseError
from ..wire import CloseCode

__all__ = [
    "CHUNK_SIZE",
    "PipeResult",
    "TcpLeg",
    "TunnelStream",
    "abort_tcp",
    "pipe",
    "tune_tcp",
]

log = logging.getLogger("quic_reverse.tunnel.pipe")

#: Largest read on both legs: large enough to amortise per-call overhead.
CHUNK_SIZE = 256 * 1024
#: Size of a TCP receive buffer when bytes arrive on an idle leg; it doubles (up to the
#: chunk size) whenever a read fills it, so bulk transfers get big reads.
FIRST_BUFFER_SIZE = 16 * 1024
#: Seconds the consumer of a leg waits for bytes before its receive buffers are freed.
IDLE_RELEASE = 0.5
#: asyncio StreamReader limit for TCP connections made with asyncio streams (kept for
#: callers of the old interface; the tunnel itself uses :class:`TcpLeg`).
TCP_READ_LIMIT = 256 * 1024
#: Application code carried by a stream reset caused by the TCP side (CloseCode.RESET).
RESET_CODE = int(CloseCode.RESET)


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


def tune_tcp(writer: asyncio.StreamWriter | asyncio.BaseTransport) -> None:
    """Set ``TCP_NODELAY`` on the socket (interactive protocols like SSH need it)."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def abort_tcp(writer: asyncio.StreamWriter | asyncio.BaseTransport) -> None:
    """Drop the TCP connection with RST so the peer sees an error, not a clean EOF."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport = writer.transport if isinstance(writer, asyncio.StreamWriter) else writer
    assert isinstance(transport, asyncio.WriteTransport)
    transport.abort()


class TcpLeg(asyncio.BufferedProtocol):
    """One TCP connection of the tunnel, owned from accept/connect.

    Receiving: bytes land directly in one of two buffers; :meth:`take` hands the
    filled one to the consumer (as a view) and reading goes on into the other;
    :meth:`give_back` returns it. When the buffer being filled is full and the
    consumer still holds the other, reading is paused (the rest stays in the kernel
    and the TCP peer's buffers). Before the consumer starts (the relay waiting for the
    edge's answer), at most one buffer is filled, then reading pauses.

    Sending: :meth:`write` + :meth:`drain` (the transport's flow control),
    :meth:`write_eof`. Ending: :meth:`close` (FIN after the queued bytes, aborted if
    still not done after ``linger`` seconds), :meth:`abort` (RST at once).
    ``on_connected`` is called once the connection exists (the relay starts its
    handler from there).
    """

    def __init__(
        self,
        *,
        linger: float,
        chunk_size: int = CHUNK_SIZE,
        on_connected: Callable[[TcpLeg], None] | None = None,
    ) -> None:
        self.linger = linger
        self.chunk_size = chunk_size
        self._on_connected = on_connected
        self.transport: asyncio.Transport | None = None
        #: "host:port" of the remote end and of our end ("?" until connected).
        self.peer: str = "?"
        self.local: str = "?"
        self._size = min(FIRST_BUFFER_SIZE, chunk_size)
        self._fill: bytearray | None = None
        self._filled = 0
        self._spare: bytearray | None = None
        self._held = False  # the consumer holds a buffer from take()
        self._paused = False
        self._eof = False
        self._error: BaseException | None = None
        self._lost = False
        self._waiter: asyncio.Future[None] | None = None
        self._release_timer: asyncio.TimerHandle | None = None
        self._drain_waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._write_paused = False
        self._linger_timer: asyncio.TimerHandle | None = None
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    # ------------------------------------------------------------ protocol side

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        tune_tcp(transport)
        peername = transport.get_extra_info("peername")
        if peername:
            self.peer = f"{peername[0]}:{peername[1]}"
        sockname = transport.get_extra_info("sockname")
        if sockname:
            self.local = f"{sockname[0]}:{sockname[1]}"
        if self._on_connected is not None:
            callback, self._on_connected = self._on_connected, None
            callback(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._fill is None:
            self._fill = self._spare if self._spare is not None else bytearray(self._size)
            self._spare = None
        return memoryview(self._fill)[self._filled :]

    def buffer_updated(self, nbytes: int) -> None:
        assert self._fill is not None
        self._filled += nbytes
        if self._filled == len(self._fill) and not self._paused:
            self._paused = True
            assert self.transport is not None
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self._eof = True
        self._wake()
        return True  # keep the transport open: the other direction may still write

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None and self._error is None:
            self._error = exc
        self._eof = self._lost = True
        if self._linger_timer is not None:
            self._linger_timer.cancel()
            self._linger_timer = None
        self._cancel_release()
        self._wake()
        while self._drain_waiters:
            fut = self._drain_waiters.popleft()
            if not fut.done():
                fut.set_result(None)
        if not self.closed.done():
            self.closed.set_result(None)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        while self._drain_waiters:
            fut = self._drain_waiters.popleft()
            if not fut.done():
                fut.set_result(None)

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    # ------------------------------------------------------------ receiving

    @property
    def buffered(self) -> int:
        """Bytes received and not yet taken."""
        return self._filled

    async def take(self) -> memoryview | bytes:
        """Next received bytes; empty at EOF. Raises the TCP error (``OSError``).

        The view stays valid until :meth:`give_back`; call that before the next take.
        """
        assert not self._held, "take() called twice without give_back()"
        while not self._filled:
            if self._error is not None:
                raise self._error
            if self._eof:
                return b""
            # Nothing to hand over: the buffers are released if the wait lasts (idle
            # legs hold none); the next bytes then get a fresh one of the current size.
            loop = asyncio.get_running_loop()
            if self._release_timer is None:
                self._release_timer = loop.call_later(IDLE_RELEASE, self._release_idle)
            self._waiter = loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        self._cancel_release()
        if self._error is not None:
            raise self._error
        full, n = self._fill, self._filled
        assert full is not None
        self._fill, self._filled, self._held = None, 0, True
        if self._paused:
            self._paused = False
            assert self.transport is not None
            if not self._lost:
                self.transport.resume_reading()
        return memoryview(full)[:n]

    def _release_idle(self) -> None:
        self._release_timer = None
        if not self._filled:
            self._fill = self._spare = None

    def _cancel_release(self) -> None:
        if self._release_timer is not None:
            self._release_timer.cancel()
            self._release_timer = None

    def give_back(self, data: memoryview | bytes) -> None:
        """Return the buffer behind a view from :meth:`take` for reuse."""
        self._held = False
        if isinstance(data, memoryview):
            buf = data.obj
            filled = len(data)
            data.release()
            assert isinstance(buf, bytearray)
            if filled == len(buf) and len(buf) < self.chunk_size:  # ran full: read more
                self._size = min(2 * len(buf), self.chunk_size)
                return  # the next buffer is allocated at the new size
            if self._fill is None:
                self._fill = buf
            else:
                self._spare = buf

    # ------------------------------------------------------------ sending / ending

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._lost:
            raise ConnectionResetError("connection lost")
        assert self.transport is not None
        self.transport.write(data)

    async def drain(self) -> None:
        """Wait while the transport's write buffer is above its high-water mark."""
        if self._error is not None and self._lost:
            raise ConnectionResetError(str(self._error) or "connection lost")
        if self._lost:
            raise ConnectionResetError("connection lost")
        if not self._write_paused:
            return
        fut = asyncio.get_running_loop().create_future()
        self._drain_waiters.append(fut)
        await fut
        if self._lost:
            raise ConnectionResetError(str(self._error or "connection lost"))

    def write_eof(self) -> None:
        """Half-close: ``shutdown(SHUT_WR)`` once the queued bytes are sent."""
        if self.transport is not None and not self._lost and self.transport.can_write_eof():
            self.transport.write_eof()

    def close(self) -> None:
        """FIN after the queued bytes; aborted (RST) if not done within ``linger`` s
        (a peer that does not read must not keep the socket forever)."""
        if self.transport is None or self._lost or self.transport.is_closing():
            return
        self.transport.close()
        loop = asyncio.get_running_loop()
        self._linger_timer = loop.call_later(self.linger, self.abort)

    def abort(self) -> None:
        """Drop the connection with RST now (idempotent)."""
        if self.transport is not None and not self._lost:
            abort_tcp(self.transport)

    def abort_unless_closing(self) -> None:
        """The owners' safety net on every exit: RST unless a close (FIN) is under way."""
        if self.transport is not None and not self.transport.is_closing():
            self.abort()


def _reset_stream(stream: TunnelStream, code: int) -> None:
    with contextlib.suppress(QuicReverseError, OSError):
        stream.reset(code)


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class _TcpFailed(Exception):
    """The TCP leg failed (RST, broken pipe): the stream must be reset."""


class _StreamFailed(Exception):
    """The stream leg failed (peer reset, session gone): TCP must be aborted."""


async def _tcp_to_stream(leg: TcpLeg, stream: TunnelStream, result: PipeResult) -> None:
    while True:
        try:
            data = await leg.take()
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
        leg.give_back(data)
        del data
        result.tcp_to_stream += size


async def _stream_to_tcp(leg: TcpLeg, stream: TunnelStream, result: PipeResult) -> None:
    while True:
        try:
            data = await stream.read(leg.chunk_size)
        except QuicReverseError as exc:
            raise _StreamFailed(_describe(exc)) from exc
        try:
            if not data:
                leg.write_eof()
                return
            leg.write(data)
            result.stream_to_tcp += len(data)
            # Not kept while waiting for the next read: an idle pipe holds no chunk.
            del data
            await leg.drain()
        except OSError as exc:
            raise _TcpFailed(_describe(exc)) from exc


async def pipe(leg: TcpLeg, stream: TunnelStream) -> PipeResult:
    """Forward bytes both ways until both directions end; returns the counters.

    Never raises for I/O problems (they become the result's ``outcome``). On every
    other exit (cancellation at any point, an unexpected error) the TCP leg is aborted
    and the stream reset before the exception propagates.
    """
    result = PipeResult()
    up = asyncio.create_task(_tcp_to_stream(leg, stream, result), name="pipe tcp->stream")
    down = asyncio.create_task(_stream_to_tcp(leg, stream, result), name="pipe stream->tcp")
    clean = False
    try:
        done, _ = await asyncio.wait((up, down), return_when=asyncio.FIRST_EXCEPTION)
        failure = next(
            (t.exception() for t in (up, down) if t in done and t.exception() is not None),
            None,
        )
        if failure is None:
            clean = True
            leg.close()
            await stream.aclose()  # both directions ended: FIN sent, EOF seen
        elif isinstance(failure, _TcpFailed):
            result.outcome, result.detail = "tcp reset", str(failure)
        elif isinstance(failure, _StreamFailed):
            result.outcome, result.detail = "stream reset", str(failure)
        else:
            log.error("forwarding failed unexpectedly", exc_info=failure)
            result.outcome, result.detail = "error", _describe(failure)
    except asyncio.CancelledError:
        result.outcome, result.detail = "cancelled", "forwarding cancelled"
        raise
    finally:
        # Both legs first (nothing awaited before them), then the directions' tasks.
        if not clean or result.outcome == "cancelled":
            leg.abort()
            _reset_stream(stream, RESET_CODE)
        for task in (up, down):
            task.cancel()
        await asyncio.gather(up, down, return_exceptions=True)
    return result

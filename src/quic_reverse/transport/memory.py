"""An in-process connection pair with QUIC stream semantics, for tests.

:func:`connection_pair` returns two :class:`MemoryConnection` objects (client,
server) wired to each other inside one event loop. They implement the transport
contract of :mod:`quic_reverse.transport.base` exactly like the QUIC adapters do,
so the session layer can be tested without sockets, and the same conformance
suite (``tests/transport/test_conformance.py``) runs over all transports:

* a stream opened with :meth:`MemoryConnection.open_bi` becomes visible to the
  peer's :meth:`~MemoryConnection.accept_bi` only once the opener writes data,
  FIN, or resets it (as in QUIC);
* each direction of a stream has a bounded receive buffer (``buffer_size``):
  ``write`` queues all its data at once (so a cancelled ``write`` was accepted in
  full, as the contract says), moves what fits into the peer's buffer and waits
  until the rest has moved too, as the reader makes room; a reader that never
  reads keeps memory bounded by ``buffer_size`` plus one pending write;
* FIN, RESET_STREAM (peer ``read`` raises :class:`~quic_reverse.errors.StreamReset`),
  STOP_SENDING (peer ``write`` raises :class:`~quic_reverse.errors.StreamStopped`);
* ``max_streams``: ``open_bi`` waits while the peer already holds that many of our
  streams that are not finished in both directions (QUIC's MAX_STREAMS);
* closing either side closes both: every pending ``read``/``write``/``open_bi``
  raises :class:`~quic_reverse.errors.ConnectionClosed` and ``accept_bi`` returns
  ``None``. Bytes already delivered stay readable; bytes still in flight (see
  ``delay``) are lost, as on a real network.

Datagrams: ``max_datagram_size`` (default 1200; ``None`` for a pair without
datagrams) bounds :meth:`MemoryConnection.send_datagram`; each datagram reaches the
peer's handler in a later event-loop step (after ``delay``), never lost.

Path statistics: :meth:`~quic_reverse.transport.base.Connection.path_stats` returns an
all-``None`` :class:`~quic_reverse.transport.base.PathStats`: there is no path, no
packet and no congestion control to report.

Two knobs exist only here, to shake out parser and timing assumptions:
``trickle=True`` makes every ``read`` return at most one byte, and ``delay > 0``
delivers each write (and FIN) that many seconds later, preserving order.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Callable
from typing import Final

from ..errors import (
    ConnectionClosed,
    DatagramsUnavailable,
    DatagramTooLarge,
    StreamReset,
    StreamStopped,
    UsageError,
)
from .base import Connection, RecvStream, SendStream

__all__ = [
    "MemoryConnection",
    "MemoryRecvStream",
    "MemorySendStream",
    "connection_pair",
]

logger = logging.getLogger("quic_reverse.transport.memory")

_DEFAULT_BUFFER_SIZE: Final = 256 * 1024
_DEFAULT_MAX_STREAMS: Final = 1000
_DEFAULT_MAX_DATAGRAM: Final = 1200

_FIN: Final = None  # marker of a FIN in a pipe's in-flight queue


class _Signal:
    """Wake-all notification: waiters park on a future, ``notify`` resolves them all.

    Waiters always re-check their condition after waking, so spurious wake-ups are
    harmless and a cancelled waiter leaves nothing behind.
    """

    __slots__ = ("_waiters",)

    def __init__(self) -> None:
        self._waiters: list[asyncio.Future[None]] = []

    async def wait(self) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await fut
        finally:
            if not fut.done():
                fut.cancel()
            with contextlib.suppress(ValueError):  # already taken by notify()
                self._waiters.remove(fut)

    def notify(self) -> None:
        waiters, self._waiters = self._waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)


class _Link:
    """State shared by both ends of a pair: options and the connection close."""

    def __init__(self, *, buffer_size: int, max_streams: int, trickle: bool, delay: float) -> None:
        self.buffer_size = buffer_size
        self.max_streams = max_streams
        self.trickle = trickle
        self.delay = delay
        self.closed = False
        self.close_code = 0
        self.close_reason = ""
        self.closed_by = ""
        self.closed_event = asyncio.Event()
        self.streams: set[_Stream] = set()
        self.ends: list[MemoryConnection] = []
        self.max_datagram_size: int | None = _DEFAULT_MAX_DATAGRAM

    def error(self) -> ConnectionClosed:
        """The exception every operation raises once the link is closed."""
        return ConnectionClosed(
            f"connection closed by {self.closed_by} (code {self.close_code})",
            error_code=self.close_code,
            reason=self.close_reason,
        )

    def close(self, code: int, reason: bytes, by: str) -> None:
        if self.closed:
            return
        self.closed = True
        self.close_code = code
        self.close_reason = reason.decode("utf-8", errors="replace")
        self.closed_by = by
        logger.info("memory connection closed by %s: code=%d reason=%r", by, code, reason)
        for stream in list(self.streams):
            stream.on_link_closed()
        self.streams.clear()
        for end in self.ends:
            end._on_link_closed()
        self.closed_event.set()


class _Pipe:
    """One direction of a stream: the writer's in-flight queue and the reader's buffer."""

    def __init__(self, stream: _Stream, stream_id: int) -> None:
        self.stream = stream
        self.stream_id = stream_id
        self.link = stream.link
        self.buffer = bytearray()  # delivered, unread
        self.inflight: collections.deque[bytes | None] = collections.deque()
        self.inflight_timers: collections.deque[asyncio.TimerHandle] = collections.deque()
        self.inflight_bytes = 0
        # accepted by write()/finish(), waiting for room in the peer's buffer
        self.pending: collections.deque[bytes | None] = collections.deque()
        self.pending_bytes = 0
        self.fin_queued = False  # writer called finish()
        self.fin_delivered = False  # reader will see EOF after the buffer
        self.reset_code: int | None = None  # writer reset
        self.stop_code: int | None = None  # reader stopped
        self.readable = _Signal()
        self.writable = _Signal()

    # -- state ---------------------------------------------------------------

    @property
    def done(self) -> bool:
        """Finished for stream-limit accounting: reset, stopped, or read up to FIN."""
        return (
            self.reset_code is not None
            or self.stop_code is not None
            or (self.fin_delivered and not self.buffer)
        )

    def wake(self) -> None:
        self.readable.notify()
        self.writable.notify()

    # -- writer side ---------------------------------------------------------

    def check_writable(self) -> None:
        if self.link.closed:
            raise self.link.error()
        if self.stop_code is not None:
            raise StreamStopped(self.stop_code, self.stream_id)
        if self.reset_code is not None:
            raise UsageError(f"stream {self.stream_id}: write after reset()")
        if self.fin_queued:
            raise UsageError(f"stream {self.stream_id}: write after finish()")

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        self.check_writable()
        chunk = bytes(memoryview(data).cast("B"))
        if not chunk:
            return
        # All of it is accepted before the first wait: a cancellation can only
        # interrupt the wait, never leave part of ``data`` unsent.
        self.pending.append(chunk)
        self.pending_bytes += len(chunk)
        self.pump()
        while self.pending_bytes:
            await self.writable.wait()
            self.check_writable()

    def pump(self) -> None:
        """Move pending data (and a FIN behind it) into the peer's buffer as room allows."""
        pending = self.pending
        while pending:
            item = pending[0]
            if item is None:
                pending.popleft()
                self.send(_FIN)
                continue
            room = self.link.buffer_size - len(self.buffer) - self.inflight_bytes
            if room <= 0:
                return
            if len(item) <= room:
                pending.popleft()
            else:
                pending[0] = item[room:]
                item = item[:room]
            self.pending_bytes -= len(item)
            self.send(item)

    async def finish(self) -> None:
        if self.link.closed:
            raise self.link.error()
        if self.stop_code is not None:
            raise StreamStopped(self.stop_code, self.stream_id)
        if self.fin_queued or self.reset_code is not None:
            return
        self.fin_queued = True
        self.pending.append(_FIN)
        self.pump()

    def reset(self, code: int) -> None:
        if self.link.closed or self.reset_code is not None:
            return
        if self.fin_queued and not self.inflight and not self.pending:
            return  # everything including FIN was delivered: nothing left to abort
        if self.stop_code is not None:
            return  # the peer already ended this direction
        self.reset_code = code
        self.drop_inflight()
        self.buffer.clear()
        logger.debug("stream %d reset locally with code %d", self.stream_id, code)
        self.stream.make_visible()
        self.wake()
        self.stream.check_done()

    def send(self, item: bytes | None) -> None:
        """Deliver ``item`` (data or FIN) now, or after ``delay`` seconds in order."""
        if self.link.delay <= 0:
            self.deliver(item)
            return
        if item is not None:
            self.inflight_bytes += len(item)
        self.inflight.append(item)
        timer = asyncio.get_running_loop().call_later(self.link.delay, self.deliver_next)
        self.inflight_timers.append(timer)

    def deliver_next(self) -> None:
        """Timer callback: deliver the oldest in-flight item (timers may fire in any
        order among equal deadlines, but items always leave in order)."""
        if not self.inflight:
            return
        self.inflight_timers.popleft()
        item = self.inflight.popleft()
        if item is not None:
            self.inflight_bytes -= len(item)
        self.deliver(item)

    def deliver(self, item: bytes | None) -> None:
        if self.link.closed or self.reset_code is not None:
            return
        self.stream.make_visible()
        if self.stop_code is not None:
            return  # the receiver discards data after STOP_SENDING
        if item is None:
            self.fin_delivered = True
            self.stream.check_done()
        else:
            self.buffer += item
        self.readable.notify()

    def drop_inflight(self) -> None:
        """Drop everything not yet delivered (pending and in flight)."""
        for timer in self.inflight_timers:
            timer.cancel()
        self.inflight_timers.clear()
        self.inflight.clear()
        self.inflight_bytes = 0
        self.pending.clear()
        self.pending_bytes = 0

    # -- reader side ---------------------------------------------------------

    async def read(self, max_bytes: int) -> bytes:
        if max_bytes < 1:
            raise ValueError("max_bytes must be >= 1")
        while True:
            if self.reset_code is not None:
                raise StreamReset(self.reset_code, self.stream_id)
            if self.stop_code is not None:
                raise UsageError(f"stream {self.stream_id}: read after stop()")
            if self.buffer:
                n = 1 if self.link.trickle else min(max_bytes, len(self.buffer))
                data = bytes(self.buffer[:n])
                del self.buffer[:n]
                if self.pending:
                    self.pump()
                self.writable.notify()
                if not self.buffer and self.fin_delivered:
                    self.stream.check_done()
                return data
            if self.fin_delivered:
                return b""
            if self.link.closed:
                raise self.link.error()
            await self.readable.wait()

    def stop(self, code: int) -> None:
        if self.link.closed or self.stop_code is not None or self.reset_code is not None:
            return
        if self.fin_delivered and not self.buffer:
            return  # everything was read already
        self.stop_code = code
        self.buffer.clear()
        self.drop_inflight()
        logger.debug("stream %d stopped locally with code %d", self.stream_id, code)
        self.stream.make_visible()
        self.wake()
        self.stream.check_done()


class _Stream:
    """A bidirectional stream: two pipes, and its place in the opener's stream budget."""

    def __init__(
        self, link: _Link, stream_id: int, opener: MemoryConnection, acceptor: MemoryConnection
    ) -> None:
        self.link = link
        self.stream_id = stream_id
        self.opener = opener
        self.acceptor = acceptor
        self.forward = _Pipe(self, stream_id)  # opener -> acceptor
        self.backward = _Pipe(self, stream_id)  # acceptor -> opener
        self.visible = False
        self.released = False

    def make_visible(self) -> None:
        if self.visible:
            return
        self.visible = True
        peer = self.acceptor
        peer._incoming.append((MemorySendStream(self.backward), MemoryRecvStream(self.forward)))
        peer._accept_signal.notify()
        logger.debug("stream %d visible to the peer", self.stream_id)

    def check_done(self) -> None:
        if self.released or not (self.forward.done and self.backward.done):
            return
        self.released = True
        self.link.streams.discard(self)
        self.opener._release_slot()
        logger.debug("stream %d finished in both directions", self.stream_id)

    def on_link_closed(self) -> None:
        for pipe in (self.forward, self.backward):
            pipe.drop_inflight()
            pipe.wake()


class MemorySendStream(SendStream):
    """Sending half of an in-memory stream."""

    def __init__(self, pipe: _Pipe) -> None:
        self._pipe = pipe

    @property
    def stream_id(self) -> int:
        return self._pipe.stream_id

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        """Accept all of ``data``, then wait until it has moved into the peer's buffer.

        Raises:
            StreamStopped: the peer sent STOP_SENDING.
            ConnectionClosed: the connection is closed.
            UsageError: the stream was already finished or reset locally.
        """
        await self._pipe.write(data)

    async def finish(self) -> None:
        """Send FIN after all queued data. Idempotent (a no-op after :meth:`reset`).

        Raises:
            StreamStopped: the peer sent STOP_SENDING.
            ConnectionClosed: the connection is closed.
        """
        await self._pipe.finish()

    def reset(self, code: int = 0) -> None:
        """Abort sending with RESET_STREAM(code); undelivered data is discarded. Never raises."""
        self._pipe.reset(code)

    @property
    def buffered_bytes(self) -> int:
        """Bytes accepted by ``write`` and not yet in the peer's buffer: waiting for
        room, or in flight (``delay > 0``)."""
        return self._pipe.inflight_bytes + self._pipe.pending_bytes


class MemoryRecvStream(RecvStream):
    """Receiving half of an in-memory stream."""

    def __init__(self, pipe: _Pipe) -> None:
        self._pipe = pipe

    @property
    def stream_id(self) -> int:
        return self._pipe.stream_id

    async def read(self, max_bytes: int = 65536) -> bytes:
        """Return up to ``max_bytes`` (one with ``trickle``), or ``b""`` at FIN.

        Raises:
            StreamReset: the peer reset the stream.
            ConnectionClosed: the connection closed before FIN.
            UsageError: this side already called :meth:`stop`.
            ValueError: ``max_bytes`` < 1.
        """
        return await self._pipe.read(max_bytes)

    def stop(self, code: int = 0) -> None:
        """Send STOP_SENDING(code) and drop buffered data. Never raises."""
        self._pipe.stop(code)

    @property
    def buffered_bytes(self) -> int:
        """Delivered bytes not yet read; at most the pair's ``buffer_size``."""
        return len(self._pipe.buffer)


class MemoryConnection(Connection):
    """One end of an in-memory connection pair; see :func:`connection_pair`."""

    def __init__(self, link: _Link, *, is_client: bool) -> None:
        self._link = link
        self._is_client = is_client
        self._name = "client" if is_client else "server"
        self._peer: MemoryConnection | None = None
        # QUIC numbering: client-initiated bidi streams are 0, 4, 8...; server's 1, 5, 9...
        self._next_stream_id = 0 if is_client else 1
        self._open_streams = 0  # our streams the peer still counts against max_streams
        self._slot_signal = _Signal()
        self._incoming: collections.deque[tuple[MemorySendStream, MemoryRecvStream]] = (
            collections.deque()
        )
        self._accept_signal = _Signal()
        self._datagram_handler: Callable[[bytes], None] | None = None

    def __repr__(self) -> str:
        state = "open" if self.is_open else "closed"
        return f"<MemoryConnection {self._name} {state}>"

    async def open_bi(self) -> tuple[SendStream, RecvStream]:
        """Open a bidirectional stream; waits while ``max_streams`` of ours are in use.

        The peer sees the stream once we write, finish or reset it.

        Raises:
            ConnectionClosed: the connection is (or becomes) closed.
        """
        while True:
            if self._link.closed:
                raise self._link.error()
            if self._open_streams < self._link.max_streams:
                break
            logger.debug("%s: stream limit %d reached, waiting", self._name, self._open_streams)
            await self._slot_signal.wait()
        peer = self._peer
        if peer is None:
            raise UsageError("memory connection is not paired (use connection_pair())")
        self._open_streams += 1
        stream = _Stream(self._link, self._next_stream_id, self, peer)
        self._next_stream_id += 4
        self._link.streams.add(stream)
        logger.debug("%s: opened stream %d", self._name, stream.stream_id)
        return MemorySendStream(stream.forward), MemoryRecvStream(stream.backward)

    async def accept_bi(self) -> tuple[SendStream, RecvStream] | None:
        """Wait for the next peer-opened stream; ``None`` once the connection is closed."""
        while True:
            if self._link.closed:
                return None
            if self._incoming:
                return self._incoming.popleft()
            await self._accept_signal.wait()

    def close(self, code: int = 0, reason: bytes = b"") -> None:
        """Close both ends with ``code``/``reason``; wakes every pending operation.

        Idempotent, never raises.
        """
        self._link.close(code, reason, self._name)

    @property
    def is_open(self) -> bool:
        return not self._link.closed

    async def wait_closed(self) -> None:
        """Return once the pair is closed (immediately after :meth:`close`)."""
        await self._link.closed_event.wait()

    @property
    def remote_address(self) -> tuple[str, int]:
        return ("memory", 0)

    @property
    def max_datagram_size(self) -> int | None:
        return self._link.max_datagram_size

    def send_datagram(self, data: bytes | bytearray | memoryview) -> None:
        limit = self._link.max_datagram_size
        if limit is None:
            raise DatagramsUnavailable("this memory connection pair carries no datagrams")
        if self._link.closed:
            raise self._link.error()
        if len(data) > limit:
            raise DatagramTooLarge(len(data), limit)
        peer = self._peer
        if peer is None:
            raise UsageError("memory connection is not paired (use connection_pair())")
        loop = asyncio.get_running_loop()
        if self._link.delay:
            loop.call_later(self._link.delay, peer._deliver_datagram, bytes(data))
        else:
            loop.call_soon(peer._deliver_datagram, bytes(data))

    def set_datagram_handler(self, handler: Callable[[bytes], None] | None) -> None:
        self._datagram_handler = handler

    # -- internal --------------------------------------------------------------

    def _deliver_datagram(self, data: bytes) -> None:
        handler = self._datagram_handler
        if handler is None or self._link.closed:
            return
        try:
            handler(data)
        except Exception:
            logger.exception("%s: datagram handler failed; datagram dropped", self._name)

    def _release_slot(self) -> None:
        self._open_streams -= 1
        self._slot_signal.notify()

    def _on_link_closed(self) -> None:
        self._incoming.clear()
        self._accept_signal.notify()
        self._slot_signal.notify()


def connection_pair(
    *,
    buffer_size: int = _DEFAULT_BUFFER_SIZE,
    max_streams: int = _DEFAULT_MAX_STREAMS,
    trickle: bool = False,
    delay: float = 0.0,
    max_datagram_size: int | None = _DEFAULT_MAX_DATAGRAM,
) -> tuple[MemoryConnection, MemoryConnection]:
    """Create a connected (client, server) pair inside the running event loop.

    Args:
        buffer_size: bytes each stream direction holds unread before writers block.
        max_streams: concurrent bidirectional streams each side may open.
        trickle: every ``read`` returns at most one byte.
        delay: seconds before each write/FIN reaches the peer (order preserved).
        max_datagram_size: largest datagram either side may send; ``None``: no datagrams.

    Raises:
        ValueError: a knob is out of range.
    """
    if buffer_size < 1:
        raise ValueError("buffer_size must be >= 1")
    if max_streams < 1:
        raise ValueError("max_streams must be >= 1")
    if delay < 0:
        raise ValueError("delay must be >= 0")
    if max_datagram_size is not None and max_datagram_size < 1:
        raise ValueError("max_datagram_size must be >= 1 or None")
    link = _Link(buffer_size=buffer_size, max_streams=max_streams, trickle=trickle, delay=delay)
    link.max_datagram_size = max_datagram_size
    client = MemoryConnection(link, is_client=True)
    server = MemoryConnection(link, is_client=False)
    client._peer = server
    server._peer = client
    link.ends = [client, server]
    return client, server

"""Stream buffers and stream objects of the QUIC adapters.

:class:`StreamState` is the book-keeping of one bidirectional stream: the receive
buffer (chunks as the stack delivered them, read without copying where possible)
and the flags of both halves; :class:`StreamTable` holds a connection's streams and
its accept queue. :class:`QuicSendStream` and :class:`QuicRecvStream`
implement the stream half of the transport contract on top of it; they reach the
stack only through their connection (:class:`~._driver.StackConnection`), which
owns the stack object, the timers and the I/O.

``write`` hands *all* of its data to the stack before it first waits (the stack
copies it), then waits while more than ``send_buffer`` bytes of the stream are
queued; so a cancelled ``write`` has always been accepted in full (the guarantee
stated in :meth:`quic_reverse.transport.base.SendStream.write`).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..errors import StreamReset, StreamStopped, UsageError
from ._errors import valid_code
from .base import RecvStream, SendStream

if TYPE_CHECKING:
    from ._driver import StackConnection

__all__ = [
    "QuicRecvStream",
    "QuicSendStream",
    "StreamState",
    "StreamTable",
    "check_writable",
    "wake",
]


def wake(fut: asyncio.Future[None] | None) -> None:
    """Resolve a waiter future if it is still pending."""
    if fut is not None and not fut.done():
        fut.set_result(None)


class StreamState:
    """Book-keeping for one bidirectional stream, both halves."""

    __slots__ = (
        "chunks",
        "consumed",
        "data_callback",
        "fin_received",
        "fin_sent",
        "head",
        "read_waiter",
        "recv_buffered",
        "recv_done",
        "reset_received",
        "reset_sent",
        "stop_received",
        "stop_sent",
        "stream_id",
        "write_waiter",
    )

    def __init__(self, stream_id: int) -> None:
        self.stream_id = stream_id
        # receive half
        self.chunks: deque[bytes] = deque()
        self.head = 0  # read offset into chunks[0]
        self.recv_buffered = 0
        self.consumed = 0
        self.fin_received = False
        self.reset_received: int | None = None
        self.stop_sent = False
        self.recv_done = False  # app saw FIN/reset or stopped
        self.read_waiter: asyncio.Future[None] | None = None
        self.data_callback: Callable[[], None] | None = None
        # send half
        self.fin_sent = False
        self.reset_sent = False
        self.stop_received: int | None = None
        self.write_waiter: asyncio.Future[None] | None = None

    @property
    def send_done(self) -> bool:
        return self.fin_sent or self.reset_sent or self.stop_received is not None

    # -- receive buffer --------------------------------------------------------

    def push(self, data: bytes) -> None:
        """Append received bytes."""
        self.chunks.append(data)
        self.recv_buffered += len(data)

    def take(self, max_bytes: int) -> bytes:
        """Remove and return up to ``max_bytes`` (at least one; the buffer is not empty)."""
        chunks = self.chunks
        first = chunks[0]
        head = self.head
        avail = len(first) - head
        if avail > max_bytes:
            out = first[head : head + max_bytes]
            self.head = head + max_bytes
        elif avail == max_bytes or len(chunks) == 1:
            out = first[head:] if head else first
            chunks.popleft()
            self.head = 0
        else:
            parts = [first[head:] if head else first]
            chunks.popleft()
            remaining = max_bytes - avail
            head = 0
            while chunks and remaining:
                chunk = chunks[0]
                if len(chunk) <= remaining:
                    parts.append(chunk)
                    chunks.popleft()
                    remaining -= len(chunk)
                else:
                    parts.append(chunk[:remaining])
                    head = remaining
                    remaining = 0
            self.head = head
            out = b"".join(parts)
        n = len(out)
        self.recv_buffered -= n
        self.consumed += n
        return out

    def clear(self) -> int:
        """Drop the receive buffer; returns how many bytes were dropped."""
        dropped = self.recv_buffered
        self.recv_buffered = 0
        self.chunks.clear()
        self.head = 0
        return dropped


def check_writable(conn: StackConnection, state: StreamState) -> None:
    """Raise what a write to ``state``'s stream must raise now, if anything.

    Raises:
        StreamStopped: the peer sent STOP_SENDING.
        ConnectionClosed: the connection is closed.
        UsageError: the stream was finished or reset locally.
    """
    if state.stop_received is not None:
        raise StreamStopped(state.stop_received, state.stream_id)
    if not conn.is_open:
        raise conn._error()
    if state.reset_sent:
        raise UsageError(f"stream {state.stream_id}: write after reset()")
    if state.fin_sent:
        raise UsageError(f"stream {state.stream_id}: write after finish()")


class QuicSendStream(SendStream):
    """Sending half of a stream on a :class:`~._driver.StackConnection`."""

    __slots__ = ("_conn", "_state")

    def __init__(self, conn: StackConnection, state: StreamState) -> None:
        self._conn = conn
        self._state = state

    @property
    def stream_id(self) -> int:
        return self._state.stream_id

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        conn = self._conn
        state = self._state
        check_writable(conn, state)
        view = data if type(data) is bytes else memoryview(data).cast("B")
        if not len(view):
            return
        # Everything goes to the stack at once (it copies): a cancellation can only
        # interrupt the wait below, never leave part of ``data`` unsent.
        conn._stack_send(state, view, False)
        conn._transmit_soon()
        limit = conn._send_buffer
        sid = state.stream_id
        while conn._send_queue_size(sid) >= limit:
            check_writable(conn, state)
            fut = conn._loop.create_future()
            state.write_waiter = fut
            conn._blocked_writers.add(state)
            try:
                await fut
            finally:
                state.write_waiter = None
                conn._blocked_writers.discard(state)
        check_writable(conn, state)

    def try_write(self, data: bytes) -> bool:
        conn = self._conn
        state = self._state
        if (
            state.stop_received is not None
            or state.reset_sent
            or state.fin_sent
            or not conn.is_open
            or conn._send_queue_size(state.stream_id) >= conn._send_buffer
        ):
            return False
        try:
            conn._stack_send(state, data, False)
        except Exception:
            return False  # the stack refused it whole: write() reports why
        conn._transmit_soon()
        return True

    def call_before_send(self, callback: Callable[[], None]) -> bool:
        conn = self._conn
        if not conn.is_open:
            return False
        conn.before_transmit.append(callback)
        conn._transmit_soon()
        return True

    async def finish(self) -> None:
        state = self._state
        conn = self._conn
        if state.fin_sent:
            return
        if state.stop_received is not None:
            raise StreamStopped(state.stop_received, state.stream_id)
        if not conn.is_open:
            raise conn._error()
        if state.reset_sent:
            return
        conn._stack_send(state, b"", True)
        state.fin_sent = True
        conn._transmit_soon()
        conn._maybe_forget(state)

    def reset(self, code: int = 0) -> None:
        state = self._state
        conn = self._conn
        code = valid_code(code, "reset")
        if state.reset_sent or state.fin_sent or state.stop_received is not None:
            state.reset_sent = True
            return
        state.reset_sent = True
        if conn.is_open:
            with conn._guard_reset:
                conn._quic.reset_stream(state.stream_id, code)
            conn._transmit_soon()
        conn._blocked_writers.discard(state)
        wake(state.write_waiter)
        conn._maybe_forget(state)

    @property
    def buffered_bytes(self) -> int:
        return self._conn._send_queue_size(self._state.stream_id)

    def __repr__(self) -> str:
        return f"<QuicSendStream id={self.stream_id}>"


class QuicRecvStream(RecvStream):
    """Receiving half of a stream on a :class:`~._driver.StackConnection`."""

    __slots__ = ("_conn", "_state")

    def __init__(self, conn: StackConnection, state: StreamState) -> None:
        self._conn = conn
        self._state = state

    @property
    def stream_id(self) -> int:
        return self._state.stream_id

    async def read(self, max_bytes: int = 65536) -> bytes:
        if max_bytes < 1:
            raise ValueError("max_bytes must be >= 1")
        state = self._state
        conn = self._conn
        while True:
            if state.recv_buffered:
                out = state.take(max_bytes)
                conn._consumed(state, len(out))
                return out
            if state.reset_received is not None:
                state.recv_done = True
                conn._maybe_forget(state)
                raise StreamReset(state.reset_received, state.stream_id)
            if state.stop_sent:
                raise UsageError(f"stream {state.stream_id}: read after stop()")
            if state.fin_received:
                state.recv_done = True
                conn._maybe_forget(state)
                return b""
            if not conn.is_open:
                raise conn._error()
            fut = conn._loop.create_future()
            state.read_waiter = fut
            try:
                await fut
            finally:
                state.read_waiter = None

    def set_data_callback(self, callback: Callable[[], None] | None) -> bool:
        self._state.data_callback = callback
        return True

    def take_buffered(self, max_bytes: int = 65536) -> bytes:
        state = self._state
        if not state.recv_buffered or state.stop_sent or max_bytes < 1:
            return b""
        out = state.take(max_bytes)
        self._conn._consumed(state, len(out))
        return out

    def stop(self, code: int = 0) -> None:
        state = self._state
        conn = self._conn
        code = valid_code(code, "stop")
        if state.stop_sent or state.recv_done or conn._closed.is_set():
            state.recv_done = True
            return
        state.stop_sent = True
        state.recv_done = True
        if not state.fin_received and state.reset_received is None:
            with conn._guard_stop:
                conn._quic.stop_stream(state.stream_id, code)
            conn._transmit_soon()
        conn._drop_recv_buffer(state)
        wake(state.read_waiter)
        conn._maybe_forget(state)

    @property
    def buffered_bytes(self) -> int:
        return self._state.recv_buffered

    def __repr__(self) -> str:
        return f"<QuicRecvStream id={self.stream_id}>"


class StreamTable:
    """The streams of one connection: live stream states by id, which peer-initiated
    ids were already seen, and the queue of peer streams waiting for ``accept_bi``.

    QUIC opens every lower-numbered peer stream implicitly when a frame for a higher
    one arrives; here a peer stream becomes visible (is queued for ``accept_bi``) only
    when its own first frame arrives, like the stream the peer wrote first. A frame
    for an id that was seen and is no longer live belongs to a finished stream and is
    ignored.
    """

    __slots__ = ("_next_peer_bidi", "_unseen_peer_ids", "accept_queue", "accept_waiter", "live")

    def __init__(self, *, is_client: bool) -> None:
        self.live: dict[int, StreamState] = {}
        self.accept_queue: deque[tuple[SendStream, RecvStream]] = deque()
        self.accept_waiter: asyncio.Future[None] | None = None
        # Next peer-initiated bidirectional id; lower ones are either in
        # ``_unseen_peer_ids`` (opened implicitly, no frame yet) or were surfaced.
        self._next_peer_bidi = 1 if is_client else 0
        self._unseen_peer_ids: set[int] = set()

    def is_peer_initiated(self, stream_id: int) -> bool:
        """True for ids the peer opens (bit 0 is the initiator: 0 = client)."""
        return (stream_id & 1) == (self._next_peer_bidi & 1)

    def add_local(self, stream_id: int) -> StreamState:
        """Register a stream this side opened."""
        state = StreamState(stream_id)
        self.live[stream_id] = state
        return state

    def for_frame(self, stream_id: int) -> tuple[StreamState | None, bool]:
        """The state a frame of ``stream_id`` belongs to, and whether it is a new
        peer stream (the caller queues it for ``accept_bi``). ``(None, False)`` for a
        finished stream, an id that is not ours to receive, or a unidirectional one."""
        state = self.live.get(stream_id)
        if state is not None:
            return state, False
        if stream_id & 2 or not self.is_peer_initiated(stream_id):
            return None, False
        if stream_id < self._next_peer_bidi:
            if stream_id not in self._unseen_peer_ids:
                return None, False
            self._unseen_peer_ids.discard(stream_id)
        else:
            self._unseen_peer_ids.update(range(self._next_peer_bidi, stream_id, 4))
            self._next_peer_bidi = stream_id + 4
        state = StreamState(stream_id)
        self.live[stream_id] = state
        return state, True

    def forget_if_done(self, state: StreamState) -> bool:
        """Drop a stream finished in both directions; True if it was dropped."""
        if state.recv_done and state.send_done:
            return self.live.pop(state.stream_id, None) is not None
        return False

    def push_accepted(self, pair: tuple[SendStream, RecvStream]) -> None:
        self.accept_queue.append(pair)
        wake(self.accept_waiter)

    def wake_all(self) -> None:
        """Wake every waiter (accept, reads, writes): the connection is closing."""
        wake(self.accept_waiter)
        for state in self.live.values():
            wake(state.read_waiter)
            wake(state.write_waiter)

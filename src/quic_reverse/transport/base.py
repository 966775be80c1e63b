"""The transport contract: what the session layer needs from a QUIC connection.

Every transport (qh3, aioquic, in-memory) implements these three abstract classes
and passes the same conformance suite (``tests/transport/test_conformance.py``).
The session layer imports only this module, never a QUIC stack.

Semantics shared by all implementations:

* A bidirectional stream opened with :meth:`Connection.open_bi` becomes visible to
  the peer's :meth:`Connection.accept_bi` only once the opener writes data or FIN
  (as in QUIC).
* :meth:`SendStream.write` applies real backpressure: it accepts all of its data at
  once and returns only once the stream's send buffer is back within its budget.
  A cancelled ``write`` has accepted *all* of its data (see :meth:`SendStream.write`).
* A receiver that does not read holds back flow-control credit past a high-water
  mark, so a slow reader cannot make the process grow without bound.
* A peer reset surfaces as :class:`~quic_reverse.errors.StreamReset` from ``read``,
  never as EOF; a peer STOP_SENDING as :class:`~quic_reverse.errors.StreamStopped`
  from ``write``.
* Calling a stream in a state its own side caused (write after ``finish()`` or
  ``reset()``, read after ``stop()``) is a programming error:
  :class:`~quic_reverse.errors.UsageError`. Everything the peer or the network
  causes stays in the :class:`~quic_reverse.errors.TransportError` family; a closed
  connection is always :class:`~quic_reverse.errors.ConnectionClosed`, whoever
  closed it, because a close can race with any pending operation.
* Datagrams (RFC 9221, optional): :attr:`Connection.max_datagram_size` is ``None``
  when the connection carries none; otherwise :meth:`Connection.send_datagram` sends
  one whole datagram of at most that size, unreliably (it may be lost, duplicated
  never, reordered possibly), and each datagram received is passed to the handler
  set with :meth:`Connection.set_datagram_handler` (dropped while none is set).
* Closing the connection (either side) wakes every pending ``accept_bi``/``read``/
  ``write`` with :class:`~quic_reverse.errors.ConnectionClosed` (``accept_bi``
  returns ``None`` instead).
* Path statistics (diagnostics): :meth:`Connection.path_stats` returns a
  :class:`PathStats` snapshot of what the QUIC stack knows about the path (RTT,
  congestion window, packets sent and lost, ...); a field the transport does not know
  is ``None``. Never raises, also after the connection closed.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable

from ..errors import DatagramsUnavailable, IncompleteReadError

__all__ = ["Connection", "PathStats", "RecvStream", "SendStream"]


@dataclasses.dataclass(frozen=True, slots=True)
class PathStats:
    """A snapshot of a connection's path as its QUIC stack sees it (diagnostics).

    Every field is ``None`` when the transport does not know it (the in-memory pair
    knows none). Counters run from the start of the connection. Times in seconds,
    sizes in bytes.
    """

    #: Smoothed round-trip time (RFC 9002 ``smoothed_rtt``); None before the first sample.
    smoothed_rtt: float | None = None
    #: The most recent RTT sample.
    latest_rtt: float | None = None
    #: The smallest RTT sample seen (aioquic; qh3 does not expose it).
    min_rtt: float | None = None
    #: The congestion controller's window.
    congestion_window: int | None = None
    #: Bytes sent and neither acknowledged nor declared lost.
    bytes_in_flight: int | None = None
    #: UDP payload bytes sent on the active path.
    bytes_sent: int | None = None
    #: Packets sent (qh3: UDP datagrams sent; each carries one packet once the
    #: handshake is done, coalesced handshake packets count once).
    packets_sent: int | None = None
    #: Packets the loss detection declared lost (each one is retransmitted).
    packets_lost: int | None = None
    #: Probe timeouts (a PTO fires when nothing was acknowledged for too long).
    pto_count: int | None = None
    #: The UDP payload size the stack builds packets up to now.
    max_datagram_size: int | None = None
    #: The congestion controller's name: ``"qh3-reno"`` (qh3's native, loss-based
    #: window), an aioquic algorithm name such as ``"quic-reverse-bbr"`` (the
    #: delivery-rate controller of :mod:`quic_reverse.transport.congestion`) or
    #: ``"reno"``.
    congestion_control: str | None = None

    @property
    def loss_ratio(self) -> float | None:
        """``packets_lost / packets_sent`` since the connection started (None if either
        is unknown or nothing was sent yet)."""
        sent, lost = self.packets_sent, self.packets_lost
        if sent is None or lost is None or sent <= 0:
            return None
        return lost / sent


class SendStream(abc.ABC):
    """The sending half of a QUIC stream."""

    @property
    @abc.abstractmethod
    def stream_id(self) -> int:
        """The QUIC stream id (for logs and diagnostics)."""

    @abc.abstractmethod
    async def write(self, data: bytes | bytearray | memoryview) -> None:
        """Accept all of ``data`` for sending, then wait while the stream's send buffer
        is over its budget (backpressure).

        **Cancellation.** ``data`` is accepted in full (copied; the caller may reuse
        its buffer) in the same event-loop step in which ``write`` starts running,
        before it first suspends; the only thing a cancellation can interrupt is the
        wait for room that follows. So when ``await stream.write(data)`` raises
        ``CancelledError``, all of ``data`` has been accepted, exactly as if it had
        returned: it will be sent in order after everything written before it, and
        the stream stays usable (the next ``write`` continues after it). Nothing is
        ever accepted in part. (A task wrapping ``write`` that is cancelled before it
        first runs has accepted none of it: the coroutine body never ran.) Accepted
        data is lost only if the stream is reset or the connection closes.

        The cost of the guarantee: a stream holds at most its send budget plus the
        last ``write`` not yet drained, so very large single writes hold that much.

        Raises:
            StreamStopped: the peer sent STOP_SENDING (raised before accepting, or
                after accepting while waiting: then the data will not arrive).
            ConnectionClosed: the connection is closed.
            UsageError: the stream was already finished or reset locally.
        """

    @abc.abstractmethod
    async def finish(self) -> None:
        """Send FIN after all queued data. Idempotent.

        Raises:
            StreamStopped: the peer sent STOP_SENDING.
            ConnectionClosed: the connection is closed.
        """

    @abc.abstractmethod
    def reset(self, code: int = 0) -> None:
        """Abort sending with RESET_STREAM(code); queued data is discarded.

        Never raises: resetting a finished, reset or closed stream is a no-op.
        """

    @property
    @abc.abstractmethod
    def buffered_bytes(self) -> int:
        """Bytes accepted by :meth:`write` but not yet handed to the network (diagnostics)."""

    def try_write(self, data: bytes) -> bool:
        """Accept all of ``data`` now, without waiting, if the stream is writable and
        its send buffer is under budget; return True. Otherwise accept none of it and
        return False (the caller then uses :meth:`write`, which raises or waits as
        usual). Never raises. A transport without a non-blocking path returns False.
        """
        return False

    def call_before_send(self, callback: Callable[[], None]) -> bool:
        """Call ``callback()`` once, right before the transport next builds packets for
        this stream's connection (within the loop turn that follows, the one in which
        bytes written now would leave). Bytes it hands over with :meth:`try_write` go
        out with that same transmit, so writes made in one turn can be collected and
        handed over together at no cost in latency. ``callback`` must not raise.

        Returns False, and never calls ``callback``, when the transport has no such
        point (or the connection is closed).
        """
        return False


class RecvStream(abc.ABC):
    """The receiving half of a QUIC stream."""

    @property
    @abc.abstractmethod
    def stream_id(self) -> int:
        """The QUIC stream id (for logs and diagnostics)."""

    @abc.abstractmethod
    async def read(self, max_bytes: int = 65536) -> bytes:
        """Return up to ``max_bytes`` (at least one), or ``b""`` once FIN was received.

        Raises:
            StreamReset: the peer reset the stream.
            ConnectionClosed: the connection closed before FIN.
            UsageError: this side already called :meth:`stop`.
            ValueError: ``max_bytes`` < 1.
        """

    async def read_exactly(self, n: int) -> bytes:
        """Return exactly ``n`` bytes.

        Raises:
            IncompleteReadError: FIN arrived first (``.partial`` holds what came).
            StreamReset: the peer reset the stream.
            ConnectionClosed: the connection closed first.
        """
        if n < 0:
            raise ValueError("n must be >= 0")
        buf = bytearray()
        while len(buf) < n:
            chunk = await self.read(n - len(buf))
            if not chunk:
                raise IncompleteReadError(bytes(buf), n)
            buf += chunk
        return bytes(buf)

    @abc.abstractmethod
    def stop(self, code: int = 0) -> None:
        """Tell the peer to stop sending (STOP_SENDING(code)); buffered data is dropped.

        Never raises.
        """

    def set_data_callback(self, callback: Callable[[], None] | None) -> bool:
        """Have ``callback()`` called synchronously, from the transport's receive path,
        each time data arrives for this stream (read it there with
        :meth:`take_buffered`); ``None`` removes it. Data the callback leaves, FIN and
        resets still wake :meth:`read` as usual. The callback must not raise or block.
        Returns False (and never calls it) when the transport has no such path.
        """
        return False

    def take_buffered(self, max_bytes: int = 65536) -> bytes:
        """Up to ``max_bytes`` already received, without waiting; ``b""`` when none is
        buffered (not EOF: FIN and resets are reported by :meth:`read`). Never raises."""
        return b""

    @property
    @abc.abstractmethod
    def buffered_bytes(self) -> int:
        """Bytes received for this stream and not yet read, including any held inside
        the QUIC stack. Bounded by the transport's receive window (diagnostics, tests)."""


class Connection(abc.ABC):
    """One QUIC connection, either role."""

    @abc.abstractmethod
    async def open_bi(self) -> tuple[SendStream, RecvStream]:
        """Open a bidirectional stream; waits for a free slot at the peer's stream limit.

        Raises:
            ConnectionClosed: the connection is (or becomes) closed.
        """

    def try_open_bi(self) -> tuple[SendStream, RecvStream] | None:
        """Open a bidirectional stream now if that needs no waiting (a slot is free
        under the peer's stream limit and the connection is open), as :meth:`open_bi`
        would; otherwise open nothing and return ``None`` (the caller then uses
        :meth:`open_bi`, which waits or raises as usual). Never raises. A transport
        without a non-blocking path returns ``None``.
        """
        return None

    @abc.abstractmethod
    async def accept_bi(self) -> tuple[SendStream, RecvStream] | None:
        """Wait for the next peer-opened bidirectional stream; ``None`` once closing.

        Never raises for a closed connection: returns ``None``.
        """

    @abc.abstractmethod
    def close(self, code: int = 0, reason: bytes = b"") -> None:
        """Close the connection (CONNECTION_CLOSE with an application error code).

        Idempotent, never raises. Use :meth:`wait_closed` to wait until it is done.
        """

    @property
    @abc.abstractmethod
    def is_open(self) -> bool:
        """True until the connection starts closing (either side) or is lost."""

    @abc.abstractmethod
    async def wait_closed(self) -> None:
        """Return once the connection is fully closed. Never raises."""

    @property
    @abc.abstractmethod
    def remote_address(self) -> tuple[str, int]:
        """The peer's (host, port); ``("memory", 0)`` for the in-memory transport."""

    @property
    def peer_certificate(self) -> bytes | None:
        """The peer's end-entity certificate (DER), if the stack exposes one."""
        return None

    @property
    def dialed(self) -> bool | None:
        """True if this side dialled the connection (QUIC client), False if it accepted
        it, None if the transport cannot tell (in-memory pairs, third-party transports).

        The session uses it to refuse a role that contradicts the connection at once
        (PROTOCOL-v1 §1: the side that dials is the client) instead of after a timeout.
        """
        return None

    def path_stats(self) -> PathStats:
        """What the QUIC stack knows about the path now: RTT, congestion window,
        packets sent and lost, ... (:class:`PathStats`; ``None`` for what this transport
        does not know). A fresh snapshot on every call; cheap (no I/O), never raises.
        """
        return PathStats()

    # ------------------------------------------------------------ datagrams (optional)

    @property
    def max_datagram_size(self) -> int | None:
        """The largest payload :meth:`send_datagram` takes now, or ``None`` when this
        connection carries no datagrams (the transport has none, or the peer did not
        announce ``max_datagram_frame_size``). Conservative: a datagram of this size
        fits a packet of the connection's configured size with the largest headers.
        """
        return None

    def send_datagram(self, data: bytes | bytearray | memoryview) -> None:
        """Queue one unreliable datagram (RFC 9221): delivered whole or not at all.

        Never blocks; datagrams are not flow controlled and may be lost.

        Raises:
            DatagramsUnavailable: :attr:`max_datagram_size` is ``None``.
            DatagramTooLarge: ``len(data)`` exceeds :attr:`max_datagram_size`.
            ConnectionClosed: the connection is closed.
        """
        raise DatagramsUnavailable(f"{type(self).__name__} carries no datagrams")

    def set_datagram_handler(self, handler: Callable[[bytes], None] | None) -> None:
        """Call ``handler(data)`` in the event loop for every datagram received (it must
        not block; an exception it raises is logged and the datagram dropped); ``None``
        drops them. Transports without datagrams ignore this."""
        return None

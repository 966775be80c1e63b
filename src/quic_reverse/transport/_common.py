"""Code shared by the qh3 and aioquic adapters.

Both stacks expose the same sans-IO shape (``receive_datagram`` /
``datagrams_to_send`` / ``get_timer`` / ``handle_timer`` / ``next_event`` and the
same event classes), so one asyncio driver serves both: :class:`StackConnection`
owns the stack connection object, its timer and its streams, and implements the
transport contract of :mod:`quic_reverse.transport.base`. A stack module
subclasses it and fills in the few places where the stacks differ (batch feeding,
send-queue size, stream-slot accounting, receive credit, peer certificate).

Backpressure, both directions, is done here rather than trusted to the stacks:

* **send**: ``write`` queues at most ``send_buffer`` bytes in the stack per stream
  and then waits until the stack has sent enough of it (the stacks' own
  ``drain()`` never blocks);
* **receive**: bytes a reader has not consumed are counted per connection; the
  stack subclass holds flow-control credit back per stream (aioquic) or, once
  that count passes the high-water mark, stops feeding large datagrams to the
  stack (qh3, whose native core grants credit as soon as data is delivered):
  small ones (ACKs, close, short messages) still go in, the newest large ones are
  held (bounded) and fed when the reader has caught up by up to 1 MiB.

Every exception coming out of a stack call is converted to the
:class:`~quic_reverse.errors.TransportError` family at this boundary.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import Any, ClassVar, TypeVar

from ..errors import (
    CertificateError,
    ConnectionClosed,
    StreamReset,
    StreamStopped,
    TransportError,
)
from ._udp import DEFAULT_SOCKET_BUFFER, open_udp_endpoint, route_max_udp_payload
from .base import Connection, RecvStream, SendStream

__all__ = [
    "DEFAULT_CONNECTION_WINDOW",
    "DEFAULT_MAX_HANDSHAKES",
    "DEFAULT_MAX_STREAMS",
    "DEFAULT_SEND_BUFFER",
    "DEFAULT_SOCKET_BUFFER",
    "DEFAULT_STREAM_WINDOW",
    "StackConnection",
    "StackServer",
    "build_client_configuration",
    "build_server_configuration",
    "client_handshake",
    "stack_connect",
    "stack_serve",
    "convert_stack_errors",
    "is_certificate_alert",
]

logger = logging.getLogger("quic_reverse.transport")

#: Per-stream receive window advertised to the peer (bytes).
DEFAULT_STREAM_WINDOW = 8 * 1024 * 1024
#: Connection-wide receive window advertised to the peer (bytes).
DEFAULT_CONNECTION_WINDOW = 32 * 1024 * 1024
#: Bytes a writer may queue inside the stack per stream before ``write`` waits.
DEFAULT_SEND_BUFFER = 1024 * 1024
#: Concurrent bidirectional streams the peer may open.
DEFAULT_MAX_STREAMS = 1024
#: Connections a server holds in their handshake at once; further Initials are dropped
#: (the clients retransmit them) so a flood of Initials cannot grow state without bound.
DEFAULT_MAX_HANDSHAKES = 1024

# While receiving is paused (qh3): datagrams up to this size are still fed ...
_SMALL_DATAGRAM = 256
# ... as long as unread bytes stay below high-water + this slack ...
_PAUSED_SLACK = 256 * 1024
# ... and bigger ones are held up to this many bytes, then dropped.
_PAUSED_HOLD = 1024 * 1024
# Receiving resumes once unread bytes fall this far below the high-water mark.
_RESUME_MARGIN = 1024 * 1024
# Datagrams handed to the stack per call (the pause is checked between calls).
_FEED_SLICE = 32

# The event loop runs timers up to this early (asyncio's own slack).
_CLOCK_RESOLUTION = time.get_clock_info("monotonic").resolution
# Stack deadlines closer than this are polled rather than slept on (see _arm_timer).
_SPIN_WINDOW = 200e-6

# TLS alerts that mean "your certificate is not acceptable" (RFC 8446 6.2),
# carried in QUIC as CRYPTO_ERROR 0x100 + alert.
_CERT_ALERTS = frozenset({42, 43, 44, 45, 46, 48, 49})


_Config = TypeVar("_Config")
_Conn = TypeVar("_Conn", bound="StackConnection")
_Server = TypeVar("_Server", bound="StackServer")


def build_client_configuration(
    config_class: Callable[..., _Config],
    *,
    alpn: list[str] | tuple[str, ...],
    server_name: str | None,
    cafile: str | None,
    verify: bool,
    idle_timeout: float,
    stream_window: int,
    connection_window: int,
) -> _Config:
    """A client configuration of either stack (same constructor and attributes)."""
    config: Any = config_class(
        is_client=True,
        alpn_protocols=list(alpn),
        server_name=server_name,
        idle_timeout=idle_timeout,
        max_data=connection_window,
        max_stream_data=stream_window,
    )
    if cafile is not None:
        # Both stacks only record the path here and fail later, mid-handshake.
        if not os.path.isfile(cafile):
            raise TransportError(f"CA file {cafile!r} does not exist")
        with convert_stack_errors(f"loading CA file {cafile!r}"):
            config.load_verify_locations(cafile=cafile)
    if not verify:
        config.verify_mode = ssl.CERT_NONE
    return config  # type: ignore[no-any-return]


def build_server_configuration(
    config_class: Callable[..., _Config],
    certfile: str,
    keyfile: str,
    *,
    alpn: list[str] | tuple[str, ...],
    idle_timeout: float,
    stream_window: int,
    connection_window: int,
) -> _Config:
    """A server configuration of either stack.

    Raises:
        TransportError: the certificate or key cannot be loaded.
    """
    config: Any = config_class(
        is_client=False,
        alpn_protocols=list(alpn),
        idle_timeout=idle_timeout,
        max_data=connection_window,
        max_stream_data=stream_window,
    )
    with convert_stack_errors("loading certificate"):
        config.load_cert_chain(certfile, keyfile)
    return config  # type: ignore[no-any-return]


def is_certificate_alert(error_code: int) -> bool:
    """True if a QUIC close code is a TLS alert about a certificate."""
    return 0x100 <= error_code <= 0x1FF and (error_code - 0x100) in _CERT_ALERTS


def _reraise_unless_stack_failure(exc: BaseException) -> None:
    """Re-raise ``exc`` unless it is an ordinary error or a qh3 (pyo3) panic.

    qh3's Rust core can panic on malformed input; pyo3 turns that into
    ``PanicException``, a ``BaseException`` that would otherwise escape the event
    loop from a UDP callback and stop the whole process (a remote crash).
    """
    if isinstance(exc, Exception) or type(exc).__name__ == "PanicException":
        return
    raise exc


@contextmanager
def convert_stack_errors(what: str) -> Iterator[None]:
    """Convert anything a stack or the OS raises into :class:`TransportError`.

    Our own :class:`~quic_reverse.errors.QuicReverseError` subclasses and
    cancellation pass through unchanged.
    """
    try:
        yield
    except TransportError:
        raise
    except (asyncio.CancelledError, KeyboardInterrupt, SystemExit):
        raise
    except OSError as exc:
        raise TransportError(f"{what}: {exc}") from exc
    except Exception as exc:
        raise TransportError(f"{what}: {type(exc).__name__}: {exc}") from exc
    except BaseException as exc:
        # qh3's Rust code can panic on malformed input; pyo3 raises PanicException,
        # a BaseException, which must not take the whole program down.
        if type(exc).__name__ != "PanicException":
            raise
        raise TransportError(f"{what}: stack panic: {exc}") from exc


def _connection_closed(what: str, code: int, reason: str) -> ConnectionClosed:
    """The error for a closed connection; ``reason`` may be the peer's text, so it is
    shown escaped (it ends up in logs and CLI output)."""
    return ConnectionClosed(
        f"{what} (code {code:#x})" + (f": {reason!r}" if reason else ""),
        error_code=code,
        reason=reason,
    )


@contextmanager
def _best_effort(what: str) -> Iterator[None]:
    """For stack calls whose failure changes nothing for the caller (the stream or
    connection is already going away): the error is logged at debug level, not lost."""
    try:
        yield
    except Exception as exc:
        logger.debug("%s failed: %r", what, exc)


_MAX_CODE = (1 << 62) - 1


def _valid_code(code: int, what: str) -> int:
    """QUIC application error codes are varints (0..2**62-1); these calls never raise,
    so an invalid code is logged and replaced by 0 rather than silently dropping the
    close/reset."""
    if isinstance(code, int) and 0 <= code <= _MAX_CODE:
        return code
    logger.warning("%s: invalid QUIC error code %r, using 0", what, code)
    return 0


def _wake(fut: asyncio.Future[None] | None) -> None:
    if fut is not None and not fut.done():
        fut.set_result(None)


class _StreamState:
    """Book-keeping for one bidirectional stream, both halves."""

    __slots__ = (
        "chunks",
        "consumed",
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
        # send half
        self.fin_sent = False
        self.reset_sent = False
        self.stop_received: int | None = None
        self.write_waiter: asyncio.Future[None] | None = None

    @property
    def send_done(self) -> bool:
        return self.fin_sent or self.reset_sent or self.stop_received is not None


class QuicSendStream(SendStream):
    """Sending half of a stream on a :class:`StackConnection`."""

    __slots__ = ("_conn", "_state")

    def __init__(self, conn: StackConnection, state: _StreamState) -> None:
        self._conn = conn
        self._state = state

    @property
    def stream_id(self) -> int:
        return self._state.stream_id

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        await self._conn._write(self._state, data)

    async def finish(self) -> None:
        await self._conn._finish(self._state)

    def reset(self, code: int = 0) -> None:
        self._conn._reset(self._state, code)

    @property
    def buffered_bytes(self) -> int:
        return self._conn._send_queue_size(self._state.stream_id)

    def __repr__(self) -> str:
        return f"<QuicSendStream id={self.stream_id}>"


class QuicRecvStream(RecvStream):
    """Receiving half of a stream on a :class:`StackConnection`."""

    __slots__ = ("_conn", "_state")

    def __init__(self, conn: StackConnection, state: _StreamState) -> None:
        self._conn = conn
        self._state = state

    @property
    def stream_id(self) -> int:
        return self._state.stream_id

    async def read(self, max_bytes: int = 65536) -> bytes:
        return await self._conn._read(self._state, max_bytes)

    def stop(self, code: int = 0) -> None:
        self._conn._stop(self._state, code)

    @property
    def buffered_bytes(self) -> int:
        return self._state.recv_buffered + self._conn._stack_held_bytes(self._state.stream_id)

    def __repr__(self) -> str:
        return f"<QuicRecvStream id={self.stream_id}>"


class StackConnection(Connection):
    """Asyncio driver for a sans-IO QUIC connection object (qh3 or aioquic).

    Subclasses set :attr:`events` (the stack's events module) and override the
    ``_stack_*`` hooks. The object is fed datagrams with :meth:`datagrams_received`
    by whoever owns the UDP socket (the client transport or the server dispatcher)
    and sends through the datagram transport given to :meth:`attach`.
    """

    events: ModuleType
    stack_name = "?"
    #: The stack's connection class, called with ``max_streams``, ``configuration``
    #: and (server side) ``original_destination_connection_id``.
    quic_class: ClassVar[Callable[..., Any]]

    def __init__(
        self,
        quic: Any,
        *,
        is_client: bool,
        send_buffer: int = DEFAULT_SEND_BUFFER,
        receive_high_water: int = DEFAULT_CONNECTION_WINDOW,
    ) -> None:
        self._quic = quic
        self._is_client = is_client
        self._loop = asyncio.get_running_loop()
        self._send_buffer = max(1024, send_buffer)
        self._recv_high_water = max(64 * 1024, receive_high_water)
        self._transport: asyncio.DatagramTransport | None = None
        self._sendto_many: Callable[[list[bytes], Any], None] | None = None
        self._peer_addr: Any = None
        self._timer: asyncio.Handle | None = None
        self._timer_armed_at = 0.0  # the loop time self._timer runs at
        self._timer_at: float | None = None
        self._transmit_handle: asyncio.Handle | None = None
        self._streams: dict[int, _StreamState] = {}
        self._accept_queue: deque[tuple[SendStream, RecvStream]] = deque()
        self._accept_waiter: asyncio.Future[None] | None = None
        self._open_waiters: list[asyncio.Future[None]] = []
        self._blocked_writers: set[_StreamState] = set()
        self._recv_buffered_total = 0
        self._is_open = True
        self._close_error: ConnectionClosed | None = None
        self._closed = asyncio.Event()
        self._handshake_done: asyncio.Future[None] = self._loop.create_future()
        self._terminated_callbacks: list[Callable[[StackConnection], None]] = []
        self._cid_issued_callback: Callable[[bytes], None] | None = None
        self._cid_retired_callback: Callable[[bytes], None] | None = None
        self._paused_datagrams: deque[tuple[list[bytes], Any]] = deque()
        self._paused_bytes = 0
        self._receiving_paused = False
        # Next peer-initiated bidirectional stream id. Lower ids are either in
        # ``_unseen_peer_ids`` (implicitly opened by the peer, no frame yet) or were
        # already surfaced; those absent from ``_streams`` are finished and late
        # frames for them are ignored.
        self._next_peer_bidi = 1 if is_client else 0
        self._unseen_peer_ids: set[int] = set()
        self._recv_activity = asyncio.Event()
        self._stack_warned = False
        self._feed_warned = False

    @classmethod
    def create(
        cls: type[_Conn],
        configuration: Any,
        *,
        max_streams: int,
        send_buffer: int,
        original_dcid: bytes | None = None,
    ) -> _Conn:
        """A client connection, or (with ``original_dcid``) a server-side one."""
        extra = (
            {} if original_dcid is None else {"original_destination_connection_id": original_dcid}
        )
        quic = cls.quic_class(max_streams=max_streams, configuration=configuration, **extra)
        return cls(
            quic,
            is_client=original_dcid is None,
            send_buffer=send_buffer,
            receive_high_water=configuration.max_data,
        )

    # ------------------------------------------------------------------ hooks

    def _stack_feed(self, datagrams: list[bytes], addr: Any, now: float) -> None:
        """Hand a batch of datagrams from one address to the stack."""
        raise NotImplementedError

    def _send_queue_size(self, stream_id: int) -> int:
        """Bytes written to the stack for this stream and not yet sent."""
        raise NotImplementedError

    def _stack_held_bytes(self, stream_id: int) -> int:
        """Received bytes of this stream held inside the stack (not yet delivered)."""
        return 0

    def _bidi_slot_available(self) -> bool:
        """True if opening one more bidirectional stream stays within the peer's limit."""
        raise NotImplementedError

    def _allocate_bidi(self) -> int:
        """Create a local bidirectional stream in the stack and return its id."""
        raise NotImplementedError

    def _on_consumed(self, state: _StreamState, nbytes: int) -> None:
        """The application read ``nbytes`` of ``state``'s stream (credit hook)."""

    def _peer_certificate_der(self) -> bytes | None:
        return None

    def _route_known(self, max_udp_payload: int | None) -> None:
        """Client, before the handshake: the largest UDP payload the local route to
        the server carries (None if unknown). Stacks with path MTU discovery use it
        as the upper bound of their probing."""

    def _receive_paused(self) -> bool:
        """Whether incoming datagrams must be held back (receive high-water reached).

        Default: pause when unread bytes over all streams exceed the high-water mark.
        Stacks that hold back flow-control credit per stream override this to False.
        """
        return self._recv_buffered_total > self._recv_high_water

    # ---------------------------------------------------------------- wiring

    def attach(self, transport: asyncio.DatagramTransport, peer_addr: Any) -> None:
        """Use ``transport`` to send datagrams to ``peer_addr``."""
        self._transport = transport
        self._peer_addr = peer_addr
        self._sendto_many = getattr(transport, "sendto_many", None)

    def on_terminated(self, callback: Callable[[StackConnection], None]) -> None:
        """Call ``callback(self)`` once the stack reports the connection terminated."""
        self._terminated_callbacks.append(callback)

    async def wait_handshake(self) -> None:
        """Wait until the TLS handshake completed.

        Raises:
            CertificateError: the handshake failed on a certificate alert.
            ConnectionClosed: the connection closed before the handshake finished.
        """
        await asyncio.shield(self._handshake_done)

    @property
    def receiving_paused(self) -> bool:
        """True while incoming datagrams are held back (receive high-water reached)."""
        return self._receiving_paused

    async def wait_receive_activity(self) -> None:
        """Wait until stream data arrives or receiving pauses (diagnostics, tests).

        Check your condition, then call this; nothing can slip in between because
        the check and the wait start in the same event-loop step.
        """
        self._recv_activity.clear()
        await self._recv_activity.wait()

    @property
    def handshake_complete(self) -> bool:
        return self._handshake_done.done() and self._handshake_done.exception() is None

    # ---------------------------------------------------------- network side

    def datagrams_received(self, datagrams: list[bytes], addr: Any) -> None:
        """Feed datagrams (all from ``addr``) to the stack and react."""
        if self._closed.is_set():
            return
        if self._receiving_paused:
            self._hold(datagrams, addr)
            return
        self._feed_now(datagrams, addr)

    def _hold(self, datagrams: list[bytes], addr: Any) -> None:
        """Receiving is paused: keep big datagrams (bounded), still feed small ones.

        Small datagrams carry ACKs, CONNECTION_CLOSE, flow-control updates and short
        control messages; feeding them keeps the connection responsive (a close is
        seen, a control stream keeps working) while bulk data waits. They are fed
        only while unread bytes stay under the high-water mark plus a fixed slack,
        so the memory bound holds even against a peer sending many small packets.
        Past the hold limit the oldest held datagrams are dropped, as an overflowing
        socket buffer would drop packets; QUIC retransmits what was lost.
        """
        small = [d for d in datagrams if len(d) <= _SMALL_DATAGRAM]
        if small and self._recv_buffered_total <= self._recv_high_water + _PAUSED_SLACK:
            self._feed_now(small, addr)
            big = [d for d in datagrams if len(d) > _SMALL_DATAGRAM]
        else:
            big = datagrams
        if not big:
            return
        self._paused_datagrams.append((big, addr))
        self._paused_bytes += sum(len(d) for d in big)
        # Keep the newest: they carry the latest retransmissions (control messages
        # included), which is what the connection needs first when it resumes.
        held = self._paused_datagrams
        while self._paused_bytes > _PAUSED_HOLD and len(held) > 1:
            dropped, _ = held.popleft()
            self._paused_bytes -= sum(len(d) for d in dropped)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        """Single-datagram entry point (asyncio.DatagramProtocol compatible)."""
        self.datagrams_received([data], addr)

    def _feed_now(self, datagrams: list[bytes], addr: Any) -> None:
        # Feed in slices so a pause takes effect within a large burst.
        for start in range(0, len(datagrams), _FEED_SLICE):
            if start and self._receiving_paused:
                self._hold(datagrams[start:], addr)
                return
            try:
                self._stack_feed(datagrams[start : start + _FEED_SLICE], addr, self._loop.time())
            except BaseException as exc:
                _reraise_unless_stack_failure(exc)
                level = logging.DEBUG if self._feed_warned else logging.WARNING
                self._feed_warned = True
                logger.log(
                    level, "%s: stack failed on incoming datagrams: %r", self.stack_name, exc
                )
            self._process_events()
            if self._receive_paused():
                logger.debug(
                    "%s: receive paused (%d unread bytes)",
                    self.stack_name,
                    self._recv_buffered_total,
                )
                self._receiving_paused = True
                self._recv_activity.set()
        self._transmit()

    def _maybe_resume_receiving(self) -> None:
        # Hysteresis: resume once a little was read (a quarter of the high-water mark,
        # at most 1 MiB), so a reader taking small bites does not flip pause/resume on
        # every read, yet a slow reader lets the connection breathe (control messages
        # held meanwhile get through) at least every MiB.
        if not self._receiving_paused:
            return
        margin = min(self._recv_high_water // 4, _RESUME_MARGIN)
        if self._recv_buffered_total > self._recv_high_water - margin:
            return
        logger.debug("%s: receive resumed", self.stack_name)
        self._receiving_paused = False
        pending = self._paused_datagrams
        self._paused_datagrams = deque()
        self._paused_bytes = 0
        while pending and not self._closed.is_set():
            datagrams, addr = pending.popleft()
            if self._receiving_paused:
                self._hold(datagrams, addr)
            else:
                self._feed_now(datagrams, addr)

    def _transmit_soon(self) -> None:
        if self._transmit_handle is None:
            self._transmit_handle = self._loop.call_soon(self._transmit)

    def _transmit(self) -> None:
        self._transmit_handle = None
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        now = self._loop.time()
        try:
            datagrams = self._quic.datagrams_to_send(now=now)
        except BaseException as exc:
            _reraise_unless_stack_failure(exc)
            # Seen with a qh3 server and an aioquic client during the handshake
            # ("packet builder capacity exhausted"); the connection survives.
            level = logging.DEBUG if self._stack_warned else logging.WARNING
            self._stack_warned = True
            logger.log(level, "%s: stack failed building datagrams: %r", self.stack_name, exc)
            datagrams = []
        try:
            sendto_many = self._sendto_many
            if sendto_many is not None:
                batch: list[bytes] = []
                batch_addr: Any = None
                for data, addr in datagrams:
                    if batch and addr != batch_addr:
                        sendto_many(batch, batch_addr)
                        batch = []
                    batch.append(data)
                    batch_addr = addr
                if batch:
                    sendto_many(batch, batch_addr)
            else:
                for data, addr in datagrams:
                    transport.sendto(data, addr)
        except OSError as exc:
            logger.debug("%s: sendto failed: %s", self.stack_name, exc)
        self._rearm_timer()
        if self._blocked_writers:
            self._wake_writers()

    def _rearm_timer(self) -> None:
        """Keep one loop timer armed at or before the stack's next deadline.

        Called after every transmit. Stack deadlines mostly move *later* (each packet
        pushes the idle, ACK and loss timers out), so a timer already armed no later
        than the new deadline is kept; if it fires early, :meth:`_handle_timer` just
        re-arms it. Only an earlier deadline replaces it. This saves creating and
        cancelling a loop ``TimerHandle`` (and a dead entry in the loop's heap) on
        nearly every transmit.
        """
        try:
            timer_at = self._quic.get_timer()
        except BaseException as exc:
            _reraise_unless_stack_failure(exc)
            timer_at = None
        self._timer_at = timer_at
        if timer_at is None:
            return  # an armed timer finds nothing due and stops
        timer = self._timer
        if timer is not None:
            if self._timer_armed_at <= timer_at:
                return
            timer.cancel()
            self._timer = None
        if not self._closed.is_set():
            self._arm_timer(timer_at)

    def _arm_timer(self, timer_at: float) -> None:
        """Run :meth:`_handle_timer` at ``timer_at``.

        The selector sleeps in whole milliseconds (rounded up), so a deadline a few
        microseconds away (qh3's pacer spacing packets) would cost a full 1 ms
        stall; such deadlines are polled from the ready queue instead (a few loop
        turns, each doing other work too).
        """
        loop = self._loop
        now = loop.time()
        self._timer_armed_at = max(timer_at, now)
        if timer_at - now < _SPIN_WINDOW:
            self._timer = loop.call_soon(self._handle_timer)
        else:
            self._timer = loop.call_at(timer_at, self._handle_timer)

    def _handle_timer(self) -> None:
        self._timer = None
        if self._closed.is_set():
            return
        try:
            timer_at = self._quic.get_timer()
        except BaseException as exc:
            _reraise_unless_stack_failure(exc)
            timer_at = None
        self._timer_at = timer_at
        if timer_at is None:
            return
        now = self._loop.time()
        if timer_at > now + _CLOCK_RESOLUTION:
            # Not due yet: armed for a deadline that has since moved, or polling a
            # sub-millisecond one.
            self._arm_timer(timer_at)
            return
        try:
            self._quic.handle_timer(now=max(timer_at, now))
        except BaseException as exc:
            _reraise_unless_stack_failure(exc)
            logger.warning("%s: stack timer failed: %r", self.stack_name, exc)
        self._process_events()
        self._transmit()

    def _wake_writers(self) -> None:
        low = self._send_buffer // 2
        for state in list(self._blocked_writers):
            if state.send_done or self._send_queue_size(state.stream_id) <= low:
                self._blocked_writers.discard(state)
                _wake(state.write_waiter)

    def _process_events(self) -> None:
        ev = self.events
        quic = self._quic
        event = quic.next_event()
        while event is not None:
            if isinstance(event, ev.StreamDataReceived):
                self._on_stream_data(event.stream_id, event.data, event.end_stream)
            elif isinstance(event, ev.StreamReset):
                self._on_stream_reset(event.stream_id, event.error_code)
            elif isinstance(event, ev.StopSendingReceived):
                self._on_stop_sending(event.stream_id, event.error_code)
            elif isinstance(event, ev.ConnectionIdIssued):
                if self._cid_issued_callback is not None:
                    self._cid_issued_callback(event.connection_id)
            elif isinstance(event, ev.ConnectionIdRetired):
                if self._cid_retired_callback is not None:
                    self._cid_retired_callback(event.connection_id)
            elif isinstance(event, ev.HandshakeCompleted):
                logger.debug(
                    "%s: handshake completed (alpn=%s)", self.stack_name, event.alpn_protocol
                )
                if not self._handshake_done.done():
                    self._handshake_done.set_result(None)
            elif isinstance(event, ev.ConnectionTerminated):
                self._on_terminated(event.error_code, event.reason_phrase)
            event = quic.next_event()
        if self._is_open:
            self._check_stack_closing()
        if self._open_waiters and self._is_open:
            for fut in self._open_waiters:
                _wake(fut)

    def _check_stack_closing(self) -> None:
        """Notice a close the stack knows about before it reports termination.

        Both stacks record a peer's CONNECTION_CLOSE (or a fatal local error) in
        ``_close_event`` right away but emit ``ConnectionTerminated`` only after
        the draining period; pending operations must not wait that long.
        """
        info = getattr(self._quic, "_close_event", None)
        if info is None:
            return
        code = int(getattr(info, "error_code", 0))
        reason = str(getattr(info, "reason_phrase", ""))
        logger.info(
            "%s: connection closing (code %#x%s)",
            self.stack_name,
            code,
            f", {reason!r}" if reason else "",
        )
        self._is_open = False
        self._close_error = _connection_closed("connection closed", code, reason)
        self._fail_handshake()
        self._wake_all()

    def _is_peer_initiated(self, stream_id: int) -> bool:
        return (stream_id & 1) == (0 if not self._is_client else 1)

    def _state_for_event(self, stream_id: int) -> _StreamState | None:
        state = self._streams.get(stream_id)
        if state is not None:
            return state
        if not self._is_peer_initiated(stream_id) or stream_id & 2:
            if stream_id & 2 and self._is_peer_initiated(stream_id):
                # Unidirectional streams are not part of the contract: refuse them.
                logger.debug(
                    "%s: stopping peer unidirectional stream %d", self.stack_name, stream_id
                )
                with _best_effort("stopping a peer unidirectional stream"):
                    self._quic.stop_stream(stream_id, 0)
            return None
        if stream_id < self._next_peer_bidi:
            if stream_id not in self._unseen_peer_ids:
                return None
            self._unseen_peer_ids.discard(stream_id)
        else:
            # Lower ids are open in QUIC terms but become visible (accept_bi) only
            # when their first frame arrives, like the stream written first.
            self._unseen_peer_ids.update(range(self._next_peer_bidi, stream_id, 4))
            self._next_peer_bidi = stream_id + 4
        state = _StreamState(stream_id)
        self._streams[stream_id] = state
        if self._is_open:
            self._accept_queue.append((QuicSendStream(self, state), QuicRecvStream(self, state)))
            _wake(self._accept_waiter)
        return state

    def _on_stream_data(self, stream_id: int, data: bytes, end_stream: bool) -> None:
        state = self._state_for_event(stream_id)
        if state is None or state.stop_sent or state.reset_received is not None:
            return
        if data:
            state.chunks.append(data)
            state.recv_buffered += len(data)
            self._recv_buffered_total += len(data)
        if end_stream:
            state.fin_received = True
        _wake(state.read_waiter)
        self._recv_activity.set()

    def _on_stream_reset(self, stream_id: int, error_code: int) -> None:
        state = self._state_for_event(stream_id)
        if state is None or state.stop_sent:
            return
        logger.debug(
            "%s: stream %d reset by peer (code %d)", self.stack_name, stream_id, error_code
        )
        state.reset_received = error_code
        self._drop_recv_buffer(state)
        _wake(state.read_waiter)

    def _on_stop_sending(self, stream_id: int, error_code: int) -> None:
        state = self._streams.get(stream_id)
        if state is None:
            return
        logger.debug(
            "%s: stream %d stopped by peer (code %d)", self.stack_name, stream_id, error_code
        )
        if state.stop_received is None and not state.fin_sent and not state.reset_sent:
            state.stop_received = error_code
            with _best_effort("resetting a stream stopped by the peer"):
                self._quic.reset_stream(stream_id, error_code)
            self._transmit_soon()
        elif state.stop_received is None:
            state.stop_received = error_code
        self._blocked_writers.discard(state)
        _wake(state.write_waiter)
        self._maybe_forget(state)

    def _on_terminated(self, error_code: int, reason: str) -> None:
        if self._closed.is_set():
            return
        logger.info(
            "%s: connection terminated (code %#x%s)",
            self.stack_name,
            error_code,
            f", {reason!r}" if reason else "",
        )
        if self._close_error is None:
            self._close_error = _connection_closed("connection closed by peer", error_code, reason)
        self._fail_handshake()
        self._is_open = False
        self._closed.set()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._wake_all()
        self._paused_datagrams.clear()
        for callback in self._terminated_callbacks:
            try:
                callback(self)
            except Exception:  # pragma: no cover - defensive
                logger.exception("terminated callback failed")

    def _fail_handshake(self) -> None:
        """Fail a pending :meth:`wait_handshake` with the close reason."""
        if self._handshake_done.done():
            return
        error = self._error()
        exc: TransportError = error
        if is_certificate_alert(error.error_code):
            exc = CertificateError(
                f"TLS certificate rejected: {error.reason or hex(error.error_code)}"
            )
        self._handshake_done.set_exception(exc)
        self._handshake_done.exception()  # retrieved: no "never retrieved" warning

    def _wake_all(self) -> None:
        _wake(self._accept_waiter)
        for fut in self._open_waiters:
            _wake(fut)
        for state in self._streams.values():
            _wake(state.read_waiter)
            _wake(state.write_waiter)
        self._blocked_writers.clear()

    def _error(self) -> ConnectionClosed:
        if self._close_error is not None:
            return self._close_error
        return ConnectionClosed("connection closed")

    def _maybe_forget(self, state: _StreamState) -> None:
        if state.recv_done and state.send_done:
            self._streams.pop(state.stream_id, None)

    def _drop_recv_buffer(self, state: _StreamState) -> None:
        if state.recv_buffered:
            self._recv_buffered_total -= state.recv_buffered
            self._on_consumed(state, state.recv_buffered)
            state.recv_buffered = 0
            state.chunks.clear()
            state.head = 0
            self._maybe_resume_receiving()

    # ------------------------------------------------------------ stream ops

    async def _read(self, state: _StreamState, max_bytes: int) -> bytes:
        if max_bytes < 1:
            raise ValueError("max_bytes must be >= 1")
        while True:
            if state.reset_received is not None:
                state.recv_done = True
                self._maybe_forget(state)
                raise StreamReset(state.reset_received, state.stream_id)
            if state.stop_sent:
                raise TransportError(f"stream {state.stream_id}: reading after stop()")
            if state.recv_buffered:
                return self._take(state, max_bytes)
            if state.fin_received:
                state.recv_done = True
                self._maybe_forget(state)
                return b""
            if not self._is_open:
                raise self._error()
            fut = self._loop.create_future()
            state.read_waiter = fut
            try:
                await fut
            finally:
                state.read_waiter = None

    def _take(self, state: _StreamState, max_bytes: int) -> bytes:
        chunks = state.chunks
        first = chunks[0]
        head = state.head
        avail = len(first) - head
        if avail > max_bytes:
            out = first[head : head + max_bytes]
            state.head = head + max_bytes
        elif avail == max_bytes or len(chunks) == 1:
            out = first[head:] if head else first
            chunks.popleft()
            state.head = 0
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
            state.head = head
            out = b"".join(parts)
        self._account_read(state, len(out))
        return out

    def _account_read(self, state: _StreamState, n: int) -> None:
        state.recv_buffered -= n
        state.consumed += n
        self._recv_buffered_total -= n
        self._on_consumed(state, n)
        if self._receiving_paused:
            self._maybe_resume_receiving()

    def _stop(self, state: _StreamState, code: int) -> None:
        code = _valid_code(code, "stop")
        if state.stop_sent or state.recv_done or self._closed.is_set():
            state.recv_done = True
            return
        state.stop_sent = True
        state.recv_done = True
        if not state.fin_received and state.reset_received is None:
            try:
                self._quic.stop_stream(state.stream_id, code)
            except Exception as exc:
                logger.debug(
                    "%s: stop_stream(%d) failed: %r", self.stack_name, state.stream_id, exc
                )
            self._transmit_soon()
        self._drop_recv_buffer(state)
        _wake(state.read_waiter)
        self._maybe_forget(state)

    def _check_writable(self, state: _StreamState) -> None:
        if state.stop_received is not None:
            raise StreamStopped(state.stop_received, state.stream_id)
        if not self._is_open:
            raise self._error()
        if state.reset_sent:
            raise TransportError(f"stream {state.stream_id}: write after reset()")
        if state.fin_sent:
            raise TransportError(f"stream {state.stream_id}: write after finish()")

    async def _write(self, state: _StreamState, data: bytes | bytearray | memoryview) -> None:
        self._check_writable(state)
        view = memoryview(data).cast("B") if not isinstance(data, bytes) else data
        total = len(view)
        if total == 0:
            return
        limit = self._send_buffer
        offset = 0
        sid = state.stream_id
        while offset < total:
            self._check_writable(state)
            piece = view[offset : offset + limit]
            self._stack_send(state, piece, False)
            offset += len(piece)
            self._transmit_soon()
            while self._send_queue_size(sid) >= limit:
                self._check_writable(state)
                fut = self._loop.create_future()
                state.write_waiter = fut
                self._blocked_writers.add(state)
                try:
                    await fut
                finally:
                    state.write_waiter = None
                    self._blocked_writers.discard(state)
        self._check_writable(state)

    def _stack_send(self, state: _StreamState, data: Any, fin: bool) -> None:
        try:
            self._quic.send_stream_data(state.stream_id, data, end_stream=fin)
        except Exception as exc:
            # Most failures here mean the connection or stream is going away:
            # report that precisely if we can tell, else as a TransportError.
            self._check_stack_closing()
            self._check_writable(state)
            raise TransportError(f"stream {state.stream_id}: send failed: {exc}") from exc

    async def _finish(self, state: _StreamState) -> None:
        if state.fin_sent:
            return
        if state.stop_received is not None:
            raise StreamStopped(state.stop_received, state.stream_id)
        if not self._is_open:
            raise self._error()
        if state.reset_sent:
            return
        self._stack_send(state, b"", True)
        state.fin_sent = True
        self._transmit_soon()
        self._maybe_forget(state)

    def _reset(self, state: _StreamState, code: int) -> None:
        code = _valid_code(code, "reset")
        if state.reset_sent or state.fin_sent or state.stop_received is not None:
            state.reset_sent = True
            return
        state.reset_sent = True
        if self._is_open:
            try:
                self._quic.reset_stream(state.stream_id, code)
            except Exception as exc:
                logger.debug(
                    "%s: reset_stream(%d) failed: %r", self.stack_name, state.stream_id, exc
                )
            self._transmit_soon()
        self._blocked_writers.discard(state)
        _wake(state.write_waiter)
        self._maybe_forget(state)

    # -------------------------------------------------------- Connection API

    async def open_bi(self) -> tuple[SendStream, RecvStream]:
        while True:
            if not self._is_open:
                raise self._error()
            if self._bidi_slot_available():
                break
            fut = self._loop.create_future()
            self._open_waiters.append(fut)
            try:
                await fut
            finally:
                self._open_waiters.remove(fut)
        with convert_stack_errors("open_bi"):
            stream_id = self._allocate_bidi()
        state = _StreamState(stream_id)
        self._streams[stream_id] = state
        logger.debug("%s: opened stream %d", self.stack_name, stream_id)
        return QuicSendStream(self, state), QuicRecvStream(self, state)

    async def accept_bi(self) -> tuple[SendStream, RecvStream] | None:
        while True:
            if self._accept_queue:
                return self._accept_queue.popleft()
            if not self._is_open:
                return None
            fut = self._loop.create_future()
            self._accept_waiter = fut
            try:
                await fut
            finally:
                self._accept_waiter = None

    def close(self, code: int = 0, reason: bytes = b"") -> None:
        if not self._is_open:
            return
        code = _valid_code(code, "close")
        text = bytes(reason).decode("utf-8", "replace")
        logger.info(
            "%s: closing connection (code %d%s)",
            self.stack_name,
            code,
            f", {text!r}" if text else "",
        )
        self._is_open = False
        self._close_error = ConnectionClosed(
            f"connection closed locally (code {code})", error_code=code, reason=text
        )
        try:
            self._quic.close(error_code=code, reason_phrase=text)
        except Exception as exc:
            logger.debug("%s: close failed: %r", self.stack_name, exc)
        self._transmit()
        self._wake_all()
        self._fail_handshake()

    @property
    def is_open(self) -> bool:
        return self._is_open

    async def wait_closed(self) -> None:
        await self._closed.wait()

    @property
    def remote_address(self) -> tuple[str, int]:
        addr = self._peer_addr
        if not addr:
            return ("", 0)
        host = str(addr[0])
        if host.startswith("::ffff:"):
            host = host[len("::ffff:") :]
        return (host, int(addr[1]))

    @property
    def peer_certificate(self) -> bytes | None:
        with _best_effort("reading the peer certificate"):
            return self._peer_certificate_der()
        return None  # treated as "no certificate": pins and direct trust then fail

    def abort(self) -> None:
        """Drop the connection without waiting for the close handshake (cleanup path)."""
        if not self._closed.is_set():
            self.close()
            self._on_terminated(0, "aborted")


class StackServer:
    """UDP dispatcher for one server socket: routes datagram batches to connections.

    Batches arrive grouped by source address (see :mod:`._udp`), are routed by
    destination connection id and handed to the connection in one call, so one
    connection processes a whole burst of packets before it transmits once.
    Subclasses set :attr:`connection_class` and :attr:`encode_version_negotiation`
    and provide :meth:`_parse_header`.
    """

    connection_class: ClassVar[type[StackConnection]]
    #: The stack's ``encode_quic_version_negotiation`` (as a staticmethod).
    encode_version_negotiation: ClassVar[Callable[..., bytes]]

    def __init__(
        self,
        configuration: Any,
        on_connection: Callable[[Any], Awaitable[None]],
        *,
        send_buffer: int = DEFAULT_SEND_BUFFER,
        max_streams: int = DEFAULT_MAX_STREAMS,
        handshake_timeout: float = 10.0,
        max_handshakes: int = DEFAULT_MAX_HANDSHAKES,
    ) -> None:
        self._configuration = configuration
        #: Connections allowed in their handshake at once (see DEFAULT_MAX_HANDSHAKES).
        self.max_handshakes = max_handshakes
        self._handshaking = 0
        self._handshake_limit_warned = False
        self._constructor_failed = False
        self._send_buffer = send_buffer
        self._max_streams = max_streams
        self._on_connection = on_connection
        #: Seconds a new connection may take to complete its handshake.
        self.handshake_timeout = handshake_timeout
        self._cid_length: int = configuration.connection_id_length
        self._supported_versions: list[int] = list(configuration.supported_versions)
        self._loop = asyncio.get_running_loop()
        self._connections: dict[bytes, StackConnection] = {}
        self._all: set[StackConnection] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._transport: asyncio.DatagramTransport | None = None
        self._closing = False
        self._close_requested = asyncio.Event()
        self._closed = asyncio.Event()

    # hooks -----------------------------------------------------------------

    def _parse_header(self, data: bytes) -> tuple[int | None, bool, bytes, bytes] | None:
        """Return ``(version, is_initial, destination_cid, source_cid)`` or None."""
        raise NotImplementedError

    def _version_negotiation(self, dcid: bytes, scid: bytes) -> bytes:
        return bytes(
            self.encode_version_negotiation(
                source_cid=dcid,
                destination_cid=scid,
                supported_versions=self._supported_versions,
            )
        )

    def _new_connection(self, original_dcid: bytes) -> StackConnection:
        return self.connection_class.create(
            self._configuration,
            max_streams=self._max_streams,
            send_buffer=self._send_buffer,
            original_dcid=original_dcid,
        )

    # wiring ----------------------------------------------------------------

    def set_transport(self, transport: asyncio.DatagramTransport) -> None:
        self._transport = transport

    def datagrams_received(self, datagrams: list[bytes], addr: Any) -> None:
        if self._closing:
            return
        batch: list[bytes] = []
        target: StackConnection | None = None
        connections = self._connections
        cid_end = 1 + self._cid_length
        for data in datagrams:
            # Fast path for 1-RTT (short header) packets, nearly all of them: the
            # destination connection id follows the first byte, no parsing needed.
            if data and not data[0] & 0x80:
                conn = connections.get(data[1:cid_end])
            else:
                conn = self._route(data, addr)
            if conn is not target:
                if batch and target is not None:
                    target.datagrams_received(batch, addr)
                batch = []
                target = conn
            if conn is not None:
                batch.append(data)
        if batch and target is not None:
            target.datagrams_received(batch, addr)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed.set()

    def _route(self, data: bytes, addr: Any) -> StackConnection | None:
        try:
            header = self._parse_header(data)
        except BaseException as exc:
            _reraise_unless_stack_failure(exc)
            header = None
        if header is None:
            return None
        version, is_initial, dcid, scid = header
        if version is not None and version not in self._supported_versions:
            if self._transport is not None:
                self._transport.sendto(self._version_negotiation(dcid, scid), addr)
            return None
        conn = self._connections.get(dcid)
        if conn is None and is_initial and len(data) >= 1200:
            if self._handshaking >= self.max_handshakes:
                level = logging.DEBUG if self._handshake_limit_warned else logging.WARNING
                self._handshake_limit_warned = True
                logger.log(
                    level,
                    "server: %d handshakes in progress (max_handshakes); dropping Initial from %s",
                    self._handshaking,
                    addr,
                )
                return None
            try:
                conn = self._new_connection(dcid)
            except Exception:
                # Any peer can trigger this with one datagram: the traceback once, then
                # one debug line per Initial (no error flood).
                if self._constructor_failed:
                    logger.debug("cannot create a connection for %s", addr, exc_info=True)
                else:
                    self._constructor_failed = True
                    logger.exception("cannot create a connection for %s", addr)
                return None
            self._register(conn, dcid, addr)
        return conn

    def _register(self, conn: StackConnection, dcid: bytes, addr: Any) -> None:
        assert self._transport is not None
        conn.attach(self._transport, addr)
        self._connections[dcid] = conn
        host_cid = getattr(conn._quic, "host_cid", None)
        if host_cid is not None:
            self._connections[host_cid] = conn
        self._all.add(conn)

        def issued(cid: bytes) -> None:
            self._connections[cid] = conn

        def retired(cid: bytes) -> None:
            if self._connections.get(cid) is conn:
                del self._connections[cid]

        conn._cid_issued_callback = issued
        conn._cid_retired_callback = retired
        conn.on_terminated(self._forget)
        self._handshaking += 1  # until _run sees the handshake end (either way)
        task = self._loop.create_task(self._run(conn))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _forget(self, conn: StackConnection) -> None:
        for cid in [c for c, v in self._connections.items() if v is conn]:
            del self._connections[cid]
        self._all.discard(conn)

    async def _run(self, conn: StackConnection) -> None:
        try:
            async with asyncio.timeout(self.handshake_timeout):
                await conn.wait_handshake()
        except TransportError as exc:
            logger.info(
                "%s server: handshake failed from %s: %s", conn.stack_name, conn.remote_address, exc
            )
            conn.abort()
            return
        except TimeoutError:
            # Garbage or spoofed Initials would otherwise hold state until the idle
            # timeout; a handshake that does not finish in time is dropped silently.
            logger.debug("%s server: no handshake from %s", conn.stack_name, conn.remote_address)
            conn.abort()
            return
        finally:
            self._handshaking -= 1
        logger.info("%s server: connection from %s", conn.stack_name, conn.remote_address)
        try:
            await self._on_connection(conn)
        except asyncio.CancelledError:
            pass
        except Exception:
            logger.exception("connection handler failed for %s", conn.remote_address)
        finally:
            if conn.is_open:
                conn.close()

    # public ----------------------------------------------------------------

    @property
    def address(self) -> tuple[str, int]:
        if self._transport is None:
            return ("", 0)
        name = self._transport.get_extra_info("sockname")
        return (str(name[0]), int(name[1]))

    def close(self) -> None:
        """Stop accepting and close every connection (their handlers see it)."""
        if self._closing:
            return
        self._closing = True
        self._close_requested.set()
        logger.info("server on %s:%d closing", *self.address)
        for conn in list(self._all):
            conn.close()
        for task in list(self._tasks):
            task.cancel()

    async def wait_closed(self) -> None:
        """Wait until :meth:`close` was called, then (bounded) for handlers and
        connections to finish; finally release the socket."""
        await self._close_requested.wait()
        tasks = list(self._tasks)
        if tasks:
            await asyncio.wait(tasks, timeout=5.0)
        pending = [c for c in self._all if not c._closed.is_set()]
        if pending:
            waiters = [self._loop.create_task(c.wait_closed()) for c in pending]
            _, late = await asyncio.wait(waiters, timeout=2.0)
            for waiter in late:
                waiter.cancel()
            if late:
                await asyncio.wait(late)
        for conn in list(self._all):
            conn.abort()
        if self._transport is not None:
            self._transport.close()
        self._closed.set()


class _ClientEndpoint:
    """Feeds a client socket's datagram batches to its one connection."""

    def __init__(self, conn: StackConnection) -> None:
        self._conn = conn

    def datagrams_received(self, datagrams: list[bytes], addr: Any) -> None:
        self._conn.datagrams_received(datagrams, addr)

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None:
            logger.debug("client socket lost: %s", exc)


async def client_handshake(
    conn: StackConnection,
    host: str,
    port: int,
    *,
    handshake_timeout: float,
    socket_buffer: int = DEFAULT_SOCKET_BUFFER,
) -> None:
    """Open a client socket for ``conn``, start the handshake and wait for it.

    The socket is closed when the connection terminates.

    Raises:
        CertificateError: the peer's certificate was rejected.
        ConnectionClosed: the peer closed the connection during the handshake.
        TransportError: resolution/socket failure, or no handshake within ``handshake_timeout``.
    """
    loop = asyncio.get_running_loop()
    with convert_stack_errors(f"connect to {host}:{port}"):
        transport, addr = await open_udp_endpoint(
            _ClientEndpoint(conn), host, port, remote=True, socket_buffer=socket_buffer
        )
    conn.attach(transport, addr)
    conn.on_terminated(lambda _conn: transport.close())
    family = socket.AF_INET6 if len(addr) == 4 else socket.AF_INET
    conn._route_known(route_max_udp_payload(family, addr))
    try:
        with convert_stack_errors("starting handshake"):
            conn._quic.connect(addr, now=loop.time())
        conn._transmit()
        async with asyncio.timeout(handshake_timeout):
            await conn.wait_handshake()
    except TimeoutError as exc:
        conn.abort()
        transport.close()
        raise TransportError(
            f"QUIC handshake with {host}:{port} timed out after {handshake_timeout}s"
        ) from exc
    except BaseException:
        conn.abort()
        transport.close()
        raise
    logger.info("%s: connected to %s:%d", conn.stack_name, host, port)


async def stack_connect(
    connection_class: type[_Conn],
    host: str,
    port: int,
    *,
    configuration: Any,
    handshake_timeout: float,
    send_buffer: int,
    socket_buffer: int,
    max_streams: int,
) -> _Conn:
    """Create a client connection of ``connection_class`` and run its handshake.

    Raises:
        CertificateError: the server's certificate was rejected.
        ConnectionClosed: the server closed the connection during the handshake.
        TransportError: the configuration is not a client one, no handshake within
            ``handshake_timeout`` seconds, or resolution/socket failure.
    """
    if not configuration.is_client:
        raise TransportError("connect() needs a client configuration (is_client=True)")
    conn = connection_class.create(configuration, max_streams=max_streams, send_buffer=send_buffer)
    await client_handshake(
        conn, host, port, handshake_timeout=handshake_timeout, socket_buffer=socket_buffer
    )
    return conn


async def stack_serve(
    server_class: type[_Server],
    host: str,
    port: int,
    *,
    configuration: Any,
    on_connection: Callable[[Any], Awaitable[None]],
    send_buffer: int,
    socket_buffer: int,
    max_streams: int,
    handshake_timeout: float,
    max_handshakes: int = DEFAULT_MAX_HANDSHAKES,
) -> _Server:
    """Bind a UDP endpoint on ``(host, port)`` and serve it with ``server_class``.

    Raises:
        TransportError: the address cannot be bound or the configuration is unusable.
    """
    if configuration.is_client:
        raise TransportError("serve() needs a server configuration (is_client=False)")
    if configuration.certificate is None or configuration.private_key is None:
        raise TransportError("serve() needs a certificate and private key in the configuration")
    server = server_class(
        configuration,
        on_connection,
        send_buffer=send_buffer,
        max_streams=max_streams,
        handshake_timeout=handshake_timeout,
        max_handshakes=max_handshakes,
    )
    with convert_stack_errors(f"binding UDP {host}:{port}"):
        transport, _ = await open_udp_endpoint(server, host, port, socket_buffer=socket_buffer)
    server.set_transport(transport)
    logger.info("%s: serving on %s:%d", server.connection_class.stack_name, *server.address)
    return server

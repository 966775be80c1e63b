"""The stack driver: runs one sans-IO QUIC connection object (qh3 or aioquic) on asyncio.

Both stacks expose the same shape (``receive_datagram`` / ``datagrams_to_send`` /
``get_timer`` / ``handle_timer`` / ``next_event`` and the same event classes), typed
by :class:`~._stack.QuicStack`. :class:`StackConnection` owns that object and does
three things with it:

* **I/O**: datagrams from the socket go through the receive gate
  (:class:`~._gate.ReceiveGate`) into the stack; after every batch, timer or
  stream operation the stack's outgoing datagrams are sent (batched per address);
* **timers**: one loop timer armed at or before the stack's next deadline;
* **events**: stack events are dispatched by type to stream state
  (:class:`~._streams.StreamTable`), the handshake future and
  the termination callbacks.

The stream halves (:mod:`._streams`) and the :class:`~.base.Connection` methods
(open/accept/close) sit on top. Every stack call is guarded by a
:class:`~._errors.StackCall`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, cast

from ..errors import (
    CertificateError,
    ConnectionClosed,
    DatagramsUnavailable,
    DatagramTooLarge,
    TransportError,
)
from ._errors import StackCall, connection_closed, is_certificate_alert, stack_call, valid_code
from ._gate import ReceiveGate
from ._options import TransportOptions
from ._stack import StackHooks
from ._streams import (
    QuicRecvStream,
    QuicSendStream,
    StreamState,
    StreamTable,
    check_writable,
    wake,
)
from .base import Connection, PathStats, RecvStream, SendStream

if TYPE_CHECKING:
    from ._stack import QuicStack, StackSpec

__all__ = ["StackConnection"]

logger = logging.getLogger("quic_reverse.transport")

# The event loop runs timers up to this early (asyncio's own slack).
_CLOCK_RESOLUTION = time.get_clock_info("monotonic").resolution
# Stack deadlines closer than this are polled rather than slept on (see _arm_timer).
_SPIN_WINDOW = 200e-6
# Datagram budget (RFC 9221) inside one packet of the configured size: the largest
# 1-RTT header (1 + 20-byte connection id + 4-byte packet number), the AEAD tag, and
# the DATAGRAM frame's type and a length of up to 4 bytes.
_DATAGRAM_PACKET_OVERHEAD = 1 + 20 + 4 + 16 + 1 + 4
# Datagrams queued in a stack (not yet in a packet) past which new ones are dropped:
# datagrams wait for congestion window like everything else, but must not pile up.
_DATAGRAM_BACKLOG = 1024


class _SendToMany(Protocol):
    def __call__(self, datagrams: list[bytes], addr: Any, /) -> None: ...


# The fields of the stack events the driver reads (same names in qh3 and aioquic).
class _StreamDataEvent(Protocol):
    stream_id: int
    data: bytes
    end_stream: bool


class _StreamCodeEvent(Protocol):  # StreamReset, StopSendingReceived
    stream_id: int
    error_code: int


class _ConnectionIdEvent(Protocol):
    connection_id: bytes


class _HandshakeEvent(Protocol):
    alpn_protocol: str | None


class _TerminatedEvent(Protocol):
    error_code: int
    reason_phrase: str


class StackConnection(Connection):
    """Asyncio driver for a sans-IO QUIC connection object (see the module docstring).

    Created by the client (:mod:`._client`) or the server dispatcher
    (:mod:`._server`), which feed it datagrams with :meth:`datagrams_received` and
    give it the datagram transport to send through with :meth:`attach`.
    """

    def __init__(
        self,
        spec: StackSpec[Any],
        quic: QuicStack,
        *,
        is_client: bool,
        options: TransportOptions,
        receive_high_water: int,
    ) -> None:
        self._spec = spec
        self.stack_name = spec.name
        self._quic = quic
        self._is_client = is_client
        self._loop = asyncio.get_running_loop()
        self._send_buffer = max(1024, options.send_buffer)
        self._transport: asyncio.DatagramTransport | None = None
        self._sendto_many: _SendToMany | None = None
        self._peer_addr: Any = None
        self._timer: asyncio.Handle | None = None
        self._timer_armed_at = 0.0  # the loop time self._timer runs at
        self._transmit_handle: asyncio.Handle | None = None
        #: One-shot callbacks run at the next transmit, before packets are built.
        self.before_transmit: list[Callable[[], None]] = []
        self._table = StreamTable(is_client=is_client)
        self._open_waiters: list[asyncio.Future[None]] = []
        self._blocked_writers: set[StreamState] = set()
        self._is_open = True
        self._close_error: ConnectionClosed | None = None
        self._closed = asyncio.Event()
        self._handshake_done: asyncio.Future[None] = self._loop.create_future()
        self._terminated_callbacks: list[Callable[[StackConnection], None]] = []
        self._cid_issued_callback: Callable[[bytes], None] | None = None
        self._cid_retired_callback: Callable[[bytes], None] | None = None
        self._recv_activity = asyncio.Event()
        self._gate = ReceiveGate(
            max(64 * 1024, receive_high_water),
            self._feed,
            pausing=spec.receive_gate,
            on_pause=self._recv_activity.set,
        )
        quic.qr_unread = self._unread
        # Optional hooks the stack does not override are not called per packet/read.
        hooks = type(quic)
        self._flush_needed: Callable[[], bool] | None = (
            quic.qr_flush_needed
            if getattr(hooks, "qr_flush_needed", None) is not StackHooks.qr_flush_needed
            else None
        )
        self._credit_consumed: Callable[[int, int], bool] | None = (
            quic.qr_consumed
            if getattr(hooks, "qr_consumed", None) is not StackHooks.qr_consumed
            else None
        )
        name = spec.name
        self._guard_feed = StackCall(f"{name}: incoming datagrams", on_error="log", warn_once=True)
        # Seen with a qh3 server and an aioquic client during the handshake
        # ("packet builder capacity exhausted"); the connection survives.
        self._guard_build = StackCall(f"{name}: building datagrams", on_error="log", warn_once=True)
        self._guard_timer = StackCall(f"{name}: stack timer", on_error="log", warn_once=True)
        self._guard_quiet = StackCall(f"{name}: reading the stack timer", on_error="log")
        self._guard_stop = StackCall(f"{name}: stop_stream", on_error="log")
        self._guard_reset = StackCall(f"{name}: reset_stream", on_error="log")
        self._guard_close = StackCall(f"{name}: close", on_error="log")
        self._dispatch: dict[type, Callable[[Any], None]] = {
            spec.events.stream_data: self._on_stream_data,
            spec.events.stream_reset: self._on_stream_reset,
            spec.events.stop_sending: self._on_stop_sending,
            spec.events.connection_id_issued: self._on_cid_issued,
            spec.events.connection_id_retired: self._on_cid_retired,
            spec.events.handshake_completed: self._on_handshake_completed,
            spec.events.connection_terminated: self._on_connection_terminated,
        }
        self._datagram_handler: Callable[[bytes], None] | None = None
        #: Datagrams dropped locally: backlog full at send, or no handler at receive.
        self.datagrams_dropped = 0
        #: UDP datagrams handed to the socket (``path_stats().packets_sent`` for qh3).
        self._datagrams_sent = 0
        if spec.events.datagram_frame_received is not None:
            self._dispatch[spec.events.datagram_frame_received] = self._on_datagram

    def _unread(self) -> int:
        return self._gate.unread

    # ---------------------------------------------------------------- wiring

    def attach(self, transport: asyncio.DatagramTransport, peer_addr: Any) -> None:
        """Use ``transport`` to send datagrams to ``peer_addr``."""
        self._transport = transport
        self._peer_addr = peer_addr
        self._sendto_many = cast("_SendToMany | None", getattr(transport, "sendto_many", None))

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
    def handshake_complete(self) -> bool:
        return self._handshake_done.done() and self._handshake_done.exception() is None

    @property
    def receiving_paused(self) -> bool:
        """True while incoming datagrams are held back (receive high-water reached)."""
        return self._gate.paused

    async def wait_receive_activity(self) -> None:
        """Wait until stream data arrives or receiving pauses (diagnostics, tests).

        Check your condition, then call this; nothing can slip in between because
        the check and the wait start in the same event-loop step.
        """
        self._recv_activity.clear()
        await self._recv_activity.wait()

    # ------------------------------------------------------- datagrams in/out

    def datagrams_received(self, datagrams: list[bytes], addr: Any) -> None:
        """Feed datagrams (all from ``addr``) to the stack (through the gate) and react."""
        if self._closed.is_set():
            return
        self._gate.receive(datagrams, addr)
        self._transmit()

    def datagram_received(self, data: bytes, addr: Any) -> None:
        """Single-datagram entry point (asyncio.DatagramProtocol compatible)."""
        self.datagrams_received([data], addr)

    def _feed(self, datagrams: list[bytes], addr: Any) -> None:
        """The gate's feed: hand a slice to the stack, then process its events."""
        try:
            self._quic.qr_feed(datagrams, addr, self._loop.time())
        except BaseException as exc:  # per packet: a plain try, the guard's policy
            self._guard_feed.handle(exc)
        self._process_events()

    def _transmit_soon(self) -> None:
        if self._transmit_handle is None:
            self._transmit_handle = self._loop.call_soon(self._transmit)

    def _transmit(self) -> None:
        if self.before_transmit:  # their writes join this transmit (see call_before_send)
            callbacks = self.before_transmit
            self.before_transmit = []
            for callback in callbacks:
                callback()
        self._transmit_handle = None
        self._send_datagrams()
        if self._flush_needed is not None and self._flush_needed():
            self._send_datagrams()
        self._rearm_timer()
        if self._blocked_writers:
            self._wake_writers()

    def _send_datagrams(self) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        try:
            datagrams = self._quic.datagrams_to_send(now=self._loop.time())
        except BaseException as exc:  # per packet: a plain try, the guard's policy
            self._guard_build.handle(exc)
            datagrams = []
        self._datagrams_sent += len(datagrams)
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

    # ----------------------------------------------------------------- timers

    def _stack_timer(self) -> float | None:
        try:
            return self._quic.get_timer()
        except BaseException as exc:  # per packet: a plain try, the guard's policy
            self._guard_quiet.handle(exc)
            return None

    def _rearm_timer(self) -> None:
        """Keep one loop timer armed at or before the stack's next deadline.

        Called after every transmit. Stack deadlines mostly move *later* (each packet
        pushes the idle, ACK and loss timers out), so a timer already armed no later
        than the new deadline is kept; if it fires early, :meth:`_handle_timer` just
        re-arms it. Only an earlier deadline replaces it. This saves creating and
        cancelling a loop ``TimerHandle`` on nearly every transmit.
        """
        timer_at = self._stack_timer()
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
        timer_at = self._stack_timer()
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
            self._guard_timer.handle(exc)
        self._process_events()
        self._transmit()

    # ----------------------------------------------------------------- events

    def _process_events(self) -> None:
        quic = self._quic
        dispatch = self._dispatch
        event = quic.next_event()
        while event is not None:
            handler = dispatch.get(type(event))
            if handler is not None:
                handler(event)
            event = quic.next_event()
        if self._is_open:
            self._check_stack_closing()
        if self._open_waiters and self._is_open:
            for fut in self._open_waiters:
                wake(fut)

    def _on_cid_issued(self, event: _ConnectionIdEvent) -> None:
        if self._cid_issued_callback is not None:
            self._cid_issued_callback(event.connection_id)

    def _on_cid_retired(self, event: _ConnectionIdEvent) -> None:
        if self._cid_retired_callback is not None:
            self._cid_retired_callback(event.connection_id)

    def _on_handshake_completed(self, event: _HandshakeEvent) -> None:
        logger.debug("%s: handshake completed (alpn=%s)", self.stack_name, event.alpn_protocol)
        if not self._handshake_done.done():
            self._handshake_done.set_result(None)

    def _on_connection_terminated(self, event: _TerminatedEvent) -> None:
        self._on_terminated(int(event.error_code), str(event.reason_phrase))

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
        self._close_error = connection_closed("connection closed", code, reason)
        self._fail_handshake()
        self._wake_all()

    def _state_for_event(self, stream_id: int) -> StreamState | None:
        state, new = self._table.for_frame(stream_id)
        if new:
            assert state is not None
            if self._is_open:
                self._table.push_accepted(
                    (QuicSendStream(self, state), QuicRecvStream(self, state))
                )
        elif state is None and stream_id & 2 and self._table.is_peer_initiated(stream_id):
            # Unidirectional streams are not part of the contract: refuse them.
            logger.debug("%s: stopping peer unidirectional stream %d", self.stack_name, stream_id)
            with self._guard_stop:
                self._quic.stop_stream(stream_id, 0)
        return state

    def _on_stream_data(self, event: _StreamDataEvent) -> None:
        state = self._state_for_event(event.stream_id)
        if state is None or state.stop_sent or state.reset_received is not None:
            return
        data = event.data
        if data:
            state.push(data)
            self._gate.delivered(len(data))
        if event.end_stream:
            state.fin_received = True
        callback = state.data_callback
        if callback is not None and data:
            callback()  # may take the data now (see RecvStream.set_data_callback)
            if state.recv_buffered or state.fin_received:
                wake(state.read_waiter)
        else:
            wake(state.read_waiter)
        self._recv_activity.set()

    def _on_stream_reset(self, event: _StreamCodeEvent) -> None:
        stream_id = event.stream_id
        state = self._state_for_event(stream_id)
        if state is None or state.stop_sent:
            return
        logger.debug(
            "%s: stream %d reset by peer (code %d)", self.stack_name, stream_id, event.error_code
        )
        state.reset_received = int(event.error_code)
        self._drop_recv_buffer(state)
        wake(state.read_waiter)

    def _on_stop_sending(self, event: _StreamCodeEvent) -> None:
        stream_id = event.stream_id
        error_code = int(event.error_code)
        state = self._table.live.get(stream_id)
        if state is None:
            return
        logger.debug(
            "%s: stream %d stopped by peer (code %d)", self.stack_name, stream_id, error_code
        )
        if state.stop_received is None and not state.fin_sent and not state.reset_sent:
            state.stop_received = error_code
            with self._guard_reset:
                self._quic.reset_stream(stream_id, error_code)
            self._transmit_soon()
        elif state.stop_received is None:
            state.stop_received = error_code
        self._blocked_writers.discard(state)
        wake(state.write_waiter)
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
            self._close_error = connection_closed("connection closed by peer", error_code, reason)
        self._fail_handshake()
        self._is_open = False
        self._closed.set()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._wake_all()
        self._gate.close()
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
        self._table.wake_all()
        for fut in self._open_waiters:
            wake(fut)
        self._blocked_writers.clear()

    def _wake_writers(self) -> None:
        low = self._send_buffer // 2
        for state in list(self._blocked_writers):
            if state.send_done or self._send_queue_size(state.stream_id) <= low:
                self._blocked_writers.discard(state)
                wake(state.write_waiter)

    def _error(self) -> ConnectionClosed:
        if self._close_error is not None:
            return self._close_error
        return ConnectionClosed("connection closed")

    # ------------------------------------------------- used by the stream halves

    def _send_queue_size(self, stream_id: int) -> int:
        """Bytes written to the stack for this stream and not yet sent."""
        return self._quic.qr_send_queue_size(stream_id)

    def _stack_send(self, state: StreamState, data: bytes | memoryview, fin: bool) -> None:
        try:
            # Both stacks accept any buffer and copy it before returning.
            self._quic.send_stream_data(state.stream_id, cast(bytes, data), end_stream=fin)
        except Exception as exc:
            # Most failures here mean the connection or stream is going away:
            # report that precisely if we can tell, else as a TransportError.
            self._check_stack_closing()
            check_writable(self, state)
            raise TransportError(f"stream {state.stream_id}: send failed: {exc}") from exc

    def _consumed(self, state: StreamState, nbytes: int) -> None:
        """The application read ``nbytes`` of ``state``'s stream."""
        credit = self._credit_consumed
        if credit is not None and credit(state.stream_id, nbytes):
            self._transmit_soon()
        if self._gate.consumed(nbytes):
            self._transmit()

    def _drop_recv_buffer(self, state: StreamState) -> None:
        dropped = state.clear()
        if dropped:
            self._consumed(state, dropped)

    def _maybe_forget(self, state: StreamState) -> None:
        if self._table.forget_if_done(state):
            self._quic.qr_forget(state.stream_id)

    # ------------------------------------------------------------- datagrams

    def _on_datagram(self, event: Any) -> None:
        handler = self._datagram_handler
        if handler is None:
            self.datagrams_dropped += 1
            return
        try:
            handler(bytes(event.data))
        except Exception:
            logger.exception("%s: datagram handler failed; datagram dropped", self.stack_name)

    @property
    def max_datagram_size(self) -> int | None:
        quic: Any = self._quic
        remote = getattr(quic, "_remote_max_datagram_frame_size", None)
        configuration = getattr(quic, "_configuration", None)
        local = getattr(configuration, "max_datagram_frame_size", None)
        if self._spec.events.datagram_frame_received is None or not remote or not local:
            return None
        packet = int(getattr(configuration, "max_datagram_size", 1200))
        limit = min(packet - _DATAGRAM_PACKET_OVERHEAD, int(remote) - 5)
        return limit if limit > 0 else None

    def send_datagram(self, data: bytes | bytearray | memoryview) -> None:
        if not self._is_open:
            raise self._error()
        limit = self.max_datagram_size
        if limit is None:
            raise DatagramsUnavailable(
                f"{self.stack_name}: the peer accepts no QUIC datagrams (RFC 9221)"
            )
        if len(data) > limit:
            raise DatagramTooLarge(len(data), limit)
        quic: Any = self._quic
        pending = getattr(quic, "_datagrams_pending", None)  # aioquic's queue
        if pending is not None and len(pending) >= _DATAGRAM_BACKLOG:
            self.datagrams_dropped += 1
            return
        with stack_call(f"{self.stack_name}: send_datagram"):
            quic.send_datagram_frame(bytes(data))
        self._transmit_soon()

    def set_datagram_handler(self, handler: Callable[[bytes], None] | None) -> None:
        self._datagram_handler = handler

    # -------------------------------------------------------- Connection API

    async def open_bi(self) -> tuple[SendStream, RecvStream]:
        quic = self._quic
        while True:
            if not self._is_open:
                raise self._error()
            if quic.qr_bidi_slot_available():
                break
            fut = self._loop.create_future()
            self._open_waiters.append(fut)
            try:
                await fut
            finally:
                self._open_waiters.remove(fut)
        with stack_call("open_bi"):
            stream_id = quic.qr_allocate_bidi()
        return self._opened(stream_id)

    def try_open_bi(self) -> tuple[SendStream, RecvStream] | None:
        quic = self._quic
        if not self._is_open or not quic.qr_bidi_slot_available():
            return None
        try:
            stream_id = quic.qr_allocate_bidi()
        except Exception:  # open_bi() reports why
            return None
        return self._opened(stream_id)

    def _opened(self, stream_id: int) -> tuple[SendStream, RecvStream]:
        state = self._table.add_local(stream_id)
        logger.debug("%s: opened stream %d", self.stack_name, stream_id)
        return QuicSendStream(self, state), QuicRecvStream(self, state)

    async def accept_bi(self) -> tuple[SendStream, RecvStream] | None:
        table = self._table
        while True:
            if table.accept_queue:
                return table.accept_queue.popleft()
            if not self._is_open:
                return None
            fut = self._loop.create_future()
            table.accept_waiter = fut
            try:
                await fut
            finally:
                table.accept_waiter = None

    def close(self, code: int = 0, reason: bytes = b"") -> None:
        if not self._is_open:
            return
        code = valid_code(code, "close")
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
        with self._guard_close:
            self._quic.close(error_code=code, reason_phrase=text)
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
        der: bytes | None = None  # "no certificate": pins and direct trust then fail
        with StackCall("reading the peer certificate", on_error="log"):
            der = self._quic.qr_peer_certificate()
        return der

    @property
    def dialed(self) -> bool:
        return self._is_client

    def path_stats(self) -> PathStats:
        stats = PathStats()
        with StackCall(f"{self.stack_name}: reading path statistics", on_error="log"):
            stats = self._quic.qr_path_stats()
        if stats.packets_sent is None:
            stats = dataclasses.replace(stats, packets_sent=self._datagrams_sent)
        return stats

    def abort(self) -> None:
        """Drop the connection without waiting for the close handshake (cleanup path)."""
        if not self._closed.is_set():
            self.close()
            self._on_terminated(0, "aborted")

"""Datagram flows: unreliable whole datagrams over QUIC DATAGRAM frames (RFC 9221).

Our protocol extension (``Features.DATAGRAM_FLOWS``, docs/PROTOCOL.md §9); a peer that
does not announce it (the Rust crate) never sees any of it, and opening a flow with
it raises :class:`~quic_reverse.errors.DatagramsUnavailable`. ::

    flow = await handle.open_flow("dns")          # asks the peer, like open()
    flow.send(query)                              # one whole datagram, never blocks
    answer = await flow.recv()                    # one whole datagram
    flow.close()

    await handle.serve(handlers, flow_handlers={"dns": dns_handler})  # the other side

:class:`DatagramFlow` is one flow: a bounded receive queue (when full the **oldest**
datagram is dropped and counted in :attr:`DatagramFlow.dropped`), the size limit of
the path (:attr:`DatagramFlow.max_datagram_size`; bigger datagrams are refused, never
fragmented), and an optional idle timeout (no datagram either way for that long
closes the flow with ``CloseCode.TIMEOUT``). :class:`FlowManager` is the session's
part: it routes received datagrams to flows by flow id and turns the core's flow
outputs into flow objects.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Awaitable, Callable

from ._core import FlowClosed, FlowOpened, Negotiated, OpenFailed, Output, SessionCore
from ._core import SessionEnded as _SessionEnded
from .errors import (
    ConfigError,
    DatagramFlowClosed,
    DatagramsUnavailable,
    DatagramTooLarge,
    ProtocolError,
    QuicReverseError,
    SessionClosed,
)
from .transport.base import Connection
from .wire import CloseCode, Metadata
from .wire.flows import decode_datagram, encode_datagram

__all__ = ["DEFAULT_FLOW_QUEUE", "DatagramFlow", "FlowHandler", "FlowManager"]

logger = logging.getLogger("quic_reverse.flow")

#: Datagrams a flow holds unread before it drops the oldest.
DEFAULT_FLOW_QUEUE = 256

FlowHandler = Callable[["DatagramFlow"], Awaitable[None]]
"""An ``async def handler(flow)`` for ``serve(..., flow_handlers=...)``."""


def _check_options(idle_timeout: float | None, queue_size: int) -> None:
    if idle_timeout is not None and (
        isinstance(idle_timeout, bool)
        or not isinstance(idle_timeout, int | float)
        or not 0 < idle_timeout < float("inf")
    ):
        raise ConfigError(f"idle_timeout must be a positive number or None, got {idle_timeout!r}")
    if isinstance(queue_size, bool) or not isinstance(queue_size, int) or queue_size < 1:
        raise ConfigError(f"queue_size must be an int >= 1, got {queue_size!r}")


class DatagramFlow:
    """One datagram flow of a session (see the module docstring). Not created directly:
    ``SessionHandle.open_flow()``, ``accept_flow()`` or a ``serve()`` flow handler."""

    def __init__(
        self,
        manager: FlowManager,
        flow_id: int,
        service: str,
        *,
        idle_timeout: float | None,
        queue_size: int,
    ) -> None:
        self._manager = manager
        self._conn = manager.connection
        self.flow_id = flow_id
        self.service = service
        self._header = encode_datagram(flow_id, b"")
        self._queue: collections.deque[bytes] = collections.deque()
        self._queue_size = queue_size
        self._waiter: asyncio.Future[None] | None = None
        self._closed: DatagramFlowClosed | None = None
        self._idle_timeout = idle_timeout
        self._idle_timer: asyncio.TimerHandle | None = None
        self._loop = asyncio.get_running_loop()
        self._last_activity = self._loop.time()
        #: Datagrams sent / received (delivered to the queue) / dropped from a full queue.
        self.sent = 0
        self.received = 0
        self.dropped = 0
        if idle_timeout is not None:
            self._idle_timer = self._loop.call_later(idle_timeout, self._idle_check)

    def __repr__(self) -> str:
        state = "closed" if self._closed is not None else "open"
        return f"<DatagramFlow {self.flow_id} {self.service!r} {state}>"

    @property
    def max_datagram_size(self) -> int:
        """The largest datagram :meth:`send` takes now (0 once the path has none)."""
        limit = self._conn.max_datagram_size
        return 0 if limit is None else max(0, limit - len(self._header))

    @property
    def is_closed(self) -> bool:
        """True once the flow is closed (either side, idle timeout or session end)."""
        return self._closed is not None

    @property
    def close_reason(self) -> DatagramFlowClosed | None:
        """Why the flow closed, once it did."""
        return self._closed

    @property
    def queued(self) -> int:
        """Datagrams received and not yet read."""
        return len(self._queue)

    def send(self, data: bytes | bytearray | memoryview) -> None:
        """Send one whole datagram (unreliable: it may be lost; never blocks).

        Raises:
            DatagramTooLarge: longer than :attr:`max_datagram_size` (nothing sent).
            DatagramFlowClosed: the flow is closed.
            ConnectionClosed: the connection closed under the flow.
        """
        if self._closed is not None:
            raise self._closed_error()
        limit = self.max_datagram_size
        if len(data) > limit:
            raise DatagramTooLarge(len(data), limit)
        self._conn.send_datagram(self._header + data)
        self.sent += 1
        self._last_activity = self._loop.time()

    async def recv(self) -> bytes:
        """The next datagram, in arrival order.

        Raises:
            DatagramFlowClosed: the flow is closed and nothing is left to read.
        """
        while not self._queue:
            if self._closed is not None:
                raise self._closed_error()
            waiter = self._loop.create_future()
            self._waiter = waiter
            try:
                await waiter
            finally:
                self._waiter = None
        return self._queue.popleft()

    def close(self, code: CloseCode = CloseCode.NORMAL, reason: str | None = None) -> None:
        """Close the flow and tell the peer (FlowClose). Idempotent; unread datagrams
        are discarded."""
        if self._closed is not None:
            return
        self._manager.close_flow(self, code, reason)
        self._finish(DatagramFlowClosed("flow closed", code=int(code), reason=reason))
        self._queue.clear()

    async def __aenter__(self) -> DatagramFlow:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()

    # ------------------------------------------------------------------ internal

    def _closed_error(self) -> DatagramFlowClosed:
        closed = self._closed
        assert closed is not None
        error = DatagramFlowClosed(str(closed), code=closed.code, reason=closed.reason)
        error.__cause__ = closed.__cause__
        return error

    def _deliver(self, data: bytes) -> None:
        if self._closed is not None:
            return
        queue = self._queue
        if len(queue) >= self._queue_size:
            queue.popleft()
            self.dropped += 1
            if self.dropped & (self.dropped - 1) == 0:  # 1, 2, 4, 8...: no log flood
                logger.debug(
                    "flow %d: receive queue full (%d), dropped %d so far",
                    self.flow_id,
                    self._queue_size,
                    self.dropped,
                )
        queue.append(data)
        self.received += 1
        self._last_activity = self._loop.time()
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _finish(self, error: DatagramFlowClosed) -> None:
        if self._closed is not None:
            return
        self._closed = error
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _idle_check(self) -> None:
        self._idle_timer = None
        timeout = self._idle_timeout
        if self._closed is not None or timeout is None:
            return
        due = self._last_activity + timeout
        now = self._loop.time()
        if now < due:
            self._idle_timer = self._loop.call_at(due, self._idle_check)
            return
        logger.debug("flow %d (%r): idle for %.3g s, closing", self.flow_id, self.service, timeout)
        self.close(CloseCode.TIMEOUT, "idle")


class FlowManager:
    """The datagram-flow part of one session driver (see the module docstring)."""

    def __init__(self, connection: Connection, core: SessionCore, pump: Callable[[], None]) -> None:
        self.connection = connection
        self._core = core
        self._pump = pump
        self._flows: dict[int, DatagramFlow] = {}
        self._waiters: dict[int, asyncio.Future[int]] = {}
        self._loop = asyncio.get_running_loop()
        #: Datagrams dropped on arrival: malformed prefix / unknown (e.g. closed) flow.
        self.malformed = 0
        self.unknown = 0

    @property
    def flows(self) -> dict[int, DatagramFlow]:
        """Open flows by flow id (read-only view for diagnostics)."""
        return dict(self._flows)

    def available(self) -> None:
        """Raise :class:`DatagramsUnavailable` unless flows can be used now."""
        if not self._core.flows_available:
            if self._core.is_open:
                raise DatagramsUnavailable(
                    "the peer does not support datagram flows (it did not announce "
                    "Features.DATAGRAM_FLOWS, e.g. the Rust crate quic-reverse)"
                )
            self._core._require_open()
        if self.connection.max_datagram_size is None:
            raise DatagramsUnavailable(
                "this QUIC connection carries no datagrams (RFC 9221 max_datagram_frame_size "
                "not announced by the peer, or the transport has none)"
            )

    # ------------------------------------------------------------------ opening

    async def open(
        self, service: str, metadata: Metadata, *, idle_timeout: float | None, queue_size: int
    ) -> DatagramFlow:
        _check_options(idle_timeout, queue_size)
        self.available()
        rid = self._core.open_flow_request(service, metadata, self._loop.time())
        fut: asyncio.Future[int] = self._loop.create_future()
        self._waiters[rid] = fut
        self._pump()
        try:
            flow_id = await fut
        except asyncio.CancelledError:
            self._waiters.pop(rid, None)
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                self._core.close_flow(fut.result(), CloseCode.RESET, "open cancelled")
            else:
                self._core.cancel_open(rid, self._loop.time())
            self._pump()
            raise
        return self._register(flow_id, service, idle_timeout, queue_size)

    def accept(
        self, request_id: int, *, idle_timeout: float | None, queue_size: int
    ) -> DatagramFlow:
        _check_options(idle_timeout, queue_size)
        service = self._core.incoming_service(request_id)
        flow_id = self._core.accept_flow(request_id)
        self._pump()
        return self._register(flow_id, service, idle_timeout, queue_size)

    def _register(
        self, flow_id: int, service: str, idle_timeout: float | None, queue_size: int
    ) -> DatagramFlow:
        flow = DatagramFlow(
            self, flow_id, service, idle_timeout=idle_timeout, queue_size=queue_size
        )
        self._flows[flow_id] = flow
        logger.debug("flow %d for %r open", flow_id, service)
        return flow

    def close_flow(self, flow: DatagramFlow, code: CloseCode, reason: str | None) -> None:
        if self._flows.get(flow.flow_id) is flow:
            del self._flows[flow.flow_id]
        self._core.close_flow(flow.flow_id, code, reason)
        self._pump()

    # ------------------------------------------------------------------ driver side

    def dispatch(self, output: Output) -> bool:
        """Handle the core's flow outputs; True if ``output`` was consumed here.
        Also watches Negotiated (install the datagram handler) and SessionEnded."""
        if isinstance(output, FlowOpened):
            fut = self._waiters.pop(output.request_id, None)
            if fut is None or fut.done():
                self._core.close_flow(output.flow_id, CloseCode.RESET, "open abandoned")
            else:
                fut.set_result(output.flow_id)
            return True
        if isinstance(output, FlowClosed):
            flow = self._flows.pop(output.flow_id, None)
            if flow is not None:
                what = f": {output.reason}" if output.reason else ""
                flow._finish(
                    DatagramFlowClosed(
                        f"flow closed by peer ({CloseCode(output.code).name}){what}",
                        code=output.code,
                        reason=output.reason,
                    )
                )
            return True
        if isinstance(output, OpenFailed):
            fut = self._waiters.pop(output.request_id, None)
            if fut is None:
                return False
            if not fut.done():
                fut.set_exception(output.error)
            return True
        if isinstance(output, Negotiated):
            if self._core.flows_available:
                self.connection.set_datagram_handler(self._on_datagram)
        elif isinstance(output, _SessionEnded):
            self._session_ended(output.error, output.clean)
        return False

    def _on_datagram(self, data: bytes) -> None:
        try:
            flow_id, payload = decode_datagram(data)
        except ProtocolError:
            self.malformed += 1
            return
        flow = self._flows.get(flow_id)
        if flow is None:
            self.unknown += 1  # closed, or not ours: dropped (datagrams never fail a session)
            return
        flow._deliver(payload)

    def _session_ended(self, error: QuicReverseError, clean: bool) -> None:
        with contextlib.suppress(Exception):
            self.connection.set_datagram_handler(None)
        waiter_error = error if (not clean or isinstance(error, SessionClosed)) else None
        if waiter_error is None:
            waiter_error = SessionClosed(str(error))
        for fut in self._waiters.values():
            if not fut.done():
                fut.set_exception(waiter_error)
        self._waiters.clear()
        for flow in self._flows.values():
            closed = DatagramFlowClosed(f"session ended: {error}", code=int(CloseCode.RESET))
            closed.__cause__ = error
            flow._finish(closed)
        self._flows.clear()

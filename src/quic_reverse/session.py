"""The asyncio session: a thin driver around the sans-IO :class:`~quic_reverse._core.SessionCore`.

::

    session = Session(connection, Role.SERVER, Config(agent="my-server/1.0"))
    handle = await session.start()                 # negotiation
    stream = await handle.open("ssh")              # reverse open, paired by StreamBind id
    await handle.serve({"echo": echo_handler})     # or: route incoming opens to handlers

What the driver owns, and nothing more:

* the public API (:class:`Session`, :class:`SessionHandle`, :data:`Handler`) and the
  *pump*: after every input to the core, carry out what it produced (bytes to the
  writer, actions to waiters, events to ``process_message()``/``serve()``, timer);
* the **control channel** (:mod:`quic_reverse._control`): the control stream (the
  server accepts it first: it is the client's first bidirectional stream) is read
  from the transport's receive path where it offers one, else by a reader task, and
  fed to the core; one **writer** is the only one that writes it (a turn's bytes are
  handed over together right before the transport's transmit); a caller that needs
  its bytes out awaits a "flushed" mark, so a cancelled caller never tears a frame;
* ``serve()`` accepts a peer's open in the turn its request is read when the
  transport can open the data stream without waiting (``Connection.try_open_bi``),
  and starts the handler's task with the stream;
* the **acceptor** (:mod:`quic_reverse._acceptor`): one task taking peer-opened data
  streams; a StreamBind already buffered is read inline, otherwise one short-lived
  task per stream reads it (the core bounds how many such streams exist and for how
  long);
* one timer (``loop.call_at``), armed at the earliest deadline the core reports: every
  protocol deadline (negotiation, open, bind, ping, keep-alive, close) is the core's.
  The only other bounded waits are in the final shutdown (``Config.close_timeout``).

Every task is referenced and cancelled + awaited at shutdown. When the session ends,
for whatever reason, every waiter (``open``, ``ping``, ``process_message``, ``start``)
is woken with a typed error from :mod:`quic_reverse.errors`.

Session close: ``close()`` sends StreamClose(0) and waits (at most
``Config.close_timeout``) for the peer's answer before closing the connection. On
receiving StreamClose(0), the session answers it, reports ``CloseReceived``, and waits
(also bounded) for the closing peer to drop the connection, so the answer is not lost.
The session owns the connection: it closes it when the session ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping
from types import TracebackType
from typing import Any, TypeAlias, TypeVar, cast

from ._acceptor import Pair, StreamAcceptor, reset_pair
from ._control import ControlChannel
from ._core import (
    Negotiated,
    OpenFailed,
    OpenResolved,
    Output,
    PingFailed,
    PongReceived,
    SessionCore,
    SessionEnded,
    StreamRefused,
)
from ._starting import AwaitableContext, exit_context
from .config import Config, Role
from .errors import (
    ConnectionClosed,
    Disconnected,
    EncodeError,
    NegotiationError,
    QuicReverseError,
    SessionClosed,
    StreamReset,
    StreamStopped,
    TransportError,
    UsageError,
)
from .events import ControlEvent, OpenRequestReceived
from .flow import DEFAULT_FLOW_QUEUE, DatagramFlow, FlowHandler, FlowManager
from .stream import Stream
from .transport.base import Connection, PathStats
from .wire import (
    CloseCode,
    Features,
    Metadata,
    MetadataValue,
    OpenFlags,
    RejectCode,
)
from .wire.bind import bind_header

__all__ = ["Handler", "MetadataLike", "Session", "SessionHandle"]

logger = logging.getLogger("quic_reverse.session")

Handler: TypeAlias = Callable[[Stream], Awaitable[None]]
"""An ``async def handler(stream)`` for :meth:`SessionHandle.serve`."""

MetadataLike: TypeAlias = (
    Metadata
    | bytes
    | bytearray
    | memoryview
    | Mapping[str, MetadataValue]
    | Iterable[tuple[str, MetadataValue]]
    | None
)

#: QUIC application error code used when the session ends on an error.
_ERROR_CLOSE_CODE = 1

_E = TypeVar("_E", RejectCode, CloseCode)


def _enum_value(kind: type[_E], value: object) -> _E:
    """``kind(value)``, with a typed :class:`EncodeError` for a value that is not one."""
    try:
        return kind(cast(int, value))
    except (ValueError, TypeError):
        raise EncodeError(f"{value!r} is not a {kind.__name__}") from None


def _open_flags(value: object) -> OpenFlags:
    """``value`` as OpenFlags (a u8 on the wire), or EncodeError."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 0xFF:
        raise EncodeError(f"OpenRequest.flags: expected an int in 0..255, got {value!r}")
    return OpenFlags(value)


class Session:
    """A quic-reverse session over one transport :class:`Connection`.

    ``Role.CLIENT`` is the side that dialed the connection (it opens the control
    stream); ``Role.SERVER`` accepted it. Call :meth:`start` once to negotiate.
    """

    def __init__(self, connection: Connection, role: Role, config: Config | None = None) -> None:
        if not isinstance(role, Role):
            raise TypeError(f"role must be a Role, got {role!r}")
        self._connection = connection
        self._role = role
        self._config = config if config is not None else Config()
        self._handle: SessionHandle | None = None

    @property
    def role(self) -> Role:
        """Our role."""
        return self._role

    @property
    def config(self) -> Config:
        """The session's configuration."""
        return self._config

    def start(self) -> AwaitableContext[SessionHandle]:
        """Negotiate (PROTOCOL-v1 §4) and return the handle of the open session.

        Both forms work: ``handle = await session.start()`` (then close it yourself),
        and ``async with session.start() as handle:`` (closed when the block ends: a
        normal close, or CloseCode.ERROR when the block raised).

        Raises:
            NegotiationError: version mismatch or an unexpected message.
            OperationTimeout: (kind NEGOTIATION) the exchange took longer than
                ``negotiation_timeout``.
            Disconnected: the connection went away during negotiation.
            UsageError: ``start()`` was already called.
        """
        return AwaitableContext(self._start(), exit_context)

    async def _start(self) -> SessionHandle:
        if self._handle is not None:
            raise UsageError("Session.start() may be called only once")
        dialed = self._connection.dialed
        if dialed is not None and dialed != (self._role is Role.CLIENT):
            # PROTOCOL-v1 §1: the side that dials is the client. A contradiction would
            # only show as a negotiation timeout (both SERVER) or a late conflict.
            side = "dialled" if dialed else "accepted"
            expected = Role.CLIENT if dialed else Role.SERVER
            error = NegotiationError(
                f"roles conflict: this side {side} the QUIC connection, so its role "
                f"must be {expected.name}, not {self._role.name} (PROTOCOL-v1 §1)"
            )
            # Tell the peer at once too, instead of leaving it to its own timeout.
            self._connection.close(_ERROR_CLOSE_CODE, str(error).encode()[:100])
            raise error
        self._handle = SessionHandle(self._connection, self._role, self._config)
        await self._handle._start()
        return self._handle


class SessionHandle:
    """The running session: opens, accepts, pings, events, close. See the module docstring."""

    def __init__(self, connection: Connection, role: Role, config: Config) -> None:
        self._conn = connection
        self._role = role
        self._config = config
        self._core = SessionCore(role, config)
        self._loop = asyncio.get_running_loop()
        self._tasks: set[asyncio.Task[None]] = set()
        self._task_prefix = f"quic-reverse {role.value} "
        self._channel = ControlChannel(connection, role, self._core, self._pump, self._spawn)
        self._acceptor = StreamAcceptor(connection, self._core, self._pump, self._spawn, role.value)
        self._acceptor_task: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_when: float | None = None
        self._ready: asyncio.Future[None] = self._loop.create_future()
        self._open_waiters: dict[int, tuple[asyncio.Future[Stream], str, Metadata]] = {}
        self._ping_waiters: dict[int, asyncio.Future[float]] = {}
        self._events_ready = asyncio.Event()
        self._ended = asyncio.Event()  # the core reached CLOSED
        self._closed = asyncio.Event()  # shutdown finished: transport closed, tasks done
        self._shutdown_task: asyncio.Task[None] | None = None
        self._serve_handlers: Mapping[str, Handler] | None = None
        self._flows = FlowManager(connection, self._core, self._pump)  # datagram flows
        self._serve_flow_handlers: Mapping[str, FlowHandler] = {}
        # Bound once: a bound method made per stream would be one more object per open.
        self._on_opened_released = self._release_opened
        self._on_accepted_released = self._release_accepted

    # ------------------------------------------------------------------ properties

    @property
    def role(self) -> Role:
        """Our role."""
        return self._role

    @property
    def config(self) -> Config:
        """The session's configuration."""
        return self._config

    @property
    def connection(self) -> Connection:
        """The transport connection under this session."""
        return self._conn

    @property
    def remote_agent(self) -> str | None:
        """The agent string of the peer's Hello."""
        return self._core.remote_agent

    @property
    def negotiated_version(self) -> int | None:
        """The negotiated protocol version (None before negotiation)."""
        return self._core.negotiated_version

    @property
    def negotiated_features(self) -> Features | None:
        """Features both sides announced (None before negotiation)."""
        return self._core.negotiated_features

    @property
    def is_closed(self) -> bool:
        """True once the session has ended (closed locally, by the peer, or on error)."""
        return self._core.is_closed

    @property
    def close_reason(self) -> QuicReverseError | None:
        """Why the session ended (a :class:`SessionClosed` for a clean close), if it did."""
        return self._core.end.error if self._core.end is not None else None

    @property
    def active_streams(self) -> int:
        """Streams bound or accepted and not yet closed in both directions."""
        return self._core.active_streams

    def path_stats(self) -> PathStats:
        """The QUIC path under this session as the transport sees it now: RTT,
        congestion window, packets sent and lost, ... (``connection.path_stats()``;
        fields the transport does not know are ``None``). Never raises."""
        return self._conn.path_stats()

    def table_sizes(self) -> dict[str, int]:
        """Sizes of every internal table, core and driver (for tests and diagnostics)."""
        sizes = self._core.table_sizes()
        sizes.update(
            open_waiters=len(self._open_waiters),
            ping_waiters=len(self._ping_waiters),
            held_streams=len(self._acceptor.held),
            header_tasks=len(self._acceptor.header_tasks),
            tasks=len(self._tasks),
        )
        return sizes

    # ------------------------------------------------------------------ lifecycle

    async def _start(self) -> None:
        self._core.start(self._loop.time())
        self._pump()
        self._spawn(self._channel.run(), "control-reader")
        if self._role is Role.CLIENT:
            # From the start: a peer stream during negotiation means both are clients.
            self._start_acceptor()
        try:
            await self._ready
        except asyncio.CancelledError:
            self._core.abort(SessionClosed("start() cancelled"))
            self._pump()
            await self.wait_closed()
            raise
        except QuicReverseError:
            await self.wait_closed()
            raise

    async def __aenter__(self) -> SessionHandle:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None or isinstance(exc, asyncio.CancelledError):
            await self.close()
        else:
            await self.close(CloseCode.ERROR, type(exc).__name__)

    async def close(self, code: CloseCode = CloseCode.NORMAL, reason: str | None = None) -> None:
        """Close the session: send StreamClose(0), wait (bounded) for the peer's answer,
        close the connection. Idempotent; pending opens and pings fail with SessionClosed."""
        self._core.close(code, reason, self._loop.time())
        self._pump()
        await self.wait_closed()

    async def wait_closed(self) -> None:
        """Wait until the session has ended and its connection and tasks are cleaned up."""
        await self._closed.wait()

    # ------------------------------------------------------------------ operations

    async def open(
        self,
        service: str,
        metadata: MetadataLike = None,
        *,
        flags: OpenFlags = OpenFlags(0),  # noqa: B008 - immutable IntFlag value
    ) -> Stream:
        """Ask the peer to open a stream for ``service`` (the reverse open).

        Safe to call from many tasks at once. Waits for a free in-flight slot and the
        peer's answer (together at most ``open_timeout``), then for the data stream (at
        most ``stream_bind_timeout``). Cancelling leaves nothing behind; a stream that
        arrives later for it is reset.

        Raises:
            StreamRejected: the peer rejected the open (``.code``, ``.reason``).
            OperationTimeout: kind OPEN_REQUEST or STREAM_BIND.
            CapacityExceeded: ``max_queued_opens`` opens already wait for a slot.
            SessionClosed, Disconnected, ProtocolError: the session ended.
            EncodeError: ``service`` or ``metadata`` cannot be encoded.
        """
        if type(flags) is not OpenFlags:
            flags = _open_flags(flags)
        sent = Metadata.EMPTY if metadata is None else Metadata.of(metadata)
        rid = self._core.open_request(service, sent, flags, self._loop.time())
        fut: asyncio.Future[Stream] = self._loop.create_future()
        self._open_waiters[rid] = (fut, service, sent)
        self._pump()
        try:
            return await fut
        except asyncio.CancelledError:
            self._open_waiters.pop(rid, None)
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                fut.result().reset(CloseCode.RESET)
            else:
                self._core.cancel_open(rid, self._loop.time())
                self._pump()
            raise

    async def accept_open(self, request_id: int, logical_stream_id: int | None = None) -> Stream:
        """Accept the peer's OpenRequest: open the data stream, send
        OpenResponse(Accepted) and write the stream's StreamBind. The logical id is
        chosen here (from 1) unless given.

        The data stream is opened first: at the transport's stream limit this waits
        for a slot while the request is still unanswered (the opener's wait is then
        bounded by its ``open_timeout``, not by its shorter bind deadline). Cancelled or
        failed before the answer went out, the request is rejected (SERVICE_UNAVAILABLE);
        after it, the peer is told with StreamClose: either way its open fails at once.

        Raises:
            UsageError: unknown ``request_id``, or a ``logical_stream_id`` in use.
            EncodeError: a ``logical_stream_id`` outside 1..2**64-1.
            SessionClosed: the session is not open.
            TransportError: the data stream could not be opened.
        """
        core = self._core
        service = core.incoming_service(request_id)
        core.check_accept(request_id, logical_stream_id)
        try:
            pair = await self._conn.open_bi()
        except BaseException:
            if core.is_open and core.is_incoming(request_id):
                core.reject(request_id, RejectCode.SERVICE_UNAVAILABLE, "accept did not complete")
                self._pump()
            raise
        stream, header = self._accepted(request_id, logical_stream_id, service, pair)
        self._pump()
        if header is not None:
            try:
                await pair[0].write(header)
            except BaseException:
                self._abandon_header(stream)
                raise
        return stream

    def _accepted(
        self, request_id: int, logical_stream_id: int | None, service: str, pair: Pair
    ) -> tuple[Stream, bytes | None]:
        """Answer the peer's request with the data stream ``pair`` (already open):
        OpenResponse(Accepted) queued in the core (the caller pumps), the StreamBind
        handed to the stream. Returns the stream, and its header if the stream had no
        room for it now (the caller writes it or gives up, :meth:`_abandon_header`)."""
        try:
            lsid = self._core.accept(request_id, logical_stream_id)
        except BaseException:
            reset_pair(pair)  # another accept answered it, or the session ended
            raise
        stream = Stream(
            pair[0],
            pair[1],
            logical_stream_id=lsid,
            service=service,
            on_release=self._on_accepted_released,
            connection=self._conn,
            role=self._role,
        )
        header = bind_header(lsid)
        if pair[0].try_write(header):  # the usual case takes it without waiting
            return stream, None
        return stream, header

    def _abandon_header(self, stream: Stream) -> None:
        """The StreamBind of an accepted stream could not be written. The peer was
        told "accepted": tell it the stream will not come (its open fails at once
        instead of at its bind deadline), reset the stream, free its slot."""
        self._abandon_accepted(stream.logical_stream_id, CloseCode.RESET, "accept did not complete")
        stream.reset(CloseCode.RESET)

    async def open_flow(
        self,
        service: str,
        metadata: MetadataLike = None,
        *,
        idle_timeout: float | None = None,
        queue_size: int = DEFAULT_FLOW_QUEUE,
    ) -> DatagramFlow:
        """Ask the peer for a datagram flow to ``service`` (extension, PROTOCOL.md §9):
        requested and answered like :meth:`open` (same limits, timeouts and reject
        codes), then whole datagrams both ways over QUIC DATAGRAM frames.

        Raises:
            DatagramsUnavailable: the peer did not negotiate ``Features.DATAGRAM_FLOWS``
                (e.g. the Rust crate: nothing is sent) or the connection has no datagrams.
            StreamRejected, OperationTimeout, CapacityExceeded, SessionClosed: as open().
            ConfigError: a bad ``idle_timeout`` or ``queue_size``.
        """
        return await self._flows.open(
            service, Metadata.of(metadata), idle_timeout=idle_timeout, queue_size=queue_size
        )

    def accept_flow(
        self,
        request_id: int,
        *,
        idle_timeout: float | None = None,
        queue_size: int = DEFAULT_FLOW_QUEUE,
    ) -> DatagramFlow:
        """Accept the peer's flow request (an ``OpenRequestReceived`` whose flags have
        ``OpenFlags.DATAGRAM``): answer with a flow id and return the flow.

        Raises:
            UsageError: unknown ``request_id``.
            SessionClosed: the session is not open.
        """
        return self._flows.accept(request_id, idle_timeout=idle_timeout, queue_size=queue_size)

    @property
    def flows_available(self) -> bool:
        """True when datagram flows can be opened: both sides negotiated
        ``Features.DATAGRAM_FLOWS`` and the connection carries QUIC datagrams."""
        return self._core.flows_available and self._conn.max_datagram_size is not None

    async def reject_open(
        self, request_id: int, code: RejectCode, reason: str | None = None
    ) -> None:
        """Answer the peer's OpenRequest with Rejected(``code``)."""
        self._core.reject(request_id, _enum_value(RejectCode, code), reason)
        self._pump()
        await self._channel.writer.flushed()

    async def ping(self) -> float:
        """Send a Ping and return the round-trip time in seconds.

        Raises:
            OperationTimeout: kind PING, no Pong within ``ping_timeout``.
            SessionClosed, Disconnected: the session ended.
        """
        seq = self._core.send_ping(self._loop.time())
        fut: asyncio.Future[float] = self._loop.create_future()
        self._ping_waiters[seq] = fut
        self._pump()
        try:
            return await fut
        finally:
            self._ping_waiters.pop(seq, None)
            self._core.cancel_ping(seq)

    async def close_stream(
        self, logical_stream_id: int, code: CloseCode = CloseCode.NORMAL, reason: str | None = None
    ) -> None:
        """Send an informational StreamClose for a logical stream (not the session)."""
        self._core.send_stream_close(logical_stream_id, _enum_value(CloseCode, code), reason)
        self._pump()
        await self._channel.writer.flushed()

    async def process_message(self) -> ControlEvent | None:
        """Return the next control event; ``None`` once the session ended cleanly.

        Pings are answered and opens are paired automatically whether or not this is
        called; informational events are kept in a bounded queue.

        Raises:
            ProtocolError, Disconnected, OperationTimeout: the session died of an error.
        """
        while True:
            event = self._core.next_user_event()
            if event is not None:
                return event
            end = self._core.end
            if end is not None:
                if end.clean:
                    return None
                raise end.error
            self._events_ready.clear()
            await self._events_ready.wait()

    async def serve(
        self,
        handlers: Mapping[str, Handler],
        flow_handlers: Mapping[str, FlowHandler] | None = None,
    ) -> None:
        """Route incoming opens to ``handlers[service](stream)`` until the session ends.

        Unknown services are rejected with UNSUPPORTED_SERVICE. When a handler returns
        the stream is closed gracefully; when it raises, the stream is reset and the
        error logged; the session carries on. Returns when the session ends cleanly.
        Datagram flow requests go to ``flow_handlers[service](flow)`` (unknown services:
        UNSUPPORTED_SERVICE); the flow is closed when the handler returns.
        While it runs it consumes every control event (informational ones are only
        logged), so do not call :meth:`process_message` at the same time; ``open()``,
        ``ping()`` and the rest work as usual from other tasks.

        Raises:
            ProtocolError, Disconnected, OperationTimeout: the session died of an error.
        """
        if self._serve_handlers is not None:
            raise UsageError("serve() is already running on this session")
        self._serve_handlers = handlers
        self._serve_flow_handlers = flow_handlers or {}
        try:
            self._route_events()  # whatever was queued before serve() started
            self._pump()
            await self._ended.wait()
        finally:
            self._serve_handlers = None
        end = self._core.end
        if end is not None and not end.clean:
            raise end.error

    def _route_events(self) -> None:
        """While serve() runs, dispatch queued events directly from the pump: one loop
        iteration less per open than a process_message() loop would take."""
        handlers = self._serve_handlers
        if handlers is None:
            return
        core = self._core
        while (event := core.next_user_event()) is not None:
            if not isinstance(event, OpenRequestReceived):
                logger.debug("%s: serve(): %r", self._role.value, event)
                continue
            if core.is_flow_request(event.flags):  # datagram flow (extension)
                self._route_flow(event)
                continue
            handler = handlers.get(event.service)
            if handler is None:
                with contextlib.suppress(SessionClosed):
                    core.reject(
                        event.request_id,
                        RejectCode.UNSUPPORTED_SERVICE,
                        f"unknown service {event.service!r}",
                    )
                continue
            pair = self._conn.try_open_bi()
            if pair is None:  # no free stream slot now: the task waits for one
                run = self._run_handler(event.request_id, event.service, handler, event.metadata)
                self._spawn(run, "handler")
                continue
            # Accepted here, in this loop turn (the caller pumps the OpenResponse out):
            # the handler's task starts with its stream.
            try:
                stream, header = self._accepted(event.request_id, None, event.service, pair)
            except QuicReverseError as exc:
                logger.warning("%s: could not accept %r: %s", self._role.value, event.service, exc)
                continue
            if header is not None:  # no room for 13 bytes on a new stream: closing
                self._abandon_header(stream)
                continue
            stream._metadata = event.metadata
            self._spawn_handler(self._serve_stream(stream, event.service, handler))

    def _route_flow(self, event: OpenRequestReceived) -> None:
        flow_handler = self._serve_flow_handlers.get(event.service)
        if flow_handler is None or self._conn.max_datagram_size is None:
            code = RejectCode.UNSUPPORTED_SERVICE
            why = f"unknown datagram service {event.service!r}"
            if flow_handler is not None:
                code, why = RejectCode.SERVICE_UNAVAILABLE, "no QUIC datagrams on this connection"
            with contextlib.suppress(SessionClosed):
                self._core.reject(event.request_id, code, why)
            return
        flow = self.accept_flow(event.request_id)
        self._spawn(self._run_flow_handler(flow, flow_handler), "flow-handler")

    async def _run_flow_handler(self, flow: DatagramFlow, handler: FlowHandler) -> None:
        try:
            await handler(flow)
        except asyncio.CancelledError:
            flow.close(CloseCode.RESET)
            raise
        except QuicReverseError as exc:
            logger.info("%s: flow handler for %r ended: %s", self._role.value, flow.service, exc)
            flow.close(CloseCode.ERROR, "flow lost")
        except Exception:
            logger.exception("%s: flow handler for %r failed", self._role.value, flow.service)
            flow.close(CloseCode.ERROR, "service failed")
        else:
            flow.close()

    async def _run_handler(
        self, request_id: int, service: str, handler: Handler, metadata: Metadata | None = None
    ) -> None:
        try:
            stream = await self.accept_open(request_id)
        except QuicReverseError as exc:
            logger.warning("%s: could not accept %r: %s", self._role.value, service, exc)
            return
        stream._metadata = metadata
        await self._serve_stream(stream, service, handler)

    async def _serve_stream(self, stream: Stream, service: str, handler: Handler) -> None:
        """Run ``handler`` on an accepted stream; close or reset the stream after it.

        The task running it leaves ``self._tasks`` here (:meth:`_spawn_handler` adds
        no done callback), and a failure here (a bug, not the handler's) ends the
        session as a failed task would."""
        try:
            try:
                await handler(stream)
            except asyncio.CancelledError:
                stream.reset(CloseCode.RESET)
                raise
            except (
                StreamReset,
                StreamStopped,
                ConnectionClosed,
                Disconnected,
                SessionClosed,
            ) as exc:
                # The peer or the connection ended the stream under the handler: an
                # outcome of the network, not a bug in the handler, so no traceback.
                logger.info(
                    "%s: handler for %r ended: %s; resetting stream %d",
                    self._role.value,
                    service,
                    exc,
                    stream.logical_stream_id,
                )
                stream.reset(CloseCode.ERROR)
                self._abandon_accepted(stream.logical_stream_id, CloseCode.ERROR, "stream lost")
            except Exception:
                logger.exception(
                    "%s: handler for %r failed; resetting stream %d",
                    self._role.value,
                    service,
                    stream.logical_stream_id,
                )
                stream.reset(CloseCode.ERROR)
                self._abandon_accepted(stream.logical_stream_id, CloseCode.ERROR, "service failed")
            else:
                await stream.aclose()
        except Exception as exc:
            self._internal_failure("handler", exc)
        finally:
            self._tasks.discard(asyncio.current_task())

    def _abandon_accepted(self, lsid: int, code: CloseCode, reason: str) -> None:
        """Send StreamClose(``lsid``) for a stream we accepted and then gave up, so an
        opener still waiting for its data stream fails at once (see the core)."""
        if self._core.is_open:
            self._core.send_stream_close(lsid, code, reason)
            self._pump()

    # ------------------------------------------------------------------ the pump

    def _pump(self) -> None:
        """Carry out what the core produced: bytes, actions, events, timer.

        Called after every input to the core, so it is kept cheap. Control bytes go to
        the writer's outbox (see :class:`ControlWriter` for who writes them).
        """
        core = self._core
        # The core's queues are read directly (not through has_outputs & co.): this
        # runs after every input, several times per open.
        if core._out:
            self._channel.take_output()
        if core._outputs:
            for output in core.outputs():
                self._dispatch(output)
        if core._events:
            if self._serve_handlers is not None:
                self._route_events()
                if core._out:
                    self._channel.take_output()
            else:
                self._events_ready.set()
        if core.end is not None:
            self._events_ready.set()
        if core._deadlines._new is not None:
            self._rearm_timer()

    def _start_acceptor(self) -> None:
        if self._acceptor_task is None:
            self._acceptor_task = self._spawn(self._acceptor.run(), "stream-acceptor")

    def _dispatch(self, output: Output) -> None:
        if type(output) is not OpenResolved and self._flows.dispatch(output):
            return  # datagram flows (extension); OpenResolved, the common one, is not theirs
        if isinstance(output, OpenResolved):
            pair = self._acceptor.take(output.token)
            waiter = self._open_waiters.pop(output.request_id, None)
            lsid = output.logical_stream_id
            if waiter is None or waiter[0].done():
                self._core.stream_released(None)
                reset_pair(pair)
                return
            fut, service, metadata = waiter
            fut.set_result(
                Stream(
                    pair[0],
                    pair[1],
                    logical_stream_id=lsid,
                    service=service,
                    on_release=self._on_opened_released,
                    connection=self._conn,
                    metadata=metadata,
                    role=self._role,
                )
            )
        elif isinstance(output, OpenFailed):
            waiter = self._open_waiters.pop(output.request_id, None)
            if waiter is not None and not waiter[0].done():
                waiter[0].set_exception(output.error)
        elif isinstance(output, StreamRefused):
            self._acceptor.refuse(output.token, output.reason)
        elif isinstance(output, PongReceived):
            fut_p = self._ping_waiters.get(output.sequence)
            if fut_p is not None and not fut_p.done():
                fut_p.set_result(output.rtt)
        elif isinstance(output, PingFailed):
            fut_p = self._ping_waiters.get(output.sequence)
            if fut_p is not None and not fut_p.done():
                fut_p.set_exception(output.error)
        elif isinstance(output, Negotiated):
            logger.info(
                "session open: role=%s remote_agent=%r version=%d features=%#x",
                self._role.value,
                output.remote_agent,
                output.version,
                int(output.features),
            )
            if not self._ready.done():
                self._ready.set_result(None)
            self._start_acceptor()
        elif isinstance(output, SessionEnded):
            self._on_end(output)

    def _release_opened(self, stream: Stream) -> None:
        """A stream we opened is done in both directions: its slot is free."""
        if self._core.stream_released(None):
            self._pump()

    def _release_accepted(self, stream: Stream) -> None:
        """A stream we accepted is done in both directions (or given up): its slot and
        its logical id are free. Called once per stream (``Stream`` guarantees it)."""
        if self._core.stream_released(stream.logical_stream_id):
            self._pump()

    def _rearm_timer(self) -> None:
        """Arm the timer if the core added a deadline earlier than the armed one.

        Invariant: while the core has a live deadline, a timer is armed at or before
        it (the timer callback recomputes the next deadline from scratch).
        """
        new = self._core.take_new_deadline()
        if new is None:
            return
        armed = self._timer_when
        if self._timer is not None and armed is not None and armed <= new:
            return
        self._arm(new)

    def _arm(self, when: float | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_when = when
        if when is not None and not self._core.is_closed:
            self._timer = self._loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_when = None
        core = self._core
        core.handle_timer(self._loop.time())
        self._pump()
        core.take_new_deadline()  # folded into the full recomputation below
        self._arm(core.next_deadline())

    # ------------------------------------------------------------------ tasks

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task = self._loop.create_task(coro, name=self._task_prefix + name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _spawn_handler(self, coro: Coroutine[Any, Any, None]) -> None:
        """A task for :meth:`_serve_stream`, which removes it from ``self._tasks`` and
        reports its failures itself: no done callback, one loop callback less per open."""
        self._tasks.add(self._loop.create_task(coro, name=self._task_prefix + "handler"))

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            assert exc is not None
            self._internal_failure(task.get_name(), exc)

    def _internal_failure(self, name: str, exc: BaseException) -> None:
        """An internal task failed: a bug, or a transport error nobody caught. The
        session ends with it."""
        logger.error("%s: internal task %s failed: %r", self._role.value, name, exc)
        error = exc if isinstance(exc, QuicReverseError) else TransportError(repr(exc))
        self._core.abort(error)
        self._pump()

    # ------------------------------------------------------------------ ending

    def _on_end(self, end: SessionEnded) -> None:
        error = end.error
        if end.clean:
            logger.info(
                "session closed: role=%s remote_agent=%r (%s)",
                self._role.value,
                self._core.remote_agent,
                "by peer" if end.by_peer else "locally",
            )
        else:
            logger.warning(
                "session ended: role=%s remote_agent=%r: %s",
                self._role.value,
                self._core.remote_agent,
                error,
            )
        waiter_error: QuicReverseError = error
        if end.clean and not isinstance(error, SessionClosed):
            waiter_error = SessionClosed(str(error))
        for fut, _, _ in self._open_waiters.values():
            if not fut.done():
                fut.set_exception(waiter_error)
        self._open_waiters.clear()
        for fut_p in self._ping_waiters.values():
            if not fut_p.done():
                fut_p.set_exception(waiter_error)
        if not self._ready.done():
            self._ready.set_exception(error)
            self._ready.exception()  # retrieved: start() may already be gone
        self._events_ready.set()
        self._ended.set()
        if self._shutdown_task is None:
            self._shutdown_task = self._loop.create_task(
                self._shutdown(end), name=f"quic-reverse {self._role.value} shutdown"
            )

    async def _shutdown(self, end: SessionEnded) -> None:
        """Flush the last control bytes, close the connection, stop every task."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        current = asyncio.current_task()
        try:
            self._acceptor.close()
            if self._acceptor_task is not None:
                self._acceptor_task.cancel()
            # Bounded linger: let the last control bytes (our close, or our answer to the
            # peer's close) leave before the connection goes.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._config.close_timeout):
                    await self._channel.linger()
                    if self._conn.is_open and end.by_peer and end.clean:
                        # The closing peer drops the connection once it has our answer.
                        await self._conn.wait_closed()
            code = 0 if end.clean else _ERROR_CLOSE_CODE
            self._conn.close(code, str(end.error).encode()[:100])
            for task in list(self._tasks):
                if task is not current:
                    task.cancel()
            for task in list(self._tasks):
                if task is not current:
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await task
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._config.close_timeout):
                    await self._conn.wait_closed()
        finally:
            self._channel.writer.stop()
            # Handler tasks cancelled before they first ran never removed themselves.
            self._tasks = {task for task in self._tasks if not task.done()}
            self._closed.set()

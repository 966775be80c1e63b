"""The sans-IO session core: negotiation, request table, logical ids, limits, deadlines.

No asyncio, no sockets, no clock. The asyncio driver (:mod:`quic_reverse.session`) feeds
it and executes what it says:

Inputs
    ``start(now)``, ``receive_data(data, now)``, ``receive_eof(now)``,
    ``handle_timer(now)``, the commands (``open_request``, ``cancel_open``, ``accept``,
    ``reject``, ``send_ping``, ``send_stream_close``, ``close``), and the data-stream
    pairing calls (``stream_arrived``, ``stream_header``, ``stream_lost``,
    ``stream_released``).
Outputs
    ``data_to_send()`` (bytes for the control stream, in order), ``outputs()`` (driver
    actions: :class:`OpenResolved`, :class:`OpenFailed`, :class:`StreamRefused`,
    :class:`PongReceived`, :class:`PingFailed`, :class:`Negotiated`,
    :class:`SessionEnded`), ``next_user_event()`` (the bounded queue of
    :mod:`quic_reverse.events` for ``process_message()``) and ``next_deadline()``.

After any input, the driver drains ``data_to_send()`` and ``outputs()`` and re-arms its
single timer at ``next_deadline()``.

Every deadline lives here (negotiation, open, stream bind, ping, keep-alive, close), in
one heap with lazy deletion: an entry is acted on only if the record it names still
carries that exact deadline.

Pairing data streams (PROTOCOL-v1 §5): every incoming data stream gets a *token* while
its 13-byte StreamBind is read (bounded by ``stream_bind_timeout``). Once the header is
known the stream is paired **by logical id** with the local open that the peer accepted
with that id; a stream that arrives before its OpenResponse is held (bounded in time and
in number: at most as many as there are opens still awaiting an answer); a bad header or
an id nobody waits for is refused (the driver resets it) and the session carries on.
"""

from __future__ import annotations

import collections
import contextlib
import enum
import heapq
import logging
from dataclasses import dataclass

from . import events as ev
from .config import Config, Role
from .errors import (
    CapacityExceeded,
    Disconnected,
    EncodeError,
    NegotiationError,
    OperationTimeout,
    ProtocolError,
    QuicReverseError,
    SessionClosed,
    StreamRejected,
    StreamReset,
    TimeoutKind,
)
from .wire import (
    STREAM_BIND_SIZE,
    CloseCode,
    Features,
    FrameReader,
    Hello,
    HelloAck,
    Message,
    Metadata,
    OpenFlags,
    OpenRequest,
    OpenResponse,
    OpenStatus,
    Ping,
    Pong,
    RejectCode,
    StreamBind,
    StreamClose,
    decode,
    encode_message_frame,
)

__all__ = [
    "CoreState",
    "Negotiated",
    "OpenFailed",
    "OpenResolved",
    "Output",
    "PingFailed",
    "PongReceived",
    "SessionCore",
    "SessionEnded",
    "StreamRefused",
]

logger = logging.getLogger("quic_reverse.session")

_U64_MAX = 2**64 - 1
#: Extra data streams tolerated beyond the number of opens awaiting one (a peer that
#: is legitimately slow to send a header; orphans of cancelled opens).
_STREAM_SLACK = 8


class CoreState(enum.Enum):
    """Session state. Negotiation order is PROTOCOL-v1 §4."""

    IDLE = "idle"
    #: client: Hello sent, waiting for the server's Hello; server: waiting for the client's.
    AWAIT_HELLO = "await_hello"
    #: client: HelloAck sent, waiting for the server's; server: Hello sent, waiting for it.
    AWAIT_HELLO_ACK = "await_hello_ack"
    OPEN = "open"
    #: we sent StreamClose(0) and wait (bounded) for the peer's answer.
    CLOSING = "closing"
    CLOSED = "closed"


# (state, role, message type) -> next state, for the negotiation phase. Anything not in
# this table during negotiation is a NegotiationError.
_NEGOTIATION: dict[tuple[CoreState, Role, type[Message]], CoreState] = {
    (CoreState.AWAIT_HELLO, Role.CLIENT, Hello): CoreState.AWAIT_HELLO_ACK,
    (CoreState.AWAIT_HELLO, Role.SERVER, Hello): CoreState.AWAIT_HELLO_ACK,
    (CoreState.AWAIT_HELLO_ACK, Role.CLIENT, HelloAck): CoreState.OPEN,
    (CoreState.AWAIT_HELLO_ACK, Role.SERVER, HelloAck): CoreState.OPEN,
}


# ----------------------------------------------------------------------------- outputs


@dataclass(frozen=True, slots=True)
class Negotiated:
    """Negotiation finished: the session is open."""

    version: int
    features: Features
    remote_agent: str | None


@dataclass(frozen=True, slots=True)
class OpenResolved:
    """Local open ``request_id`` is accepted and its data stream (``token``) is bound."""

    request_id: int
    logical_stream_id: int
    token: int


@dataclass(frozen=True, slots=True)
class OpenFailed:
    """Local open ``request_id`` failed (rejected, timed out, malformed answer)."""

    request_id: int
    error: QuicReverseError


@dataclass(frozen=True, slots=True)
class StreamRefused:
    """Reset the incoming data stream ``token`` (bad header, unknown id, timeout, excess)."""

    token: int
    reason: str


@dataclass(frozen=True, slots=True)
class PongReceived:
    """Our ping ``sequence`` was answered after ``rtt`` seconds."""

    sequence: int
    rtt: float


@dataclass(frozen=True, slots=True)
class PingFailed:
    """Our ping ``sequence`` got no Pong in time."""

    sequence: int
    error: QuicReverseError


@dataclass(frozen=True, slots=True)
class SessionEnded:
    """The session is over. ``clean`` is False when it died of an error (``error``)."""

    error: QuicReverseError
    clean: bool
    by_peer: bool


Output = (
    Negotiated
    | OpenResolved
    | OpenFailed
    | StreamRefused
    | PongReceived
    | PingFailed
    | SessionEnded
)


# ----------------------------------------------------------------------------- records


class _OpenState(enum.Enum):
    QUEUED = "queued"  # waiting for an in-flight slot; nothing sent yet
    AWAIT_RESPONSE = "await_response"
    AWAIT_BIND = "await_bind"  # accepted; waiting for the data stream


@dataclass(slots=True)
class _LocalOpen:
    request_id: int
    frame: bytes  # the encoded OpenRequest frame, sent when a slot is free
    state: _OpenState
    deadline: float
    logical_stream_id: int | None = None


@dataclass(slots=True)
class _EarlyStream:
    token: int
    deadline: float


@dataclass(slots=True)
class _PingRecord:
    sent_at: float
    deadline: float
    keepalive: bool


class _Timer(enum.Enum):
    OPEN = "open"
    HEADER = "header"
    EARLY = "early"
    ORPHAN_REQUEST = "orphan_request"
    ORPHAN_LSID = "orphan_lsid"
    PING = "ping"


# Enum members as module constants: in Python 3.11 ``Enum.MEMBER`` is a descriptor
# lookup several times slower than a global, and the core checks states on every input.
_IDLE = CoreState.IDLE
_AWAIT_HELLO_ACK = CoreState.AWAIT_HELLO_ACK
_AWAIT_HELLO = CoreState.AWAIT_HELLO
_OPEN = CoreState.OPEN
_CLOSING = CoreState.CLOSING
_CLOSED = CoreState.CLOSED
_QUEUED = _OpenState.QUEUED
_AWAIT_RESPONSE = _OpenState.AWAIT_RESPONSE
_AWAIT_BIND = _OpenState.AWAIT_BIND
_T_OPEN = _Timer.OPEN
_T_HEADER = _Timer.HEADER
_T_EARLY = _Timer.EARLY
_T_ORPHAN_REQUEST = _Timer.ORPHAN_REQUEST
_T_ORPHAN_LSID = _Timer.ORPHAN_LSID
_T_PING = _Timer.PING


class SessionCore:
    """Protocol state of one session, without I/O. See the module docstring."""

    def __init__(self, role: Role, config: Config) -> None:
        self.role = role
        self.config = config
        self._tag = role.value  # for log lines (enum .value is a slow property)
        self.state = _IDLE
        self.negotiated_version: int | None = None
        self.negotiated_features: Features | None = None
        self.remote_agent: str | None = None
        self.end: SessionEnded | None = None

        self._reader = FrameReader()
        self._out = bytearray()
        self._outputs: list[Output] = []
        self._events: collections.deque[ev.ControlEvent] = collections.deque()
        self._info_events = 0

        self._timers: list[tuple[float, int, _Timer, int]] = []
        self._compact_at = 64
        self._timer_seq = 0
        self._negotiation_deadline: float | None = None
        self._close_deadline: float | None = None
        self._new_deadline: float | None = None
        self._last_activity = 0.0

        # local opens (we asked the peer)
        self._next_request_id = 1
        self._local: dict[int, _LocalOpen] = {}
        self._queued: collections.deque[int] = collections.deque()
        self._inflight = 0  # AWAIT_RESPONSE + AWAIT_BIND
        self._awaiting_response = 0
        self._by_lsid: dict[int, int] = {}  # peer-chosen lsid -> request id (AWAIT_BIND)
        self._orphan_requests: dict[int, float] = {}  # cancelled/timed out while unanswered
        self._orphan_lsids: dict[int, float] = {}  # accepted for an open nobody awaits

        # incoming data streams
        self._next_token = 1
        self._headers: dict[int, float] = {}  # token -> header deadline
        self._early: dict[int, _EarlyStream] = {}  # lsid -> stream waiting for its response

        # remote opens (the peer asked us)
        self._incoming: dict[int, str] = {}  # request id -> service, unanswered
        self._next_lsid = 1
        self._used_lsids: set[int] = set()
        self.active_streams = 0
        self._limit_rejects = 0
        self._unknown_responses = 0

        # pings
        self._next_ping_seq = 1
        self._pings: dict[int, _PingRecord] = {}
        self._keepalive_seq: int | None = None

    # ------------------------------------------------------------------ introspection

    @property
    def is_open(self) -> bool:
        """True once negotiated and until a close starts."""
        return self.state is _OPEN

    @property
    def is_closed(self) -> bool:
        """True once the session has ended."""
        return self.state is _CLOSED

    def table_sizes(self) -> dict[str, int]:
        """Sizes of every internal table (tests check that nothing is left behind)."""
        return {
            "local_opens": len(self._local),
            "queued": len(self._queued),
            "inflight": self._inflight,
            "awaiting_response": self._awaiting_response,
            "by_lsid": len(self._by_lsid),
            "orphan_requests": len(self._orphan_requests),
            "orphan_lsids": len(self._orphan_lsids),
            "header_pending": len(self._headers),
            "early_streams": len(self._early),
            "incoming": len(self._incoming),
            "used_lsids": len(self._used_lsids),
            "active_streams": self.active_streams,
            "pings": len(self._pings),
            "events": len(self._events),
            "timers": len(self._timers),
        }

    # ------------------------------------------------------------------ outputs

    def data_to_send(self) -> bytes:
        """Bytes to write to the control stream, in order (empties the buffer)."""
        if not self._out:
            return b""
        data = bytes(self._out)
        self._out.clear()
        return data

    def move_data_to(self, buffer: bytearray) -> bool:
        """Append the bytes to send to ``buffer`` (no intermediate copy); True if any."""
        if not self._out:
            return False
        buffer += self._out
        self._out.clear()
        return True

    @property
    def has_new_deadline(self) -> bool:
        """True when :meth:`take_new_deadline` has something to report."""
        return self._new_deadline is not None

    def outputs(self) -> list[Output]:
        """Driver actions produced since the last call (empties the list)."""
        out = self._outputs
        self._outputs = []
        return out

    @property
    def has_pending_incoming(self) -> bool:
        """True while some peer OpenRequest is still unanswered."""
        return bool(self._incoming)

    @property
    def has_outputs(self) -> bool:
        """True when ``outputs()`` has something."""
        return bool(self._outputs)

    @property
    def has_events(self) -> bool:
        """True when ``next_user_event()`` has something."""
        return bool(self._events)

    def next_user_event(self) -> ev.ControlEvent | None:
        """The next event for ``process_message()``, or ``None`` if none is queued."""
        if not self._events:
            return None
        event = self._events.popleft()
        if not isinstance(event, ev.OpenRequest):
            self._info_events -= 1
        return event

    def next_deadline(self) -> float | None:
        """The earliest time at which :meth:`handle_timer` has work to do."""
        candidates: list[float] = []
        while self._timers and not self._timer_valid(self._timers[0]):
            heapq.heappop(self._timers)
        if self._timers:
            candidates.append(self._timers[0][0])
        if self._negotiation_deadline is not None:
            candidates.append(self._negotiation_deadline)
        if self._close_deadline is not None:
            candidates.append(self._close_deadline)
        keepalive = self._keepalive_due()
        if keepalive is not None:
            candidates.append(keepalive)
        return min(candidates) if candidates else None

    # ------------------------------------------------------------------ negotiation

    def start(self, now: float) -> None:
        """Begin negotiation. The client queues its Hello; the server waits for one."""
        if self.state is not _IDLE:
            raise SessionClosed("session already started")
        self.state = _AWAIT_HELLO
        self._negotiation_deadline = now + self.config.negotiation_timeout
        self._note_deadline(self._negotiation_deadline)
        self._last_activity = now
        if self.role is Role.CLIENT:
            self._send(self._hello())
        logger.debug("%s: negotiation started", self._tag)

    def _hello(self) -> Hello:
        return Hello(
            protocol_version=self.config.protocol_version,
            features=self.config.advertised_features,
            agent=self.config.agent,
        )

    def _negotiate(self, msg: Message, now: float) -> None:
        nxt = _NEGOTIATION.get((self.state, self.role, type(msg)))
        if nxt is None:
            raise NegotiationError(
                f"unexpected {type(msg).__name__} during negotiation ({self.state.value})"
            )
        if isinstance(msg, Hello):
            if msg.protocol_version not in self.config.supported_versions:
                raise NegotiationError(
                    f"version mismatch: peer speaks v{msg.protocol_version}, "
                    f"we support {list(self.config.supported_versions)}"
                )
            self.negotiated_version = min(msg.protocol_version, self.config.protocol_version)
            self.negotiated_features = Features(
                int(self.config.advertised_features) & int(msg.features)
            )
            self.remote_agent = msg.agent
            if self.role is Role.SERVER:
                self._send(self._hello())
            else:
                self._send(self._hello_ack())
        elif isinstance(msg, HelloAck):
            if msg.selected_version != self.negotiated_version:
                raise NegotiationError(
                    f"HelloAck selects v{msg.selected_version}, "
                    f"we computed v{self.negotiated_version}"
                )
            if self.role is Role.SERVER:
                self._send(self._hello_ack())
        self.state = nxt
        if nxt is _OPEN and self.config.ping_interval is not None:
            self._note_deadline(now + self.config.ping_interval)
        if nxt is _OPEN:
            self._negotiation_deadline = None
            self._last_activity = now
            assert self.negotiated_version is not None
            assert self.negotiated_features is not None
            self._outputs.append(
                Negotiated(self.negotiated_version, self.negotiated_features, self.remote_agent)
            )
            logger.debug(
                "%s: negotiated v%d features=%#x",
                self._tag,
                self.negotiated_version,
                int(self.negotiated_features),
            )

    def _hello_ack(self) -> HelloAck:
        assert self.negotiated_version is not None and self.negotiated_features is not None
        return HelloAck(
            selected_version=self.negotiated_version,
            selected_features=self.negotiated_features,
        )

    # ------------------------------------------------------------------ receiving

    def receive_data(self, data: bytes, now: float) -> None:
        """Feed bytes read from the control stream.

        A protocol violation ends the session (see :attr:`end`); it is not raised.
        """
        if self.state is _CLOSED or not data:
            return
        self._last_activity = now
        try:
            for payload in self._reader.feed(data):
                msg = decode(payload)
                self._handle_message(msg, now)
                if self.is_closed:
                    return
        except ProtocolError as exc:
            self._protocol_failure(exc)

    def receive_eof(self, now: float) -> None:
        """The peer finished the control stream."""
        if self.state is _CLOSED:
            return
        if self.state is _CLOSING:
            self._finish(SessionClosed("session closed", code=CloseCode.NORMAL), True, False)
        elif self.state in (_AWAIT_HELLO, _AWAIT_HELLO_ACK):
            self._finish(NegotiationError("peer ended the control stream during negotiation"))
        else:
            self._finish(Disconnected("peer ended the control stream"), clean=True, by_peer=True)

    def connection_lost(self, error: QuicReverseError) -> None:
        """The transport failed or closed under us."""
        if self.state is _CLOSED:
            return
        if self.state is _CLOSING:
            self._finish(SessionClosed("session closed", code=CloseCode.NORMAL), True, False)
            return
        self._finish(error if isinstance(error, Disconnected) else _disconnected(error))

    def _handle_message(self, msg: Message, now: float) -> None:
        state = self.state
        if state is _OPEN:
            # Fast path for the messages of every open (the vast majority).
            kind = type(msg)
            if kind is OpenRequest:
                self._on_open_request(msg)  # type: ignore[arg-type]
                return
            if kind is OpenResponse:
                self._on_open_response(msg, now)  # type: ignore[arg-type]
                return
        if state is _AWAIT_HELLO or state is _AWAIT_HELLO_ACK:
            self._negotiate(msg, now)
            return
        if isinstance(msg, Hello | HelloAck):
            raise ProtocolError(f"unexpected {type(msg).__name__} after negotiation")
        if state is _CLOSING:
            # Only the peer's answering session close matters now.
            if isinstance(msg, StreamClose) and msg.logical_stream_id == 0:
                logger.debug("%s: session close answered", self._tag)
                self._finish(SessionClosed("session closed", code=msg.code), True, False)
            elif isinstance(msg, Ping):
                self._send(Pong(sequence=msg.sequence))
            return
        if isinstance(msg, OpenRequest):
            self._on_open_request(msg)
        elif isinstance(msg, OpenResponse):
            self._on_open_response(msg, now)
        elif isinstance(msg, StreamClose):
            self._on_stream_close(msg, now)
        elif isinstance(msg, Ping):
            logger.debug("%s: ping %d received, answering", self._tag, msg.sequence)
            self._send(Pong(sequence=msg.sequence))
            self._push_info(ev.Ping(sequence=msg.sequence))
        elif isinstance(msg, Pong):
            self._on_pong(msg, now)
        else:  # pragma: no cover - decode() returns only the types above
            raise ProtocolError(f"unknown message {msg!r}")

    def _on_open_request(self, msg: OpenRequest) -> None:
        rid = msg.request_id
        if rid in self._incoming:
            raise ProtocolError(f"OpenRequest: request_id {rid} is already pending")
        if self.active_streams + len(self._incoming) >= self.config.max_concurrent_streams:
            self._limit_rejects += 1
            if self._limit_rejects & (self._limit_rejects - 1) == 0:  # 1, 2, 4, 8...: no flood
                logger.warning(
                    "%s: rejecting OpenRequest %d for %r: LIMIT_EXCEEDED "
                    "(%d active, %d unanswered; %d rejected so far)",
                    self._tag,
                    rid,
                    msg.service,
                    self.active_streams,
                    len(self._incoming),
                    self._limit_rejects,
                )
            self._send(
                OpenResponse(
                    request_id=rid,
                    status=OpenStatus.rejected(RejectCode.LIMIT_EXCEEDED),
                    reason="too many concurrent streams",
                )
            )
            return
        logger.debug("%s: OpenRequest %d for %r", self._tag, rid, msg.service)
        self._incoming[rid] = msg.service
        self._events.append(
            ev.OpenRequest(
                request_id=rid, service=msg.service, metadata=msg.metadata, flags=msg.flags
            )
        )

    def _on_open_response(self, msg: OpenResponse, now: float) -> None:
        rid = msg.request_id
        lsid = msg.logical_stream_id
        self._push_info(
            ev.OpenResponseReceived(
                request_id=rid, status=msg.status, reason=msg.reason, logical_stream_id=lsid
            )
        )
        rec = self._local.get(rid)
        if rec is None or rec.state is not _AWAIT_RESPONSE:
            if self._orphan_requests.pop(rid, None) is not None:
                logger.debug("%s: late OpenResponse %d for an abandoned open", self._tag, rid)
                if msg.status.accepted and lsid:
                    self._orphan_lsid(lsid, now)
            else:
                self._unknown_responses += 1
                # Peer-driven: logged on the 1st, 2nd, 4th, 8th... only (no flood).
                if self._unknown_responses & (self._unknown_responses - 1) == 0:
                    logger.warning(
                        "%s: ignoring OpenResponse for unknown request %d (%d so far)",
                        self._tag,
                        rid,
                        self._unknown_responses,
                    )
            return
        self._awaiting_response -= 1
        if not msg.status.accepted:
            assert msg.status.code is not None
            logger.debug("%s: open %d rejected: %s", self._tag, rid, msg.status.code.name)
            self._drop_local(rid, now)
            self._outputs.append(OpenFailed(rid, StreamRejected(msg.status.code, msg.reason)))
            return
        if not lsid or lsid in self._by_lsid:
            self._drop_local(rid, now)
            what = "without a logical_stream_id" if not lsid else f"with duplicate id {lsid}"
            self._outputs.append(OpenFailed(rid, ProtocolError(f"OpenResponse accepted {what}")))
            return
        early = self._early.pop(lsid, None)
        if early is not None:
            self._drop_local(rid, now)
            self._bind(rid, lsid, early.token)
            return
        rec.state = _AWAIT_BIND
        rec.logical_stream_id = lsid
        rec.deadline = now + self.config.stream_bind_timeout
        self._schedule(rec.deadline, _T_OPEN, rid)
        self._by_lsid[lsid] = rid
        logger.debug("%s: open %d accepted as lsid %d, awaiting stream", self._tag, rid, lsid)

    def _on_stream_close(self, msg: StreamClose, now: float) -> None:
        lsid = msg.logical_stream_id
        rid = self._by_lsid.get(lsid) if lsid else None
        if rid is not None:
            # The peer accepted our open, then gave up on its data stream (its service
            # failed, its accept was cancelled): fail the open now, not at the bind
            # deadline; a data stream that still comes for it is reset.
            logger.debug("%s: open %d: peer closed lsid %d before binding", self._tag, rid, lsid)
            self.cancel_open(rid, now)
            self._outputs.append(OpenFailed(rid, _peer_abandoned(lsid, msg.code, msg.reason)))
        if msg.logical_stream_id != 0:
            logger.debug(
                "%s: peer closed logical stream %d (%s)",
                self._tag,
                msg.logical_stream_id,
                msg.code.name,
            )
            self._push_info(
                ev.StreamClose(
                    logical_stream_id=msg.logical_stream_id, code=msg.code, reason=msg.reason
                )
            )
            return
        logger.debug("%s: session close received (%s), answering", self._tag, msg.code.name)
        self._send(StreamClose(logical_stream_id=0, code=CloseCode.NORMAL, reason=None))
        self._events.append(ev.CloseReceived(code=msg.code, reason=msg.reason))
        self._info_events += 1
        self._finish(
            SessionClosed("session closed by peer", code=msg.code, reason=msg.reason),
            clean=True,
            by_peer=True,
        )

    def _on_pong(self, msg: Pong, now: float) -> None:
        rec = self._pings.pop(msg.sequence, None)
        if rec is None:
            logger.debug("%s: ignoring Pong %d (not ours or late)", self._tag, msg.sequence)
            return
        if msg.sequence == self._keepalive_seq:
            self._keepalive_seq = None
            due = self._keepalive_due()
            if due is not None:
                self._note_deadline(due)
        else:
            self._outputs.append(PongReceived(msg.sequence, now - rec.sent_at))
        self._push_info(ev.Pong(sequence=msg.sequence))

    # ------------------------------------------------------------------ local opens

    def open_request(
        self,
        service: str,
        metadata: Metadata,
        flags: OpenFlags,
        now: float,
    ) -> int:
        """Ask the peer to open a stream; returns the request id.

        The request is sent at once if fewer than ``max_inflight_opens`` are in flight,
        otherwise queued; either way it fails with an ``OPEN_REQUEST`` timeout after
        ``open_timeout``. Raises :class:`SessionClosed` if the session is not open,
        :class:`CapacityExceeded` if ``max_queued_opens`` opens already wait for a slot,
        and :class:`EncodeError` for values that cannot be encoded.
        """
        self._require_open()
        must_queue = self._inflight >= self.config.max_inflight_opens or bool(self._queued)
        if must_queue and len(self._queued) >= self.config.max_queued_opens:
            raise CapacityExceeded(
                f"{len(self._queued)} opens already wait for one of "
                f"{self.config.max_inflight_opens} in-flight slots (max_queued_opens)"
            )
        rid = self._next_request_id
        frame = encode_message_frame(
            OpenRequest(request_id=rid, service=service, metadata=metadata, flags=flags)
        )
        self._next_request_id += 1
        rec = _LocalOpen(rid, frame, _QUEUED, now + self.config.open_timeout)
        self._local[rid] = rec
        self._schedule(rec.deadline, _T_OPEN, rid)
        if not must_queue:
            self._send_open(rec)
        else:
            self._queued.append(rid)
            logger.debug("%s: open %d queued (%d in flight)", self._tag, rid, self._inflight)
        return rid

    def _send_open(self, rec: _LocalOpen) -> None:
        rec.state = _AWAIT_RESPONSE
        self._inflight += 1
        self._awaiting_response += 1
        self._out += rec.frame
        logger.debug("%s: OpenRequest %d sent", self._tag, rec.request_id)

    def _pump_queue(self, now: float) -> None:
        """Send queued opens while slots are free; expired ones wait for their timer."""
        while self._queued and self._inflight < self.config.max_inflight_opens:
            rid = self._queued[0]
            rec = self._local.get(rid)
            if rec is None or rec.state is not _QUEUED:
                self._queued.popleft()
                continue
            if rec.deadline <= now:
                return  # its timer fails it next; do not send a request nobody awaits
            self._queued.popleft()
            self._send_open(rec)

    def _drop_local(self, rid: int, now: float) -> _LocalOpen | None:
        """Remove a local open from every table, freeing its slot."""
        rec = self._local.pop(rid, None)
        if rec is None:
            return None
        if rec.state is _QUEUED:
            with contextlib.suppress(ValueError):
                self._queued.remove(rid)
        else:
            self._inflight -= 1
            if rec.state is _AWAIT_BIND and rec.logical_stream_id is not None:
                self._by_lsid.pop(rec.logical_stream_id, None)
        self._pump_queue(now)
        return rec

    def cancel_open(self, request_id: int, now: float) -> None:
        """Forget a local open whose caller gave up. A late answer or stream is reset."""
        rec = self._local.get(request_id)
        if rec is None:
            return
        state = rec.state
        if state is _AWAIT_RESPONSE:
            self._awaiting_response -= 1
        self._drop_local(request_id, now)
        if state is _AWAIT_RESPONSE:
            self._orphan_request(request_id, now)
        elif state is _AWAIT_BIND and rec.logical_stream_id is not None:
            self._orphan_lsid(rec.logical_stream_id, now)
        logger.debug("%s: open %d abandoned (%s)", self._tag, request_id, state.value)

    def _orphan_request(self, rid: int, now: float) -> None:
        self._trim(self._orphan_requests)
        deadline = now + self.config.open_timeout
        self._orphan_requests[rid] = deadline
        self._schedule(deadline, _T_ORPHAN_REQUEST, rid)

    def _orphan_lsid(self, lsid: int, now: float) -> None:
        early = self._early.pop(lsid, None)
        if early is not None:
            self._outputs.append(StreamRefused(early.token, f"stream {lsid} of an abandoned open"))
            return
        self._trim(self._orphan_lsids)
        deadline = now + self.config.stream_bind_timeout
        self._orphan_lsids[lsid] = deadline
        self._schedule(deadline, _T_ORPHAN_LSID, lsid)

    def _trim(self, table: dict[int, float]) -> None:
        """Keep tombstone tables bounded: drop the oldest entries past the limit."""
        limit = 4 * self.config.max_inflight_opens
        while len(table) >= limit:
            del table[next(iter(table))]

    def _bind(self, rid: int, lsid: int, token: int) -> None:
        self.active_streams += 1
        logger.debug("%s: open %d bound to lsid %d", self._tag, rid, lsid)
        self._outputs.append(OpenResolved(rid, lsid, token))

    # ------------------------------------------------------------------ data streams

    def stream_arrived(self, now: float, *, header_ready: bool = False) -> int | None:
        """A peer-opened data stream arrived; returns its token, or ``None`` to refuse it.

        Refused when the session is not open or when more streams are unpaired than
        there are opens awaiting one (a flood): memory stays bounded. With
        ``header_ready`` the caller passes the header to :meth:`stream_header` right
        away, so no header deadline is armed.
        """
        if self.state is not _OPEN:
            return None
        budget = self._inflight + len(self._orphan_lsids) + len(self._orphan_requests)
        if len(self._headers) + len(self._early) >= budget + _STREAM_SLACK:
            return None
        token = self._next_token
        self._next_token += 1
        deadline = now + self.config.stream_bind_timeout
        self._headers[token] = deadline
        if not header_ready:
            self._schedule(deadline, _T_HEADER, token)
        return token

    def stream_header(self, token: int, header: bytes, now: float) -> None:
        """The 13-byte StreamBind of stream ``token`` was read; pair it by logical id."""
        if self._headers.pop(token, None) is None:
            return  # already refused (timeout or session end)
        if self.state is not _OPEN:
            self._outputs.append(StreamRefused(token, "session not open"))
            return
        try:
            if len(header) != STREAM_BIND_SIZE:
                raise ProtocolError(f"StreamBind: expected {STREAM_BIND_SIZE} bytes")
            lsid = StreamBind.decode(header).logical_stream_id
        except ProtocolError as exc:
            self._outputs.append(StreamRefused(token, f"bad StreamBind header: {exc}"))
            return
        if lsid == 0:
            self._outputs.append(StreamRefused(token, "StreamBind with reserved id 0"))
            return
        rid = self._by_lsid.get(lsid)
        if rid is not None:
            self._drop_local(rid, now)
            self._bind(rid, lsid, token)
            return
        if self._orphan_lsids.pop(lsid, None) is not None:
            self._outputs.append(StreamRefused(token, f"stream {lsid} of an abandoned open"))
            return
        if lsid in self._early:
            self._outputs.append(StreamRefused(token, f"duplicate StreamBind id {lsid}"))
            return
        if len(self._early) < self._awaiting_response + len(self._orphan_requests):
            deadline = now + self.config.stream_bind_timeout
            self._early[lsid] = _EarlyStream(token, deadline)
            self._schedule(deadline, _T_EARLY, lsid)
            logger.debug("%s: stream %d arrived before its OpenResponse", self._tag, lsid)
            return
        self._outputs.append(StreamRefused(token, f"no open is waiting for stream id {lsid}"))

    def stream_lost(self, token: int) -> None:
        """Reading the header of stream ``token`` failed (reset, FIN, connection)."""
        self._headers.pop(token, None)

    def stream_released(self, local_lsid: int | None) -> None:
        """An active stream (bound or accepted) is done; frees its slot and local id."""
        self.active_streams = max(0, self.active_streams - 1)
        if local_lsid is not None:
            self._used_lsids.discard(local_lsid)

    # ------------------------------------------------------------------ remote opens

    def incoming_service(self, request_id: int) -> str:
        """The service of the peer's unanswered request ``request_id``.

        Raises :class:`SessionClosed` if the session is not open, :class:`EncodeError`
        if no such request is pending.
        """
        self._require_open()
        service = self._incoming.get(request_id)
        if service is None:
            raise EncodeError(f"no pending OpenRequest with request_id {request_id}")
        return service

    def accept(self, request_id: int, logical_stream_id: int | None = None) -> int:
        """Accept the peer's request: queue OpenResponse(Accepted) and return the logical id.

        The id is chosen here (from 1, skipping ids in use) unless given; 0, an id in use,
        or an unknown request id raise :class:`EncodeError`.
        """
        self._require_open()
        if request_id not in self._incoming:
            raise EncodeError(f"accept_open: no pending OpenRequest with request_id {request_id}")
        if logical_stream_id is None:
            lsid = self._next_lsid
            while lsid in self._used_lsids or lsid == 0:
                lsid = lsid + 1 if lsid < _U64_MAX else 1
            self._next_lsid = lsid + 1 if lsid < _U64_MAX else 1
        else:
            lsid = logical_stream_id
            if isinstance(lsid, bool) or not isinstance(lsid, int) or not 0 < lsid <= _U64_MAX:
                raise EncodeError(
                    f"accept_open: logical_stream_id must be in 1..2**64-1, got {lsid!r}"
                )
            if lsid in self._used_lsids:
                raise EncodeError(f"accept_open: logical_stream_id {lsid} is already in use")
        self._send(
            OpenResponse(request_id=request_id, status=OpenStatus.ACCEPTED, logical_stream_id=lsid)
        )
        del self._incoming[request_id]
        self._used_lsids.add(lsid)
        self.active_streams += 1
        logger.debug("%s: accepted request %d as lsid %d", self._tag, request_id, lsid)
        return lsid

    def reject(self, request_id: int, code: RejectCode, reason: str | None) -> None:
        """Reject the peer's request with ``code``."""
        self._require_open()
        if request_id not in self._incoming:
            raise EncodeError(f"reject_open: no pending OpenRequest with request_id {request_id}")
        self._send(
            OpenResponse(request_id=request_id, status=OpenStatus.rejected(code), reason=reason)
        )
        service = self._incoming.pop(request_id)
        logger.warning(
            "%s: rejected request %d for %r: %s",
            self._tag,
            request_id,
            service,
            RejectCode(code).name,
        )

    # ------------------------------------------------------------------ ping, close

    def send_ping(self, now: float, *, keepalive: bool = False) -> int:
        """Queue a Ping; returns its sequence number (from 1)."""
        self._require_open()
        seq = self._next_ping_seq
        self._next_ping_seq += 1
        deadline = now + self.config.ping_timeout
        self._pings[seq] = _PingRecord(now, deadline, keepalive)
        self._schedule(deadline, _T_PING, seq)
        if keepalive:
            self._keepalive_seq = seq
        self._send(Ping(sequence=seq))
        logger.debug("%s: ping %d sent%s", self._tag, seq, " (keep-alive)" if keepalive else "")
        return seq

    def cancel_ping(self, sequence: int) -> None:
        """Forget a ping whose caller gave up."""
        self._pings.pop(sequence, None)

    def send_stream_close(
        self, logical_stream_id: int, code: CloseCode, reason: str | None
    ) -> None:
        """Tell the peer that a logical stream is done (informational; id 0 is the session)."""
        self._require_open()
        if logical_stream_id == 0:
            raise EncodeError("close_stream: id 0 is the session; use close()")
        self._send(StreamClose(logical_stream_id=logical_stream_id, code=code, reason=reason))

    def close(self, code: CloseCode, reason: str | None, now: float) -> bool:
        """Start a session close. Returns True if StreamClose(0) was queued (wait for it).

        Before negotiation finished the session simply ends; once closing or closed this
        is a no-op returning False.
        """
        if self.state in (_CLOSING, _CLOSED):
            return False
        if self.state is not _OPEN:
            self._finish(SessionClosed("session closed before negotiation finished"), True, False)
            return False
        self._send(StreamClose(logical_stream_id=0, code=code, reason=reason))
        self.state = _CLOSING
        self._close_deadline = now + self.config.close_timeout
        self._note_deadline(self._close_deadline)
        self._fail_local_work(SessionClosed("session closing", code=code, reason=reason))
        logger.debug("%s: session close sent (%s)", self._tag, code.name)
        return True

    def abort(self, error: QuicReverseError) -> None:
        """End the session now with ``error`` (driver-side failures)."""
        if self.state is not _CLOSED:
            self._finish(error)

    # ------------------------------------------------------------------ timers

    def handle_timer(self, now: float) -> None:
        """Act on every deadline that is due at ``now``."""
        if self.state is _CLOSED:
            return
        if self._negotiation_deadline is not None and now >= self._negotiation_deadline:
            self._finish(
                OperationTimeout(TimeoutKind.NEGOTIATION, "negotiation did not finish in time")
            )
            return
        if self._close_deadline is not None and now >= self._close_deadline:
            logger.debug("%s: no answer to session close; closing anyway", self._tag)
            self._finish(SessionClosed("session closed", code=CloseCode.NORMAL), True, False)
            return
        while self._timers and self._timers[0][0] <= now:
            entry = heapq.heappop(self._timers)
            if self._timer_valid(entry):
                self._fire(entry[2], entry[3], now)
                if self.is_closed:
                    return
        keepalive = self._keepalive_due()
        if keepalive is not None and now >= keepalive:
            self.send_ping(now, keepalive=True)

    def _keepalive_due(self) -> float | None:
        interval = self.config.ping_interval
        if interval is None or self.state is not _OPEN or self._keepalive_seq:
            return None
        return self._last_activity + interval

    def take_new_deadline(self) -> float | None:
        """The earliest deadline added since the last call (then forgets it).

        A driver that re-arms its timer whenever this is earlier than the armed time,
        and recomputes :meth:`next_deadline` whenever the timer fires, never misses a
        deadline: deadlines only ever move later except through this report.
        """
        new = self._new_deadline
        self._new_deadline = None
        return new

    def _note_deadline(self, deadline: float) -> None:
        if self._new_deadline is None or deadline < self._new_deadline:
            self._new_deadline = deadline

    def _schedule(self, deadline: float, kind: _Timer, key: int) -> None:
        self._note_deadline(deadline)
        self._timer_seq += 1
        heapq.heappush(self._timers, (deadline, self._timer_seq, kind, key))
        if len(self._timers) > self._compact_at:
            # Lazy deletion leaves stale entries until their time; compact so the heap
            # stays proportional to the live records (amortised O(1) per schedule).
            self._timers = [e for e in self._timers if self._timer_valid(e)]
            heapq.heapify(self._timers)
            self._compact_at = 2 * len(self._timers) + 64

    def _timer_valid(self, entry: tuple[float, int, _Timer, int]) -> bool:
        deadline, _, kind, key = entry
        if kind is _T_OPEN:
            rec = self._local.get(key)
            return rec is not None and rec.deadline == deadline
        if kind is _T_HEADER:
            return self._headers.get(key) == deadline
        if kind is _T_EARLY:
            early = self._early.get(key)
            return early is not None and early.deadline == deadline
        if kind is _T_ORPHAN_REQUEST:
            return self._orphan_requests.get(key) == deadline
        if kind is _T_ORPHAN_LSID:
            return self._orphan_lsids.get(key) == deadline
        ping = self._pings.get(key)
        return ping is not None and ping.deadline == deadline

    def _fire(self, kind: _Timer, key: int, now: float) -> None:
        if kind is _T_OPEN:
            rec = self._local[key]
            if rec.state is _AWAIT_BIND:
                error = OperationTimeout(
                    TimeoutKind.STREAM_BIND,
                    f"data stream {rec.logical_stream_id} did not arrive in time",
                )
            else:
                error = OperationTimeout(
                    TimeoutKind.OPEN_REQUEST, f"open request {key} got no answer in time"
                )
            self.cancel_open(key, now)
            self._outputs.append(OpenFailed(key, error))
        elif kind is _T_HEADER:
            del self._headers[key]
            self._outputs.append(StreamRefused(key, "StreamBind header not received in time"))
        elif kind is _T_EARLY:
            early = self._early.pop(key)
            self._outputs.append(
                StreamRefused(early.token, f"no OpenResponse for stream {key} in time")
            )
        elif kind is _T_ORPHAN_REQUEST:
            del self._orphan_requests[key]
        elif kind is _T_ORPHAN_LSID:
            del self._orphan_lsids[key]
        else:
            rec_ping = self._pings.pop(key)
            if rec_ping.keepalive:
                self._finish(Disconnected("keep-alive: no Pong within ping_timeout"))
            else:
                self._outputs.append(
                    PingFailed(key, OperationTimeout(TimeoutKind.PING, f"no Pong for ping {key}"))
                )

    # ------------------------------------------------------------------ helpers

    def _send(self, msg: Message) -> None:
        self._out += encode_message_frame(msg)

    def _push_info(self, event: ev.ControlEvent) -> None:
        """Queue an informational event, dropping the oldest one past the limit."""
        self._events.append(event)
        self._info_events += 1
        if self._info_events > self.config.max_buffered_events:
            for i, old in enumerate(self._events):
                if not isinstance(old, ev.OpenRequest):
                    del self._events[i]
                    self._info_events -= 1
                    logger.debug("%s: event queue full, dropped %r", self._tag, old)
                    break

    def _require_open(self) -> None:
        if self.state is _OPEN:
            return
        if self.end is not None:
            err = self.end.error
            if isinstance(err, SessionClosed):
                raise SessionClosed(str(err), code=err.code, reason=err.reason)
            raise SessionClosed(f"session ended: {err}") from err
        if self.state is _CLOSING:
            raise SessionClosed("session is closing")
        raise SessionClosed("session not negotiated yet")

    def _protocol_failure(self, exc: ProtocolError) -> None:
        logger.error("%s: protocol error from peer: %s", self._tag, exc)
        if self.state is _OPEN:
            reason = str(exc)[:200]
            self._send(StreamClose(logical_stream_id=0, code=CloseCode.ERROR, reason=reason))
        self._finish(exc)

    def _fail_local_work(self, error: QuicReverseError) -> None:
        # Clear the tables directly: going through _drop_local would send queued opens.
        for rid in self._local:
            self._outputs.append(OpenFailed(rid, error))
        self._local.clear()
        self._queued.clear()
        self._by_lsid.clear()
        self._inflight = 0
        self._awaiting_response = 0
        for seq, rec in self._pings.items():
            if not rec.keepalive:
                self._outputs.append(PingFailed(seq, error))
        self._pings.clear()
        self._keepalive_seq = None
        self._orphan_requests.clear()
        self._orphan_lsids.clear()
        for early in self._early.values():
            self._outputs.append(StreamRefused(early.token, "session ended"))
        self._early.clear()
        for token in self._headers:
            self._outputs.append(StreamRefused(token, "session ended"))
        self._headers.clear()
        self._incoming.clear()
        self._timers.clear()

    def _finish(self, error: QuicReverseError, clean: bool = False, by_peer: bool = False) -> None:
        self._fail_local_work(error)
        self.state = _CLOSED
        self._negotiation_deadline = None
        self._close_deadline = None
        self.end = SessionEnded(error, clean, by_peer)
        self._outputs.append(self.end)


def _peer_abandoned(lsid: int, code: CloseCode, reason: str | None) -> StreamReset:
    what = f": {reason!r}" if reason else ""
    return StreamReset(
        int(code),
        None,
        message=f"peer closed stream {lsid} ({code.name}) before its data stream bound{what}",
    )


def _disconnected(error: QuicReverseError) -> Disconnected:
    exc = Disconnected(f"connection lost: {error}")
    exc.__cause__ = error
    return exc

"""The session core proper: state, negotiation, dispatch, pings, keep-alive, close.

:class:`SessionCore` combines the parts: :class:`~.opens.LocalOpens` (our opens),
:class:`~.pairing.StreamPairing` (incoming data streams) and
:class:`~.remote.RemoteOpens` (the peer's opens), over the shared state and
output path of :class:`~.base.CoreBase`, with every deadline in one
:class:`~.timers.Deadlines` heap. See the package docstring for inputs and outputs.
"""

from __future__ import annotations

import collections

from .. import events as ev
from ..config import Config, Role
from ..errors import (
    Disconnected,
    NegotiationError,
    OperationTimeout,
    ProtocolError,
    QuicReverseError,
    SessionClosed,
    TimeoutKind,
    UsageError,
)
from ..wire import (
    CloseCode,
    Features,
    FrameReader,
    Hello,
    HelloAck,
    Message,
    OpenRequest,
    OpenResponse,
    Ping,
    Pong,
    StreamClose,
    decode,
)
from ..wire.flows import FLOW_CLOSE_TAG
from .base import AWAIT_HELLO, AWAIT_HELLO_ACK, CLOSED, CLOSING, IDLE, OPEN, logger
from .flows import FlowCore
from .outputs import (
    CoreState,
    Negotiated,
    Output,
    PingFailed,
    PongReceived,
    SessionEnded,
)
from .pairing import StreamPairing
from .remote import RemoteOpens
from .timers import Deadlines, TimerKind

__all__ = ["SessionCore"]

# (state, role, message type) -> next state, for the negotiation phase. Anything not in
# this table during negotiation is a NegotiationError.
_NEGOTIATION: dict[tuple[CoreState, Role, type[Message]], CoreState] = {
    (CoreState.AWAIT_HELLO, Role.CLIENT, Hello): CoreState.AWAIT_HELLO_ACK,
    (CoreState.AWAIT_HELLO, Role.SERVER, Hello): CoreState.AWAIT_HELLO_ACK,
    (CoreState.AWAIT_HELLO_ACK, Role.CLIENT, HelloAck): CoreState.OPEN,
    (CoreState.AWAIT_HELLO_ACK, Role.SERVER, HelloAck): CoreState.OPEN,
}

_T_OPEN = TimerKind.OPEN
_T_HEADER = TimerKind.HEADER
_T_EARLY = TimerKind.EARLY
_T_PING = TimerKind.PING
_T_KEEPALIVE = TimerKind.KEEPALIVE


class _PingRecord:
    __slots__ = ("deadline", "keepalive", "sent_at")

    def __init__(self, sent_at: float, deadline: float, keepalive: bool) -> None:
        self.sent_at = sent_at
        self.deadline = deadline
        self.keepalive = keepalive


class SessionCore(StreamPairing, RemoteOpens, FlowCore):
    """Protocol state of one session, without I/O. See the package docstring."""

    def __init__(self, role: Role, config: Config) -> None:
        self.role = role
        self.config = config
        self._tag = role.value
        self.state = IDLE
        self.negotiated_version: int | None = None
        self.negotiated_features: Features | None = None
        self.remote_agent: str | None = None
        self.end: SessionEnded | None = None

        self._reader = FrameReader()
        self._out = bytearray()
        self._outputs: list[Output] = []
        self._events: collections.deque[ev.ControlEvent | OpenResponse] = collections.deque()
        self._info_events = 0
        self._dropped_events = 0
        self._deadlines = Deadlines(self._timer_live)
        self._last_activity = 0.0

        self._init_opens()
        self._init_pairing()

        self._init_remote()
        self._init_flows()

        # pings
        self._next_ping_seq = 1
        self._pings: dict[int, _PingRecord] = {}
        self._keepalive_seq: int | None = None

    # ------------------------------------------------------------------ introspection

    @property
    def is_open(self) -> bool:
        """True once negotiated and until a close starts."""
        return self.state is OPEN

    @property
    def is_closed(self) -> bool:
        """True once the session has ended."""
        return self.state is CLOSED

    @property
    def is_negotiating(self) -> bool:
        """True between :meth:`start` and the end of negotiation."""
        return self.state is AWAIT_HELLO or self.state is AWAIT_HELLO_ACK

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
            "waiting_incoming": len(self._waiting),
            "used_lsids": len(self._used_lsids),
            "active_streams": self.active_streams,
            "pings": len(self._pings),
            "events": len(self._events),
            "timers": len(self._deadlines),
            "flows": len(self._flows),
            "flow_opens": len(self._flow_opens),
        }

    # ------------------------------------------------------------------ outputs

    def move_data_to(self, buffer: bytearray) -> bool:
        """Append the bytes to send to ``buffer`` (in order; empties the core's); True
        if any. The one way control bytes leave the core."""
        if not self._out:
            return False
        buffer += self._out
        self._out.clear()
        return True

    def data_to_send(self) -> bytes:
        """:meth:`move_data_to` into a new ``bytes`` (for tests and simple drivers)."""
        out = bytearray()
        self.move_data_to(out)
        return bytes(out)

    def outputs(self) -> list[Output]:
        """Driver actions produced since the last call (empties the list)."""
        out = self._outputs
        self._outputs = []
        return out

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
        if type(event) is OpenResponse:
            # Built only when asked for: most openers never read these events.
            self._info_events -= 1
            return ev.OpenResponseReceived(
                request_id=event.request_id,
                status=event.status,
                reason=event.reason,
                logical_stream_id=event.logical_stream_id,
            )
        if not isinstance(event, ev.OpenRequestReceived):
            self._info_events -= 1
        return event  # type: ignore[return-value]

    def next_deadline(self) -> float | None:
        """The earliest time at which :meth:`handle_timer` has work to do."""
        deadlines = self._deadlines
        while (top := deadlines.peek()) is not None:
            # Entries that move lazily (keep-alive: traffic pushes it later; an open's
            # single entry: its bind deadline comes later): report the true time,
            # rescheduled, rather than a wake-up that would find nothing due.
            kind = top[1]
            if kind is _T_KEEPALIVE:
                due = self._keepalive_due()
            elif kind is _T_OPEN:
                due = self._open_due(top[2], top[0])
            else:
                break
            if due is None or due <= top[0]:
                break
            deadlines.pop()
            deadlines.schedule(due, kind, top[2])
        return top[0] if top is not None else None

    @property
    def has_new_deadline(self) -> bool:
        """True when :meth:`take_new_deadline` has something to report."""
        return self._deadlines.has_new

    def take_new_deadline(self) -> float | None:
        """The earliest deadline added since the last call (then forgets it).

        A driver that re-arms its timer whenever this is earlier than the armed time,
        and recomputes :meth:`next_deadline` whenever the timer fires, never misses a
        deadline.
        """
        return self._deadlines.take_new()

    # ------------------------------------------------------------------ negotiation

    def start(self, now: float) -> None:
        """Begin negotiation. The client queues its Hello; the server waits for one."""
        if self.state is not IDLE:
            raise UsageError("session already started")
        self.state = AWAIT_HELLO
        self._deadlines.schedule(now + self.config.negotiation_timeout, TimerKind.NEGOTIATION)
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

    def _hello_ack(self) -> HelloAck:
        assert self.negotiated_version is not None and self.negotiated_features is not None
        return HelloAck(
            selected_version=self.negotiated_version,
            selected_features=self.negotiated_features,
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
            self._send(self._hello() if self.role is Role.SERVER else self._hello_ack())
        elif isinstance(msg, HelloAck):
            if msg.selected_version != self.negotiated_version:
                raise NegotiationError(
                    f"HelloAck selects v{msg.selected_version}, "
                    f"we computed v{self.negotiated_version}"
                )
            if self.role is Role.SERVER:
                self._send(self._hello_ack())
        self.state = nxt
        if nxt is OPEN:
            self._last_activity = now
            self._schedule_keepalive()
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

    def roles_conflict(self) -> None:
        """The peer opened a stream while we, the client, negotiate: only a peer that is
        also ``Role.CLIENT`` does that (its control stream). Ends the session."""
        if self.role is Role.CLIENT and self.is_negotiating:
            self._finish(
                NegotiationError(
                    "roles conflict: the peer opened a control stream too "
                    "(both sides are Role.CLIENT; the side that accepted the "
                    "connection must be Role.SERVER)"
                )
            )

    # ------------------------------------------------------------------ receiving

    def receive_data(self, data: bytes, now: float) -> None:
        """Feed bytes read from the control stream.

        A protocol violation ends the session (see :attr:`end`); it is not raised.
        """
        if self.state is CLOSED or not data:
            return
        self._last_activity = now
        try:
            for payload in self._reader.feed(data):
                if payload[:4] == FLOW_CLOSE_TAG and self.flows_available:
                    self._on_flow_close_payload(payload)  # extension, PROTOCOL.md §9
                    continue
                self._handle_message(decode(payload), now)
                if self.state is CLOSED:
                    return
        except ProtocolError as exc:
            self._protocol_failure(exc)

    def receive_eof(self, now: float) -> None:
        """The peer finished the control stream."""
        if self.state is CLOSED:
            return
        if self.state is CLOSING:
            self._finish(SessionClosed("session closed", code=CloseCode.NORMAL), clean=True)
        elif self.is_negotiating:
            self._finish(NegotiationError("peer ended the control stream during negotiation"))
        else:
            self._finish(Disconnected("peer ended the control stream"), clean=True, by_peer=True)

    def connection_lost(self, error: QuicReverseError) -> None:
        """The transport failed or closed under us."""
        if self.state is CLOSED:
            return
        if self.state is CLOSING:
            self._finish(SessionClosed("session closed", code=CloseCode.NORMAL), clean=True)
            return
        self._finish(error if isinstance(error, Disconnected) else _disconnected(error))

    def peer_closed_connection(self, error: QuicReverseError) -> None:
        """The peer closed the connection with application code 0 (no error) without
        a session close first: a graceful end, as if it had sent StreamClose(0)."""
        if self.state is CLOSED:
            return
        if self.state is CLOSING or not self.is_open:
            self.connection_lost(error)
            return
        logger.debug("%s: peer closed the connection without a session close", self._tag)
        self._events.append(ev.CloseReceived(code=CloseCode.NORMAL, reason=None))
        self._info_events += 1
        closed = SessionClosed("connection closed by peer", code=CloseCode.NORMAL)
        closed.__cause__ = error
        self._finish(closed, clean=True, by_peer=True)

    def _handle_message(self, msg: Message, now: float) -> None:
        """Dispatch one decoded message: THE hot function of the core.

        The one speed shortcut lives here: while open, the messages of every open
        (OpenRequest, OpenResponse: nearly all traffic) are matched by exact type
        before the general ``isinstance`` chain below.
        """
        state = self.state
        if state is OPEN:
            kind = type(msg)
            if kind is OpenRequest:
                self._on_open_request(msg, now)  # type: ignore[arg-type]
                return
            if kind is OpenResponse:
                self._on_open_response_event(msg, now)  # type: ignore[arg-type]
                return
        if state is AWAIT_HELLO or state is AWAIT_HELLO_ACK:
            self._negotiate(msg, now)
            return
        if isinstance(msg, Hello | HelloAck):
            raise ProtocolError(f"unexpected {type(msg).__name__} after negotiation")
        if state is CLOSING:
            # Only the peer's answering session close matters now.
            if isinstance(msg, StreamClose) and msg.logical_stream_id == 0:
                logger.debug("%s: session close answered", self._tag)
                self._finish(SessionClosed("session closed", code=msg.code), clean=True)
            elif isinstance(msg, Ping):
                self._send(Pong(sequence=msg.sequence))
            return
        if isinstance(msg, OpenRequest):
            self._on_open_request(msg, now)
        elif isinstance(msg, OpenResponse):
            self._on_open_response_event(msg, now)
        elif isinstance(msg, StreamClose):
            self._on_stream_close(msg, now)
        elif isinstance(msg, Ping):
            logger.debug("%s: ping %d received, answering", self._tag, msg.sequence)
            self._send(Pong(sequence=msg.sequence))
            self._push_info(ev.PingReceived(sequence=msg.sequence))
        elif isinstance(msg, Pong):
            self._on_pong(msg, now)
        else:  # pragma: no cover - decode() returns only the types above
            raise ProtocolError(f"unknown message {msg!r}")

    def _on_open_response_event(self, msg: OpenResponse, now: float) -> None:
        self._push_info(msg)  # an OpenResponseReceived, built by next_user_event()
        self._on_open_response(msg, now)

    def _on_stream_close(self, msg: StreamClose, now: float) -> None:
        lsid = msg.logical_stream_id
        if lsid != 0:
            self._peer_abandoned(lsid, msg.code, msg.reason, now)
            logger.debug("%s: peer closed logical stream %d (%s)", self._tag, lsid, msg.code.name)
            self._push_info(
                ev.StreamCloseReceived(logical_stream_id=lsid, code=msg.code, reason=msg.reason)
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
            self._schedule_keepalive()
        else:
            self._outputs.append(PongReceived(msg.sequence, now - rec.sent_at))
        self._push_info(ev.PongReceived(sequence=msg.sequence))

    # ------------------------------------------------------------------ ping, close

    def send_ping(self, now: float, *, keepalive: bool = False) -> int:
        """Queue a Ping; returns its sequence number (from 1)."""
        self._require_open()
        seq = self._next_ping_seq
        self._next_ping_seq += 1
        deadline = now + self.config.ping_timeout
        self._pings[seq] = _PingRecord(now, deadline, keepalive)
        self._deadlines.schedule(deadline, _T_PING, seq)
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
            raise UsageError("close_stream: id 0 is the session; use close()")
        self._send(StreamClose(logical_stream_id=logical_stream_id, code=code, reason=reason))

    def close(self, code: CloseCode, reason: str | None, now: float) -> bool:
        """Start a session close. Returns True if StreamClose(0) was queued (wait for it).

        Before negotiation finished the session simply ends; once closing or closed this
        is a no-op returning False.
        """
        if self.state is CLOSING or self.state is CLOSED:
            return False
        if self.state is not OPEN:
            self._finish(SessionClosed("session closed before negotiation finished"), clean=True)
            return False
        self._send(StreamClose(logical_stream_id=0, code=code, reason=reason))
        self.state = CLOSING
        self._fail_local_work(SessionClosed("session closing", code=code, reason=reason))
        self._deadlines.schedule(now + self.config.close_timeout, TimerKind.CLOSE)
        logger.debug("%s: session close sent (%s)", self._tag, code.name)
        return True

    def abort(self, error: QuicReverseError) -> None:
        """End the session now with ``error`` (driver-side failures)."""
        if self.state is not CLOSED:
            self._finish(error)

    # ------------------------------------------------------------------ timers

    def handle_timer(self, now: float) -> None:
        """Act on every deadline that is due at ``now``."""
        for kind, key in self._deadlines.due(now):
            self._fire(kind, key, now)
            if self.state is CLOSED:
                return

    def _keepalive_due(self) -> float | None:
        interval = self.config.ping_interval
        return None if interval is None else self._last_activity + interval

    def _schedule_keepalive(self) -> None:
        due = self._keepalive_due()
        if due is not None:
            self._deadlines.schedule(due, _T_KEEPALIVE)

    def _timer_live(self, kind: TimerKind, key: int, deadline: float) -> bool:
        """Is the heap entry ``(deadline, kind, key)`` still wanted? (lazy deletion)"""
        if kind is _T_OPEN:
            return self._open_live(key, deadline)
        if kind is _T_HEADER:
            return self._header_live(key, deadline)
        if kind is _T_EARLY:
            return self._early_live(key, deadline)
        if kind is _T_PING:
            ping = self._pings.get(key)
            return ping is not None and ping.deadline == deadline
        if kind is TimerKind.ORPHAN_REQUEST:
            return self._orphan_requests.get(key) == deadline
        if kind is TimerKind.ORPHAN_LSID:
            return self._orphan_lsids.get(key) == deadline
        if kind is _T_KEEPALIVE:
            # One live keep-alive entry at a time: while a keep-alive ping is out, none.
            return self.state is OPEN and not self._keepalive_seq
        if kind is TimerKind.ADMISSION:
            return self._admission_live(key, deadline)
        if kind is TimerKind.NEGOTIATION:
            return self.is_negotiating
        return self.state is CLOSING  # TimerKind.CLOSE

    def _fire(self, kind: TimerKind, key: int, now: float) -> None:
        if kind is _T_OPEN:
            self._open_expired(key, now)
        elif kind is _T_HEADER:
            self._header_expired(key)
        elif kind is _T_EARLY:
            self._early_expired(key)
        elif kind is _T_PING:
            rec = self._pings.pop(key)
            if rec.keepalive:
                self._finish(Disconnected("keep-alive: no Pong within ping_timeout"))
            else:
                error = OperationTimeout(TimeoutKind.PING, f"no Pong for ping {key}")
                self._outputs.append(PingFailed(key, error))
        elif kind is TimerKind.ORPHAN_REQUEST:
            del self._orphan_requests[key]
        elif kind is TimerKind.ORPHAN_LSID:
            del self._orphan_lsids[key]
        elif kind is _T_KEEPALIVE:
            due = self._keepalive_due()
            assert due is not None
            if now >= due:
                self.send_ping(now, keepalive=True)
            else:  # traffic since it was scheduled: idle again from the last activity
                self._deadlines.schedule(due, _T_KEEPALIVE)
        elif kind is TimerKind.ADMISSION:
            self._admission_expired(key)
        elif kind is TimerKind.NEGOTIATION:
            hint = ""
            if self.role is Role.SERVER and self.state is AWAIT_HELLO:
                hint = " (no Hello arrived: is the peer also Role.SERVER?)"
            self._finish(
                OperationTimeout(
                    TimeoutKind.NEGOTIATION, f"negotiation did not finish in time{hint}"
                )
            )
        else:  # TimerKind.CLOSE
            logger.debug("%s: no answer to session close; closing anyway", self._tag)
            self._finish(SessionClosed("session closed", code=CloseCode.NORMAL), clean=True)

    # ------------------------------------------------------------------ ending

    def _protocol_failure(self, exc: ProtocolError) -> None:
        logger.error("%s: protocol error from peer: %s", self._tag, exc)
        if self.state is OPEN:
            reason = str(exc)[:200]
            self._send(StreamClose(logical_stream_id=0, code=CloseCode.ERROR, reason=reason))
        self._finish(exc)

    def _fail_local_work(self, error: QuicReverseError) -> None:
        self._fail_opens(error)
        for seq, rec in self._pings.items():
            if not rec.keepalive:
                self._outputs.append(PingFailed(seq, error))
        self._pings.clear()
        self._keepalive_seq = None
        self._fail_streams()
        self._fail_remote()
        self._fail_flows()
        self._deadlines.clear()

    def _finish(
        self, error: QuicReverseError, *, clean: bool = False, by_peer: bool = False
    ) -> None:
        self._fail_local_work(error)
        self.state = CLOSED
        self.end = SessionEnded(error, clean, by_peer)
        self._outputs.append(self.end)


def _disconnected(error: QuicReverseError) -> Disconnected:
    exc = Disconnected(f"connection lost: {error}")
    exc.__cause__ = error
    return exc

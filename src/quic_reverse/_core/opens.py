"""Local opens (we ask the peer): request ids, the queue, in-flight slots, orphans.

An open is sent at once while fewer than ``max_inflight_opens`` are in flight, else
queued (at most ``max_queued_opens``); either way it fails with an ``OPEN_REQUEST``
timeout after ``open_timeout``. Once accepted it waits (``stream_bind_timeout``) for
its data stream, paired by logical id (:mod:`.pairing`). An open abandoned while
unanswered leaves an *orphan request* (a late answer is ignored, a late accept's
stream reset); one abandoned after its accept leaves an *orphan lsid*. Both tombstone
tables are bounded in time and size.
"""

from __future__ import annotations

import collections
import contextlib
import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import (
    CapacityExceeded,
    OperationTimeout,
    ProtocolError,
    QuicReverseError,
    StreamRejected,
    StreamReset,
    TimeoutKind,
)
from ..wire import CloseCode, Metadata, OpenFlags, OpenResponse
from ..wire.framing import open_request_frame
from .base import CoreBase, logger
from .outputs import OpenFailed, OpenResolved, StreamRefused
from .timers import TimerKind

__all__ = ["LocalOpens"]


class OpenState(enum.Enum):
    QUEUED = "queued"  # waiting for an in-flight slot; nothing sent yet
    AWAIT_RESPONSE = "await_response"
    AWAIT_BIND = "await_bind"  # accepted; waiting for the data stream


@dataclass(slots=True)
class LocalOpen:
    request_id: int
    frame: bytes  # the encoded OpenRequest frame, sent when a slot is free
    state: OpenState
    deadline: float
    logical_stream_id: int | None = None


@dataclass(slots=True)
class EarlyStream:
    """A data stream that came before the OpenResponse naming its id."""

    token: int
    deadline: float


_QUEUED = OpenState.QUEUED
_AWAIT_RESPONSE = OpenState.AWAIT_RESPONSE
_AWAIT_BIND = OpenState.AWAIT_BIND
_T_OPEN = TimerKind.OPEN


class LocalOpens(CoreBase):
    """The local-open part of the core (a mixin of ``SessionCore``)."""

    _early: dict[int, EarlyStream]  # owned by .pairing; read here
    _flow_opens: set[int]  # owned by .flows: our unanswered flow opens; read here

    if TYPE_CHECKING:  # owned by .flows (the datagram-flow extension)

        def _flow_answered(self, rid: int, flow_id: int | None, now: float) -> bool: ...
        def _flow_open_dropped(self, rid: int) -> None: ...

    def _init_opens(self) -> None:
        self._next_request_id = 1
        self._local: dict[int, LocalOpen] = {}
        self._queued: collections.deque[int] = collections.deque()
        self._inflight = 0  # AWAIT_RESPONSE + AWAIT_BIND
        self._awaiting_response = 0
        self._by_lsid: dict[int, int] = {}  # peer-chosen lsid -> request id (AWAIT_BIND)
        self._orphan_requests: dict[int, float] = {}  # cancelled/timed out while unanswered
        self._orphan_lsids: dict[int, float] = {}  # accepted for an open nobody awaits
        self._unknown_responses = 0

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
        frame = open_request_frame(rid, service, metadata, flags)
        self._next_request_id += 1
        config = self.config
        rec = LocalOpen(rid, frame, _QUEUED, now + config.open_timeout)
        self._local[rid] = rec
        # One heap entry per open, at the earliest its deadline can be: the bind
        # deadline set on acceptance is never earlier, so acceptance schedules
        # nothing; an entry that finds its open's deadline later moves to it.
        self._deadlines.schedule(
            now + min(config.open_timeout, config.stream_bind_timeout), _T_OPEN, rid
        )
        if not must_queue:  # _send_open(rec), inline: every open takes this path
            rec.state = _AWAIT_RESPONSE
            self._inflight += 1
            self._awaiting_response += 1
            self._send_frame(frame)
            logger.debug("%s: OpenRequest %d sent", self._tag, rid)
        else:
            self._queued.append(rid)
            logger.debug("%s: open %d queued (%d in flight)", self._tag, rid, self._inflight)
        return rid

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

    # ------------------------------------------------------------------ internals

    def _send_open(self, rec: LocalOpen) -> None:
        rec.state = _AWAIT_RESPONSE
        self._inflight += 1
        self._awaiting_response += 1
        self._send_frame(rec.frame)
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

    def _drop_local(self, rid: int, now: float) -> LocalOpen | None:
        """Remove a local open from every table, freeing its slot."""
        rec = self._local.pop(rid, None)
        if rec is None:
            return None
        self._flow_open_dropped(rid)
        if rec.state is _QUEUED:
            with contextlib.suppress(ValueError):
                self._queued.remove(rid)
        else:
            self._inflight -= 1
            if rec.state is _AWAIT_BIND and rec.logical_stream_id is not None:
                self._by_lsid.pop(rec.logical_stream_id, None)
        self._pump_queue(now)
        return rec

    def _orphan_request(self, rid: int, now: float) -> None:
        self._trim(self._orphan_requests)
        deadline = now + self.config.open_timeout
        self._orphan_requests[rid] = deadline
        self._deadlines.schedule(deadline, TimerKind.ORPHAN_REQUEST, rid)

    def _orphan_lsid(self, lsid: int, now: float) -> None:
        early = self._early.pop(lsid, None)
        if early is not None:
            self._outputs.append(StreamRefused(early.token, f"stream {lsid} of an abandoned open"))
            return
        self._trim(self._orphan_lsids)
        deadline = now + self.config.stream_bind_timeout
        self._orphan_lsids[lsid] = deadline
        self._deadlines.schedule(deadline, TimerKind.ORPHAN_LSID, lsid)

    def _trim(self, table: dict[int, float]) -> None:
        """Keep tombstone tables bounded: drop the oldest entries past the limit."""
        limit = 4 * self.config.max_inflight_opens
        while len(table) >= limit:
            del table[next(iter(table))]

    def _bind(self, rid: int, lsid: int, token: int) -> None:
        self.active_streams += 1
        logger.debug("%s: open %d bound to lsid %d", self._tag, rid, lsid)
        self._outputs.append(OpenResolved(rid, lsid, token))

    # ------------------------------------------------------------------ peer input

    def _on_open_response(self, msg: OpenResponse, now: float) -> None:
        rid = msg.request_id
        lsid = msg.logical_stream_id
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
        if msg.status.code is not None:  # rejected
            assert msg.status.code is not None
            logger.debug("%s: open %d rejected: %s", self._tag, rid, msg.status.code.name)
            self._drop_local(rid, now)
            self._outputs.append(OpenFailed(rid, StreamRejected(msg.status.code, msg.reason)))
            return
        if self._flow_opens and self._flow_answered(rid, lsid, now):
            return  # a datagram flow (extension): no data stream follows
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
        rec.deadline = now + self.config.stream_bind_timeout  # its entry is due earlier
        self._by_lsid[lsid] = rid
        logger.debug("%s: open %d accepted as lsid %d, awaiting stream", self._tag, rid, lsid)

    def _peer_abandoned(self, lsid: int, code: CloseCode, reason: str | None, now: float) -> None:
        """StreamClose(``lsid``) from the peer: an open still awaiting that data stream
        fails now (the peer's service failed or its accept was cancelled), not at the
        bind deadline; a data stream that still comes for it is reset."""
        rid = self._by_lsid.get(lsid)
        if rid is None:
            return
        logger.debug("%s: open %d: peer closed lsid %d before binding", self._tag, rid, lsid)
        self.cancel_open(rid, now)
        what = f": {reason!r}" if reason else ""
        error = StreamReset(
            int(code),
            None,
            message=f"peer closed stream {lsid} ({code.name}) before its data stream bound{what}",
        )
        self._outputs.append(OpenFailed(rid, error))

    # ------------------------------------------------------------------ deadlines

    def _open_live(self, rid: int, deadline: float) -> bool:
        rec = self._local.get(rid)
        return rec is not None and deadline <= rec.deadline

    def _open_due(self, rid: int, entry: float) -> float | None:
        """The deadline of open ``rid`` if its heap entry (at ``entry``) is early."""
        deadline = self._local[rid].deadline
        return deadline if deadline > entry else None

    def _open_expired(self, rid: int, now: float) -> None:
        rec = self._local[rid]
        if now < rec.deadline:  # an early entry (see open_request): move it
            self._deadlines.schedule(rec.deadline, _T_OPEN, rid)
            return
        if rec.state is _AWAIT_BIND:
            error = OperationTimeout(
                TimeoutKind.STREAM_BIND,
                f"data stream {rec.logical_stream_id} did not arrive in time",
            )
        else:
            error = OperationTimeout(
                TimeoutKind.OPEN_REQUEST, f"open request {rid} got no answer in time"
            )
        self.cancel_open(rid, now)
        self._outputs.append(OpenFailed(rid, error))

    def _fail_opens(self, error: QuicReverseError) -> None:
        """The session ended: every local open fails with ``error``; tables cleared
        directly (going through _drop_local would send queued opens)."""
        for rid in self._local:
            self._outputs.append(OpenFailed(rid, error))
        self._local.clear()
        self._queued.clear()
        self._by_lsid.clear()
        self._inflight = 0
        self._awaiting_response = 0
        self._orphan_requests.clear()
        self._orphan_lsids.clear()

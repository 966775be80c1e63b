"""Remote opens (the peer asks us): admission under the stream limit, answers, ids.

A peer's OpenRequest is handed out as an event (``OpenRequestReceived``) while
``active_streams`` plus the unanswered requests stay under ``max_concurrent_streams``.
Past that it *waits* for a slot (at most ``max_queued_opens`` requests, each at most
``open_timeout``; :attr:`TimerKind.ADMISSION`), and only past those bounds is it
rejected with ``LIMIT_EXCEEDED``. A slot frees when an accepted or bound stream is
released or a request is rejected. Accepting picks the logical stream id (from 1,
skipping ids in use).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .. import events as ev
from ..errors import EncodeError, ProtocolError, UsageError
from ..wire import OpenFlags, OpenRequest, OpenResponse, OpenStatus, RejectCode
from ..wire.framing import open_response_accepted_frame
from .base import OPEN, CoreBase, logger
from .timers import TimerKind

__all__ = ["RemoteOpens"]

_U64_MAX = 2**64 - 1


class RemoteOpens(CoreBase):
    """The remote-open part of the core (a mixin of ``SessionCore``)."""

    _flow_requests: set[int]  # owned by .flows: unanswered requests for datagram flows

    if TYPE_CHECKING:  # owned by .flows (the datagram-flow extension)

        def is_flow_request(self, flags: OpenFlags) -> bool: ...

    def _init_remote(self) -> None:
        self._incoming: dict[int, str] = {}  # request id -> service, unanswered
        # requests past max_concurrent_streams, waiting for a slot: id -> (msg, deadline)
        self._waiting: dict[int, tuple[OpenRequest, float]] = {}
        self._next_lsid = 1
        self._used_lsids: set[int] = set()
        self.active_streams = 0
        self._limit_rejects = 0

    def _on_open_request(self, msg: OpenRequest, now: float) -> None:
        rid = msg.request_id
        if rid in self._incoming or rid in self._waiting:
            raise ProtocolError(f"OpenRequest: request_id {rid} is already pending")
        if self.active_streams + len(self._incoming) < self.config.max_concurrent_streams:
            self._admit(msg)
            return
        # At the stream limit: the request waits for a slot (bounded in number by
        # max_queued_opens and in time by open_timeout) instead of being refused.
        if len(self._waiting) < self.config.max_queued_opens:
            deadline = now + self.config.open_timeout
            self._waiting[rid] = (msg, deadline)
            self._deadlines.schedule(deadline, TimerKind.ADMISSION, rid)
            logger.debug(
                "%s: OpenRequest %d waits for a stream slot (%d waiting)",
                self._tag,
                rid,
                len(self._waiting),
            )
            return
        self._reject_over_limit(rid, msg.service, "too many concurrent streams")

    def _admit(self, msg: OpenRequest) -> None:
        """Hand the peer's request to the user (an event) and count it against the limit."""
        rid = msg.request_id
        logger.debug("%s: OpenRequest %d for %r", self._tag, rid, msg.service)
        self._incoming[rid] = msg.service
        if self.is_flow_request(msg.flags):  # datagram flow (extension, .flows)
            self._flow_requests.add(rid)
        self._events.append(
            ev.OpenRequestReceived(
                request_id=rid, service=msg.service, metadata=msg.metadata, flags=msg.flags
            )
        )

    def _admit_waiting(self) -> None:
        """A stream slot was freed: admit waiting requests, oldest first."""
        waiting = self._waiting
        limit = self.config.max_concurrent_streams
        while waiting and self.active_streams + len(self._incoming) < limit:
            rid = next(iter(waiting))
            msg, _ = waiting.pop(rid)
            self._admit(msg)

    def _reject_over_limit(self, rid: int, service: str, reason: str) -> None:
        self._limit_rejects += 1
        if self._limit_rejects & (self._limit_rejects - 1) == 0:  # 1, 2, 4, 8...: no flood
            logger.warning(
                "%s: rejecting OpenRequest %d for %r: LIMIT_EXCEEDED, %s "
                "(%d active, %d unanswered, %d waiting; %d rejected so far)",
                self._tag,
                rid,
                service,
                reason,
                self.active_streams,
                len(self._incoming),
                len(self._waiting),
                self._limit_rejects,
            )
        self._send(
            OpenResponse(
                request_id=rid,
                status=OpenStatus.rejected(RejectCode.LIMIT_EXCEEDED),
                reason=reason,
            )
        )

    def incoming_service(self, request_id: int) -> str:
        """The service of the peer's unanswered request ``request_id``.

        Raises :class:`SessionClosed` if the session is not open, :class:`UsageError`
        if no such request is pending.
        """
        self._require_open()
        service = self._incoming.get(request_id)
        if service is None:
            raise UsageError(f"no pending OpenRequest with request_id {request_id}")
        return service

    def is_incoming(self, request_id: int) -> bool:
        """True while the peer's request ``request_id`` is unanswered (and handed out)."""
        return request_id in self._incoming

    def check_accept(self, request_id: int, logical_stream_id: int | None = None) -> None:
        """Raise what :meth:`accept` would raise, without accepting."""
        self._require_open()
        if request_id not in self._incoming:
            raise UsageError(f"accept_open: no pending OpenRequest with request_id {request_id}")
        if request_id in self._flow_requests:
            raise UsageError(
                f"accept_open: request {request_id} asks for a datagram flow; use accept_flow()"
            )
        if logical_stream_id is not None:
            lsid = logical_stream_id
            if isinstance(lsid, bool) or not isinstance(lsid, int) or not 0 < lsid <= _U64_MAX:
                raise EncodeError(
                    f"accept_open: logical_stream_id must be in 1..2**64-1, got {lsid!r}"
                )
            if lsid in self._used_lsids:
                raise UsageError(f"accept_open: logical_stream_id {lsid} is already in use")

    def accept(self, request_id: int, logical_stream_id: int | None = None) -> int:
        """Accept the peer's request: queue OpenResponse(Accepted) and return the logical id.

        The id is chosen here (from 1, skipping ids in use) unless given. An unknown
        request id or an id in use raise :class:`UsageError`; an id that is not in
        1..2**64-1 raises :class:`EncodeError`.
        """
        self.check_accept(request_id, logical_stream_id)
        if logical_stream_id is None:
            lsid = self._next_lsid
            while lsid in self._used_lsids or lsid == 0:
                lsid = lsid + 1 if lsid < _U64_MAX else 1
            self._next_lsid = lsid + 1 if lsid < _U64_MAX else 1
        else:
            lsid = logical_stream_id
        self._send_frame(open_response_accepted_frame(request_id, lsid))
        del self._incoming[request_id]
        self._used_lsids.add(lsid)
        self.active_streams += 1
        logger.debug("%s: accepted request %d as lsid %d", self._tag, request_id, lsid)
        return lsid

    def reject(self, request_id: int, code: RejectCode, reason: str | None) -> None:
        """Reject the peer's request with ``code``."""
        self._require_open()
        if request_id not in self._incoming:
            raise UsageError(f"reject_open: no pending OpenRequest with request_id {request_id}")
        self._send(
            OpenResponse(request_id=request_id, status=OpenStatus.rejected(code), reason=reason)
        )
        service = self._incoming.pop(request_id)
        self._flow_requests.discard(request_id)
        self._admit_waiting()
        # The application chose this answer: a protocol step, not a problem.
        logger.debug(
            "%s: rejected request %d for %r: %s",
            self._tag,
            request_id,
            service,
            RejectCode(code).name,
        )

    def stream_released(self, local_lsid: int | None) -> bool:
        """An active stream (bound or accepted) is done; frees its slot and local id.
        Returns True if that admitted waiting requests (events to hand out)."""
        self.active_streams = max(0, self.active_streams - 1)
        if local_lsid is not None:
            self._used_lsids.discard(local_lsid)
        if self._waiting and self.state is OPEN:
            self._admit_waiting()
            return True
        return False

    # ------------------------------------------------------------------ deadlines

    def _admission_live(self, rid: int, deadline: float) -> bool:
        waiting = self._waiting.get(rid)
        return waiting is not None and waiting[1] == deadline

    def _admission_expired(self, rid: int) -> None:
        msg, _ = self._waiting.pop(rid)
        self._reject_over_limit(rid, msg.service, "no stream slot within open_timeout")

    def _fail_remote(self) -> None:
        """The session ended: forget every unanswered request."""
        self._incoming.clear()
        self._waiting.clear()

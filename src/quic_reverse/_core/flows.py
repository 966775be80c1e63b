"""Datagram flows (extension ``Features.DATAGRAM_FLOWS``, PROTOCOL.md §9): the control
side, sans-IO. A mixin of ``SessionCore``.

A flow is opened like a stream: an ``OpenRequest`` with ``OpenFlags.DATAGRAM`` goes
through the local-open machinery (:mod:`.opens`: ids, in-flight slots, open timeout)
and the peer's through admission (:mod:`.remote`: ``max_concurrent_streams``,
allow-lists, reject codes). Accepting answers ``OpenResponse(Accepted)`` whose
``logical_stream_id`` is the **flow id**, chosen by the acceptor with its role's
parity (client odd, server even); no data stream follows. ``FlowClose`` (variant 7)
ends a flow. Datagrams themselves never pass through the core: the driver
(:mod:`quic_reverse.flow`) routes them by flow id.

Nothing of this is sent unless both Hellos carried the feature bit.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..config import Role
from ..errors import DatagramsUnavailable, ProtocolError, UsageError
from ..wire import CloseCode, Features, Metadata, OpenFlags, encode_frame
from ..wire.flows import MAX_FLOW_ID, FlowClose, decode_flow_close, encode_flow_close
from .base import OPEN, CoreBase, logger
from .outputs import FlowClosed, FlowOpened, OpenFailed

__all__ = ["FlowCore"]

_FLOWS = Features.DATAGRAM_FLOWS
_DATAGRAM = int(OpenFlags.DATAGRAM)


class FlowCore(CoreBase):
    """The datagram-flow part of the core (see the module docstring)."""

    negotiated_features: Features | None

    _used_lsids: set[int]
    _incoming: dict[int, str]

    if TYPE_CHECKING:  # provided by the other parts of SessionCore

        def open_request(
            self, service: str, metadata: Metadata, flags: OpenFlags, now: float
        ) -> int: ...
        def accept(self, request_id: int, logical_stream_id: int | None = None) -> int: ...
        def stream_released(self, local_lsid: int | None) -> bool: ...
        def _drop_local(self, rid: int, now: float) -> object: ...

    def _init_flows(self) -> None:
        self._flow_opens: set[int] = set()  # request ids of our unanswered flow opens
        self._flow_requests: set[int] = set()  # the peer's unanswered flow requests
        self._flows: dict[int, bool] = {}  # flow id -> True if we accepted it
        self._next_flow_id = 1 if self.role is Role.CLIENT else 2

    @property
    def flows_available(self) -> bool:
        """True once negotiated with ``Features.DATAGRAM_FLOWS`` on both sides."""
        features = self.negotiated_features
        return features is not None and bool(features & _FLOWS)

    @property
    def flow_count(self) -> int:
        """Open datagram flows (both directions)."""
        return len(self._flows)

    def is_flow_request(self, flags: OpenFlags) -> bool:
        """Is a peer's request with these flags a datagram flow request?"""
        # int(): an IntFlag ``&`` builds a new flag object, this runs once per open.
        return bool(int(flags) & _DATAGRAM) and self.flows_available

    # ------------------------------------------------------------------ local opens

    def open_flow_request(self, service: str, metadata: Metadata, now: float) -> int:
        """Ask the peer for a datagram flow to ``service``; returns the request id.

        Raises :class:`DatagramsUnavailable` when the peer did not negotiate
        ``Features.DATAGRAM_FLOWS`` (then nothing is sent), else as ``open_request``.
        """
        self._require_open()
        if not self.flows_available:
            raise DatagramsUnavailable(
                "the peer does not support datagram flows (it did not announce "
                "Features.DATAGRAM_FLOWS, e.g. the Rust crate quic-reverse)"
            )
        rid = self.open_request(service, metadata, OpenFlags.DATAGRAM, now)
        self._flow_opens.add(rid)
        return rid

    def _flow_answered(self, rid: int, flow_id: int | None, now: float) -> bool:
        """Hook of ``_on_open_response`` for an accepted answer: True if ``rid`` was a
        flow open (then handled here: no data stream follows)."""
        if rid not in self._flow_opens:
            return False
        self._drop_local(rid, now)
        peer_parity = 0 if self.role is Role.CLIENT else 1  # the peer chose the id
        if (
            not flow_id
            or flow_id > MAX_FLOW_ID
            or flow_id & 1 != peer_parity
            or flow_id in self._flows
        ):
            error = ProtocolError(f"OpenResponse accepted a datagram flow with bad id {flow_id}")
            self._outputs.append(OpenFailed(rid, error))
            return True
        self._flows[flow_id] = False
        logger.debug("%s: flow open %d accepted as flow %d", self._tag, rid, flow_id)
        self._outputs.append(FlowOpened(rid, flow_id))
        return True

    def _flow_open_dropped(self, rid: int) -> None:
        """Hook of ``_drop_local``: the open is answered, failed or abandoned."""
        self._flow_opens.discard(rid)

    # ------------------------------------------------------------------ remote opens

    def accept_flow(self, request_id: int) -> int:
        """Accept the peer's flow request: queue OpenResponse(Accepted, flow id) and
        return the flow id. Raises :class:`UsageError` for an unknown request."""
        self._require_open()
        if request_id not in self._incoming:
            raise UsageError(f"accept_flow: no pending OpenRequest with request_id {request_id}")
        if request_id not in self._flow_requests:
            raise UsageError(
                f"accept_flow: request {request_id} asks for a stream; use accept_open()"
            )
        self._flow_requests.discard(request_id)
        fid = self._next_flow_id
        while fid in self._flows or fid in self._used_lsids:
            fid += 2
        if fid > MAX_FLOW_ID:  # pragma: no cover - 2**61 flows
            fid = 1 if self.role is Role.CLIENT else 2
        self._next_flow_id = fid + 2
        self.accept(request_id, fid)
        self._flows[fid] = True
        logger.debug("%s: accepted flow request %d as flow %d", self._tag, request_id, fid)
        return fid

    # ------------------------------------------------------------------ closing

    def close_flow(self, flow_id: int, code: CloseCode, reason: str | None) -> None:
        """Forget flow ``flow_id`` and tell the peer (FlowClose). Idempotent."""
        ours = self._flows.pop(flow_id, None)
        if ours is None:
            return
        if ours:
            self.stream_released(flow_id)
        if self.state is OPEN:
            msg = FlowClose(flow_id=flow_id, code=code, reason=reason)
            self._send_frame(encode_frame(encode_flow_close(msg)))
            logger.debug("%s: flow %d closed (%s)", self._tag, flow_id, code.name)

    def _on_flow_close_payload(self, payload: bytes) -> None:
        """A control payload with variant 7 after DATAGRAM_FLOWS was negotiated."""
        msg = decode_flow_close(payload)
        if self.state is not OPEN:
            return
        ours = self._flows.pop(msg.flow_id, None)
        if ours is None:
            logger.debug("%s: FlowClose for unknown flow %d ignored", self._tag, msg.flow_id)
            return
        if ours:
            self.stream_released(msg.flow_id)
        logger.debug("%s: peer closed flow %d (%s)", self._tag, msg.flow_id, msg.code.name)
        self._outputs.append(FlowClosed(msg.flow_id, int(msg.code), msg.reason))

    def _fail_flows(self) -> None:
        """The session ended: forget every flow (the driver closes its flow objects)."""
        self._flow_opens.clear()
        self._flow_requests.clear()
        self._flows.clear()

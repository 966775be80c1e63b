"""Control events returned by :meth:`SessionHandle.process_message`.

They mirror the Rust crate's ``ControlEvent`` variants. Each is a frozen, keyword-only
dataclass deriving from :class:`ControlEvent`, usable with ``match``::

    match await handle.process_message():
        case OpenRequest(request_id=rid, service="ssh"):
            stream = await handle.accept_open(rid)
        case CloseReceived(code=code):
            ...

Every variant is also reachable as an attribute of the base (``ControlEvent.OpenRequest``),
like the Rust enum's ``ControlEvent::OpenRequest``.

Names: the events that correspond to a wire message are named ``...Received``
(:class:`OpenRequestReceived`, :class:`PingReceived`, :class:`PongReceived`,
:class:`StreamCloseReceived`), so they are not confused with the wire messages of
:mod:`quic_reverse.wire` (whose fields have defaults and which are what is sent). The
short names (``OpenRequest``, ``Ping``, ``Pong``, ``StreamClose``) stay as aliases of
the same classes: existing code and ``match`` patterns keep working.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .wire import CloseCode, Metadata, OpenFlags, OpenStatus

__all__ = [
    "CloseReceived",
    "ControlEvent",
    "OpenRequest",
    "OpenRequestReceived",
    "OpenResponseReceived",
    "Ping",
    "PingReceived",
    "Pong",
    "PongReceived",
    "StreamClose",
    "StreamCloseReceived",
]


@dataclass(frozen=True, kw_only=True)
class ControlEvent:
    """Base of every control event."""

    OpenRequest: ClassVar[type[OpenRequestReceived]]
    OpenRequestReceived: ClassVar[type[OpenRequestReceived]]
    OpenResponseReceived: ClassVar[type[OpenResponseReceived]]
    CloseReceived: ClassVar[type[CloseReceived]]
    Ping: ClassVar[type[PingReceived]]
    PingReceived: ClassVar[type[PingReceived]]
    Pong: ClassVar[type[PongReceived]]
    PongReceived: ClassVar[type[PongReceived]]
    StreamClose: ClassVar[type[StreamCloseReceived]]
    StreamCloseReceived: ClassVar[type[StreamCloseReceived]]


@dataclass(frozen=True, kw_only=True)
class OpenRequestReceived(ControlEvent):
    """The peer asks us to open a stream for ``service``.

    Answer with ``accept_open(request_id)`` or ``reject_open(request_id, code)``; requests
    left unanswered count against ``max_concurrent_streams``.
    """

    request_id: int
    service: str
    metadata: Metadata
    flags: OpenFlags


@dataclass(frozen=True, kw_only=True)
class OpenResponseReceived(ControlEvent):
    """The peer answered one of our opens (informational: ``open()`` already consumes it)."""

    request_id: int
    status: OpenStatus
    reason: str | None
    logical_stream_id: int | None


@dataclass(frozen=True, kw_only=True)
class CloseReceived(ControlEvent):
    """The peer closed the session (StreamClose with logical id 0). The session then ends."""

    code: CloseCode
    reason: str | None


@dataclass(frozen=True, kw_only=True)
class PingReceived(ControlEvent):
    """The peer pinged us; the session has already answered with a Pong."""

    sequence: int


@dataclass(frozen=True, kw_only=True)
class PongReceived(ControlEvent):
    """A Pong answered one of our Pings."""

    sequence: int


@dataclass(frozen=True, kw_only=True)
class StreamCloseReceived(ControlEvent):
    """The peer reports that a logical stream is done (informational)."""

    logical_stream_id: int
    code: CloseCode
    reason: str | None


#: Aliases: the names these events had first (no public name is removed).
OpenRequest = OpenRequestReceived
Ping = PingReceived
Pong = PongReceived
StreamClose = StreamCloseReceived

ControlEvent.OpenRequest = ControlEvent.OpenRequestReceived = OpenRequestReceived
ControlEvent.OpenResponseReceived = OpenResponseReceived
ControlEvent.CloseReceived = CloseReceived
ControlEvent.Ping = ControlEvent.PingReceived = PingReceived
ControlEvent.Pong = ControlEvent.PongReceived = PongReceived
ControlEvent.StreamClose = ControlEvent.StreamCloseReceived = StreamCloseReceived

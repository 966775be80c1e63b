"""What the core reports to its driver (``SessionCore.outputs()``), and its states."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from ..errors import QuicReverseError
from ..wire import Features

__all__ = [
    "CoreState",
    "FlowClosed",
    "FlowOpened",
    "Negotiated",
    "OpenFailed",
    "OpenResolved",
    "Output",
    "PingFailed",
    "PongReceived",
    "SessionEnded",
    "StreamRefused",
]


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


@dataclass(frozen=True, slots=True)
class FlowOpened:
    """Local flow open ``request_id`` was accepted as datagram flow ``flow_id``."""

    request_id: int
    flow_id: int


@dataclass(frozen=True, slots=True)
class FlowClosed:
    """The peer closed datagram flow ``flow_id`` (FlowClose)."""

    flow_id: int
    code: int
    reason: str | None


Output = (
    Negotiated
    | OpenResolved
    | OpenFailed
    | StreamRefused
    | PongReceived
    | PingFailed
    | SessionEnded
    | FlowOpened
    | FlowClosed
)

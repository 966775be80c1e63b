"""quic-reverse: reverse-initiated, multiplexed streams over QUIC.

Wire-compatible with protocol v1 of the Rust crate ``quic-reverse``.
"""

from __future__ import annotations

from .config import Config, Role
from .errors import (
    CapacityExceeded,
    CertificateError,
    ConfigError,
    ConnectionClosed,
    Disconnected,
    EncodeError,
    IncompleteReadError,
    NegotiationError,
    OperationTimeout,
    ProtocolError,
    QuicReverseError,
    SessionClosed,
    StreamRejected,
    StreamReset,
    StreamStopped,
    TimeoutKind,
    TransportError,
    UsageError,
)
from .events import (
    CloseReceived,
    ControlEvent,
    OpenRequest,
    OpenResponseReceived,
    Ping,
    Pong,
    StreamClose,
)
from .session import Handler, Session, SessionHandle
from .stream import Stream
from .wire import CloseCode, Features, Metadata, OpenFlags, OpenStatus, RejectCode

__version__ = "0.1.0"

__all__ = [
    "CloseCode",
    "CloseReceived",
    "Config",
    "ControlEvent",
    "Features",
    "Handler",
    "Metadata",
    "OpenFlags",
    "OpenRequest",
    "OpenResponseReceived",
    "OpenStatus",
    "Ping",
    "Pong",
    "RejectCode",
    "Role",
    "Session",
    "SessionHandle",
    "Stream",
    "StreamClose",
    "CapacityExceeded",
    "CertificateError",
    "ConfigError",
    "ConnectionClosed",
    "Disconnected",
    "EncodeError",
    "IncompleteReadError",
    "NegotiationError",
    "OperationTimeout",
    "ProtocolError",
    "QuicReverseError",
    "SessionClosed",
    "StreamRejected",
    "StreamReset",
    "StreamStopped",
    "TimeoutKind",
    "TransportError",
    "UsageError",
    "__version__",
]

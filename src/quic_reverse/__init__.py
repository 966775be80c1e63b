"""quic-reverse: reverse-initiated, multiplexed streams over QUIC.

Wire-compatible with protocol v1 of the Rust crate ``quic-reverse``.
"""

from __future__ import annotations

import logging as _logging

from ._starting import AwaitableContext
from .config import Config, Role
from .errors import (
    CapacityExceeded,
    CertificateError,
    ConfigError,
    ConnectionClosed,
    DatagramFlowClosed,
    DatagramsUnavailable,
    DatagramTooLarge,
    Disconnected,
    EncodeError,
    IncompleteReadError,
    LimitOverrunError,
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
    OpenRequestReceived,
    OpenResponseReceived,
    Ping,
    PingReceived,
    Pong,
    PongReceived,
    StreamClose,
    StreamCloseReceived,
)
from .flow import DatagramFlow, FlowHandler
from .session import Handler, Session, SessionHandle
from .stream import Stream
from .wire import CloseCode, Features, Metadata, OpenFlags, OpenStatus, RejectCode

__version__ = "0.1.0"

# A library configures no output: without this, records of WARNING and above would go
# to stderr through logging's last-resort handler when the application set up nothing.
_logging.getLogger("quic_reverse").addHandler(_logging.NullHandler())

__all__ = [
    "AwaitableContext",
    "CloseCode",
    "CloseReceived",
    "Config",
    "ControlEvent",
    "DatagramFlow",
    "Features",
    "FlowHandler",
    "Handler",
    "Metadata",
    "OpenFlags",
    "OpenRequest",
    "OpenRequestReceived",
    "OpenResponseReceived",
    "OpenStatus",
    "Ping",
    "PingReceived",
    "Pong",
    "PongReceived",
    "RejectCode",
    "Role",
    "Session",
    "SessionHandle",
    "Stream",
    "StreamClose",
    "StreamCloseReceived",
    "CapacityExceeded",
    "CertificateError",
    "ConfigError",
    "ConnectionClosed",
    "DatagramFlowClosed",
    "DatagramTooLarge",
    "DatagramsUnavailable",
    "Disconnected",
    "EncodeError",
    "IncompleteReadError",
    "LimitOverrunError",
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

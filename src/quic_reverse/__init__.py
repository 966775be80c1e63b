"""quic-reverse: reverse-initiated, multiplexed streams over QUIC.

Wire-compatible with protocol v1 of the Rust crate ``quic-reverse``.
"""

from __future__ import annotations

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
)

__version__ = "0.1.0"

__all__ = [
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
    "__version__",
]

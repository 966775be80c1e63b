"""The exception tree of quic-reverse: every error the library raises derives from
:class:`QuicReverseError`, so ``except QuicReverseError`` catches all of them.

::

    QuicReverseError
    ├── ConfigError (also ValueError) - invalid Config / CLI / TLS settings
    ├── UsageError (also RuntimeError) - the API was called in a state that forbids it
    ├── EncodeError (also ValueError) - a local value cannot be put on the wire
    ├── ProtocolError - malformed or out-of-order data from the peer
    │   └── NegotiationError - Hello/HelloAck exchange failed
    ├── OperationTimeout (also TimeoutError) - a deadline passed; ``.kind`` says which
    ├── StreamRejected - the peer rejected an open (``.code``, ``.reason``)
    ├── SessionClosed - the session was closed (locally or by the peer)
    ├── Disconnected (also ConnectionError) - the connection is gone / keep-alive failed
    ├── CapacityExceeded - a local limit refuses the operation
    │   └── LimitOverrunError (also asyncio.LimitOverrunError) - ``readuntil`` found no
    │       separator within its limit (``.consumed``)
    ├── DatagramsUnavailable - no QUIC datagrams / datagram flows with this peer or path
    ├── DatagramTooLarge (also ValueError) - a datagram over ``max_datagram_size``
    ├── DatagramFlowClosed - the datagram flow is closed (``.code``, ``.reason``)
    ├── IncompleteReadError (also asyncio.IncompleteReadError, so EOFError) - FIN arrived
    │   before ``readexactly(n)`` had n bytes (``.partial``, ``.expected``)
    └── TransportError - the QUIC layer failed; stack errors converted here
        ├── ConnectionClosed (also ConnectionError) - the QUIC connection is closed
        │   (``.error_code``, ``.reason``)
        ├── StreamReset (also ConnectionResetError) - the peer reset the stream we read
        │   (``.error_code``)
        ├── StreamStopped (also BrokenPipeError) - the peer asked us to stop sending
        │   (``.error_code``)
        └── CertificateError (also ssl.SSLCertVerificationError) - the peer's
            certificate failed verification/pinning

**Builtin bases.** Each error also derives from the builtin exception it means, so
code written for asyncio streams and sockets catches it unchanged: ``except
ConnectionResetError`` catches a peer reset, ``except ConnectionError`` a lost
connection, ``except asyncio.IncompleteReadError`` a short ``readexactly``, ``except
ssl.SSLCertVerificationError`` a certificate that failed. The ``OSError`` subclasses
among them (``ConnectionError`` and its children, ``ssl.SSLError``) keep the
one-argument form: ``str()`` is the message, ``args`` is ``(message,)`` and ``errno``
is ``None``, because no operating-system call failed (asyncio raises
``ConnectionResetError("Connection lost")`` the same way). ``except OSError`` therefore
catches these transport errors too.

Errors that map to a wire code carry it as an attribute; conversion from stack
exceptions (qh3, aioquic, ``OSError``) happens only in ``quic_reverse.transport``.
"""

from __future__ import annotations

import asyncio
import enum
import ssl
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the wire package imports this module
    from .wire import CloseCode, RejectCode

__all__ = [
    "CapacityExceeded",
    "DatagramFlowClosed",
    "DatagramTooLarge",
    "DatagramsUnavailable",
    "CertificateError",
    "ConfigError",
    "ConnectionClosed",
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
]


class QuicReverseError(Exception):
    """Root of every exception raised by quic-reverse."""

    def __reduce__(self) -> tuple[Any, ...]:
        # Many errors take other constructor arguments than their ``args`` (the
        # message): rebuild without calling __init__, so pickling (multiprocessing,
        # concurrent.futures) round-trips every error with its attributes.
        strerror = self.strerror if isinstance(self, OSError) else None
        return (_rebuild, (type(self), self.args, dict(self.__dict__), strerror))


def _rebuild(
    cls: type[QuicReverseError], args: tuple[Any, ...], state: dict[str, Any], strerror: Any
) -> QuicReverseError:
    error = cls.__new__(cls)
    error.args = args
    error.__dict__.update(state)
    if isinstance(error, OSError):
        error.strerror = strerror
    return error


class ConfigError(QuicReverseError, ValueError):
    """A configuration value is invalid (raised at construction, never later)."""


class UsageError(QuicReverseError, RuntimeError):
    """A local call came in a state that does not allow it (a programming error).

    Examples: starting a session twice, writing to a stream after ``write_eof()``,
    accepting an open that was already answered. Nothing reached the peer; the
    session is unaffected. Also a builtin :class:`RuntimeError`, which is what such
    calls raised before this class existed.
    """


class EncodeError(QuicReverseError, ValueError):
    """A local value cannot be encoded: out-of-range integer, wrong type, frame too large.

    Raised before any byte is produced, so nothing half-written reaches the peer.
    """


class ProtocolError(QuicReverseError):
    """The peer sent data that violates wire protocol v1.

    The message says what was wrong and where, e.g.
    ``"OpenResponse.status: unknown variant 2"``.
    """


class NegotiationError(ProtocolError):
    """The Hello/HelloAck exchange failed: version mismatch or an unexpected message."""


class TimeoutKind(enum.Enum):
    """Which deadline expired."""

    NEGOTIATION = "negotiation"
    OPEN_REQUEST = "open_request"
    STREAM_BIND = "stream_bind"
    PING = "ping"


class OperationTimeout(QuicReverseError, TimeoutError):
    """A protocol deadline passed. Also a builtin :class:`TimeoutError`.

    ``kind`` tells which deadline (negotiation, open request, stream bind, ping).
    """

    def __init__(self, kind: TimeoutKind, message: str | None = None) -> None:
        self.kind = kind
        super().__init__(message or f"{kind.value} timed out")


class StreamRejected(QuicReverseError):
    """The peer answered an open request with ``Rejected``.

    ``code`` is a :class:`quic_reverse.wire.RejectCode`; ``reason`` the peer's text, if any.
    """

    def __init__(self, code: RejectCode | int, reason: str | None = None) -> None:
        self.code: RejectCode = _as_enum("RejectCode", code)
        self.reason = reason
        name = getattr(self.code, "name", self.code)
        # The reason is peer-supplied text: repr() keeps control characters out of logs.
        super().__init__(f"open rejected: {name}" + (f" ({reason!r})" if reason else ""))


class SessionClosed(QuicReverseError):
    """The session is closed; no further operations are possible.

    ``code`` (a :class:`quic_reverse.wire.CloseCode`) / ``reason`` are those of the
    session close when known.
    """

    def __init__(
        self,
        message: str = "session closed",
        *,
        code: CloseCode | int | None = None,
        reason: str | None = None,
    ) -> None:
        self.code: CloseCode | None = None if code is None else _as_enum("CloseCode", code)
        self.reason = reason
        super().__init__(message)


def _as_enum(kind: str, value: object) -> Any:
    """``value`` as the wire enum ``kind`` when it is one of its values, else unchanged
    (a peer may send a code this version does not know)."""
    from . import wire  # late: the wire package imports this module

    enum_type = getattr(wire, kind)
    try:
        return enum_type(value)
    except (ValueError, TypeError):
        return value


class Disconnected(QuicReverseError, ConnectionError):
    """The underlying connection was lost, or the peer stopped answering keep-alives.

    Also a builtin :class:`ConnectionError` (``errno`` is ``None``).
    """


class CapacityExceeded(QuicReverseError):
    """A local limit (in-flight opens, concurrent streams) refuses the operation."""


class LimitOverrunError(CapacityExceeded, asyncio.LimitOverrunError):
    """``Stream.readuntil()`` found no separator within its ``limit`` (``.consumed``:
    how many bytes were looked at). Also an :class:`asyncio.LimitOverrunError`."""

    consumed: int

    def __init__(self, message: str, consumed: int) -> None:
        self.consumed = consumed
        Exception.__init__(self, message)


class DatagramsUnavailable(QuicReverseError):
    """No datagrams here: the peer did not negotiate ``Features.DATAGRAM_FLOWS`` (e.g.
    the Rust crate), or the QUIC connection carries no DATAGRAM frames (RFC 9221)."""


class DatagramTooLarge(QuicReverseError, ValueError):
    """A datagram longer than the path allows (``.size`` > ``.limit``); never fragmented."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"datagram of {size} bytes exceeds the {limit}-byte limit of the path")
        self.size = size
        self.limit = limit


class DatagramFlowClosed(QuicReverseError):
    """The datagram flow is closed: locally, by the peer (FlowClose), by its idle
    timeout, or because the session ended. ``code`` is the CloseCode value."""

    def __init__(self, message: str, *, code: int = 0, reason: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason


class IncompleteReadError(QuicReverseError, asyncio.IncompleteReadError):
    """The stream ended (FIN) before the requested number of bytes arrived.

    Also an :class:`asyncio.IncompleteReadError` (and so an :class:`EOFError`), with the
    same ``partial`` (the bytes that did arrive) and ``expected`` attributes.
    """

    partial: bytes
    expected: int | None

    def __init__(self, partial: bytes, expected: int | None) -> None:
        self.partial = partial
        self.expected = expected
        # Not asyncio's __init__: it would set its own message; ours stays as it was.
        if expected is None:  # readuntil(): EOF before the separator
            message = f"stream ended after {len(partial)} bytes, before the separator"
        else:
            message = f"stream ended after {len(partial)} of {expected} bytes"
        Exception.__init__(self, message)


class TransportError(QuicReverseError):
    """The QUIC transport failed. Stack-specific exceptions are converted to this family."""


class ConnectionClosed(TransportError, ConnectionError):
    """The QUIC connection is closed. ``error_code``/``reason`` come from the close frame.

    ``lost`` is True when no close frame ended it: the idle timeout expired or the peer
    answered with a stateless reset (it no longer has the connection, e.g. it
    restarted). Such an end is never a graceful close, whatever ``error_code`` says.

    Also a builtin :class:`ConnectionError` (``errno`` is ``None``).
    """

    def __init__(
        self,
        message: str = "connection closed",
        *,
        error_code: int = 0,
        reason: str = "",
        lost: bool = False,
    ) -> None:
        self.error_code = error_code
        self.reason = reason
        self.lost = lost
        super().__init__(message)


class StreamReset(TransportError, ConnectionResetError):
    """The peer reset the stream we are reading (RESET_STREAM). Never reported as EOF.

    Also a builtin :class:`ConnectionResetError` (``errno`` is ``None``).

    ``open()`` also raises it when the peer accepted the open and then gave its data
    stream up (StreamClose for that logical id: its service failed or its accept was
    cancelled); ``error_code`` is then the :class:`~quic_reverse.wire.CloseCode` value.
    """

    def __init__(
        self, error_code: int, stream_id: int | None = None, *, message: str | None = None
    ) -> None:
        self.error_code = error_code
        self.stream_id = stream_id
        super().__init__(message or f"stream {stream_id} reset by peer with code {error_code}")


class StreamStopped(TransportError, BrokenPipeError):
    """The peer asked us to stop sending on this stream (STOP_SENDING).

    Also a builtin :class:`BrokenPipeError` (``errno`` is ``None``), what writing to a
    socket whose reader went away raises.
    """

    def __init__(self, error_code: int, stream_id: int | None = None) -> None:
        self.error_code = error_code
        self.stream_id = stream_id
        super().__init__(f"stream {stream_id} stopped by peer with code {error_code}")


class CertificateError(TransportError, ssl.SSLCertVerificationError):
    """The peer's certificate failed verification or did not match the pinned fingerprint.

    Also an :class:`ssl.SSLCertVerificationError` (so an :class:`ssl.SSLError`,
    ``OSError`` and ``ValueError``). The QUIC stacks do their own TLS, so there is no
    OpenSSL code: ``verify_code`` is 1 (``X509_V_ERR_UNSPECIFIED``), ``verify_message`` is
    the message,
    ``reason`` is ``"CERTIFICATE_VERIFY_FAILED"`` and ``library`` is ``"SSL"``.
    """

    verify_code: int
    verify_message: str
    reason: str
    library: str

    def __init__(self, message: str = "certificate verification failed") -> None:
        super().__init__(message)
        # ssl.SSLError.__str__ shows strerror when it is set, else the args tuple.
        self.strerror = message
        self.verify_code = 1  # X509_V_ERR_UNSPECIFIED: the stacks give no OpenSSL code
        self.verify_message = message
        self.reason = "CERTIFICATE_VERIFY_FAILED"
        self.library = "SSL"

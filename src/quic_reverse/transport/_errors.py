"""Error conversion at the stack boundary: the one place that decides what an
exception raised by a QUIC stack (or the OS) becomes.

Every call into qh3/aioquic goes through :class:`StackCall`, a reusable context
manager with one of two policies:

* ``raise`` (:func:`stack_call`): the exception becomes a
  :class:`~quic_reverse.errors.TransportError` naming what was being done; our own
  errors and cancellation pass through unchanged;
* ``log``: the failure changes nothing for the caller (a stream or connection that
  is going away, a packet the stack could not parse): it is logged, at WARNING the
  first time for ``warn_once`` guards and at DEBUG otherwise, and swallowed.

Either way a qh3 ``PanicException`` (pyo3 turns a Rust panic into a
``BaseException``) is treated as an ordinary stack failure: one malformed packet
from a peer must not stop the event loop. ``KeyboardInterrupt``, ``SystemExit``
and ``CancelledError`` always pass through.
"""

from __future__ import annotations

import asyncio
import logging
from types import TracebackType
from typing import Literal

from ..errors import ConnectionClosed, QuicReverseError, TransportError

__all__ = [
    "StackCall",
    "connection_closed",
    "convert_stack_errors",
    "is_certificate_alert",
    "is_stack_failure",
    "stack_call",
    "valid_code",
]

logger = logging.getLogger("quic_reverse.transport")

# TLS alerts that mean "your certificate is not acceptable" (RFC 8446 6.2),
# carried in QUIC as CRYPTO_ERROR 0x100 + alert.
_CERT_ALERTS = frozenset({42, 43, 44, 45, 46, 48, 49})

_MAX_CODE = (1 << 62) - 1

OnError = Literal["raise", "log"]


def is_stack_failure(exc_type: type[BaseException]) -> bool:
    """True for an ordinary error or a qh3 (pyo3) panic; False for cancellation,
    ``KeyboardInterrupt`` and ``SystemExit``, which must always propagate."""
    if issubclass(exc_type, Exception):
        return not issubclass(exc_type, asyncio.CancelledError)
    return exc_type.__name__ == "PanicException"


class StackCall:
    """Context manager guarding calls into a QUIC stack (see the module docstring).

    Build a guard once and reuse it (``with self._guard:``). The per-packet paths
    of the driver use the same guard with a plain ``try`` (free when nothing is
    raised) and hand the exception to :meth:`handle`, which applies the same policy.
    """

    __slots__ = ("_level", "_logger", "_on_error", "_warned", "what")

    def __init__(
        self,
        what: str,
        *,
        on_error: OnError = "raise",
        warn_once: bool = False,
        log: logging.Logger | None = None,
    ) -> None:
        self.what = what
        self._on_error = on_error
        self._level = logging.WARNING if warn_once else logging.DEBUG
        self._warned = False
        self._logger = log or logger

    def __enter__(self) -> None:
        return None

    def handle(self, exc: BaseException) -> None:
        """Apply the policy to ``exc`` caught by the caller: return if it is swallowed
        (logged), else raise it (or the TransportError it converts to)."""
        if not self.__exit__(type(exc), exc, exc.__traceback__):
            raise exc

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        if exc_type is None or exc is None or not is_stack_failure(exc_type):
            return False
        if self._on_error == "log":
            first = not self._warned and self._level == logging.WARNING
            self._warned = True
            self._logger.log(
                logging.WARNING if first else logging.DEBUG,
                "%s failed: %r",
                self.what,
                exc,
                exc_info=exc if first else None,
            )
            return True
        if isinstance(exc, QuicReverseError):
            return False  # already one of ours (raised by a hook of this package)
        if isinstance(exc, OSError):
            raise TransportError(f"{self.what}: {exc}") from exc
        if isinstance(exc, Exception):
            raise TransportError(f"{self.what}: {type(exc).__name__}: {exc}") from exc
        raise TransportError(f"{self.what}: stack panic: {exc}") from exc


def stack_call(what: str) -> StackCall:
    """A guard converting stack/OS failures into :class:`TransportError` (``what`` names
    the operation in the message)."""
    return StackCall(what)


#: The name this helper had before the transport package was split (kept as an alias).
convert_stack_errors = stack_call


def is_certificate_alert(error_code: int) -> bool:
    """True if a QUIC close code is a TLS alert about a certificate."""
    return 0x100 <= error_code <= 0x1FF and (error_code - 0x100) in _CERT_ALERTS


#: The reason both stacks give when the idle timeout ended a connection (code 0, but
#: no close frame was exchanged: the connection was lost).
IDLE_TIMEOUT_REASON = "idle timeout"


def connection_closed(what: str, code: int, reason: str) -> ConnectionClosed:
    """The error for a closed connection; ``reason`` may be the peer's text, so it is
    shown escaped (it ends up in logs and CLI output). An idle timeout is marked
    ``lost``: nobody closed the connection."""
    return ConnectionClosed(
        f"{what} (code {code:#x})" + (f": {reason!r}" if reason else ""),
        error_code=code,
        reason=reason,
        lost=reason.strip().lower() == IDLE_TIMEOUT_REASON,
    )


def valid_code(code: int, what: str) -> int:
    """QUIC application error codes are varints (0..2**62-1). ``close``/``reset``/
    ``stop`` never raise, so an invalid code is logged and replaced by 0 rather than
    silently dropping the close/reset."""
    if isinstance(code, int) and not isinstance(code, bool) and 0 <= code <= _MAX_CODE:
        return code
    logger.warning("%s: invalid QUIC error code %r, using 0", what, code)
    return 0

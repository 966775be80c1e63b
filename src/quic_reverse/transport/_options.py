"""Defaults and :class:`TransportOptions`, the tuning knobs of both QUIC stacks.

One options object travels from :func:`quic_reverse.transport.quic.connect` /
``serve`` down to the stack driver (it used to be spread over keyword arguments
passed through four layers). Re-exported by :mod:`quic_reverse.transport.quic`.
"""

from __future__ import annotations

import dataclasses
import math

from ..errors import ConfigError
from ._udp import DEFAULT_SOCKET_BUFFER

__all__ = [
    "DEFAULT_CONNECTION_WINDOW",
    "DEFAULT_MAX_HANDSHAKES",
    "DEFAULT_MAX_STREAMS",
    "DEFAULT_SEND_BUFFER",
    "DEFAULT_SOCKET_BUFFER",
    "DEFAULT_STREAM_WINDOW",
    "TransportOptions",
]

#: Per-stream receive window advertised to the peer (bytes).
DEFAULT_STREAM_WINDOW = 8 * 1024 * 1024
#: Connection-wide receive window advertised to the peer (bytes).
DEFAULT_CONNECTION_WINDOW = 32 * 1024 * 1024
#: Bytes of a stream queued in the stack above which ``write`` waits.
DEFAULT_SEND_BUFFER = 1024 * 1024
#: Concurrent bidirectional streams the peer may open.
DEFAULT_MAX_STREAMS = 1024
#: Connections a server holds in their handshake at once; further Initials are dropped
#: (the clients retransmit them) so a flood of Initials cannot grow state without bound.
DEFAULT_MAX_HANDSHAKES = 1024


@dataclasses.dataclass(frozen=True, kw_only=True)
class TransportOptions:
    """Tuning knobs shared by both stacks (defaults are the tuned values).

    ``max_streams``: concurrent bidirectional streams the peer may open.
    ``stream_window`` / ``connection_window``: receive flow-control windows.
    ``send_buffer``: ``write`` hands its data to the stack, then waits while more than
    this many bytes of the stream are queued there (not yet sent).
    ``max_handshakes`` (servers): connections in their handshake at once; Initials
    beyond it are dropped until one finishes or times out (``handshake_timeout``).
    ``stack_hint``: a client states its stack in its first Initial, and a server runs
    each connection on the stack its client stated when that stack is installed
    (:mod:`._stackhint`: the edge knows its path, and each direction is paced by its
    sender's congestion control). ``False``: clients state nothing, servers always
    use the stack they were started with.

    How a receiver that does not read is bounded differs by stack:

    * aioquic: credit is granted per stream as the application reads, so one
      unread stream holds at most ``stream_window`` and others keep flowing;
    * qh3: its native core grants credit as soon as data is delivered to Python,
      so the adapter stops feeding the connection's (large) incoming packets once
      unread bytes over all streams pass ``connection_window`` and resumes when a
      quarter was read. Small packets (ACKs, close, short messages) still get
      through, but bulk data on *every* stream of that connection waits until the
      slow reader catches up.
    """

    idle_timeout: float = 60.0
    handshake_timeout: float = 10.0
    max_streams: int = DEFAULT_MAX_STREAMS
    stream_window: int = DEFAULT_STREAM_WINDOW
    connection_window: int = DEFAULT_CONNECTION_WINDOW
    send_buffer: int = DEFAULT_SEND_BUFFER
    socket_buffer: int = DEFAULT_SOCKET_BUFFER
    max_handshakes: int = DEFAULT_MAX_HANDSHAKES
    stack_hint: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.stack_hint, bool):
            raise ConfigError(f"stack_hint must be a bool, got {self.stack_hint!r}")
        for name in ("idle_timeout", "handshake_timeout"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not math.isfinite(value)
            ):
                raise ConfigError(f"{name} must be a finite number of seconds, got {value!r}")
        for name in (
            "max_streams",
            "stream_window",
            "connection_window",
            "send_buffer",
            "socket_buffer",
            "max_handshakes",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{name} must be an int, got {value!r}")
        if self.idle_timeout <= 0 or self.handshake_timeout <= 0:
            raise ConfigError("timeouts must be > 0")
        if not 1 <= self.max_streams <= 1 << 20:
            raise ConfigError("max_streams must be in 1..2**20")
        if self.max_handshakes < 1:
            raise ConfigError("max_handshakes must be >= 1")
        for name in ("stream_window", "connection_window", "send_buffer", "socket_buffer"):
            if getattr(self, name) < 1024:
                raise ConfigError(f"{name} must be >= 1024")

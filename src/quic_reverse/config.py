"""Session configuration and roles.

:class:`Config` carries the Rust reference's defaults (PROTOCOL-v1 §8). Every value is
checked at construction, so a bad setting raises :class:`~quic_reverse.errors.ConfigError`
immediately instead of failing later in the middle of a session.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from ._validate import check_count, check_duration
from .errors import ConfigError
from .wire import PROTOCOL_VERSION, Features

__all__ = ["Config", "Role"]

_U16_MAX = 0xFFFF
_U32_MAX = 0xFFFF_FFFF


class Role(enum.Enum):
    """Which side of the QUIC connection this session is.

    ``CLIENT`` dialed the connection and opens the control stream; ``SERVER`` accepted it.
    Either side may open reverse streams once negotiation is done.
    """

    CLIENT = "client"
    SERVER = "server"


def _check_duration(name: str, value: object, *, allow_none: bool = False) -> None:
    check_duration(name, value, allow_none=allow_none)


def _check_count(name: str, value: object) -> None:
    check_count(name, value)


@dataclass(frozen=True, kw_only=True)
class Config:
    """Session settings; durations are seconds.

    Attributes:
        agent: optional agent string sent in our Hello (e.g. ``"my-edge/1.0"``).
        open_timeout: how long ``open()`` waits for a free in-flight slot and the peer's
            OpenResponse together.
        stream_bind_timeout: how long an accepted open waits for its data stream (and how
            long an incoming data stream may take to deliver its 13-byte StreamBind).
        negotiation_timeout: bound on the whole Hello/HelloAck exchange.
        ping_timeout: how long a Ping waits for its Pong.
        ping_interval: idle time after which the session sends a keep-alive Ping;
            ``None`` turns keep-alive off. Setting it advertises ``Features.PING_PONG``.
        max_inflight_opens: local opens awaiting an answer at once; more wait for a slot.
        max_queued_opens: local opens allowed to wait for a slot; past that ``open()``
            raises :class:`~quic_reverse.errors.CapacityExceeded` at once, so a burst of
            callers (e.g. a TCP connection flood on a relay forward) cannot queue without
            bound (not in the Rust crate; ``0`` means never wait). Also bounds the peer's
            requests waiting for a slot under ``max_concurrent_streams``.
        max_concurrent_streams: active streams (plus unanswered incoming requests) beyond
            which incoming OpenRequests wait for a slot (at most ``max_queued_opens`` of
            them, each at most ``open_timeout``) before they are handed out; past those
            bounds they are rejected with ``LIMIT_EXCEEDED``.
        supported_versions: protocol versions we accept (only 1 exists).
        features: feature bits we advertise (ANDed with the peer's).
        close_timeout: how long ``close()`` waits for the peer's answering session close
            before closing the transport anyway (not in the Rust crate).
        max_buffered_events: informational control events (Ping, Pong, StreamClose,
            OpenResponseReceived) kept for ``process_message()``; older ones are dropped.
        datagram_flows: advertise ``Features.DATAGRAM_FLOWS`` (our extension, not in the
            Rust crate: datagram flows over QUIC DATAGRAM frames, PROTOCOL.md §9). Used
            only when the peer advertises it too.
    """

    agent: str | None = None
    open_timeout: float = 30.0
    stream_bind_timeout: float = 10.0
    negotiation_timeout: float = 30.0
    ping_timeout: float = 10.0
    ping_interval: float | None = None
    max_inflight_opens: int = 100
    max_queued_opens: int = 10_000
    max_concurrent_streams: int = 1000
    supported_versions: tuple[int, ...] = (PROTOCOL_VERSION,)
    features: Features = field(default_factory=lambda: Features(0))
    close_timeout: float = 2.0
    max_buffered_events: int = 256
    datagram_flows: bool = True

    def __post_init__(self) -> None:
        if self.agent is not None and not isinstance(self.agent, str):
            raise ConfigError(f"agent must be a string or None, got {self.agent!r}")
        for name in (
            "open_timeout",
            "stream_bind_timeout",
            "negotiation_timeout",
            "ping_timeout",
            "close_timeout",
        ):
            _check_duration(name, getattr(self, name))
        _check_duration("ping_interval", self.ping_interval, allow_none=True)
        _check_count("max_inflight_opens", self.max_inflight_opens)
        _check_count("max_concurrent_streams", self.max_concurrent_streams)
        check_count("max_queued_opens", self.max_queued_opens, minimum=0)
        _check_count("max_buffered_events", self.max_buffered_events)
        versions = self.supported_versions
        if isinstance(versions, list):
            versions = tuple(versions)
            object.__setattr__(self, "supported_versions", versions)
        if not isinstance(versions, tuple) or not versions:
            raise ConfigError("supported_versions must be a non-empty tuple of integers")
        for v in versions:
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= _U16_MAX:
                raise ConfigError(f"supported_versions: {v!r} is not a protocol version")
        if not isinstance(self.datagram_flows, bool):
            raise ConfigError(f"datagram_flows must be a bool, got {self.datagram_flows!r}")
        features = self.features
        if isinstance(features, bool) or not isinstance(features, int):
            raise ConfigError(f"features must be Features flags, got {features!r}")
        if not 0 <= int(features) <= _U32_MAX:
            raise ConfigError(f"features out of the u32 range: {int(features)!r}")
        if not isinstance(features, Features):
            object.__setattr__(self, "features", Features(features))

    @property
    def advertised_features(self) -> Features:
        """The features we put in our Hello: ``features`` plus PING_PONG when keep-alive is
        on, plus DATAGRAM_FLOWS when ``datagram_flows``."""
        features = self.features
        if self.ping_interval is not None:
            features |= Features.PING_PONG
        if self.datagram_flows:
            features |= Features.DATAGRAM_FLOWS
        return features

    @property
    def protocol_version(self) -> int:
        """The version we announce in our Hello: the highest we support."""
        return max(self.supported_versions)

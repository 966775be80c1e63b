"""Limits on what an unauthenticated peer can make the relay do (issue 17, item 4).

* :class:`AuthLimiter`: failed authentications per source address, as a token bucket.
  Every new connection from an address takes one token; a connection that
  authenticates gives it back (and clears the address's record), a failure keeps it.
  While an address has no token left its new connections are closed at once, before
  any protocol work, with one WARNING line when the limit engages and one INFO line
  when it lifts (with the number refused meanwhile). Sessions that already
  authenticated are never looked at, and other addresses are not affected.
* :class:`PeerLogThrottle`: a logging filter that lets at most ``burst`` lines of one
  kind (logger + message template) through per ``window`` seconds when a peer
  triggers them, and reports how many it dropped on the next line it lets through.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["PEER_TRIGGERED", "AuthLimiter", "PeerLogThrottle"]

log = logging.getLogger("quic_reverse.tunnel.relay")

#: Largest number of addresses the limiter remembers (memory stays bounded).
MAX_ADDRESSES = 65_536


@dataclass
class _Bucket:
    tokens: float
    updated: float
    limited: bool = False
    refused: int = 0


class AuthLimiter:
    """Per-address budget of connections that have not (yet) authenticated."""

    def __init__(
        self,
        burst: int,
        interval: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_addresses: int = MAX_ADDRESSES,
    ) -> None:
        self.burst = burst
        self.interval = interval
        self._clock = clock
        self._max = max_addresses
        self._buckets: dict[str, _Bucket] = {}

    def configure(self, burst: int, interval: float) -> None:
        """New limits (configuration reload); records already kept stay."""
        self.burst, self.interval = burst, interval

    def _refill(self, b: _Bucket, now: float) -> None:
        b.tokens = min(float(self.burst), b.tokens + (now - b.updated) / self.interval)
        b.updated = now

    def admit(self, address: str) -> bool:
        """May a new connection from ``address`` try to authenticate? (Takes a token.)"""
        if self.burst == 0:
            return True
        now = self._clock()
        b = self._buckets.get(address)
        if b is None:
            self._sweep(now)
            b = self._buckets[address] = _Bucket(float(self.burst), now)
        else:
            self._refill(b, now)
        if b.tokens >= 1.0:
            b.tokens -= 1.0
            if b.limited:
                b.limited = False
                log.info(
                    "authentication limit for %s lifted; %d connection(s) were refused",
                    address,
                    b.refused,
                )
                b.refused = 0
            return True
        b.refused += 1
        if not b.limited:
            b.limited = True
            log.warning(
                "authentication limit engaged for %s: %d connections without a successful "
                "authentication; refusing its new connections (one more every %gs); "
                "authenticated edges are not affected",
                address,
                self.burst,
                self.interval,
            )
        return False

    def succeeded(self, address: str) -> None:
        """A connection from ``address`` authenticated: forget its failures."""
        self._buckets.pop(address, None)

    def limited(self, address: str) -> bool:
        b = self._buckets.get(address)
        return b is not None and b.limited

    def __len__(self) -> int:
        return len(self._buckets)

    def _sweep(self, now: float) -> None:
        if len(self._buckets) < self._max:
            return
        for address, b in list(self._buckets.items()):
            self._refill(b, now)
            if b.tokens >= self.burst and not b.limited:
                del self._buckets[address]
        while len(self._buckets) >= self._max:  # still full: forget the oldest
            del self._buckets[next(iter(self._buckets))]


#: Message templates of library loggers that an unauthenticated peer can trigger.
PEER_TRIGGERED = frozenset(
    {
        "%s: protocol error from peer: %s",
        "%s: could not accept %r: %s",
        "%s: resetting data stream: %s",
        "%s: data stream lost before its StreamBind: %s",
    }
)


class PeerLogThrottle(logging.Filter):
    """Rate-limit peer-triggered log lines per (logger, template).

    A record is peer-triggered if its template is in :data:`PEER_TRIGGERED` or it was
    logged with ``extra={"peer": True}``. Others always pass.
    """

    def __init__(
        self, burst: int = 10, window: float = 10.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__()
        self.burst = burst
        self.window = window
        self._clock = clock
        self._kinds: dict[tuple[str, str], list[float]] = {}  # [window start, sent, dropped]

    def filter(self, record: logging.LogRecord) -> bool:
        if not (getattr(record, "peer", False) or record.msg in PEER_TRIGGERED):
            return True
        key = (record.name, str(record.msg))
        now = self._clock()
        state = self._kinds.get(key)
        if state is None or now - state[0] >= self.window:
            dropped = int(state[2]) if state is not None else 0
            if len(self._kinds) > 1024:
                self._kinds.clear()
            self._kinds[key] = [now, 1, 0]
            if dropped:
                record.msg = f"{record.msg} [%d similar line(s) suppressed]"
                record.args = (*(record.args if isinstance(record.args, tuple) else ()), dropped)
            return True
        if state[1] < self.burst:
            state[1] += 1
            if state[1] == self.burst:
                record.msg = f"{record.msg} [further lines like this suppressed for %gs]"
                args = record.args if isinstance(record.args, tuple) else ()
                record.args = (*args, round(self.window - (now - state[0]), 1))
            return True
        state[2] += 1
        return False

"""The lossy-path hint: one warning when a session's loss-based congestion control
meets sustained packet loss, naming the remedy.

qh3, the default stack, runs a Reno-like congestion control in its native core that
halves its window on every loss and cannot be replaced: at 1 % random loss and 50 ms
RTT it moves a few percent of what the path carries, where ``--stack aioquic`` (with
this library's delivery-rate controller) keeps the path full. An operator cannot see
that from the outside, so relay and edge watch each session's
:class:`~quic_reverse.transport.base.PathStats`: when a session on a loss-based
controller loses at least :data:`LOSS_THRESHOLD` of the packets it sent over a window
of at least :data:`MIN_PACKETS` packets and :data:`MIN_SECONDS` seconds, it logs **one**
warning for that session with the loss ratio, the RTT and the remedy. A peer that
reconnects is not warned about again for :data:`REPEAT_AFTER` seconds
(:class:`HintLimiter`). Sessions on a delivery-rate controller (aioquic with
``quic-reverse-bbr``) and transports without statistics are never warned about.

No timer and no task: :meth:`LossHint.poll` runs from the loop that already handles
the session's control events (every keep-alive Ping/Pong passes there, every
``ping_interval`` seconds) and reads the statistics at most every
:data:`CHECK_INTERVAL` seconds.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from ..transport.base import PathStats

__all__ = [
    "CHECK_INTERVAL",
    "LOSS_BASED_CONTROLLERS",
    "LOSS_THRESHOLD",
    "MIN_PACKETS",
    "MIN_SECONDS",
    "REPEAT_AFTER",
    "HintLimiter",
    "Loss",
    "LossHint",
]

log = logging.getLogger("quic_reverse.tunnel.losshint")

#: Share of the packets sent, lost over one window, from which the hint is given.
LOSS_THRESHOLD = 0.005
#: A window counts only once this many packets were sent in it ...
MIN_PACKETS = 1000
#: ... and it lasted this long (seconds).
MIN_SECONDS = 10.0
#: A window still short of :data:`MIN_PACKETS` after this long starts again (seconds;
#: a path too quiet to judge should not be judged on hours-old packets).
MAX_SECONDS = 120.0
#: Statistics are read at most this often per session (seconds).
CHECK_INTERVAL = 5.0
#: The same peer (edge name, relay address) is warned about again only after this long
#: (seconds), however often its session is re-established.
REPEAT_AFTER = 3600.0
#: Congestion controllers that shrink their window on loss (``PathStats.congestion_control``).
LOSS_BASED_CONTROLLERS = frozenset({"qh3-reno", "reno", "cubic"})

#: Where the remedy is explained.
REMEDY = (
    "an edge on --stack auto (the default) moves to aioquic by itself, one pinned to "
    "qh3 needs --stack aioquic or auto (aioquic's delivery-rate congestion control keeps "
    "lossy paths full; a relay with the aioquic extra follows the edge's stack; "
    'docs/TUNNEL.md, "Lossy and long paths: choose the stack")'
)


class HintLimiter:
    """At most one hint per peer per :data:`REPEAT_AFTER` seconds (one per relay or
    edge process; bounded by the number of distinct peers it has hinted about)."""

    def __init__(self, repeat_after: float = REPEAT_AFTER) -> None:
        self.repeat_after = repeat_after
        self._last: dict[str, float] = {}

    def allow(self, peer: str, now: float) -> bool:
        """True (and remember ``now``) unless ``peer`` was hinted about recently."""
        last = self._last.get(peer)
        if last is not None and now - last < self.repeat_after:
            return False
        self._last[peer] = now
        return True


@dataclass(frozen=True)
class Loss:
    """The window on which :class:`LossHint` decided that a path is lossy."""

    #: ``losses / packets``.
    ratio: float
    losses: int
    packets: int
    #: Length of the window (seconds).
    elapsed: float
    rtt: float | None
    congestion_control: str

    def describe(self) -> str:
        """``"1.2% of QUIC packets lost (24 of 2,000 in the last 12 s), RTT 51 ms"``."""
        rtt = "unknown" if self.rtt is None else f"{self.rtt * 1e3:.0f} ms"
        return (
            f"{self.ratio:.1%} of QUIC packets lost ({self.losses:,} of {self.packets:,} "
            f"in the last {self.elapsed:.0f} s), RTT {rtt}"
        )


class LossHint:
    """Watches one session's path statistics (see the module docstring).

    ``peer`` names the other end in the log line (``"relay 203.0.113.7:4433"``,
    ``"edge 'office' (198.51.100.2:50123)"``); ``key`` (default ``peer``) is what the
    ``limiter`` remembers across sessions (an edge's name: its address changes when it
    reconnects). ``warn=False``: decide (:attr:`loss`, :attr:`message`) but log nothing
    (``--stack auto``, which acts on the decision and says so itself).
    """

    def __init__(
        self,
        peer: str,
        *,
        key: str | None = None,
        limiter: HintLimiter | None = None,
        threshold: float | None = None,
        min_packets: int | None = None,
        min_seconds: float | None = None,
        check_interval: float | None = None,
        warn: bool = True,
    ) -> None:
        self.peer = peer
        self.key = peer if key is None else key
        self.limiter = limiter
        # None: the module's value at construction (tests may change those).
        self.threshold = LOSS_THRESHOLD if threshold is None else threshold
        self.min_packets = MIN_PACKETS if min_packets is None else min_packets
        self.min_seconds = MIN_SECONDS if min_seconds is None else min_seconds
        self.check_interval = CHECK_INTERVAL if check_interval is None else check_interval
        self.warn = warn
        #: True once this session was judged for good (hinted, or never to be hinted).
        self.done = False
        #: The warning logged (or suppressed by the limiter), if any.
        self.message: str | None = None
        #: The figures of the window that decided it, if any.
        self.loss: Loss | None = None
        self._next_check = float("-inf")
        self._window: tuple[float, int, int] | None = None  # (start, sent, lost)

    def poll(self, read: Callable[[], PathStats], now: float) -> str | None:
        """Read the statistics with ``read()`` if a check is due at ``now`` (monotonic
        seconds) and judge the window; returns the hint if this call gave it."""
        if self.done or now < self._next_check:
            return None
        self._next_check = now + self.check_interval
        return self.observe(read(), now)

    def observe(self, stats: PathStats, now: float) -> str | None:
        """Judge ``stats`` read at ``now``; returns the hint if this call gave it."""
        if self.done:
            return None
        sent, lost = stats.packets_sent, stats.packets_lost
        if stats.congestion_control not in LOSS_BASED_CONTROLLERS or sent is None or lost is None:
            self.done = True  # delivery-rate controller, or nothing to judge by
            return None
        window = self._window
        if window is None or sent < window[1] or lost < window[2]:
            self._window = (now, sent, lost)  # first look (or counters restarted)
            return None
        start, sent0, lost0 = window
        elapsed, packets, losses = now - start, sent - sent0, lost - lost0
        if elapsed < self.min_seconds:
            return None
        if packets < self.min_packets:
            if elapsed >= max(MAX_SECONDS, self.min_seconds):
                self._window = (now, sent, lost)
            return None
        self._window = (now, sent, lost)
        ratio = losses / packets
        if ratio < self.threshold:
            return None
        self.done = True
        self.loss = Loss(
            ratio, losses, packets, elapsed, stats.smoothed_rtt, stats.congestion_control
        )
        self.message = (
            f"{self.peer}: {self.loss.describe()}; "
            f"{stats.congestion_control} congestion control (loss-based) slows down sharply "
            f"on such a path: {REMEDY}"
        )
        if not self.warn:
            return self.message
        if self.limiter is None or self.limiter.allow(self.key, now):
            log.warning("%s", self.message)
        else:
            log.debug("%s (already said within %.0f s)", self.message, self.limiter.repeat_after)
        return self.message

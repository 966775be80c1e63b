"""The receive gate: bounds what a connection holds for readers that do not read.

qh3's native core grants flow-control credit as soon as it delivers data to
Python, whether or not anybody reads it; left alone, a peer could make us buffer
without limit. The gate sits between the socket and the stack and counts the bytes
delivered to streams and not yet read (:attr:`ReceiveGate.unread`). Once that count
passes the high-water mark it *pauses*:

* small datagrams (ACKs, CONNECTION_CLOSE, flow-control updates, short control
  messages) are still fed, as long as unread bytes stay below high-water plus a
  fixed slack, so a close is seen and a control stream keeps working;
* bigger ones are held, newest kept, at most :data:`PAUSED_HOLD` bytes (past that
  the oldest are dropped, as an overflowing socket buffer would; QUIC retransmits);
* once readers bring the count a margin below the high-water mark (a quarter of it,
  at most :data:`RESUME_MARGIN`) the gate resumes and feeds what it held, in order.

Datagrams are fed in slices of :data:`FEED_SLICE`, so a pause takes effect within a
large burst. Stacks that hold credit back per stream themselves (aioquic here) use a
gate built with ``pausing=False``: it only keeps the count.

The gate knows nothing about QUIC: it calls ``feed(datagrams, addr)`` (hand them to
the stack and process its events, which calls :meth:`ReceiveGate.delivered`) and is
told about reads with :meth:`ReceiveGate.consumed`. That makes it testable on its own.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from typing import Any

__all__ = [
    "FEED_SLICE",
    "PAUSED_HOLD",
    "PAUSED_SLACK",
    "RESUME_MARGIN",
    "SMALL_DATAGRAM",
    "ReceiveGate",
]

logger = logging.getLogger("quic_reverse.transport")

#: While paused, datagrams up to this size are still fed ...
SMALL_DATAGRAM = 256
#: ... as long as unread bytes stay below high-water + this slack ...
PAUSED_SLACK = 256 * 1024
#: ... and bigger ones are held up to this many bytes, then the oldest dropped.
PAUSED_HOLD = 1024 * 1024
#: Receiving resumes once unread bytes fall this far below the high-water mark
#: (or a quarter of the mark, if smaller).
RESUME_MARGIN = 1024 * 1024
#: Datagrams handed to the stack per ``feed`` call (the pause is checked between calls).
FEED_SLICE = 32

Feed = Callable[[list[bytes], Any], None]


class ReceiveGate:
    """Pause/hold/resume of incoming datagrams by unread bytes (see the module docstring).

    ``feed`` hands a slice of datagrams (all from one address) to the stack;
    ``on_pause`` is called each time the gate pauses (diagnostics).
    """

    __slots__ = (
        "_feed",
        "_held",
        "_on_pause",
        "_pausing",
        "closed",
        "held_bytes",
        "high_water",
        "paused",
        "unread",
    )

    def __init__(
        self,
        high_water: int,
        feed: Feed,
        *,
        pausing: bool = True,
        on_pause: Callable[[], None] | None = None,
    ) -> None:
        self.high_water = high_water
        self._feed = feed
        self._pausing = pausing
        self._on_pause = on_pause
        #: Bytes delivered to streams and not yet read by the application.
        self.unread = 0
        #: True while large datagrams are held back.
        self.paused = False
        #: Bytes of datagrams currently held.
        self.held_bytes = 0
        #: Once closed, nothing more is fed (the connection is gone).
        self.closed = False
        self._held: deque[tuple[list[bytes], Any]] = deque()

    # -- counting ------------------------------------------------------------

    def delivered(self, nbytes: int) -> None:
        """``nbytes`` of stream data were delivered (called from within ``feed``)."""
        self.unread += nbytes

    def consumed(self, nbytes: int) -> bool:
        """The application read (or dropped) ``nbytes``. Returns True if the gate
        resumed and fed held datagrams (the caller should transmit)."""
        self.unread -= nbytes
        if not self.paused:
            return False
        margin = min(self.high_water // 4, RESUME_MARGIN)
        if self.unread > self.high_water - margin:
            return False
        self._resume()
        return True

    # -- datagrams -----------------------------------------------------------

    def receive(self, datagrams: list[bytes], addr: Any) -> None:
        """Feed ``datagrams`` (all from ``addr``) now, or hold them while paused."""
        if self.closed:
            return
        if not self._pausing:
            self._feed(datagrams, addr)
        elif self.paused:
            self._hold(datagrams, addr)
        else:
            self._feed_sliced(datagrams, addr)

    def close(self) -> None:
        """Drop what is held and feed nothing more."""
        self.closed = True
        self._held.clear()
        self.held_bytes = 0

    def _feed_sliced(self, datagrams: list[bytes], addr: Any) -> None:
        feed = self._feed
        if len(datagrams) <= FEED_SLICE:
            feed(datagrams, addr)
            self._check_pause()
            return
        for start in range(0, len(datagrams), FEED_SLICE):
            if self.closed:
                return
            if self.paused:
                self._hold(datagrams[start:], addr)
                return
            feed(datagrams[start : start + FEED_SLICE], addr)
            self._check_pause()

    def _check_pause(self) -> None:
        if not self.paused and self.unread > self.high_water:
            logger.debug("receive paused (%d unread bytes)", self.unread)
            self.paused = True
            if self._on_pause is not None:
                self._on_pause()

    def _hold(self, datagrams: list[bytes], addr: Any) -> None:
        small = [d for d in datagrams if len(d) <= SMALL_DATAGRAM]
        if small and self.unread <= self.high_water + PAUSED_SLACK:
            self._feed(small, addr)
            big = [d for d in datagrams if len(d) > SMALL_DATAGRAM]
        else:
            big = datagrams
        if not big or self.closed:
            return
        held = self._held
        held.append((big, addr))
        self.held_bytes += sum(len(d) for d in big)
        # Keep the newest: they carry the latest retransmissions (control messages
        # included), which is what the connection needs first when it resumes.
        while self.held_bytes > PAUSED_HOLD and len(held) > 1:
            dropped, _ = held.popleft()
            self.held_bytes -= sum(len(d) for d in dropped)

    def _resume(self) -> None:
        logger.debug("receive resumed (%d unread bytes)", self.unread)
        self.paused = False
        pending = self._held
        self._held = deque()
        self.held_bytes = 0
        while pending and not self.closed:
            datagrams, addr = pending.popleft()
            if self.paused:
                self._hold(datagrams, addr)
            else:
                self._feed_sliced(datagrams, addr)

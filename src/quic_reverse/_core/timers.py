"""Every deadline of a session core, in one heap (the one deadline API).

Entries are ``(deadline, seq, kind, key)``. Deletion is lazy: cancelling a record does
not touch the heap; an entry is acted on only if the record it names is still *live*
for that exact deadline (the owner's ``is_live(kind, key, deadline)``). The heap is
compacted when it grows past twice its live size plus a fixed slack, so it stays
proportional to the live records (amortised O(1) per schedule; the slack makes the
rebuild rare when few records are live but many come and go, as opens do).

The driver arms one timer: at :meth:`Deadlines.next` after a timer fires, and earlier
whenever :meth:`Deadlines.take_new` reports a deadline before the armed one.
"""

from __future__ import annotations

import enum
import heapq
from collections.abc import Callable, Iterator

__all__ = ["Deadlines", "TimerKind"]


class TimerKind(enum.Enum):
    """What a deadline is for; ``key`` names the record (0 when there is one)."""

    NEGOTIATION = "negotiation"  # key 0
    CLOSE = "close"  # key 0: our StreamClose(0) got no answer
    KEEPALIVE = "keepalive"  # key 0: idle for ping_interval
    OPEN = "open"  # key: request id (answer or data stream overdue)
    HEADER = "header"  # key: stream token (StreamBind header overdue)
    EARLY = "early"  # key: lsid of a stream that came before its OpenResponse
    ORPHAN_REQUEST = "orphan_request"  # key: request id of an abandoned open
    ORPHAN_LSID = "orphan_lsid"  # key: lsid of an abandoned accepted open
    PING = "ping"  # key: ping sequence
    ADMISSION = "admission"  # key: request id of a peer open waiting for a stream slot


Entry = tuple[float, int, TimerKind, int]

#: Dead entries tolerated beyond twice the live ones before the heap is rebuilt.
_SLACK = 1024


class Deadlines:
    """A min-heap of deadlines with lazy deletion (see the module docstring)."""

    __slots__ = ("_compact_at", "_heap", "_is_live", "_new", "_seq")

    def __init__(self, is_live: Callable[[TimerKind, int, float], bool]) -> None:
        self._is_live = is_live
        self._heap: list[Entry] = []
        self._seq = 0
        self._compact_at = _SLACK
        self._new: float | None = None

    def __len__(self) -> int:
        return len(self._heap)

    def schedule(self, deadline: float, kind: TimerKind, key: int = 0) -> None:
        """Add a deadline; it is reported by :meth:`take_new` if the earliest added."""
        if self._new is None or deadline < self._new:
            self._new = deadline
        self._seq += 1
        heapq.heappush(self._heap, (deadline, self._seq, kind, key))
        if len(self._heap) > self._compact_at:
            live = self._is_live
            self._heap = [e for e in self._heap if live(e[2], e[3], e[0])]
            heapq.heapify(self._heap)
            self._compact_at = 2 * len(self._heap) + _SLACK

    def next(self) -> float | None:
        """The earliest live deadline (drops dead entries from the top)."""
        heap = self._heap
        live = self._is_live
        while heap and not live(heap[0][2], heap[0][3], heap[0][0]):
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def peek(self) -> tuple[float, TimerKind, int] | None:
        """The earliest live entry, without removing it."""
        if self.next() is None:
            return None
        deadline, _, kind, key = self._heap[0]
        return deadline, kind, key

    def pop(self) -> None:
        """Remove the earliest entry (after :meth:`peek`)."""
        heapq.heappop(self._heap)

    def due(self, now: float) -> Iterator[tuple[TimerKind, int]]:
        """Pop and yield every live entry due at ``now``, earliest first. The owner may
        schedule (and end) while iterating; entries it adds for later are kept."""
        # self._heap is re-read each turn: a schedule() may compact it into a new list.
        while self._heap and self._heap[0][0] <= now:
            deadline, _, kind, key = heapq.heappop(self._heap)
            if self._is_live(kind, key, deadline):
                yield kind, key

    def take_new(self) -> float | None:
        """The earliest deadline scheduled since the last call (then forgets it)."""
        new = self._new
        self._new = None
        return new

    @property
    def has_new(self) -> bool:
        """True when :meth:`take_new` has something to report."""
        return self._new is not None

    def clear(self) -> None:
        """Forget every deadline (the session ended)."""
        self._heap.clear()

"""Reconnect policy: exponential backoff with full jitter, capped.

"Full jitter" (delay drawn uniformly from ``[0, min(cap, initial * 2**attempt)]``) spreads
a fleet of edges that lost the same relay so they do not reconnect in lock-step.
The policy is pure: the random source is injected, so it is unit-tested without sleeping.
"""

from __future__ import annotations

import random
from collections.abc import Callable

__all__ = ["Backoff"]


class Backoff:
    """Delays for successive reconnect attempts.

    ``next_delay()`` returns the delay before the next attempt and advances the attempt
    counter; ``reset()`` starts over after a session that was healthy for a while.
    """

    def __init__(
        self,
        initial: float = 0.5,
        cap: float = 10.0,
        *,
        uniform: Callable[[float, float], float] | None = None,
    ) -> None:
        if not initial > 0 or not cap >= initial:
            raise ValueError("backoff: need 0 < initial <= cap")
        self.initial = initial
        self.cap = cap
        self.attempt = 0
        self._last_immediate: float | None = None
        self._uniform = uniform if uniform is not None else random.SystemRandom().uniform

    def ceiling(self) -> float:
        """Upper bound of the next delay: ``min(cap, initial * 2**attempt)``."""
        # Cap the exponent so huge attempt counts cannot overflow a float.
        return min(self.cap, self.initial * 2.0 ** min(self.attempt, 64))

    def next_delay(self) -> float:
        """Draw the next delay in ``[0, ceiling]`` and advance."""
        top = self.ceiling()
        self.attempt += 1
        delay = self._uniform(0.0, top)
        return min(max(delay, 0.0), top)

    def reset(self) -> None:
        """Forget past failures (call once a session has been up and healthy)."""
        self.attempt = 0

    def after_session(self, now: float) -> float:
        """The delay before reconnecting after a session that had authenticated ended.

        0 (reconnect at once: the relay restarted, or the path broke, and an edge that
        learns it should be back within one round trip), unless the previous immediate
        reconnect was less than ``cap`` seconds ago: a session that keeps ending right
        after it starts then gets the ordinary backoff, never a tight loop.
        ``now`` is a monotonic clock reading (injected, so this stays pure).
        """
        if self._last_immediate is None or now - self._last_immediate >= self.cap:
            self._last_immediate = now
            self.attempt = 0
            return 0.0
        return self.next_delay()

"""Throttled logging for lines a remote peer can trigger at will.

A peer (or anybody spoofing one) can send a malformed packet, a garbage Initial or
a failing handshake as often as it likes; logging each at INFO or WARNING would let
it fill the logs. :class:`PeerLog` writes the first occurrence at its level, then
at most one line per ``interval`` seconds at that level (saying how many were
suppressed in between); everything else goes to DEBUG.
"""

from __future__ import annotations

import logging
import time
from typing import Any

__all__ = ["PeerLog"]


class PeerLog:
    """One throttled log line (see the module docstring)."""

    __slots__ = ("_interval", "_level", "_logger", "_next", "_suppressed")

    def __init__(self, log: logging.Logger, level: int, *, interval: float = 60.0) -> None:
        self._logger = log
        self._level = level
        self._interval = interval
        self._next = 0.0
        self._suppressed = 0

    @property
    def suppressed(self) -> int:
        """Occurrences logged at DEBUG since the last line at the full level."""
        return self._suppressed

    def __call__(self, msg: str, *args: Any) -> None:
        now = time.monotonic()
        if now < self._next:
            self._suppressed += 1
            self._logger.debug(msg, *args)
            return
        self._next = now + self._interval
        if self._suppressed:
            msg += " (%d more like this in the last %.0f s, logged at debug)"
            args = (*args, self._suppressed, self._interval)
            self._suppressed = 0
        self._logger.log(self._level, msg, *args)

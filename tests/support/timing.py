"""One time scale for every timeout a test waits on.

Tests never hard-code seconds: they write ``5 * MS``-style multiples of :data:`MS`
(one "test millisecond", after websockets' test suite). On a slow or loaded machine
(CI on two cores, a sanitizer run) set ``QUIC_REVERSE_TEST_TIMESCALE=3`` to stretch
every bound at once instead of editing numbers across the suite. Bounds are upper
limits for *something to happen*; a test never asserts that something took less than
a given time (speed lives in ``bench/``).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable

#: Multiplier applied to every test timeout (``QUIC_REVERSE_TEST_TIMESCALE``, default 1).
TIMESCALE: float = float(os.environ.get("QUIC_REVERSE_TEST_TIMESCALE", "1") or "1")

#: One test millisecond, in seconds: ``1e-3 * TIMESCALE``.
MS: float = 1e-3 * TIMESCALE

#: The usual bound for "this must happen soon" (a local round trip, a task waking up).
SHORT: float = 500 * MS

#: The bound for work that crosses processes or sockets (a subprocess starting, a handshake).
LONG: float = 10_000 * MS


async def eventually(condition: Callable[[], bool], within: float, what: str = "") -> None:
    """Wait until ``condition()`` holds, checking every loop turn (then every
    millisecond), at most ``within`` seconds: for state the code under test does not
    signal. Unlike a fixed sleep it cannot pass by waiting too little, nor waits longer
    than needed.

    Raises:
        AssertionError: the condition did not hold in time (naming ``what``).
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    turns = 0
    while not condition():
        if loop.time() >= deadline:
            raise AssertionError(f"not within {within:.3f} s: {what or condition}")
        turns += 1
        await asyncio.sleep(0 if turns < 10 else MS)


__all__ = ["LONG", "MS", "SHORT", "TIMESCALE", "eventually"]

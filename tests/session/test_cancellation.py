"""Cancellation safety of the session (after httpcore's ``tests/test_cancellations.py``).

Every public coroutine of :class:`SessionHandle` and :class:`Stream`, cancelled at any
await point, leaves the session usable (a following operation succeeds) or cleanly
closed, and never desynchronised: the peer decodes every control byte it receives.
"""

from __future__ import annotations

import asyncio

from quic_reverse import Config, Role, Session
from quic_reverse.transport.memory import connection_pair
from quic_reverse.wire import StreamClose

from ..support.timing import LONG, MS
from .test_hostile import raw_hello


async def test_cancelled_close_stream_never_tears_the_control_stream() -> None:
    """Issue 18's reproduction: a caller cancelled while its control bytes wait for room
    must not lose them (the peer would read the next message's bytes as a length)."""
    c, s = connection_pair(buffer_size=4096)
    config = Config(close_timeout=100 * MS)
    async with asyncio.timeout(LONG):
        handle, peer = await asyncio.gather(Session(s, Role.SERVER, config).start(), raw_hello(c))
        # The peer stops reading: the control stream fills its 4 KiB window.
        await handle.close_stream(1, reason="a" * 1500)
        await handle.close_stream(2, reason="a" * 1500)
        victim = asyncio.create_task(handle.close_stream(3, reason="b" * 1500))
        await asyncio.sleep(50 * MS)
        victim.cancel()
        await asyncio.gather(victim, return_exceptions=True)
        writers = [
            asyncio.create_task(handle.close_stream(4 + i, reason="c" * 1500)) for i in range(5)
        ]
        # The peer reads again: every frame decodes, in order, none missing.
        seen: list[int] = []
        while len(seen) < 8:
            msg = await peer.next()
            assert isinstance(msg, StreamClose), msg
            seen.append(msg.logical_stream_id)
        await asyncio.gather(*writers)
    # The cancelled call's message was queued before the cancel: it is sent, whole.
    assert seen == [1, 2, 3, 4, 5, 6, 7, 8]
    async with asyncio.timeout(LONG):
        await handle.close()
    c.close()

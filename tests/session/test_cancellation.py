"""Cancellation safety of the session (after httpcore's ``tests/test_cancellations.py``).

Every public coroutine of :class:`SessionHandle` and :class:`Stream`, cancelled at any
await point, leaves the session usable (a following operation succeeds) or cleanly
closed, and never desynchronised: the peer decodes every control byte it receives.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest

from quic_reverse import (
    CloseReceived,
    Config,
    OpenRequest,
    Ping,
    RejectCode,
    Role,
    Session,
    SessionHandle,
    Stream,
)
from quic_reverse.errors import QuicReverseError, SessionClosed, StreamRejected, StreamReset
from quic_reverse.transport.memory import MemoryConnection, connection_pair
from quic_reverse.wire import StreamClose

from ..support.timing import LONG, MS, SHORT
from .helpers import echo, start_pair
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


# --------------------------------------------------------------------------------------
# Every public coroutine, cancelled at every await point.
#
# ``cancel_at_every_point`` runs an operation, lets the loop turn ``n`` times, cancels it,
# and checks the session; ``n`` grows from 0 until the operation finishes before the
# cancel lands, so every suspension point of the operation is hit (bounded count).

#: Upper bound on loop turns tried per operation (each run checks it still completes).
MAX_TURNS = 400

Transport = tuple[MemoryConnection, MemoryConnection]


def _memory(kind: str) -> Transport:
    if kind == "trickle":
        # Every read returns one byte and every write waits for room: many await points.
        return connection_pair(buffer_size=64, trickle=True)
    return connection_pair()


@asynccontextmanager
async def _pair(kind: str) -> AsyncIterator[tuple[SessionHandle, SessionHandle]]:
    mc, ms = _memory(kind)
    client, server = await start_pair(mc, ms)
    try:
        yield client, server
    finally:
        async with asyncio.timeout(LONG):
            await asyncio.gather(client.close(), server.close())


async def _cancel_after(make: Callable[[], Awaitable[object]], turns: int) -> bool:
    """Run ``make()`` for ``turns`` loop turns, then cancel it. True if it had finished."""
    task = asyncio.ensure_future(make())
    for _ in range(turns):
        if task.done():
            break
        await asyncio.sleep(0)
    finished = task.done()
    task.cancel()
    results = await asyncio.gather(task, return_exceptions=True)
    result = results[0]
    if isinstance(result, Stream):
        result.reset()
    return finished


async def cancel_at_every_point(
    make: Callable[[], Awaitable[object]],
    check: Callable[[], Awaitable[None]],
) -> int:
    """Cancel ``make()`` after 0, 1, 2... loop turns until it completes uncancelled,
    running ``check()`` after each. Returns how many cancellation points were tried."""
    for turns in range(MAX_TURNS):
        async with asyncio.timeout(LONG):
            finished = await _cancel_after(make, turns)
            await check()
        if finished:
            return turns
    raise AssertionError(f"operation did not finish within {MAX_TURNS} loop turns")


async def _usable(client: SessionHandle, server: SessionHandle) -> None:
    """Both sessions open and in sync: a ping each way is answered (a torn control
    stream would have ended the peer's session with a ProtocolError)."""
    assert not client.is_closed, client.close_reason
    assert not server.is_closed, server.close_reason
    await client.ping()
    await server.ping()


async def _echo_works(client: SessionHandle) -> None:
    stream = await client.open("echo")
    await stream.send(b"ping")
    await stream.write_eof()
    assert await stream.read() == b"ping"
    await stream.aclose()


KINDS = ["plain", "trickle"]


@pytest.mark.parametrize("kind", KINDS)
async def test_cancel_open_ping_close_stream(kind: str) -> None:
    async with _pair(kind) as (client, server):
        serving = asyncio.create_task(server.serve({"echo": echo}))

        async def check() -> None:
            await _usable(client, server)

        async def opened() -> Stream:
            return await client.open("echo")

        points = await cancel_at_every_point(opened, check)
        points += await cancel_at_every_point(client.ping, check)
        points += await cancel_at_every_point(server.ping, check)
        points += await cancel_at_every_point(
            lambda: client.close_stream(7, reason="x" * 300), check
        )
        assert points > 3
        await _echo_works(client)
        sizes = client.table_sizes()
        assert sizes["open_waiters"] == sizes["ping_waiters"] == sizes["local_opens"] == 0
        serving.cancel()
        await asyncio.gather(serving, return_exceptions=True)


@pytest.mark.parametrize("kind", KINDS)
async def test_cancel_accept_reject_process_message(kind: str) -> None:
    async with _pair(kind) as (client, server):
        opens: list[asyncio.Task[Stream]] = []

        async def next_request() -> int:
            opens.append(asyncio.create_task(client.open("svc")))
            for _ in range(100):  # skip the Ping/Pong events of the checks
                event = await server.process_message()
                if isinstance(event, OpenRequest):
                    return event.request_id
            raise AssertionError("no OpenRequest event")

        async def settled() -> None:
            # The opener learns the outcome at once: a stream, or a typed failure;
            # never a wait for its bind deadline.
            done = await asyncio.gather(opens[-1], return_exceptions=True)
            outcome = done[0]
            if isinstance(outcome, Stream):
                outcome.reset()
            else:
                assert isinstance(outcome, StreamReset | StreamRejected), outcome
            await _usable(client, server)

        rid = 0

        async def accepted() -> Stream:
            return await server.accept_open(rid)

        async def rejected() -> None:
            await server.reject_open(rid, RejectCode.SERVICE_UNAVAILABLE, "r" * 200)

        points = 0
        for op in (accepted, rejected):
            # From 1: cancelled before its first step, a coroutine never ran at all.
            for turns in range(1, MAX_TURNS):
                rid = await next_request()
                async with asyncio.timeout(SHORT):  # not the 10 s bind deadline
                    finished = await _cancel_after(op, turns)
                    await settled()
                points += 1
                if finished:
                    break

        # process_message(): cancelled while waiting, the next event is still delivered.
        for turns in range(3):
            await _cancel_after(server.process_message, turns)
        while server.table_sizes()["events"]:
            await server.process_message()
        pinger = asyncio.create_task(client.ping())
        async with asyncio.timeout(SHORT):
            event = await server.process_message()
            assert isinstance(event, Ping), event
            await pinger
        assert points > 2
        await _usable(client, server)


async def test_cancel_serve_then_serve_again() -> None:
    async with _pair("plain") as (client, server):
        for turns in range(4):
            await _cancel_after(lambda: server.serve({"echo": echo}), turns)
            await _usable(client, server)
        serving = asyncio.create_task(server.serve({"echo": echo}))
        async with asyncio.timeout(LONG):
            await _echo_works(client)
        serving.cancel()
        await asyncio.gather(serving, return_exceptions=True)


@pytest.mark.parametrize("kind", KINDS)
async def test_cancel_stream_operations(kind: str) -> None:
    """Stream coroutines: a cancelled read loses no byte; a cancelled write either
    completes or resets the stream (never silently drops a tail); the session lives."""
    payload = bytes(range(256)) * 4

    async def source(stream: Stream) -> None:
        await stream.send(payload)
        await stream.write_eof()
        with contextlib.suppress(QuicReverseError):
            await stream.read()  # until the opener is done

    async with _pair(kind) as (client, server):
        serving = asyncio.create_task(server.serve({"echo": echo, "source": source}))

        async def check() -> None:
            await _usable(client, server)

        # read / readexactly: cancelled at any point, then read again: all bytes, in order.
        for reader in ("read", "readexactly"):
            turns_tried = 0
            for turns in range(MAX_TURNS):
                stream = await client.open("source")
                got = bytearray()
                n = 100
                if reader == "read":
                    task = asyncio.ensure_future(stream.read(n))
                else:
                    task = asyncio.ensure_future(stream.readexactly(n))
                for _ in range(turns):
                    if task.done():
                        break
                    await asyncio.sleep(0)
                finished = task.done()
                task.cancel()
                (first,) = await asyncio.gather(task, return_exceptions=True)
                if isinstance(first, bytes):
                    got += first
                async with asyncio.timeout(LONG):
                    got += await stream.read()
                assert bytes(got) == payload
                await stream.aclose()
                await check()
                turns_tried += 1
                if finished:
                    break
            assert turns_tried >= 1

        # drain / send / write_eof / aclose: the echo peer sees all bytes or a reset.
        for op in ("send", "drain", "write_eof", "aclose"):
            for turns in range(MAX_TURNS):
                stream = await client.open("echo")
                big = b"z" * 2000

                async def run(stream: Stream = stream, op: str = op, big: bytes = big) -> None:
                    if op == "send":
                        await stream.send(big)
                    elif op == "drain":
                        stream.write(big)
                        await stream.drain()
                    elif op == "write_eof":
                        stream.write(big)
                        await stream.write_eof()
                    else:
                        stream.write(big)
                        await stream.aclose()

                finished = await _cancel_after(run, turns)
                async with asyncio.timeout(LONG):
                    if not stream.is_closing():
                        with contextlib.suppress(QuicReverseError):
                            await stream.write_eof()
                    try:
                        echoed = await stream.read()
                    except StreamReset:
                        echoed = None  # the peer saw our reset and reset back
                    except QuicReverseError:
                        echoed = None
                # Never a truncated copy: either everything came back or nothing did.
                if echoed is not None and op != "aclose":
                    assert echoed in (big, b""), len(echoed)
                stream.reset()
                await check()
                if finished:
                    break
        await _echo_works(client)
        serving.cancel()
        await asyncio.gather(serving, return_exceptions=True)


@pytest.mark.parametrize("side", ["client", "server"])
async def test_cancel_close_ends_the_session_cleanly(side: str) -> None:
    for turns in range(1, 7):  # 0: cancelled before its first step, close() never ran
        async with asyncio.timeout(LONG):
            mc, ms = connection_pair()
            client, server = await start_pair(mc, ms)
            closer, other = (client, server) if side == "client" else (server, client)
            await _cancel_after(closer.close, turns)
            # Cancelling the wait does not stop the close: both ends finish cleanly.
            await closer.wait_closed()
            event = await other.process_message()
            assert event is None or isinstance(event, CloseReceived), event
            await other.wait_closed()
            assert isinstance(closer.close_reason, SessionClosed), closer.close_reason


async def test_cancel_start_leaves_nothing_running() -> None:
    for turns in range(MAX_TURNS):
        async with asyncio.timeout(LONG):
            mc, ms = connection_pair()
            session = Session(mc, Role.CLIENT, Config())
            peer = asyncio.create_task(Session(ms, Role.SERVER, Config()).start())
            task = asyncio.ensure_future(session.start())
            for _ in range(turns):
                if task.done():
                    break
                await asyncio.sleep(0)
            finished = task.done()
            task.cancel()
            (outcome,) = await asyncio.gather(task, return_exceptions=True)
            if finished:
                assert isinstance(outcome, SessionHandle), outcome
                served = await peer
                await asyncio.gather(outcome.close(), served.close())
                return
            assert isinstance(outcome, asyncio.CancelledError), outcome
            # A start() cancelled after its first step closed its connection (nothing
            # left running); one cancelled before it never ran: the caller closes.
            if turns == 0:
                assert mc.is_open
                mc.close()
            assert not mc.is_open
            (served_outcome,) = await asyncio.gather(peer, return_exceptions=True)
            if isinstance(served_outcome, SessionHandle):
                await served_outcome.wait_closed()
            else:
                assert isinstance(served_outcome, QuicReverseError), served_outcome
    raise AssertionError("start() never completed")

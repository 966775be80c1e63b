"""The transport conformance suite: the contract of ``quic_reverse.transport.base``.

Every transport (in-memory, qh3, aioquic) must pass every test here; the
``transport_kind`` fixture (``conftest.py``) parametrises them. The tests describe
what QUIC guarantees, not how a particular transport is built: chunk boundaries,
the order in which streams are accepted and the exact window sizes are free.

Time only bounds waits (``T``); it is never used to synchronise. Where a test has
to show that something does *not* happen (an opener that must wait, a writer that
must block), it waits a short, bounded time and then checks state in bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import pytest

from quic_reverse.errors import (
    ConnectionClosed,
    IncompleteReadError,
    QuicReverseError,
    StreamReset,
    StreamStopped,
    TransportError,
    UsageError,
)
from quic_reverse.transport.base import Connection, RecvStream, SendStream

from .conftest import ALL_KINDS, Pair, PairFactory

T = 20.0  # upper bound for anything that should happen "promptly" on a loaded 2-core box
NEGATIVE_WAIT = 0.3  # how long we watch for something that must not happen
MiB = 1024 * 1024

# Bytes per large transfer and direction (aioquic moves ~25 MB/s here).
LARGE_TRANSFER = {"memory": 16 * MiB, "qh3": 16 * MiB}  # anything with aioquic: 8 MiB

# Slow-reader test: small receive buffers/windows so that the bound is tight and
# the data moved stays small. QUIC: a receiver that does not read stops granting
# credit past ``connection_window``; credit already granted can add a stream window.
QUIC_SLOW_READER_OPTS = {
    "stream_window": 256 * 1024,
    "connection_window": MiB,
    "send_buffer": 256 * 1024,
}


def slow_reader_opts(kind: str) -> dict[str, int]:
    return {"buffer_size": 256 * 1024} if kind == "memory" else QUIC_SLOW_READER_OPTS


def slow_reader_bounds(kind: str) -> tuple[int, int]:
    """(max bytes the receiver may hold, max bytes ``write`` may have accepted)."""
    opts = slow_reader_opts(kind)
    if kind == "memory":
        return opts["buffer_size"], opts["buffer_size"]
    recv_bound = opts["connection_window"] + opts["stream_window"]
    return recv_bound, recv_bound + opts["send_buffer"]


X = TypeVar("X")


async def bounded(aw: Awaitable[X], seconds: float = T) -> X:
    """Await ``aw`` with the suite-wide deadline (or ``seconds``)."""
    return await asyncio.wait_for(aw, seconds)


async def accept(conn: Connection) -> tuple[SendStream, RecvStream]:
    accepted = await bounded(conn.accept_bi())
    assert accepted is not None, "accept_bi returned None on an open connection"
    return accepted


async def open_and_accept(
    a: Connection, b: Connection, first: bytes
) -> tuple[SendStream, RecvStream, SendStream, RecvStream]:
    """Open a stream on ``a``, send ``first`` so ``b`` sees it, accept it on ``b`` and
    check ``first`` arrives. Returns (send, recv, peer_send, peer_recv)."""
    send, recv = await bounded(a.open_bi())
    await bounded(send.write(first))
    peer_send, peer_recv = await accept(b)
    assert await bounded(peer_recv.read_exactly(len(first))) == first
    return send, recv, peer_send, peer_recv


async def read_to_eof(recv: RecvStream, expected_max: int, max_bytes: int = 65536) -> bytes:
    """Read until FIN; fails if more than ``expected_max`` bytes arrive."""
    data = bytearray()
    for _ in range(expected_max + 2):  # every read returns >= 1 byte until FIN
        chunk = await bounded(recv.read(max_bytes))
        if not chunk:
            return bytes(data)
        assert len(chunk) <= max_bytes
        data += chunk
        assert len(data) <= expected_max, "more data than was sent"
    raise AssertionError("no FIN")


async def still_pending(task: asyncio.Future[Any], seconds: float = NEGATIVE_WAIT) -> bool:
    """True if ``task`` is still not done after a bounded wait."""
    await asyncio.wait({task}, timeout=seconds)
    return not task.done()


async def discard(task: asyncio.Future[Any]) -> None:
    """Cancel ``task`` and wait for it, ignoring its outcome."""
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, QuicReverseError):
        await task


async def wait_until_stalled(writing: asyncio.Future[None], progress: Callable[[], int]) -> None:
    """Watch a writer until it makes no more progress; it must block, not finish."""
    last = -1
    for _ in range(100):
        await asyncio.wait({writing}, timeout=0.2)
        assert not writing.done(), "writer finished although nobody read"
        if progress() == last:
            return
        last = progress()
    raise AssertionError("writer never stopped making progress")


def sides(pair: Pair, opener: str) -> tuple[Connection, Connection]:
    """(opening side, accepting side) for ``opener`` in {"client", "server"}."""
    client, server = pair
    return (client, server) if opener == "client" else (server, client)


def pattern(total: int, seed: int) -> Iterator[bytes]:
    """Deterministic, non-repeating chunks of varying size adding up to ``total``."""
    rng = random.Random(seed)
    base = rng.randbytes(MiB + 4096)
    sizes = (1, 1000, 65536, 300_000, MiB, 7, 150_000)
    sent = 0
    i = 0
    while sent < total:
        size = min(sizes[i % len(sizes)], total - sent)
        start = rng.randrange(4096)
        chunk = i.to_bytes(4, "big") + base[start : start + size]
        chunk = chunk[:size]
        yield chunk
        sent += len(chunk)
        i += 1


OPENERS = pytest.mark.parametrize("opener", ["client", "server"])
# Also run against a client of one QUIC stack and a server of the other.
CROSS_STACK = pytest.mark.parametrize("transport_kind", ALL_KINDS)


# --- open / accept / data -------------------------------------------------------


@OPENERS
async def test_open_accept_and_echo(transport_pair: Pair, transport_kind: str, opener: str) -> None:
    a, b = sides(transport_pair, opener)
    send, recv = await bounded(a.open_bi())
    await bounded(send.write(b"hello"))
    peer_send, peer_recv = await accept(b)
    assert peer_send.stream_id == send.stream_id == recv.stream_id == peer_recv.stream_id
    assert await bounded(peer_recv.read_exactly(5)) == b"hello"
    await bounded(peer_send.write(b"world!"))
    await bounded(peer_send.finish())
    assert await read_to_eof(recv, 6) == b"world!"
    await bounded(send.finish())
    assert await read_to_eof(peer_recv, 0) == b""
    for conn in transport_pair:
        assert conn.is_open
        host, port = conn.remote_address
        if transport_kind == "memory":
            assert (host, port) == ("memory", 0)
        else:
            assert host == "127.0.0.1"
            assert 0 < port < 65536


async def test_stream_ids_distinct_and_role_numbered(transport_pair: Pair) -> None:
    client, server = transport_pair
    client_ids = [(await bounded(client.open_bi()))[0].stream_id for _ in range(3)]
    server_ids = [(await bounded(server.open_bi()))[0].stream_id for _ in range(3)]
    assert len(set(client_ids + server_ids)) == 6
    # QUIC: bit 0 is the initiator (0 = client), bit 1 the direction (0 = bidi).
    assert all(sid % 4 == 0 for sid in client_ids)
    assert all(sid % 4 == 1 for sid in server_ids)


async def test_stream_visible_only_after_write_or_finish(transport_pair: Pair) -> None:
    client, server = transport_pair
    send1, _ = await bounded(client.open_bi())
    send2, _ = await bounded(client.open_bi())
    accepting = asyncio.ensure_future(server.accept_bi())
    try:
        assert await still_pending(accepting), "peer saw a stream nobody wrote to"
        await bounded(send2.finish())  # FIN alone makes a stream visible
        first = await bounded(accepting)
    finally:
        await discard(accepting)
    assert first is not None
    assert first[1].stream_id == send2.stream_id
    assert await read_to_eof(first[1], 0) == b""
    await bounded(send1.write(b"x"))
    second = await accept(server)
    assert second[1].stream_id == send1.stream_id
    assert await bounded(second[1].read_exactly(1)) == b"x"


async def test_data_both_ways_concurrently(transport_pair: Pair) -> None:
    client, server = transport_pair
    size = 2 * MiB
    up = b"".join(pattern(size, 1))
    down = b"".join(pattern(size, 2))
    send, recv = await bounded(client.open_bi())
    await bounded(send.write(up[:10]))
    peer_send, peer_recv = await accept(server)

    async def client_writer() -> None:
        await send.write(up[10:])
        await send.finish()

    async def server_writer() -> None:
        await peer_send.write(down)
        await peer_send.finish()

    results = await bounded(
        asyncio.gather(
            client_writer(),
            server_writer(),
            read_to_eof(peer_recv, size),
            read_to_eof(recv, size),
        )
    )
    assert results[2] == up
    assert results[3] == down


@CROSS_STACK
@pytest.mark.parametrize("direction", ["upload", "download"])
async def test_large_transfer_sha256(
    transport_pair: Pair, transport_kind: str, direction: str
) -> None:
    total = LARGE_TRANSFER.get(transport_kind, 8 * MiB)
    a, b = sides(transport_pair, "client" if direction == "upload" else "server")
    send, _ = await bounded(a.open_bi())
    sent_hash = hashlib.sha256()

    async def writer() -> None:
        for chunk in pattern(total, 3):
            sent_hash.update(chunk)
            await send.write(chunk)
        await send.finish()

    async def reader() -> tuple[int, str]:
        _, recv = await accept(b)
        got = hashlib.sha256()
        count = 0
        for _ in range(total + 2):
            chunk = await recv.read(256 * 1024)
            if not chunk:
                return count, got.hexdigest()
            count += len(chunk)
            got.update(chunk)
        raise AssertionError("no FIN")

    _, (count, digest) = await bounded(asyncio.gather(writer(), reader()), 60.0)
    assert count == total
    assert digest == sent_hash.hexdigest()


async def test_small_writes_and_one_byte_reads(make_pair: PairFactory, transport_kind: str) -> None:
    """Byte-at-a-time: 1-byte writes, reads that return one byte each.

    QUIC transports are asked for one byte per read (``read(1)``); the in-memory
    pair is put in its ``trickle`` mode, where even ``read(4096)`` yields one byte.
    """
    trickle = transport_kind == "memory"
    max_bytes = 4096 if trickle else 1
    payload = bytes(range(256)) * 2
    async with make_pair(**({"trickle": True} if trickle else {})) as (client, server):
        send, recv = await bounded(client.open_bi())
        for i in range(len(payload)):
            await bounded(send.write(payload[i : i + 1]))
        await bounded(send.write(b"tail"))
        await bounded(send.finish())
        peer_send, peer_recv = await accept(server)
        got = bytearray()
        for _ in range(len(payload) + 5):
            chunk = await bounded(peer_recv.read(max_bytes))
            if not chunk:
                break
            assert len(chunk) == 1
            got += chunk
        assert bytes(got) == payload + b"tail"
        await bounded(peer_send.write(b"ok"))
        await bounded(peer_send.finish())
        assert await bounded(recv.read_exactly(2)) == b"ok"
        assert await bounded(recv.read(max_bytes)) == b""


async def test_read_exactly_and_incomplete_read(transport_pair: Pair) -> None:
    client, server = transport_pair
    send, _ = await bounded(client.open_bi())
    await bounded(send.write(b"abcde"))
    await bounded(send.finish())
    _, recv = await accept(server)
    assert await bounded(recv.read_exactly(3)) == b"abc"
    with pytest.raises(IncompleteReadError) as info:
        await bounded(recv.read_exactly(5))
    assert info.value.partial == b"de"
    assert info.value.expected == 5
    assert await bounded(recv.read()) == b""  # FIN stays visible
    with pytest.raises(ValueError):
        await recv.read(0)


async def test_write_copies_the_callers_buffer(transport_pair: Pair) -> None:
    """Once ``write`` returned, the caller may reuse its bytearray/memoryview."""
    client, server = transport_pair
    send, _ = await bounded(client.open_bi())
    buf = bytearray(b"A" * 100_000)
    await bounded(send.write(buf))
    buf[:] = b"B" * 100_000
    await bounded(send.write(memoryview(buf)[:50_000]))
    buf[:] = b"C" * 100_000
    await bounded(send.finish())
    _, recv = await accept(server)
    assert await read_to_eof(recv, 150_000) == b"A" * 100_000 + b"B" * 50_000


async def test_cancelled_read_and_accept_lose_nothing(transport_pair: Pair) -> None:
    client, server = transport_pair
    accepting = asyncio.ensure_future(server.accept_bi())
    assert await still_pending(accepting, 0.05)
    await discard(accepting)
    send, _ = await bounded(client.open_bi())
    await bounded(send.write(b"first"))
    _, recv = await accept(server)  # the cancelled accept did not swallow the stream
    assert await bounded(recv.read_exactly(5)) == b"first"
    reading = asyncio.ensure_future(recv.read())
    assert await still_pending(reading, 0.05)
    await discard(reading)
    await bounded(send.write(b"second"))
    await bounded(send.finish())
    assert await read_to_eof(recv, 6) == b"second"  # nor did the cancelled read


async def test_write_after_finish_or_reset_is_a_usage_error(transport_pair: Pair) -> None:
    """Local misuse (our own finish/reset/stop came first) is a UsageError, not a
    network failure (TransportError)."""
    client, server = transport_pair
    send, _ = await bounded(client.open_bi())
    await bounded(send.write(b"x"))
    await bounded(send.finish())
    await bounded(send.finish())  # idempotent
    with pytest.raises(UsageError, match="after finish"):
        await bounded(send.write(b"late"))
    send.reset(1)  # after FIN: a no-op, never raises
    _, recv = await accept(server)
    assert await read_to_eof(recv, 1) == b"x"

    send2, _ = await bounded(client.open_bi())
    await bounded(send2.write(b"y"))
    send2.reset(5)
    send2.reset(6)  # idempotent
    with pytest.raises(UsageError, match="after reset"):
        await bounded(send2.write(b"late"))

    send3, _ = await bounded(client.open_bi())
    await bounded(send3.write(b"z"))
    for _ in range(3):  # the reset stream above may be accepted first
        _, recv3 = await accept(server)
        if recv3.stream_id == send3.stream_id:
            break
    assert recv3.stream_id == send3.stream_id
    recv3.stop(7)
    with pytest.raises(UsageError, match="after stop"):
        await bounded(recv3.read())
    assert not isinstance(UsageError("x"), TransportError)


@CROSS_STACK
async def test_cancelled_write_was_accepted_in_full(
    make_pair: PairFactory, transport_kind: str
) -> None:
    """``write`` cancelled while it waits for room has accepted *all* of its data
    (base.SendStream.write): the peer receives it whole, then what comes next."""
    _, written_bound = slow_reader_bounds(transport_kind)
    payload = b"".join(pattern(4 * written_bound, 6))  # far more than fits: must block
    async with make_pair(**slow_reader_opts(transport_kind)) as (client, server):
        send, _ = await bounded(client.open_bi())
        await bounded(send.write(b"!"))
        _, peer_recv = await accept(server)
        assert await bounded(peer_recv.read_exactly(1)) == b"!"

        writing = asyncio.ensure_future(send.write(payload))
        try:
            await wait_until_stalled(writing, lambda: send.buffered_bytes)
        finally:
            writing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await bounded(writing)
        # A write task cancelled before it first ran has accepted nothing.
        never = asyncio.ensure_future(send.write(b"NEVER"))
        never.cancel()
        with pytest.raises(asyncio.CancelledError):
            await never

        async def rest() -> None:
            await send.write(b"TAIL")
            await send.finish()

        _, received = await bounded(
            asyncio.gather(rest(), read_to_eof(peer_recv, len(payload) + 4, 256 * 1024))
        )
        assert len(received) == len(payload) + 4
        assert hashlib.sha256(received).digest() == hashlib.sha256(payload + b"TAIL").digest()


# --- half-close, reset, stop ---------------------------------------------------


@pytest.mark.parametrize("first_fin", ["opener", "acceptor"])
async def test_half_close_each_direction_independently(
    transport_pair: Pair, first_fin: str
) -> None:
    client, server = transport_pair
    send, recv, peer_send, peer_recv = await open_and_accept(client, server, b"hi")
    # One direction gets FIN; the other keeps carrying data both ways after it.
    if first_fin == "opener":
        done_send, done_recv, live_send, live_recv = send, peer_recv, peer_send, recv
    else:
        done_send, done_recv, live_send, live_recv = peer_send, recv, send, peer_recv
    await bounded(done_send.finish())
    assert await read_to_eof(done_recv, 0) == b""
    assert await bounded(done_recv.read()) == b""  # EOF is sticky
    body = b"".join(pattern(300_000, 4))
    for _ in range(3):
        _, echoed = await bounded(
            asyncio.gather(live_send.write(body), live_recv.read_exactly(len(body)))
        )
        assert echoed == body
    await bounded(live_send.finish())
    assert await read_to_eof(live_recv, 0) == b""


@OPENERS
async def test_reset_is_a_typed_error_at_the_reader(transport_pair: Pair, opener: str) -> None:
    a, b = sides(transport_pair, opener)
    send, _ = await bounded(a.open_bi())
    await bounded(send.write(b"partial data"))
    _, recv = await accept(b)
    send.reset(42)
    with pytest.raises(StreamReset) as info:
        # Data that arrived before the reset may or may not be delivered; EOF never is.
        for _ in range(100):
            chunk = await bounded(recv.read())
            assert chunk, "a reset stream must not look like EOF"
    assert info.value.error_code == 42


@CROSS_STACK
@OPENERS
async def test_stop_is_a_typed_error_at_the_writer(transport_pair: Pair, opener: str) -> None:
    a, b = sides(transport_pair, opener)
    send, recv, peer_send, peer_recv = await open_and_accept(a, b, b"first")
    peer_recv.stop(43)
    chunk = b"z" * 16384
    with pytest.raises(StreamStopped) as info:
        for _ in range(10_000):  # writes succeed until STOP_SENDING arrives
            await bounded(send.write(chunk))
    assert info.value.error_code == 43
    with pytest.raises(StreamStopped):
        await bounded(send.finish())
    # The other direction is unaffected.
    await bounded(peer_send.write(b"still here"))
    await bounded(peer_send.finish())
    assert await read_to_eof(recv, 10) == b"still here"


# --- connection close ----------------------------------------------------------


@CROSS_STACK
@pytest.mark.parametrize("closer", ["client", "server"])
async def test_close_wakes_every_pending_operation(
    transport_pair: Pair, transport_kind: str, closer: str
) -> None:
    client, server = transport_pair
    # Stream 1 carries one byte each way, then both sides wait on a read.
    send, recv, peer_send, peer_recv = await open_and_accept(client, server, b".")
    await bounded(peer_send.write(b"."))
    assert await bounded(recv.read_exactly(1)) == b"."
    # Stream 2: the server never reads it, so a large write blocks on backpressure.
    blocked_send, _ = await bounded(client.open_bi())
    await bounded(blocked_send.write(b"."))
    await accept(server)
    tasks = {
        "client accept": asyncio.ensure_future(client.accept_bi()),
        "server accept": asyncio.ensure_future(server.accept_bi()),
        "client read": asyncio.ensure_future(recv.read()),
        "server read": asyncio.ensure_future(peer_recv.read()),
        "client write": asyncio.ensure_future(blocked_send.write(bytes(64 * MiB))),
    }
    try:
        await asyncio.wait(tasks.values(), timeout=NEGATIVE_WAIT)
        assert not [name for name, task in tasks.items() if task.done()], "woke before close"
        closing = client if closer == "client" else server
        closing.close(7, b"going away")
        await asyncio.wait(tasks.values(), timeout=T)
        stuck = [name for name, task in tasks.items() if not task.done()]
        assert not stuck, f"not woken by close: {stuck}"
    finally:
        for task in tasks.values():
            await discard(task)
    outcome = {name: task.exception() or task.result() for name, task in tasks.items()}
    assert outcome["client accept"] is None
    assert outcome["server accept"] is None
    for name in ("client read", "server read", "client write"):
        assert isinstance(outcome[name], ConnectionClosed), (name, outcome[name])
    peer_error = outcome["server read" if closer == "client" else "client read"]
    assert isinstance(peer_error, ConnectionClosed)
    assert peer_error.error_code == 7
    assert peer_error.reason == "going away"
    await bounded(client.wait_closed())
    await bounded(server.wait_closed())
    assert not client.is_open
    assert not server.is_open
    # After close: accept_bi -> None, open_bi/write/finish -> ConnectionClosed,
    # close/reset/stop are no-ops.
    assert await bounded(server.accept_bi()) is None
    with pytest.raises(ConnectionClosed):
        await bounded(client.open_bi())
    with pytest.raises(ConnectionClosed):
        await bounded(send.write(b"x"))
    with pytest.raises(ConnectionClosed):
        await bounded(send.finish())
    send.reset(1)
    recv.stop(1)
    client.close()
    server.close(9)


async def test_close_wakes_opener_waiting_for_a_stream_slot(make_pair: PairFactory) -> None:
    async with make_pair(max_streams=2) as (client, server):
        for _ in range(2):
            send, _ = await bounded(client.open_bi())
            await bounded(send.write(b"."))
        waiting_open = asyncio.ensure_future(client.open_bi())
        try:
            assert await still_pending(waiting_open), "open_bi went past the stream limit"
            server.close(3)
            with pytest.raises(ConnectionClosed):
                await bounded(waiting_open)
        finally:
            await discard(waiting_open)


# --- many streams, stream limit, backpressure ----------------------------------


@OPENERS
async def test_many_concurrent_streams(transport_pair: Pair, opener: str) -> None:
    client, server = sides(transport_pair, opener)
    count = 500

    async def echo_server() -> int:
        async def echo(send: SendStream, recv: RecvStream) -> None:
            data = await recv.read_exactly(4)
            assert await recv.read() == b""
            await send.write(data[::-1])
            await send.finish()

        handlers = []
        for _ in range(count):
            peer_send, peer_recv = await accept(server)
            handlers.append(asyncio.ensure_future(echo(peer_send, peer_recv)))
        await asyncio.gather(*handlers)
        return len(handlers)

    serving = asyncio.ensure_future(echo_server())
    try:
        # All `count` streams are open at once before any finishes.
        streams = [await bounded(client.open_bi()) for _ in range(count)]
        for i, (send, _) in enumerate(streams):
            await bounded(send.write(i.to_bytes(4, "big")))

        async def finish_and_check(i: int, send: SendStream, recv: RecvStream) -> None:
            await send.finish()
            assert await read_to_eof(recv, 4) == i.to_bytes(4, "big")[::-1]

        await bounded(
            asyncio.gather(*(finish_and_check(i, s, r) for i, (s, r) in enumerate(streams))),
            60.0,
        )
        assert await bounded(serving) == count
    finally:
        await discard(serving)


@CROSS_STACK
@OPENERS
async def test_stream_limit_makes_opener_wait(make_pair: PairFactory, opener: str) -> None:
    limit = 4
    async with make_pair(max_streams=limit) as pair:
        client, server = sides(pair, opener)
        streams = []
        for i in range(limit):
            send, recv = await bounded(client.open_bi())
            await bounded(send.write(bytes([i])))
            streams.append((send, recv))
        accepted = [await accept(server) for _ in range(limit)]
        waiting_open = asyncio.ensure_future(client.open_bi())
        try:
            assert await still_pending(waiting_open), "open_bi went past the peer's stream limit"
            # Finish one stream in both directions: a slot frees up and the opener proceeds.
            send, recv = streams[0]
            await bounded(send.finish())
            for peer_send, peer_recv in accepted:
                if peer_recv.stream_id == send.stream_id:
                    assert await read_to_eof(peer_recv, 1) == b"\x00"
                    await bounded(peer_send.finish())
            assert await read_to_eof(recv, 0) == b""
            new_send, new_recv = await bounded(waiting_open)
        finally:
            await discard(waiting_open)
        # The new stream works (a stack that broke past its limit would fail here).
        await bounded(new_send.write(b"new"))
        await bounded(new_send.finish())
        peer_send, peer_recv = await accept(server)
        assert peer_recv.stream_id == new_send.stream_id
        assert await read_to_eof(peer_recv, 3) == b"new"
        await bounded(peer_send.write(b"ok"))
        await bounded(peer_send.finish())
        assert await read_to_eof(new_recv, 2) == b"ok"


@CROSS_STACK
@OPENERS
async def test_slow_reader_blocks_writer_and_bounds_buffers(
    make_pair: PairFactory, transport_kind: str, opener: str
) -> None:
    recv_bound, written_bound = slow_reader_bounds(transport_kind)
    chunk = b"".join(pattern(256 * 1024, 5))
    chunks = 64  # 16 MiB would be accepted by write() if nothing pushed back
    async with make_pair(**slow_reader_opts(transport_kind)) as pair:
        client, server = sides(pair, opener)
        send, _ = await bounded(client.open_bi())
        await bounded(send.write(b"!"))
        _, peer_recv = await accept(server)
        assert await bounded(peer_recv.read_exactly(1)) == b"!"
        written = 0

        async def writer() -> None:
            nonlocal written
            for _ in range(chunks):
                await send.write(chunk)
                written += len(chunk)
            await send.finish()

        writing = asyncio.ensure_future(writer())
        try:
            await wait_until_stalled(writing, lambda: written)
            assert peer_recv.buffered_bytes <= recv_bound
            # plus the one write accepted in full and not yet drained (see write())
            assert send.buffered_bytes <= written_bound + len(chunk)
            assert written <= written_bound

            # Reading resumes the writer; everything arrives intact, still bounded.
            expected = hashlib.sha256(chunk).digest()
            for _ in range(chunks):
                block = await bounded(peer_recv.read_exactly(len(chunk)))
                assert hashlib.sha256(block).digest() == expected
                assert peer_recv.buffered_bytes <= recv_bound
            assert await bounded(peer_recv.read()) == b""
            await bounded(writing)
        finally:
            await discard(writing)


async def test_streams_beyond_the_limit_all_complete(make_pair: PairFactory) -> None:
    """Many more concurrent opens than the limit: each waits its turn, none fails."""
    limit, count = 8, 48
    async with make_pair(max_streams=limit) as (client, server):

        async def echo_server() -> None:
            async def echo(send: SendStream, recv: RecvStream) -> None:
                data = await read_to_eof(recv, 4)
                await send.write(data)
                await send.finish()

            handlers = []
            for _ in range(count):
                handlers.append(asyncio.ensure_future(echo(*await accept(server))))
            await asyncio.gather(*handlers)

        async def one(i: int) -> bytes:
            send, recv = await client.open_bi()
            await send.write(i.to_bytes(4, "big"))
            await send.finish()
            return await read_to_eof(recv, 4)

        serving = asyncio.ensure_future(echo_server())
        try:
            results = await bounded(asyncio.gather(*(one(i) for i in range(count))), 60.0)
            await bounded(serving)
        finally:
            await discard(serving)
        assert results == [i.to_bytes(4, "big") for i in range(count)]


async def test_slow_reader_with_default_settings_stays_bounded(
    transport_pair: Pair, transport_kind: str
) -> None:
    """The default windows too keep a non-reading receiver bounded (no unbounded credit)."""
    if transport_kind == "memory":
        recv_bound = written_bound = 256 * 1024  # connection_pair() default buffer_size
    else:
        from quic_reverse.transport.quic import TransportOptions

        defaults = TransportOptions()
        recv_bound = defaults.connection_window + defaults.stream_window
        written_bound = recv_bound + defaults.send_buffer
    client, server = transport_pair
    send, _ = await bounded(client.open_bi())
    await bounded(send.write(b"!"))
    _, peer_recv = await accept(server)
    chunk = bytes(MiB)
    attempt = written_bound + 16 * MiB
    written = 0

    async def writer() -> None:
        nonlocal written
        while written < attempt:
            await send.write(chunk)
            written += len(chunk)

    writing = asyncio.ensure_future(writer())
    try:
        await wait_until_stalled(writing, lambda: written)
        assert peer_recv.buffered_bytes <= recv_bound
        # plus the one write accepted in full and not yet drained (see write())
        assert send.buffered_bytes <= written_bound + len(chunk)
        assert written <= written_bound
    finally:
        await discard(writing)

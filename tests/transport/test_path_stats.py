"""``Connection.path_stats()``: what the QUIC stack knows about the path.

Real qh3 and aioquic connections over UDP on 127.0.0.1: the statistics move with
traffic, the RTT is a loopback RTT, and packets dropped on the way (by a UDP forwarder
in this process that drops every Nth datagram) are counted as lost by the sender. The
in-memory pair knows nothing (every field ``None``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any, cast

import pytest

from quic_reverse import Role, Session
from quic_reverse.transport._driver import StackConnection
from quic_reverse.transport.base import Connection, PathStats
from quic_reverse.transport.memory import connection_pair
from quic_reverse.transport.quic import ClientTLS, ServerTLS, Stack, connect, serve
from tests.support.quic import dev_certificate, quic_pair
from tests.support.timing import LONG

STACKS: tuple[Stack, ...] = ("qh3", "aioquic")
CONTROLLERS = {"qh3": "qh3-reno", "aioquic": "quic-reverse-bbr"}
PAYLOAD = 1 << 20


async def _upload(client: Connection, server: Connection, size: int = PAYLOAD) -> None:
    """The client sends ``size`` bytes and FIN; the server reads all of it (bounded)."""
    send, _ = await client.open_bi()

    async def sink() -> int:
        pair = await server.accept_bi()
        assert pair is not None
        n = 0
        while chunk := await pair[1].read(1 << 20):
            n += len(chunk)
        return n

    async with asyncio.timeout(LONG):
        reader = asyncio.create_task(sink())
        await send.write(bytes(size))
        await send.finish()
        assert await reader == size


def _check_sane(stats: PathStats) -> None:
    assert stats.smoothed_rtt is not None and 0 < stats.smoothed_rtt < LONG
    assert stats.latest_rtt is not None and 0 < stats.latest_rtt < LONG
    assert stats.congestion_window is not None and stats.congestion_window > 0
    assert stats.bytes_in_flight is not None and stats.bytes_in_flight >= 0
    assert stats.packets_sent is not None and stats.packets_sent > 0
    assert stats.packets_lost is not None and 0 <= stats.packets_lost <= stats.packets_sent
    assert stats.pto_count is not None and stats.pto_count >= 0
    assert stats.max_datagram_size is not None and stats.max_datagram_size >= 1200
    ratio = stats.loss_ratio
    assert ratio is not None and 0.0 <= ratio <= 1.0


@pytest.mark.parametrize("stack", STACKS)
async def test_statistics_move_with_traffic(stack: Stack) -> None:
    async with quic_pair(stack) as (client, server):
        before = client.path_stats()
        _check_sane(before)  # the handshake already measured the path
        assert before.congestion_control == CONTROLLERS[stack]
        await _upload(client, server)
        after = client.path_stats()
        _check_sane(after)
        assert after.packets_sent is not None and before.packets_sent is not None
        assert after.bytes_sent is not None and before.bytes_sent is not None
        assert after.packets_sent > before.packets_sent
        # Every byte of the payload left in some packet (plus headers).
        assert after.bytes_sent - before.bytes_sent > PAYLOAD
        assert after.packets_sent - before.packets_sent >= PAYLOAD // after.max_datagram_size  # type: ignore[operator]
        # The receiver measured the path too (it sends ACKs and gets them acknowledged).
        _check_sane(server.path_stats())
        if stack == "aioquic":
            assert after.min_rtt is not None and 0 < after.min_rtt <= after.smoothed_rtt  # type: ignore[operator]
        else:
            assert after.min_rtt is None  # qh3 does not expose it
    # A closed connection still answers (the last figures), never raises.
    closed = client.path_stats()
    assert closed.packets_sent is not None and closed.packets_sent >= after.packets_sent


class _Lossy(asyncio.DatagramProtocol):
    """A UDP forwarder between one client and ``target`` dropping every ``every``-th
    datagram (both directions counted together: deterministic, no randomness)."""

    def __init__(self, target: tuple[str, int], every: int) -> None:
        self.target = target
        self.every = every
        self.seen = 0
        self.dropped = 0
        self.client: Any = None
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        assert self.transport is not None
        self.seen += 1
        if self.seen % self.every == 0:
            self.dropped += 1
            return
        if addr == self.target:
            if self.client is not None:
                self.transport.sendto(data, self.client)
        else:
            self.client = addr
            self.transport.sendto(data, self.target)


@contextlib.asynccontextmanager
async def _lossy_pair(
    stack: Stack, every: int
) -> AsyncIterator[tuple[Connection, Connection, _Lossy]]:
    cert, key = dev_certificate()
    loop = asyncio.get_running_loop()
    accepted: asyncio.Future[Connection] = loop.create_future()

    async def on_connection(conn: Connection) -> None:
        if not accepted.done():
            accepted.set_result(conn)
        await conn.wait_closed()

    server = await serve(
        "127.0.0.1",
        0,
        tls=ServerTLS(certfile=cert, keyfile=key),
        on_connection=on_connection,
        stack=stack,
    )
    transport, proxy = await loop.create_datagram_endpoint(
        lambda: _Lossy(server.address, every), local_addr=("127.0.0.1", 0)
    )
    client: Connection | None = None
    try:
        host, port = transport.get_extra_info("sockname")[:2]
        client = await connect(host, port, tls=ClientTLS(cafile=cert), stack=stack)
        async with asyncio.timeout(LONG):
            server_conn = await accepted
        yield client, server_conn, proxy
    finally:
        if client is not None:
            client.close()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(LONG / 2):
                    await client.wait_closed()
        transport.close()
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize("stack", STACKS)
async def test_dropped_datagrams_are_counted_as_lost(stack: Stack) -> None:
    async with _lossy_pair(stack, every=20) as (client, server, proxy):
        before = client.path_stats()
        await _upload(client, server)
        after = client.path_stats()
        _check_sane(after)
        assert proxy.dropped > 0
        assert after.packets_lost is not None and before.packets_lost is not None
        lost = after.packets_lost - before.packets_lost
        # The sender declared packets lost (the forwarder dropped about 1 in 20 of all
        # datagrams, the client's and the server's ACKs together).
        assert lost > 0, (proxy.dropped, after)
        assert after.loss_ratio is not None and 0 < after.loss_ratio < 0.5


async def test_memory_pair_knows_nothing() -> None:
    client, server = connection_pair()
    try:
        stats = client.path_stats()
        assert stats == PathStats() == server.path_stats()
        assert stats.loss_ratio is None
    finally:
        client.close()
        await client.wait_closed()


async def test_session_handle_delegates_to_its_connection() -> None:
    async with quic_pair("qh3") as (client, server):
        async with asyncio.timeout(LONG):
            handles = await asyncio.gather(
                Session(client, Role.CLIENT).start(), Session(server, Role.SERVER).start()
            )
        try:
            await handles[0].ping()
            stats = handles[0].path_stats()
            _check_sane(stats)
            assert stats.congestion_control == "qh3-reno"
            assert handles[1].path_stats().packets_sent  # the server side too
        finally:
            for handle in handles:
                await handle.close()


def test_loss_ratio() -> None:
    assert PathStats().loss_ratio is None
    assert PathStats(packets_sent=0, packets_lost=0).loss_ratio is None
    assert PathStats(packets_sent=200, packets_lost=None).loss_ratio is None
    assert PathStats(packets_sent=200, packets_lost=3).loss_ratio == 0.015
    with pytest.raises(AttributeError):
        PathStats().packets_sent = 1  # type: ignore[misc]  # frozen


async def test_a_failing_stack_read_is_logged_not_raised(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async with quic_pair("qh3") as (client, _server):
        assert isinstance(client, StackConnection)

        def broken() -> PathStats:
            raise RuntimeError("core gone")

        monkeypatch.setattr(client._quic, "qr_path_stats", broken)
        caplog.set_level(logging.DEBUG, "quic_reverse.transport")
        stats = client.path_stats()
        # Only what the driver counts itself is left.
        assert stats.packets_sent is not None and stats.packets_sent > 0
        assert stats.smoothed_rtt is None and stats.congestion_control is None
        assert any("reading path statistics failed" in r.getMessage() for r in caplog.records)

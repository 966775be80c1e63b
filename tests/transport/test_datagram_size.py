"""qh3 server datagram size: as big as the path carries, with a black-hole fallback.

qh3's path MTU discovery runs on the client only; left alone, a qh3 server (the
relay) sends datagrams of at most 1280 bytes whatever the path carries. The adapter
makes the server start at the size its route to the client allows and fall back to
1280 bytes if big datagrams do not get through (a path narrower than the route).

The client reaches the server through :class:`Forwarder`, a UDP forwarder on
127.0.0.1 in a thread of this process that records the size of every datagram the
server sends and can drop those bigger than a limit (a narrow link).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import select
import socket
import sys
import threading
from collections.abc import AsyncIterator
from typing import Any

import pytest

from quic_reverse.transport import qh3 as qh3_adapter
from quic_reverse.transport.base import Connection
from quic_reverse.transport.quic import ClientTLS, TransportOptions, connect
from tests.support.quic import dev_certificate, quic_server
from tests.support.timing import LONG, MS

linux_only = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="route MTU is read with Linux IP_MTU"
)
LOOPBACK = "127.0.0.1"
PAYLOAD = 4 * 1024 * 1024
BASE = 1280  # qh3 PACKET_MAX_SIZE


class Forwarder:
    """UDP forwarder between one client and a server on 127.0.0.1.

    ``server_sizes`` lists the size of every datagram the server sent (dropped ones
    included); datagrams from the server bigger than ``drop_above`` are dropped.
    """

    def __init__(self, server_port: int, drop_above: int | None = None) -> None:
        self._server = (LOOPBACK, server_port)
        self._drop_above = drop_above
        self._inside = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._inside.bind((LOOPBACK, 0))
        self._outside = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._outside.bind((LOOPBACK, 0))
        for s in (self._inside, self._outside):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.port: int = self._inside.getsockname()[1]
        self._client: tuple[str, int] | None = None
        self.server_sizes: list[int] = []
        self.dropped = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="forwarder", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        sockets = [self._inside, self._outside]
        while not self._stop.is_set():
            ready, _, _ = select.select(sockets, [], [], 50 * MS)
            for s in ready:
                try:
                    data, addr = s.recvfrom(65535)
                except OSError:
                    continue
                try:
                    if s is self._inside:
                        self._client = addr
                        self._outside.sendto(data, self._server)
                        continue
                    self.server_sizes.append(len(data))
                    if self._drop_above is not None and len(data) > self._drop_above:
                        self.dropped += 1
                    elif self._client is not None:
                        self._inside.sendto(data, self._client)
                except OSError:
                    pass  # UDP: a full buffer drops the datagram, QUIC retransmits

    def close(self) -> None:
        self._stop.set()
        self._thread.join(LONG)
        self._inside.close()
        self._outside.close()


@contextlib.asynccontextmanager
async def _pair_via_forwarder(
    drop_above: int | None = None,
) -> AsyncIterator[tuple[Connection, Connection, Forwarder]]:
    """(client, server connection, forwarder): qh3 on both sides, the client going
    through a :class:`Forwarder`."""
    loop = asyncio.get_running_loop()
    accepted: asyncio.Future[Connection] = loop.create_future()

    async def on_connection(conn: Connection) -> None:
        if not accepted.done():
            accepted.set_result(conn)
        await conn.wait_closed()

    cert, _ = dev_certificate()
    async with quic_server(on_connection, "qh3") as server:
        forwarder = Forwarder(server.address[1], drop_above)
        client: Connection | None = None
        try:
            client = await connect(
                LOOPBACK,
                forwarder.port,
                tls=ClientTLS(cafile=cert),
                stack="qh3",
                options=TransportOptions(),
            )
            async with asyncio.timeout(LONG):
                server_conn = await accepted
            yield client, server_conn, forwarder
        finally:
            if client is not None:
                client.close()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(LONG / 2):
                        await client.wait_closed()
            forwarder.close()


async def _download(client: Connection, server: Connection, within: float) -> None:
    """The server sends PAYLOAD random bytes + FIN on a stream it opens; the client
    must read exactly them within ``within`` seconds."""
    data = os.urandom(PAYLOAD)
    send, _ = await server.open_bi()

    async def sink() -> bytes:
        pair = await client.accept_bi()
        assert pair is not None
        parts = []
        while chunk := await pair[1].read(1 << 20):
            parts.append(chunk)
        return b"".join(parts)

    async with asyncio.timeout(within):
        reader = asyncio.create_task(sink())
        await send.write(data)
        await send.finish()
        got = await reader
    assert len(got) == len(data)
    assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()


@linux_only
async def test_server_sends_big_datagrams_where_the_path_carries_them() -> None:
    async with _pair_via_forwarder() as (client, server, forwarder):
        await _download(client, server, LONG)
        sizes = list(forwarder.server_sizes)
    # qh3 alone: nothing above 1280. The route (loopback) carries 64 KiB; the server's
    # cap and the qh3 client's max_udp_payload_size are 1472 bytes.
    assert BASE < max(sizes) <= qh3_adapter.MAX_SERVER_DATAGRAM_SIZE
    carried = sum(s for s in sizes if s > BASE)
    assert carried > PAYLOAD * 9 // 10, f"{carried} B of {PAYLOAD} in datagrams > {BASE} B"


@linux_only
async def test_server_falls_back_on_a_narrower_path(caplog: pytest.LogCaptureFixture) -> None:
    limit = 1400
    caplog.set_level(logging.INFO, logger="quic_reverse.transport.qh3")
    async with _pair_via_forwarder(drop_above=limit) as (client, server, forwarder):
        # Bounded: the fallback takes a few probe timeouts (~100s of ms on loopback),
        # far less than the connection's idle timeout.
        await _download(client, server, LONG)
        # ...and the connection keeps working in small datagrams.
        await _download(client, server, LONG)
        sizes = list(forwarder.server_sizes)
        dropped = forwarder.dropped
    assert dropped > 0, "the server never tried a datagram bigger than the path"
    assert any("falling back to 1280 bytes" in r.getMessage() for r in caplog.records)
    # After the fallback nothing bigger than the path is sent: the big ones are a
    # short run at the start.
    last_big = max(i for i, s in enumerate(sizes) if s > limit)
    assert len(sizes) - last_big > 2 * PAYLOAD // BASE
    assert dropped < PAYLOAD // 1472 // 4


async def test_explicit_server_datagram_size_is_kept() -> None:
    """A server configuration with its own ``max_datagram_size`` is left alone."""
    cert, key = dev_certificate()
    configuration = qh3_adapter.server_configuration(cert, key)
    configuration.max_datagram_size = 1300
    quic = qh3_adapter.SPEC.create(configuration, 16, bytes(8))
    assert isinstance(quic, qh3_adapter._LimitedQuicConnection)
    quic._qr_server_datagram_size((LOOPBACK, 4433))
    assert quic._qr_max_datagram_size is None
    assert not quic._qr_hole_armed


class _Core:
    """The few read-outs of qh3's native core that the black-hole check uses, set by
    the test (the real core cannot be made to lose packets on demand)."""

    def __init__(self, size: int) -> None:
        self.pto_count = 0
        self.loss_total = 0
        self.bytes_in_flight = 0
        self.sent = 0
        self.received = 0
        self.size = size
        self.applied: list[tuple[object, ...]] = []

    @property
    def active_path(self) -> tuple[object, ...]:
        return (0, ("0.0.0.0", 0), (LOOPBACK, 4433), self.sent, self.received, self.size)

    def apply_peer_transport_parameters(self, *args: object) -> None:
        self.applied.append(args)
        self.size = min(self.size, int(args[-1]))  # type: ignore[call-overload]

    def send(self, datagrams: int, lost: int) -> None:
        self.sent += datagrams * self.size
        self.loss_total += lost


def _parameters(**fields: Any) -> Any:
    """qh3's QuicTransportParameters (tests do not import qh3 itself)."""
    bridge = getattr(qh3_adapter, "_qh3_tls_bridge_module")  # noqa: B009
    return bridge.QuicTransportParameters(**fields)


def _server_with(core: _Core) -> qh3_adapter._LimitedQuicConnection:
    cert, key = dev_certificate()
    quic = qh3_adapter.SPEC.create(qh3_adapter.server_configuration(cert, key), 16, bytes(8))
    assert isinstance(quic, qh3_adapter._LimitedQuicConnection)
    quic._core = core  # type: ignore[assignment]
    quic._applied_transport_parameters = _parameters(
        initial_max_data=1 << 20, max_udp_payload_size=1472
    )
    quic._qr_hole_armed = True
    return quic


def test_black_hole_by_loss_share_falls_back() -> None:
    """Small packets get through (no probe timeouts), big ones are all lost."""
    core = _Core(1472)
    quic = _server_with(core)
    for _ in range(10):
        core.send(datagrams=8, lost=7)
        quic.qr_path_check()
    assert [args[-1] for args in core.applied] == [BASE]
    assert args_max_data(core) == 1 << 20  # the peer's own values, re-applied
    assert not quic._qr_hole_armed


def test_random_loss_and_congestion_keep_big_datagrams() -> None:
    """5 % random loss, then a slow-start overshoot losing half of a burst: no fallback."""
    core = _Core(1472)
    quic = _server_with(core)
    for _ in range(40):
        core.send(datagrams=20, lost=1)
        quic.qr_path_check()
    core.send(datagrams=64, lost=32)
    quic.qr_path_check()
    core.pto_count = 1  # one probe timeout (a tail loss) is not a black hole
    core.bytes_in_flight = 3000
    quic.qr_path_check()
    assert core.applied == []
    assert quic._qr_hole_armed


def test_probe_timeouts_fall_back_only_while_the_peer_sends() -> None:
    """Probe timeouts in a row with data in flight: a black hole if the peer keeps
    sending meanwhile (alive, but none of our packets acknowledged); if it is silent
    (an outage, a peer starved of CPU), only after a much longer run."""
    core = _Core(4096)
    quic = _server_with(core)
    core.send(datagrams=10, lost=0)
    core.bytes_in_flight = 10 * 4096
    for pto in range(1, qh3_adapter.BLACK_HOLE_SILENT_PTOS):
        core.pto_count = pto
        quic.qr_path_check()
    assert core.applied == []
    core.pto_count = 0  # the peer answered: the run ends
    quic.qr_path_check()
    for pto in range(1, qh3_adapter.BLACK_HOLE_PTOS + 1):
        core.pto_count = pto
        quic.qr_path_check()
        core.received += 60  # e.g. the peer's keep-alive, acknowledging nothing new
    quic.qr_path_check()
    assert [args[-1] for args in core.applied] == [BASE]


def test_long_silent_run_of_probe_timeouts_falls_back() -> None:
    core = _Core(4096)
    quic = _server_with(core)
    core.send(datagrams=10, lost=0)
    core.bytes_in_flight = 10 * 4096
    for pto in range(1, qh3_adapter.BLACK_HOLE_SILENT_PTOS + 1):
        core.pto_count = pto
        quic.qr_path_check()
    assert [args[-1] for args in core.applied] == [BASE]


def args_max_data(core: _Core) -> object:
    return core.applied[0][0]

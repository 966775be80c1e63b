"""qh3 client datagram size: path MTU discovery bounded by the local route.

The qh3 client probes up to the largest UDP payload its route to the server
carries (capped at ``MAX_DISCOVERED_DATAGRAM_SIZE``) when the configuration keeps
qh3's default; bulk data then goes in big datagrams on loopback. A path that drops
big datagrams (narrower than the local route) must still work.
"""

from __future__ import annotations

import asyncio
import socket
import sys
from collections.abc import Callable
from typing import Any

import pytest

from quic_reverse.transport import qh3 as qh3_adapter
from quic_reverse.transport._driver import StackConnection
from quic_reverse.transport._stack import StackSpec
from quic_reverse.transport._udp import route_max_udp_payload
from quic_reverse.transport.base import Connection
from tests.support.quic import quic_pair

linux_only = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="route MTU is read with Linux IP_MTU"
)
PAYLOAD = 2 * 1024 * 1024


async def _upload(client: Connection, server: Connection) -> bytes:
    """Client sends PAYLOAD bytes + FIN; returns what the server read (bounded)."""
    send, _ = await client.open_bi()
    data = bytes(range(256)) * (PAYLOAD // 256)

    async def sink() -> bytes:
        pair = await server.accept_bi()
        assert pair is not None
        parts = []
        while chunk := await pair[1].read(1 << 20):
            parts.append(chunk)
        return b"".join(parts)

    async with asyncio.timeout(60):
        reader = asyncio.create_task(sink())
        await send.write(data)
        await send.finish()
        got = await reader
    assert got == data
    return got


def _record_client_datagrams(
    monkeypatch: pytest.MonkeyPatch, drop_above: int | None = None
) -> list[int]:
    """Record the sizes of datagrams qh3 clients build; optionally drop big ones (a
    path narrower than the local route)."""
    sizes: list[int] = []
    original: Callable[[StackConnection], None] = StackConnection._transmit

    def transmit(self: StackConnection) -> None:
        if not self._is_client:
            original(self)
            return
        quic = self._quic
        build = quic.datagrams_to_send

        def filtered(now: float) -> list[tuple[bytes, Any]]:
            out = build(now=now)
            sizes.extend(len(d) for d, _ in out)
            if drop_above is not None:
                out = [(d, a) for d, a in out if len(d) <= drop_above]
            return list(out)

        quic.datagrams_to_send = filtered  # type: ignore[method-assign]
        try:
            original(self)
        finally:
            del quic.datagrams_to_send

    monkeypatch.setattr(StackConnection, "_transmit", transmit)
    return sizes


@linux_only
def test_route_payload_limit_of_loopback() -> None:
    limit = route_max_udp_payload(socket.AF_INET, ("127.0.0.1", 9))
    assert limit is not None and limit > 16384  # lo: 64 KiB MTU
    assert route_max_udp_payload(socket.AF_UNIX, "/nonexistent") is None


@linux_only
async def test_client_sends_big_datagrams_on_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    sizes = _record_client_datagrams(monkeypatch)
    async with quic_pair("qh3") as (client, server):
        quic = client._quic  # type: ignore[attr-defined]
        assert quic._qr_max_datagram_size == qh3_adapter.MAX_DISCOVERED_DATAGRAM_SIZE
        await _upload(client, server)
    assert max(sizes) > 2048
    assert max(sizes) <= qh3_adapter.MAX_DISCOVERED_DATAGRAM_SIZE


async def test_narrower_path_than_route_still_delivers(monkeypatch: pytest.MonkeyPatch) -> None:
    sizes = _record_client_datagrams(monkeypatch, drop_above=1400)
    async with quic_pair("qh3") as (client, server):
        await _upload(client, server)
    # Probes bigger than the path were lost; the bulk went in datagrams that fit.
    assert sum(1 for s in sizes if 1200 <= s <= 1400) > PAYLOAD // 1400 // 2


async def test_explicit_datagram_size_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    configs: list[Any] = []
    make = StackSpec.client_configuration

    def client_configuration(self: StackSpec[Any], **kwargs: Any) -> Any:
        config = make(self, **kwargs)
        if self is qh3_adapter.SPEC:
            config.max_datagram_size = 1300
            configs.append(config)
        return config

    monkeypatch.setattr(StackSpec, "client_configuration", client_configuration)
    sizes = _record_client_datagrams(monkeypatch)
    async with quic_pair("qh3") as (client, server):
        assert configs, "the qh3 client configuration helper was not used"
        assert client._quic._qr_max_datagram_size is None  # type: ignore[attr-defined]
        await _upload(client, server)
    # No big datagrams (qh3's own probe ladder may still reach 1452 bytes).
    assert max(sizes) <= 1500

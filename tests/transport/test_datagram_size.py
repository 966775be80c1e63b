"""qh3 server datagram size: 1280 bytes, which every QUIC path carries.

qh3's path MTU discovery runs on the client only, and its native core can lower a
path's datagram size but never raise it. A server starting bigger (at what its own
route carries) was tried and taken out: it needs a black-hole fallback, and the only
evidence a server has (probe timeouts, a run of losses) is also what a NAT rebinding
or an outage looks like; falling back there, with streams in flight, stalled qh3's
core (docs/ARCHITECTURE.md, "Datagram size"). These tests pin the safe behaviour.

The client reaches the server through :class:`Forwarder`, a UDP forwarder on
127.0.0.1 in a thread of this process that records the size of every datagram the
server sends and can drop those bigger than a limit (a narrow link).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import select
import socket
import threading
from collections.abc import AsyncIterator

from quic_reverse.transport.base import Connection
from quic_reverse.transport.quic import ClientTLS, TransportOptions, connect
from tests.support.quic import dev_certificate, quic_server
from tests.support.timing import LONG, MS

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


async def test_server_datagrams_fit_a_1280_byte_path() -> None:
    """On a path that carries 64 KiB the server still sends at most 1280 bytes, so a
    path that carries only that (a forwarder dropping anything bigger) loses nothing."""
    async with _pair_via_forwarder(drop_above=BASE) as (client, server, forwarder):
        await _download(client, server, LONG)
        sizes = list(forwarder.server_sizes)
        dropped = forwarder.dropped
    assert dropped == 0 and max(sizes) <= BASE
    assert sum(sizes) > PAYLOAD  # the download went through the forwarder

"""Issue 15 item 4: reconnecting() over real QUIC on 127.0.0.1, with the tunnel
supervisor's backoff (the same class, injected with a recording random source)."""

from __future__ import annotations

import asyncio
import socket

import pytest

from quic_reverse import (
    CertificateError,
    ConfigError,
    Role,
    Session,
    SessionHandle,
    Stream,
    TransportError,
)
from quic_reverse.reconnect import Reconnecting, reconnecting
from quic_reverse.transport.base import Connection
from quic_reverse.transport.quic import ClientTLS, TransportOptions, connect
from quic_reverse.tunnel.supervisor import Backoff
from tests.support.quic import dev_certificate, quic_server
from tests.support.timing import LONG, MS, SHORT


def _tls() -> ClientTLS:
    cert, _ = dev_certificate()
    return ClientTLS(cafile=cert)


class SessionServer:
    """A QUIC server that negotiates a session per connection and hands it to the test."""

    def __init__(self) -> None:
        self.handles: asyncio.Queue[SessionHandle] = asyncio.Queue()

    async def __call__(self, conn: Connection) -> None:
        async with Session(conn, Role.SERVER).start() as handle:
            await self.handles.put(handle)
            await handle.wait_closed()


async def test_reconnects_after_each_session_ends() -> None:
    server = SessionServer()
    seen: list[SessionHandle] = []
    async with quic_server(server) as quic, asyncio.timeout(LONG):
        sessions = reconnecting(*quic.address, tls=_tls(), backoff_initial=5 * MS)
        async with sessions:
            async for handle in sessions:
                seen.append(handle)
                assert sessions.current is handle
                peer = await server.handles.get()
                await peer.close()  # the server ends the session...
                await handle.wait_closed()  # ...the client sees it; the loop redials
                if len(seen) == 3:
                    sessions.stop()
        assert sessions.sessions == 3 and sessions.attempts == 3
        assert len({id(h) for h in seen}) == 3
        assert all(h.is_closed for h in seen)
        assert sessions.current is None


async def test_failures_back_off_with_the_supervisor_policy_and_reset() -> None:
    ceilings: list[float] = []

    def uniform(low: float, high: float) -> float:
        ceilings.append(high)
        return high  # the longest delay the policy allows: still a few test ms

    failures = 3
    server = SessionServer()
    async with quic_server(server) as quic, asyncio.timeout(LONG):

        async def dial() -> Connection:
            nonlocal failures
            if failures:
                failures -= 1
                raise TransportError("no route (simulated)")
            return await connect(*quic.address, tls=_tls())

        backoff = Backoff(2 * MS, 16 * MS, uniform=uniform)
        async with Reconnecting(dial, backoff=backoff) as sessions:
            async for handle in sessions:
                assert handle.negotiated_version == 1
                await server.handles.get()
                if sessions.sessions == 2:
                    break
        # three failures: ceilings double (2, 4, 8 ms); the session resets the policy,
        # so the wait before the second session's dial is again at most 2 ms.
        assert ceilings == pytest.approx([2 * MS, 4 * MS, 8 * MS, 2 * MS])
        assert sessions.attempts == 5 and sessions.sessions == 2
        assert isinstance(sessions.last_error, TransportError)


async def test_gives_up_after_max_attempts_on_a_dead_address() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    sessions = reconnecting(
        "127.0.0.1",
        port,
        tls=_tls(),
        options=TransportOptions(handshake_timeout=SHORT / 2),
        backoff_initial=MS,
        max_attempts=2,
    )
    async with asyncio.timeout(LONG):
        with pytest.raises(TransportError):
            async for _ in sessions:
                pytest.fail("nobody listens: no session")
    assert sessions.attempts == 2 and sessions.sessions == 0


async def test_certificate_failure_is_not_retried() -> None:
    async with quic_server(SessionServer()) as quic, asyncio.timeout(LONG):
        sessions = reconnecting(*quic.address, tls=ClientTLS(pin_sha256="ab" * 32))
        with pytest.raises(CertificateError):
            async for _ in sessions:
                pytest.fail("the pin does not match: no session")
        assert sessions.attempts == 1


async def test_stop_interrupts_the_backoff_wait() -> None:
    server = SessionServer()
    async with quic_server(server) as quic, asyncio.timeout(LONG):
        # A backoff far longer than the test's bound: only stop() can end the wait.
        sessions = reconnecting(
            *quic.address, tls=_tls(), backoff_initial=100 * LONG, backoff_cap=100 * LONG
        )
        async with sessions:
            async for handle in sessions:
                await (await server.handles.get()).close()
                await handle.wait_closed()
                asyncio.get_running_loop().call_later(SHORT / 10, sessions.stop)
        assert sessions.sessions == 1


async def test_serve_on_every_session() -> None:
    server = SessionServer()

    async def echo(stream: Stream) -> None:
        await stream.send(await stream.read())

    async with quic_server(server) as quic, asyncio.timeout(LONG):
        async with reconnecting(*quic.address, tls=_tls(), backoff_initial=5 * MS) as sessions:
            serving = asyncio.create_task(sessions.serve({"echo": echo}))
            for round_ in range(3):
                peer = await server.handles.get()
                async with await peer.open("echo") as stream:
                    await stream.send(b"round %d" % round_)
                    await stream.write_eof()
                    assert await stream.read() == b"round %d" % round_
                await peer.close()
            sessions.stop()
            await serving
        assert sessions.sessions == 3


def test_bad_arguments() -> None:
    with pytest.raises(ConfigError):
        reconnecting("127.0.0.1", 4433)  # no tls
    with pytest.raises(ConfigError):
        reconnecting("127.0.0.1", 4433, tls=_tls(), backoff_initial=2, backoff_cap=1)
    with pytest.raises(ConfigError):
        reconnecting("127.0.0.1", 4433, tls=_tls(), max_attempts=0)

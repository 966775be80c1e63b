"""Relay and Edge driven in-process, the edge link over the memory transport (TCP legs
are real sockets on 127.0.0.1): the paths subprocess tests cannot reach or cannot
observe closely — an authenticated edge opening towards the relay, malformed auth
metadata, instance identity (same-instance replacement, replicas of one name, retry on
another replica), the edge's answer while stopping, a burst beyond the stream limit,
a forwarding loop, and the auth deadline covering negotiation.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from quic_reverse import Config, Metadata, RejectCode, Role, Session, StreamRejected
from quic_reverse.session import SessionHandle
from quic_reverse.transport.memory import connection_pair
from quic_reverse.tunnel.auth import (
    TokenStore,
    authenticate_to_relay,
    generate_token,
    write_token_file,
)
from quic_reverse.tunnel.config import AUTH_SERVICE, EdgeConfig, Exposed, Forward, RelayConfig
from quic_reverse.tunnel.edge import Edge
from quic_reverse.tunnel.registry import Pool
from quic_reverse.tunnel.relay import Relay

from ..support.timing import LONG, MS, SHORT

TOKEN = generate_token()


@dataclass
class Setup:
    tmp: Path
    relay: Relay
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)

    def port(self, service: str = "echo") -> int:
        for fwd, (_, port) in self.relay.forward_addresses.items():
            if fwd.service == service:
                return port
        raise KeyError(service)

    def pool(self, name: str = "edgeA") -> Pool:
        return self.relay.registry.pool(name)

    def link(self) -> tuple[Any, Any]:
        """A memory connection whose server end the relay serves; returns the client end."""
        client, server = connection_pair()
        self.tasks.append(asyncio.create_task(self.relay.serve_connection(server)))
        return client, server

    def edge(self, expose: dict[str, int], **over: Any) -> Edge:
        return self.edge_on(self.link(), expose, **over)

    def edge_on(self, link: tuple[Any, Any], expose: dict[str, int], **over: Any) -> Edge:
        token_file = self.tmp / "edgeA.token"
        if not token_file.exists():
            write_token_file(token_file, TOKEN)
        cfg = EdgeConfig(
            relay=("127.0.0.1", 1),
            name="edgeA",
            token_file=token_file,
            expose=tuple(Exposed(service=s, host="127.0.0.1", port=p) for s, p in expose.items()),
            fingerprint="ab" * 32,
            **over,
        )
        edge = Edge(cfg)
        self.tasks.append(asyncio.create_task(edge.serve_connection(link[0])))
        return edge


async def until(pool: Pool, predicate: Callable[[], bool]) -> None:
    """Wait (bounded) until ``predicate`` holds: woken by the pool's changes (replicas,
    released streams), and every 10 ms for what it does not signal (waiting clients)."""
    async with asyncio.timeout(LONG):
        while not predicate():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(10 * MS):
                    await pool.wait_changed()


@contextlib.asynccontextmanager
async def relay_setup(
    tmp_path: Path, services: tuple[str, ...] = ("echo",), **over: Any
) -> AsyncIterator[Setup]:
    tokens_file = tmp_path / "tokens.toml"
    tokens_file.write_text(f'edgeA = "{TOKEN}"\n', encoding="utf-8")
    tokens_file.chmod(0o600)
    settings: dict[str, Any] = {
        "listen": ("127.0.0.1", 0),
        "self_signed": True,
        "state_dir": tmp_path / "state",
        "tokens": tokens_file,
        "forwards": tuple(
            Forward(host="127.0.0.1", port=0, edge="edgeA", service=s) for s in services
        ),
        "auth_timeout": LONG,
        "open_timeout": LONG,
        "grace": SHORT,
    }
    settings.update(over)
    relay = Relay(RelayConfig(**settings), TokenStore({"edgeA": TOKEN}))
    await relay.start()
    setup = Setup(tmp=tmp_path, relay=relay)
    try:
        yield setup
    finally:
        await relay.shutdown()
        for t in setup.tasks:
            t.cancel()
        await asyncio.gather(*setup.tasks, return_exceptions=True)


@dataclass
class Conns:
    """Connections of the echo service: open now, most at once, and "none open"."""

    now: int = 0
    peak: int = 0
    none: asyncio.Event = field(default_factory=asyncio.Event)


@contextlib.asynccontextmanager
async def echo_service(
    hold: asyncio.Event | None = None,
) -> AsyncIterator[tuple[int, Conns]]:
    """A TCP echo service (``hold``: wait for it before echoing); returns its port."""
    conns = Conns()

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conns.now += 1
        conns.peak = max(conns.peak, conns.now)
        conns.none.clear()
        try:
            if hold is not None:
                await hold.wait()
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            writer.write_eof()
        except OSError:
            pass
        finally:
            conns.now -= 1
            if not conns.now:
                conns.none.set()
            writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], conns
    finally:
        server.close()


async def roundtrip(port: int, payload: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(payload)
        writer.write_eof()
        try:
            return await reader.read()
        except ConnectionResetError:
            return b""
    finally:
        writer.close()


async def raw_edge(setup: Setup, instance: str | None = "inst-1") -> SessionHandle:
    """A bare session authenticated as edgeA (``instance=None``: an older edge)."""
    client, _ = setup.link()
    handle = await Session(client, Role.CLIENT, Config()).start()
    if instance is None:
        metadata = Metadata.structured({"name": "edgeA", "token": TOKEN})
        stream = await handle.open(AUTH_SERVICE, metadata)
        await stream.aclose()
    else:
        await authenticate_to_relay(handle, "edgeA", TOKEN, instance)
    return handle


# ------------------------------------------------------------------ authentication


async def test_authenticated_edge_cannot_open_towards_the_relay(tmp_path: Path) -> None:
    async with relay_setup(tmp_path) as setup:
        handle = await raw_edge(setup)
        with pytest.raises(StreamRejected) as info:
            await handle.open("echo", Metadata.EMPTY)
        assert info.value.code == RejectCode.UNAUTHORIZED
        assert await handle.ping() >= 0  # the session is still fine
        assert len(setup.pool().live()) == 1
        await handle.close()


@pytest.mark.parametrize(
    "metadata",
    [
        Metadata.from_bytes(b"name=edgeA"),
        Metadata.EMPTY,
        Metadata.structured([("name", 5), ("token", TOKEN)]),
        Metadata.structured({"name": "edgeA"}),
        Metadata.structured([("name", "edgeA"), ("token", b"bytes")]),
        Metadata.structured({"name": "edgeA", "token": TOKEN, "instance": "x y"}),
        Metadata.structured([("name", "edgeA"), ("token", TOKEN), ("instance", 7)]),
    ],
    ids=["raw", "empty", "name-int", "no-token", "token-bytes", "instance-space", "instance-int"],
)
async def test_malformed_auth_metadata_is_rejected_and_closed(
    tmp_path: Path, metadata: Metadata
) -> None:
    async with relay_setup(tmp_path) as setup:
        client, _ = setup.link()
        handle = await Session(client, Role.CLIENT, Config()).start()
        with pytest.raises(StreamRejected) as info:
            await handle.open(AUTH_SERVICE, metadata)
        assert info.value.code == RejectCode.UNAUTHORIZED
        async with asyncio.timeout(LONG):
            await handle.wait_closed()
        assert not setup.pool().live()


async def test_auth_deadline_covers_negotiation(tmp_path: Path) -> None:
    """Issue 10 item 4: 500 connections that never negotiate are all closed by the
    relay at its auth deadline, counted from acceptance."""
    auth_timeout = 500 * MS
    async with relay_setup(tmp_path, auth_timeout=auth_timeout) as setup:
        clients = [setup.link()[0] for _ in range(500)]
        async with asyncio.timeout(auth_timeout + LONG):
            await asyncio.gather(*(c.wait_closed() for c in clients))
        assert all(not c.is_open for c in clients)


# ------------------------------------------------------------------ instances


async def test_reconnect_of_the_same_instance_replaces_its_session(tmp_path: Path) -> None:
    async with relay_setup(tmp_path) as setup:
        first = await raw_edge(setup, "inst-1")
        second = await raw_edge(setup, "inst-1")
        async with asyncio.timeout(LONG):
            await first.wait_closed()  # the relay retired the old session
        assert [r.instance for r in setup.pool().live()] == ["inst-1"]
        assert not second.is_closed
        await second.close()


async def test_other_instances_and_old_edges_become_replicas(tmp_path: Path) -> None:
    """Issue 10 item 3: a second live instance never replaces the first (no flap);
    edges without an instance id are instances of their own."""
    async with relay_setup(tmp_path) as setup:
        first = await raw_edge(setup, "inst-1")
        second = await raw_edge(setup, "inst-2")
        old_a = await raw_edge(setup, None)
        old_b = await raw_edge(setup, None)
        live = setup.pool().live()
        assert sorted(str(r.instance) for r in live) == ["None", "None", "inst-1", "inst-2"]
        for handle in (first, second, old_a, old_b):
            assert await handle.ping() >= 0
            assert not handle.is_closed
        await asyncio.gather(*(h.close() for h in (first, second, old_a, old_b)))
        await until(setup.pool(), lambda: not setup.pool().live())


async def test_second_instance_does_not_drop_the_first_ones_clients(tmp_path: Path) -> None:
    async with echo_service() as (svc, _), relay_setup(tmp_path) as setup:
        first = setup.edge({"echo": svc})
        await until(setup.pool(), lambda: len(setup.pool().live()) == 1)
        reader, writer = await asyncio.open_connection("127.0.0.1", setup.port())
        async with asyncio.timeout(LONG):
            writer.write(b"one")
            assert await reader.readexactly(3) == b"one"
            second = setup.edge({"echo": svc})
            await until(setup.pool(), lambda: len(setup.pool().live()) == 2)
            assert second.instance != first.instance
            writer.write(b"two")  # the first instance's client is still served
            assert await reader.readexactly(3) == b"two"
            # New clients spread over both (fewest active streams first).
            assert await roundtrip(setup.port(), b"new") == b"new"
            assert sorted(r.assigned for r in setup.pool().live()) == [1, 1]
            writer.write_eof()
            assert await reader.read() == b""
        writer.close()


async def test_open_failing_on_one_replica_is_retried_on_another(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A replica whose service is down answers SERVICE_UNAVAILABLE: the relay retries
    on the other replica and the TCP client never notices."""
    async with echo_service() as (svc, _), relay_setup(tmp_path) as setup:
        with socket_closed_port() as dead:
            setup.edge({"echo": dead})
            await until(setup.pool(), lambda: len(setup.pool().live()) == 1)
            setup.edge({"echo": svc})
            await until(setup.pool(), lambda: len(setup.pool().live()) == 2)
            caplog.set_level(logging.INFO, logger="quic_reverse.tunnel")
            async with asyncio.timeout(LONG):
                for i in range(4):  # whichever replica is picked first, all succeed
                    assert await roundtrip(setup.port(), b"x%d" % i) == b"x%d" % i
        assert "trying another replica" in caplog.text


@contextlib.contextmanager
def socket_closed_port() -> Any:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    yield port  # nothing listens there now: connections are refused


# ------------------------------------------------------------------ stopping, limits, loops


async def test_edge_answers_service_unavailable_while_stopping(tmp_path: Path) -> None:
    """While a stopping edge lets running streams finish, new opens get an immediate
    SERVICE_UNAVAILABLE (so a relay can try another replica), not silence."""
    async with echo_service() as (svc, _), relay_setup(tmp_path) as setup:
        edge = setup.edge({"echo": svc}, grace=LONG)
        await until(setup.pool(), lambda: len(setup.pool().live()) == 1)
        (replica,) = setup.pool().live()
        running = await replica.handle.open("echo")
        await running.send(b"ping")
        assert await running.readexactly(4) == b"ping"
        edge.stop()
        with pytest.raises(StreamRejected) as info:
            async with asyncio.timeout(LONG):
                await replica.handle.open("echo")
        assert info.value.code == RejectCode.SERVICE_UNAVAILABLE
        await running.send(b"pong")  # the running stream still works in the grace period
        assert await running.readexactly(4) == b"pong"
        await running.aclose()


async def test_burst_beyond_the_stream_limit_queues_then_succeeds(tmp_path: Path) -> None:
    """Issue 10 item 2: 3 streams per session at most on both sides; 12 clients at
    once: the 9 beyond the limit wait for a free stream and all are served."""
    hold = asyncio.Event()
    async with (
        echo_service(hold) as (svc, counts),
        relay_setup(tmp_path, max_streams=3) as setup,
    ):
        setup.edge({"echo": svc}, max_streams=3)
        await until(setup.pool(), lambda: len(setup.pool().live()) == 1)
        clients = [
            asyncio.create_task(roundtrip(setup.port(), b"client %d" % i)) for i in range(12)
        ]
        await until(setup.pool(), lambda: setup.pool().waiting == 9)
        hold.set()
        async with asyncio.timeout(LONG):
            replies = await asyncio.gather(*clients)
        assert replies == [b"client %d" % i for i in range(12)]
        assert counts.peak == 3  # never more than the limit at once


async def test_forwarding_loop_is_cut_with_a_clear_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A relay forward whose edge exposes that same forward's address (one host): one
    client connection costs one extra stream, then the edge refuses the loop."""
    caplog.set_level(logging.INFO, logger="quic_reverse.tunnel")
    async with relay_setup(tmp_path, services=("web",)) as setup:
        setup.edge({"web": setup.port("web")})
        await until(setup.pool(), lambda: len(setup.pool().live()) == 1)
        async with asyncio.timeout(LONG):
            assert await roundtrip(setup.port("web"), b"GET /") == b""
            await until(setup.pool(), lambda: setup.pool().live()[0].active == 0)
    edge_lines = [r for r in caplog.records if r.name == "quic_reverse.tunnel.edge"]
    relay_lines = [r.getMessage() for r in caplog.records if r.name == "quic_reverse.tunnel.relay"]
    loops = [r for r in edge_lines if "forwarding loop" in r.getMessage()]
    assert len(loops) == 1 and loops[0].levelno == logging.ERROR
    assert sum("opened" in line for line in relay_lines) == 1


async def test_lost_session_closes_the_edges_service_connections(tmp_path: Path) -> None:
    """Issue 10 item 1 end to end: the relay link dies under running forwards (a relay
    crash, a partition); the edge's connections to its local service are all closed,
    none stays ESTABLISHED without its client."""
    async with echo_service() as (svc, counts), relay_setup(tmp_path) as setup:
        link = setup.link()
        setup.edge_on(link, {"echo": svc})
        await until(setup.pool(), lambda: len(setup.pool().live()) == 1)
        clients = []
        async with asyncio.timeout(LONG):
            for i in range(8):
                reader, writer = await asyncio.open_connection("127.0.0.1", setup.port())
                writer.write(b"%d" % i)
                assert await reader.readexactly(1) == b"%d" % i
                clients.append(writer)
            assert counts.now == 8
            link[1].close(1, b"crash")  # the relay's end of the link goes away
            await counts.none.wait()
        for writer in clients:
            writer.close()

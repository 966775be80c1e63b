"""UDP forwarding through a relay and an edge in this process, over real QUIC (qh3 on
127.0.0.1) with real UDP sockets: many clients through one forward to a UDP echo, a
DNS query with dnspython, too-large datagrams, idle expiry, the flow bound, the
allow-list, and the refusal when the edge's session offers no datagram flows."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import dns.asyncquery
import dns.message
import dns.rdatatype
import dns.rrset
import pytest

from quic_reverse import Config
from quic_reverse.tunnel.auth import TokenStore, generate_token, write_token_file
from quic_reverse.tunnel.config import EdgeConfig, Exposed, Forward, RelayConfig
from quic_reverse.tunnel.edge import Edge
from quic_reverse.tunnel.relay import Relay
from quic_reverse.tunnel.udp import UdpForward

from ..support.timing import LONG, MS, SHORT

TOKEN = generate_token()


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, on: Any) -> None:
        self.on = on
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (the selector loop's datagram transport is not a DatagramTransport subclass)
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.on(data, addr, self.transport)


@contextlib.asynccontextmanager
async def udp_echo() -> AsyncIterator[tuple[int, list[int]]]:
    """A UDP echo on 127.0.0.1; yields (port, [datagrams received])."""
    count = [0]

    def echo(data: bytes, addr: Any, transport: asyncio.DatagramTransport) -> None:
        count[0] += 1
        transport.sendto(data, addr)

    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(
        lambda: _Udp(echo), local_addr=("127.0.0.1", 0)
    )
    try:
        yield transport.get_extra_info("sockname")[1], count
    finally:
        transport.close()


def dns_answer(data: bytes, addr: Any, transport: asyncio.DatagramTransport) -> None:
    """A tiny authoritative DNS server: example.test. A 192.0.2.53, else NXDOMAIN."""
    query = dns.message.from_wire(data)
    response = dns.message.make_response(query)
    question = query.question[0]
    if question.name.to_text() == "example.test." and question.rdtype == dns.rdatatype.A:
        response.answer.append(dns.rrset.from_text("example.test.", 60, "IN", "A", "192.0.2.53"))
    else:
        response.set_rcode(dns.rcode.NXDOMAIN)
    transport.sendto(response.to_wire(), addr)


@dataclasses.dataclass
class World:
    relay: Relay
    edge: Edge

    def forward(self, service: str) -> UdpForward:
        for fwd, udp in self.relay.udp_forwards.items():
            if fwd.service == service:
                return udp
        raise KeyError(service)

    def port(self, service: str) -> int:
        address = self.forward(service).address
        assert address is not None
        return address[1]


@contextlib.asynccontextmanager
async def world(
    tmp_path: Path,
    forwards: dict[str, str],
    expose: dict[str, tuple[str, int]],
    *,
    relay_over: dict[str, Any] | None = None,
    edge_over: dict[str, Any] | None = None,
    edge_session: dict[str, Any] | None = None,
) -> AsyncIterator[World]:
    """A relay with ``udp:`` forwards (service -> "udp"/"tcp") and a connected edge."""
    tokens_file = tmp_path / "tokens.toml"
    tokens_file.write_text(f'edgeA = "{TOKEN}"\n', encoding="utf-8")
    tokens_file.chmod(0o600)
    relay = Relay(
        RelayConfig(
            listen=("127.0.0.1", 0),
            self_signed=True,
            state_dir=tmp_path / "state",
            tokens=tokens_file,
            forwards=tuple(
                Forward(host="127.0.0.1", port=0, edge="edgeA", service=s, protocol=p)
                for s, p in forwards.items()
            ),
            auth_timeout=LONG,
            open_timeout=LONG,
            grace=SHORT,
            **(relay_over or {}),
        ),
        TokenStore({"edgeA": TOKEN}),
    )
    await relay.start()
    token_file = tmp_path / "edgeA.token"
    write_token_file(token_file, TOKEN)
    assert relay.quic_address is not None and relay.fingerprint is not None
    edge = Edge(
        EdgeConfig(
            relay=relay.quic_address,
            name="edgeA",
            token_file=token_file,
            expose=tuple(
                Exposed(service=s, host="127.0.0.1", port=port, protocol=p)
                for s, (p, port) in expose.items()
            ),
            fingerprint=relay.fingerprint,
            **(edge_over or {}),
        )
    )
    if edge_session:
        base = edge.session_config()
        edge.session_config = lambda: dataclasses.replace(base, **edge_session)  # type: ignore[method-assign]
    task = asyncio.create_task(edge.run())
    try:
        pool = relay.registry.pool("edgeA")
        async with asyncio.timeout(LONG):
            while not pool.live():
                await pool.wait_changed()
        yield World(relay=relay, edge=edge)
    finally:
        edge.stop()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(LONG):
                await task
        task.cancel()
        await relay.shutdown()


class Client(asyncio.DatagramProtocol):
    """A UDP client socket collecting replies."""

    def __init__(self) -> None:
        self.replies: list[bytes] = []
        self.arrived = asyncio.Event()
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (the selector loop's datagram transport is not a DatagramTransport subclass)
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.replies.append(data)
        self.arrived.set()

    async def ask(self, data: bytes, within: float) -> bytes | None:
        """Send ``data``; the next reply, or None if none came within ``within``."""
        assert self.transport is not None
        self.arrived.clear()
        before = len(self.replies)
        self.transport.sendto(data)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within):
                while len(self.replies) == before:
                    await self.arrived.wait()
                    self.arrived.clear()
                return self.replies[before]
        return None


async def client_to(port: int) -> Client:
    loop = asyncio.get_running_loop()
    _, proto = await loop.create_datagram_endpoint(Client, remote_addr=("127.0.0.1", port))
    return proto


async def test_10000_datagrams_from_100_clients_through_the_tunnel(tmp_path: Path) -> None:
    """100 client ports at once, 100 datagrams each of 1-1200 random bytes, each echoed:
    delivered and lost counted in both directions; replies reach the right client."""
    clients_n, per_client = 100, 100
    async with (
        udp_echo() as (echo_port, echo_count),
        world(tmp_path, {"echo": "udp"}, {"echo": ("udp", echo_port)}) as w,
    ):
        port = w.port("echo")
        clients = [await client_to(port) for _ in range(clients_n)]
        rng = random.Random(20261201)
        lost_rounds = 0

        async def run(index: int, client: Client) -> int:
            lost = 0
            for seq in range(per_client):
                size = rng.randint(1, 1200)
                head = f"{index}:{seq}:".encode()
                data = (head + bytes(rng.getrandbits(8) for _ in range(size)))[:size]
                if size < len(head):
                    data = bytes([index]) * size  # tiny ones: only this client sends these
                reply = await client.ask(data, SHORT)
                if reply is None:
                    lost += 1
                else:
                    assert reply == data  # the echo of our own datagram, to our port
            return lost

        async with asyncio.timeout(LONG * 6):
            losses = await asyncio.gather(*(run(i, c) for i, c in enumerate(clients)))
        lost_rounds = sum(losses)
        fwd = w.forward("echo")
        total = clients_n * per_client
        up_delivered = echo_count[0]
        down_delivered = sum(len(c.replies) for c in clients)
        print(
            f"\nudp tunnel: {total} datagrams from {clients_n} client ports; "
            f"up delivered {up_delivered} lost {total - up_delivered}; "
            f"down delivered {down_delivered} lost {up_delivered - down_delivered}; "
            f"flows {fwd.stats.flows_opened}, too large {fwd.stats.too_large}"
        )
        for c in clients:
            assert c.transport is not None
            c.transport.close()
        # Loopback: nothing is lost (the expectation), each client had its flow.
        assert lost_rounds == 0
        assert up_delivered == total and down_delivered == total
        assert fwd.stats.flows_opened == clients_n and fwd.stats.too_large == 0
        assert w.edge.udp.stats.flows_opened == clients_n


async def test_dns_query_with_dnspython_through_the_tunnel(tmp_path: Path) -> None:
    loop = asyncio.get_running_loop()
    dns_transport, _ = await loop.create_datagram_endpoint(
        lambda: _Udp(dns_answer), local_addr=("127.0.0.1", 0)
    )
    dns_port = dns_transport.get_extra_info("sockname")[1]
    try:
        async with world(tmp_path, {"dns": "udp"}, {"dns": ("udp", dns_port)}) as w:
            query = dns.message.make_query("example.test.", "A")
            answer = await dns.asyncquery.udp(query, "127.0.0.1", port=w.port("dns"), timeout=LONG)
            assert [r.to_text() for r in answer.answer[0]] == ["192.0.2.53"]
            missing = await dns.asyncquery.udp(
                dns.message.make_query("nope.test.", "A"),
                "127.0.0.1",
                port=w.port("dns"),
                timeout=LONG,
            )
            assert missing.rcode() == dns.rcode.NXDOMAIN
    finally:
        dns_transport.close()


async def test_too_large_datagram_is_dropped_and_counted(tmp_path: Path) -> None:
    async with (
        udp_echo() as (echo_port, echo_count),
        world(tmp_path, {"echo": "udp"}, {"echo": ("udp", echo_port)}) as w,
    ):
        client = await client_to(w.port("echo"))
        assert await client.ask(b"hello", LONG) == b"hello"  # the flow is open
        fwd = w.forward("echo")
        assert await client.ask(b"x" * 1400, 200 * MS) is None  # over ~1230 bytes
        assert fwd.stats.too_large == 1 and echo_count[0] == 1
        assert await client.ask(b"y" * 1200, LONG) == b"y" * 1200  # the flow survived
        assert client.transport is not None
        client.transport.close()


async def test_idle_flows_expire_and_a_new_datagram_reopens(tmp_path: Path) -> None:
    idle = 300 * MS
    async with (
        udp_echo() as (echo_port, _),
        world(
            tmp_path,
            {"echo": "udp"},
            {"echo": ("udp", echo_port)},
            relay_over={"udp_idle_timeout": idle},
            edge_over={"udp_idle_timeout": LONG},
        ) as w,
    ):
        client = await client_to(w.port("echo"))
        fwd = w.forward("echo")
        assert await client.ask(b"one", LONG) == b"one"
        assert fwd.clients == 1 and w.edge.udp.active == 1
        pool = w.relay.registry.pool("edgeA")
        async with asyncio.timeout(LONG):
            while fwd.clients or w.edge.udp.active:  # the relay's expiry closes both ends
                # woken when the flow gives its slot back; polled for the edge's side
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(20 * MS):
                        await pool.wait_changed()
        assert await client.ask(b"two", LONG) == b"two"
        assert fwd.stats.flows_opened == 2
        assert client.transport is not None
        client.transport.close()


async def test_flow_bound_per_forward(tmp_path: Path) -> None:
    async with (
        udp_echo() as (echo_port, _),
        world(
            tmp_path,
            {"echo": "udp"},
            {"echo": ("udp", echo_port)},
            relay_over={"max_udp_flows": 2},
        ) as w,
    ):
        port = w.port("echo")
        a, b, c = [await client_to(port) for _ in range(3)]
        assert await a.ask(b"a", LONG) == b"a"
        assert await b.ask(b"b", LONG) == b"b"
        assert await c.ask(b"c", 200 * MS) is None
        assert w.forward("echo").stats.refused == 1
        assert await a.ask(b"a2", LONG) == b"a2"  # the first two still work
        for cl in (a, b, c):
            assert cl.transport is not None
            cl.transport.close()


async def test_edge_allow_list_applies_to_flows(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A udp forward to a service the edge exposes as TCP (or not at all) is refused."""
    caplog.set_level(logging.INFO)
    async with (
        udp_echo() as (echo_port, echo_count),
        world(
            tmp_path,
            {"tcpsvc": "udp", "hidden": "udp"},
            {"tcpsvc": ("tcp", echo_port)},
        ) as w,
    ):
        for service in ("tcpsvc", "hidden"):
            client = await client_to(w.port(service))
            assert await client.ask(b"x", 300 * MS) is None
            assert client.transport is not None
            client.transport.close()
            assert w.forward(service).stats.refused >= 1
        assert echo_count[0] == 0 and w.edge.udp.stats.flows_opened == 0
        assert "edge rejected the flow" in caplog.text
        assert "UNSUPPORTED_SERVICE" in caplog.text


async def test_edge_without_datagram_flows_is_refused_clearly(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Fallback: an edge whose session does not announce DATAGRAM_FLOWS (as the Rust
    crate) gets no flow request; the relay refuses at the first datagram, loudly."""
    caplog.set_level(logging.WARNING)
    async with (
        udp_echo() as (echo_port, echo_count),
        world(
            tmp_path,
            {"echo": "udp"},
            {"echo": ("udp", echo_port)},
            edge_session={"datagram_flows": False},
        ) as w,
    ):
        client = await client_to(w.port("echo"))
        assert await client.ask(b"x", 300 * MS) is None
        assert client.transport is not None
        client.transport.close()
        assert w.forward("echo").stats.refused == 1
        assert echo_count[0] == 0 and w.edge.udp.stats.flows_opened == 0
        assert "cannot carry UDP" in caplog.text and "DATAGRAM_FLOWS" in caplog.text


def test_default_session_config_advertises_flows() -> None:
    assert Config().datagram_flows

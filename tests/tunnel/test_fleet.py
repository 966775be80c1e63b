"""The relay fleet (issue 19), end to end: a real ``redis-server`` on 127.0.0.1, three
relays sharing it as their registry, edges each connected to one relay, TCP clients
in the test. Every client is bounded in time, every loop in count.

redis-server missing is a failure (with the reason), never a skip: ``.ci/run`` installs
the Debian package ``redis-server`` when it is absent.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis

from quic_reverse.tunnel.auth import generate_token, write_token_file
from quic_reverse.tunnel.relay import ensure_self_signed

from ..support.timing import LONG, MS
from ._procs import Proc, RelayProc, Services, start_edge, start_relay, start_services

pytestmark = pytest.mark.subprocess

#: The fleet settings of the test relays (seconds, passed as flags).
TTL = 4.0
HEARTBEAT = 0.5
#: The test edges' --backoff-cap (tests/tunnel/_procs.py).
BACKOFF_CAP = 1.0
#: One client's bound: open_timeout of the test relays (5 s) plus slack.
CLIENT = 8_000 * MS
WAIT = 30_000 * MS
EDGES = ("alpha", "bravo", "charlie")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class RedisProc(Proc):
    """``redis-server`` on 127.0.0.1 without persistence (as the docs recommend)."""

    def __init__(self, port: int) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.fail(
                "redis-server is not installed: the fleet tests need a real Redis "
                "(Debian: apt-get install redis-server; .ci/run installs it)"
            )
        self.port = port
        command = [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly"]
        self._start(f"redis :{port}", [*command, "no", "--protected-mode", "no"])
        self.wait_for(r"Ready to accept connections")


@dataclass
class Fleet:
    tmp: Path
    services: Services
    redis: RedisProc
    fingerprint: str
    relays: list[RelayProc] = field(default_factory=list)
    edges: dict[str, Proc] = field(default_factory=dict)
    procs: list[Proc] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.redis.port}/0"

    def start_relay(self) -> RelayProc:
        forwards = [f"127.0.0.1:0={name}/echo" for name in EDGES]
        extra = [
            "--registry",
            self.url,
            "--registry-ttl",
            str(TTL),
            "--registry-heartbeat",
            str(HEARTBEAT),
            "--fleet-token-file",
            str(self.tmp / "fleet.token"),
            "--fleet-fingerprint",
            self.fingerprint,
        ]
        relay = start_relay(self.tmp / "state", self.tmp / "tokens.toml", forwards, extra=extra)
        self.procs.append(relay.proc)
        self.relays.append(relay)
        return relay

    def start_edge(self, name: str, relays: Sequence[RelayProc]) -> Proc:
        extra: list[str] = []
        for r in relays[1:]:
            extra += ["--relay", f"127.0.0.1:{r.quic_port}"]
        edge = start_edge(
            name,
            self.tmp / f"{name}.token",
            relays[0],
            [f"echo=127.0.0.1:{self.services.echo}"],
            extra=extra,
        )
        self.procs.append(edge)
        self.edges[name] = edge
        return edge


@pytest.fixture(scope="module")
def services() -> Iterator[Services]:
    svc = start_services()
    try:
        yield svc
    finally:
        svc.proc.kill()


@pytest.fixture
def fleet(services: Services, tmp_path: Path) -> Iterator[Fleet]:
    """Redis, three relays (one certificate, one fleet secret), edge i on relay i."""
    lines = []
    for name in EDGES:
        token = generate_token()
        lines.append(f'{name} = "{token}"')
        write_token_file(tmp_path / f"{name}.token", token)
    (tmp_path / "tokens.toml").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (tmp_path / "tokens.toml").chmod(0o600)
    write_token_file(tmp_path / "fleet.token", generate_token())
    _, _, fingerprint = ensure_self_signed(tmp_path / "state")
    redis = RedisProc(free_port())
    world = Fleet(tmp=tmp_path, services=services, redis=redis, fingerprint=fingerprint)
    world.procs.append(redis)
    try:
        for _ in range(3):
            world.start_relay()
        for name, relay in zip(EDGES, world.relays, strict=True):
            world.start_edge(name, [relay])
        yield world
    finally:
        for p in world.procs:
            p.kill()


async def echo(port: int, payload: bytes) -> bytes | str:
    """Send ``payload`` through the forward at ``port``; the bytes echoed back, or why
    not (the exception's name)."""
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(CLIENT):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(payload)
            writer.write_eof()
            return await reader.read()
    except (OSError, TimeoutError) as exc:
        return type(exc).__name__
    finally:
        if writer is not None:
            writer.close()


async def every_pair(world: Fleet, relays: Sequence[RelayProc], size: int = 256 * 1024) -> None:
    """A client through each of ``relays`` to each edge: the data comes back intact."""
    jobs = []
    for r in relays:
        for name in EDGES:
            payload = os.urandom(size)
            jobs.append((r, name, payload, echo(r.forwards[f"{name}/echo"], payload)))
    results = await asyncio.gather(*(j[3] for j in jobs))
    wrong = [
        f"relay :{r.quic_port} -> {name}: {got if isinstance(got, str) else len(got)} bytes"
        for (r, name, payload, _), got in zip(jobs, results, strict=True)
        if got != payload
    ]
    assert not wrong, wrong


async def served_again(port: int, budget: float) -> float:
    """Seconds until a client through ``port`` is echoed (clients one after another,
    each bounded; at most ``budget`` seconds in all)."""
    started = time.monotonic()
    for i in range(1_000):
        got = await echo(port, b"ping %d" % i)
        if got == b"ping %d" % i:
            return time.monotonic() - started
        assert time.monotonic() - started < budget, f"not served within {budget:.1f}s: {got!r}"
        await asyncio.sleep(50 * MS)
    raise AssertionError("not served after 1000 clients")


State = tuple[int, dict[str, int]]


def registry_state(world: Fleet) -> State:
    """What Redis holds: live relays, and relays per edge name."""
    client: Any = redis.Redis(host="127.0.0.1", port=world.redis.port, socket_timeout=LONG)
    try:
        relays = len(client.keys("quic-reverse:relay:*"))
        edges = {name: int(client.hlen(f"quic-reverse:edge:{name}")) for name in EDGES}
        return relays, edges
    finally:
        client.close()


async def registry_becomes(world: Fleet, expected: Callable[[State], bool] | State) -> float:
    """Seconds until Redis holds ``expected`` (a state or a predicate; polled, bounded
    by WAIT)."""
    check = expected if callable(expected) else expected.__eq__
    started = time.monotonic()
    state = registry_state(world)
    for _ in range(10_000):
        if check(state) or time.monotonic() - started > WAIT:
            break
        await asyncio.sleep(50 * MS)
        state = registry_state(world)
    assert check(state), state
    return time.monotonic() - started


def forwarded_by(relay: RelayProc) -> int:
    return sum(1 for line in relay.proc.lines if "via relay" in line and "opened" in line)


async def test_every_relay_reaches_every_edge_then_survives_a_relay_kill(fleet: Fleet) -> None:
    # 1. Three relays, edge i on relay i only: every relay reaches every edge.
    await registry_becomes(fleet, (3, dict.fromkeys(EDGES, 1)))
    await every_pair(fleet, fleet.relays)
    for relay in fleet.relays:
        assert forwarded_by(relay) >= 2, relay.proc.tail()
    for name, edge in fleet.edges.items():
        # The edge sees three clients, all from its own relay's session.
        assert edge.text.count("-> echo (") >= 3, (name, edge.tail())

    # 2. A second instance of bravo that knows relays 0 and 1 (so it is connected to
    # both); the first instance (on relay 1 only) leaves; relay 1 is killed with SIGKILL:
    # its routes stay in the registry until the TTL, yet clients through relay 2 are
    # served again through relay 0.
    r0, r1, r2 = fleet.relays
    mark = r0.proc.mark()
    twin = start_edge(
        "bravo",
        fleet.tmp / "bravo.token",
        r0,
        [f"echo=127.0.0.1:{fleet.services.echo}"],
        extra=["--relay", f"127.0.0.1:{r1.quic_port}"],
    )
    fleet.procs.append(twin)
    await asyncio.to_thread(r0.proc.wait_for, r"edge 'bravo' authenticated", after=mark)
    fleet.edges["bravo"].kill()
    await served_again(r2.forwards["bravo/echo"], WAIT)  # relay 2 has used relay 1's route
    await registry_becomes(fleet, (3, {"alpha": 1, "bravo": 2, "charlie": 1}))
    r1.proc.kill()
    budget = TTL + BACKOFF_CAP + 10_000 * MS
    took = await served_again(r2.forwards["bravo/echo"], budget)
    # The dead relay's liveness key expires within the TTL: its routes with it (a
    # lookup then also deletes its field).
    expired = await registry_becomes(fleet, lambda state: state[0] == 2)
    print(
        f"fleet figures [relay holding the edge killed]: clients through another relay "
        f"served again after {took * 1000:.0f} ms (ttl {TTL:g}s, backoff cap "
        f"{BACKOFF_CAP:g}s); its liveness gone from the registry {expired * 1000:.0f} ms "
        "later (loopback)"
    )
    await every_pair(fleet, [r0, r2], size=16 * 1024)
    await registry_becomes(fleet, (2, {"alpha": 1, "bravo": 1, "charlie": 1}))
    # An edge that leaves is removed from the registry at once.
    fleet.edges["charlie"].terminate()
    await registry_becomes(fleet, (2, {"alpha": 1, "bravo": 1, "charlie": 0}))
    # A relay that stops gracefully leaves the registry at once (no TTL to wait for).
    assert r0.proc.terminate() == 0
    await registry_becomes(fleet, (1, dict.fromkeys(EDGES, 0)))


def count(relay: RelayProc, text: str) -> int:
    return sum(1 for line in relay.proc.lines if text in line)


async def test_registry_outage_keeps_known_routes_until_ttl_then_recovers(fleet: Fleet) -> None:
    r0, r1, _ = fleet.relays
    await every_pair(fleet, fleet.relays, size=16 * 1024)  # every relay knows every route
    fleet.redis.kill()
    killed = time.monotonic()
    # Local traffic and the routes already known keep working (their TTL has not run).
    await every_pair(fleet, fleet.relays, size=16 * 1024)
    assert time.monotonic() - killed < TTL, "too slow to check within the TTL"
    for relay in fleet.relays:
        await asyncio.to_thread(relay.proc.wait_for, r"registry \S+ unreachable", timeout=WAIT)
    # Past the TTL: the routes known before the outage have expired; local edges work.
    await asyncio.sleep(max(0.0, killed + TTL + 500 * MS - time.monotonic()))
    payload = b"after the ttl"
    assert await echo(r1.forwards["bravo/echo"], payload) == payload
    assert await echo(r0.forwards["bravo/echo"], payload) != payload
    for relay in fleet.relays:
        assert count(relay, "unreachable") == 1, relay.proc.tail()  # logged once
    # Redis back (empty: no persistence): every relay re-publishes at its next heartbeat.
    marks = [r.proc.mark() for r in fleet.relays]
    fleet.redis = RedisProc(fleet.redis.port)
    fleet.procs.append(fleet.redis)
    back = time.monotonic()
    for relay, mark in zip(fleet.relays, marks, strict=True):
        await asyncio.to_thread(relay.proc.wait_for, r"re-publishing", after=mark, timeout=WAIT)
    took = time.monotonic() - back
    print(
        f"fleet figures [registry back]: all 3 relays re-published {took * 1000:.0f} ms after "
        f"redis-server was ready (heartbeat {HEARTBEAT:g}s; loopback)"
    )
    try:
        await every_pair(fleet, fleet.relays, size=16 * 1024)
    except AssertionError:
        print(r0.proc.text[-6000:])
        raise

"""High availability (issue 12), end to end: relays and edges as real processes on
127.0.0.1, TCP clients in the test arriving at a steady rate while one relay, one
replica or the only edge is killed with SIGKILL.

Every client is bounded in time and every load in count; each test prints one line of
figures (attempted, failed, p99 connect-to-first-byte) for the report.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from quic_reverse.tunnel.auth import generate_token, write_token_file

from ..support.timing import MS
from ._procs import Proc, RelayProc, Services, start_edge, start_relay, start_services

pytestmark = pytest.mark.subprocess

#: One client's bound: open_timeout of the test relays (5 s) plus slack.
CLIENT = 8_000 * MS
WAIT = 30_000 * MS
RATE = 50  # new connections per second


@dataclass
class Outcome:
    started: float
    ok: bool
    ttfb: float = 0.0  # connect to first echoed byte, seconds
    error: str = ""


@dataclass
class Load:
    """TCP clients started at ``rate`` per second until stopped (bounded by ``limit``)."""

    port: int
    rate: float = RATE
    limit: int = 2_000
    outcomes: list[Outcome] = field(default_factory=list)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _task: asyncio.Task[None] | None = None

    def start(self) -> Load:
        self._task = asyncio.create_task(self._run())
        return self

    async def stop(self) -> list[Outcome]:
        self._stop.set()
        assert self._task is not None
        await self._task
        return self.outcomes

    async def _run(self) -> None:
        clients: list[asyncio.Task[Outcome]] = []
        loop = asyncio.get_running_loop()
        begin = loop.time()
        for i in range(self.limit):
            if self._stop.is_set():
                break
            clients.append(asyncio.create_task(client(self.port, b"x%d" % i)))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(begin + (i + 1) / self.rate):
                    await self._stop.wait()
        self.outcomes.extend(await asyncio.gather(*clients))


async def client(port: int, payload: bytes) -> Outcome:
    """Connect, send ``payload``, read it back (the echo service), close."""
    started = time.monotonic()
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(CLIENT):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(payload)
            got = await reader.readexactly(len(payload))
            ttfb = time.monotonic() - started
            assert got == payload
            writer.write_eof()
            await reader.read()
        return Outcome(started, True, ttfb)
    except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
        return Outcome(started, False, error=type(exc).__name__)
    finally:
        if writer is not None:
            writer.close()


def p99(outcomes: Sequence[Outcome]) -> float:
    times = sorted(o.ttfb for o in outcomes if o.ok)
    if not times:
        return float("nan")
    return times[min(len(times) - 1, int(len(times) * 0.99))]


def figures(label: str, outcomes: Sequence[Outcome]) -> str:
    failed = sum(not o.ok for o in outcomes)
    slowest = max((o.ttfb for o in outcomes if o.ok), default=float("nan"))
    line = (
        f"HA figures [{label}]: attempted {len(outcomes)}, failed {failed}, "
        f"p99 connect-to-first-byte {p99(outcomes) * 1000:.1f} ms, "
        f"max {slowest * 1000:.1f} ms (loopback)"
    )
    print(line)
    return line


@dataclass
class World:
    tmp: Path
    services: Services
    procs: list[Proc] = field(default_factory=list)

    @property
    def tokens(self) -> Path:
        return self.tmp / "tokens.toml"

    @property
    def token(self) -> Path:
        return self.tmp / "edgeA.token"

    def relay(self, forwards: Sequence[str], **kw: object) -> RelayProc:
        relay = start_relay(self.tmp / "state", self.tokens, forwards, **kw)  # type: ignore[arg-type]
        self.procs.append(relay.proc)
        return relay

    def edge(self, relay: RelayProc, extra: Sequence[str] = (), *, wait: bool = True) -> Proc:
        edge = start_edge(
            "edgeA",
            self.token,
            relay,
            [f"echo=127.0.0.1:{self.services.echo}"],
            extra=extra,
            wait=wait,
        )
        self.procs.append(edge)
        return edge


@pytest.fixture(scope="module")
def services() -> Iterator[Services]:
    svc = start_services()
    try:
        yield svc
    finally:
        svc.proc.kill()


@pytest.fixture
def world(services: Services, tmp_path: Path) -> Iterator[World]:
    token = generate_token()
    (tmp_path / "tokens.toml").write_text(f'edgeA = "{token}"\n', encoding="utf-8")
    (tmp_path / "tokens.toml").chmod(0o600)
    write_token_file(tmp_path / "edgeA.token", token)
    w = World(tmp=tmp_path, services=services)
    try:
        yield w
    finally:
        for p in w.procs:
            p.kill()


def served_by(edge: Proc, after: int = 0) -> int:
    """Streams an edge process opened to its echo service (from its log)."""
    return sum(1 for line in edge.lines[after:] if re.search(r"-> echo \(.*\) opened", line))


async def wait_for(proc: Proc, pattern: str, after: int = 0) -> None:
    await asyncio.to_thread(proc.wait_for, pattern, after=after, timeout=WAIT)


def _wait_served(edges: Sequence[Proc], total: int) -> None:
    deadline = time.monotonic() + WAIT
    while sum(served_by(e) for e in edges) < total and time.monotonic() < deadline:
        time.sleep(50 * MS)


async def test_baseline_steady_load_no_failure(world: World) -> None:
    """The reference figure: the same load with nothing failing."""
    relay = world.relay(["127.0.0.1:0=edgeA/echo"])
    world.edge(relay)
    load = Load(relay.forwards["edgeA/echo"], limit=100).start()
    outcomes = await _run_for(load, 2_000 * MS)
    figures("no failure, one relay one edge", outcomes)
    assert outcomes and all(o.ok for o in outcomes), [o.error for o in outcomes if not o.ok]


async def _run_for(load: Load, seconds: float) -> list[Outcome]:
    await asyncio.sleep(seconds)
    return await load.stop()


async def test_two_relays_kill_one_no_failure_through_the_other(world: World) -> None:
    relay1 = world.relay(["127.0.0.1:0=edgeA/echo"])
    relay2 = world.relay(["127.0.0.1:0=edgeA/echo"])  # same state dir: same certificate
    edge = world.edge(relay1, ["--relay", f"127.0.0.1:{relay2.quic_port}"])
    for relay in (relay1, relay2):
        await wait_for(edge, rf"authenticated to relay 127\.0\.0\.1:{relay.quic_port}")
    port1, port2 = relay1.forwards["edgeA/echo"], relay2.forwards["edgeA/echo"]
    through2 = Load(port2).start()
    through1 = Load(port1).start()
    await asyncio.sleep(1_000 * MS)
    before1 = await through1.stop()
    assert all(o.ok for o in before1), [o.error for o in before1 if not o.ok]
    mark = edge.mark()
    killed_at = time.monotonic()
    relay1.proc.kill()  # SIGKILL
    await asyncio.sleep(3_000 * MS)  # past the edge's keep-alive (1 + 2 s) on relay1
    # relay1 comes back on the same UDP and TCP ports.
    relay1b = world.relay([f"127.0.0.1:{port1}=edgeA/echo"], listen=f"127.0.0.1:{relay1.quic_port}")
    await wait_for(edge, rf"authenticated to relay 127\.0\.0\.1:{relay1.quic_port}", mark)
    outcomes2 = await through2.stop()
    during = [o for o in outcomes2 if o.started >= killed_at]
    figures("relay killed, clients of the other relay", during)
    assert during, "no client arrived during the failure"
    assert all(o.ok for o in outcomes2), [o.error for o in outcomes2 if not o.ok]
    # The other relay's session was never disturbed.
    assert not edge.find(rf"relay 127\.0\.0\.1:{relay2.quic_port}: ", after=mark)
    after = await client(relay1b.forwards["edgeA/echo"], b"back")
    assert after.ok, after.error


async def test_replicas_share_1000_connections(world: World) -> None:
    relay = world.relay(["127.0.0.1:0=edgeA/echo"])
    a, b = world.edge(relay), world.edge(relay)
    await wait_for(relay.proc, r"edge 'edgeA' authenticated .* 2 live replica")
    port = relay.forwards["edgeA/echo"]
    outcomes: list[Outcome] = []
    for start in range(0, 1000, 20):  # 20 at a time, 1,000 in all
        outcomes += await asyncio.gather(
            *(client(port, b"%d" % i) for i in range(start, start + 20))
        )
    assert all(o.ok for o in outcomes), [o.error for o in outcomes if not o.ok]
    await asyncio.to_thread(_wait_served, (a, b), 1000)
    share = served_by(a) / 1000
    print(
        f"HA figures [two replicas, 1,000 connections]: replica A {served_by(a)}, B {served_by(b)}"
    )
    assert served_by(a) + served_by(b) == 1000
    assert 0.4 <= share <= 0.6, share


async def test_kill_replica_while_clients_arrive(world: World) -> None:
    relay = world.relay(["127.0.0.1:0=edgeA/echo"])
    a = world.edge(relay)
    world.edge(relay)
    await wait_for(relay.proc, r"edge 'edgeA' authenticated .* 2 live replica")
    load = Load(relay.forwards["edgeA/echo"]).start()
    await asyncio.sleep(1_000 * MS)
    killed_at = time.monotonic()
    a.kill()  # SIGKILL
    await asyncio.sleep(4_000 * MS)
    outcomes = await load.stop()
    before = [o for o in outcomes if o.started < killed_at]
    during = [o for o in outcomes if o.started >= killed_at]
    figures("before the replica kill", before)
    figures("replica killed, new clients", during)
    # Only connections in flight on the dead replica may fail: none started after.
    assert during and all(o.ok for o in during), [o.error for o in during if not o.ok]
    assert relay.proc.find(r"no answer to an open nor to a ping")


async def test_edge_restarted_clients_wait_and_are_served(world: World) -> None:
    relay = world.relay(["127.0.0.1:0=edgeA/echo"])
    edge = world.edge(relay)
    load = Load(relay.forwards["edgeA/echo"], rate=20).start()
    await asyncio.sleep(500 * MS)
    mark = relay.proc.mark()
    killed_at = time.monotonic()
    edge.kill()  # SIGKILL
    # The relay finds the edge dead (the first client's open goes unanswered); clients
    # keep arriving while the name has no replica at all, then the edge comes back.
    await wait_for(relay.proc, r"dropping its session|session lost", mark)
    await asyncio.sleep(500 * MS)
    world.edge(relay)  # a new process (a new instance id)
    await asyncio.sleep(1_000 * MS)
    outcomes = await load.stop()
    during = [o for o in outcomes if o.started >= killed_at]
    figures("only edge killed, restarted after the relay dropped it", during)
    assert during and all(o.ok for o in outcomes), [o.error for o in outcomes if not o.ok]


async def test_gone_edge_client_closed_after_open_timeout(world: World) -> None:
    """A name that was connected but has no replica now: clients wait open_timeout for
    one (bridging), then are closed (never held forever, never served by nobody)."""
    relay = world.relay(["127.0.0.1:0=edgeA/echo"], extra=["--open-timeout", "1"])
    edge = world.edge(relay)
    mark = relay.proc.mark()
    assert edge.terminate() == 0
    await wait_for(relay.proc, r"edge 'edgeA' .* closed the session", mark)
    outcome = await client(relay.forwards["edgeA/echo"], b"nobody")
    assert not outcome.ok
    await wait_for(relay.proc, r"no replica \(re\)connected in time", mark)


async def test_two_instances_one_name_settle_and_drop_nothing(world: World) -> None:
    relay = world.relay(["127.0.0.1:0=edgeA/echo"])
    mark = relay.proc.mark()
    world.edge(relay)
    load = Load(relay.forwards["edgeA/echo"]).start()
    world.edge(relay)
    await wait_for(relay.proc, r"2 live replica", mark)
    await asyncio.sleep(1_500 * MS)
    outcomes = await load.stop()
    figures("second instance joining under load", outcomes)
    assert all(o.ok for o in outcomes), [o.error for o in outcomes if not o.ok]
    assert not relay.proc.find(r"replacing its session", after=mark)
    assert len(re.findall(r"edge 'edgeA' authenticated", relay.proc.text)) == 2


async def test_sticky_forward_keeps_a_client_on_its_replica(world: World) -> None:
    relay = world.relay(["127.0.0.1:0=edgeA/echo,balance=sticky"])
    a, b = world.edge(relay), world.edge(relay)
    await wait_for(relay.proc, r"2 live replica")
    port = relay.forwards["edgeA/echo"]
    for i in range(20):
        assert (await client(port, b"%d" % i)).ok
    await asyncio.to_thread(_wait_served, (a, b), 20)
    # One client address (127.0.0.1): every connection on the same replica.
    assert sorted((served_by(a), served_by(b))) == [0, 20]


async def test_slow_service_is_checked_not_dropped(world: World) -> None:
    """An edge whose local service is slow to connect answers the open late, but it
    answers the relay's ping: it is checked, never dropped, and keeps serving."""
    # A listener whose accept queue is full: connects to it hang (SYNs are dropped).
    full = socket.socket()
    full.bind(("127.0.0.1", 0))
    full.listen(0)
    fillers = []
    for _ in range(3):
        c = socket.socket()
        c.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            c.connect(full.getsockname())
        fillers.append(c)
    try:
        relay = world.relay(
            ["127.0.0.1:0=edgeA/echo", "127.0.0.1:0=edgeA/slow"],
            extra=["--answer-timeout", "0.3"],
        )
        edge = start_edge(
            "edgeA",
            world.token,
            relay,
            [f"echo=127.0.0.1:{world.services.echo}", f"slow=127.0.0.1:{full.getsockname()[1]}"],
            extra=["--service-timeout", "1.5"],
        )
        world.procs.append(edge)
        slow = await client(relay.forwards["edgeA/slow"], b"never")
        assert not slow.ok  # the edge gave up on its service: SERVICE_UNAVAILABLE
        await wait_for(edge, r"service 'slow'.*cannot connect")
        assert relay.proc.find(r"an open got no answer within 0.3s; checking it")
        assert not relay.proc.find(r"dropping its session")
        after = await client(relay.forwards["edgeA/echo"], b"still here")
        assert after.ok, after.error
    finally:
        for c in (*fillers, full):
            c.close()


async def test_edge_stopped_gracefully_clients_wait_for_its_successor(world: World) -> None:
    """SIGTERM (a service manager's restart): opens arriving while the edge stops are
    answered "stopping"; the relay holds those clients for the next process."""
    relay = world.relay(["127.0.0.1:0=edgeA/echo"])
    edge = world.edge(relay)
    load = Load(relay.forwards["edgeA/echo"], rate=20).start()
    await asyncio.sleep(500 * MS)
    stopped_at = time.monotonic()
    assert await asyncio.to_thread(edge.terminate) == 0
    world.edge(relay)
    await asyncio.sleep(1_000 * MS)
    outcomes = await load.stop()
    during = [o for o in outcomes if o.started >= stopped_at]
    figures("edge stopped (SIGTERM) and started again", during)
    assert during and all(o.ok for o in outcomes), [o.error for o in outcomes if not o.ok]

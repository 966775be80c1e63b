"""Network faults between a real relay and a real edge (issue 10, "Fault tests in CI").

Relay and edge are the real CLI (``.venv/bin/quic-reverse``) in two namespaces of a
:class:`pathlab.Lab`, joined by the user-space delay line; the local echo service runs
beside the edge; TCP clients connect to the relay's forward from the relay's namespace.
Each test is bounded in time, counts what could leak (the edge's ESTABLISHED legs to
the service, the relay's file descriptors) and asserts recovery within the bounds
docs/TUNNEL.md documents (see ``_world``).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from tests.support.timing import MS
from tests.tunnel._procs import Proc

from ._world import (
    EDGE_NOTICES,
    PROMPT,
    QUIC_REVERSE,
    RECONNECT,
    RELAY_NOTICES,
    RELAY_OPEN_TIMEOUT,
    SLACK,
    STARTUP,
    Client,
    World,
    close_all,
    closed,
    connect,
    count_lines,
    echo,
    echo_once,
    fd_count,
    wait_until,
)
from .conftest import lab_world

pytestmark = pytest.mark.faults

FORWARD = "127.0.0.1:0=edgeA/echo"
EDGE_LOST = r"session with the relay lost|relay closed the connection"
RELAY_LOST = r"edge 'edgeA' \([^)]*\)(: session lost| disconnected)"
REPLACED = r"edge 'edgeA' reconnected .* replacing its session"


async def _open_legs(world: World, port: int, n: int) -> list[Client]:
    """``n`` live clients, each proven by an echo; the edge then holds ``n`` legs."""
    clients = await connect(world.lab, port, n)
    await asyncio.gather(
        *(echo(c, f"client {i} ".encode() * 50, STARTUP) for i, c in enumerate(clients))
    )
    await wait_until("edge legs to the service", world.edge_legs, lambda v: v == n, PROMPT)
    return clients


async def _wait_log(proc: Proc, pattern: str, bound: float, after: int) -> re.Match[str]:
    return await asyncio.to_thread(proc.wait_for, pattern, timeout=bound, after=after)


# ---------------------------------------------------------------------------- (a)


@pytest.mark.timeout(int(120_000 * MS))
async def test_partition_longer_than_keepalive_then_heal(world: World) -> None:
    """Drop everything for longer than both keep-alives, then heal: both sides notice,
    the relay closes its clients, the edge reconnects within the documented bound, and
    the edge holds exactly one leg per live client (none leaked from the lost session)."""
    relay = world.start_relay([FORWARD])
    edge = world.start_edge(relay)
    port = relay.forwards["edgeA/echo"]
    before = await _open_legs(world, port, 8)
    edge_mark, relay_mark = edge.mark(), relay.proc.mark()

    world.lab.partition()
    started = time.monotonic()
    await _wait_log(edge, EDGE_LOST, EDGE_NOTICES, edge_mark)
    await _wait_log(relay.proc, RELAY_LOST, RELAY_NOTICES, relay_mark)
    # The relay closes the clients of the lost session (RST or FIN, never a hang).
    outcomes = await asyncio.gather(*(closed(c, PROMPT) for c in before))
    assert set(outcomes) <= {"eof", "reset"}
    close_all(before)
    # Hold the partition past both keep-alives (and some reconnect attempts).
    hold = RELAY_NOTICES + 1000 * MS - (time.monotonic() - started)
    await asyncio.sleep(max(0.0, hold))
    assert world.lab.stats()["to_relay"]["partition"] > 0, "the partition dropped nothing"

    heal_mark = edge.mark()
    world.lab.heal()
    await _wait_log(edge, r"authenticated to relay", RECONNECT, heal_mark)

    live = await connect(world.lab, port, 2)
    try:
        for i, c in enumerate(live):
            await echo(c, f"after heal {i}".encode(), STARTUP)
        legs = await wait_until(
            "edge legs to the service after the partition (2 live clients)",
            world.edge_legs,
            lambda v: v == len(live),
            PROMPT,
        )
        assert legs == 2
    finally:
        close_all(live)
    await wait_until(
        "edge legs after the last client left", world.edge_legs, lambda v: v == 0, PROMPT
    )


# ---------------------------------------------------------------------------- (b)


@pytest.mark.timeout(int(120_000 * MS))
async def test_relay_kill9_and_restart(world: World) -> None:
    """kill -9 the relay with 10 legs open, restart it on the same ports: the edge
    notices and reconnects within the bound, none of the 10 legs survives on the edge,
    and a new client works."""
    relay = world.start_relay([FORWARD])
    edge = world.start_edge(relay)
    port = relay.forwards["edgeA/echo"]
    clients = await _open_legs(world, port, 10)
    mark = edge.mark()

    relay.proc.kill()  # SIGKILL: no goodbye to the edge
    # The clients' relay process is gone: the kernel closes their connections.
    assert set(await asyncio.gather(*(closed(c, PROMPT) for c in clients))) <= {"eof", "reset"}
    close_all(clients)
    await _wait_log(edge, EDGE_LOST, EDGE_NOTICES, mark)

    restart_mark = edge.mark()
    relay2 = world.start_relay([f"127.0.0.1:{port}=edgeA/echo"], quic_port=relay.quic_port)
    await _wait_log(edge, r"authenticated to relay", RECONNECT, restart_mark)
    reply = await echo_once(world.lab, port, b"after restart", STARTUP)
    assert reply == b"after restart"
    assert relay2.forwards["edgeA/echo"] == port

    legs = await wait_until(
        "edge legs to the service after the relay was killed (0 live clients)",
        world.edge_legs,
        lambda v: v == 0,
        PROMPT,
    )
    assert legs == 0


# ---------------------------------------------------------------------------- (c)


@pytest.mark.timeout(int(120_000 * MS))
async def test_edge_kill9_and_restart(world: World) -> None:
    """kill -9 the edge with 10 clients connected: the relay closes them within its
    keep-alive bound; a restarted edge serves new clients; the relay's fds return to
    their baseline and no leg is left on the edge side."""
    relay = world.start_relay([FORWARD])
    edge = world.start_edge(relay)
    port = relay.forwards["edgeA/echo"]
    baseline = fd_count(relay.proc.popen.pid)
    clients = await _open_legs(world, port, 10)
    assert fd_count(relay.proc.popen.pid) >= baseline + 10
    relay_mark = relay.proc.mark()

    edge.kill()  # SIGKILL: the relay hears nothing
    outcomes = await asyncio.gather(*(closed(c, RELAY_NOTICES) for c in clients))
    assert set(outcomes) <= {"eof", "reset"}
    close_all(clients)
    # The clients are closed as the session dies; the log line follows in the same turn
    # or the next, so wait for it (briefly) rather than race it.
    await _wait_log(relay.proc, RELAY_LOST, PROMPT, relay_mark)
    # The dead edge's legs died with it (the kernel closed its sockets).
    await wait_until("edge legs after kill -9", world.edge_legs, lambda v: v == 0, PROMPT)

    world.start_edge(relay)
    reply = await echo_once(world.lab, port, b"after edge restart", STARTUP)
    assert reply == b"after edge restart"
    await wait_until(
        f"relay fds (baseline {baseline}) after the clients left",
        lambda: fd_count(relay.proc.popen.pid),
        lambda v: v <= baseline,
        PROMPT,
    )
    await wait_until("edge legs at the end", world.edge_legs, lambda v: v == 0, PROMPT)


# ---------------------------------------------------------------------------- (d)


@pytest.mark.timeout(int(120_000 * MS))
async def test_two_edges_with_one_name_do_not_flap(world: World) -> None:
    """A second live edge with the same name: the relay settles at once (at most one
    session replacement), the first instance's connections are never dropped, and 100
    probe connections all succeed."""
    relay = world.start_relay([FORWARD])
    world.start_edge(relay)
    port = relay.forwards["edgeA/echo"]
    first = await _open_legs(world, port, 5)
    mark = relay.proc.mark()

    second = world.start_edge(relay, wait=False)
    # Give the second instance time to connect (or be refused) before probing.
    await asyncio.to_thread(second.wait_for, r"connecting to relay", timeout=STARTUP)
    failures: list[str] = []
    deadline = time.monotonic() + 60_000 * MS
    for i in range(100):
        if time.monotonic() > deadline:
            failures.append(f"probes {i}..99 not run: probing exceeded its time bound")
            break
        payload = f"probe {i}".encode()
        try:
            reply = await echo_once(world.lab, port, payload, 5000 * MS)
        except (OSError, TimeoutError) as exc:
            failures.append(f"probe {i}: {type(exc).__name__} {exc}")
            continue
        if reply != payload:
            failures.append(f"probe {i}: got {reply[:40]!r}")
        await asyncio.sleep(50 * MS)
    dropped: list[str] = []
    for i, c in enumerate(first):
        try:
            await echo(c, f"still here {i}".encode(), PROMPT)
        except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
            dropped.append(f"client {i}: {type(exc).__name__}")
    close_all(first)
    swaps = count_lines(relay.proc, REPLACED, after=mark)
    summary = (
        f"{swaps} session replacement(s) after the second instance started; "
        f"{len(failures)} of 100 probes failed {failures[:5]}; "
        f"{len(dropped)} of 5 connections of the first instance dropped {dropped}"
    )
    assert swaps <= 1 and not failures and not dropped, summary


# ---------------------------------------------------------------------------- (e)


def _stream_limit_flag(command: str) -> str | None:
    """The option of ``quic-reverse COMMAND`` that sets its concurrent-stream limit,
    if the CLI has one (an option naming streams and a maximum or limit)."""
    done = subprocess.run(
        [QUIC_REVERSE, command, "--help"],
        capture_output=True,
        text=True,
        timeout=STARTUP,
        check=False,
    )
    for option in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", done.stdout):
        if "stream" in option and any(w in option for w in ("max", "limit", "concurrent")):
            return str(option)
    return None


BURST = 2000
STREAM_LIMIT = 1000  # the session default (Config.max_concurrent_streams)


@pytest.mark.timeout(int(180_000 * MS))
async def test_burst_larger_than_the_stream_limit(world: World) -> None:
    """2,000 concurrent clients against a stream limit of 1,000: every one is served
    (queued opens wait at most open_timeout), and nothing is left open afterwards."""
    flag = _stream_limit_flag("relay")
    edge_flag = _stream_limit_flag("edge")
    relay = world.start_relay([FORWARD], extra=[flag, str(STREAM_LIMIT)] if flag else [])
    edge = world.start_edge(relay, extra=[edge_flag, str(STREAM_LIMIT)] if edge_flag else [])
    port = relay.forwards["edgeA/echo"]
    baseline = fd_count(relay.proc.popen.pid)
    edge_baseline = fd_count(edge.popen.pid)

    clients = await connect(world.lab, port, BURST)
    results: dict[str, int] = {"ok": 0, "closed without data": 0, "wrong data": 0}

    async def one(i: int, client: Client) -> None:
        reader, writer = client
        payload = f"burst client {i:05d} ".encode() * 40
        try:
            writer.write(payload)
            writer.write_eof()
            reply = await reader.read()
        except OSError as exc:
            key = f"error {type(exc).__name__}: {exc}"
            results[key] = results.get(key, 0) + 1
            return
        if reply == payload:
            results["ok"] += 1
        elif not reply:
            results["closed without data"] += 1
        else:
            results["wrong data"] += 1

    try:
        async with asyncio.timeout(RELAY_OPEN_TIMEOUT + 60_000 * MS):
            await asyncio.gather(*(one(i, c) for i, c in enumerate(clients)))
    finally:
        close_all(clients)
    assert results["ok"] == BURST, (
        f"{BURST} concurrent clients, stream limit {STREAM_LIMIT} "
        f"({'via ' + flag if flag else 'default, not configurable'}): {results}"
    )
    await wait_until("edge legs after the burst", world.edge_legs, lambda v: v == 0, PROMPT + SLACK)
    await wait_until(
        f"relay fds (baseline {baseline}) after the burst",
        lambda: fd_count(relay.proc.popen.pid),
        lambda v: v <= baseline,
        PROMPT + SLACK,
    )
    await wait_until(
        f"edge fds (baseline {edge_baseline}) after the burst",
        lambda: fd_count(edge.popen.pid),
        lambda v: v <= edge_baseline,
        PROMPT + SLACK,
    )


# ---------------------------------------------------------------------------- loss


@pytest.mark.timeout(int(240_000 * MS))
async def test_4_mib_through_1pct_loss_50ms_rtt_arrives_intact(tmp_path: Path) -> None:
    """1 % random loss each way and 50 ms RTT: 4 MiB echoed through the tunnel arrive
    intact both ways (sha256), within a generous bound (no speed assertion)."""
    size = 4 << 20
    payload = os.urandom(size)
    with lab_world(tmp_path, delay_ms=25, loss=0.01, seed=7) as world:
        relay = world.start_relay([FORWARD])
        world.start_edge(relay)
        port = relay.forwards["edgeA/echo"]
        ((reader, writer),) = await connect(world.lab, port)
        digest = hashlib.sha256()
        received = 0

        async def send() -> None:
            for i in range(0, size, 1 << 16):
                writer.write(payload[i : i + (1 << 16)])
                await writer.drain()
            writer.write_eof()

        try:
            async with asyncio.timeout(180_000 * MS):
                sender = asyncio.create_task(send())
                while chunk := await reader.read(1 << 20):
                    digest.update(chunk)
                    received += len(chunk)
                await sender
        finally:
            writer.transport.abort()
        stats = world.lab.stats()
        assert received == size
        assert digest.hexdigest() == hashlib.sha256(payload).hexdigest()
        assert stats["to_edge"]["loss"] > 0 and stats["to_relay"]["loss"] > 0, stats

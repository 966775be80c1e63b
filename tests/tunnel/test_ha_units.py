"""Unit tests of the HA parts (issue 12): the pool's balancing, bridging and suspects
(real sessions over the memory transport), the reconnect policy after a session, and
the settings (several relays, per-forward balance, backlog, answer_timeout)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest

from quic_reverse import Role, Session
from quic_reverse.errors import ConfigError
from quic_reverse.session import SessionHandle
from quic_reverse.transport.memory import connection_pair
from quic_reverse.tunnel.config import (
    RELAY_TABLE,
    Forward,
    build_edge_config,
    build_relay_config,
    parse_forward,
)
from quic_reverse.tunnel.registry import EdgeRegistry, Pool, Replica, Unavailable
from quic_reverse.tunnel.supervisor import Backoff

from ..support.timing import MS, SHORT


def _edge_flags(**over: Any) -> dict[str, Any]:
    flags: dict[str, Any] = {
        "relay": ["127.0.0.1:4433"],
        "name": "edgeA",
        "token_file": "/tmp/tok",
        "expose": ["ssh=127.0.0.1:22"],
        "fingerprint": "ab" * 32,
    }
    flags.update(over)
    return flags


# ---------------------------------------------------------------- settings


def test_edge_relay_is_repeatable_on_the_cli_and_a_list_in_toml() -> None:
    cfg = build_edge_config({}, None, _edge_flags(relay=["10.0.0.1:4433", "10.0.0.2:4433"]))
    assert cfg.relays == (("10.0.0.1", 4433), ("10.0.0.2", 4433))
    assert cfg.relay == ("10.0.0.1", 4433)  # the first, for code that knows one relay
    table = {"relay": ["a.example:1", "b.example:2"]}
    cfg = build_edge_config(table, None, _edge_flags(relay=None))
    assert cfg.relays == (("a.example", 1), ("b.example", 2))
    one = build_edge_config({"relay": "a.example:1"}, None, _edge_flags(relay=None))
    assert one.relays == (("a.example", 1),)
    with pytest.raises(ConfigError, match="same relay is given twice"):
        build_edge_config({}, None, _edge_flags(relay=["h:1", "h:1"]))
    with pytest.raises(ConfigError, match="port 0"):
        build_edge_config({}, None, _edge_flags(relay=["h:1", "h:0"]))
    with pytest.raises(ConfigError, match=r"\[edge\] relay: wrong type"):
        build_edge_config({"relay": ["h:1", 2]}, None, _edge_flags(relay=None))


def test_forward_balance_option_and_relay_defaults(tmp_path: Any) -> None:
    fwd = parse_forward("2222=edgeA/ssh,balance=sticky")
    assert fwd == Forward(
        host="127.0.0.1", port=2222, edge="edgeA", service="ssh", balance="sticky"
    )
    assert parse_forward(str(fwd)) == fwd
    assert parse_forward("2222=edgeA/ssh").balance is None
    with pytest.raises(ConfigError, match="balance"):
        parse_forward("2222=edgeA/ssh,balance=random")
    with pytest.raises(ConfigError, match="unknown option"):
        parse_forward("2222=edgeA/ssh,weight=3")
    flags = {"self_signed": True, "tokens": str(tmp_path / "t.toml")}
    cfg = build_relay_config({}, None, flags)
    assert (cfg.balance, cfg.backlog, cfg.answer_timeout) == ("least-streams", 4096, 1.0)
    cfg = build_relay_config(
        {"balance": "sticky", "backlog": 64, "answer_timeout": 0.5}, None, flags
    )
    assert (cfg.balance, cfg.backlog, cfg.answer_timeout) == ("sticky", 64, 0.5)
    with pytest.raises(ConfigError, match="backlog"):
        build_relay_config({"backlog": 0}, None, flags)
    assert {"balance", "backlog", "answer_timeout"} <= {s.name for s in RELAY_TABLE}


# ---------------------------------------------------------------- reconnect policy


def test_reconnect_after_a_session_is_immediate_once_per_cap() -> None:
    b = Backoff(0.5, 4.0, uniform=lambda lo, hi: hi)
    b.next_delay()
    b.next_delay()
    assert b.after_session(now=100.0) == 0.0  # the session had been up: at once
    assert b.attempt == 0
    # Another session ending within the cap: ordinary backoff (no tight loop).
    assert b.after_session(now=101.0) == 0.5
    assert b.after_session(now=102.0) == 1.0
    # Once the cap has passed since the last immediate reconnect: at once again.
    assert b.after_session(now=104.0) == 0.0


# ---------------------------------------------------------------- the pool


@contextlib.asynccontextmanager
async def _sessions(n: int) -> AsyncIterator[list[SessionHandle]]:
    """``n`` real relay-side session handles over the memory transport."""
    handles: list[SessionHandle] = []
    peers: list[SessionHandle] = []
    for _ in range(n):
        client, server = connection_pair()
        relay_side, edge_side = await asyncio.gather(
            Session(server, Role.SERVER).start(), Session(client, Role.CLIENT).start()
        )
        handles.append(relay_side)
        peers.append(edge_side)
    try:
        yield handles
    finally:
        for h in (*handles, *peers):
            with contextlib.suppress(Exception):
                await h.close()


async def _until_waiting(pool: Pool, waiter: asyncio.Task[Replica]) -> None:
    """Yield (at most 100 loop turns) until ``waiter`` waits in ``pool``; it must not
    have finished (a name refused at once would have)."""
    for _ in range(100):
        if pool.waiting or waiter.done():
            break
        await asyncio.sleep(0)
    assert not waiter.done() and pool.waiting == 1


def _replica(handle: SessionHandle, i: int) -> Replica:
    return Replica(
        name="edgeA",
        handle=handle,
        connection=handle.connection,
        address=f"10.0.0.{i}:4000",
        instance=f"inst{i}",
    )


async def test_sticky_is_consistent_and_moves_only_the_lost_replicas_clients() -> None:
    async with _sessions(3) as handles:
        pool = Pool("edgeA", max_streams=100, max_queued=10)
        replicas = [_replica(h, i) for i, h in enumerate(handles)]
        for r in replicas:
            pool.add(r)
        clients = [f"192.0.2.{i}" for i in range(200)]
        first = {c: pool.pick(balance="sticky", client=c) for c in clients}
        assert {c: pool.pick(balance="sticky", client=c) for c in clients} == first
        counts = [list(first.values()).count(r) for r in replicas]
        assert all(c > 30 for c in counts), counts  # every replica gets a share
        lost = replicas[0]
        pool.remove(lost)
        after = {c: pool.pick(balance="sticky", client=c) for c in clients}
        moved = [c for c in clients if after[c] is not first[c]]
        assert moved and all(first[c] is lost for c in moved)


async def test_least_streams_alternates_and_avoids_a_suspect() -> None:
    async with _sessions(2) as handles:
        pool = Pool("edgeA", max_streams=100, max_queued=10)
        a, b = (_replica(h, i) for i, h in enumerate(handles))
        pool.add(a)
        pool.add(b)
        deadline = asyncio.get_running_loop().time() + SHORT
        got = [await pool.acquire(set(), deadline) for _ in range(4)]
        for r in got:
            pool.release(r)
        assert got.count(a) == got.count(b) == 2
        pool.suspected(a, True)
        assert {pool.pick() for _ in range(3)} == {b}
        # Only suspects left: they are still used (better than failing the client).
        assert pool.pick(exclude={b}) is a
        pool.suspected(a, False)


async def test_bridging_waits_for_a_replica_of_a_seen_name_only() -> None:
    async with _sessions(2) as handles:
        registry = EdgeRegistry(max_streams=10, max_queued=10)
        loop = asyncio.get_running_loop()
        never = registry.pool("ghost")
        with pytest.raises(Unavailable, match="never connected"):
            await never.acquire(set(), loop.time() + SHORT)
        first = _replica(handles[0], 0)
        registry.add(first)
        registry.remove(first)  # the name's only replica is gone
        pool = registry.pool("edgeA")
        waiter = asyncio.create_task(pool.acquire(set(), loop.time() + 50 * SHORT))
        await _until_waiting(pool, waiter)
        second = _replica(handles[1], 1)
        registry.add(second)  # a restarted edge joins: the waiting client gets it
        async with asyncio.timeout(SHORT):
            assert await waiter is second
        pool.release(second)
        registry.remove(second)
        with pytest.raises(Unavailable, match=r"no replica \(re\)connected in time"):
            await pool.acquire(set(), loop.time() + 20 * MS)


async def test_startup_grace_bridges_names_not_seen_yet() -> None:
    """During the relay's startup grace a name that has not connected yet is bridged
    like a seen one; pools made after the grace fail at once again."""
    async with _sessions(1) as handles:
        registry = EdgeRegistry(max_streams=10, max_queued=10)
        loop = asyncio.get_running_loop()
        registry.grace_until = loop.time() + 50 * SHORT
        pool = registry.pool("edgeA")  # its edge has not connected yet
        waiter = asyncio.create_task(pool.acquire(set(), loop.time() + 50 * SHORT))
        await _until_waiting(pool, waiter)
        late = _replica(handles[0], 0)
        registry.add(late)
        async with asyncio.timeout(SHORT):
            assert await waiter is late
        pool.release(late)
        # Nobody comes: the client is closed at its deadline, saying why.
        quiet = registry.pool("quiet")
        with pytest.raises(Unavailable, match="did not connect in time since the relay"):
            await quiet.acquire(set(), loop.time() + 20 * MS)
        registry.grace_until = loop.time()  # the grace is over
        with pytest.raises(Unavailable, match="never connected"):
            await registry.pool("after").acquire(set(), loop.time() + 50 * SHORT)


async def test_tried_live_replicas_fail_at_once_but_a_draining_one_is_bridged() -> None:
    async with _sessions(1) as handles:
        pool = Pool("edgeA", max_streams=10, max_queued=10)
        only = _replica(handles[0], 0)
        pool.add(only)
        loop = asyncio.get_running_loop()
        with pytest.raises(Unavailable, match="no other replica"):
            await pool.acquire({only}, loop.time() + 50 * SHORT)
        only.draining = True  # it said "stopping": wait for its successor instead
        with pytest.raises(Unavailable, match=r"\(re\)connected in time"):
            await pool.acquire({only}, loop.time() + 20 * MS)

"""``--stack auto`` on the edge (tunnel/edge.py), in-process over the memory transport
with injected path statistics (no clock, no network loss): the lossy-path decision of
``tunnel/losshint.py`` switches the relay's session to aioquic make-before-break (a
second session under a new instance id, the old one drains until its last connection
ends, then closes); without aioquic ``auto`` is qh3 and says so once.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path
from typing import Any

import pytest

from quic_reverse.errors import ConfigError
from quic_reverse.transport.base import Connection, PathStats
from quic_reverse.tunnel import api, losshint
from quic_reverse.tunnel.auth import generate_token, write_token_file
from quic_reverse.tunnel.config import build_edge_config, build_relay_config
from quic_reverse.tunnel.reload import checked_edge

from ..support.timing import LONG, MS
from .test_inprocess import Setup, echo_service, relay_setup, until

EDGE_LOG = "quic_reverse.tunnel.edge"
HINT_LOG = "quic_reverse.tunnel.losshint"


def stats(sent: int, lost: int, cc: str) -> PathStats:
    return PathStats(smoothed_rtt=0.02, packets_sent=sent, packets_lost=lost, congestion_control=cc)


def lossy_qh3() -> Any:
    """Path statistics of a qh3 session losing 2 % of every window."""
    reads = [0]

    def read() -> PathStats:
        reads[0] += 1
        return stats(2000 * reads[0], 40 * reads[0], "qh3-reno")

    return read


class Dialer:
    """Stands in for ``Edge._connect``: each dial is a new memory link the relay
    serves, on the delivery-rate controller (as aioquic is)."""

    def __init__(self, setup: Setup) -> None:
        self.setup = setup
        self.stacks: list[str] = []
        self.conns: list[Connection] = []

    async def __call__(self, host: str, port: int, stack: str = "qh3") -> Connection:
        self.stacks.append(stack)
        client, _server = self.setup.link()
        client.path_stats = lambda: stats(1000, 20, "quic-reverse-bbr")
        self.conns.append(client)
        return client  # type: ignore[no-any-return]


class Echo:
    """A TCP client through the relay's forward, kept open for round trips."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> Echo:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    async def roundtrip(self, payload: bytes) -> None:
        async with asyncio.timeout(LONG):
            self.writer.write(payload)
            assert await self.reader.readexactly(len(payload)) == payload

    async def close(self) -> None:
        self.writer.write_eof()
        async with asyncio.timeout(LONG):
            assert await self.reader.read() == b""
        self.writer.close()


def infos(caplog: pytest.LogCaptureFixture, name: str, level: int = logging.INFO) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == name and r.levelno == level]


async def test_auto_switches_to_aioquic_make_before_break(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    monkeypatch.setattr(losshint, "MIN_SECONDS", 0.0)
    monkeypatch.setattr(losshint, "CHECK_INTERVAL", 0.0)
    async with relay_setup(tmp_path) as setup, echo_service() as (echo_port, conns):
        client, server = setup.link()
        client.path_stats = lossy_qh3()
        dialer = Dialer(setup)
        edge = setup.edge_on((client, server), {"echo": echo_port}, stack="auto")
        monkeypatch.setattr(edge, "_connect", dialer)
        pool = setup.pool()
        await until(pool, lambda: len(pool.replicas) == 1)
        old = pool.replicas[0]
        assert old.instance == edge.instance
        port = setup.port()
        # A long-lived connection from before the switch.
        early = await Echo.open(port)
        await early.roundtrip(b"before" * 1000)
        await until(pool, lambda: old.active == 1)
        # Keep-alive traffic lets the edge judge the path: 2 % loss -> switch.
        async with asyncio.timeout(LONG):
            while len(pool.replicas) < 2:
                await old.handle.ping()
                await asyncio.sleep(MS)
        new = pool.replicas[1]
        assert dialer.stacks == ["aioquic"]
        assert new.instance is not None and new.instance != old.instance  # a replica
        assert not old.retired and not old.handle.is_closed  # not replaced
        (switched,) = [m for m in infos(caplog, EDGE_LOG) if "switched to aioquic" in m]
        assert "relay 127.0.0.1:1: switched to aioquic: 2.0% of QUIC packets lost" in switched
        assert "qh3-reno" in switched and "1 running stay on the qh3 session" in switched
        assert infos(caplog, HINT_LOG, logging.WARNING) == []  # auto acts instead of warning
        await early.roundtrip(b"during" * 1000)
        # New connections: the first goes to the new replica (fewer streams), the second
        # is offered to the old one on a tie, which answers "stopping": the relay marks
        # it draining and retries on the new replica.
        late = [await Echo.open(port), await Echo.open(port)]
        for i, conn in enumerate(late):
            await conn.roundtrip(b"after %d" % i)
        assert old.draining
        assert (old.active, new.active) == (1, 2)
        await early.roundtrip(b"still" * 1000)
        assert conns.now == 3
        # The old session lives until its last connection ends, then closes gracefully.
        assert client.is_open
        await early.close()
        await until(pool, lambda: old not in pool.replicas)
        async with asyncio.timeout(LONG):
            await client.wait_closed()
        assert any("drained qh3 session is closed" in m for m in infos(caplog, EDGE_LOG))
        for conn in late:
            await conn.roundtrip(b"on the new session")
            await conn.close()
        assert pool.replicas == [new] and not new.handle.is_closed
        assert edge._stacks[("127.0.0.1", 1)] == "aioquic"  # sticky for reconnects
        assert edge._instances[("127.0.0.1", 1)] == new.instance
        edge.stop()


async def test_auto_does_not_switch_on_a_clean_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    monkeypatch.setattr(losshint, "MIN_SECONDS", 0.0)
    monkeypatch.setattr(losshint, "CHECK_INTERVAL", 0.0)
    async with relay_setup(tmp_path) as setup, echo_service() as (echo_port, _):
        client, server = setup.link()
        reads = [0]

        def clean() -> PathStats:
            reads[0] += 1
            return stats(2000 * reads[0], reads[0], "qh3-reno")  # 0.05 %

        client.path_stats = clean
        dialer = Dialer(setup)
        edge = setup.edge_on((client, server), {"echo": echo_port}, stack="auto")
        monkeypatch.setattr(edge, "_connect", dialer)
        pool = setup.pool()
        await until(pool, lambda: len(pool.replicas) == 1)
        for _ in range(20):
            await pool.replicas[0].handle.ping()
        assert reads[0] >= 10  # judged, window after window
        assert dialer.stacks == [] and len(pool.replicas) == 1
        assert not any("switched" in m for m in infos(caplog, EDGE_LOG))
        edge.stop()


async def test_a_failed_switch_keeps_the_old_session(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    monkeypatch.setattr(losshint, "MIN_SECONDS", 0.0)
    monkeypatch.setattr(losshint, "CHECK_INTERVAL", 0.0)
    async with relay_setup(tmp_path) as setup, echo_service() as (echo_port, _):
        client, server = setup.link()
        client.path_stats = lossy_qh3()
        attempts: list[str] = []

        async def unreachable(host: str, port: int, stack: str = "qh3") -> Connection:
            attempts.append(stack)
            raise OSError("network unreachable")

        edge = setup.edge_on((client, server), {"echo": echo_port}, stack="auto")
        monkeypatch.setattr(edge, "_connect", unreachable)
        pool = setup.pool()
        await until(pool, lambda: len(pool.replicas) == 1)
        async with asyncio.timeout(LONG):
            while len(attempts) < 2:  # judged again after another window, tried again
                await pool.replicas[0].handle.ping()
                await asyncio.sleep(MS)
        failed = infos(caplog, EDGE_LOG, logging.WARNING)
        assert failed and "switching to aioquic failed (network unreachable)" in failed[0]
        assert len(pool.replicas) == 1 and pool.replicas[0].live
        await pool.replicas[0].handle.ping()
        edge.stop()


async def test_auto_without_aioquic_is_qh3_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    monkeypatch.setitem(sys.modules, "aioquic", None)  # import fails, find_spec -> None
    monkeypatch.setattr(losshint, "MIN_SECONDS", 0.0)
    monkeypatch.setattr(losshint, "CHECK_INTERVAL", 0.0)
    async with relay_setup(tmp_path) as setup, echo_service() as (echo_port, _):
        client, server = setup.link()
        client.path_stats = lossy_qh3()
        dialer = Dialer(setup)
        edge = setup.edge_on((client, server), {"echo": echo_port}, stack="auto")
        monkeypatch.setattr(edge, "_connect", dialer)
        said = [m for m in infos(caplog, EDGE_LOG) if "aioquic is not installed" in m]
        assert len(said) == 1 and "stays on qh3" in said[0]
        assert edge._stacks == {("127.0.0.1", 1): "qh3"}
        pool = setup.pool()
        await until(pool, lambda: len(pool.replicas) == 1)
        async with asyncio.timeout(LONG):
            while not infos(caplog, HINT_LOG, logging.WARNING):
                await pool.replicas[0].handle.ping()
                await asyncio.sleep(MS)
        # The ordinary hint (naming the remedy), and no switch.
        (hint,) = infos(caplog, HINT_LOG, logging.WARNING)
        assert "--stack aioquic" in hint
        for _ in range(5):
            await pool.replicas[0].handle.ping()
        assert dialer.stacks == [] and len(pool.replicas) == 1
        edge.stop()


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


def test_auto_is_an_edge_setting_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert build_edge_config({}, None, _edge_flags(stack="auto")).stack == "auto"
    assert build_edge_config({"stack": "auto"}, None, _edge_flags()).stack == "auto"
    assert build_edge_config({}, None, _edge_flags()).stack == "auto"  # the default
    assert build_edge_config({}, None, _edge_flags(stack="qh3")).stack == "qh3"
    with pytest.raises(ConfigError, match="stack"):
        build_edge_config({}, None, _edge_flags(stack="fastest"))
    relay = {"tokens": "/tmp/tokens.toml", "self_signed": True, "stack": "auto"}
    with pytest.raises(ConfigError, match="stack"):
        build_relay_config({}, None, relay)
    # The start-up check passes without aioquic (auto then stays on qh3).
    token = tmp_path / "edge.token"
    write_token_file(token, generate_token())
    monkeypatch.setitem(sys.modules, "aioquic", None)
    cfg = build_edge_config({}, None, _edge_flags(stack="auto", token_file=str(token)))
    with pytest.raises(ConfigError, match="aioquic"):
        checked_edge(
            build_edge_config({}, None, _edge_flags(stack="aioquic", token_file=str(token)))
        )
    assert checked_edge(cfg)
    # The library API shares the settings: auto there too.
    api_edge = api.Edge(
        relay="127.0.0.1:4433",
        name="edgeA",
        token_file=token,
        expose=["ssh=127.0.0.1:22"],
        fingerprint="ab" * 32,
        stack="auto",
    )
    assert api_edge.config.stack == "auto" and not api_edge.runner._auto


async def test_stopping_while_a_switched_session_drains(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stop during the drain: the old session's running connection gets the grace
    period like any other, then both sessions close; nothing is left running."""
    monkeypatch.setattr(losshint, "MIN_SECONDS", 0.0)
    monkeypatch.setattr(losshint, "CHECK_INTERVAL", 0.0)
    async with relay_setup(tmp_path) as setup, echo_service() as (echo_port, conns):
        client, server = setup.link()
        client.path_stats = lossy_qh3()
        dialer = Dialer(setup)
        edge = setup.edge_on((client, server), {"echo": echo_port}, stack="auto", grace=200 * MS)
        monkeypatch.setattr(edge, "_connect", dialer)
        pool = setup.pool()
        await until(pool, lambda: len(pool.replicas) == 1)
        old = pool.replicas[0]
        early = await Echo.open(setup.port())
        await early.roundtrip(b"before")
        async with asyncio.timeout(LONG):
            while len(pool.replicas) < 2:
                await old.handle.ping()
                await asyncio.sleep(MS)
        (drain,) = edge._drains
        await early.roundtrip(b"during")
        edge.stop()
        async with asyncio.timeout(LONG):
            await drain  # the grace passes with the connection still open
            await client.wait_closed()
            await dialer.conns[0].wait_closed()
            await conns.none.wait()
        assert not edge._drains and not edge._draining and not edge._kept
        await until(pool, lambda: not pool.replicas)
        early.writer.close()

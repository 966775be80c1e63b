"""The lossy-path hint (``tunnel/losshint.py``), driven by injected path statistics and
injected times (no clock, no network), then wired into an in-process relay and edge.

A session on qh3's loss-based controller that loses >= 0.5 % of >= 1,000 packets over
>= 10 s gets exactly one warning naming the loss, the RTT and ``--stack aioquic``; a
clean window, a too-short or too-quiet window, a delivery-rate controller and a
transport without statistics get none.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from quic_reverse.transport.base import PathStats
from quic_reverse.tunnel import losshint
from quic_reverse.tunnel import relay as relay_module
from quic_reverse.tunnel.losshint import HintLimiter, LossHint

from ..support.timing import LONG
from .test_inprocess import relay_setup, until

LOGGER = "quic_reverse.tunnel.losshint"


def qh3(sent: int, lost: int, rtt: float | None = 0.05, cc: str = "qh3-reno") -> PathStats:
    return PathStats(smoothed_rtt=rtt, packets_sent=sent, packets_lost=lost, congestion_control=cc)


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING
    ]


def test_sustained_loss_warns_once_with_ratio_rtt_and_remedy(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, LOGGER)
    hint = LossHint("relay 192.0.2.1:4433")
    assert hint.observe(qh3(100, 0), now=1000.0) is None  # opens the window
    # 12 s and 2,000 packets later, 24 of them lost: 1.2 %.
    message = hint.observe(qh3(2100, 24, rtt=0.0512), now=1012.0)
    assert message is not None
    assert warnings(caplog) == [message]
    assert message.startswith("relay 192.0.2.1:4433: 1.2% of QUIC packets lost")
    assert "(24 of 2,000 in the last 12 s)" in message
    assert "RTT 51 ms" in message
    assert "--stack aioquic" in message and "docs/TUNNEL.md" in message
    # One line per session: more loss later says nothing more.
    assert hint.observe(qh3(9100, 500), now=1100.0) is None
    assert hint.observe(qh3(20100, 2000), now=1200.0) is None
    assert len(warnings(caplog)) == 1


def test_clean_window_does_not_warn(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, LOGGER)
    hint = LossHint("relay 192.0.2.1:4433")
    hint.observe(qh3(0, 0), now=0.0)
    # 0.4 % over 5,000 packets: below the threshold; each window judged on its own.
    for i in range(1, 6):
        assert hint.observe(qh3(5000 * i, 20 * i), now=10.0 * i) is None
    assert not hint.done
    assert warnings(caplog) == []
    # The next window crosses it: the hint is about recent loss, not the lifetime.
    assert hint.observe(qh3(30000, 100 + 60), now=60.0) is not None


def test_window_needs_both_packets_and_time(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, LOGGER)
    hint = LossHint("edge 'office' (198.51.100.2:50123)")
    hint.observe(qh3(0, 0), now=0.0)
    # 5 % loss, many packets, but only 9 s: not yet.
    assert hint.observe(qh3(50000, 2500), now=9.0) is None
    # 5 % loss for 30 s, but only 500 packets: a quiet path, not judged yet.
    quiet = LossHint("relay quiet")
    quiet.observe(qh3(0, 0), now=0.0)
    assert quiet.observe(qh3(500, 25), now=30.0) is None
    assert warnings(caplog) == []
    # Both conditions met: the first hint fires (window 0..10 s, 50,100 packets).
    assert hint.observe(qh3(50100, 2505), now=10.0) is not None
    assert len(warnings(caplog)) == 1


def test_quiet_window_restarts_instead_of_judging_old_packets() -> None:
    hint = LossHint("relay quiet")
    hint.observe(qh3(0, 0), now=0.0)
    # 600 packets with 60 lost long ago: the window runs out (MAX_SECONDS) unjudged ...
    assert hint.observe(qh3(600, 60), now=losshint.MAX_SECONDS + 1) is None
    # ... so 1,000 clean packets later there is nothing to say.
    assert hint.observe(qh3(1600, 60), now=losshint.MAX_SECONDS + 20) is None
    assert not hint.done


@pytest.mark.parametrize("cc", ["quic-reverse-bbr", None])
def test_never_for_a_delivery_rate_controller_or_without_statistics(
    cc: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, LOGGER)
    hint = LossHint("relay 192.0.2.1:4433")
    for i in range(5):
        stats = PathStats(
            smoothed_rtt=0.05,
            packets_sent=10000 * i if cc else None,
            packets_lost=1000 * i if cc else None,
            congestion_control=cc,
        )
        assert hint.observe(stats, now=20.0 * i) is None
    assert hint.done  # decided for good: never read again
    assert warnings(caplog) == []


def test_poll_reads_statistics_at_most_every_check_interval() -> None:
    reads: list[float] = []

    def read() -> PathStats:
        reads.append(now)
        return qh3(len(reads) * 1000, 0)

    hint = LossHint("relay 192.0.2.1:4433", check_interval=5.0)
    for step in range(200):  # an event every 0.1 s for 20 s
        now = step * 0.1
        hint.poll(read, now)
    assert reads == pytest.approx([0.0, 5.0, 10.0, 15.0])


def test_same_peer_is_hinted_once_per_limiter_interval(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, LOGGER)
    limiter = HintLimiter(repeat_after=3600.0)

    def lossy_session(key: str, start: float) -> str | None:
        hint = LossHint(f"edge {key!r} (a new address)", key=key, limiter=limiter)
        hint.observe(qh3(0, 0), now=start)
        return hint.observe(qh3(2000, 100), now=start + 10)

    assert lossy_session("office", 0.0) is not None
    assert lossy_session("office", 100.0) is not None  # judged, but logged at debug
    assert lossy_session("depot", 200.0) is not None
    assert lossy_session("office", 3700.0) is not None  # an hour later: again
    logged = warnings(caplog)
    assert [m.split(" (")[0] for m in logged] == ["edge 'office'", "edge 'depot'", "edge 'office'"]
    debug = [r for r in caplog.records if r.name == LOGGER and r.levelno == logging.DEBUG]
    assert len(debug) == 1 and "already said" in debug[0].getMessage()


async def test_relay_and_edge_hint_from_their_session_loops(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Wiring: both ends judge their session's path when a control event (here a
    protocol ping, as keep-alive sends) passes their event loop; 2 % loss on a
    loss-based controller gives one warning on each side, naming the peer."""
    caplog.set_level(logging.INFO, LOGGER)
    monkeypatch.setattr(losshint, "MIN_SECONDS", 0.0)
    monkeypatch.setattr(losshint, "CHECK_INTERVAL", 0.0)
    async with relay_setup(tmp_path) as setup:
        client, server = setup.link()
        reads = {"client": 0, "server": 0}

        def growing(side: str) -> PathStats:
            reads[side] += 1
            n = reads[side]
            return qh3(2000 * n, 40 * n)  # 2 % of every window

        client.path_stats = lambda: growing("client")
        server.path_stats = lambda: growing("server")
        # Pinned to qh3: an edge on auto (the default) acts instead of warning.
        setup.edge_on((client, server), {"echo": 9}, stack="qh3")
        pool = setup.pool()
        await until(pool, lambda: bool(pool.replicas))
        relay_handle = pool.replicas[0].handle
        async with asyncio.timeout(LONG):
            for _ in range(20):
                if len(warnings(caplog)) >= 2:
                    break
                await relay_handle.ping()  # a Pong on the relay, a Ping on the edge
                await asyncio.sleep(0)  # the edge's loop takes its event
        logged = sorted(warnings(caplog))
        assert logged[0].startswith("edge 'edgeA' (memory:0): 2.0% of QUIC packets lost")
        assert logged[1].startswith("relay 127.0.0.1:1: 2.0% of QUIC packets lost")
        for _ in range(3):
            await relay_handle.ping()
        assert len(warnings(caplog)) == 2  # one per session


async def test_relay_does_not_judge_a_session_its_edge_is_draining(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An edge on --stack auto (the default) that switched away from a lossy session
    drains it; the relay does not warn about that session, and judges over a longer
    window than the edge (RELAY_HINT_FACTOR) so such an edge acts first."""
    assert relay_module.RELAY_HINT_FACTOR > 1
    caplog.set_level(logging.INFO, LOGGER)
    monkeypatch.setattr(losshint, "MIN_SECONDS", 0.0)
    monkeypatch.setattr(losshint, "CHECK_INTERVAL", 0.0)
    async with relay_setup(tmp_path) as setup:
        client, server = setup.link()
        reads = [0]

        def growing() -> PathStats:
            reads[0] += 1
            return qh3(2000 * reads[0], 40 * reads[0])  # 2 % of every window

        server.path_stats = growing
        setup.edge_on((client, server), {"echo": 9}, stack="qh3")
        pool = setup.pool()
        await until(pool, lambda: bool(pool.replicas))
        replica = pool.replicas[0]

        def relay_warnings() -> list[str]:
            return [m for m in warnings(caplog) if m.startswith("edge ")]

        replica.draining = True  # the edge answered "stopping": it switched away
        for _ in range(5):
            await replica.handle.ping()
        assert not relay_warnings()
        replica.draining = False  # the same session, judged: it is lossy
        async with asyncio.timeout(LONG):
            for _ in range(20):
                if relay_warnings():
                    break
                await replica.handle.ping()
        assert len(relay_warnings()) == 1

"""Per-session QUIC path statistics in ``/metrics`` and ``/status.json`` of a real relay
and edge (CLI subprocesses on 127.0.0.1), for each QUIC stack: the series exist with
the session's labels, move with traffic, name the congestion controller, and go away
with the session (one series per connected session, nothing more).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from ..support.timing import LONG
from ._procs import Proc, Services, start_edge, start_relay, start_services
from .test_ops import _metrics_port, _samples, _tokens, _until, echo, http_get

pytestmark = pytest.mark.subprocess

CONTROLLERS = {"qh3": "qh3-reno", "aioquic": "quic-reverse-bbr"}
PAYLOAD = 256 * 1024

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture(scope="module")
def services() -> Iterator[Services]:
    svc = start_services()
    try:
        yield svc
    finally:
        svc.proc.kill()


def _path_series(samples: Samples) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """``quic_reverse_session_path_*`` samples by name, then labels."""
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for (name, labels), value in samples.items():
        if name.startswith("quic_reverse_session_path_"):
            out.setdefault(name, {})[labels] = value
    return out


def _check_session(
    series: dict[str, dict[tuple[tuple[str, str], ...], float]],
    labels: tuple[tuple[str, str], ...],
    stack: str,
) -> None:
    def value(name: str) -> float:
        assert labels in series.get(name, {}), (name, labels, series.get(name))
        return series[name][labels]

    assert 0 < value("quic_reverse_session_path_rtt_seconds") < LONG
    assert value("quic_reverse_session_path_congestion_window_bytes") > 0
    assert value("quic_reverse_session_path_bytes_in_flight") >= 0
    assert value("quic_reverse_session_path_max_datagram_size_bytes") >= 1200
    sent = value("quic_reverse_session_path_packets_sent_total")
    lost = value("quic_reverse_session_path_packets_lost_total")
    assert sent > 0 and 0 <= lost <= sent
    assert value("quic_reverse_session_path_probe_timeouts_total") >= 0
    assert value("quic_reverse_session_path_loss_ratio") == pytest.approx(lost / sent)
    controller = (*labels, ("congestion_control", CONTROLLERS[stack]))
    controller = tuple(sorted(controller))
    assert series["quic_reverse_session_path_congestion_control"] == {controller: 1.0}


@pytest.mark.parametrize("stack", ["qh3", "aioquic"])
async def test_path_statistics_per_session_in_metrics_and_status(
    stack: str, services: Services, tmp_path: Path
) -> None:
    _tokens(tmp_path, ["edgeA"])
    relay = start_relay(
        tmp_path / "state",
        tmp_path / "tokens.toml",
        ["127.0.0.1:0=edgeA/echo"],
        extra=["--metrics", "127.0.0.1:0", "--stack", stack],
    )
    edge: Proc | None = None
    try:
        rport = _metrics_port(relay.proc)
        edge = start_edge(
            "edgeA",
            tmp_path / "edgeA.token",
            relay,
            [f"echo=127.0.0.1:{services.echo}"],
            extra=["--metrics", "127.0.0.1:0", "--stack", stack],
        )
        eport = _metrics_port(edge)
        payload = os.urandom(PAYLOAD)
        assert await echo(relay.forwards["edgeA/echo"], payload) == payload

        rseries = _path_series(_samples((await http_get(rport, "/metrics"))[1]))
        (edge_labels,) = rseries["quic_reverse_session_path_rtt_seconds"]
        assert dict(edge_labels)["edge"] == "edgeA" and dict(edge_labels)["instance"]
        _check_session(rseries, edge_labels, stack)
        # The relay sent the echoed payload back: at least that many bytes of packets.
        mtu = rseries["quic_reverse_session_path_max_datagram_size_bytes"][edge_labels]
        sent = rseries["quic_reverse_session_path_packets_sent_total"][edge_labels]
        assert sent >= PAYLOAD // mtu

        eseries = _path_series(_samples((await http_get(eport, "/metrics"))[1]))
        relay_labels = (("relay", f"127.0.0.1:{relay.quic_port}"),)
        assert list(eseries["quic_reverse_session_path_rtt_seconds"]) == [relay_labels]
        _check_session(eseries, relay_labels, stack)

        # Counters move with traffic.
        assert await echo(relay.forwards["edgeA/echo"], payload) == payload
        again = _path_series(_samples((await http_get(rport, "/metrics"))[1]))
        assert again["quic_reverse_session_path_packets_sent_total"][edge_labels] > sent

        # The status page's data carries the same figures.
        status = json.loads((await http_get(rport, "/status.json"))[1])
        (row,) = status["edges"]
        path = row["path"]
        assert path["congestion_control"] == CONTROLLERS[stack]
        assert 0 < path["rtt"] < LONG and path["cwnd"] > 0 and path["sent"] > 0
        assert 0 <= path["loss_ratio"] <= 1
        estatus = json.loads((await http_get(eport, "/status.json"))[1])
        assert estatus["relays"][0]["path"]["congestion_control"] == CONTROLLERS[stack]

        # One series per connected session: the edge leaves, its series go.
        assert edge.terminate() == 0

        async def gone() -> bool:
            text = (await http_get(rport, "/metrics"))[1]
            return not _path_series(_samples(text)).get("quic_reverse_session_path_rtt_seconds")

        await _until(gone)
        left = _path_series(_samples((await http_get(rport, "/metrics"))[1]))
        assert all(not rows for rows in left.values()), left
        assert relay.proc.terminate() == 0
    finally:
        if edge is not None:
            edge.kill()
        relay.proc.kill()

"""What relay and edge report about themselves: Prometheus metrics and the status page data.

The relay and the edge call a few hooks on an :class:`Observer` (a no-op by default,
so a tunnel without ``--metrics`` pays one empty method call per connection). With
``--metrics`` the observer is a :class:`RelayMetrics` or :class:`EdgeMetrics`: it keeps
plain integers per forward / service / edge and reads everything else (connected
edges, active streams) from the relay's or edge's own state *when it is scraped*, so
the forwarding path never touches a lock or a label lookup.

The exposition is ``prometheus_client``'s (a custom collector over a private
:class:`~prometheus_client.CollectorRegistry`, plus the standard process metrics).

Round-trip times are sampled on demand: a scrape (or status page refresh) starts one
protocol Ping on each session whose last sample is older than :data:`RTT_MAX_AGE` and
reports the latest finished sample, so nobody looking means no extra traffic.

Path statistics (``quic_reverse_session_path_*``: the QUIC stack's smoothed RTT,
congestion window, bytes in flight, packets sent and lost, loss ratio, controller) are
read from each session's :meth:`~quic_reverse.session.SessionHandle.path_stats` when
scraped: nothing is kept or computed between scrapes. One series per connected session
(an edge replica on the relay, a relay on the edge), like the RTT, so the number of
series is bounded by the sessions, not by traffic.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from .. import __version__
from ..errors import QuicReverseError
from ..session import SessionHandle
from ..transport.base import PathStats

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from .config import Forward
    from .edge import Edge
    from .registry import Replica
    from .relay import Relay

__all__ = ["RTT_MAX_AGE", "EdgeMetrics", "Observer", "RelayMetrics", "TunnelMetrics"]

#: A session's RTT sample older than this is refreshed by the next scrape (seconds).
RTT_MAX_AGE = 2.0
#: Deadline of one RTT ping (a slow answer is reported by keep-alive, not here).
RTT_PING_TIMEOUT = 5.0


class Observer:
    """Hooks the relay and the edge call; every one is a no-op here."""

    # relay
    def edge_up(self, replica: Replica) -> None:
        """An edge session authenticated (and was registered)."""

    def edge_down(self, replica: Replica) -> None:
        """An authenticated edge session ended."""

    def auth_failure(self) -> None:
        """A connection failed to authenticate (wrong token, timeout, malformed)."""

    def forward_opened(self, fwd: Forward) -> None:
        """A TCP client arrived on ``fwd``."""

    def forward_closed(
        self, fwd: Forward, replica: Replica | None, outcome: str, up: int, down: int
    ) -> None:
        """That client's connection ended (``replica`` is ``None`` if it never got a
        stream; ``up`` = client to service bytes)."""

    # edge
    def session_up(self, handle: SessionHandle, relay: str) -> None:
        """The edge authenticated to a relay."""

    def session_down(self, handle: SessionHandle) -> None:
        """That session ended."""

    def reconnect(self) -> None:
        """The edge is about to reconnect after losing (or failing to get) a session."""

    def service_opened(self, service: str) -> None:
        """The relay asked for ``service``."""

    def service_closed(self, service: str, outcome: str, up: int, down: int) -> None:
        """That request ended (``up`` = bytes from the relay's client to the service)."""


@dataclass
class Traffic:
    """Counters of one forward, service or session."""

    active: int = 0
    total: dict[str, int] = field(default_factory=dict)  # outcome -> count
    up: int = 0
    down: int = 0

    def closed(self, outcome: str, up: int, down: int) -> None:
        self.active -= 1
        self.total[outcome] = self.total.get(outcome, 0) + 1
        self.up += up
        self.down += down


@dataclass
class SessionInfo:
    """One session (an edge seen by the relay, a relay seen by the edge)."""

    handle: SessionHandle
    since: float  # wall clock
    up: int = 0
    down: int = 0
    rtt: float | None = None
    rtt_at: float = 0.0  # monotonic
    probe: asyncio.Task[None] | None = None


class TunnelMetrics(Observer):
    """The state shared by both roles: counters, RTT sampling, readiness, exposition."""

    role = "tunnel"

    def __init__(self) -> None:
        self.started = time.time()
        self.ready = False
        self.auth_failures = 0
        self.sessions: dict[object, SessionInfo] = {}
        self.registry = CollectorRegistry(auto_describe=False)
        ProcessCollector(registry=self.registry)
        self.registry.register(_Collector(self))

    # ------------------------------------------------------------------ exposition

    def exposition(self) -> bytes:
        """``/metrics`` in the Prometheus text format."""
        self.sample_rtt()
        return generate_latest(self.registry)

    def families(self) -> Iterator[Metric]:
        """The tunnel's metric families (collector ``collect``)."""
        rtt = GaugeMetricFamily(
            "quic_reverse_session_rtt_seconds",
            "Round-trip time of the session's last protocol ping",
            labels=self.rtt_labels(),
        )
        for key, info in self.sessions.items():
            if info.rtt is not None:
                rtt.add_metric(self.rtt_label_values(key), info.rtt)
        yield rtt
        yield from self.path_families()
        fails = CounterMetricFamily(
            "quic_reverse_auth_failures",
            "Authentications that failed (relay: rejected edges; edge: rejected by a relay)",
        )
        fails.add_metric([], self.auth_failures)
        yield fails

    def path_families(self) -> Iterator[Metric]:
        """Each session's QUIC path statistics, read now (one series per session)."""
        labels = self.rtt_labels()
        gauges = {
            attr: GaugeMetricFamily(name, text, labels=labels) for attr, name, text in _PATH_GAUGES
        }
        counters = {
            attr: CounterMetricFamily(name, text, labels=labels)
            for attr, name, text in _PATH_COUNTERS
        }
        ratio = GaugeMetricFamily(
            "quic_reverse_session_path_loss_ratio",
            "Packets lost / packets sent since the session's QUIC connection started",
            labels=labels,
        )
        controller = GaugeMetricFamily(
            "quic_reverse_session_path_congestion_control",
            "The session's congestion controller (value 1; qh3-reno is loss-based)",
            labels=[*labels, "congestion_control"],
        )
        for key, info in self.sessions.items():
            stats = info.handle.path_stats()
            values = self.rtt_label_values(key)
            for attr, gauge in gauges.items():
                value = getattr(stats, attr)
                if value is not None:
                    gauge.add_metric(values, value)
            for attr, counter in counters.items():
                value = getattr(stats, attr)
                if value is not None:
                    counter.add_metric(values, value)
            loss = stats.loss_ratio
            if loss is not None:
                ratio.add_metric(values, loss)
            if stats.congestion_control is not None:
                controller.add_metric([*values, stats.congestion_control], 1)
        yield from gauges.values()
        yield from counters.values()
        yield ratio
        yield controller

    def rtt_labels(self) -> list[str]:
        return []

    def rtt_label_values(self, key: object) -> list[str]:
        return []

    # ------------------------------------------------------------------ RTT

    def sample_rtt(self) -> None:
        """Start a ping on every session whose sample is stale (never waits)."""
        now = time.monotonic()
        for info in self.sessions.values():
            if info.probe is None and now - info.rtt_at > RTT_MAX_AGE:
                info.probe = asyncio.get_running_loop().create_task(self._probe(info))

    async def _probe(self, info: SessionInfo) -> None:
        try:
            async with asyncio.timeout(RTT_PING_TIMEOUT):
                info.rtt = await info.handle.ping()
        except (QuicReverseError, TimeoutError):
            pass
        finally:
            info.rtt_at = time.monotonic()
            info.probe = None

    def _forget(self, key: object) -> None:
        info = self.sessions.pop(key, None)
        if info is not None and info.probe is not None:
            info.probe.cancel()

    def close(self) -> None:
        """Cancel RTT probes still running (the process is stopping)."""
        for info in self.sessions.values():
            if info.probe is not None:
                with contextlib.suppress(RuntimeError):
                    info.probe.cancel()

    # ------------------------------------------------------------------ status

    def status(self) -> dict[str, Any]:
        """The status page's data (JSON-serialisable, nothing secret in it)."""
        self.sample_rtt()
        return {
            "role": self.role,
            "version": __version__,
            "started": self.started,
            "now": time.time(),
            "ready": self.is_ready(),
            "auth_failures": self.auth_failures,
        }

    def is_ready(self) -> bool:
        return self.ready

    def auth_failure(self) -> None:
        self.auth_failures += 1


#: (PathStats field, metric name, help) of the per-session path gauges and counters.
_PATH_GAUGES = (
    (
        "smoothed_rtt",
        "quic_reverse_session_path_rtt_seconds",
        "Smoothed round-trip time the QUIC stack measures on the session's path",
    ),
    (
        "congestion_window",
        "quic_reverse_session_path_congestion_window_bytes",
        "The session's QUIC congestion window",
    ),
    (
        "bytes_in_flight",
        "quic_reverse_session_path_bytes_in_flight",
        "Bytes sent on the session's path and not yet acknowledged or declared lost",
    ),
    (
        "max_datagram_size",
        "quic_reverse_session_path_max_datagram_size_bytes",
        "The UDP payload size the session's QUIC stack builds packets up to",
    ),
)
_PATH_COUNTERS = (
    (
        "packets_sent",
        "quic_reverse_session_path_packets_sent",
        "QUIC packets sent on the session's connection",
    ),
    (
        "packets_lost",
        "quic_reverse_session_path_packets_lost",
        "QUIC packets of the session's connection declared lost (and retransmitted)",
    ),
    (
        "pto_count",
        "quic_reverse_session_path_probe_timeouts",
        "QUIC probe timeouts on the session's connection",
    ),
)


def path_status(stats: PathStats) -> dict[str, Any]:
    """A session's path statistics for the status page (JSON-serialisable)."""
    return {
        "rtt": stats.smoothed_rtt,
        "cwnd": stats.congestion_window,
        "in_flight": stats.bytes_in_flight,
        "sent": stats.packets_sent,
        "lost": stats.packets_lost,
        "loss_ratio": stats.loss_ratio,
        "datagram": stats.max_datagram_size,
        "congestion_control": stats.congestion_control,
    }


def _outcome_families(
    name: str, label: str, rows: dict[str, Traffic]
) -> tuple[GaugeMetricFamily, CounterMetricFamily]:
    active = GaugeMetricFamily(
        "quic_reverse_tunnel_connections_active",
        "Tunnelled TCP connections in progress",
        labels=[label],
    )
    total = CounterMetricFamily(
        "quic_reverse_tunnel_connections",
        "Tunnelled TCP connections that ended, by outcome",
        labels=[label, "outcome"],
    )
    for key, t in rows.items():
        active.add_metric([key], t.active)
        for outcome, n in t.total.items():
            total.add_metric([key, outcome], n)
    return active, total


def _bytes_family(rows: dict[str, Traffic]) -> CounterMetricFamily:
    fam = CounterMetricFamily(
        "quic_reverse_tunnel_bytes",
        "Bytes carried by tunnelled connections that ended (up: client to service)",
        labels=["direction"],
    )
    fam.add_metric(["up"], sum(t.up for t in rows.values()))
    fam.add_metric(["down"], sum(t.down for t in rows.values()))
    return fam


class RelayMetrics(TunnelMetrics):
    """The relay's metrics and status (reads the relay's registry when scraped)."""

    role = "relay"

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.forwards: dict[Forward, Traffic] = {}
        super().__init__()

    def forward_label(self, fwd: Forward) -> str:
        host, port = self.relay.forward_addresses.get(fwd, (fwd.host, fwd.port))
        return f"{host}:{port}={fwd.edge}/{fwd.service}"

    def edge_up(self, replica: Replica) -> None:
        self.sessions[replica] = SessionInfo(replica.handle, time.time())

    def edge_down(self, replica: Replica) -> None:
        self._forget(replica)

    def forward_opened(self, fwd: Forward) -> None:
        t = self.forwards.get(fwd)
        if t is None:
            t = self.forwards[fwd] = Traffic()
        t.active += 1

    def forward_closed(
        self, fwd: Forward, replica: Replica | None, outcome: str, up: int, down: int
    ) -> None:
        self.forwards[fwd].closed(outcome, up, down)
        info = self.sessions.get(replica) if replica is not None else None
        if info is not None:
            info.up += up
            info.down += down

    def rtt_labels(self) -> list[str]:
        return ["edge", "instance"]

    def rtt_label_values(self, key: object) -> list[str]:
        replica: Replica = key  # type: ignore[assignment]
        return [replica.name, replica.instance or ""]

    def families(self) -> Iterator[Metric]:
        edges = GaugeMetricFamily(
            "quic_reverse_edges_connected",
            "Authenticated edge sessions (replicas), by edge name",
            labels=["edge"],
        )
        counts: dict[str, int] = {}
        for r in self.relay.registry:
            if r.live:
                counts[r.name] = counts.get(r.name, 0) + 1
        for name in sorted(self.relay.tokens.names):
            edges.add_metric([name], counts.get(name, 0))
        yield edges
        rows = {self.forward_label(f): Traffic() for f in self.relay.config.forwards}
        rows.update((self.forward_label(f), t) for f, t in self.forwards.items())
        yield from _outcome_families("forward", "forward", rows)
        yield _bytes_family(rows)
        yield from super().families()

    def status(self) -> dict[str, Any]:
        data = super().status()
        edges = []
        for r in self.relay.registry:
            info = self.sessions.get(r)
            edges.append(
                {
                    "name": r.name,
                    "instance": r.instance,
                    "address": r.address,
                    "since": info.since if info else None,
                    "rtt": info.rtt if info else None,
                    "path": path_status(r.handle.path_stats()),
                    "active": r.active,
                    "up": info.up if info else 0,
                    "down": info.down if info else 0,
                    "live": r.live,
                }
            )
        forwards = []
        for fwd in self.relay.config.forwards:
            t = self.forwards.get(fwd, Traffic())
            forwards.append(
                {
                    "forward": self.forward_label(fwd),
                    "edge": fwd.edge,
                    "service": fwd.service,
                    "active": t.active,
                    "total": sum(t.total.values()),
                    "outcomes": dict(t.total),
                    "up": t.up,
                    "down": t.down,
                }
            )
        data.update(edges=edges, forwards=forwards)
        return data


class EdgeMetrics(TunnelMetrics):
    """The edge's metrics and status."""

    role = "edge"

    def __init__(self, edge: Edge) -> None:
        self.edge = edge
        self.services: dict[str, Traffic] = {}
        self.reconnects = 0
        self.relays: dict[SessionHandle, str] = {}
        super().__init__()

    def session_up(self, handle: SessionHandle, relay: str) -> None:
        self.sessions[handle] = SessionInfo(handle, time.time())
        self.relays[handle] = relay

    def session_down(self, handle: SessionHandle) -> None:
        self._forget(handle)
        self.relays.pop(handle, None)

    def reconnect(self) -> None:
        self.reconnects += 1

    def service_opened(self, service: str) -> None:
        t = self.services.get(service)
        if t is None:
            t = self.services[service] = Traffic()
        t.active += 1

    def service_closed(self, service: str, outcome: str, up: int, down: int) -> None:
        self.services[service].closed(outcome, up, down)

    def is_ready(self) -> bool:
        return bool(self.relays)

    def rtt_labels(self) -> list[str]:
        return ["relay"]

    def rtt_label_values(self, key: object) -> list[str]:
        return [self.relays.get(key, "")]  # type: ignore[call-overload]

    def families(self) -> Iterator[Metric]:
        sessions = GaugeMetricFamily(
            "quic_reverse_relay_sessions_connected", "Authenticated sessions with relays"
        )
        sessions.add_metric([], len(self.relays))
        yield sessions
        rows = {e.service: Traffic() for e in self.edge.config.expose}
        rows.update(self.services)
        yield from _outcome_families("service", "service", rows)
        yield _bytes_family(rows)
        rec = CounterMetricFamily("quic_reverse_reconnects", "Reconnects to the relay")
        rec.add_metric([], self.reconnects)
        yield rec
        yield from super().families()

    def status(self) -> dict[str, Any]:
        data = super().status()
        data["name"] = self.edge.config.name
        data["instance"] = self.edge.instance
        data["reconnects"] = self.reconnects
        data["relays"] = [
            {
                "address": self.relays.get(info.handle, ""),
                "since": info.since,
                "rtt": info.rtt,
                "path": path_status(info.handle.path_stats()),
                "active": info.handle.active_streams,
            }
            for info in self.sessions.values()
        ]
        services = []
        for entry in self.edge.config.expose:
            t = self.services.get(entry.service, Traffic())
            services.append(
                {
                    "service": entry.service,
                    "target": f"{entry.host}:{entry.port}",
                    "active": t.active,
                    "total": sum(t.total.values()),
                    "outcomes": dict(t.total),
                    "up": t.up,
                    "down": t.down,
                }
            )
        data["services"] = services
        return data


class _Collector(Collector):
    def __init__(self, metrics: TunnelMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        yield from self.metrics.families()

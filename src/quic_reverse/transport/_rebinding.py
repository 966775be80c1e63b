"""qh3 servers and NAT rebinding: reach a peer whose address changed.

When a client's NAT mapping changes (same process, new source port), its packets
reach the server from a new address. RFC 9000 §9.3: the server must send to the new
address from then on, validating it with PATH_CHALLENGE and sending no more than three
times what it received from it until validated. qh3 2.1's native core detects the new
address and queues a PATH_CHALLENGE for it, but if it is congestion-limited at that
moment with stream data already reserved (which is the normal state after a rebinding:
everything it sent since the change went to the dead mapping and is never acknowledged),
``poll_transmit`` moves the challenge into the packet builder's shared queue and returns
early; the challenge then leaves in the next packet built, addressed to the *active*
path, the old address. No challenge ever reaches the new address, the path is never
validated, the core keeps sending to the dead mapping and the connection dies by idle
timeout (or its application's keep-alive) although the peer is alive and reachable.
``tests/transport/test_migration.py`` reproduces this with two bare qh3 connections.

:class:`FollowingQuicConnection` works around it without touching the core's path
logic: once the core *authenticated* packets from an address other than its active
path's (a forged or replayed datagram is not counted: the core drops it before path
handling), datagrams the core addresses to the old address go to the new one instead,
within the anti-amplification budget of RFC 9000 §8 (three times the bytes received
from the new address) but at least one datagram per authenticated datagram received
from it (the budget in datagrams; without it a challenge stranded in a full-size packet
would wait for many small packets from a silent peer). The challenge thus reaches the
peer, the peer answers, the core validates the new path and switches to it by itself;
from then on nothing is redirected. An authenticated packet from the active address
again ends the redirection (the peer did not move: reordering or a forwarded copy).

A limit this cannot lift: qh3's core keeps at most four paths per connection and never
frees one, so packets from a fifth address (the fourth change) are dropped unread and
the connection ends by idle timeout (the tunnel's edge then reconnects). Lifting it
would mean hiding every address change from the core and validating new addresses in
the adapter instead.
"""

from __future__ import annotations

import logging
from typing import Any

from qh3.quic.connection import QuicConnectionError

from .qh3 import _LimitedQuicConnection

__all__ = ["FollowingQuicConnection"]

logger = logging.getLogger("quic_reverse.transport.qh3")

#: RFC 9000 §8: bytes an endpoint may send to an unvalidated address per byte received.
AMPLIFICATION_FACTOR = 3


def _same(a: Any, b: Any) -> bool:
    """Same socket address (host and port; IPv6 flow info and scope ignored)."""
    return bool(a is not None and b is not None and tuple(a[:2]) == tuple(b[:2]))


class FollowingQuicConnection(_LimitedQuicConnection):
    """qh3 server connection that follows its peer to a new address (see the module
    docstring)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        #: The address the peer now sends from while the core still sends elsewhere.
        self._qr_follow: Any = None
        self._qr_follow_bytes = 0  # budget left, bytes
        self._qr_follow_datagrams = 0  # budget left, datagrams

    def _active_remote(self) -> Any:
        core = self._core
        return None if core is None else core.active_path[2]

    def qr_feed(self, datagrams: list[bytes], addr: Any, now: float) -> None:
        core = self._core
        if core is None or not self._handshake_complete:
            super().qr_feed(datagrams, addr, now)
            return
        # qh3's receive_many_datagrams without dropping the core's report, whose
        # third field counts the packets it authenticated and processed.
        address = self._normalize_address(addr)
        report = self._call_core(core.receive_many_datagrams, datagrams, address, now)
        self._drain_core()
        if not report[2]:
            return
        active = self._active_remote()
        if _same(address, active):
            if self._qr_follow is not None:
                logger.debug("qh3: peer on the core's path %s; not redirecting", active)
                self._qr_follow = None
            return
        if not _same(address, self._qr_follow):
            logger.debug("qh3: peer now sends from %s (core path: %s)", address, active)
            self._qr_follow = address
            self._qr_follow_bytes = 0
            self._qr_follow_datagrams = 0
        self._qr_follow_bytes += AMPLIFICATION_FACTOR * report[1]
        self._qr_follow_datagrams += min(report[0], report[2])

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Any]]:
        follow = self._qr_follow
        try:
            out = super().datagrams_to_send(now)
        except QuicConnectionError as exc:
            if follow is None or "capacity" not in exc.reason_phrase:
                raise
            # While the core probes the new path it builds for that path's small
            # anti-amplification allowance and fails when a queued frame is bigger;
            # nothing is lost for good (the frames stay queued). Expected here: not
            # worth the driver's warning.
            logger.debug("qh3: building for the new path to %s: %s", follow, exc)
            return []
        if follow is None or not out:
            return out
        active = self._active_remote()
        if _same(follow, active):
            logger.debug("qh3: path to %s validated", follow)
            self._qr_follow = None
            return out
        redirected: list[tuple[bytes, Any]] = []
        for data, addr in out:
            if _same(addr, active):
                if len(data) <= self._qr_follow_bytes:
                    self._qr_follow_bytes -= len(data)
                    addr = follow
                elif self._qr_follow_datagrams > 0:
                    self._qr_follow_datagrams -= 1
                    addr = follow
            redirected.append((data, addr))
        return redirected

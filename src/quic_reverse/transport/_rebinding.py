"""qh3 servers and NAT rebinding: reach a peer whose address changed.

When a client's NAT mapping changes (same process, new source port), its packets
reach the server from a new address. RFC 9000 §9.3: the server must send to the new
address from then on, after validating it, and send no more than three times what it
received from it until validated (§8). qh3 2.1's native core cannot be relied on for
this, for two reasons (``tests/transport/test_migration.py`` shows both with bare qh3
connections):

* it detects the new address and queues a PATH_CHALLENGE for it, but if it is
  congestion-limited at that moment with stream data already reserved (the normal
  state after a rebinding: everything it sent since the change went to the dead mapping
  and is never acknowledged), ``poll_transmit`` moves the challenge into the packet
  builder's shared queue and returns early; the challenge then leaves in the next
  packet built, addressed to the old path. The new address is never validated, the
  core keeps sending to the dead mapping and the connection dies, although the peer
  is alive and reachable;
* it keeps at most four paths per connection and never frees one: packets from a fifth
  address (the fourth change) are dropped unread.

:class:`FollowingQuicConnection` therefore keeps address changes away from the core
(it always sees the handshake address) and does the migration itself:

* a batch from another address whose packets the core *authenticated* (forged
  datagrams fail to decrypt and replayed ones are duplicates: neither counts) makes
  that address the *candidate*; the core is asked to send a PING;
* while a candidate is being validated, outgoing datagrams go to it within the
  anti-amplification budget (three times the bytes received from it, and at least one
  datagram per authenticated datagram from it, so a full-size packet is not held back
  by a silent peer's small ones) and are dropped beyond it (QUIC retransmits them); none
  go to the old address, so the PING can only have reached the peer *at the candidate*;
* the candidate is validated when the core reports that PING acknowledged by a packet
  from the candidate: the peer received what was sent only there. From then on every
  datagram goes to it. Unacknowledged, the PING is repeated (backing off) a few times,
  then the candidate is abandoned;
* an authenticated packet from the validated address ends the candidate (the peer did
  not move: reordering, or a copy forwarded by someone else, RFC 9000 §9.3.3).
"""

from __future__ import annotations

import logging
from typing import Any

from qh3.quic.events import PingAcknowledged

from .qh3 import _LimitedQuicConnection

__all__ = ["FollowingQuicConnection"]

logger = logging.getLogger("quic_reverse.transport.qh3")

#: RFC 9000 §8: bytes an endpoint may send to an unvalidated address per byte received.
AMPLIFICATION_FACTOR = 3
#: Validation PINGs sent to one candidate before it is abandoned (the peer neither
#: answers there nor speaks from its validated address: the connection is dying).
PROBE_ATTEMPTS = 10
#: Wait for a PING's acknowledgement before sending another (seconds), doubled with
#: every attempt up to PROBE_TIMEOUT_MAX. (A congestion-limited core may hold a PING
#: until its next probe timeout; any PING sent for a candidate validates it.)
PROBE_TIMEOUT = 0.05
PROBE_TIMEOUT_MAX = 2.0
#: Seconds after a move during which packets from the address the peer left do not
#: start a validation back to it (stragglers sent before the change).
MOVE_GRACE = 1.0


def _same(a: Any, b: Any) -> bool:
    """Same socket address (host and port; IPv6 flow info and scope ignored)."""
    return bool(a is not None and b is not None and tuple(a[:2]) == tuple(b[:2]))


class FollowingQuicConnection(_LimitedQuicConnection):
    """qh3 server connection that follows its peer to new addresses itself (see the
    module docstring)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        #: The handshake address: the only peer address the core ever sees.
        self._qr_core_addr: Any = None
        #: The validated address the peer is reached at.
        self._qr_peer: Any = None
        self._qr_moved = False  # the peer is not at the core's address any more
        #: An address the peer sends from, being validated (None: no migration).
        self._qr_candidate: Any = None
        self._qr_budget_bytes = 0
        self._qr_budget_datagrams = 0
        self._qr_probe_uids: set[int] = set()  # PINGs sent for the candidate
        self._qr_probe_attempts = 0
        self._qr_probe_deadline: float | None = None
        self._qr_next_uid = 1 << 40  # apart from any uid the application might use
        self._qr_left: Any = None  # the address the peer moved away from, and when
        self._qr_moved_at = 0.0
        #: Address changes validated (diagnostics, tests).
        self.qr_migrations = 0

    @property
    def qr_peer_address(self) -> Any:
        """The validated address the peer is reached at."""
        return self._qr_peer

    # -- receive -----------------------------------------------------------------

    def qr_feed(self, datagrams: list[bytes], addr: Any, now: float) -> None:
        core = self._core
        if core is None or not self._handshake_complete:
            super().qr_feed(datagrams, addr, now)
            if self._qr_core_addr is None and self._core is not None:
                self._qr_core_addr = self._qr_peer = self._normalize_address(addr)
            return
        address = self._normalize_address(addr)
        # qh3's receive_many_datagrams, always from the core's one address, keeping
        # the core's report (its third field counts the packets it authenticated).
        if self._quic_logger is not None:
            for data in datagrams:
                self._log_datagram("datagrams_received", data)
        before = len(self._events)
        report = self._call_core(core.receive_many_datagrams, datagrams, self._qr_core_addr, now)
        self._drain_core()
        if not report[2]:
            return
        if address == self._qr_peer or _same(address, self._qr_peer):
            if self._qr_candidate is not None:
                logger.debug("qh3: peer still at %s; %s abandoned", address, self._qr_candidate)
                self._end_probe()
            return
        if _same(address, self._qr_left) and now - self._qr_moved_at < MOVE_GRACE:
            return
        if not _same(address, self._qr_candidate):
            logger.debug("qh3: peer sends from %s (was %s): validating", address, self._qr_peer)
            self._end_probe()
            self._qr_candidate = address
        self._qr_budget_bytes += AMPLIFICATION_FACTOR * report[1]
        self._qr_budget_datagrams += min(report[0], report[2])
        if self._probe_acknowledged(before):
            logger.info("qh3: peer moved from %s to %s", self._qr_peer, address)
            self._qr_left, self._qr_moved_at = self._qr_peer, now
            self._qr_peer = address
            self._qr_moved = not _same(address, self._qr_core_addr)
            self.qr_migrations += 1
            self._end_probe()
        elif not self._qr_probe_uids and self._close_event is None:
            self._probe(now)

    def _probe_acknowledged(self, first_event: int) -> bool:
        """Did the batch just fed acknowledge a PING sent for the candidate?"""
        uids = self._qr_probe_uids
        return bool(uids) and any(
            isinstance(event, PingAcknowledged) and event.uid in uids
            for event in list(self._events)[first_event:]
        )

    def _probe(self, now: float) -> None:
        self._qr_next_uid += 1
        self._qr_probe_uids.add(self._qr_next_uid)
        wait = min(PROBE_TIMEOUT * (1 << self._qr_probe_attempts), PROBE_TIMEOUT_MAX)
        self._qr_probe_deadline = now + wait
        self._qr_probe_attempts += 1
        self.send_ping(self._qr_next_uid)

    def _end_probe(self) -> None:
        self._qr_candidate = None
        self._qr_budget_bytes = self._qr_budget_datagrams = 0
        self._qr_probe_uids = set()
        self._qr_probe_attempts = 0
        self._qr_probe_deadline = None

    # -- timers ------------------------------------------------------------------

    def get_timer(self) -> float | None:
        timer = super().get_timer()
        deadline = self._qr_probe_deadline
        if deadline is None or (timer is not None and timer <= deadline):
            return timer
        return deadline

    def handle_timer(self, now: float) -> None:
        deadline = self._qr_probe_deadline
        if deadline is not None and self._close_event is not None:
            self._end_probe()  # closing: nothing more to validate
        elif deadline is not None and now >= deadline:
            if self._qr_probe_attempts >= PROBE_ATTEMPTS:
                logger.debug(
                    "qh3: %s did not answer; staying at %s", self._qr_candidate, self._qr_peer
                )
                self._end_probe()
            else:
                self._probe(now)
        super().handle_timer(now)

    # -- send --------------------------------------------------------------------

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Any]]:
        out = super().datagrams_to_send(now)
        candidate = self._qr_candidate
        if candidate is None:
            if not self._qr_moved:
                return out
            peer = self._qr_peer
            return [(data, peer) for data, _ in out]
        sent: list[tuple[bytes, Any]] = []
        for data, _ in out:
            if len(data) <= self._qr_budget_bytes:
                self._qr_budget_bytes -= len(data)
            elif self._qr_budget_datagrams > 0:
                self._qr_budget_datagrams -= 1
            else:
                continue  # over the budget: dropped, not sent to the old address
            sent.append((data, candidate))
        return sent

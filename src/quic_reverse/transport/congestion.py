"""A delivery-rate based (BBR-like) congestion controller for aioquic.

Why: on a path with random loss (radio links, long-haul paths, 1 % or 5 % loss at
50 ms RTT), a loss-based controller (NewReno, CUBIC: aioquic's two built-in ones, and
qh3's native one) halves its window on every loss event and settles near the textbook
limit ``MSS/RTT * 1.22/sqrt(p)``: about 0.4 MiB/s at 1 % loss and 50 ms, where TCP
with BBR moves tens of MiB/s. This controller, like BBR v1, does not treat loss as a
congestion signal; it measures the path instead:

* **bottleneck bandwidth**: every acknowledged packet gives a delivery-rate sample
  (bytes acknowledged between the packet's send and its ack, over that time); the
  estimate is the maximum over the last :data:`BW_WINDOW_ROUNDS` round trips;
* **round-trip propagation time**: the minimum RTT seen over :data:`MIN_RTT_WINDOW`
  seconds;
* **startup**: the window grows by the bytes acknowledged (doubling per round trip)
  until the bandwidth estimate stops growing by 25 % for three round trips;
* then the window is :data:`CWND_GAIN` x bandwidth x max(min RTT, :data:`RTT_FLOOR`)
  (at least :data:`MIN_WINDOW_PACKETS` packets). aioquic paces at ``cwnd / smoothed RTT``, so
  the gain also leaves room for the bandwidth estimate to grow when the path allows.

Losses still cause retransmission (aioquic's loss detection is untouched) and reduce
``bytes_in_flight``; persistent congestion (every packet over several PTOs lost) drops
the window to the minimum and forgets the bandwidth estimate, so the controller backs
off hard when the path really collapsed. It has no ProbeRTT phase and no explicit
fairness mechanism towards loss-based flows beyond the 2x BDP window cap.

Registered with aioquic as :data:`NAME` on import of this module (aioquic only).
qh3 2.1 runs its recovery and congestion control inside its native core with no hook
(no algorithm choice, no constants exposed), so this cannot be used there.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

from aioquic.quic.congestion.base import QuicCongestionControl, register_congestion_control
from aioquic.quic.packet_builder import QuicSentPacket

__all__ = ["NAME", "DeliveryRateCongestionControl"]

#: The name under which the controller is registered with aioquic.
NAME = "quic-reverse-bbr"
#: Window = CWND_GAIN x bottleneck bandwidth x min RTT once startup is over.
CWND_GAIN = 2.0
#: Round trips over which the bandwidth estimate is the maximum sample.
BW_WINDOW_ROUNDS = 10
#: Seconds over which the propagation RTT is the minimum sample.
MIN_RTT_WINDOW = 10.0
#: The RTT used for the window is at least this (seconds): the peer may delay its ACKs
#: up to its max_ack_delay (25 ms by default), so on a path whose RTT is far shorter
#: (loopback, a LAN: well under 1 ms) a window of bandwidth x min RTT would stall the
#: sender between ACKs and the bandwidth samples would shrink with it (2 MiB/s over a
#: veth pair before this floor).
RTT_FLOOR = 0.025
#: Smallest window, in packets.
MIN_WINDOW_PACKETS = 4
#: Startup ends after this many rounds without the bandwidth growing by STARTUP_GROWTH.
STARTUP_FULL_ROUNDS = 3
STARTUP_GROWTH = 1.25

_DELIVERED = "_qr_delivered"
_DELIVERED_TIME = "_qr_delivered_time"


class DeliveryRateCongestionControl(QuicCongestionControl):
    """BBR-like controller: window from measured bandwidth x min RTT; loss-tolerant."""

    def __init__(self, *, max_datagram_size: int) -> None:
        super().__init__(max_datagram_size=max_datagram_size)
        self._mss = max_datagram_size
        self._min_window = MIN_WINDOW_PACKETS * max_datagram_size
        self._delivered = 0  # bytes acknowledged so far
        self._delivered_time = 0.0  # when _delivered last grew
        self._round = 0
        self._next_round_delivered = 0
        self._bw_samples: deque[tuple[int, float]] = deque()  # (round, max rate in it)
        self._bw = 0.0  # max of _bw_samples (kept up to date; read on every ack)
        self._min_rtt: float | None = None
        self._min_rtt_time = 0.0
        self._full_bw = 0.0
        self._full_bw_rounds = 0
        self._full_bw_reached = False
        self._round_started = False

    # -- estimates -------------------------------------------------------------

    @property
    def bandwidth(self) -> float:
        """Bottleneck bandwidth estimate (bytes/s); 0 before the first sample."""
        return self._bw

    @property
    def min_rtt(self) -> float | None:
        return self._min_rtt

    def _target_window(self) -> int:
        if self._min_rtt is None:
            return self.congestion_window
        rtt = max(self._min_rtt, RTT_FLOOR)
        return max(int(CWND_GAIN * self.bandwidth * rtt), self._min_window)

    def _add_rate_sample(self, rate: float) -> None:
        samples = self._bw_samples
        if samples and samples[-1][0] == self._round:
            if rate > samples[-1][1]:
                samples[-1] = (self._round, rate)
        else:
            samples.append((self._round, rate))
            expired = False
            while samples[0][0] <= self._round - BW_WINDOW_ROUNDS:
                samples.popleft()
                expired = True
            if expired:
                self._bw = max(r for _, r in samples)
        if rate > self._bw:
            self._bw = rate

    def _check_full_bandwidth(self) -> None:
        bw = self.bandwidth
        if bw >= self._full_bw * STARTUP_GROWTH:
            self._full_bw = bw
            self._full_bw_rounds = 0
            return
        self._full_bw_rounds += 1
        if self._full_bw_rounds >= STARTUP_FULL_ROUNDS:
            self._full_bw_reached = True

    # -- aioquic hooks -------------------------------------------------------------

    def on_packet_sent(self, *, packet: QuicSentPacket) -> None:
        self.bytes_in_flight += packet.sent_bytes
        if self.bytes_in_flight == packet.sent_bytes:
            # Sending after an idle period: rate samples start from now.
            self._delivered_time = packet.sent_time or self._delivered_time
        setattr(packet, _DELIVERED, self._delivered)
        setattr(packet, _DELIVERED_TIME, self._delivered_time)

    def on_packet_acked(self, *, now: float, packet: QuicSentPacket) -> None:
        self.bytes_in_flight -= packet.sent_bytes
        self._delivered += packet.sent_bytes
        self._delivered_time = now
        delivered_then: int = getattr(packet, _DELIVERED, 0)
        since: float = getattr(packet, _DELIVERED_TIME, 0.0)
        new_round = delivered_then >= self._next_round_delivered
        if new_round:
            self._next_round_delivered = self._delivered
            self._round += 1
        sent_time = packet.sent_time if packet.sent_time is not None else since
        interval = max(now - since, now - sent_time)
        if interval > 0 and since > 0:
            self._add_rate_sample((self._delivered - delivered_then) / interval)
        if new_round and not self._full_bw_reached:
            self._check_full_bandwidth()
        if self._full_bw_reached:
            self.congestion_window = max(
                min(self.congestion_window + packet.sent_bytes, self._target_window()),
                self._min_window,
            )
        else:
            self.congestion_window += packet.sent_bytes

    def on_packets_expired(self, *, packets: Iterable[QuicSentPacket]) -> None:
        for packet in packets:
            self.bytes_in_flight -= packet.sent_bytes

    def on_packets_lost(self, *, now: float, packets: Iterable[QuicSentPacket]) -> None:
        # Loss is not a congestion signal here (see the module docstring).
        for packet in packets:
            self.bytes_in_flight -= packet.sent_bytes

    def on_persistent_congestion(self) -> None:
        self.congestion_window = self._min_window
        self._bw_samples.clear()
        self._bw = 0.0
        self._full_bw = 0.0
        self._full_bw_rounds = 0
        self._full_bw_reached = True  # regrow from measured rates (2x per round)

    def on_rtt_measurement(self, *, now: float, rtt: float) -> None:
        if (
            self._min_rtt is None
            or rtt <= self._min_rtt
            or now - self._min_rtt_time > MIN_RTT_WINDOW
        ):
            self._min_rtt = rtt
            self._min_rtt_time = now

    def get_log_data(self) -> dict[str, object]:
        data = dict(super().get_log_data())
        data["bandwidth"] = self.bandwidth
        if self._min_rtt is not None:
            data["min_rtt"] = self._min_rtt
        return data


register_congestion_control(NAME, DeliveryRateCongestionControl)

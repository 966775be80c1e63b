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

#: Bound on the packets in flight that carry a rate sample (a safety net: every sent
#: packet is acked, lost or expired through the hooks below).
MAX_MARKED = 4096
#: A packet sent at most every max(SAMPLE_GAP, min RTT / 8) seconds carries a
#: delivery-rate sample: the max filter needs several samples per round trip, not one
#: per packet.
SAMPLE_GAP = 0.001


class DeliveryRateCongestionControl(QuicCongestionControl):
    """BBR-like controller: window from measured bandwidth x min RTT; loss-tolerant."""

    def __init__(self, *, max_datagram_size: int) -> None:
        super().__init__(max_datagram_size=max_datagram_size)
        self._min_window = MIN_WINDOW_PACKETS * max_datagram_size
        self._delivered = 0  # bytes acknowledged so far
        self._delivered_time = 0.0  # when _delivered last grew
        self._round = 0
        self._next_round_delivered = 0
        self._bw_samples: deque[tuple[int, float]] = deque()  # (round, max rate in it)
        self._bw = 0.0  # max of _bw_samples
        self._min_rtt: float | None = None
        self._min_rtt_time = 0.0
        self._sample_gap = SAMPLE_GAP
        self._next_mark_time = 0.0
        #: id(packet) -> (bytes delivered, time of that delivery) when it was sent.
        self._marked: dict[int, tuple[int, float]] = {}
        self._target = self.congestion_window  # window once startup is over
        self._full_bw = 0.0
        self._full_bw_rounds = 0
        self._full_bw_reached = False

    # -- estimates -------------------------------------------------------------

    @property
    def bandwidth(self) -> float:
        """Bottleneck bandwidth estimate (bytes/s); 0 before the first sample."""
        return self._bw

    @property
    def min_rtt(self) -> float | None:
        return self._min_rtt

    def _update_target(self) -> None:
        if self._min_rtt is not None:
            rtt = max(self._min_rtt, RTT_FLOOR)
            self._target = max(int(CWND_GAIN * self._bw * rtt), self._min_window)

    def _add_rate_sample(self, rate: float) -> None:
        samples = self._bw_samples
        bw = self._bw
        if samples and samples[-1][0] == self._round:
            if rate > samples[-1][1]:
                samples[-1] = (self._round, rate)
        else:
            samples.append((self._round, rate))
            if samples[0][0] <= self._round - BW_WINDOW_ROUNDS:
                while samples[0][0] <= self._round - BW_WINDOW_ROUNDS:
                    samples.popleft()
                bw = max(r for _, r in samples)
        if rate > bw:
            bw = rate
        if bw != self._bw:
            self._bw = bw
            self._update_target()

    def _check_full_bandwidth(self) -> None:
        bw = self._bw
        if bw >= self._full_bw * STARTUP_GROWTH:
            self._full_bw = bw
            self._full_bw_rounds = 0
            return
        self._full_bw_rounds += 1
        if self._full_bw_rounds >= STARTUP_FULL_ROUNDS:
            self._full_bw_reached = True

    # -- aioquic hooks -------------------------------------------------------------

    def on_packet_sent(self, *, packet: QuicSentPacket) -> None:
        sent_bytes = packet.sent_bytes
        self.bytes_in_flight += sent_bytes
        sent_time = packet.sent_time
        if sent_time is None:
            return
        if self.bytes_in_flight == sent_bytes:
            # Sending after an idle period: rate samples start from now.
            self._delivered_time = sent_time
        if sent_time >= self._next_mark_time:
            # Only some packets carry a rate sample (see SAMPLE_GAP): storing state on
            # every packet cost more than all the rest of the controller.
            self._next_mark_time = sent_time + self._sample_gap
            marked = self._marked
            if len(marked) >= MAX_MARKED:  # entries of packets aioquic dropped silently
                marked.clear()
            marked[id(packet)] = (self._delivered, self._delivered_time)

    def on_packet_acked(self, *, now: float, packet: QuicSentPacket) -> None:
        sent_bytes = packet.sent_bytes
        self.bytes_in_flight -= sent_bytes
        delivered = self._delivered = self._delivered + sent_bytes
        self._delivered_time = now
        state = self._marked.pop(id(packet), None) if self._marked else None
        if state is not None:
            delivered_then, since = state
            new_round = delivered_then >= self._next_round_delivered
            if new_round:
                self._next_round_delivered = delivered
                self._round += 1
            if now > since > 0:
                # The interval starts when the data acknowledged before this packet
                # was sent had been delivered (never later than the packet's send).
                self._add_rate_sample((delivered - delivered_then) / (now - since))
            if new_round and not self._full_bw_reached:
                self._check_full_bandwidth()
        cwnd = self.congestion_window + sent_bytes
        if self._full_bw_reached:
            if cwnd > self._target:
                cwnd = self._target
            if cwnd < self._min_window:
                cwnd = self._min_window
        self.congestion_window = cwnd

    def on_packets_expired(self, *, packets: Iterable[QuicSentPacket]) -> None:
        marked = self._marked
        for packet in packets:
            self.bytes_in_flight -= packet.sent_bytes
            marked.pop(id(packet), None)

    def on_packets_lost(self, *, now: float, packets: Iterable[QuicSentPacket]) -> None:
        # Loss is not a congestion signal here (see the module docstring).
        marked = self._marked
        for packet in packets:
            self.bytes_in_flight -= packet.sent_bytes
            marked.pop(id(packet), None)

    def on_persistent_congestion(self) -> None:
        self.congestion_window = self._min_window
        self._bw_samples.clear()
        self._bw = 0.0
        self._update_target()
        self._full_bw = 0.0
        self._full_bw_rounds = 0
        self._full_bw_reached = True  # regrow from measured rates (2x per round)

    def on_rtt_measurement(self, *, now: float, rtt: float) -> None:
        if (
            self._min_rtt is None
            or rtt < self._min_rtt
            or now - self._min_rtt_time > MIN_RTT_WINDOW
        ):
            self._min_rtt = rtt
            self._min_rtt_time = now
            self._sample_gap = max(SAMPLE_GAP, rtt / 8)
            self._update_target()
        elif rtt == self._min_rtt:
            self._min_rtt_time = now

    def get_log_data(self) -> dict[str, object]:
        data = dict(super().get_log_data())
        data["bandwidth"] = self._bw
        if self._min_rtt is not None:
            data["min_rtt"] = self._min_rtt
        return data


register_congestion_control(NAME, DeliveryRateCongestionControl)

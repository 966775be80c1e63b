"""The delivery-rate (BBR-like) congestion controller registered with aioquic.

A simulated path (fixed RTT, fixed bottleneck rate, every Nth packet lost) drives the
controller through aioquic's own hooks, beside aioquic's NewReno on the same path, and a
real aioquic connection made with this library's configuration is checked to use it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aioquic.quic.congestion.base import QuicCongestionControl, create_congestion_control
from aioquic.quic.packet import QuicPacketType
from aioquic.quic.packet_builder import QuicSentPacket
from aioquic.tls import Epoch

from quic_reverse.transport import aioquic as aioquic_stack
from quic_reverse.transport import congestion
from quic_reverse.transport.congestion import CWND_GAIN, MIN_WINDOW_PACKETS
from quic_reverse.transport.tls import write_self_signed

MSS = 1200
RTT = 0.05
RATE = 10e6  # bytes/s at the bottleneck


def _packet(number: int, now: float) -> QuicSentPacket:
    return QuicSentPacket(
        epoch=Epoch.ONE_RTT,
        in_flight=True,
        is_ack_eliciting=True,
        is_crypto_packet=False,
        packet_number=number,
        packet_type=QuicPacketType.ONE_RTT,
        sent_time=now,
        sent_bytes=MSS,
    )


def _simulate(cc: QuicCongestionControl, seconds: float, loss_every: int) -> list[int]:
    """Send whenever the window allows, at most RATE; each packet is acked RTT after it
    left the bottleneck, or declared lost then if it is the ``loss_every``-th one.
    Returns the window after each simulated round trip."""
    now = 1.0
    step = MSS / RATE
    in_flight: list[tuple[float, QuicSentPacket]] = []
    number = 0
    windows: list[int] = []
    next_round = now + RTT
    while now < 1.0 + seconds:
        while cc.bytes_in_flight + MSS <= cc.congestion_window:
            packet = _packet(number, now)
            cc.on_packet_sent(packet=packet)
            in_flight.append((now + RTT, packet))
            number += 1
            break  # one packet per step: the bottleneck rate
        while in_flight and in_flight[0][0] <= now:
            _, packet = in_flight.pop(0)
            if loss_every and packet.packet_number % loss_every == loss_every - 1:
                cc.on_packets_lost(now=now, packets=[packet])
            else:
                cc.on_packet_acked(now=now, packet=packet)
                cc.on_rtt_measurement(now=now, rtt=RTT)
        if now >= next_round:
            windows.append(cc.congestion_window)
            next_round += RTT
        now += step
    return windows


def test_loss_does_not_collapse_the_window_but_newreno_does() -> None:
    bdp = RATE * RTT
    ours = _simulate(congestion.DeliveryRateCongestionControl(max_datagram_size=MSS), 3.0, 100)
    reno = _simulate(create_congestion_control("reno", max_datagram_size=MSS), 3.0, 100)
    # 1 % loss: the delivery-rate controller keeps about CWND_GAIN x BDP ...
    settled = ours[-10:]
    assert min(settled) >= 0.9 * bdp, settled
    assert max(settled) <= CWND_GAIN * bdp * 1.1, settled
    # ... where NewReno, halving on every loss event, stays far below the BDP.
    assert max(reno[-10:]) < 0.5 * bdp, reno[-10:]


def test_window_follows_the_bottleneck_without_loss() -> None:
    cc = congestion.DeliveryRateCongestionControl(max_datagram_size=MSS)
    windows = _simulate(cc, 2.0, 0)
    assert 0.9 * RATE <= cc.bandwidth <= 1.1 * RATE
    assert cc.min_rtt is not None and abs(cc.min_rtt - RTT) < 1e-9
    assert windows[-1] <= CWND_GAIN * RATE * RTT * 1.1


def test_persistent_congestion_drops_to_the_minimum_window() -> None:
    cc = congestion.DeliveryRateCongestionControl(max_datagram_size=MSS)
    _simulate(cc, 1.0, 0)
    assert cc.congestion_window > MIN_WINDOW_PACKETS * MSS
    cc.on_persistent_congestion()
    assert cc.congestion_window == MIN_WINDOW_PACKETS * MSS
    assert cc.bandwidth == 0.0


def test_library_configurations_use_it_and_explicit_choices_are_kept() -> None:
    client = aioquic_stack.client_configuration()
    assert client.congestion_control_algorithm == congestion.NAME
    assert aioquic_stack.DEFAULT_CONGESTION_CONTROL == congestion.NAME
    conn = aioquic_stack._create(client, 16, None)
    assert isinstance(conn._loss._cc, congestion.DeliveryRateCongestionControl)  # type: ignore[attr-defined]
    explicit = aioquic_stack._configuration(is_client=True, congestion_control_algorithm="cubic")
    assert explicit.congestion_control_algorithm == "cubic"


def test_aioquic_send_queue_counts_unsent_bytes_only(tmp_path: Path) -> None:
    """Backpressure must not count bytes already sent and waiting for their ACK: on a
    long lossy path those include everything behind a lost packet for an RTT or more,
    which capped a stream at ``send_buffer`` per RTT (1 MiB / 50 ms)."""
    cert, key = write_self_signed(tmp_path)
    client_cfg = aioquic_stack.client_configuration(cafile=cert)
    server_cfg = aioquic_stack.server_configuration(cert, key)
    client: Any = aioquic_stack._create(client_cfg, 16, None)
    now = 1.0
    client.connect(("127.0.0.1", 4433), now)
    server: Any = None
    for _ in range(20):  # a handshake takes a few flights
        for data, _addr in client.datagrams_to_send(now):
            if server is None:
                server = aioquic_stack._create(server_cfg, 16, data[6 : 6 + data[5]])
            server.qr_feed([data], ("127.0.0.1", 50000), now)
        if server is not None:
            for data, _addr in server.datagrams_to_send(now):
                client.qr_feed([data], ("127.0.0.1", 4433), now)
        now += 0.001
        if client._handshake_complete and server._handshake_complete:
            break
    assert client._handshake_complete
    stream_id = client.qr_allocate_bidi()
    size = 1 << 20
    client.send_stream_data(stream_id, b"x" * size)
    assert client.qr_send_queue_size(stream_id) == size
    sent = sum(len(d) for d, _ in client.datagrams_to_send(now))
    assert 0 < sent < size  # the congestion window lets only part of it out
    queued = client.qr_send_queue_size(stream_id)
    assert size - sent <= queued < size - sent // 2, (size, sent, queued)

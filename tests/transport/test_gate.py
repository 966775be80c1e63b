"""Unit tests of the receive gate (``transport/_gate.py``), without a QUIC stack.

A fake stack records what it was fed and "delivers" a fixed number of stream bytes
per datagram to the gate, as the driver's event processing does.
"""

from __future__ import annotations

from typing import Any

from quic_reverse.transport._gate import (
    FEED_SLICE,
    PAUSED_HOLD,
    PAUSED_SLACK,
    SMALL_DATAGRAM,
    ReceiveGate,
)

ADDR = ("127.0.0.1", 4433)
BIG = 1200  # a data-carrying datagram
HIGH = 64 * 1024


class FakeStack:
    """Feeds record the datagrams; each big one delivers its size as stream data."""

    def __init__(self) -> None:
        self.fed: list[bytes] = []
        self.calls: list[int] = []
        self.gate: ReceiveGate | None = None

    def feed(self, datagrams: list[bytes], addr: Any) -> None:
        assert addr == ADDR
        assert self.gate is not None
        self.calls.append(len(datagrams))
        for d in datagrams:
            self.fed.append(d)
            if len(d) > SMALL_DATAGRAM:
                self.gate.delivered(len(d))


def make(high: int = HIGH, *, pausing: bool = True) -> tuple[ReceiveGate, FakeStack, list[int]]:
    stack = FakeStack()
    pauses: list[int] = []
    gate = ReceiveGate(high, stack.feed, pausing=pausing, on_pause=lambda: pauses.append(1))
    stack.gate = gate
    return gate, stack, pauses


def datagrams(n: int, size: int = BIG, tag: int = 0) -> list[bytes]:
    return [bytes([tag % 256, i % 256]) + bytes(size - 2) for i in range(n)]


def test_feeds_everything_below_the_high_water_mark() -> None:
    gate, stack, pauses = make()
    batch = datagrams(10)
    gate.receive(batch, ADDR)
    assert stack.fed == batch
    assert gate.unread == 10 * BIG
    assert not gate.paused and not pauses


def test_pauses_within_a_burst_and_holds_the_rest_in_order() -> None:
    gate, stack, pauses = make()
    burst = datagrams(200)  # 240 KB, far past 64 KiB
    gate.receive(burst, ADDR)
    assert gate.paused and pauses == [1]
    # Fed in slices; the pause took effect at the first slice boundary past the mark.
    assert all(n <= FEED_SLICE for n in stack.calls)
    fed = len(stack.fed)
    assert fed % FEED_SLICE == 0 and fed * BIG > HIGH
    assert (fed - FEED_SLICE) * BIG <= HIGH
    assert stack.fed == burst[:fed]
    assert gate.held_bytes == (200 - fed) * BIG

    # Reading a little does not resume (hysteresis: a quarter of the mark) ...
    assert not gate.consumed(BIG)
    assert gate.paused
    # ... reading enough does, and what was held is fed in its original order.
    assert gate.consumed(gate.unread - (HIGH - HIGH // 4))
    assert not gate.paused or stack.fed[fed] == burst[fed]
    assert stack.fed == burst[: len(stack.fed)]


def test_resume_feeds_all_held_data_when_the_reader_keeps_up() -> None:
    gate, stack, _ = make()
    burst = datagrams(120)
    gate.receive(burst, ADDR)
    assert gate.paused
    for _ in range(100):  # bounded: each round reads everything delivered so far
        if not gate.paused and gate.held_bytes == 0:
            break
        gate.consumed(gate.unread)
    assert stack.fed == burst
    assert gate.held_bytes == 0 and not gate.paused


def test_small_datagrams_still_flow_while_paused_within_the_slack() -> None:
    gate, stack, _ = make()
    gate.receive(datagrams(80), ADDR)
    assert gate.paused
    before = len(stack.fed)
    acks = datagrams(5, size=SMALL_DATAGRAM, tag=7)
    mixed = [acks[0], *datagrams(2, tag=8), *acks[1:]]
    gate.receive(mixed, ADDR)
    assert stack.fed[before:] == acks  # the small ones went in, the big ones wait
    assert gate.held_bytes >= 2 * BIG


def test_small_datagrams_are_held_past_the_slack() -> None:
    gate, stack, _ = make()
    gate.receive(datagrams(60), ADDR)
    assert gate.paused
    gate.delivered(PAUSED_SLACK + HIGH)  # a peer that went on sending small data
    before = len(stack.fed)
    gate.receive(datagrams(3, size=100), ADDR)
    assert len(stack.fed) == before
    assert gate.held_bytes >= 300


def test_hold_is_bounded_and_keeps_the_newest() -> None:
    gate, stack, _ = make()
    gate.receive(datagrams(80), ADDR)
    assert gate.paused
    batches = [datagrams(10, tag=t) for t in range(1, 200)]
    for batch in batches:
        gate.receive(batch, ADDR)
        assert gate.held_bytes <= PAUSED_HOLD + len(batch) * BIG
    assert gate.held_bytes <= PAUSED_HOLD
    fed_before = len(stack.fed)
    for _ in range(1000):  # bounded: a reader that keeps up until nothing is held
        if not gate.paused and gate.held_bytes == 0:
            break
        gate.consumed(gate.unread)
    resumed = stack.fed[fed_before:]
    assert len(resumed) * BIG <= PAUSED_HOLD
    assert resumed, "nothing fed after resume"
    assert resumed[-1] == batches[-1][-1]  # the newest survived
    assert batches[0][0] not in resumed  # the oldest were dropped


def test_closed_gate_feeds_nothing_and_drops_what_it_held() -> None:
    gate, stack, _ = make()
    gate.receive(datagrams(80), ADDR)
    assert gate.paused and gate.held_bytes
    gate.close()
    assert gate.held_bytes == 0
    fed = len(stack.fed)
    gate.receive(datagrams(3), ADDR)
    gate.consumed(gate.unread)
    assert len(stack.fed) == fed


def test_non_pausing_gate_only_counts() -> None:
    """aioquic holds credit back per stream itself: its gate never pauses."""
    gate, stack, pauses = make(pausing=False)
    burst = datagrams(500)
    gate.receive(burst, ADDR)
    assert stack.fed == burst
    assert stack.calls == [500]  # one call, no slicing needed
    assert gate.unread == 500 * BIG > HIGH
    assert not gate.paused and not pauses
    assert not gate.consumed(100)
    assert gate.unread == 500 * BIG - 100

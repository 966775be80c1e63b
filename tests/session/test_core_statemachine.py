"""A hypothesis state machine over two sans-IO cores wired in memory.

Rules: opens from either side, accepts (with the data stream arriving before or after
the answer), rejects, cancels, pings, stream releases, partial deliveries, timer
advances, a session close. Invariants: every open is resolved at most once, and at the
end exactly once unless its caller cancelled it; request ids, tokens and logical ids
are unique; after a timer run no deadline is left in the past; tables end empty.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from quic_reverse import Config, Role
from quic_reverse import events as ev
from quic_reverse._core import (
    OpenFailed,
    OpenResolved,
    PingFailed,
    PongReceived,
    SessionCore,
    SessionEnded,
    StreamRefused,
)
from quic_reverse.errors import CapacityExceeded
from quic_reverse.wire import CloseCode, Metadata, OpenFlags, RejectCode, StreamBind

SIDES = ("client", "server")


@dataclass
class Side:
    core: SessionCore
    opened: set[int] = field(default_factory=set)  # our request ids
    cancelled: set[int] = field(default_factory=set)
    resolved: dict[int, int] = field(default_factory=dict)  # rid -> times resolved
    bound_lsids: set[int] = field(default_factory=set)  # lsids of our bound streams
    tokens: set[int] = field(default_factory=set)  # tokens handed out, unsettled
    settled_tokens: set[int] = field(default_factory=set)
    requests: list[int] = field(default_factory=list)  # peer requests handed to us
    accepted_lsids: list[int] = field(default_factory=list)  # our accepted, active
    pings: set[int] = field(default_factory=set)
    ended: bool = False


class TwoCores(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.sides: dict[str, Side] = {}
        # Streams a side accepted whose data stream has not reached the opener yet.
        self.in_flight_streams: dict[str, list[int]] = {"client": [], "server": []}

    @initialize(
        inflight=st.integers(1, 4),
        queued=st.integers(0, 4),
        limit=st.integers(1, 4),
    )
    def start(self, inflight: int, queued: int, limit: int) -> None:
        config = Config(
            open_timeout=5,
            stream_bind_timeout=3,
            ping_timeout=2,
            close_timeout=2,
            negotiation_timeout=10,
            max_inflight_opens=inflight,
            max_queued_opens=queued,
            max_concurrent_streams=limit,
        )
        self.sides = {
            "client": Side(SessionCore(Role.CLIENT, config)),
            "server": Side(SessionCore(Role.SERVER, config)),
        }
        for side in self.sides.values():
            side.core.start(self.now)
        self.deliver_all()
        assert all(s.core.is_open for s in self.sides.values())

    # ------------------------------------------------------------------ plumbing

    def peer(self, name: str) -> str:
        return "server" if name == "client" else "client"

    def deliver(self, src: str) -> None:
        data = self.sides[src].core.data_to_send()
        self.sides[self.peer(src)].core.receive_data(data, self.now)
        self.collect()

    def deliver_all(self) -> None:
        for _ in range(50):
            a = self.sides["client"].core.data_to_send()
            b = self.sides["server"].core.data_to_send()
            if not a and not b:
                break
            self.sides["server"].core.receive_data(a, self.now)
            self.sides["client"].core.receive_data(b, self.now)
            self.collect()
        self.collect()

    def collect(self) -> None:
        for side in self.sides.values():
            for out in side.core.outputs():
                if isinstance(out, OpenResolved | OpenFailed):
                    assert out.request_id in side.opened, out
                    side.resolved[out.request_id] = side.resolved.get(out.request_id, 0) + 1
                    assert side.resolved[out.request_id] == 1, f"resolved twice: {out}"
                    if isinstance(out, OpenResolved):
                        assert out.token in side.tokens, out
                        side.tokens.discard(out.token)
                        side.settled_tokens.add(out.token)
                        assert out.logical_stream_id not in side.bound_lsids, out
                        side.bound_lsids.add(out.logical_stream_id)
                elif isinstance(out, StreamRefused):
                    assert out.token in side.tokens, out
                    side.tokens.discard(out.token)
                    side.settled_tokens.add(out.token)
                elif isinstance(out, PongReceived | PingFailed):
                    side.pings.discard(out.sequence)
                elif isinstance(out, SessionEnded):
                    side.ended = True
            while (event := side.core.next_user_event()) is not None:
                if isinstance(event, ev.OpenRequestReceived):
                    assert event.request_id not in side.requests
                    side.requests.append(event.request_id)

    # ------------------------------------------------------------------ rules

    @precondition(lambda self: self.open_now())
    @rule(side=st.sampled_from(SIDES))
    def open(self, side: str) -> None:
        s = self.sides[side]
        try:
            rid = s.core.open_request("svc", Metadata.EMPTY, OpenFlags(0), self.now)
        except CapacityExceeded:
            return
        assert rid not in s.opened
        s.opened.add(rid)

    @precondition(lambda self: self.open_now())
    @rule(side=st.sampled_from(SIDES), data=st.data())
    def cancel(self, side: str, data: st.DataObject) -> None:
        s = self.sides[side]
        live = sorted(r for r in s.opened if r not in s.resolved and r not in s.cancelled)
        if not live:
            return
        rid = data.draw(st.sampled_from(live))
        s.core.cancel_open(rid, self.now)
        s.cancelled.add(rid)
        self.collect()

    @precondition(lambda self: self.open_now())
    @rule(side=st.sampled_from(SIDES), accept=st.booleans(), stream_first=st.booleans())
    def answer(self, side: str, accept: bool, stream_first: bool) -> None:
        """``side`` answers the oldest request of its peer; an accepted stream travels
        to the opener before or after the OpenResponse."""
        s = self.sides[side]
        if not s.requests:
            return
        rid = s.requests.pop(0)
        if not accept:
            s.core.reject(rid, RejectCode.SERVICE_UNAVAILABLE, None)
            return
        lsid = s.core.accept(rid)
        assert lsid not in s.accepted_lsids
        s.accepted_lsids.append(lsid)
        if stream_first:
            self.stream_arrives(self.peer(side), lsid)
        else:
            self.in_flight_streams[self.peer(side)].append(lsid)

    def stream_arrives(self, opener: str, lsid: int) -> None:
        s = self.sides[opener]
        token = s.core.stream_arrived(self.now, header_ready=True)
        if token is None:
            return  # refused at once (flood bound): the driver resets it
        assert token not in s.tokens and token not in s.settled_tokens
        s.tokens.add(token)
        s.core.stream_header(token, StreamBind(logical_stream_id=lsid).encode(), self.now)
        self.collect()

    @precondition(lambda self: self.open_now())
    @rule(side=st.sampled_from(SIDES))
    def streams_arrive(self, side: str) -> None:
        pending, self.in_flight_streams[side] = self.in_flight_streams[side], []
        for lsid in pending:
            self.stream_arrives(side, lsid)

    @precondition(lambda self: self.open_now())
    @rule(side=st.sampled_from(SIDES))
    def release(self, side: str) -> None:
        s = self.sides[side]
        if s.accepted_lsids:
            s.core.stream_released(s.accepted_lsids.pop(0))
        elif s.bound_lsids:
            s.bound_lsids.pop()
            s.core.stream_released(None)
        self.collect()

    @precondition(lambda self: self.open_now())
    @rule(side=st.sampled_from(SIDES))
    def ping(self, side: str) -> None:
        s = self.sides[side]
        s.pings.add(s.core.send_ping(self.now))

    @rule(side=st.sampled_from(SIDES))
    def deliver_one_way(self, side: str) -> None:
        self.deliver(side)

    @rule()
    def deliver_both(self) -> None:
        self.deliver_all()

    @rule(dt=st.sampled_from([0.5, 1.0, 2.5, 6.0]))
    def advance(self, dt: float) -> None:
        self.now += dt
        for s in self.sides.values():
            s.core.handle_timer(self.now)
            nxt = s.core.next_deadline()
            assert nxt is None or nxt > self.now, (nxt, self.now)
        self.collect()

    @precondition(lambda self: self.open_now())
    @rule(side=st.sampled_from(SIDES))
    def close(self, side: str) -> None:
        self.sides[side].core.close(CloseCode.NORMAL, None, self.now)
        self.collect()

    def open_now(self) -> bool:
        return bool(self.sides) and all(s.core.is_open for s in self.sides.values())

    # ------------------------------------------------------------------ invariants

    @invariant()
    def ids_and_tables_bounded(self) -> None:
        for s in self.sides.values():
            sizes = s.core.table_sizes()
            cfg = s.core.config
            assert sizes["inflight"] <= cfg.max_inflight_opens
            assert sizes["queued"] <= cfg.max_queued_opens
            assert sizes["incoming"] <= cfg.max_concurrent_streams
            assert sizes["waiting_incoming"] <= cfg.max_queued_opens
            assert len(set(s.accepted_lsids)) == len(s.accepted_lsids)

    def teardown(self) -> None:
        if not self.sides:
            return
        # Drive to quiescence: deliver everything, every stream arrives, run every
        # deadline. Then no open is lost: each resolved once unless cancelled.
        for _ in range(10):
            self.deliver_all()
            for name in SIDES:
                if self.sides[name].core.is_open:
                    self.streams_arrive(name)
            self.now += 20.0
            for s in self.sides.values():
                s.core.handle_timer(self.now)
            self.collect()
        self.deliver_all()
        for s in self.sides.values():
            for rid in s.opened:
                count = s.resolved.get(rid, 0)
                if rid in s.cancelled:
                    assert count <= 1
                else:
                    assert count == 1, (rid, s.resolved, s.core.table_sizes())
            assert not s.tokens, s.tokens  # every stream paired or refused
            sizes = s.core.table_sizes()
            for key in ("local_opens", "queued", "by_lsid", "header_pending", "early_streams"):
                assert sizes[key] == 0, sizes
            if s.core.is_closed:
                kept = ("used_lsids", "active_streams", "events")
                assert all(v == 0 for k, v in sizes.items() if k not in kept), sizes


TwoCores.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_two_cores = TwoCores.TestCase

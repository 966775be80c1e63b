"""The sans-IO session core, without any I/O: two cores wired together in memory."""

from __future__ import annotations

import pytest

from quic_reverse import Config, ConfigError, Role
from quic_reverse import events as ev
from quic_reverse._core import (
    CoreState,
    Negotiated,
    OpenFailed,
    OpenResolved,
    Output,
    PingFailed,
    PongReceived,
    SessionCore,
    StreamRefused,
)
from quic_reverse.errors import (
    CapacityExceeded,
    Disconnected,
    EncodeError,
    NegotiationError,
    OperationTimeout,
    ProtocolError,
    SessionClosed,
    StreamRejected,
    TimeoutKind,
    UsageError,
)
from quic_reverse.wire import (
    CloseCode,
    Features,
    FrameReader,
    Hello,
    Message,
    Metadata,
    OpenFlags,
    OpenRequest,
    OpenResponse,
    OpenStatus,
    Ping,
    Pong,
    RejectCode,
    StreamBind,
    StreamClose,
    decode,
    encode_message_frame,
)

NO_FLAGS = OpenFlags(0)


def messages(data: bytes) -> list[Message]:
    """Decode every frame in ``data``."""
    return [decode(p) for p in FrameReader().feed(data)]


class Pair:
    """A client and a server core; ``flush()`` carries bytes both ways until quiet."""

    def __init__(self, client: Config | None = None, server: Config | None = None) -> None:
        self.client = SessionCore(Role.CLIENT, client or Config(agent="c"))
        self.server = SessionCore(Role.SERVER, server or Config(agent="s"))
        self.now = 0.0
        self.client_out: list[Output] = []
        self.server_out: list[Output] = []

    def flush(self, *, byte_at_a_time: bool = False) -> None:
        for _ in range(100):
            a = self.client.data_to_send()
            b = self.server.data_to_send()
            if not a and not b:
                break
            for data, dst in ((a, self.server), (b, self.client)):
                if byte_at_a_time:
                    for i in range(len(data)):
                        dst.receive_data(data[i : i + 1], self.now)
                else:
                    dst.receive_data(data, self.now)
        self.client_out += self.client.outputs()
        self.server_out += self.server.outputs()

    def start(self, **kw: bool) -> None:
        self.client.start(self.now)
        self.server.start(self.now)
        self.flush(**kw)


def open_pair(client: Config | None = None, server: Config | None = None) -> Pair:
    pair = Pair(client, server)
    pair.start()
    assert pair.client.is_open and pair.server.is_open
    pair.client_out.clear()
    pair.server_out.clear()
    return pair


@pytest.mark.parametrize("byte_at_a_time", [False, True])
def test_negotiation_both_roles(byte_at_a_time: bool) -> None:
    pair = Pair(
        Config(agent="edge/1", features=Features.STRUCTURED_METADATA | Features.PING_PONG),
        Config(agent="relay/1", features=Features.STRUCTURED_METADATA, ping_interval=5),
    )
    pair.client.start(0.0)
    sent = messages(pair.client.data_to_send())
    assert sent == [Hello(protocol_version=1, features=Features(0x10003), agent="edge/1")]

    pair = Pair(
        Config(agent="edge/1", features=Features.STRUCTURED_METADATA | Features.PING_PONG),
        Config(agent="relay/1", features=Features.STRUCTURED_METADATA, ping_interval=5),
    )
    pair.start(byte_at_a_time=byte_at_a_time)
    for core, agent in ((pair.client, "relay/1"), (pair.server, "edge/1")):
        assert core.state is CoreState.OPEN
        assert core.negotiated_version == 1
        assert core.negotiated_features == Features(0x10003)  # + DATAGRAM_FLOWS (default)
        assert core.remote_agent == agent
    assert pair.client_out == [Negotiated(1, Features(0x10003), "relay/1")]
    assert pair.server_out == [Negotiated(1, Features(0x10003), "edge/1")]


def test_server_waits_for_hello_and_sends_nothing_first() -> None:
    server = SessionCore(Role.SERVER, Config())
    server.start(0.0)
    assert server.data_to_send() == b""
    assert server.state is CoreState.AWAIT_HELLO


def test_version_mismatch_fails_negotiation() -> None:
    pair = Pair(Config(), Config(supported_versions=(2,)))
    pair.start()
    assert pair.server.end is not None
    assert isinstance(pair.server.end.error, NegotiationError)
    assert "version mismatch" in str(pair.server.end.error)
    assert not pair.client.is_open


def test_unexpected_message_during_negotiation() -> None:
    server = SessionCore(Role.SERVER, Config())
    server.start(0.0)
    server.receive_data(encode_message_frame(Ping(sequence=1)), 0.0)
    assert server.end is not None and isinstance(server.end.error, NegotiationError)
    assert server.data_to_send() == b""  # nothing sent to a peer that broke the order


def test_negotiation_timeout() -> None:
    server = SessionCore(Role.SERVER, Config(negotiation_timeout=3))
    server.start(10.0)
    assert server.next_deadline() == 13.0
    server.handle_timer(12.9)
    assert server.end is None
    server.handle_timer(13.0)
    assert server.end is not None
    err = server.end.error
    assert isinstance(err, OperationTimeout) and isinstance(err, TimeoutError)
    assert err.kind is TimeoutKind.NEGOTIATION


def test_open_accept_then_stream() -> None:
    pair = open_pair()
    rid = pair.server.open_request("ssh", Metadata.EMPTY, NO_FLAGS, 0.0)
    assert rid == 1
    pair.flush()
    assert pair.client.next_user_event() == ev.OpenRequest(
        request_id=1, service="ssh", metadata=Metadata.EMPTY, flags=NO_FLAGS
    )
    lsid = pair.client.accept(rid)
    assert lsid == 1
    pair.flush()
    token = pair.server.stream_arrived(0.0)
    assert token is not None
    pair.server.stream_header(token, StreamBind(logical_stream_id=1).encode(), 0.0)
    assert pair.server.outputs() == [OpenResolved(1, 1, token)]
    assert pair.server.active_streams == 1
    assert pair.server.table_sizes()["local_opens"] == 0


def test_stream_before_response_is_held_then_paired() -> None:
    pair = open_pair()
    r1 = pair.server.open_request("a", Metadata.EMPTY, NO_FLAGS, 0.0)
    r2 = pair.server.open_request("b", Metadata.EMPTY, NO_FLAGS, 0.0)
    pair.flush()
    # The client accepts r2 first with id 7, r1 with id 3; streams arrive before responses.
    t7 = pair.server.stream_arrived(0.0)
    t3 = pair.server.stream_arrived(0.0)
    assert t7 is not None and t3 is not None
    pair.server.stream_header(t7, StreamBind(logical_stream_id=7).encode(), 0.0)
    pair.server.stream_header(t3, StreamBind(logical_stream_id=3).encode(), 0.0)
    assert pair.server.outputs() == []
    assert pair.server.table_sizes()["early_streams"] == 2
    pair.client.accept(r2, 7)
    pair.client.accept(r1, 3)
    pair.flush()
    assert sorted(pair.server_out, key=str) == sorted(
        [OpenResolved(r2, 7, t7), OpenResolved(r1, 3, t3)], key=str
    )
    sizes = pair.server.table_sizes()
    assert sizes["early_streams"] == 0 and sizes["local_opens"] == 0 and sizes["inflight"] == 0


def test_rejected_open() -> None:
    pair = open_pair()
    rid = pair.server.open_request("nope", Metadata.EMPTY, NO_FLAGS, 0.0)
    pair.flush()
    pair.client.reject(rid, RejectCode.UNAUTHORIZED, "who are you")
    pair.flush()
    (failed,) = [o for o in pair.server_out if isinstance(o, OpenFailed)]
    assert isinstance(failed.error, StreamRejected)
    assert failed.error.code is RejectCode.UNAUTHORIZED
    assert failed.error.reason == "who are you"
    assert pair.client.table_sizes()["incoming"] == 0


def test_rejection_reason_is_escaped_in_the_error_text() -> None:
    """The peer's reject reason is kept as sent but shown escaped (it ends up in logs)."""
    pair = open_pair()
    rid = pair.server.open_request("nope", Metadata.EMPTY, NO_FLAGS, 0.0)
    pair.flush()
    pair.client.reject(rid, RejectCode.UNAUTHORIZED, "no\nFAKE LOG LINE\x1b[31m")
    pair.flush()
    (failed,) = [o for o in pair.server_out if isinstance(o, OpenFailed)]
    assert failed.error.reason == "no\nFAKE LOG LINE\x1b[31m"  # type: ignore[attr-defined]
    text = str(failed.error)
    assert "\n" not in text and "\x1b" not in text and "FAKE LOG LINE" in text


def test_open_timeout_and_late_response_stream_is_refused() -> None:
    pair = open_pair(server=Config(open_timeout=5, stream_bind_timeout=2))
    rid = pair.server.open_request("slow", Metadata.EMPTY, NO_FLAGS, 0.0)
    pair.flush()
    assert pair.server.next_deadline() == 5.0
    pair.server.handle_timer(5.0)
    (failed,) = pair.server.outputs()
    assert isinstance(failed, OpenFailed) and isinstance(failed.error, OperationTimeout)
    assert failed.error.kind is TimeoutKind.OPEN_REQUEST
    assert pair.server.table_sizes()["local_opens"] == 0
    # The answer comes late: its stream is refused, nothing is leaked.
    pair.now = 6.0
    pair.client.accept(rid)
    pair.flush()
    token = pair.server.stream_arrived(6.0)
    assert token is not None
    pair.server.stream_header(token, StreamBind(logical_stream_id=1).encode(), 6.0)
    (refused,) = pair.server.outputs()
    assert isinstance(refused, StreamRefused) and refused.token == token
    sizes = pair.server.table_sizes()
    assert sizes["orphan_lsids"] == 0 and sizes["orphan_requests"] == 0


def test_bind_timeout() -> None:
    pair = open_pair(server=Config(stream_bind_timeout=2))
    rid = pair.server.open_request("x", Metadata.EMPTY, NO_FLAGS, 0.0)
    pair.flush()
    pair.client.accept(rid)
    pair.now = 1.0
    pair.flush()
    assert pair.server.next_deadline() == 3.0
    pair.server.handle_timer(3.0)
    (failed,) = [o for o in pair.server.outputs() if isinstance(o, OpenFailed)]
    assert isinstance(failed.error, OperationTimeout)
    assert failed.error.kind is TimeoutKind.STREAM_BIND


def test_inflight_limit_queues_opens() -> None:
    pair = open_pair(server=Config(max_inflight_opens=2))
    rids = [pair.server.open_request("s", Metadata.EMPTY, NO_FLAGS, 0.0) for _ in range(3)]
    sent = messages(pair.server.data_to_send())
    assert [m.request_id for m in sent if isinstance(m, OpenRequest)] == rids[:2]
    assert pair.server.table_sizes()["queued"] == 1
    pair.server.receive_data(
        encode_message_frame(
            OpenResponse(request_id=rids[0], status=OpenStatus.rejected(RejectCode.LIMIT_EXCEEDED))
        ),
        0.0,
    )
    sent = messages(pair.server.data_to_send())
    assert [m.request_id for m in sent if isinstance(m, OpenRequest)] == [rids[2]]


def test_queued_opens_are_bounded() -> None:
    pair = open_pair(server=Config(max_inflight_opens=1, max_queued_opens=2))
    rids = [pair.server.open_request("s", Metadata.EMPTY, NO_FLAGS, 0.0) for _ in range(3)]
    with pytest.raises(CapacityExceeded, match="max_queued_opens"):
        pair.server.open_request("s", Metadata.EMPTY, NO_FLAGS, 0.0)
    sizes = pair.server.table_sizes()
    assert (sizes["local_opens"], sizes["queued"], sizes["inflight"]) == (3, 2, 1)
    pair.server.cancel_open(rids[1], 0.0)  # a queue slot frees up: the next open queues
    rids.append(pair.server.open_request("s", Metadata.EMPTY, NO_FLAGS, 0.0))
    assert pair.server.table_sizes()["queued"] == 2
    # With no queue at all, an open fails at once while every slot is busy.
    pair = open_pair(server=Config(max_inflight_opens=1, max_queued_opens=0))
    pair.server.open_request("s", Metadata.EMPTY, NO_FLAGS, 0.0)
    with pytest.raises(CapacityExceeded):
        pair.server.open_request("s", Metadata.EMPTY, NO_FLAGS, 0.0)


def test_cancel_leaves_no_residue() -> None:
    pair = open_pair(server=Config(max_inflight_opens=1))
    r1 = pair.server.open_request("s", Metadata.EMPTY, NO_FLAGS, 0.0)
    r2 = pair.server.open_request("s", Metadata.EMPTY, NO_FLAGS, 0.0)  # queued
    pair.server.cancel_open(r2, 0.0)
    pair.server.cancel_open(r1, 0.0)
    sizes = pair.server.table_sizes()
    assert sizes["local_opens"] == sizes["queued"] == sizes["inflight"] == 0
    assert sizes["orphan_requests"] == 1  # r1 was sent: its answer is expected
    pair.flush()
    pair.client.accept(r1)
    pair.flush()
    assert pair.server.table_sizes()["orphan_requests"] == 0
    assert pair.server.table_sizes()["orphan_lsids"] == 1
    token = pair.server.stream_arrived(0.0)
    assert token is not None
    pair.server.stream_header(token, StreamBind(logical_stream_id=1).encode(), 0.0)
    assert [type(o) for o in pair.server.outputs()] == [StreamRefused]
    assert all(
        v == 0 for k, v in pair.server.table_sizes().items() if k not in ("timers", "events")
    )


def test_unknown_and_bad_stream_headers_are_refused() -> None:
    pair = open_pair()
    assert pair.server.stream_arrived(0.0) is not None  # within the slack
    pair.server.open_request("s", Metadata.EMPTY, NO_FLAGS, 0.0)
    for header in (b"XXXX\x01" + bytes(8), StreamBind(logical_stream_id=0).encode()):
        token = pair.server.stream_arrived(0.0)
        assert token is not None
        pair.server.stream_header(token, header, 0.0)
        (refused,) = pair.server.outputs()
        assert isinstance(refused, StreamRefused) and refused.token == token
    assert pair.server.is_open


def test_stream_flood_is_bounded() -> None:
    pair = open_pair()
    tokens = [pair.server.stream_arrived(0.0) for _ in range(100)]
    accepted = [t for t in tokens if t is not None]
    assert 0 < len(accepted) <= 8


def test_logical_ids() -> None:
    pair = open_pair()
    rids = [pair.server.open_request("s", Metadata.EMPTY, NO_FLAGS, 0.0) for _ in range(4)]
    pair.flush()
    assert pair.client.accept(rids[0]) == 1
    assert pair.client.accept(rids[1], 5) == 5
    with pytest.raises(UsageError, match="in use"):
        pair.client.accept(rids[2], 5)
    with pytest.raises(EncodeError):
        pair.client.accept(rids[2], 0)
    with pytest.raises(UsageError, match="no pending"):
        pair.client.accept(999)
    assert pair.client.accept(rids[2]) == 2
    pair.client.stream_released(1)
    assert pair.client.accept(rids[3], 1) == 1


def test_limit_exceeded_is_automatic_when_nothing_may_wait() -> None:
    pair = open_pair(client=Config(max_concurrent_streams=2, max_queued_opens=0))
    rids = [pair.server.open_request("s", Metadata.EMPTY, NO_FLAGS, 0.0) for _ in range(3)]
    pair.flush()
    failed = [o for o in pair.server_out if isinstance(o, OpenFailed)]
    assert len(failed) == 1 and failed[0].request_id == rids[2]
    assert isinstance(failed[0].error, StreamRejected)
    assert failed[0].error.code is RejectCode.LIMIT_EXCEEDED
    assert pair.client.table_sizes()["incoming"] == 2


def test_requests_past_the_stream_limit_wait_for_a_slot() -> None:
    """Issue 10 item 2: a burst past max_concurrent_streams queues, then succeeds."""
    pair = open_pair(client=Config(max_concurrent_streams=2, max_queued_opens=1, open_timeout=5))
    rids = [pair.server.open_request("s", Metadata.EMPTY, NO_FLAGS, 0.0) for _ in range(4)]
    pair.flush()
    # Two handed out, one waits, the fourth is past max_queued_opens: rejected.
    assert pair.client.table_sizes()["incoming"] == 2
    assert pair.client.table_sizes()["waiting_incoming"] == 1
    failed = [o for o in pair.server_out if isinstance(o, OpenFailed)]
    assert [f.request_id for f in failed] == [rids[3]]
    first = pair.client.next_user_event()
    assert isinstance(first, ev.OpenRequest)
    pair.client.accept(first.request_id)
    second = pair.client.next_user_event()
    assert isinstance(second, ev.OpenRequest)
    pair.client.reject(second.request_id, RejectCode.UNAUTHORIZED, None)  # frees a slot
    third = pair.client.next_user_event()
    assert isinstance(third, ev.OpenRequest) and third.request_id == rids[2]
    assert pair.client.table_sizes()["waiting_incoming"] == 0
    # A waiting request that gets no slot within open_timeout is rejected then.
    more = pair.server.open_request("s", Metadata.EMPTY, NO_FLAGS, 1.0)
    pair.now = 1.0
    pair.flush()
    assert pair.client.table_sizes()["waiting_incoming"] == 1
    assert pair.client.next_deadline() == 6.0
    pair.client.handle_timer(6.0)
    pair.server_out.clear()
    pair.flush()
    failed = [o for o in pair.server_out if isinstance(o, OpenFailed)]
    assert [f.request_id for f in failed] == [more]
    assert isinstance(failed[0].error, StreamRejected)
    assert failed[0].error.code is RejectCode.LIMIT_EXCEEDED


def test_ping_pong_and_ping_timeout() -> None:
    pair = open_pair(server=Config(ping_timeout=1))
    seq = pair.server.send_ping(0.0)
    assert seq == 1
    pair.now = 0.25
    pair.flush()
    assert pair.server_out == [PongReceived(1, 0.25)]
    assert pair.client.next_user_event() == ev.Ping(sequence=1)
    assert pair.server.next_user_event() == ev.Pong(sequence=1)
    seq = pair.server.send_ping(1.0)
    pair.server.handle_timer(2.0)
    assert [type(o) for o in pair.server.outputs()] == [PingFailed]
    assert pair.server.is_open  # a user ping timing out does not kill the session


def test_keepalive_pings_when_idle_and_detects_silent_peer() -> None:
    core = SessionCore(Role.SERVER, Config(ping_interval=5, ping_timeout=2))
    peer = SessionCore(Role.CLIENT, Config())
    core.start(0.0)
    peer.start(0.0)
    for _ in range(3):
        core.receive_data(peer.data_to_send(), 0.0)
        peer.receive_data(core.data_to_send(), 0.0)
    assert core.is_open
    assert core.next_deadline() == 5.0
    core.receive_data(encode_message_frame(Ping(sequence=9)), 3.0)  # activity
    assert core.next_deadline() == 8.0
    assert messages(core.data_to_send()) == [Pong(sequence=9)]
    core.handle_timer(8.0)
    assert messages(core.data_to_send()) == [Ping(sequence=1)]
    core.receive_data(encode_message_frame(Pong(sequence=1)), 9.0)
    assert core.next_deadline() == 14.0
    core.handle_timer(14.0)
    assert messages(core.data_to_send()) == [Ping(sequence=2)]
    core.handle_timer(16.0)  # no Pong
    assert core.end is not None and isinstance(core.end.error, Disconnected)
    assert not core.end.clean


@pytest.mark.parametrize(
    "bad",
    [
        encode_message_frame(Hello(protocol_version=1)),
        b"\x00\x00\x00\x04\x07\x00\x00\x00",  # unknown message index 7
        b"\x00\x01\x00\x01",  # length prefix 65537
        b"\x00\x00\x00\x00",  # empty frame
    ],
    ids=["hello-twice", "unknown-message", "oversize", "empty"],
)
def test_protocol_errors_end_the_session(bad: bytes) -> None:
    pair = open_pair()
    pair.server.open_request("s", Metadata.EMPTY, NO_FLAGS, 0.0)
    pair.server.send_ping(0.0)
    pair.server.data_to_send()
    pair.server.receive_data(bad, 0.0)
    end = pair.server.end
    assert end is not None and isinstance(end.error, ProtocolError) and not end.clean
    outputs = pair.server.outputs()
    assert {type(o) for o in outputs} == {OpenFailed, PingFailed, type(end)}
    # The peer is told why.
    (close,) = messages(pair.server.data_to_send())
    assert isinstance(close, StreamClose) and close.logical_stream_id == 0
    assert close.code is CloseCode.ERROR
    with pytest.raises(SessionClosed):
        pair.server.open_request("s", Metadata.EMPTY, NO_FLAGS, 0.0)


def test_session_close_handshake() -> None:
    pair = open_pair(server=Config(close_timeout=1))
    assert pair.server.close(CloseCode.NORMAL, "bye", 0.0)
    assert pair.server.state is CoreState.CLOSING
    pair.flush()
    assert pair.client.next_user_event() == ev.CloseReceived(code=CloseCode.NORMAL, reason="bye")
    assert pair.client.is_closed and pair.server.is_closed
    assert pair.client.end is not None and pair.client.end.clean and pair.client.end.by_peer
    assert pair.server.end is not None and pair.server.end.clean and not pair.server.end.by_peer


def test_session_close_times_out_without_answer() -> None:
    core = open_pair(server=Config(close_timeout=1.5)).server
    core.close(CloseCode.NORMAL, None, 10.0)
    assert core.next_deadline() == 11.5
    core.handle_timer(11.5)
    assert core.is_closed and core.end is not None and core.end.clean


def test_informational_events_are_bounded() -> None:
    pair = open_pair(client=Config(max_buffered_events=10))
    for seq in range(1, 101):
        pair.client.receive_data(encode_message_frame(Ping(sequence=seq)), 0.0)
    assert pair.client.table_sizes()["events"] == 10
    first = pair.client.next_user_event()
    assert first == ev.Ping(sequence=91)


def test_stream_close_event() -> None:
    pair = open_pair()
    pair.server.send_stream_close(4, CloseCode.TIMEOUT, "idle")
    pair.flush()
    assert pair.client.next_user_event() == ev.StreamClose(
        logical_stream_id=4, code=CloseCode.TIMEOUT, reason="idle"
    )
    with pytest.raises(UsageError):
        pair.server.send_stream_close(0, CloseCode.NORMAL, None)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"open_timeout": 0},
        {"open_timeout": -1.0},
        {"ping_interval": float("inf")},
        {"ping_timeout": "10"},
        {"max_inflight_opens": 0},
        {"max_queued_opens": -1},
        {"max_queued_opens": True},
        {"max_concurrent_streams": 1.5},
        {"supported_versions": ()},
        {"supported_versions": (0,)},
        {"features": -1},
        {"agent": 5},
    ],
)
def test_config_validation(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        Config(**kwargs)  # type: ignore[arg-type]


def test_config_defaults_and_ping_feature() -> None:
    cfg = Config()
    assert (cfg.open_timeout, cfg.stream_bind_timeout, cfg.negotiation_timeout) == (30, 10, 30)
    assert (cfg.ping_timeout, cfg.ping_interval) == (10, None)
    assert (cfg.max_inflight_opens, cfg.max_concurrent_streams) == (100, 1000)
    assert cfg.max_queued_opens == 10_000
    assert cfg.supported_versions == (1,) and cfg.features == Features(0)
    assert cfg.advertised_features == Features.DATAGRAM_FLOWS  # our extension, default on
    assert Config(datagram_flows=False).advertised_features == Features(0)
    assert Config(ping_interval=15, datagram_flows=False).advertised_features == Features.PING_PONG
    with pytest.raises(AttributeError):
        cfg.open_timeout = 3  # type: ignore[misc]


def test_timer_heap_stays_bounded_under_churn() -> None:
    pair = open_pair()
    for i in range(5000):
        rid = pair.server.open_request("s", Metadata.EMPTY, NO_FLAGS, float(i))
        pair.server.cancel_open(rid, float(i))  # tombstones are trimmed, timers compacted
    sizes = pair.server.table_sizes()
    assert sizes["orphan_requests"] <= 4 * pair.server.config.max_inflight_opens
    assert sizes["timers"] <= 2 * sizes["orphan_requests"] + 64 + 1

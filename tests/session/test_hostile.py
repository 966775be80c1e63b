"""A hostile or broken peer, driven as raw frames on a raw transport connection, against a
real :class:`Session`: the session reacts as specified and its memory stays bounded."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import pytest

from quic_reverse import Config, Role, Session, SessionHandle, TimeoutKind
from quic_reverse.errors import (
    Disconnected,
    OperationTimeout,
    ProtocolError,
    QuicReverseError,
    StreamReset,
)
from quic_reverse.transport.base import Connection, RecvStream, SendStream
from quic_reverse.transport.memory import connection_pair
from quic_reverse.wire import (
    CloseCode,
    Features,
    FrameReader,
    Hello,
    HelloAck,
    Message,
    Metadata,
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

from ..support.timing import MS
from .helpers import WAIT


@dataclass
class RawPeer:
    """The client side of a connection, speaking raw frames."""

    conn: Connection
    send: SendStream
    recv: RecvStream
    reader: FrameReader = field(default_factory=FrameReader)
    inbox: list[Message] = field(default_factory=list)

    async def write(self, *msgs: Message) -> None:
        await self.send.write(b"".join(encode_message_frame(m) for m in msgs))

    async def next(self) -> Message:
        """The next message from the session (bounded wait)."""
        async with asyncio.timeout(WAIT):
            while not self.inbox:
                data = await self.recv.read(65536)
                if not data:
                    raise EOFError("control stream ended")
                self.inbox += [decode(p) for p in self.reader.feed(data)]
        return self.inbox.pop(0)

    async def next_of(self, kind: type[Message]) -> Message:
        for _ in range(10_000):
            msg = await self.next()
            if isinstance(msg, kind):
                return msg
        raise AssertionError(f"no {kind.__name__}")

    async def data_stream(self, header: bytes) -> tuple[SendStream, RecvStream]:
        send, recv = await self.conn.open_bi()
        await send.write(header)
        return send, recv


async def raw_hello(conn: Connection) -> RawPeer:
    send, recv = await conn.open_bi()
    peer = RawPeer(conn, send, recv)
    await peer.write(Hello(protocol_version=1, features=Features(0), agent="raw"))
    assert isinstance(await peer.next(), Hello)
    await peer.write(HelloAck(selected_version=1, selected_features=Features(0)))
    assert isinstance(await peer.next(), HelloAck)
    return peer


@asynccontextmanager
async def hostile(config: Config | None = None) -> AsyncIterator[tuple[SessionHandle, RawPeer]]:
    """A real server session and a raw client peer, negotiated."""
    c, s = connection_pair()
    # The raw peer never answers our session close: do not linger for it.
    config = dataclasses.replace(config or Config(), close_timeout=100 * MS)
    async with asyncio.timeout(WAIT):
        handle, peer = await asyncio.gather(Session(s, Role.SERVER, config).start(), raw_hello(c))
    try:
        yield handle, peer
    finally:
        async with asyncio.timeout(WAIT):
            await handle.close()
        c.close()


async def assert_dead_and_clean(handle: SessionHandle) -> None:
    async with asyncio.timeout(WAIT):
        await handle.wait_closed()
    assert handle.is_closed
    sizes = handle.table_sizes()
    leftovers = {k: v for k, v in sizes.items() if v and k not in ("events", "used_lsids")}
    assert leftovers == {}, sizes
    assert not handle.connection.is_open


@pytest.mark.parametrize(
    "bad",
    [
        b"\x00\x00\x00\x07garbage",
        b"\x00\x10\x00\x00",  # 1 MiB length prefix, no body: rejected on the prefix alone
        encode_message_frame(Hello(protocol_version=1)),  # Hello after negotiation
        b"\x00\x00\x00\x04\x09\x00\x00\x00",  # unknown message index 9
    ],
    ids=["garbage", "oversize-length", "hello-twice", "unknown-message"],
)
async def test_malformed_control_data_fails_every_waiter(bad: bytes) -> None:
    async with hostile() as (handle, peer):
        opener = asyncio.create_task(handle.open("x"))
        pinger = asyncio.create_task(handle.ping())
        events = asyncio.create_task(handle.process_message())
        assert isinstance(await peer.next(), OpenRequest)
        assert isinstance(await peer.next(), Ping)
        await peer.send.write(bad)
        async with asyncio.timeout(WAIT):
            results = await asyncio.gather(opener, pinger, events, return_exceptions=True)
        for r in results:
            assert isinstance(r, ProtocolError), r
        # The peer is told why before the connection goes.
        close = await peer.next()
        assert isinstance(close, StreamClose)
        assert (close.logical_stream_id, close.code) == (0, CloseCode.ERROR)
        await assert_dead_and_clean(handle)
        with pytest.raises(QuicReverseError):
            await handle.open("after")


async def test_slow_loris_negotiation_times_out() -> None:
    c, s = connection_pair()
    send, _recv = await c.open_bi()
    frame = encode_message_frame(Hello(protocol_version=1))
    await send.write(frame[:3])  # a few bytes, then silence
    session = Session(s, Role.SERVER, Config(negotiation_timeout=300 * MS))
    async with asyncio.timeout(WAIT):
        with pytest.raises(OperationTimeout) as info:
            await session.start()
    assert info.value.kind is TimeoutKind.NEGOTIATION
    assert not s.is_open


async def test_silent_connection_negotiation_times_out() -> None:
    _c, s = connection_pair()  # the client never even opens the control stream
    async with asyncio.timeout(WAIT):
        with pytest.raises(OperationTimeout):
            await Session(s, Role.SERVER, Config(negotiation_timeout=200 * MS)).start()


async def test_bad_data_streams_are_reset_and_session_carries_on() -> None:
    async with hostile(Config(stream_bind_timeout=300 * MS)) as (handle, peer):
        unknown = await peer.data_stream(StreamBind(logical_stream_id=99).encode())
        bad_magic = await peer.data_stream(b"XXXX\x01" + bytes(8))
        zero = await peer.data_stream(StreamBind(logical_stream_id=0).encode())
        partial = await peer.data_stream(b"QRB")  # stalls: reset at the bind deadline
        async with asyncio.timeout(WAIT):
            for _send, recv in (unknown, bad_magic, zero, partial):
                with pytest.raises(StreamReset):
                    await recv.read(10)
        await peer.write(Ping(sequence=5))
        assert await peer.next_of(Pong) == Pong(sequence=5)
        assert handle.table_sizes()["held_streams"] == 0
        assert handle.table_sizes()["header_tasks"] == 0
        assert not handle.is_closed


async def test_stream_flood_stays_bounded() -> None:
    async with hostile(Config(stream_bind_timeout=300 * MS)) as (handle, peer):
        streams = [await peer.data_stream(b"QR") for _ in range(200)]
        assert handle.table_sizes()["held_streams"] <= 8
        assert handle.table_sizes()["header_tasks"] <= 8
        async with asyncio.timeout(WAIT):
            for _send, recv in streams:  # the few held ones at their header deadline
                with pytest.raises(StreamReset):
                    await recv.read(10)
        assert not handle.is_closed


async def test_bind_timeout_when_stream_never_comes() -> None:
    async with hostile(Config(stream_bind_timeout=200 * MS)) as (handle, peer):
        opener = asyncio.create_task(handle.open("x"))
        req = await peer.next()
        assert isinstance(req, OpenRequest)
        await peer.write(
            OpenResponse(request_id=req.request_id, status=OpenStatus.ACCEPTED, logical_stream_id=5)
        )
        with pytest.raises(OperationTimeout) as info:
            async with asyncio.timeout(WAIT):
                await opener
        assert info.value.kind is TimeoutKind.STREAM_BIND
        # The stream arriving after all is reset.
        _send, recv = await peer.data_stream(StreamBind(logical_stream_id=5).encode())
        with pytest.raises(StreamReset):
            async with asyncio.timeout(WAIT):
                await recv.read(10)


async def test_streams_and_responses_in_any_order() -> None:
    async with hostile() as (handle, peer):
        openers = [asyncio.create_task(handle.open(f"svc{i}")) for i in range(4)]
        reqs = [await peer.next() for _ in range(4)]
        rids = [r.request_id for r in reqs if isinstance(r, OpenRequest)]
        lsids = {rid: 100 + rid for rid in rids}
        # Streams first (reverse order) for two requests, responses first for the others.
        for rid in reversed(rids[:2]):
            send, _ = await peer.data_stream(StreamBind(logical_stream_id=lsids[rid]).encode())
            await send.write(f"for-{rid}".encode())
            await send.finish()
        for rid in reversed(rids):
            await peer.write(
                OpenResponse(
                    request_id=rid, status=OpenStatus.ACCEPTED, logical_stream_id=lsids[rid]
                )
            )
        for rid in rids[2:]:
            send, _ = await peer.data_stream(StreamBind(logical_stream_id=lsids[rid]).encode())
            await send.write(f"for-{rid}".encode())
            await send.finish()
        async with asyncio.timeout(WAIT):
            streams = await asyncio.gather(*openers)
        for rid, stream in zip(rids, streams, strict=True):
            assert stream.logical_stream_id == lsids[rid]
            assert await stream.read() == f"for-{rid}".encode()
            stream.reset()
        assert handle.table_sizes()["early_streams"] == 0


async def test_open_flood_beyond_limits_is_rejected_and_bounded() -> None:
    cfg = Config(max_concurrent_streams=50, max_queued_opens=100, max_buffered_events=16)
    async with hostile(cfg) as (handle, peer):
        flood = [
            OpenRequest(request_id=i, service="x", metadata=Metadata.EMPTY) for i in range(1, 3001)
        ]
        for i in range(0, len(flood), 500):
            await peer.write(*flood[i : i + 500])
        for i in range(1, 500):  # informational noise as well
            await peer.write(Ping(sequence=i))
        rejected = 0
        async with asyncio.timeout(WAIT):
            while rejected < 3000 - 50 - 100:  # 50 handed out, 100 wait for a slot
                msg = await peer.next()
                if isinstance(msg, OpenResponse):
                    assert msg.status == OpenStatus.rejected(RejectCode.LIMIT_EXCEEDED)
                    rejected += 1
        await peer.write(Ping(sequence=10_000))
        for _ in range(1000):  # the Pongs of the noise come first
            if await peer.next_of(Pong) == Pong(sequence=10_000):
                break
        else:
            raise AssertionError("no Pong for the last Ping")
        sizes = handle.table_sizes()
        assert sizes["incoming"] == 50
        assert sizes["waiting_incoming"] == 100
        assert sizes["events"] <= 50 + 16
        assert not handle.is_closed


async def test_keepalive_detects_silent_peer() -> None:
    cfg = Config(ping_interval=100 * MS, ping_timeout=200 * MS)
    async with hostile(cfg) as (handle, peer):
        assert handle.negotiated_features == Features(0)  # the raw peer offers nothing
        opener = asyncio.create_task(handle.open("x"))
        assert isinstance(await peer.next(), OpenRequest)
        ping = await peer.next()  # the session pings when idle; we never answer
        assert isinstance(ping, Ping) and ping.sequence == 1
        async with asyncio.timeout(WAIT):
            with pytest.raises(Disconnected):
                await opener
            with pytest.raises(Disconnected):
                await handle.process_message()
        await assert_dead_and_clean(handle)


async def test_keepalive_stays_up_with_an_answering_peer() -> None:
    cfg = Config(ping_interval=50 * MS, ping_timeout=5000 * MS)
    async with hostile(cfg) as (handle, peer):
        for expected in range(1, 4):
            ping = await peer.next_of(Ping)
            assert isinstance(ping, Ping) and ping.sequence == expected
            await peer.write(Pong(sequence=ping.sequence))
        assert not handle.is_closed


async def test_peer_session_close_is_answered() -> None:
    async with hostile() as (handle, peer):
        await peer.write(StreamClose(logical_stream_id=0, code=CloseCode.NORMAL, reason="bye"))
        answer = await peer.next()
        assert answer == StreamClose(logical_stream_id=0, code=CloseCode.NORMAL, reason=None)
        event = await handle.process_message()
        assert event is not None and type(event).__name__ == "CloseReceived"
        assert await handle.process_message() is None
        peer.conn.close()  # the closing peer drops the connection once answered
        async with asyncio.timeout(WAIT):
            await handle.wait_closed()


async def test_control_stream_eof_ends_session() -> None:
    async with hostile() as (handle, peer):
        opener = asyncio.create_task(handle.open("x"))
        assert isinstance(await peer.next(), OpenRequest)
        await peer.send.finish()
        async with asyncio.timeout(WAIT):
            assert await handle.process_message() is None
            with pytest.raises(QuicReverseError):
                await opener


async def test_unsolicited_open_responses_are_ignored_with_bounded_logging(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A peer answering opens nobody made neither kills the session nor floods the log."""
    caplog.set_level(logging.WARNING, logger="quic_reverse")
    async with hostile() as (handle, peer):
        bogus = [
            OpenResponse(request_id=i, status=OpenStatus.rejected(RejectCode.UNAUTHORIZED))
            for i in range(1000, 2000)
        ]
        await peer.write(*bogus)
        await peer.write(Ping(sequence=1))
        assert await peer.next_of(Pong) == Pong(sequence=1)  # all of them were processed
        assert not handle.is_closed
    ignored = [r for r in caplog.records if "unknown request" in r.getMessage()]
    assert 1 <= len(ignored) <= 11  # 1, 2, 4, ... 512 of 1000

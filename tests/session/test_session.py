"""The asyncio session API end to end over the in-memory transport and real QUIC (qh3).

Main flows run over both transports; aioquic runs once end to end.
"""

from __future__ import annotations

import asyncio
import logging

import pytest

from quic_reverse import (
    CloseCode,
    CloseReceived,
    Config,
    ControlEvent,
    Features,
    Metadata,
    OpenFlags,
    OpenRequest,
    OpenResponseReceived,
    RejectCode,
    Role,
    Session,
    SessionHandle,
    Stream,
    TimeoutKind,
)
from quic_reverse.errors import (
    EncodeError,
    IncompleteReadError,
    NegotiationError,
    OperationTimeout,
    QuicReverseError,
    SessionClosed,
    StreamRejected,
    StreamReset,
    UsageError,
)
from quic_reverse.transport.memory import connection_pair

from ..support.timing import MS
from .helpers import WAIT, echo, session_pair, start_pair

TRANSPORTS = ["memory", "qh3"]


async def upper(stream: Stream) -> None:
    async for chunk in stream:
        await stream.send(chunk.upper())


async def echo_roundtrip(handle: SessionHandle, service: str, payload: bytes) -> bytes:
    stream = await handle.open(service)
    await stream.send(payload)
    await stream.write_eof()
    data = await stream.read()
    await stream.aclose()
    return data


def assert_no_residue(handle: SessionHandle, *allowed: str) -> None:
    """Every internal table is empty (informational events and ``allowed`` aside)."""
    sizes = handle.table_sizes()
    ignore = {"events", "timers", "tasks", "used_lsids", *allowed}
    leftovers = {k: v for k, v in sizes.items() if v and k not in ignore}
    assert leftovers == {}, sizes


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_negotiation_and_both_directions(transport: str) -> None:
    cfg_c = Config(agent="edge/1", ping_interval=30, features=Features.STRUCTURED_METADATA)
    cfg_s = Config(agent="relay/1", ping_interval=30)
    async with session_pair(transport, cfg_c, cfg_s) as (client, server):
        assert client.role is Role.CLIENT and server.role is Role.SERVER
        assert client.remote_agent == "relay/1" and server.remote_agent == "edge/1"
        assert client.negotiated_version == server.negotiated_version == 1
        both = Features.PING_PONG | Features.DATAGRAM_FLOWS  # (datagram flows: default on)
        assert client.negotiated_features == server.negotiated_features == both
        serve_c = asyncio.create_task(client.serve({"echo": echo, "upper": upper}))
        serve_s = asyncio.create_task(server.serve({"echo": echo}))
        # The reverse open (server -> client) and the ordinary direction.
        assert await echo_roundtrip(server, "upper", b"hello") == b"HELLO"
        assert await echo_roundtrip(client, "echo", b"x" * 200_000) == b"x" * 200_000
        rtt = await server.ping()
        assert 0 <= rtt < WAIT
        await client.close(CloseCode.NORMAL, "bye")
        async with asyncio.timeout(WAIT):
            await serve_c
            await serve_s
        assert client.is_closed and server.is_closed
        assert_no_residue(client)
        assert_no_residue(server)


async def test_version_mismatch() -> None:
    c, s = connection_pair()
    async with asyncio.timeout(WAIT):
        results = await asyncio.gather(
            Session(c, Role.CLIENT, Config()).start(),
            Session(s, Role.SERVER, Config(supported_versions=(2,))).start(),
            return_exceptions=True,
        )
    assert isinstance(results[1], NegotiationError)
    assert "version mismatch" in str(results[1])
    assert isinstance(results[0], QuicReverseError)  # the client learns it cannot go on


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_rejections(transport: str) -> None:
    async with session_pair(transport) as (client, server):
        serve = asyncio.create_task(client.serve({"echo": echo}))
        with pytest.raises(StreamRejected) as info:
            await server.open("nope")
        assert info.value.code is RejectCode.UNSUPPORTED_SERVICE
        assert "nope" in (info.value.reason or "")
        await server.close()
        async with asyncio.timeout(WAIT):
            await serve


async def test_low_level_event_loop_and_metadata() -> None:
    async with session_pair() as (client, server):

        async def edge() -> list[ControlEvent]:
            seen: list[ControlEvent] = []
            while (event := await client.process_message()) is not None:
                seen.append(event)
                match event:
                    case OpenRequest(request_id=rid, service="ssh", metadata=md):
                        assert md.get("user") == "root"
                        stream = await client.accept_open(rid)
                        assert stream.service == "ssh"
                        await stream.send(b"SSH-2.0")
                        await stream.aclose()
                    case OpenRequest(request_id=rid):
                        await client.reject_open(rid, RejectCode.UNAUTHORIZED, "no way")
                    case CloseReceived():
                        pass
            return seen

        task = asyncio.create_task(edge())
        stream = await server.open("ssh", {"user": "root"})
        assert stream.logical_stream_id == 1 and stream.service == "ssh"
        assert await stream.read() == b"SSH-2.0"
        with pytest.raises(StreamRejected) as info:
            await server.open("telnet", b"opaque")
        assert (info.value.code, info.value.reason) == (RejectCode.UNAUTHORIZED, "no way")
        await server.close(CloseCode.NORMAL, "done")
        async with asyncio.timeout(WAIT):
            seen = await task
        assert isinstance(seen[-1], ControlEvent.CloseReceived)
        assert seen[-1].reason == "done"
        assert [type(e).__name__ for e in seen if isinstance(e, OpenRequest)] == [
            "OpenRequestReceived"
        ] * 2


async def test_open_timeout_when_peer_never_answers() -> None:
    async with session_pair(server_config=Config(open_timeout=300 * MS)) as (client, server):
        with pytest.raises(OperationTimeout) as info:
            await server.open("ignored")
        assert info.value.kind is TimeoutKind.OPEN_REQUEST
        assert isinstance(info.value, TimeoutError)
        sizes = server.table_sizes()
        assert sizes["local_opens"] == sizes["open_waiters"] == sizes["inflight"] == 0
        assert sizes["orphan_requests"] == 1  # a tombstone, so a late answer is reset
        # The peer still holds the request; answering it now is harmless.
        event = await client.process_message()
        assert isinstance(event, OpenRequest)
        late = await client.accept_open(event.request_id)
        with pytest.raises(StreamReset):
            await late.read()
        # The reset happened while the header was paired: the tombstone is gone already.
        assert server.table_sizes()["orphan_lsids"] == 0
        assert_no_residue(server)


async def test_cancelled_open_leaves_no_residue_and_late_stream_is_reset() -> None:
    async with session_pair() as (client, server):
        opener = asyncio.create_task(server.open("later"))
        event = await client.process_message()
        assert isinstance(event, OpenRequest)
        opener.cancel()
        with pytest.raises(asyncio.CancelledError):
            await opener
        assert server.table_sizes()["local_opens"] == 0
        assert server.table_sizes()["open_waiters"] == 0
        late = await client.accept_open(event.request_id)
        with pytest.raises(StreamReset):
            await late.read()
        assert server.table_sizes()["orphan_lsids"] == 0
        assert server.table_sizes()["held_streams"] == 0
        assert_no_residue(server)
        # Cancellation with asyncio.timeout, many at once.
        for _ in range(20):
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(MS):
                    await server.open("never")
        assert server.table_sizes()["local_opens"] == 0
        assert server.table_sizes()["open_waiters"] == 0
        assert server.is_closed is False


async def test_inflight_limit_waits_for_a_slot() -> None:
    cfg = Config(max_inflight_opens=2, open_timeout=WAIT)
    async with session_pair(server_config=cfg) as (client, server):
        openers = [asyncio.create_task(server.open("s")) for _ in range(5)]
        first = [await client.process_message() for _ in range(2)]
        assert server.table_sizes()["queued"] == 3
        assert client.table_sizes()["events"] == 0  # only two requests went out
        streams = []
        for event in first:
            assert isinstance(event, OpenRequest)
            streams.append(await client.accept_open(event.request_id))
        for _ in range(3):
            event = await client.process_message()
            assert isinstance(event, OpenRequest)
            streams.append(await client.accept_open(event.request_id))
        async with asyncio.timeout(WAIT):
            opened = await asyncio.gather(*openers)
        assert sorted(s.logical_stream_id for s in opened) == [1, 2, 3, 4, 5]
        for s in streams + opened:
            s.reset()
        assert_no_residue(server)


async def test_queued_open_times_out() -> None:
    cfg = Config(max_inflight_opens=1, open_timeout=300 * MS)
    async with session_pair(server_config=cfg) as (_client, server):
        results = await asyncio.gather(server.open("a"), server.open("b"), return_exceptions=True)
        for r in results:
            assert isinstance(r, OperationTimeout) and r.kind is TimeoutKind.OPEN_REQUEST
        # The first request went out and keeps a tombstone; the queued one was never sent.
        assert server.table_sizes()["orphan_requests"] == 1
        assert_no_residue(server, "orphan_requests")


async def test_limit_exceeded_when_too_many_streams_and_nothing_may_wait() -> None:
    config = Config(max_concurrent_streams=2, max_queued_opens=0)
    async with session_pair(client_config=config) as (client, server):
        released = asyncio.Event()

        async def hold(stream: Stream) -> None:
            await stream.read()  # until the opener finishes
            await stream.aclose()  # frees the slot now
            released.set()

        serve = asyncio.create_task(client.serve({"hold": hold}))
        s1 = await server.open("hold")
        s2 = await server.open("hold")
        with pytest.raises(StreamRejected) as info:
            await server.open("hold")
        assert info.value.code is RejectCode.LIMIT_EXCEEDED
        await s1.write_eof()
        assert await s1.read() == b""
        async with asyncio.timeout(WAIT):
            await released.wait()
        assert client.active_streams == 1
        s3 = await server.open("hold")
        for s in (s2, s3):
            await s.aclose()
        await server.close()
        async with asyncio.timeout(WAIT):
            await serve


async def test_accept_open_ids() -> None:
    async with session_pair() as (client, server):
        openers = [asyncio.create_task(server.open("s")) for _ in range(3)]
        events = [await client.process_message() for _ in range(3)]
        rids = [e.request_id for e in events if isinstance(e, OpenRequest)]
        with pytest.raises(EncodeError):
            await client.accept_open(rids[0], 0)
        a = await client.accept_open(rids[0], 42)
        with pytest.raises(UsageError, match="in use"):
            await client.accept_open(rids[1], 42)
        b = await client.accept_open(rids[1])
        c = await client.accept_open(rids[2])
        assert (a.logical_stream_id, b.logical_stream_id, c.logical_stream_id) == (42, 1, 2)
        opened = await asyncio.gather(*openers)
        assert sorted(s.logical_stream_id for s in opened) == [1, 2, 42]
        with pytest.raises(UsageError, match="no pending"):
            await client.accept_open(999)
        with pytest.raises(EncodeError, match="RejectCode"):
            await client.reject_open(rids[0], 77)  # type: ignore[arg-type]
        with pytest.raises(EncodeError, match="CloseCode"):
            await client.close_stream(1, 9)  # type: ignore[arg-type]


async def test_open_bad_arguments_are_encode_errors_and_session_survives() -> None:
    """Wrong flags or metadata types are the library's EncodeError, not a bare
    ValueError/TypeError, and nothing is left pending."""
    async with session_pair() as (client, server):
        for flags in ("z", -1, 256, 1.5, True):
            with pytest.raises(EncodeError, match="flags"):
                await client.open("s", flags=flags)  # type: ignore[arg-type]
        for metadata in (5, 1.5, object()):
            with pytest.raises(EncodeError, match="mapping"):
                await client.open("s", metadata)  # type: ignore[arg-type]
        opener = asyncio.create_task(client.open("s", {"k": "v"}, flags=OpenFlags(3)))
        event = await asyncio.wait_for(server.process_message(), WAIT)
        assert isinstance(event, OpenRequest)
        assert event.flags == OpenFlags(3) and event.metadata.get("k") == "v"
        stream = await server.accept_open(event.request_id)
        opened = await asyncio.wait_for(opener, WAIT)
        assert opened.logical_stream_id == stream.logical_stream_id


async def test_handler_exception_resets_stream_and_session_survives(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def broken(stream: Stream) -> None:
        await stream.readexactly(3)
        raise RuntimeError("boom")

    async with session_pair() as (client, server):
        serve = asyncio.create_task(client.serve({"broken": broken, "echo": echo}))
        with caplog.at_level(logging.WARNING, logger="quic_reverse"):
            stream = await server.open("broken")
            await stream.send(b"abc")
            with pytest.raises(StreamReset):
                await stream.read()
        assert any("boom" in (r.exc_text or "") for r in caplog.records)
        assert await echo_roundtrip(server, "echo", b"still alive") == b"still alive"
        await server.close()
        async with asyncio.timeout(WAIT):
            await serve


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("direction", ["client-closes", "server-closes"])
async def test_session_close_both_directions(direction: str, transport: str) -> None:
    async with session_pair(transport) as (client, server):
        closer, other = (client, server) if direction == "client-closes" else (server, client)
        events = asyncio.create_task(other.process_message())
        await closer.close(CloseCode.NORMAL, "bye")
        async with asyncio.timeout(WAIT):
            event = await events
            assert event == CloseReceived(code=CloseCode.NORMAL, reason="bye")
            assert await other.process_message() is None
            await other.wait_closed()
        assert closer.is_closed and other.is_closed
        assert not closer.connection.is_open
        with pytest.raises(SessionClosed):
            await other.open("x")
        with pytest.raises(SessionClosed):
            await closer.ping()


async def test_close_fails_pending_work() -> None:
    async with session_pair() as (client, server):
        opener = asyncio.create_task(server.open("pending"))
        assert isinstance(await client.process_message(), OpenRequest)
        assert server.table_sizes()["local_opens"] == 1
        await server.close()
        with pytest.raises(SessionClosed):
            await opener
        assert_no_residue(server)


async def test_stream_api() -> None:
    async def service(stream: Stream) -> None:
        head = await stream.readexactly(4)
        stream.write(head[::-1])
        stream.write(b"|")
        await stream.drain()
        rest = await stream.read(-1)
        await stream.send(rest)

    async with session_pair() as (client, server):

        async def short(stream: Stream) -> None:
            await stream.send(b"xy")

        serve = asyncio.create_task(client.serve({"svc": service, "short": short}))
        async with await server.open("svc") as stream:
            await stream.send(b"abcdtail")
            await stream.write_eof()
            chunks = [chunk async for chunk in stream]
            assert b"".join(chunks) == b"dcba|tail"
            assert stream.at_eof()
        stream2 = await server.open("short")
        with pytest.raises(IncompleteReadError) as info:
            await stream2.readexactly(3)
        assert info.value.partial == b"xy"
        stream2.close()
        await stream2.wait_closed()
        await server.close()
        async with asyncio.timeout(WAIT):
            await serve


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_thousand_concurrent_opens(transport: str) -> None:
    async with session_pair(transport) as (client, server):
        serve = asyncio.create_task(client.serve({"echo": echo}))
        responses = 0

        async def events() -> None:
            """Another task reads the opener's control events meanwhile."""
            nonlocal responses
            while (event := await server.process_message()) is not None:
                if isinstance(event, OpenResponseReceived):
                    responses += 1

        reader = asyncio.create_task(events())

        async def one(i: int) -> tuple[int, bytes]:
            token = f"token-{i}".encode()
            return i, await echo_roundtrip(server, "echo", token)

        async with asyncio.timeout(60):
            results = await asyncio.gather(*(one(i) for i in range(1000)))
        assert all(data == f"token-{i}".encode() for i, data in results)
        assert server.active_streams == 0  # every stream was closed by echo_roundtrip
        assert_no_residue(server)
        await server.close()
        async with asyncio.timeout(WAIT):
            await serve
            await reader
        assert 0 < responses <= 1000  # informational events may be dropped, never invented


async def test_aioquic_end_to_end() -> None:
    async with session_pair("aioquic", Config(agent="edge"), Config(agent="relay")) as (c, s):
        serve = asyncio.create_task(c.serve({"upper": upper}))
        results = await asyncio.gather(
            *(echo_roundtrip(s, "upper", f"m{i}".encode()) for i in range(20))
        )
        assert results == [f"M{i}".encode() for i in range(20)]
        assert c.remote_agent == "relay"
        await s.close(CloseCode.NORMAL, "bye")
        async with asyncio.timeout(WAIT):
            await serve
        assert c.is_closed


async def test_metadata_passthrough_types() -> None:
    async with session_pair() as (client, server):
        got: asyncio.Future[Metadata] = asyncio.get_running_loop().create_future()

        async def edge() -> None:
            event = await client.process_message()
            assert isinstance(event, OpenRequest)
            got.set_result(event.metadata)
            await client.reject_open(event.request_id, RejectCode.SERVICE_UNAVAILABLE)

        task = asyncio.create_task(edge())
        md = Metadata.structured([("a", 1), ("b", True), ("c", b"\x00"), ("d", "x")])
        with pytest.raises(StreamRejected):
            await server.open("m", md)
        assert (await got) == md
        await task


async def test_byte_at_a_time_transport() -> None:
    """Every read returns one byte: framing and StreamBind reading must not assume more."""
    c, s = connection_pair(trickle=True)
    client, server = await start_pair(c, s)
    try:
        serve = asyncio.create_task(client.serve({"upper": upper}))
        results = await asyncio.gather(*(echo_roundtrip(server, "upper", b"abc") for _ in range(5)))
        assert results == [b"ABC"] * 5
        assert await client.ping() >= 0
    finally:
        await server.close(CloseCode.NORMAL, "bye")
    async with asyncio.timeout(WAIT):
        await serve
        await client.wait_closed()

"""Datagram flows through sessions: open/serve, limits, idle timeout, ends, and the
guarantee that a peer without ``Features.DATAGRAM_FLOWS`` never sees any of it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from quic_reverse import Config, SessionHandle
from quic_reverse.errors import (
    ConfigError,
    DatagramFlowClosed,
    DatagramsUnavailable,
    DatagramTooLarge,
    StreamRejected,
    UsageError,
)
from quic_reverse.events import OpenRequestReceived
from quic_reverse.flow import DatagramFlow
from quic_reverse.transport.memory import connection_pair
from quic_reverse.wire import (
    CloseCode,
    Features,
    FrameReader,
    OpenFlags,
    OpenRequest,
    Ping,
    RejectCode,
    decode,
)
from quic_reverse.wire.flows import FLOW_CLOSE_TAG

from ..session.helpers import WAIT, session_pair, start_pair
from ..support.timing import MS, SHORT, eventually

TRANSPORTS = ("memory", "qh3", "aioquic")


async def flow_echo(flow: DatagramFlow) -> None:
    while True:
        try:
            data = await flow.recv()
        except DatagramFlowClosed:
            return
        flow.send(data)


@contextlib.asynccontextmanager
async def serving(server: SessionHandle, **flow_handlers: object) -> AsyncIterator[None]:
    task = asyncio.create_task(server.serve({}, flow_handlers=flow_handlers))  # type: ignore[arg-type]
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task


async def _recv_n(flow: DatagramFlow, n: int, within: float) -> list[bytes]:
    got: list[bytes] = []
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(within):
            while len(got) < n:
                got.append(await flow.recv())
    return got


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_flow_echo_both_directions_of_open(transport: str) -> None:
    """A flow opened by the client (served by the server) and one the other way."""
    async with session_pair(transport) as (client, server):
        assert client.flows_available and server.flows_available
        async with serving(server, echo=flow_echo), serving(client, echo=flow_echo):
            for opener in (client, server):
                async with asyncio.timeout(WAIT):
                    flow = await opener.open_flow("echo")
                # The acceptor chose the id: odd when the client accepted, even when the server did.
                assert flow.flow_id % 2 == (0 if opener is client else 1)
                assert 1000 <= flow.max_datagram_size <= 1500
                sent = [
                    bytes([i % 256]) * (1 + (i * 97) % flow.max_datagram_size) for i in range(50)
                ]
                for data in sent:
                    flow.send(data)
                    await asyncio.sleep(0)
                got = await _recv_n(flow, len(sent), WAIT)
                # Unreliable by contract, but loopback/memory at this rate loses nothing.
                assert sorted(got) == sorted(sent)
                assert flow.sent == 50 and flow.received == 50 and flow.dropped == 0
                flow.close()
                with pytest.raises(DatagramFlowClosed):
                    flow.send(b"x")
        await eventually(
            lambda: client.table_sizes()["flows"] == server.table_sizes()["flows"] == 0,
            WAIT,
            "both flow tables empty after close",
        )
        assert client.active_streams == server.active_streams == 0


class _Recorder:
    """Every control payload and datagram that reaches one side, decoded."""

    def __init__(self, handle: SessionHandle) -> None:
        self.payloads: list[bytes] = []
        self.datagrams: list[bytes] = []
        reader = FrameReader()
        core = handle._core
        original = core.receive_data

        def receive_data(data: bytes, now: float) -> None:
            self.payloads.extend(reader.feed(data))
            original(data, now)

        core.receive_data = receive_data  # type: ignore[method-assign]
        handle.connection.set_datagram_handler(self.datagrams.append)


@pytest.mark.parametrize("transport", ("memory", "qh3"))
@pytest.mark.parametrize("bitless", ("client", "server"))
async def test_peer_without_the_bit_never_sees_a_flow(transport: str, bitless: str) -> None:
    plain = Config(agent="like-rust", datagram_flows=False)
    configs = (plain, None) if bitless == "client" else (None, plain)
    async with session_pair(transport, *configs) as (client, server):
        peer, us = (client, server) if bitless == "client" else (server, client)
        recorder = _Recorder(peer)
        assert us.negotiated_features is not None
        assert not us.negotiated_features & Features.DATAGRAM_FLOWS
        assert not us.flows_available
        with pytest.raises(DatagramsUnavailable, match="DATAGRAM_FLOWS"):
            await us.open_flow("dns")
        # Ordinary traffic still works, and a ping round trip flushes the control stream.
        async with asyncio.timeout(WAIT):
            await us.ping()
        await asyncio.sleep(20 * MS)
        messages = [decode(p) for p in recorder.payloads if p[:4] != FLOW_CLOSE_TAG]
        assert len(messages) == len(recorder.payloads)  # no FlowClose
        assert any(isinstance(m, Ping) for m in messages)  # the recorder saw our traffic
        assert not any(
            isinstance(m, OpenRequest) and m.flags & OpenFlags.DATAGRAM for m in messages
        )
        assert recorder.datagrams == []
        assert us.table_sizes()["local_opens"] == 0


async def test_unknown_flow_service_is_rejected() -> None:
    async with session_pair() as (client, server), serving(server, echo=flow_echo):
        with pytest.raises(StreamRejected) as info:
            async with asyncio.timeout(WAIT):
                await client.open_flow("nope")
        assert info.value.code is RejectCode.UNSUPPORTED_SERVICE


async def test_queue_drops_the_oldest_and_counts() -> None:
    async with session_pair() as (client, server):
        accepted: asyncio.Future[DatagramFlow] = asyncio.get_running_loop().create_future()

        async def keep(flow: DatagramFlow) -> None:
            accepted.set_result(flow)
            await asyncio.sleep(WAIT)

        async with serving(server, sink=keep):
            flow = await client.open_flow("sink", queue_size=4)
            remote = await asyncio.wait_for(accepted, WAIT)
            for i in range(10):
                remote.send(b"%d" % i)
            await eventually(lambda: flow.received == 10, WAIT, "all 10 datagrams received")
            assert flow.dropped == 6 and flow.queued == 4 and flow.received == 10
            assert [await flow.recv() for _ in range(4)] == [b"6", b"7", b"8", b"9"]


async def test_too_large_is_refused_and_flow_survives() -> None:
    async with session_pair() as (client, server), serving(server, echo=flow_echo):
        flow = await client.open_flow("echo")
        limit = flow.max_datagram_size
        assert limit == 1200 - 1  # memory pair's 1200 minus the 1-byte flow id
        with pytest.raises(DatagramTooLarge):
            flow.send(b"x" * (limit + 1))
        flow.send(b"y" * limit)
        assert await _recv_n(flow, 1, WAIT) == [b"y" * limit]


async def test_idle_timeout_closes_both_sides() -> None:
    async with session_pair() as (client, server):
        remote_closed = asyncio.Event()

        async def watch(flow: DatagramFlow) -> None:
            with contextlib.suppress(DatagramFlowClosed):
                while True:
                    await flow.recv()
            assert flow.close_reason is not None and flow.close_reason.code == CloseCode.TIMEOUT
            remote_closed.set()

        async with serving(server, watch=watch):
            flow = await client.open_flow("watch", idle_timeout=50 * MS)
            flow.send(b"keeps it alive once")
            with pytest.raises(DatagramFlowClosed) as info:
                async with asyncio.timeout(WAIT):
                    await flow.recv()
            assert info.value.code == CloseCode.TIMEOUT
            async with asyncio.timeout(WAIT):
                await remote_closed.wait()
        assert server.table_sizes()["flows"] == 0 and server.active_streams == 0


async def test_session_end_closes_flows_and_fails_opens() -> None:
    mc, ms = connection_pair()
    client, server = await start_pair(mc, ms)
    async with serving(server, echo=flow_echo):
        flow = await client.open_flow("echo")
        reader = asyncio.create_task(flow.recv())
        await asyncio.sleep(0)
        await client.close()
        with pytest.raises(DatagramFlowClosed, match="session ended"):
            await asyncio.wait_for(reader, WAIT)
        assert flow.is_closed
    await server.wait_closed()


async def test_cancelled_open_flow_leaves_nothing() -> None:
    async with session_pair() as (client, _server):
        # No serve() on the server: the request stays unanswered until we give up.
        task = asyncio.create_task(client.open_flow("echo"))
        await asyncio.sleep(20 * MS)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        sizes = client.table_sizes()
        assert sizes["local_opens"] == sizes["flow_opens"] == sizes["flows"] == 0


async def test_bad_options_are_config_errors() -> None:
    async with session_pair() as (client, _server):
        with pytest.raises(ConfigError):
            await client.open_flow("x", idle_timeout=0)
        with pytest.raises(ConfigError):
            await client.open_flow("x", queue_size=0)


async def test_transport_without_datagrams_refuses_clearly() -> None:
    mc, ms = connection_pair(max_datagram_size=None)
    client, server = await start_pair(mc, ms)
    try:
        assert not client.flows_available and not server.flows_available
        with pytest.raises(DatagramsUnavailable, match="carries no datagrams"):
            await client.open_flow("echo")
    finally:
        await asyncio.wait_for(asyncio.gather(client.close(), server.close()), SHORT * 4)


async def test_accepting_the_wrong_kind_is_a_usage_error() -> None:
    """A flow request cannot be answered with a stream (the opener would get a flow id
    and a stray data stream), nor a stream request with a flow."""
    async with session_pair() as (client, server):
        flow_open = asyncio.create_task(client.open_flow("f"))
        stream_open = asyncio.create_task(client.open("s"))
        events: dict[str, OpenRequestReceived] = {}
        async with asyncio.timeout(WAIT):
            while len(events) < 2:
                event = await server.process_message()
                assert isinstance(event, OpenRequestReceived)
                events[event.service] = event
        assert events["f"].flags & OpenFlags.DATAGRAM
        with pytest.raises(UsageError, match="use accept_flow"):
            await server.accept_open(events["f"].request_id)
        with pytest.raises(UsageError, match="use accept_open"):
            server.accept_flow(events["s"].request_id)
        # Both requests are still pending and can be answered correctly.
        remote = server.accept_flow(events["f"].request_id)
        stream = await server.accept_open(events["s"].request_id)
        flow = await asyncio.wait_for(flow_open, WAIT)
        assert flow.flow_id == remote.flow_id
        assert (await asyncio.wait_for(stream_open, WAIT)).logical_stream_id == (
            stream.logical_stream_id
        )

"""Fault cases of issue 10 at the session level, each a regression test: a failing
service, conflicting roles, a peer that closes the connection without a session close,
a burst of opens beyond the stream limits, and cancelled accepts."""

from __future__ import annotations

import asyncio
import logging
from typing import Literal

import pytest

from quic_reverse import (
    CloseReceived,
    Config,
    ControlEvent,
    OpenRequest,
    Pong,
    Role,
    Session,
    SessionHandle,
    Stream,
)
from quic_reverse.errors import (
    Disconnected,
    NegotiationError,
    OperationTimeout,
    QuicReverseError,
    SessionClosed,
    StreamRejected,
    StreamReset,
)
from quic_reverse.transport.base import Connection
from quic_reverse.transport.memory import connection_pair
from quic_reverse.wire import CloseCode

from ..support.quic import quic_pair
from ..support.timing import LONG, MS, SHORT
from .helpers import session_pair, start_pair

TRANSPORTS = ["memory", "qh3"]


async def _fail(stream: Stream) -> None:
    raise RuntimeError("service failed")


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_failing_handler_fails_the_open_at_once(transport: str) -> None:
    """Issue 10 item 5: the opener gets a typed StreamReset at once, not a bind timeout."""
    async with session_pair(transport) as (client, server):
        serving = asyncio.create_task(server.serve({"boom": _fail}))
        async with asyncio.timeout(SHORT):  # the bind deadline is 10 s
            for _ in range(3):
                try:
                    stream = await client.open("boom")
                except StreamReset as exc:
                    assert exc.error_code == CloseCode.ERROR
                    assert "service failed" in str(exc)
                else:
                    # The data stream won the race: it reads as reset.
                    with pytest.raises(StreamReset):
                        await stream.read()
                    stream.reset()
            await client.ping()
        serving.cancel()
        await asyncio.gather(serving, return_exceptions=True)


async def test_cancelled_accept_fails_the_open_at_once() -> None:
    """An accept_open() cancelled while its data stream waits for a stream slot answers
    the request (rejected), so the opener fails at once instead of at a deadline."""
    mc, ms = connection_pair(max_streams=1)  # the server may open one data stream
    client, server = await start_pair(mc, ms)
    try:
        async with asyncio.timeout(SHORT):
            first = asyncio.create_task(client.open("a"))
            event = await server.process_message()
            assert isinstance(event, OpenRequest)
            held = await server.accept_open(event.request_id)  # takes the last slot
            await first
            second = asyncio.create_task(client.open("b"))
            event = await server.process_message()
            assert isinstance(event, OpenRequest)
            accept = asyncio.create_task(server.accept_open(event.request_id))
            for _ in range(5):
                await asyncio.sleep(0)
            assert not accept.done()  # waiting in open_bi for a slot
            accept.cancel()
            with pytest.raises(StreamRejected, match="accept did not complete"):
                await second
            await client.ping()
            held.reset()
    finally:
        async with asyncio.timeout(LONG):
            await asyncio.gather(client.close(), server.close())


async def _next_event(handle: SessionHandle) -> ControlEvent | None:
    """The next event that is not the Pong of our own ping."""
    for _ in range(100):
        event = await handle.process_message()
        if not isinstance(event, Pong):
            return event
    raise AssertionError("only Pong events")


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_both_clients_fail_at_once_with_roles_conflict(transport: str) -> None:
    """Issue 10 item 6: both sides Role.CLIENT -> NegotiationError "roles conflict"
    within a round trip, not an OperationTimeout after negotiation_timeout."""
    config = Config(negotiation_timeout=LONG)

    async def both(c: Connection, s: Connection) -> list[BaseException | SessionHandle]:
        async with asyncio.timeout(SHORT):
            return await asyncio.gather(  # type: ignore[return-value]
                Session(c, Role.CLIENT, config).start(),
                Session(s, Role.CLIENT, config).start(),
                return_exceptions=True,
            )

    if transport == "memory":
        mc, ms = connection_pair()
        results = await both(mc, ms)
    else:
        async with quic_pair("qh3") as (qc, qs):
            results = await both(qc, qs)
    conflicts = [r for r in results if isinstance(r, NegotiationError)]
    assert conflicts, results
    assert all("roles conflict" in str(r) for r in conflicts)
    assert all(isinstance(r, QuicReverseError) for r in results), results


async def test_both_servers_timeout_names_the_likely_cause() -> None:
    """Both Role.SERVER over a transport that cannot tell who dialled (the in-memory
    pair): nothing is ever sent, so negotiation times out, but the error says what to
    check. (Over QUIC the conflict is caught at once: see the test below.)"""
    mc, ms = connection_pair()
    config = Config(negotiation_timeout=50 * MS)
    async with asyncio.timeout(LONG):
        results = await asyncio.gather(
            Session(mc, Role.SERVER, config).start(),
            Session(ms, Role.SERVER, config).start(),
            return_exceptions=True,
        )
    for r in results:
        assert isinstance(r, OperationTimeout), r
        assert "also Role.SERVER" in str(r)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_peer_closing_connection_with_code_0_is_a_graceful_close(
    transport: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 10 item 7: a peer that closes the connection with code 0 without
    StreamClose(0) first ends the session normally: serve() returns, the event is
    CloseReceived, the reason a SessionClosed, logged at INFO."""
    caplog.set_level(logging.INFO, logger="quic_reverse")
    async with session_pair(transport) as (client, server):
        serving = asyncio.create_task(server.serve({}))
        await client.ping()
        events = asyncio.create_task(_next_event(client))
        async with asyncio.timeout(LONG):
            server.connection.close(0, b"bye")  # as the Rust relay example does
            await serving  # returns: not an error
            await server.wait_closed()
            await client.wait_closed()
            assert isinstance(await events, CloseReceived)
            assert await client.process_message() is None
        for handle in (client, server):
            assert isinstance(handle.close_reason, SessionClosed), handle.close_reason
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


async def test_connection_closed_with_an_error_code_is_still_a_failure() -> None:
    async with session_pair() as (client, server):
        await client.ping()
        events = asyncio.create_task(_next_event(client))
        server.connection.close(7, b"broken")
        async with asyncio.timeout(LONG):
            with pytest.raises(Disconnected):
                await events
            await client.wait_closed()


def test_library_logger_has_a_null_handler() -> None:
    """Issue 10 (logging): no last-resort stderr output when the app set up nothing."""
    import quic_reverse  # noqa: F401

    handlers = logging.getLogger("quic_reverse").handlers
    assert any(isinstance(h, logging.NullHandler) for h in handlers), handlers


async def test_accept_at_the_transport_stream_limit_waits_unanswered() -> None:
    """At the transport's stream limit the acceptor's data stream waits for a slot
    before the OpenResponse goes out, so the opener waits under its open_timeout (and
    succeeds once a slot frees), not under its shorter stream_bind_timeout."""
    mc, ms = connection_pair(max_streams=1)  # the server may open one data stream
    opener = Config(stream_bind_timeout=100 * MS)
    client, server = await start_pair(mc, ms, client_config=opener)
    try:
        async with asyncio.timeout(LONG):
            first = asyncio.create_task(client.open("a"))
            event = await server.process_message()
            assert isinstance(event, OpenRequest)
            held = await server.accept_open(event.request_id)  # takes the only slot
            a = await first
            second = asyncio.create_task(client.open("b"))
            event = await server.process_message()
            assert isinstance(event, OpenRequest)
            accept = asyncio.create_task(server.accept_open(event.request_id))
            for _ in range(10):  # let the accept reach its wait for a stream slot
                await asyncio.sleep(0)
            assert not accept.done()
            await client.ping()  # a round trip: an OpenResponse sent would be here now
            # Unanswered: the opener waits under open_timeout, not its bind deadline.
            sizes = client.table_sizes()
            assert (sizes["awaiting_response"], sizes["by_lsid"]) == (1, 0), sizes
            assert not second.done()
            held.reset()
            a.reset()
            b = await second
            await (await accept).aclose()
            b.reset()
    finally:
        async with asyncio.timeout(LONG):
            await asyncio.gather(client.close(), server.close())


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_burst_past_the_stream_limits_queues_and_succeeds(transport: str) -> None:
    """Issue 10 item 2 (library part): a burst of opens larger than the peer's
    max_concurrent_streams, our max_inflight_opens and the transport's stream limit
    waits for slots and then succeeds; nothing is refused at once."""
    burst = 200
    acceptor = Config(max_concurrent_streams=20)
    opener = Config(max_inflight_opens=16)
    held = 0
    most_held = 0

    async def hold_then_echo(stream: Stream) -> None:
        nonlocal held, most_held
        held += 1
        most_held = max(most_held, held)
        try:
            async for chunk in stream:
                await stream.send(chunk)
        finally:
            held -= 1

    async with session_pair(transport, client_config=opener, server_config=acceptor) as (
        client,
        server,
    ):
        serving = asyncio.create_task(server.serve({"echo": hold_then_echo}))
        gate = asyncio.Event()

        async def one(i: int) -> bytes:
            stream = await client.open("echo")
            await gate.wait()  # every stream stays open until the burst is all in
            payload = f"#{i}".encode()
            await stream.send(payload)
            await stream.write_eof()
            data = await stream.read()
            await stream.aclose()
            return data

        tasks = [asyncio.create_task(one(i)) for i in range(burst)]
        async with asyncio.timeout(LONG):
            # 20 streams are held open; 16 requests wait at the acceptor for a stream
            # slot, the other 164 at the opener for an in-flight slot: none fails.
            while (
                server.table_sizes().get("waiting_incoming", 0) < 16
                or client.table_sizes()["queued"] < burst - 20 - 16
            ):
                assert not any(t.done() for t in tasks), [t for t in tasks if t.done()]
                await asyncio.sleep(MS)
            gate.set()
            results = await asyncio.gather(*tasks)
        assert results == [f"#{i}".encode() for i in range(burst)]
        assert most_held <= 20
        serving.cancel()
        await asyncio.gather(serving, return_exceptions=True)


async def test_handler_ended_by_the_peer_is_not_logged_as_a_failure(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A handler whose stream the peer stops (STOP_SENDING) ends with one INFO line and
    no traceback; a handler that raises on its own is still an ERROR with a traceback."""
    handler_done = asyncio.Event()

    async def write_forever(stream: Stream) -> None:
        try:
            for _ in range(10_000):  # bounded: the peer stops reading after one chunk
                await stream.send(b"x" * 1024)
        finally:
            handler_done.set()

    caplog.set_level(logging.INFO, logger="quic_reverse")
    async with session_pair("memory") as (client, server):
        serving = asyncio.create_task(server.serve({"stream": write_forever, "boom": _fail}))
        async with asyncio.timeout(SHORT):
            stream = await client.open("stream")
            await stream.readexactly(1024)
            stream.reset()  # STOP_SENDING: the handler's next send fails
            await handler_done.wait()
            for _ in range(3):  # a few turns for the handler's wrap-up to log
                await asyncio.sleep(0)
            with pytest.raises(QuicReverseError):
                bad = await client.open("boom")
                await bad.read()
            await client.ping()
        serving.cancel()
        await asyncio.gather(serving, return_exceptions=True)
    ended = [r for r in caplog.records if "handler for 'stream'" in r.getMessage()]
    assert [r.levelno for r in ended] == [logging.INFO], [r.getMessage() for r in ended]
    assert ended[0].exc_info is None
    failed = [r for r in caplog.records if "handler for 'boom' failed" in r.getMessage()]
    assert [r.levelno for r in failed] == [logging.ERROR]
    assert failed[0].exc_info is not None


@pytest.mark.parametrize("stack", ["qh3", "aioquic"])
@pytest.mark.parametrize("role", [Role.SERVER, Role.CLIENT])
async def test_role_contradicting_the_connection_fails_at_once(
    stack: Literal["qh3", "aioquic"], role: Role
) -> None:
    """Over QUIC the transport knows who dialled, so a role that contradicts it (both
    SERVER, or both CLIENT) is a NegotiationError before any byte is sent, and the peer
    learns it from the connection close instead of its negotiation timeout."""
    config = Config(negotiation_timeout=LONG)  # the test must not pass by timing out
    async with quic_pair(stack) as (dialer, acceptor):
        wrong, right = (dialer, acceptor) if role is Role.SERVER else (acceptor, dialer)
        async with asyncio.timeout(SHORT):
            with pytest.raises(NegotiationError, match="roles conflict"):
                await Session(wrong, role, config).start()
            with pytest.raises((Disconnected, SessionClosed, NegotiationError)):
                await Session(right, role, config).start()  # its role fits; the peer's does not

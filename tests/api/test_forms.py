"""Issue 15 item 1: ``async with`` without the extra ``await`` (connect, serve,
session.start), the awaited forms unchanged, and ``QuicServer.serve_forever()``."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from quic_reverse import (
    AwaitableContext,
    CloseCode,
    Config,
    Role,
    Session,
    SessionClosed,
    UsageError,
)
from quic_reverse.transport.base import Connection
from quic_reverse.transport.quic import ClientTLS, ServerTLS, connect, serve
from tests.support.quic import dev_certificate, quic_pair
from tests.support.timing import LONG, SHORT


def _tls() -> tuple[ServerTLS, ClientTLS]:
    cert, key = dev_certificate()
    return ServerTLS(certfile=cert, keyfile=key), ClientTLS(cafile=cert)


async def test_async_with_serve_connect_and_start() -> None:
    server_tls, client_tls = _tls()
    accepted: asyncio.Queue[Connection] = asyncio.Queue()
    server_side: list[Session] = []

    async def on_connection(conn: Connection) -> None:
        session = Session(conn, Role.SERVER, Config(agent="srv"))
        server_side.append(session)
        async with session.start() as handle:
            await accepted.put(conn)
            await handle.wait_closed()

    async with asyncio.timeout(LONG):
        async with serve("127.0.0.1", 0, tls=server_tls, on_connection=on_connection) as server:
            assert server.is_serving()
            async with connect(*server.address, tls=client_tls) as conn:
                assert conn.is_open
                async with Session(conn, Role.CLIENT).start() as handle:
                    assert handle.remote_agent == "srv"
                    assert await handle.ping() >= 0
                    server_conn = await accepted.get()
                # the block closed the session: the server side saw it close cleanly
                assert handle.is_closed
                await server_conn.wait_closed()
            # the connect block closed the connection
            assert not conn.is_open
        assert not server.is_serving()
        assert server.connection_count == 0


async def test_awaited_forms_still_work() -> None:
    server_tls, client_tls = _tls()

    async def on_connection(conn: Connection) -> None:
        handle = await Session(conn, Role.SERVER).start()
        await handle.wait_closed()

    async with asyncio.timeout(LONG):
        server = await serve("127.0.0.1", 0, tls=server_tls, on_connection=on_connection)
        async with server:
            conn = await connect(*server.address, tls=client_tls)
            handle = await Session(conn, Role.CLIENT).start()
            async with handle:  # the handle itself stays an async context manager
                assert handle.negotiated_version == 1
            assert handle.is_closed
            assert not conn.is_open


async def test_forms_run_as_tasks_and_under_wait_for() -> None:
    """The returned object is a coroutine too: create_task / wait_for keep working."""
    server_tls, client_tls = _tls()

    async def on_connection(conn: Connection) -> None:
        await conn.wait_closed()

    async with serve("127.0.0.1", 0, tls=server_tls, on_connection=on_connection) as server:
        op = connect(*server.address, tls=client_tls)
        assert isinstance(op, AwaitableContext)
        task = asyncio.create_task(op)
        conn = await asyncio.wait_for(task, LONG)
        conn.close()
        await conn.wait_closed()
        conn2 = await asyncio.wait_for(connect(*server.address, tls=client_tls), LONG)
        conn2.close()
        await conn2.wait_closed()


async def test_used_twice_is_a_usage_error() -> None:
    server_tls, client_tls = _tls()

    async def on_connection(conn: Connection) -> None:
        await conn.wait_closed()

    async with serve("127.0.0.1", 0, tls=server_tls, on_connection=on_connection) as server:
        op = connect(*server.address, tls=client_tls)
        conn = await asyncio.wait_for(op, LONG)
        try:
            with pytest.raises(UsageError):
                await op
            with pytest.raises(UsageError):
                async with op:
                    pass
        finally:
            conn.close()
            await conn.wait_closed()


async def test_block_error_closes_connection_with_error_code() -> None:
    server_tls, client_tls = _tls()
    seen: asyncio.Future[Connection] = asyncio.get_running_loop().create_future()

    async def on_connection(conn: Connection) -> None:
        seen.set_result(conn)
        await conn.wait_closed()

    async with serve("127.0.0.1", 0, tls=server_tls, on_connection=on_connection) as server:
        with pytest.raises(KeyError):
            async with asyncio.timeout(LONG), connect(*server.address, tls=client_tls) as conn:
                await seen
                raise KeyError("boom")
        assert not conn.is_open
        server_conn = await asyncio.wait_for(seen, LONG)
        await asyncio.wait_for(server_conn.wait_closed(), LONG)


async def test_session_start_block_error_closes_with_error() -> None:
    """An exception leaving ``async with session.start()`` closes the session with
    CloseCode.ERROR (the peer sees the code), and the exception propagates."""
    async with quic_pair() as (client_conn, server_conn), asyncio.timeout(LONG):
        server_task = asyncio.create_task(Session(server_conn, Role.SERVER).start())
        with pytest.raises(ValueError):
            async with Session(client_conn, Role.CLIENT).start() as client:
                server = await server_task
                raise ValueError("boom")
        assert client.is_closed
        await server.wait_closed()
        reason = server.close_reason
        assert isinstance(reason, SessionClosed)
        assert reason.code is CloseCode.ERROR
        assert reason.reason == "ValueError"


async def test_serve_forever_until_close_and_until_cancel() -> None:
    server_tls, _ = _tls()

    async def on_connection(conn: Connection) -> None:
        await conn.wait_closed()

    server = await serve("127.0.0.1", 0, tls=server_tls, on_connection=on_connection)
    runner = asyncio.create_task(server.serve_forever())
    await asyncio.sleep(0)
    assert not runner.done()
    server.close()
    await asyncio.wait_for(runner, LONG)
    assert not server.is_serving()

    server = await serve("127.0.0.1", 0, tls=server_tls, on_connection=on_connection)
    runner = asyncio.create_task(server.serve_forever())
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.shield(runner), SHORT / 10)
    runner.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(runner, LONG)
    assert not server.is_serving()

"""The client states its QUIC stack in its first Initial and a server with both
stacks runs that connection on it (transport/_stackhint.py): an edge that chose
aioquic's delivery-rate congestion control for a lossy path gets it for the relay's
sending direction too. Real connections over UDP on 127.0.0.1."""

from __future__ import annotations

import asyncio
import hashlib

import pytest

from quic_reverse.errors import ConfigError
from quic_reverse.transport import _stackhint
from quic_reverse.transport._driver import StackConnection
from quic_reverse.transport.base import Connection
from quic_reverse.transport.quic import ClientTLS, Stack, TransportOptions, connect
from tests.support.quic import dev_certificate, quic_pair, quic_server
from tests.support.timing import LONG

OTHER: dict[Stack, Stack] = {"qh3": "aioquic", "aioquic": "qh3"}


def test_stating_ids_are_20_random_bytes_after_the_mark() -> None:
    ids = {_stackhint.initial_dcid("aioquic") for _ in range(64)}
    assert len(ids) == 64
    for cid in ids:
        assert len(cid) == 20 and cid.startswith(_stackhint.MARK)
        assert _stackhint.stated_stack(cid) == "aioquic"
    assert _stackhint.stated_stack(_stackhint.initial_dcid("qh3")) == "qh3"


@pytest.mark.parametrize(
    "cid",
    [
        b"",
        bytes(8),
        bytes(20),
        _stackhint.MARK + b"\x09" + bytes(16),  # unknown stack id
        (_stackhint.MARK + b"\x01" + bytes(16))[:19],  # too short
    ],
)
def test_other_ids_state_nothing(cid: bytes) -> None:
    assert _stackhint.stated_stack(cid) is None


def test_unknown_stack_has_no_id() -> None:
    with pytest.raises(ValueError, match="no stack id"):
        _stackhint.initial_dcid("quiche")


def test_option_must_be_a_bool() -> None:
    with pytest.raises(ConfigError, match="stack_hint must be a bool"):
        TransportOptions(stack_hint="yes")  # type: ignore[arg-type]


def _stack_of(conn: Connection) -> str:
    assert isinstance(conn, StackConnection)
    return conn.stack_name


async def _roundtrip(client: Connection, server: Connection) -> None:
    payload = bytes(range(256)) * 1024
    async with asyncio.timeout(LONG):
        send, recv = await client.open_bi()
        await send.write(payload)
        await send.finish()
        pair = await server.accept_bi()
        assert pair is not None
        got = bytearray()
        while chunk := await pair[1].read():
            got += chunk
        assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
        await pair[0].write(bytes(got[::-1]))
        await pair[0].finish()
        back = bytearray()
        while chunk := await recv.read():
            back += chunk
        assert bytes(back) == payload[::-1]


@pytest.mark.parametrize("server_stack", ["qh3", "aioquic"])
async def test_server_runs_the_connection_on_the_clients_stack(server_stack: Stack) -> None:
    client_stack = OTHER[server_stack]
    async with quic_pair(server_stack, client_stack=client_stack, stack_hint=True) as (
        client,
        server,
    ):
        assert _stack_of(client) == client_stack
        assert _stack_of(server) == client_stack
        await _roundtrip(client, server)


@pytest.mark.parametrize("server_stack", ["qh3", "aioquic"])
async def test_without_the_hint_the_server_keeps_its_stack(server_stack: Stack) -> None:
    async with quic_pair(server_stack, client_stack=OTHER[server_stack], stack_hint=False) as (
        client,
        server,
    ):
        assert _stack_of(server) == server_stack
        await _roundtrip(client, server)


async def test_a_client_stating_the_servers_own_stack_gets_it() -> None:
    async with quic_pair("qh3", stack_hint=True) as (client, server):
        assert _stack_of(server) == "qh3"
        await _roundtrip(client, server)


@pytest.mark.parametrize("server_stack", ["qh3", "aioquic"])
async def test_hint_survives_a_retry(server_stack: Stack) -> None:
    """Under load the server first sends a Retry; the stack is then read from the
    original connection id its token carries."""
    client_stack = OTHER[server_stack]
    cert, _ = dev_certificate()
    accepted: asyncio.Queue[Connection] = asyncio.Queue()

    async def on_connection(conn: Connection) -> None:
        await accepted.put(conn)
        await conn.wait_closed()

    async with quic_server(on_connection, server_stack) as server:
        impl = server._impl
        impl.retry_threshold = 0  # validate every new client with a Retry
        client = await asyncio.wait_for(
            connect(*server.address, tls=ClientTLS(cafile=cert), stack=client_stack), LONG
        )
        try:
            server_conn = await asyncio.wait_for(accepted.get(), LONG)
            assert impl.retries_sent >= 1
            assert _stack_of(server_conn) == client_stack
            await _roundtrip(client, server_conn)
        finally:
            client.close()
            await asyncio.wait_for(client.wait_closed(), LONG)

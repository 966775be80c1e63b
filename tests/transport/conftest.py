"""Fixtures that give the conformance suite a connected pair of any transport.

``transport_kind`` is parametrised over every transport (``memory``, ``qh3``,
``aioquic``; selected tests add the cross-stack pairs of ``CROSS_STACK``);
``make_pair`` opens a (client, server) pair of that kind with optional limits,
and ``transport_pair`` is the default pair. The QUIC pairs run
over real UDP on 127.0.0.1 (``tests.support.quic.quic_pair``); the import is lazy
so the memory tests run even while the QUIC helper is unavailable.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal

import pytest

from quic_reverse.transport.base import Connection
from quic_reverse.transport.memory import connection_pair

TRANSPORTS = ("memory", "qh3", "aioquic")
# "<client>_to_<server>": a client of one QUIC stack against a server of the other.
# Tests opt in with ``@pytest.mark.parametrize("transport_kind", ALL_KINDS)`` (which
# overrides the fixture), since an aioquic client needs ~1 s to reach a qh3 server.
CROSS_STACK = ("qh3_to_aioquic", "aioquic_to_qh3")
ALL_KINDS = TRANSPORTS + CROSS_STACK

StackName = Literal["qh3", "aioquic"]


def stacks_of(kind: str) -> tuple[StackName, StackName]:
    """(client stack, server stack) of a QUIC transport kind."""
    client, _, server = kind.partition("_to_")
    names: dict[str, StackName] = {"qh3": "qh3", "aioquic": "aioquic"}
    return names[client], names[server or client]


Pair = tuple[Connection, Connection]
PairFactory = Callable[..., contextlib.AbstractAsyncContextManager[Pair]]


@pytest.fixture(params=TRANSPORTS)
def transport_kind(request: pytest.FixtureRequest) -> str:
    """The name of the transport under test."""
    kind: str = request.param
    return kind


@pytest.fixture
def make_pair(transport_kind: str) -> PairFactory:
    """Factory: ``async with make_pair(max_streams=4) as (client, server): ...``.

    Options understood by every transport: ``max_streams`` (concurrent
    bidirectional streams each side may open).
    """

    @contextlib.asynccontextmanager
    async def factory(**opts: Any) -> AsyncIterator[Pair]:
        if transport_kind == "memory":
            mem_client, mem_server = connection_pair(**opts)
            try:
                yield mem_client, mem_server
            finally:
                mem_client.close()
                await mem_client.wait_closed()
                await mem_server.wait_closed()
        else:
            from tests.support.quic import quic_pair

            client_stack, server_stack = stacks_of(transport_kind)
            async with quic_pair(server_stack, client_stack=client_stack, **opts) as (
                client,
                server,
            ):
                yield client, server

    return factory


@pytest.fixture
async def transport_pair(make_pair: PairFactory) -> AsyncIterator[Pair]:
    """A connected (client, server) pair with default settings."""
    async with make_pair() as pair:
        yield pair

"""The client side of the QUIC adapters: open a socket, run the handshake.

Two things make a client notice at once what it would otherwise learn only from a
timeout:

* **stateless resets** (RFC 9000 §10.3): a server that lost the connection (it was
  restarted) answers with a datagram ending in the reset token it announced in the
  handshake. :class:`_ClientEndpoint` checks incoming datagrams against that token
  itself (aioquic never checks; this way both stacks behave the same) and ends the
  connection with :class:`~quic_reverse.errors.ConnectionClosed` (``reason ==
  "stateless reset"``);
* **a path that comes back**: a stack retransmits an unanswered Initial with
  exponential backoff (after ~10 s of silence the next try is seconds away). While
  no answer has arrived, :func:`stack_connect` starts a fresh attempt every
  :data:`ATTEMPT_INTERVAL` seconds (keeping the :data:`ATTEMPTS_IN_FLIGHT` newest),
  so a handshake starts within about a second of the path healing; the first
  attempt to complete wins, the others are closed.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, ConnectionClosed, TransportError
from ._driver import StackConnection
from ._errors import stack_call
from ._options import TransportOptions
from ._reset import is_stateless_reset
from ._stackhint import initial_dcid
from ._udp import open_udp_endpoint, route_max_udp_payload

if TYPE_CHECKING:
    from ._stack import QuicConfigurationLike, StackSpec

__all__ = ["ATTEMPTS_IN_FLIGHT", "ATTEMPT_INTERVAL", "client_handshake", "stack_connect"]

logger = logging.getLogger("quic_reverse.transport")

#: Seconds without any answer after which a connect starts a fresh attempt.
ATTEMPT_INTERVAL = 1.0
#: Connect attempts in flight at once (the oldest is dropped for a new one).
ATTEMPTS_IN_FLIGHT = 2

#: ``ConnectionClosed.reason`` of a connection ended by a stateless reset.
STATELESS_RESET = "stateless reset"


class _ClientEndpoint:
    """Feeds a client socket's datagram batches to its one connection, watching for
    a stateless reset from the server."""

    def __init__(self, conn: StackConnection, on_answer: Callable[[], None] | None) -> None:
        self._conn = conn
        self._on_answer = on_answer
        self._reset_token: bytes | None = None
        self._token_known = False

    def datagrams_received(self, datagrams: list[bytes], addr: Any) -> None:
        conn = self._conn
        if self._on_answer is not None:
            self._on_answer()
            self._on_answer = None
        if not self._token_known and conn.handshake_complete:
            self._token_known = True
            self._reset_token = conn._quic.qr_peer_reset_token()
        token = self._reset_token
        # A server that lost the connection answers each of our packets with a reset,
        # so a reset is the last datagram of its batch (the datagrams of one read from
        # one address), or the first of a later one: only those two are checked (a
        # constant-time compare per datagram costs ~6 % of a bulk receiver's CPU).
        if (
            token is not None
            and datagrams
            and (
                is_stateless_reset(datagrams[-1], token)
                or (len(datagrams) > 1 and is_stateless_reset(datagrams[0], token))
            )
        ):
            _reset_by_peer(conn)
            return
        conn.datagrams_received(datagrams, addr)

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None:
            logger.debug("client socket lost: %s", exc)


def _reset_by_peer(conn: StackConnection) -> None:
    """End ``conn`` after a stateless reset: no close frame, nothing more is sent."""
    if conn._closed.is_set():
        return
    host, port = conn.remote_address
    logger.info(
        "%s: stateless reset from %s:%d: the server no longer has this connection (it restarted?)",
        conn.stack_name,
        host,
        port,
    )
    conn._close_error = ConnectionClosed(
        "connection reset by the server (stateless reset: it lost the connection "
        "state, e.g. it restarted)",
        reason=STATELESS_RESET,
        lost=True,
    )
    conn._on_terminated(0, STATELESS_RESET)


async def client_handshake(
    conn: StackConnection,
    host: str,
    port: int,
    options: TransportOptions,
    *,
    on_answer: Callable[[], None] | None = None,
) -> None:
    """Open a client socket for ``conn``, start the handshake and wait for it.

    The socket is closed when the connection terminates. ``on_answer()`` is called
    when the first datagram from the server arrives.

    Raises:
        CertificateError: the peer's certificate was rejected.
        ConnectionClosed: the peer closed the connection during the handshake.
        TransportError: resolution/socket failure, or no handshake within
            ``options.handshake_timeout``.
    """
    loop = asyncio.get_running_loop()
    with stack_call(f"connect to {host}:{port}"):
        transport, addr = await open_udp_endpoint(
            _ClientEndpoint(conn, on_answer),
            host,
            port,
            remote=True,
            socket_buffer=options.socket_buffer,
        )
    conn.attach(transport, addr)
    conn.on_terminated(lambda _conn: transport.close())
    family = socket.AF_INET6 if len(addr) == 4 else socket.AF_INET
    conn._quic.qr_route_known(route_max_udp_payload(family, addr))
    timeout = options.handshake_timeout
    try:
        with stack_call("starting handshake"):
            conn._quic.connect(addr, now=loop.time())
        conn._transmit()
        async with asyncio.timeout(timeout):
            await conn.wait_handshake()
    except TimeoutError:
        conn.abort()
        transport.close()
        raise TransportError(
            f"QUIC handshake with {host}:{port} timed out after {timeout:g} s: no answer "
            "(is the server running, is UDP blocked?)"
        ) from None
    except BaseException:
        conn.abort()
        transport.close()
        raise
    logger.info("%s: connected to %s:%d", conn.stack_name, host, port)


async def stack_connect(
    spec: StackSpec[Any],
    host: str,
    port: int,
    configuration: QuicConfigurationLike,
    options: TransportOptions,
) -> StackConnection:
    """Create a client connection of ``spec``'s stack and run its handshake (in
    staggered attempts while nothing answers; see the module docstring).

    Raises:
        ConfigError: ``configuration`` is a server configuration.
        CertificateError: the server's certificate was rejected.
        ConnectionClosed: the server closed the connection during the handshake.
        TransportError: no handshake within the handshake timeout, or
            resolution/socket failure.
    """
    if not configuration.is_client:
        raise ConfigError("connect() needs a client configuration (is_client=True)")

    def new_connection() -> StackConnection:
        quic = spec.create(configuration, options.max_streams, None)
        if options.stack_hint:
            quic.qr_set_initial_dcid(initial_dcid(spec.name))
        return spec.connection_class(
            spec, quic, is_client=True, options=options, receive_high_water=configuration.max_data
        )

    loop = asyncio.get_running_loop()
    timeout = options.handshake_timeout
    deadline = loop.time() + timeout
    answered = False

    def answer() -> None:
        nonlocal answered
        answered = True

    running: dict[asyncio.Task[None], StackConnection] = {}
    dropped: set[asyncio.Task[None]] = set()
    winner: StackConnection | None = None
    try:
        while (remaining := deadline - loop.time()) > 0:
            if not running or not answered:
                conn = new_connection()
                task = loop.create_task(
                    client_handshake(conn, host, port, options, on_answer=answer)
                )
                running[task] = conn
                if len(running) > ATTEMPTS_IN_FLIGHT:
                    oldest = next(iter(running))
                    del running[oldest]
                    oldest.cancel()  # client_handshake aborts its connection
                    dropped.add(oldest)
                if len(running) > 1:
                    logger.debug(
                        "%s: no answer from %s:%d yet, trying again", spec.name, host, port
                    )
            done, _ = await asyncio.wait(
                running,
                timeout=min(ATTEMPT_INTERVAL, remaining),
                return_when=asyncio.FIRST_COMPLETED,
            )
            for task in done:
                conn = running.pop(task)
                exc = task.exception()
                if exc is not None:
                    raise exc
                if winner is None:
                    winner = conn
                else:
                    conn.abort()
            if winner is not None:
                return winner
    finally:
        for task in running:
            task.cancel()
        pending = set(running) | dropped
        if pending:
            await asyncio.wait(pending)
            for task, conn in running.items():
                if not task.cancelled() and task.exception() is None and conn is not winner:
                    conn.abort()
    raise TransportError(
        f"QUIC handshake with {host}:{port} timed out after {timeout:g} s: no answer "
        "(is the server running, is UDP blocked?)"
    )

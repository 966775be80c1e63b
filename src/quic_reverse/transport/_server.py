"""The server side of the QUIC adapters: one UDP socket, many connections.

:class:`StackServer` routes datagram batches by destination connection id to
:class:`~._driver.StackConnection` objects it creates for new Initials, runs each
connection's handler once its handshake completed, and closes everything on
:meth:`StackServer.close`.

Hostile traffic is handled without state (:mod:`._retry`, :mod:`._reset`):

* an Initial that does not decrypt with its destination connection id's keys is
  dropped before anything is allocated;
* while ``retry_threshold`` or more handshakes are in progress, a new client is
  first sent a Retry; only an Initial with a valid token (bound to its address)
  gets a handshake slot, at most ``max_handshakes`` at once;
* a short-header packet for a connection id the server does not know (it was
  restarted, or the connection is gone) is answered with a stateless reset
  (rate-limited), so the peer ends its connection at once instead of at its
  idle timeout.

Log lines a peer can trigger are throttled (:class:`~._throttle.PeerLog`).

A server may hold configurations for both stacks (``others``): a client that states
its stack in its first Initial (:mod:`._stackhint`) gets a connection of that stack.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, TransportError
from ._driver import StackConnection
from ._errors import StackCall
from ._options import TransportOptions
from ._reset import RateLimit, encode_stateless_reset, static_keys
from ._retry import (
    DEFAULT_RETRY_THRESHOLD,
    RetryTokens,
    encode_retry,
    initial_decrypts,
    parse_initial,
)
from ._stackhint import stated_stack
from ._throttle import PeerLog
from ._udp import open_udp_endpoint

if TYPE_CHECKING:
    from ._stack import QuicConfigurationLike, StackSpec

__all__ = ["StackServer", "stack_serve"]

logger = logging.getLogger("quic_reverse.transport")

#: Stateless resets sent per second at most (each costs one HMAC and one datagram
#: smaller than the packet that triggered it), and the burst allowed.
RESET_RATE = 1000.0
RESET_BURST = 1000.0


class StackServer:
    """UDP dispatcher for one server socket: routes datagram batches to connections.

    Batches arrive grouped by source address (see :mod:`._udp`), are routed by
    destination connection id and handed to the connection in one call, so one
    connection processes a whole burst of packets before it transmits once. Routing
    never looks at the source address: a peer whose address changed (NAT rebinding)
    reaches its connection, whose stack validates the new address and sends there
    (qh3 with help, see :mod:`._rebinding`).
    """

    def __init__(
        self,
        spec: StackSpec[Any],
        configuration: QuicConfigurationLike,
        on_connection: Callable[[Any], Awaitable[None]],
        options: TransportOptions,
        others: Mapping[str, tuple[StackSpec[Any], QuicConfigurationLike]] | None = None,
    ) -> None:
        self._spec = spec
        self._configuration = configuration
        #: Stack name -> (spec, configuration) for clients stating that stack.
        self._stacks: dict[str, tuple[StackSpec[Any], QuicConfigurationLike]] = {
            **(others or {}),
            spec.name: (spec, configuration),
        }
        for name, (_, other) in self._stacks.items():
            if other.connection_id_length != configuration.connection_id_length:
                raise ConfigError(f"{name}: connection id length differs from {spec.name}'s")
        self._options = options
        #: Connections allowed in their handshake at once (see DEFAULT_MAX_HANDSHAKES).
        self.max_handshakes = options.max_handshakes
        #: Handshakes in progress from which new clients are validated with Retry.
        self.retry_threshold = min(DEFAULT_RETRY_THRESHOLD, options.max_handshakes)
        self._handshaking = 0
        keys = static_keys(configuration)
        self._reset_token = keys.reset_token
        self._retry_tokens = RetryTokens(keys.retry_key)
        self._reset_limit = RateLimit(RESET_RATE, RESET_BURST)
        #: Counters of stateless decisions (diagnostics, tests).
        self.initials_dropped = 0
        self.retries_sent = 0
        self.resets_sent = 0
        self._log_limit = PeerLog(logger, logging.WARNING)
        self._log_undecryptable = PeerLog(logger, logging.INFO)
        self._log_bad_token = PeerLog(logger, logging.INFO)
        self._log_retry = PeerLog(logger, logging.INFO)
        self._log_failed = PeerLog(logger, logging.INFO)
        self._on_connection = on_connection
        #: Seconds a new connection may take to complete its handshake.
        self.handshake_timeout = options.handshake_timeout
        self._cid_length: int = configuration.connection_id_length
        self._supported_versions: list[int] = list(configuration.supported_versions)
        self._loop = asyncio.get_running_loop()
        self._connections: dict[bytes, StackConnection] = {}
        self._all: set[StackConnection] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._transport: asyncio.DatagramTransport | None = None
        self._closing = False
        self._close_requested = asyncio.Event()
        self._closed = asyncio.Event()
        self._guard_header = StackCall(
            f"{spec.name} server: parsing a packet header", on_error="log"
        )
        # Any peer can trigger this with one datagram: one warning, then debug lines.
        self._guard_create = StackCall(
            f"{spec.name} server: creating a connection", on_error="log", warn_once=True
        )

    def _version_negotiation(self, dcid: bytes, scid: bytes) -> bytes:
        return bytes(
            self._spec.encode_version_negotiation(
                source_cid=dcid,
                destination_cid=scid,
                supported_versions=self._supported_versions,
            )
        )

    def _new_connection(
        self, original_dcid: bytes, retry_source_cid: bytes | None = None
    ) -> StackConnection:
        spec, configuration = self._spec, self._configuration
        stated = stated_stack(original_dcid) if len(self._stacks) > 1 else None
        if stated is not None and stated != spec.name and stated in self._stacks:
            spec, configuration = self._stacks[stated]
            logger.debug("server: running a connection on %s, as its client asked", stated)
        quic = spec.create(configuration, self._options.max_streams, original_dcid)
        if retry_source_cid is not None:
            quic.qr_retried(retry_source_cid)
        quic.qr_set_reset_token(self._reset_token(quic.host_cid))
        return spec.connection_class(
            spec,
            quic,
            is_client=False,
            options=self._options,
            receive_high_water=configuration.max_data,
        )

    # wiring ----------------------------------------------------------------

    def set_transport(self, transport: asyncio.DatagramTransport) -> None:
        self._transport = transport

    def datagrams_received(self, datagrams: list[bytes], addr: Any) -> None:
        if self._closing:
            return
        batch: list[bytes] = []
        target: StackConnection | None = None
        connections = self._connections
        cid_end = 1 + self._cid_length
        for data in datagrams:
            # Fast path for 1-RTT (short header) packets, nearly all of them: the
            # destination connection id follows the first byte, no parsing needed.
            if data and not data[0] & 0x80:
                conn = connections.get(data[1:cid_end])
                if conn is None and len(data) > cid_end:
                    self._stateless_reset(data, addr, cid_end)
            else:
                conn = self._route(data, addr)
            if conn is not target:
                if batch and target is not None:
                    target.datagrams_received(batch, addr)
                batch = []
                target = conn
            if conn is not None:
                batch.append(data)
        if batch and target is not None:
            target.datagrams_received(batch, addr)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed.set()

    def _route(self, data: bytes, addr: Any) -> StackConnection | None:
        header = None
        with self._guard_header:
            header = self._spec.parse_header(data, self._cid_length)
        if header is None:
            return None
        version, is_initial, dcid, scid = header
        if version is not None and version not in self._supported_versions:
            # RFC 9000 §5.2.2: only for datagrams of 1200+ bytes (no amplification).
            if self._transport is not None and len(data) >= 1200:
                self._transport.sendto(self._version_negotiation(dcid, scid), addr)
            return None
        conn = self._connections.get(dcid)
        if conn is None and is_initial and len(data) >= 1200:
            conn = self._admit(data, addr, dcid)
        return conn

    def _admit(self, data: bytes, addr: Any, dcid: bytes) -> StackConnection | None:
        """A new connection for a client's first Initial, or None (see the module
        docstring: decryption check, Retry under load, handshake limit)."""
        initial = parse_initial(data)
        if initial is None or not initial_decrypts(data, initial):
            self.initials_dropped += 1
            self._log_undecryptable(
                "server: dropping Initials that do not decrypt (from %s)", _where(addr)
            )
            return None
        original_dcid = dcid
        retry_source_cid: bytes | None = None
        if RetryTokens.is_ours(initial.token):
            validated = self._retry_tokens.validate(addr, initial.token, dcid)
            if validated is None:
                self.initials_dropped += 1
                self._log_bad_token(
                    "server: dropping Initials with an invalid or expired Retry token (from %s)",
                    _where(addr),
                )
                return None
            original_dcid, retry_source_cid = validated, dcid
        elif self._handshaking >= self.retry_threshold:
            self._send_retry(initial.version, initial.scid, dcid, addr)
            return None
        if self._handshaking >= self.max_handshakes:
            self.initials_dropped += 1
            self._log_limit(
                "server: %d handshakes in progress (max_handshakes); dropping Initial from %s",
                self._handshaking,
                _where(addr),
            )
            return None
        conn = None
        with self._guard_create:
            conn = self._new_connection(original_dcid, retry_source_cid)
        if conn is None:
            return None
        self._register(conn, dcid, addr)
        return conn

    def _send_retry(self, version: int, client_cid: bytes, dcid: bytes, addr: Any) -> None:
        if self._transport is None:
            return
        source_cid = os.urandom(self._cid_length)
        token = self._retry_tokens.create(addr, dcid, source_cid)
        packet = encode_retry(version, dcid=client_cid, scid=source_cid, odcid=dcid, token=token)
        self._transport.sendto(packet, addr)
        self.retries_sent += 1
        self._log_retry(
            "server: %d handshakes in progress: validating new clients' addresses with "
            "Retry (retry_threshold %d)",
            self._handshaking,
            self.retry_threshold,
        )

    def _stateless_reset(self, data: bytes, addr: Any, cid_end: int) -> None:
        """Answer a short-header packet for an unknown connection id (RFC 9000 §10.3)."""
        if self._transport is None or not self._reset_limit.allow():
            return
        packet = encode_stateless_reset(self._reset_token(data[1:cid_end]), len(data))
        if packet is None:
            return
        self._transport.sendto(packet, addr)
        self.resets_sent += 1
        logger.debug("server: stateless reset to %s", _where(addr))

    def _register(self, conn: StackConnection, dcid: bytes, addr: Any) -> None:
        assert self._transport is not None
        conn.attach(self._transport, addr)
        self._connections[dcid] = conn
        self._connections[conn._quic.host_cid] = conn
        self._all.add(conn)

        def issued(cid: bytes) -> None:
            self._connections[cid] = conn

        def retired(cid: bytes) -> None:
            if self._connections.get(cid) is conn:
                del self._connections[cid]

        conn._cid_issued_callback = issued
        conn._cid_retired_callback = retired
        conn.on_terminated(self._forget)
        self._handshaking += 1  # until _run sees the handshake end (either way)
        task = self._loop.create_task(self._run(conn))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _forget(self, conn: StackConnection) -> None:
        for cid in [c for c, v in self._connections.items() if v is conn]:
            del self._connections[cid]
        self._all.discard(conn)

    async def _run(self, conn: StackConnection) -> None:
        try:
            async with asyncio.timeout(self.handshake_timeout):
                await conn.wait_handshake()
        except TransportError as exc:
            self._log_failed(
                "%s server: handshake failed from %s: %s",
                conn.stack_name,
                _where(conn.remote_address),
                exc,
            )
            conn.abort()
            return
        except TimeoutError:
            # Garbage or spoofed Initials would otherwise hold state until the idle
            # timeout; a handshake that does not finish in time is dropped silently.
            logger.debug("%s server: no handshake from %s", conn.stack_name, conn.remote_address)
            conn.abort()
            return
        finally:
            self._handshaking -= 1
        logger.info("%s server: connection from %s", conn.stack_name, conn.remote_address)
        try:
            await self._on_connection(conn)
        except asyncio.CancelledError:
            pass
        except Exception:
            logger.exception("connection handler failed for %s", conn.remote_address)
        finally:
            if conn.is_open:
                conn.close()

    # public ----------------------------------------------------------------

    @property
    def address(self) -> tuple[str, int]:
        if self._transport is None:
            return ("", 0)
        name = self._transport.get_extra_info("sockname")
        return (str(name[0]), int(name[1]))

    def close(self) -> None:
        """Stop accepting and close every connection (their handlers see it)."""
        if self._closing:
            return
        self._closing = True
        self._close_requested.set()
        logger.info("server on %s:%d closing", *self.address)
        for conn in list(self._all):
            conn.close()
        for task in list(self._tasks):
            task.cancel()

    async def wait_closed(self) -> None:
        """Wait until :meth:`close` was called, then (bounded) for handlers and
        connections to finish; finally release the socket."""
        await self._close_requested.wait()
        tasks = list(self._tasks)
        if tasks:
            await asyncio.wait(tasks, timeout=5.0)
        pending = [c for c in self._all if not c._closed.is_set()]
        if pending:
            waiters = [self._loop.create_task(c.wait_closed()) for c in pending]
            _, late = await asyncio.wait(waiters, timeout=2.0)
            for waiter in late:
                waiter.cancel()
            if late:
                await asyncio.wait(late)
        for conn in list(self._all):
            conn.abort()
        if self._transport is not None:
            self._transport.close()
        self._closed.set()


def _where(addr: Any) -> str:
    """``host:port`` of a socket address, for logs."""
    try:
        return _address(str(addr[0]), int(addr[1]))
    except (TypeError, IndexError, ValueError):
        return repr(addr)


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def bind_error(host: str, port: int, exc: OSError) -> TransportError:
    """A one-line :class:`TransportError` naming the address a bind failed on.

    Raised ``from`` the :class:`OSError`, so callers can still branch on its ``errno``.
    """
    where = _address(host, port)
    if isinstance(exc, socket.gaierror):
        return TransportError(f"cannot resolve {host!r} to bind {where}: {exc.strerror or exc}")
    if exc.errno == errno.EADDRINUSE:
        return TransportError(f"address {where} already in use")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return TransportError(f"permission denied binding {where}")
    if exc.errno == errno.EADDRNOTAVAIL:
        return TransportError(f"address {where} is not available on this host")
    return TransportError(f"cannot bind UDP {where}: {exc.strerror or exc}")


async def stack_serve(
    spec: StackSpec[Any],
    host: str,
    port: int,
    configuration: QuicConfigurationLike,
    on_connection: Callable[[Any], Awaitable[None]],
    options: TransportOptions,
    others: Mapping[str, tuple[StackSpec[Any], QuicConfigurationLike]] | None = None,
) -> StackServer:
    """Bind a UDP endpoint on ``(host, port)`` and serve it with ``spec``'s stack
    (and ``others``' stacks for clients stating one: :mod:`._stackhint`).

    Raises:
        ConfigError: the configuration is not a server one or has no certificate/key.
        TransportError: the address cannot be bound (the message names it, e.g.
            ``address 127.0.0.1:4433 already in use``).
    """
    if configuration.is_client:
        raise ConfigError("serve() needs a server configuration (is_client=False)")
    if configuration.certificate is None or configuration.private_key is None:
        raise ConfigError("serve() needs a certificate and private key in the configuration")
    server = spec.server_class(spec, configuration, on_connection, options, others)
    try:
        transport, _ = await open_udp_endpoint(
            server, host, port, socket_buffer=options.socket_buffer
        )
    except OSError as exc:
        raise bind_error(host, port, exc) from exc
    server.set_transport(transport)
    logger.info("%s: serving on %s", spec.name, _address(*server.address))
    return server

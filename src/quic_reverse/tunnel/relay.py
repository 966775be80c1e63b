"""The relay (public side): accepts edges over QUIC, authenticates them, and publishes
TCP listeners whose connections become reverse opens to an edge's service.

Life of a TCP connection on a forward ``127.0.0.1:2222=edgeA/ssh``: the connection
is owned by a :class:`~quic_reverse.tunnel.pipe.TcpLeg` from accept. The relay reserves
a stream on the best live replica of ``edgeA`` (:mod:`.registry`: the forward's
``balance`` policy; waiting, bounded by ``open_timeout``, while every replica is at
``max_streams`` or while ``edgeA`` has no live replica but has been connected before:
bridging a restart); if ``edgeA`` never connected the TCP client is closed at once
(reason logged). Then ``handle.open("ssh")``: a failure that another replica may not
have (session lost, timeout, ``SERVICE_UNAVAILABLE``, ``LIMIT_EXCEEDED``) is retried on
another replica before the client notices; any other rejection closes the client;
success pipes bytes both ways (:func:`~quic_reverse.tunnel.pipe.pipe`).

Dead edges: an open that gets no answer within ``answer_timeout`` marks its replica
*suspect* (new clients avoid it) and pings it; no Pong within ``answer_timeout`` either
and the replica is dropped at once, its pending opens retried elsewhere. An idle dead
edge is found by keep-alive (``ping_interval`` + ``ping_timeout``).

Security rules enforced here:

* A session is routable only after it authenticated (:mod:`.auth`); one that has not
  within ``auth_timeout`` of its acceptance (negotiation included) is closed.
* The relay never accepts opens from an edge except the one auth open (others are
  rejected ``UNAUTHORIZED``).
* Edge instances (:mod:`.registry`): a reconnect of the same instance replaces its
  old session (so a reconnecting edge is never locked out); another live instance with
  the same name becomes a replica, never a replacement.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from .. import __version__
from ..config import Config, Role
from ..errors import ConfigError, OperationTimeout, QuicReverseError, StreamRejected
from ..events import CloseReceived, OpenRequest
from ..session import Session, SessionHandle
from ..stream import Stream
from ..transport import quic
from ..transport.base import Connection
from ..transport.tls import certificate_fingerprint, generate_self_signed
from ..wire import CloseCode, Metadata, RejectCode
from . import losshint
from .auth import TokenStore, authenticate_edge
from .config import Forward, RelayConfig, load_server_certificate
from .losshint import HintLimiter, LossHint
from .metrics import Observer
from .pipe import TcpLeg, pipe
from .ratelimit import AuthLimiter
from .registry import EdgeRegistry, Pool, Replica, Unavailable
from .udp import UdpForward

if TYPE_CHECKING:
    from .fleet import Fleet

__all__ = ["EdgeSession", "Relay", "ensure_self_signed"]

log = logging.getLogger("quic_reverse.tunnel.relay")

#: The relay judges an edge's path over this many times the edge's window
#: (:data:`.losshint.MIN_SECONDS`), so an edge on ``--stack auto`` switches first.
RELAY_HINT_FACTOR = 3


def ensure_self_signed(state_dir: Path) -> tuple[Path, Path, str]:
    """Return (cert, key, sha256 fingerprint) of the development certificate in
    ``state_dir``, generating it on first use. Reusing it keeps the fingerprint stable
    across relay restarts, so edges pinned to it reconnect."""
    cert = state_dir / "relay-cert.pem"
    key = state_dir / "relay-key.pem"
    if not (cert.exists() and key.exists()):
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        cert_pem, key_pem = generate_self_signed(("localhost",), ("127.0.0.1",))
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(key_pem)
        cert.write_bytes(cert_pem)
    return cert, key, certificate_fingerprint(cert.read_bytes())


#: The former name of :class:`~quic_reverse.tunnel.registry.Replica` (kept as an alias).
EdgeSession = Replica

#: Rejections another replica of the same name may not give: the open is retried there.
RETRY_ON_ANOTHER = frozenset({RejectCode.SERVICE_UNAVAILABLE, RejectCode.LIMIT_EXCEEDED})


class Relay:
    """A running relay. ``await start()``, then ``await wait_stopped()``/``shutdown()``."""

    def __init__(self, config: RelayConfig, tokens: TokenStore) -> None:
        self.config = config
        self.tokens = tokens
        self.fingerprint: str | None = None
        self.registry = EdgeRegistry(
            max_streams=config.max_streams, max_queued=config.max_queued_opens
        )
        self._quic: quic.QuicServer | None = None
        self._tcp: list[asyncio.Server] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._clients: set[asyncio.Task[None]] = set()
        self._stopping = False
        self.quic_address: tuple[str, int] | None = None
        self.forward_addresses: dict[Forward, tuple[str, int]] = {}
        #: Metrics hooks (a no-op unless ``--metrics``: :mod:`.metrics`).
        self.observer = Observer()
        #: One lossy-path hint per edge name per hour at most (:mod:`.losshint`).
        self._loss_hints = HintLimiter()
        #: Per-address limit on connections that do not authenticate (:mod:`.ratelimit`).
        self.auth_limiter = AuthLimiter(config.auth_failure_burst, config.auth_failure_interval)
        #: The TCP listener of each forward (a reload adds and removes forwards).
        self.servers: dict[Forward, asyncio.Server] = {}
        #: The ``udp:`` forwards (tunnel/udp.py), by forward.
        self.udp_forwards: dict[Forward, UdpForward] = {}
        self._udp_closing: set[asyncio.Task[None]] = set()
        #: The fleet (tunnel/fleet.py), with ``--registry``.
        self.fleet: Fleet | None = None

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Load TLS, listen for edges (UDP) and for TCP clients on every forward.

        Raises:
            ConfigError: unusable certificate/key files, or a forward to an edge name
                that has no token.
            QuicReverseError, OSError: cannot listen (the message names the forward).
        """
        cfg = self.config
        missing = [f for f in cfg.forwards if f.edge not in self.tokens.names]
        if missing:
            raise ConfigError(
                f"--forward {missing[0]}: edge {missing[0].edge!r} has no token in the "
                f"tokens file {str(cfg.tokens)!r}"
            )
        if cfg.registry is not None:
            from .fleet import Fleet  # imports redis-py: only in a fleet

            self.fleet = Fleet(self)
        if cfg.self_signed:
            cert, key, fp = ensure_self_signed(cfg.state_dir)
            self.fingerprint = fp
            log.warning(
                "using a self-signed development certificate (%s); edges must pin it: "
                "--fingerprint %s",
                cert,
                fp,
            )
        else:
            assert cfg.cert is not None and cfg.key is not None  # checked by RelayConfig
            cert, key = cfg.cert, cfg.key
            self.fingerprint = load_server_certificate(cert, key)
        tls = quic.ServerTLS(certfile=str(cert), keyfile=str(key), alpn=(cfg.alpn,))
        host, port = cfg.listen
        # Edges open one data stream per tunnelled connection: grant max_streams of them
        # (plus the auth stream and a little slack).
        options = quic.TransportOptions(max_streams=cfg.max_streams + 16)
        self._quic = await quic.serve(
            host,
            port,
            tls=tls,
            on_connection=self.serve_connection,
            stack=cast(quic.Stack, cfg.stack),
            options=options,
        )
        self.quic_address = self._quic.address
        log.info(
            "listening for edges on %s:%d (udp, %s), certificate sha256 %s",
            self.quic_address[0],
            self.quic_address[1],
            cfg.stack,
            self.fingerprint,
        )
        if self.fleet is not None:
            await self.fleet.start()
        # Bridge clients of edges that have not reconnected yet (after a restart).
        self.registry.grace_until = asyncio.get_running_loop().time() + cfg.startup_grace
        for fwd in cfg.forwards:
            await self.listen_forward(fwd)
        log.info(
            "relay ready: %d forward(s), %d edge token(s)",
            len(cfg.forwards),
            len(self.tokens.names),
        )

    async def listen_forward(self, fwd: Forward) -> None:
        """Start ``fwd``'s TCP listener (at start, or when a reload adds it).

        Raises:
            OSError: naming the forward, if its address cannot be listened on.
        """
        cfg = self.config
        if fwd.protocol == "udp":
            udp = UdpForward(
                host=fwd.host,
                port=fwd.port,
                edge=fwd.edge,
                service=fwd.service,
                pool=lambda: self.registry.pool(fwd.edge),
                open_timeout=cfg.open_timeout,
                idle_timeout=cfg.udp_idle_timeout,
                max_flows=cfg.max_udp_flows,
            )
            self.forward_addresses[fwd] = await udp.start()
            self.udp_forwards[fwd] = udp
            return
        try:
            server = await asyncio.get_running_loop().create_server(
                lambda: TcpLeg(
                    linger=cfg.linger, on_connected=lambda leg: self._accepted(fwd, leg)
                ),
                fwd.host,
                fwd.port,
                backlog=cfg.backlog,
            )
        except OSError as exc:
            raise OSError(
                exc.errno,
                f"--forward {fwd}: cannot listen on {fwd.host}:{fwd.port}: {exc.strerror or exc}",
            ) from None
        self._tcp.append(server)
        self.servers[fwd] = server
        sockname = server.sockets[0].getsockname()
        self.forward_addresses[fwd] = (sockname[0], sockname[1])
        log.info("forward %s:%d -> %s/%s", sockname[0], sockname[1], fwd.edge, fwd.service)

    def stop_forward(self, fwd: Forward) -> None:
        """Stop listening on ``fwd`` (a reload removed it); its live connections finish
        (a ``udp:`` forward's flows are closed)."""
        udp = self.udp_forwards.pop(fwd, None)
        if udp is not None:
            closing = asyncio.get_running_loop().create_task(udp.close())
            self._udp_closing.add(closing)
            closing.add_done_callback(self._udp_closing.discard)
            host, port = self.forward_addresses.pop(fwd, (fwd.host, fwd.port))
            log.info("forward udp:%s:%d -> %s/%s removed", host, port, fwd.edge, fwd.service)
            return
        server = self.servers.pop(fwd, None)
        if server is not None:
            server.close()
            self._tcp.remove(server)
            host, port = self.forward_addresses.pop(fwd, (fwd.host, fwd.port))
            log.info("forward %s:%d -> %s/%s removed", host, port, fwd.edge, fwd.service)

    async def shutdown(self) -> None:
        """Graceful stop: no new TCP clients or edges; running forwards get ``grace``
        seconds to finish; then every session is closed cleanly."""
        if self._stopping:
            return
        self._stopping = True
        for server in self._tcp:
            server.close()
        if self.fleet is not None:
            await self.fleet.leave()  # peers stop routing clients here
        await asyncio.gather(*(u.close() for u in self.udp_forwards.values()))
        log.info(
            "shutting down: no new connections, %.1fs grace for open streams", self.config.grace
        )
        if self._clients:
            _, pending = await asyncio.wait(set(self._clients), timeout=self.config.grace)
            for t in pending:
                t.cancel()
            if pending:
                log.info("grace period over: aborting %d stream(s)", len(pending))
                await asyncio.gather(*pending, return_exceptions=True)
        if self.fleet is not None:
            await self.fleet.close()
        await asyncio.gather(
            *(
                self._close_edge(e, CloseCode.NORMAL, "relay shutting down")
                for e in self.registry.clear()
            ),
            return_exceptions=True,
        )
        for server in self._tcp:
            with contextlib.suppress(Exception):
                await server.wait_closed()
        if self._quic is not None:
            self._quic.close()
            with contextlib.suppress(Exception):
                await self._quic.wait_closed()  # bounded by the transport
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        log.info("relay stopped")

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # ------------------------------------------------------------------ edges

    def _session_config(self) -> Config:
        cfg = self.config
        return Config(
            agent=f"quic-reverse-relay/{__version__}",
            negotiation_timeout=cfg.auth_timeout,
            open_timeout=cfg.open_timeout,
            ping_interval=cfg.ping_interval,
            ping_timeout=cfg.ping_timeout,
            # The pool admits at most max_streams opens per session at once.
            max_queued_opens=cfg.max_streams,
            # A peer relay of the fleet opens streams here (tunnel/fleet.py).
            max_concurrent_streams=cfg.max_streams,
        )

    async def serve_connection(self, conn: Connection) -> None:
        """One edge connection (the QUIC server's handler; any transport works, e.g.
        the memory transport in tests): negotiate and authenticate within
        ``auth_timeout`` of now (one deadline for both), then serve until it ends."""
        peer = "{}:{}".format(*conn.remote_address)
        if self._stopping:
            conn.close(0, b"relay shutting down")
            return
        if not self.auth_limiter.admit(conn.remote_address[0]):
            conn.close(0, b"too many failed authentications")
            return
        log.info("edge connection from %s", peer)
        expired = False

        def expire() -> None:
            nonlocal expired
            expired = True
            log.warning(
                "edge %s did not authenticate within %.1fs; closing",
                peer,
                self.config.auth_timeout,
                extra={"peer": True},
            )
            conn.close(0, b"authentication timeout")

        deadline = asyncio.get_running_loop().call_later(self.config.auth_timeout, expire)
        handle: SessionHandle | None = None
        try:
            handle = await Session(conn, Role.SERVER, self._session_config()).start()
            identity = await authenticate_edge(
                handle, self.tokens, peer, fleet_token=self.fleet.token if self.fleet else None
            )
        except OperationTimeout:
            if not expired:
                expire()
            self.observer.auth_failure()
            await self._abandon(handle, conn, "authentication timeout")
            return
        except QuicReverseError as exc:
            if not expired:
                log.warning(
                    "edge %s: session failed before authentication: %s",
                    peer,
                    exc,
                    extra={"peer": True},
                )
            self.observer.auth_failure()
            await self._abandon(handle, conn, "error")
            return
        finally:
            deadline.cancel()
        if identity is None or expired:
            self.observer.auth_failure()
            await self._abandon(handle, conn, "authentication failed")
            return
        self.auth_limiter.succeeded(conn.remote_address[0])
        if self._stopping:
            await self._abandon(handle, conn, "relay shutting down")
            return
        if identity.relay and self.fleet is not None:
            await self.fleet.serve_peer(handle, conn, identity)
            return
        edge = Replica(
            name=identity.name,
            handle=handle,
            connection=conn,
            address=peer,
            instance=identity.instance,
        )
        old = self.registry.add(edge)  # new TCP clients may use the new session now
        self.observer.edge_up(edge)
        replicas = len(self.registry.pool(edge.name).live())
        if old is not None:
            log.info(
                "edge %r reconnected from %s: replacing its session from %s",
                edge.name,
                edge.describe(),
                old.address,
            )
            self._spawn(
                self._close_edge(old, CloseCode.NORMAL, "replaced by a new session"),
                f"retire {edge.name}",
            )
        log.info(
            "edge %r authenticated from %s (agent %r); %d live replica(s)",
            edge.name,
            edge.describe(),
            handle.remote_agent,
            replicas,
            extra={"edge": edge.name, "instance": edge.instance, "client": peer},
        )
        try:
            await self._serve_edge(edge)
        finally:
            self.registry.remove(edge)
            self.observer.edge_down(edge)
            if not edge.retired:
                await self._close_edge(edge, CloseCode.NORMAL, "session ended")

    async def _serve_edge(self, edge: Replica) -> None:
        """Process an authenticated edge's control events until the session ends."""
        handle = edge.handle
        # A longer window than the edge's: an edge on --stack auto (the default) acts
        # on the same evidence after one window, and its drained session is not judged.
        hint = LossHint(
            f"edge {edge.name!r} ({edge.address})",
            key=edge.name,
            limiter=self._loss_hints,
            min_seconds=RELAY_HINT_FACTOR * losshint.MIN_SECONDS,
        )
        while True:
            try:
                event = await handle.process_message()
            except QuicReverseError as exc:
                if not edge.retired:
                    log.warning("edge %r (%s): session lost: %s", edge.name, edge.address, exc)
                return
            # Every event (at least the edge's keep-alive Ping every ping_interval)
            # lets the lossy-path hint look at the path (.losshint).
            if not edge.draining:
                hint.poll(handle.path_stats, time.monotonic())
            if event is None:
                if not edge.retired:
                    log.info("edge %r (%s) disconnected", edge.name, edge.address)
                return
            if isinstance(event, CloseReceived):
                log.info(
                    "edge %r (%s) closed the session: %s %r",
                    edge.name,
                    edge.address,
                    event.code.name,
                    event.reason or "",
                )
                return
            if isinstance(event, OpenRequest):
                log.warning(
                    "edge %r asked to open %r; relays do not accept opens: rejected",
                    edge.name,
                    event.service,
                )
                with contextlib.suppress(QuicReverseError):
                    await handle.reject_open(
                        event.request_id, RejectCode.UNAUTHORIZED, "relay accepts no opens"
                    )

    async def _close_edge(self, edge: Replica, code: CloseCode, reason: str) -> None:
        """Abort the edge's TCP forwards and close its session (bounded by the
        session's ``close_timeout``)."""
        edge.retired = True
        for task in list(edge.forwards):
            task.cancel()
        if edge.forwards:
            await asyncio.gather(*edge.forwards, return_exceptions=True)
        with contextlib.suppress(QuicReverseError):
            await edge.handle.close(code, reason)
        edge.connection.close(0, reason.encode())

    async def _abandon(self, handle: SessionHandle | None, conn: Connection, reason: str) -> None:
        if handle is not None:
            with contextlib.suppress(QuicReverseError):
                await handle.close(CloseCode.ERROR, reason)
        conn.close(0, reason.encode())

    # ------------------------------------------------------------------ TCP clients

    def _accepted(self, fwd: Forward, leg: TcpLeg) -> None:
        if self._stopping:
            leg.abort()
            return
        task = asyncio.create_task(self._on_tcp(fwd, leg), name=f"tcp {leg.peer}")
        self._clients.add(task)
        task.add_done_callback(self._clients.discard)

    async def _open(
        self, fwd: Forward, pool: Pool, leg: TcpLeg, target: str
    ) -> tuple[Replica, Stream] | None:
        """A stream to ``fwd``'s service on one replica, trying others on failures
        another replica may not have; ``None`` (reason logged) if there is none."""
        task = asyncio.current_task()
        assert task is not None
        deadline = asyncio.get_running_loop().time() + self.config.open_timeout
        tried: set[Replica] = set()
        why = ""
        client = leg.peer
        # "client" is shown in the edge's logs; with "via" (the forward's address it
        # came in on) the edge recognises its own connections: a forwarding loop.
        metadata = Metadata.structured({"client": client, "via": leg.local})
        balance = fwd.balance or self.config.balance
        client_ip = client.rpartition(":")[0] or client
        while True:
            try:
                replica = await pool.acquire(tried, deadline, balance=balance, client=client_ip)
            except Unavailable as exc:
                if why:
                    log.warning(
                        "tcp %s -> %s: %s; %s; closing the client", client, target, why, exc
                    )
                else:
                    log.warning("tcp %s -> %s: %s; closing the client", client, target, exc)
                return None
            try:
                stream = await self._open_on(pool, replica, fwd.service, metadata)
            except StreamRejected as exc:
                self._release(pool, replica, task)
                if exc.code not in RETRY_ON_ANOTHER:
                    log.warning("tcp %s -> %s: edge rejected the open: %s", client, target, exc)
                    return None
                if exc.code == RejectCode.SERVICE_UNAVAILABLE and exc.reason == "stopping":
                    # The edge is shutting down: no new streams for it (clients wait for
                    # another replica, e.g. its restarted process).
                    replica.draining = True
                why = f"replica {replica.describe()} rejected the open: {exc}"
            except QuicReverseError as exc:
                self._release(pool, replica, task)
                why = f"open on replica {replica.describe()} failed: {exc}"
            except asyncio.CancelledError:
                self._release(pool, replica, task)
                raise
            else:
                # Only now is the client bound to this replica: a session replaced or
                # dropped while the open was pending fails the open (retried on another
                # replica) instead of cancelling the client.
                replica.forwards.add(task)
                return replica, stream
            tried.add(replica)
            if pool.live(tried):
                log.info("tcp %s -> %s: %s; trying another replica", client, target, why)

    async def _open_on(
        self, pool: Pool, replica: Replica, service: str, metadata: Metadata
    ) -> Stream:
        """``replica.handle.open``; with no answer within ``answer_timeout`` the replica
        is checked (:meth:`_check`), and dropped if dead (the open then fails)."""
        opening = asyncio.ensure_future(replica.handle.open(service, metadata))
        try:
            done, _ = await asyncio.wait({opening}, timeout=self.config.answer_timeout)
            if not done:
                await self._check(pool, replica)
            return await opening
        finally:
            if not opening.done():
                opening.cancel()
                await asyncio.gather(opening, return_exceptions=True)

    async def _check(self, pool: Pool, replica: Replica) -> None:
        """Wait for the liveness check of ``replica`` (one at a time per replica)."""
        if replica.check is None or replica.check.done():
            replica.check = asyncio.create_task(
                self._liveness(pool, replica), name=f"check {replica.name}"
            )
        await asyncio.shield(replica.check)

    async def _liveness(self, pool: Pool, replica: Replica) -> bool:
        """An open went unanswered: mark the replica suspect and ping it. No Pong
        within ``answer_timeout``: the edge is dead, its session is dropped now (its
        pending opens fail and are retried on another replica)."""
        timeout = self.config.answer_timeout
        pool.suspected(replica, True)
        log.info(
            "edge %r (%s): an open got no answer within %.1fs; checking it",
            replica.name,
            replica.describe(),
            timeout,
        )
        try:
            async with asyncio.timeout(timeout):
                await replica.handle.ping()
        except (TimeoutError, QuicReverseError) as exc:
            if replica.live:
                log.warning(
                    "edge %r (%s): no answer to an open nor to a ping (%s); dropping its session",
                    replica.name,
                    replica.describe(),
                    str(exc) or f"{timeout:g}s",
                )
                replica.retired = True
                self.registry.remove(replica)
                replica.connection.close(0, b"edge not answering")
            return False
        pool.suspected(replica, False)
        return True

    @staticmethod
    def _release(pool: Pool, replica: Replica, task: asyncio.Task[None]) -> None:
        replica.forwards.discard(task)
        pool.release(replica)

    async def _on_tcp(self, fwd: Forward, leg: TcpLeg) -> None:
        client = leg.peer
        target = f"{fwd.edge}/{fwd.service}"
        task = asyncio.current_task()
        assert task is not None
        pool = self.registry.pool(fwd.edge)
        started = time.monotonic()
        self.observer.forward_opened(fwd)
        used: Replica | None = None
        outcome, up, down = "cancelled", 0, 0
        try:
            fleet = self.fleet
            if fleet and not pool.live() and await fleet.forward(fwd, leg, target, pool):
                return  # served through a peer relay (or closed, reason logged)
            opened = await self._open(fwd, pool, leg, target)
            if opened is None:
                outcome = "refused"
                leg.close()
                return
            replica, stream = opened
            used = replica
            try:
                lsid = stream.logical_stream_id
                log.info(
                    "tcp %s -> %s: stream %d opened",
                    client,
                    target,
                    lsid,
                    extra={
                        "client": client,
                        "edge": fwd.edge,
                        "service": fwd.service,
                        "stream": lsid,
                    },
                )
                result = await pipe(leg, stream)
            finally:
                self._release(pool, replica, task)
            outcome, up, down = result.outcome, result.tcp_to_stream, result.stream_to_tcp
            log.info(
                "tcp %s -> %s: stream %d %s%s; %d bytes up, %d bytes down, %.2fs",
                client,
                target,
                lsid,
                result.outcome,
                f" ({result.detail})" if result.detail else "",
                result.tcp_to_stream,
                result.stream_to_tcp,
                time.monotonic() - started,
                extra={
                    "client": client,
                    "edge": fwd.edge,
                    "service": fwd.service,
                    "stream": lsid,
                    "bytes_up": up,
                    "bytes_down": down,
                    "duration": round(time.monotonic() - started, 6),
                },
            )
        except asyncio.CancelledError:
            log.info(
                "tcp %s -> %s: aborted (edge session replaced or relay stopping)", client, target
            )
            raise
        finally:
            leg.abort_unless_closing()  # safety net: never leave the client connected
            self.observer.forward_closed(fwd, used, outcome, up, down)

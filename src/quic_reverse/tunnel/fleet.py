"""The relay fleet: relays sharing one registry (:mod:`.redis_registry`), any relay
reaching any edge through at most one relay-to-relay hop.

Relay A started with ``--registry`` publishes the edge names connected to it and its
liveness. A TCP client arriving at A for edge X that has no live session at A is
served through relay B that holds X:

1. A looks X up in the registry (read again at most once per heartbeat while a
   route works; the relays holding X whose liveness is current,
   minus any that failed for this client or are known down);
2. A uses its one session to B (:class:`PeerLink`: QUIC to B's ``--advertise``
   address, B's certificate checked with ``--fleet-ca`` or ``--fleet-fingerprint``,
   authenticated with the fleet secret; made on first use, kept alive by pings, made
   again after a failure);
3. A opens ``"X/SERVICE"`` on it with metadata ``{"client", "via", "hop": 1, "balance"}``; B opens
   ``SERVICE`` on its own session to X (the same balancing and replica retries as for
   its own clients; the metadata X sees is the one a direct client would give) and
   answers A's open only once X answered (X's rejection is passed on); then B splices
   the two streams and A pipes its TCP client into its stream.

Loops are impossible: B serves fleet opens from its own edges only, never forwarding
them again, and rejects an open whose ``hop`` is not 1. An edge sees no difference.

A route that fails (no QUIC answer, the peer session lost, ``SERVICE_UNAVAILABLE``
because X left B) is skipped for this client, which tries the next route, or waits
(polling the registry, bounded by ``open_timeout``) for X to appear anywhere,
including on A itself. A relay that cannot be reached is avoided for ``registry_ttl``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, cast

from .. import __version__
from ..config import Config, Role
from ..errors import ConfigError, QuicReverseError, StreamRejected, TransportError
from ..events import CloseReceived, OpenRequest
from ..session import Session, SessionHandle
from ..stream import Stream
from ..transport import quic
from ..transport.base import Connection
from ..wire import CloseCode, Metadata, RejectCode
from .auth import FLEET_KEY, TOKEN_KEY, EdgeIdentity, read_edge_token
from .config import AUTH_SERVICE, BALANCE_POLICIES, Forward, validate_service_name
from .pipe import TcpLeg, pipe
from .redis_registry import RedisRegistry, Route
from .registry import Pool, Replica, Unavailable

if TYPE_CHECKING:
    from .relay import Relay

__all__ = ["HOP_KEY", "Fleet", "PeerLink", "splice"]

log = logging.getLogger("quic_reverse.tunnel.fleet")

#: Metadata key of a fleet open: relay-to-relay hops so far (always 1: one hop at most).
HOP_KEY = "hop"
#: Metadata key of a fleet open: the forward's balancing policy (B applies it).
BALANCE_KEY = "balance"
#: How often a client waiting for its edge to appear anywhere re-reads the registry.
ROUTE_POLL = 0.25
#: Bytes read per chunk when splicing two streams.
CHUNK = 64 * 1024


class PeerLink:
    """A's session to one peer relay B (one per pair, shared by every client)."""

    def __init__(self, relay: str, advertise: tuple[str, int]) -> None:
        self.relay = relay
        self.advertise = advertise
        self.conn: Connection | None = None
        self.handle: SessionHandle | None = None
        self.task: asyncio.Task[None] | None = None
        self.lock = asyncio.Lock()

    @property
    def alive(self) -> bool:
        return self.handle is not None and not self.handle.is_closed

    def drop(self, reason: str) -> Connection | None:
        """Close the session now; returns its connection (to wait for: its socket)."""
        conn = self.conn
        if conn is not None:
            conn.close(0, reason.encode())
        self.conn = self.handle = None
        return conn


async def _copy(src: Stream, dst: Stream) -> int:
    total = 0
    while True:
        data = await src.read(CHUNK)
        if not data:
            await dst.write_eof()
            return total
        await dst.send(data)
        total += len(data)


async def splice(a: Stream, b: Stream) -> tuple[int, int]:
    """Forward bytes both ways between two streams until both directions ended (FIN);
    on a failure (or cancellation) of either, both are reset. Returns the byte counts
    (a to b, b to a)."""
    ab = asyncio.create_task(_copy(a, b), name="splice a->b")
    ba = asyncio.create_task(_copy(b, a), name="splice b->a")
    clean = False
    try:
        await asyncio.wait((ab, ba), return_when=asyncio.FIRST_EXCEPTION)
        clean = all(t.done() and t.exception() is None for t in (ab, ba))
        if clean:
            with contextlib.suppress(QuicReverseError):
                await a.aclose()
            with contextlib.suppress(QuicReverseError):
                await b.aclose()
            return ab.result(), ba.result()
        return 0, 0
    finally:
        if not clean:
            for s in (a, b):
                with contextlib.suppress(QuicReverseError, OSError):
                    s.reset(int(CloseCode.RESET))
        for t in (ab, ba):
            t.cancel()
        await asyncio.gather(ab, ba, return_exceptions=True)


class Fleet:
    """The fleet side of one relay: its registry entry, its sessions to peer relays
    (forwarding, side A) and the peer sessions it serves (side B)."""

    def __init__(self, relay: Relay) -> None:
        cfg = relay.config
        assert cfg.registry is not None and cfg.fleet_token_file is not None
        self.relay = relay
        self.config = cfg
        self.relay_id = secrets.token_hex(8)
        try:
            self.token = read_edge_token(cfg.fleet_token_file)
        except ConfigError as exc:
            raise ConfigError(f"--fleet-token-file: {exc}") from None
        #: The address is the listen address until :meth:`start` knows the real one.
        self.registry = RedisRegistry(
            cfg.registry,
            relay_id=self.relay_id,
            advertise=cfg.advertise or cfg.listen,
            ttl=cfg.registry_ttl,
            heartbeat=cfg.registry_heartbeat,
        )
        self._links: dict[str, PeerLink] = {}
        #: Peer relay id -> loop time until which it is avoided (it could not be reached).
        self._down: dict[str, float] = {}
        #: Closed peer connections being waited for.
        self._closing: set[asyncio.Task[None]] = set()
        #: Counters (logs, metrics, tests).
        self.forwarded = 0
        self.served = 0
        self._tls = quic.ClientTLS(
            alpn=(cfg.alpn,),
            cafile=str(cfg.fleet_ca) if cfg.fleet_ca is not None else None,
            verify=cfg.fleet_ca is not None,
            pin_sha256=cfg.fleet_fingerprint,
        )

    async def start(self) -> None:
        """Join the registry (the relay is listening: its address is known)."""
        cfg = self.config
        assert cfg.registry is not None and self.relay.quic_address is not None
        advertise = cfg.advertise or self.relay.quic_address
        self.registry.advertise = "{}:{}".format(*advertise)
        await self.registry.start()
        self.relay.registry.listeners.append(self._changed)
        log.info(
            "fleet: relay %s advertising %s:%d in registry %s (ttl %.1fs, heartbeat %.1fs)",
            self.relay_id,
            advertise[0],
            advertise[1],
            cfg.registry,
            cfg.registry_ttl,
            cfg.registry_heartbeat,
        )

    async def leave(self) -> None:
        """Remove this relay and its edges from the registry (graceful stop: peers
        stop routing clients here; the clients already forwarded go on)."""
        await self.registry.close()

    async def close(self) -> None:
        """Close the sessions to peer relays (after :meth:`leave` and the grace time)."""
        await self.leave()
        for link in self._links.values():
            if link.task is not None:
                link.task.cancel()
            self._drop(link, "relay shutting down")
        tasks = [lk.task for lk in self._links.values() if lk.task is not None]
        await asyncio.gather(*tasks, *self._closing, return_exceptions=True)

    def _drop(self, link: PeerLink, reason: str) -> None:
        """Close ``link``'s session; its connection is waited for in the background."""
        conn = link.drop(reason)
        if conn is not None:
            task = asyncio.create_task(conn.wait_closed(), name=f"close peer {link.relay}")
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    def _changed(self, name: str) -> None:
        """The local sessions of edge ``name`` changed: publish them."""
        pool = self.relay.registry.pool(name)
        instances = tuple(r.instance or r.address for r in pool.replicas if not r.retired)
        self.registry.publish(name, instances)

    # ------------------------------------------------------------------ side A

    async def forward(self, fwd: Forward, leg: TcpLeg, target: str, pool: Pool) -> bool:
        """Serve a TCP client of ``fwd`` through a peer relay holding ``fwd.edge``.

        Returns False as soon as the edge has a live session here (the caller serves
        the client locally), True when the client was handled (served, or closed with
        the reason logged)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.open_timeout
        tried: set[str] = set()
        why = ""
        client = leg.peer
        while True:
            if pool.live():
                return False
            now = loop.time()
            routes = [
                r
                for r in await self.registry.lookup(fwd.edge, fresh=bool(tried or why))
                if r.relay not in tried and self._down.get(r.relay, 0.0) <= now
            ]
            if routes:
                route = random.choice(routes)
                tried.add(route.relay)
                try:
                    stream = await self._open_via(route, fwd, leg, deadline)
                except StreamRejected as exc:
                    if exc.code not in (
                        RejectCode.SERVICE_UNAVAILABLE,
                        RejectCode.LIMIT_EXCEEDED,
                    ):
                        log.warning(
                            "tcp %s -> %s via relay %s: rejected: %s",
                            client,
                            target,
                            route.relay,
                            exc,
                        )
                        leg.close()
                        return True
                    why = f"relay {route.relay} rejected the open: {exc}"
                    log.info("tcp %s -> %s: %s; trying another route", client, target, why)
                    continue
                except (QuicReverseError, OSError, TimeoutError) as exc:
                    why = f"relay {route.relay} failed: {str(exc) or type(exc).__name__}"
                    log.info("tcp %s -> %s: %s; trying another route", client, target, why)
                    continue
                await self._pipe(route, stream, leg, target)
                return True
            remaining = deadline - loop.time()
            if remaining <= 0:
                log.warning(
                    "tcp %s -> %s: edge %r not connected here nor at a reachable relay of "
                    "the fleet within %.1fs%s; closing the client",
                    client,
                    target,
                    fwd.edge,
                    self.config.open_timeout,
                    f" ({why})" if why else "",
                )
                leg.close()
                return True
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(ROUTE_POLL, remaining)):
                    await pool.wait_changed()
            if tried and not routes:
                tried.clear()  # routes may have been re-published meanwhile

    async def _pipe(self, route: Route, stream: Stream, leg: TcpLeg, target: str) -> None:
        started = time.monotonic()
        self.forwarded += 1
        lsid = stream.logical_stream_id
        log.info(
            "tcp %s -> %s: via relay %s, stream %d opened", leg.peer, target, route.relay, lsid
        )
        result = await pipe(leg, stream)
        log.info(
            "tcp %s -> %s via relay %s: stream %d %s%s; %d bytes up, %d bytes down, %.2fs",
            leg.peer,
            target,
            route.relay,
            lsid,
            result.outcome,
            f" ({result.detail})" if result.detail else "",
            result.tcp_to_stream,
            result.stream_to_tcp,
            time.monotonic() - started,
        )

    async def _open_via(self, route: Route, fwd: Forward, leg: TcpLeg, deadline: float) -> Stream:
        """Open ``EDGE/SERVICE`` at the peer relay of ``route``. No answer within
        ``answer_timeout``: the peer session is pinged (no Pong in the same time: it is
        dropped and the peer avoided for ``registry_ttl``)."""
        link = await self._link(route)
        handle = link.handle
        assert handle is not None
        fields: dict[str, str | int] = {
            "client": leg.peer,
            "via": leg.local,
            HOP_KEY: 1,
            BALANCE_KEY: fwd.balance or self.config.balance,
        }
        metadata = Metadata.structured(fields)
        answer = self.config.answer_timeout
        opening = asyncio.ensure_future(handle.open(f"{fwd.edge}/{fwd.service}", metadata))
        try:
            async with asyncio.timeout_at(deadline):
                done, _ = await asyncio.wait({opening}, timeout=answer)
                if not done:
                    try:
                        async with asyncio.timeout(answer):
                            await handle.ping()
                    except (TimeoutError, QuicReverseError):
                        self._avoid(link, "no answer to an open nor to a ping")
                        raise TransportError("peer relay not answering") from None
                return await opening
        finally:
            if not opening.done():
                opening.cancel()
                await asyncio.gather(opening, return_exceptions=True)

    def _avoid(self, link: PeerLink, why: str) -> None:
        log.warning(
            "fleet: peer relay %s (%s:%d): %s; avoiding it for %.1fs",
            link.relay,
            *link.advertise,
            why,
            self.config.registry_ttl,
        )
        now = asyncio.get_running_loop().time()
        for rid in [r for r, until in self._down.items() if until <= now]:
            del self._down[rid]  # dead relays' ids never come back: keep the map small
        self._down[link.relay] = now + self.config.registry_ttl
        if link.task is not None:
            link.task.cancel()
        self._drop(link, why)

    async def _link(self, route: Route) -> PeerLink:
        """The session to ``route``'s relay: the live one, or a new one."""
        link = self._links.get(route.relay)
        if link is None:
            # Forget links of relays no longer routed to (dead relays' ids never return).
            for rid in [r for r, lk in self._links.items() if not lk.alive]:
                del self._links[rid]
            link = self._links[route.relay] = PeerLink(route.relay, route.advertise)
        if link.alive:
            return link
        async with link.lock:
            if link.alive:
                return link
            try:
                await self._connect(link)
            except (QuicReverseError, OSError, TimeoutError) as exc:
                self._avoid(link, f"cannot connect: {str(exc) or type(exc).__name__}")
                raise
        return link

    async def _connect(self, link: PeerLink) -> None:
        cfg = self.config
        host, port = link.advertise
        options = quic.TransportOptions(
            handshake_timeout=cfg.answer_timeout * 2, max_streams=cfg.max_streams + 16
        )
        # With --fleet-ca the peer's certificate must name its advertised host.
        tls = dataclasses.replace(self._tls, server_name=host)
        conn = await quic.connect(
            host, port, tls=tls, stack=cast(quic.Stack, cfg.stack), options=options
        )
        try:
            session = Session(
                conn,
                Role.CLIENT,
                Config(
                    agent=f"quic-reverse-relay/{__version__} fleet",
                    negotiation_timeout=cfg.answer_timeout * 2,
                    open_timeout=cfg.open_timeout,
                    ping_interval=cfg.ping_interval,
                    ping_timeout=cfg.ping_timeout,
                    max_inflight_opens=cfg.max_streams,
                ),
            )
            handle = await session.start()
            fields: dict[str, str] = {FLEET_KEY: self.relay_id, TOKEN_KEY: self.token}
            metadata = Metadata.structured(fields)
            async with asyncio.timeout(cfg.answer_timeout * 2):
                stream = await handle.open(AUTH_SERVICE, metadata)
            with contextlib.suppress(QuicReverseError):
                await stream.aclose()
        except BaseException:
            conn.close(0, b"fleet session failed")
            await conn.wait_closed()
            raise
        link.conn, link.handle = conn, handle
        link.task = asyncio.create_task(self._drive(link, handle), name=f"peer {link.relay}")
        log.info("fleet: session to peer relay %s (%s:%d) up", link.relay, host, port)

    async def _drive(self, link: PeerLink, handle: SessionHandle) -> None:
        """Process the peer session's control messages (pings); B never opens to A."""
        try:
            while True:
                event = await handle.process_message()
                if event is None or isinstance(event, CloseReceived):
                    break
                if isinstance(event, OpenRequest):
                    with contextlib.suppress(QuicReverseError):
                        await handle.reject_open(
                            event.request_id, RejectCode.UNAUTHORIZED, "not accepted here"
                        )
        except QuicReverseError as exc:
            log.info("fleet: session to peer relay %s lost: %s", link.relay, exc)
        else:
            log.info("fleet: session to peer relay %s ended", link.relay)
        if link.handle is handle:
            self._drop(link, "session ended")

    # ------------------------------------------------------------------ side B

    async def serve_peer(self, handle: SessionHandle, conn: Connection, peer: EdgeIdentity) -> None:
        """Serve an authenticated peer relay's opens (each ``EDGE/SERVICE``, one hop)
        until its session ends."""
        log.info("fleet: peer relay %s connected from %s:%d", peer.instance, *conn.remote_address)
        opens: set[asyncio.Task[None]] = set()
        try:
            while True:
                try:
                    event = await handle.process_message()
                except QuicReverseError as exc:
                    log.info("fleet: peer relay %s lost: %s", peer.instance, exc)
                    return
                if event is None or isinstance(event, CloseReceived):
                    log.info("fleet: peer relay %s disconnected", peer.instance)
                    return
                if isinstance(event, OpenRequest):
                    task = asyncio.create_task(
                        self._serve_open(handle, event), name=f"fleet open {event.service}"
                    )
                    opens.add(task)
                    task.add_done_callback(opens.discard)
                    self.relay._clients.add(task)
                    task.add_done_callback(self.relay._clients.discard)
        finally:
            for t in list(opens):
                t.cancel()
            await asyncio.gather(*opens, return_exceptions=True)
            with contextlib.suppress(QuicReverseError):
                await handle.close(CloseCode.NORMAL, "session ended")
            conn.close(0, b"")

    async def _serve_open(self, handle: SessionHandle, event: OpenRequest) -> None:
        rid = event.request_id

        async def reject(code: RejectCode, reason: str) -> None:
            with contextlib.suppress(QuicReverseError):
                await handle.reject_open(rid, code, reason)

        name, _, service = event.service.partition("/")
        try:
            validate_service_name("edge", name)
            validate_service_name("service", service)
        except ConfigError:
            await reject(RejectCode.UNSUPPORTED_SERVICE, "expected EDGE/SERVICE")
            return
        md = event.metadata
        if md.get(HOP_KEY) != 1:
            await reject(RejectCode.UNAUTHORIZED, "one relay-to-relay hop at most")
            return
        if name not in self.relay.tokens.names:
            await reject(RejectCode.UNSUPPORTED_SERVICE, "unknown edge")
            return
        pool = self.relay.registry.pool(name)
        if not pool.live():
            await reject(RejectCode.SERVICE_UNAVAILABLE, "edge not connected here")
            return
        client, via = md.get("client"), md.get("via")
        metadata = Metadata.structured(
            {
                "client": client if isinstance(client, str) else "?",
                "via": via if isinstance(via, str) else "?",
            }
        )
        task = asyncio.current_task()
        assert task is not None
        balance = md.get(BALANCE_KEY)
        if balance not in BALANCE_POLICIES:
            balance = self.config.balance
        opened = await self._open_local(pool, service, metadata, str(client), str(balance), reject)
        if opened is None:
            return
        replica, edge_stream = opened
        try:
            try:
                peer_stream = await handle.accept_open(rid)
            except QuicReverseError:
                edge_stream.reset(int(CloseCode.RESET))
                return
            self.served += 1
            up, down = await splice(peer_stream, edge_stream)
            log.info(
                "fleet: %s for peer relay (client %s): %d bytes up, %d bytes down",
                event.service,
                client,
                up,
                down,
            )
        finally:
            self.relay._release(pool, replica, task)

    async def _open_local(
        self,
        pool: Pool,
        service: str,
        metadata: Metadata,
        client: str,
        balance: str,
        send_reject: Callable[[RejectCode, str], Awaitable[None]],
    ) -> tuple[Replica, Stream] | None:
        """Like the relay's own clients: a stream on the best live replica, trying
        others on failures another replica may not have."""
        from .relay import RETRY_ON_ANOTHER

        task = asyncio.current_task()
        assert task is not None
        deadline = asyncio.get_running_loop().time() + self.config.open_timeout
        tried: set[Replica] = set()
        client_ip = client.rpartition(":")[0] or client
        last = (RejectCode.SERVICE_UNAVAILABLE, "edge not connected here")
        while True:
            try:
                replica = await pool.acquire(tried, deadline, balance=balance, client=client_ip)
            except Unavailable as exc:
                await send_reject(*last if tried else (RejectCode.SERVICE_UNAVAILABLE, str(exc)))
                return None
            try:
                stream = await self.relay._open_on(pool, replica, service, metadata)
            except StreamRejected as exc:
                self.relay._release(pool, replica, task)
                if exc.code not in RETRY_ON_ANOTHER:
                    await send_reject(exc.code, exc.reason or "")
                    return None
                if exc.code == RejectCode.SERVICE_UNAVAILABLE and exc.reason == "stopping":
                    replica.draining = True
                last = (exc.code, exc.reason or "")
            except QuicReverseError as exc:
                self.relay._release(pool, replica, task)
                last = (RejectCode.SERVICE_UNAVAILABLE, f"edge session failed: {exc}")
            except asyncio.CancelledError:
                self.relay._release(pool, replica, task)
                raise
            else:
                replica.forwards.add(task)
                return replica, stream
            tried.add(replica)

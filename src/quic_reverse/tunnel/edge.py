"""The edge (behind NAT): dials the relay, authenticates, and serves an allow-list of
local TCP services; reconnects with capped exponential backoff and full jitter.

Each relay open for service ``S`` is answered only if ``S`` is on the allow-list
(``--expose S=HOST:PORT``): the edge first connects to that fixed local target, then
accepts the open and pipes bytes; an unknown service is rejected
``UNSUPPORTED_SERVICE`` and an unreachable target ``SERVICE_UNAVAILABLE``. The relay
never chooses a host or port, so it cannot make the edge connect anywhere else.

Instance identity: the edge draws a random instance id at start and sends it with every
authentication, so the relay replaces this process's old session on a reconnect but
treats another process with the same name as a replica (:mod:`.registry`).

Forwarding loops: if the relay's client for an open is one of this edge's own
connections to an exposed service (a relay forward that leads back to an exposed
address on the same host), the open is rejected with an error line naming both ends,
so one client connection costs one extra stream, not an unbounded chain.

Keep-alive: the session pings every ``ping_interval`` seconds (default 5 s, below
common NAT UDP timeouts of 30 s+) and declares the relay dead after ``ping_timeout``
without a Pong; the QUIC idle timeout is a second line of defence.

High availability: ``relays`` (``--relay`` repeated) lists every relay; the edge keeps
one session to each, each with its own keep-alive, reconnect loop and backoff, so
losing one relay never disturbs the others. After a session that had authenticated
ends, the edge reconnects at once (:meth:`Backoff.after_session`); while a relay does
not answer at all, a fresh handshake is tried every ``probe_interval`` (jittered), so a
path that comes back is noticed within about one interval, not after a long timeout.

``--stack auto``: every session starts on qh3 (fast on clean paths). When the lossy-path
hint (:mod:`.losshint`) decides that a relay's session meets sustained loss, the edge
moves that relay to aioquic (delivery-rate congestion control) *make-before-break*: it
opens a second session to the same relay on aioquic under a new instance id (so the
relay adds it as a replica, :mod:`.registry`), and once that one is authenticated the
old session drains: new opens on it are rejected ``SERVICE_UNAVAILABLE`` "stopping"
(the relay marks it draining and retries the open on the new replica) while its
running streams go on until each ends; then it is closed. No timer: the decision is
taken where the hint is polled (the session's event loop). The choice is kept for
that relay for the life of the process (reconnects use aioquic).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import random
import re
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, TypeVar, cast

from .. import __version__
from ..config import Config, Role
from ..errors import CertificateError, ConfigError, QuicReverseError, TransportError
from ..events import CloseReceived, OpenRequest, OpenRequestReceived
from ..session import Session, SessionHandle
from ..transport import quic
from ..transport.base import Connection
from ..wire import CloseCode, RejectCode
from .auth import AuthRejected, authenticate_to_relay, new_instance_id, read_edge_token
from .config import EdgeConfig, Exposed
from .losshint import HintLimiter, LossHint
from .metrics import Observer
from .pipe import TcpLeg, pipe
from .proxyproto import build_v2_header
from .supervisor import Backoff
from .udp import UdpExpose, is_flow_request

__all__ = ["Edge", "EdgeExit"]

log = logging.getLogger("quic_reverse.tunnel.edge")

T = TypeVar("T")

_CLIENT_RE = re.compile(r"^[0-9A-Za-z.:\[\]%_-]{1,64}$")

#: Wait after an authentication failure when ``auth_retry`` is on (never a tight loop).
AUTH_RETRY_DELAY = 60.0


class EdgeExit(Enum):
    """Why :meth:`Edge.run` returned."""

    STOPPED = 0
    AUTH_FAILED = 1
    CERTIFICATE_FAILED = 2


class _NoAnswer(TransportError):
    """The relay did not answer any handshake within ``connect_timeout`` (path down or
    relay not running): keep probing, no backoff needed (a probe is one datagram)."""


@dataclass(eq=False)
class _Link:
    """One authenticated session to a relay and what runs on it."""

    conn: Connection
    handle: SessionHandle
    stack: str
    forwards: set[asyncio.Task[None]] = field(default_factory=set)
    events: asyncio.Task[None] | None = None
    hint: LossHint | None = None
    #: Set by the event loop once the hint found the path lossy (``--stack auto``).
    lossy: asyncio.Event = field(default_factory=asyncio.Event)

    def running(self) -> asyncio.Task[None]:
        """The session's event loop (started by :meth:`Edge._open_link`)."""
        assert self.events is not None
        return self.events


class Edge:
    """A running edge; :meth:`run` loops (connect, authenticate, serve) until ``stop``."""

    def __init__(self, config: EdgeConfig) -> None:
        self.config = config
        # Read (and validate) the token once at start-up; it is never logged.
        self._token = read_edge_token(config.token_file)
        #: This process's instance id (sent with every authentication).
        self.instance = new_instance_id()
        self._backoff = Backoff(config.backoff_initial, config.backoff_cap)
        self._stop = asyncio.Event()
        #: Forwards of every session (each session also tracks its own).
        self._forwards: set[asyncio.Task[None]] = set()
        #: (our end, service end) of our connections to exposed services, as
        #: "host:port" pairs (forwarding-loop detection).
        self._local_ends: set[tuple[str, str]] = set()
        #: Metrics hooks (a no-op unless ``--metrics``: :mod:`.metrics`).
        self.observer = Observer()
        #: One lossy-path hint per relay per hour at most (:mod:`.losshint`).
        self._loss_hints = HintLimiter()
        #: ``--stack auto`` may still switch (aioquic installed and usable).
        self._auto = config.stack == "auto"
        if self._auto and importlib.util.find_spec("aioquic") is None:
            log.info(
                "--stack auto: aioquic is not installed, so every session stays on qh3 "
                "(pip install 'quic-reverse[aioquic]' lets lossy paths switch to it)"
            )
            self._auto = False
        first = "qh3" if config.stack == "auto" else config.stack
        #: The stack of each relay's next session (``auto``: qh3 until switched, then
        #: aioquic for the life of the process) ...
        self._stacks: dict[tuple[str, int], str] = dict.fromkeys(config.relays, first)
        #: ... and the instance id it authenticates with (a switch draws a new one).
        self._instances: dict[tuple[str, int], str] = {}
        #: Sessions draining after a switch: new opens get "stopping".
        self._draining: set[SessionHandle] = set()
        #: Their drain tasks, and the connections those own.
        self._drains: set[asyncio.Task[None]] = set()
        self._kept: set[Connection] = set()
        #: Flow requests for ``udp:`` services (tunnel/udp.py).
        self.udp = UdpExpose(idle_timeout=config.udp_idle_timeout, max_flows=config.max_udp_flows)
        if config.insecure:
            log.warning(
                "!!! --insecure: the relay's certificate is NOT verified; anyone on the path "
                "can impersonate the relay and receive this edge's token. Development only. !!!"
            )

    def stop(self) -> None:
        """Ask :meth:`run` to finish gracefully (signal handlers call this)."""
        self._stop.set()

    def _client_tls(self) -> quic.ClientTLS:
        cfg = self.config
        return quic.ClientTLS(
            alpn=(cfg.alpn,),
            server_name=cfg.server_name,
            cafile=str(cfg.ca) if cfg.ca is not None else None,
            verify=not cfg.insecure and cfg.fingerprint is None,
            pin_sha256=cfg.fingerprint,
        )

    async def run(self) -> EdgeExit:
        """Keep one session to every relay (connect/serve/reconnect) until stopped.

        Returns when stopped, or when every relay's loop gave up (authentication or
        certificate rejected): the first such reason, else ``STOPPED``.

        Raises:
            ConfigError: a setting the transport rejects (not worth retrying).
        """
        loops = [
            asyncio.create_task(self._relay_loop(host, port), name=f"relay {host}:{port}")
            for host, port in self.config.relays
        ]
        try:
            outcomes = await asyncio.gather(*loops)
            # Draining sessions finish on their own (stopping: within the grace).
            await asyncio.gather(*self._drains, return_exceptions=True)
        finally:
            for task in [*loops, *self._drains]:
                task.cancel()
            await asyncio.gather(*loops, *self._drains, return_exceptions=True)
        log.info("edge stopped")
        failed = [o for o in outcomes if o is not EdgeExit.STOPPED]
        return failed[0] if failed and len(failed) == len(outcomes) else EdgeExit.STOPPED

    async def _relay_loop(self, host: str, port: int) -> EdgeExit:
        """Connect/serve/reconnect to one relay until stopped or it rejects us for good
        (its own backoff: the other relays' sessions are not affected)."""
        cfg = self.config
        backoff = (
            self._backoff if len(cfg.relays) == 1 else Backoff(cfg.backoff_initial, cfg.backoff_cap)
        )
        while not self._stop.is_set():
            authenticated = False
            no_answer = False
            try:
                authenticated = await self._session_once(host, port, backoff)
            except AuthRejected:
                self.observer.auth_failure()
                if not cfg.auth_retry:
                    log.error(
                        "authentication as %r rejected by relay %s:%d; giving up on it",
                        cfg.name,
                        host,
                        port,
                    )
                    return EdgeExit.AUTH_FAILED
                log.error(
                    "authentication as %r rejected by relay %s:%d; retrying in %.0fs",
                    cfg.name,
                    host,
                    port,
                    AUTH_RETRY_DELAY,
                )
                if await self._sleep(AUTH_RETRY_DELAY):
                    break
                continue
            except CertificateError as exc:
                log.error("relay %s:%d: certificate check failed: %s; giving up", host, port, exc)
                return EdgeExit.CERTIFICATE_FAILED
            except ConfigError:
                raise
            except _NoAnswer as exc:
                no_answer = True
                log.warning("relay %s:%d: %s; still trying", host, port, exc)
            except (QuicReverseError, OSError) as exc:
                log.warning("relay %s:%d: %s", host, port, str(exc) or type(exc).__name__)
            if self._stop.is_set():
                break
            self.observer.reconnect()
            if no_answer:
                continue  # probing paces itself (one handshake per probe_interval)
            if authenticated:
                delay = backoff.after_session(time.monotonic())
            else:
                delay = backoff.next_delay()
            log.info("reconnecting to %s:%d in %.2fs", host, port, delay)
            if delay > 0 and await self._sleep(delay):
                break
        return EdgeExit.STOPPED

    async def _sleep(self, delay: float) -> bool:
        """Sleep ``delay`` seconds or until stopped; True if stopped."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await self._stop.wait()
        return self._stop.is_set()

    async def _unless_stopped(self, aw: Coroutine[Any, Any, T] | asyncio.Future[T]) -> T | None:
        """Run ``aw`` but give up (cancel it, return ``None``) as soon as stop is asked."""
        task = asyncio.ensure_future(aw)
        stop_wait = asyncio.create_task(self._stop.wait())
        try:
            await asyncio.wait({task, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop_wait.cancel()
            if not task.done():
                task.cancel()
            await asyncio.gather(stop_wait, task, return_exceptions=True)
        if task.cancelled():
            return None
        return task.result()

    async def _connect(self, host: str, port: int, stack: str = "qh3") -> Connection:
        """Handshake with the relay: fresh attempts of about ``probe_interval`` each
        (jittered, so a fleet of edges does not probe in lock-step) until one is
        answered or ``connect_timeout`` has passed. A long single attempt would back its
        retransmissions off and notice a healed path late; a fresh one starts anew.

        Raises:
            _NoAnswer: no attempt was answered within ``connect_timeout``.
            CertificateError, TransportError: as :func:`quic.connect`.
        """
        cfg = self.config
        loop = asyncio.get_running_loop()
        deadline = loop.time() + cfg.connect_timeout
        while True:
            remaining = deadline - loop.time()
            attempt = min(remaining, cfg.probe_interval * random.uniform(0.5, 1.0))
            if attempt <= 0:
                raise _NoAnswer(f"no answer within {cfg.connect_timeout:g}s")
            options = quic.TransportOptions(
                idle_timeout=cfg.idle_timeout, handshake_timeout=attempt
            )
            started = loop.time()
            try:
                return await quic.connect(
                    host,
                    port,
                    tls=self._client_tls(),
                    stack=cast(quic.Stack, stack),
                    options=options,
                )
            except CertificateError:
                raise
            except TransportError:
                # Timed out (the attempt ran its whole time): probe again. Anything
                # quicker (resolution, socket errors) is a real failure.
                if loop.time() - started < attempt * 0.9:
                    raise
                log.debug("relay %s:%d: no answer within %.2fs; probing again", host, port, attempt)

    def session_config(self) -> Config:
        """The session settings: negotiation and the auth open are bounded by
        ``connect_timeout``; ``max_streams`` relay opens are served at once."""
        cfg = self.config
        return Config(
            agent=f"quic-reverse-edge/{__version__}",
            negotiation_timeout=cfg.connect_timeout,
            open_timeout=cfg.connect_timeout,
            ping_interval=cfg.ping_interval,
            ping_timeout=cfg.ping_timeout,
            max_concurrent_streams=cfg.max_streams,
        )

    async def _session_once(self, host: str, port: int, backoff: Backoff) -> bool:
        """One connection to one relay; True if it authenticated."""
        cfg = self.config
        stack = self._stacks[(host, port)]
        shown = f" ({stack})" if cfg.stack == "auto" else ""
        log.info("connecting to relay %s:%d as %r%s", host, port, cfg.name, shown)
        conn = await self._unless_stopped(self._connect(host, port, stack))
        if conn is None:
            return False
        try:
            return await self.serve_connection(conn, relay=(host, port), backoff=backoff)
        finally:
            if conn not in self._kept:  # else its drain closes it
                conn.close(0, b"")

    async def serve_connection(
        self,
        conn: Connection,
        *,
        relay: tuple[str, int] | None = None,
        backoff: Backoff | None = None,
    ) -> bool:
        """Negotiate, authenticate and serve one connection to the relay (``relay``,
        default the first one: for logs) until it ends or the edge is stopped (also
        usable over any transport, e.g. in tests). Returns True if it authenticated
        (``backoff``, default the edge's, is then reset). With ``--stack auto`` the
        session may be replaced by its aioquic successor (:meth:`_switch`), which is
        then served here in its place."""
        cfg = self.config
        key = relay if relay is not None else cfg.relay
        stack = self._stacks.get(key, "qh3" if cfg.stack == "auto" else cfg.stack)
        link = await self._open_link(conn, key, stack, self._instances.get(key, self.instance))
        if link is None:
            return False
        (backoff or self._backoff).reset()
        try:
            while True:
                lossy = asyncio.create_task(link.lossy.wait())
                await self._unless_stopped(
                    asyncio.wait({link.running(), lossy}, return_when=asyncio.FIRST_COMPLETED)
                )
                lossy.cancel()
                await asyncio.gather(lossy, return_exceptions=True)
                if self._stop.is_set() or link.running().done():
                    break
                successor = await self._switch(link, key)
                if successor is not None:
                    self._drain_later(link, key)
                    link = successor
            if self._stop.is_set() and not link.running().done() and link.forwards:
                # Stopping: new opens are answered SERVICE_UNAVAILABLE (the relay tries
                # another replica at once) while running streams get the grace period.
                log.info(
                    "stopping: %d stream(s) get %.1fs to finish", len(link.forwards), cfg.grace
                )
                await asyncio.wait(set(link.forwards), timeout=cfg.grace)
        finally:
            await self._end_link(link)
        return True

    async def _open_link(
        self, conn: Connection, relay: tuple[str, int], stack: str, instance: str
    ) -> _Link | None:
        """Negotiate and authenticate on ``conn`` as ``instance``, then start serving
        its events; ``None`` if stopped meanwhile.

        Raises:
            AuthRejected, QuicReverseError: as :func:`authenticate_to_relay`.
        """
        cfg = self.config
        host, port = relay
        session = Session(conn, Role.CLIENT, self.session_config())
        handle = await self._unless_stopped(session.start())
        if handle is None:
            return None
        link = _Link(conn, handle, stack)
        try:
            await self._unless_stopped(
                authenticate_to_relay(handle, cfg.name, self._token, instance)
            )
        except BaseException:
            await self._end_link(link)
            raise
        if self._stop.is_set():
            await self._end_link(link)
            return None
        self.observer.session_up(handle, f"{host}:{port}")
        exposed = ", ".join(
            f"{e.service}={'udp:' if e.protocol == 'udp' else ''}{e.host}:{e.port}"
            for e in cfg.expose
        )
        log.info(
            "authenticated to relay %s:%d as %r%s; exposing %s",
            host,
            port,
            cfg.name,
            f" ({stack})" if cfg.stack == "auto" else "",
            exposed,
        )
        # auto: the hint's decision starts a switch (said in one INFO line) instead of
        # a warning that names the remedy.
        switching = self._auto and stack != "aioquic"
        link.hint = LossHint(f"relay {host}:{port}", limiter=self._loss_hints, warn=not switching)
        link.events = asyncio.create_task(
            self._serve_events(handle, link.forwards, link, switching),
            name=f"edge events {host}:{port}",
        )
        return link

    async def _switch(self, link: _Link, relay: tuple[str, int]) -> _Link | None:
        """``--stack auto`` found ``link``'s path lossy: open and authenticate its
        successor on aioquic under a new instance id (a replica beside it on the relay,
        not its replacement). ``None`` if that failed (logged; the old session goes on
        and the hint judges it again after another window) or the edge is stopping."""
        host, port = relay
        # Sticky: this relay's sessions use aioquic from now on (reconnects too).
        self._stacks[relay] = "aioquic"
        instance = new_instance_id()
        successor: _Link | None = None
        conn: Connection | None = None
        try:
            conn = await self._unless_stopped(self._connect(host, port, "aioquic"))
            if conn is not None:
                successor = await self._open_link(conn, relay, "aioquic", instance)
        except ConfigError as exc:
            # aioquic cannot run here after all: stay on qh3 for good.
            log.warning(
                "relay %s:%d: cannot switch to aioquic (%s); staying on qh3", host, port, exc
            )
            self._auto = False
            self._stacks[relay] = link.stack
        except (QuicReverseError, OSError) as exc:
            log.warning(
                "relay %s:%d: switching to aioquic failed (%s); staying on %s for now",
                host,
                port,
                str(exc) or type(exc).__name__,
                link.stack,
            )
            # Judged again after another whole window (no retry loop of its own).
            link.hint = LossHint(f"relay {host}:{port}", warn=False)
            link.lossy.clear()
        finally:
            if successor is None and conn is not None:
                conn.close(0, b"")
        if successor is None:
            return None
        self._instances[relay] = instance
        loss = link.hint.loss if link.hint is not None else None
        log.info(
            "relay %s:%d: switched to aioquic: %s on %s (loss-based); new connections go to "
            "the new session, %d running stay on the %s session until they end",
            host,
            port,
            loss.describe() if loss is not None else "lossy path",
            loss.congestion_control if loss is not None else link.stack,
            len(link.forwards),
            link.stack,
        )
        return successor

    def _drain_later(self, link: _Link, relay: tuple[str, int]) -> None:
        """Let ``link`` drain in the background (:meth:`_drain`)."""
        self._draining.add(link.handle)
        self._kept.add(link.conn)
        task = asyncio.create_task(self._drain(link, relay), name=f"drain {relay[0]}:{relay[1]}")
        self._drains.add(task)
        task.add_done_callback(self._drains.discard)

    async def _drain(self, link: _Link, relay: tuple[str, int]) -> None:
        """Serve ``link`` (rejecting new opens "stopping") until its last stream ends,
        its session is lost (keep-alive) or the edge stops (then the grace period);
        then close it gracefully."""
        events = link.running()
        stop_wait = asyncio.create_task(self._stop.wait())
        try:
            while link.forwards and not events.done() and not self._stop.is_set():
                await asyncio.wait(
                    {*link.forwards, events, stop_wait}, return_when=asyncio.FIRST_COMPLETED
                )
            if self._stop.is_set() and link.forwards and not events.done():
                await asyncio.wait(set(link.forwards), timeout=self.config.grace)
            elif not events.done():
                await self._delivered(link.handle)
            log.info(
                "relay %s:%d: the drained %s session is closed (%s)",
                relay[0],
                relay[1],
                link.stack,
                "session lost" if events.done() else "its last connection ended",
            )
        finally:
            stop_wait.cancel()
            await self._end_link(link, "edge switched stack")
            link.conn.close(0, b"")
            self._kept.discard(link.conn)

    async def _delivered(self, handle: SessionHandle) -> None:
        """Wait (at most ``linger``) until QUIC has nothing in flight: the last stream's
        final bytes and FIN reached the relay before the session closes (the relay
        aborts what still runs on a session that closes). Polled at the path's RTT
        (at least 10 ms): a bounded wait at the end of a drained session only."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.linger
        while loop.time() < deadline:
            stats = handle.path_stats()
            if not stats.bytes_in_flight:  # 0, or unknown (memory transport)
                return
            await asyncio.sleep(max(stats.smoothed_rtt or 0.0, 0.01))

    async def _end_link(self, link: _Link, reason: str | None = None) -> None:
        """Stop serving ``link``: abort its streams, close its session."""
        self.observer.session_down(link.handle)
        self._draining.discard(link.handle)
        if link.events is not None:
            link.events.cancel()
            await asyncio.gather(link.events, return_exceptions=True)
        await self._finish(link.handle, link.forwards, reason)

    async def _serve_events(
        self,
        handle: SessionHandle,
        forwards: set[asyncio.Task[None]] | None = None,
        link: _Link | None = None,
        switching: bool = False,
    ) -> None:
        """The event loop of a session (one task for the whole session, not one per
        event: a relay open costs no extra task switch). Every event (at least the
        keep-alive Ping/Pong every ``ping_interval``) also lets ``link``'s hint look at
        the path (:mod:`.losshint`); ``switching``: its decision sets ``link.lossy``."""
        while True:
            try:
                event = await handle.process_message()
            except QuicReverseError as exc:
                log.warning("session with the relay lost: %s", exc)
                return
            hint = link.hint if link is not None else None
            lossy = hint is not None and hint.poll(handle.path_stats, time.monotonic()) is not None
            if lossy and switching and link is not None:
                link.lossy.set()
            if event is None:
                log.warning("relay closed the connection")
                return
            if isinstance(event, CloseReceived):
                log.info("relay closed the session: %s %r", event.code.name, event.reason or "")
                return
            if isinstance(event, OpenRequest):
                if is_flow_request(event, handle.negotiated_features):
                    work = self._udp_flow(handle, event)
                else:
                    work = self._forward(handle, event)
                task = asyncio.create_task(work, name=f"forward {event.service}")
                for tracked in (self._forwards, forwards):
                    if tracked is not None:
                        tracked.add(task)
                        task.add_done_callback(tracked.discard)

    async def _reject(self, handle: SessionHandle, rid: int, code: RejectCode, reason: str) -> None:
        with contextlib.suppress(QuicReverseError):
            await handle.reject_open(rid, code, reason)

    async def _udp_flow(self, handle: SessionHandle, request: OpenRequestReceived) -> None:
        """A datagram flow request: served only for a ``udp:`` service on the allow-list."""
        rid, service = request.request_id, request.service
        client = request.metadata.get("client")
        shown = client if isinstance(client, str) and _CLIENT_RE.match(client) else None
        asked = f" for {shown}" if shown else ""
        entry = self.config.exposed(service)
        if entry is None or entry.protocol != "udp":
            why = "not exposed" if entry is None else "not a UDP service"
            log.info("relay asked for a UDP flow to %r%s: %s; rejected", service, asked, why)
            await self._reject(handle, rid, RejectCode.UNSUPPORTED_SERVICE, why)
            return
        if self._stop.is_set() or handle in self._draining:
            await self._reject(handle, rid, RejectCode.SERVICE_UNAVAILABLE, "stopping")
            return
        await self.udp.serve_flow(handle, request, (entry.host, entry.port), asked)

    async def _forward(self, handle: SessionHandle, request: OpenRequest) -> None:
        cfg = self.config
        rid, service = request.request_id, request.service
        client = request.metadata.get("client")
        # The relay's note of who asked (shown in logs only if it looks like HOST:PORT).
        shown = client if isinstance(client, str) and _CLIENT_RE.match(client) else None
        asked = f" for {shown}" if shown else ""
        entry: Exposed | None = cfg.exposed(service)
        if entry is None:
            log.info("relay asked for service %r%s: not exposed; rejected", service, asked)
            await self._reject(handle, rid, RejectCode.UNSUPPORTED_SERVICE, "not exposed")
            return
        if entry.protocol == "udp":
            log.info("relay asked for a stream to UDP service %r%s; rejected", service, asked)
            await self._reject(handle, rid, RejectCode.UNSUPPORTED_SERVICE, "a UDP service")
            return
        if self._stop.is_set() or handle in self._draining:
            why = "while stopping" if self._stop.is_set() else "on a draining session"
            log.info("relay asked for %r%s %s; rejected", service, asked, why)
            await self._reject(handle, rid, RejectCode.SERVICE_UNAVAILABLE, "stopping")
            return
        target = f"{entry.host}:{entry.port}"
        forward = request.metadata.get("via")
        if shown is not None and (shown, forward) in self._local_ends:
            log.error(
                "forwarding loop: the relay's client %s for %r is this edge's own connection "
                "to %s (the relay's forward %s leads back to this --expose); rejected",
                shown,
                service,
                target,
                forward,
            )
            await self._reject(handle, rid, RejectCode.INTERNAL_ERROR, "forwarding loop")
            return
        leg: TcpLeg | None = None
        ends: tuple[str, str] | None = None
        self.observer.service_opened(service)
        outcome, up, down = "cancelled", 0, 0

        def connected(new: TcpLeg) -> None:
            nonlocal ends
            ends = (new.local, new.peer)
            self._local_ends.add(ends)

        try:
            loop = asyncio.get_running_loop()
            try:
                async with asyncio.timeout(cfg.service_timeout):
                    _, leg = await loop.create_connection(
                        lambda: TcpLeg(linger=cfg.linger, on_connected=connected),
                        entry.host,
                        entry.port,
                    )
            except (OSError, TimeoutError) as exc:
                why = str(exc) or f"no answer within {cfg.service_timeout:g}s"
                log.warning("service %r%s: cannot connect to %s: %s", service, asked, target, why)
                await self._reject(
                    handle, rid, RejectCode.SERVICE_UNAVAILABLE, "service unavailable"
                )
                outcome = "unavailable"
                return
            if service in cfg.proxy_protocol:
                leg.write(build_v2_header(client, forward))
            stream = await handle.accept_open(rid)
            started = time.monotonic()
            lsid = stream.logical_stream_id
            log.info(
                "stream %d%s -> %s (%s) opened",
                lsid,
                asked,
                service,
                target,
                extra={"client": shown, "service": service, "stream": lsid},
            )
            result = await pipe(leg, stream)
            outcome, up, down = result.outcome, result.stream_to_tcp, result.tcp_to_stream
            log.info(
                "stream %d -> %s: %s%s; %d bytes to service, %d bytes back, %.2fs",
                lsid,
                service,
                result.outcome,
                f" ({result.detail})" if result.detail else "",
                result.stream_to_tcp,
                result.tcp_to_stream,
                time.monotonic() - started,
                extra={
                    "client": shown,
                    "service": service,
                    "stream": lsid,
                    "bytes_up": up,
                    "bytes_down": down,
                    "duration": round(time.monotonic() - started, 6),
                },
            )
        except QuicReverseError as exc:
            outcome = "error"
            log.info("service %r%s: %s", service, asked, exc)
        finally:
            self.observer.service_closed(service, outcome, up, down)
            # Safety net: whatever happened (session lost, cancelled), no TCP leg stays.
            if leg is not None:
                leg.abort_unless_closing()
            if ends is not None:
                self._local_ends.discard(ends)

    async def _finish(
        self,
        handle: SessionHandle,
        forwards: set[asyncio.Task[None]] | None = None,
        reason: str | None = None,
    ) -> None:
        """Abort what still runs on this session (``forwards``; default: every
        session's), then close the session (bounded by the session's ``close_timeout``)."""
        pending = set(self._forwards if forwards is None else forwards)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        if reason is None or self._stop.is_set():
            reason = "edge shutting down" if self._stop.is_set() else "edge reconnecting"
        with contextlib.suppress(QuicReverseError):
            await handle.close(CloseCode.NORMAL, reason)

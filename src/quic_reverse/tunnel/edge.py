"""The edge (behind NAT): dials the relay, authenticates, and serves an allow-list of
local TCP services; reconnects with capped exponential backoff and full jitter.

Each relay open for service ``S`` is answered only if ``S`` is on the allow-list
(``--expose S=HOST:PORT``): the edge first connects to that fixed local target, then
accepts the open and pipes bytes; an unknown service is rejected
``UNSUPPORTED_SERVICE`` and an unreachable target ``SERVICE_UNAVAILABLE``. The relay
never chooses a host or port, so it cannot make the edge connect anywhere else.

Keep-alive: the session pings every ``ping_interval`` seconds (default 5 s, below
common NAT UDP timeouts of 30 s+) and declares the relay dead after ``ping_timeout``
without a Pong; the QUIC idle timeout is a second line of defence.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Coroutine
from enum import Enum
from typing import Any, TypeVar, cast

from .. import __version__
from ..config import Config, Role
from ..errors import CertificateError, QuicReverseError, StreamRejected
from ..events import CloseReceived, OpenRequest
from ..session import Session, SessionHandle
from ..transport import quic
from ..transport.base import Connection
from ..wire import CloseCode, Metadata, RejectCode
from .auth import read_edge_token
from .config import AUTH_SERVICE, EdgeConfig, Exposed
from .pipe import TCP_READ_LIMIT, abort_tcp, pipe
from .supervisor import Backoff

__all__ = ["Edge", "EdgeExit"]

log = logging.getLogger("quic_reverse.tunnel.edge")

T = TypeVar("T")

_CLIENT_RE = re.compile(r"^[0-9A-Za-z.:\[\]%_-]{1,64}$")

#: How long connecting to an exposed local service may take.
LOCAL_CONNECT_TIMEOUT = 5.0
#: Grace period for running streams when the edge is asked to stop.
GRACE = 5.0
#: Wait after an authentication failure when ``auth_retry`` is on (never a tight loop).
AUTH_RETRY_DELAY = 60.0


class EdgeExit(Enum):
    """Why :meth:`Edge.run` returned."""

    STOPPED = 0
    AUTH_FAILED = 1
    CERTIFICATE_FAILED = 2


class _AuthFailed(Exception):
    pass


class Edge:
    """A running edge; :meth:`run` loops (connect, authenticate, serve) until ``stop``."""

    def __init__(self, config: EdgeConfig) -> None:
        self.config = config
        # Read (and validate) the token once at start-up; it is never logged.
        self._token = read_edge_token(config.token_file)
        self._backoff = Backoff(config.backoff_initial, config.backoff_cap)
        self._stop = asyncio.Event()
        self._forwards: set[asyncio.Task[None]] = set()
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
        """Connect/serve/reconnect until stopped or authentication fails for good."""
        cfg = self.config
        host, port = cfg.relay
        while not self._stop.is_set():
            try:
                await self._session_once(host, port)
            except _AuthFailed:
                if not cfg.auth_retry:
                    log.error("authentication as %r rejected by the relay; giving up", cfg.name)
                    return EdgeExit.AUTH_FAILED
                log.error(
                    "authentication as %r rejected by the relay; retrying in %.0fs",
                    cfg.name,
                    AUTH_RETRY_DELAY,
                )
                if await self._sleep(AUTH_RETRY_DELAY):
                    break
                continue
            except CertificateError as exc:
                log.error("relay %s:%d: certificate check failed: %s; giving up", host, port, exc)
                return EdgeExit.CERTIFICATE_FAILED
            except (QuicReverseError, OSError, TimeoutError) as exc:
                why = str(exc) or type(exc).__name__
                if isinstance(exc, TimeoutError) and not str(exc):
                    why = "timed out"
                log.warning("relay %s:%d: %s", host, port, why)
            if self._stop.is_set():
                break
            delay = self._backoff.next_delay()
            log.info("reconnecting to %s:%d in %.2fs", host, port, delay)
            if await self._sleep(delay):
                break
        log.info("edge stopped")
        return EdgeExit.STOPPED

    async def _sleep(self, delay: float) -> bool:
        """Sleep ``delay`` seconds or until stopped; True if stopped."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await self._stop.wait()
        return self._stop.is_set()

    async def _unless_stopped(self, aw: Coroutine[Any, Any, T]) -> T | None:
        """Run ``aw`` but give up (cancel it, return ``None``) as soon as stop is asked."""
        task = asyncio.create_task(aw)
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

    async def _connect(self, host: str, port: int) -> Connection:
        cfg = self.config
        async with asyncio.timeout(cfg.connect_timeout):
            return await quic.connect(
                host,
                port,
                tls=self._client_tls(),
                stack=cast(quic.Stack, cfg.stack),
                idle_timeout=cfg.idle_timeout,
            )

    async def _session_once(self, host: str, port: int) -> None:
        cfg = self.config
        log.info("connecting to relay %s:%d as %r", host, port, cfg.name)
        conn = await self._unless_stopped(self._connect(host, port))
        if conn is None:
            return
        try:
            session_cfg = Config(
                agent=f"quic-reverse-edge/{__version__}",
                negotiation_timeout=cfg.connect_timeout,
                open_timeout=cfg.connect_timeout,
                ping_interval=cfg.ping_interval,
                ping_timeout=cfg.ping_timeout,
            )
            handle = await self._unless_stopped(Session(conn, Role.CLIENT, session_cfg).start())
            if handle is None:
                return
            try:
                if not await self._unless_stopped(self._authenticate(handle)):
                    return
                self._backoff.reset()
                exposed = ", ".join(f"{e.service}={e.host}:{e.port}" for e in cfg.expose)
                log.info(
                    "authenticated to relay %s:%d as %r; exposing %s", host, port, cfg.name, exposed
                )
                await self._serve(handle)
            finally:
                await self._finish(handle)
        finally:
            conn.close(0, b"")

    async def _authenticate(self, handle: SessionHandle) -> bool:
        metadata = Metadata.structured({"name": self.config.name, "token": self._token})
        try:
            stream = await handle.open(AUTH_SERVICE, metadata)
        except StreamRejected as exc:
            if exc.code == RejectCode.UNAUTHORIZED:
                raise _AuthFailed from None
            raise
        with contextlib.suppress(QuicReverseError):
            await stream.aclose()
        return True

    async def _serve(self, handle: SessionHandle) -> None:
        """Answer the relay's opens until the session ends or the edge is stopped."""
        events = asyncio.create_task(self._serve_events(handle), name="edge events")
        stop_wait = asyncio.create_task(self._stop.wait())
        try:
            await asyncio.wait({events, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop_wait.cancel()
            events.cancel()
            await asyncio.gather(stop_wait, events, return_exceptions=True)
        if not events.cancelled() and events.exception() is not None:
            raise cast(BaseException, events.exception())

    async def _serve_events(self, handle: SessionHandle) -> None:
        """The event loop of :meth:`_serve` (one task for the whole session, not one
        per event: a relay open costs no extra task switch)."""
        while True:
            try:
                event = await handle.process_message()
            except QuicReverseError as exc:
                log.warning("session with the relay lost: %s", exc)
                return
            if event is None:
                log.warning("relay closed the connection")
                return
            if isinstance(event, CloseReceived):
                log.info("relay closed the session: %s %r", event.code.name, event.reason or "")
                return
            if isinstance(event, OpenRequest):
                task = asyncio.create_task(
                    self._forward(handle, event), name=f"forward {event.service}"
                )
                self._forwards.add(task)
                task.add_done_callback(self._forwards.discard)

    async def _forward(self, handle: SessionHandle, request: OpenRequest) -> None:
        rid, service = request.request_id, request.service
        client = request.metadata.get("client")
        # The relay's note of who asked (shown in logs only if it looks like HOST:PORT).
        via = f" for {client}" if isinstance(client, str) and _CLIENT_RE.match(client) else ""
        entry: Exposed | None = self.config.exposed(service)
        try:
            if entry is None or self._stop.is_set():
                code = (
                    RejectCode.UNSUPPORTED_SERVICE
                    if entry is None
                    else RejectCode.SERVICE_UNAVAILABLE
                )
                log.warning("relay asked for service %r%s: %s; rejected", service, via, code.name)
                await handle.reject_open(rid, code, "not exposed" if entry is None else "stopping")
                return
            target = f"{entry.host}:{entry.port}"
            try:
                async with asyncio.timeout(LOCAL_CONNECT_TIMEOUT):
                    reader, writer = await asyncio.open_connection(
                        entry.host, entry.port, limit=TCP_READ_LIMIT
                    )
            except (OSError, TimeoutError) as exc:
                log.warning("service %r%s: cannot connect to %s: %s", service, via, target, exc)
                await handle.reject_open(rid, RejectCode.SERVICE_UNAVAILABLE, "service unavailable")
                return
            try:
                stream = await handle.accept_open(rid)
            except BaseException:
                abort_tcp(writer)
                raise
            started = time.monotonic()
            lsid = stream.logical_stream_id
            log.info("stream %d%s -> %s (%s) opened", lsid, via, service, target)
            result = await pipe(reader, writer, stream)
            log.info(
                "stream %d -> %s: %s%s; %d bytes to service, %d bytes back, %.2fs",
                lsid,
                service,
                result.outcome,
                f" ({result.detail})" if result.detail else "",
                result.stream_to_tcp,
                result.tcp_to_stream,
                time.monotonic() - started,
            )
        except QuicReverseError as exc:
            log.warning("service %r%s: %s", service, via, exc)

    async def _finish(self, handle: SessionHandle) -> None:
        """Let running streams finish (bounded when stopping), then close the session."""
        if self._forwards:
            if self._stop.is_set():
                _, pending = await asyncio.wait(self._forwards, timeout=GRACE)
            else:
                pending = set(self._forwards)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        reason = "edge shutting down" if self._stop.is_set() else "edge reconnecting"
        with contextlib.suppress(QuicReverseError, TimeoutError):
            async with asyncio.timeout(3):
                await handle.close(CloseCode.NORMAL, reason)

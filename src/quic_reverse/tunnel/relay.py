"""The relay (public side): accepts edges over QUIC, authenticates them, and publishes
TCP listeners whose connections become reverse opens to an edge's service.

Life of a TCP connection on a forward ``127.0.0.1:2222=edgeA/ssh``:
the relay looks up the *current* authenticated session of ``edgeA``; if there is none
the TCP client is closed at once (reason logged). Otherwise it calls
``handle.open("ssh")``; a rejection or timeout closes the TCP client, success pipes
bytes both ways (:func:`~quic_reverse.tunnel.pipe.pipe`).

Security rules enforced here:

* A session is routable only after it authenticated (:mod:`.auth`); one that does not
  within ``auth_timeout`` is closed.
* The relay never accepts opens from an edge except the one auth open (others are
  rejected ``UNAUTHORIZED``).
* One session per edge name: a newly authenticated session replaces the old one
  atomically (the registry entry is swapped first, then the old session and its TCP
  clients are closed), so a reconnecting edge is never locked out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from .. import __version__
from ..config import Config, Role
from ..errors import QuicReverseError, StreamRejected
from ..events import CloseReceived, OpenRequest
from ..session import Session, SessionHandle
from ..transport import quic
from ..transport.base import Connection
from ..transport.tls import certificate_fingerprint, generate_self_signed
from ..wire import CloseCode, Metadata, RejectCode
from .auth import TokenStore
from .config import AUTH_SERVICE, Forward, RelayConfig
from .pipe import TCP_READ_LIMIT, pipe

__all__ = ["EdgeSession", "Relay", "ensure_self_signed"]

log = logging.getLogger("quic_reverse.tunnel.relay")


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


@dataclass(eq=False)
class EdgeSession:
    """One authenticated edge: its session handle and the TCP forwards using it."""

    name: str
    handle: SessionHandle
    connection: Connection
    address: str
    forwards: set[asyncio.Task[None]] = field(default_factory=set)
    retired: bool = False


class Relay:
    """A running relay. ``await start()``, then ``await wait_stopped()``/``shutdown()``."""

    def __init__(self, config: RelayConfig, tokens: TokenStore) -> None:
        self.config = config
        self.tokens = tokens
        self.fingerprint: str | None = None
        self._edges: dict[str, EdgeSession] = {}
        self._quic: quic.QuicServer | None = None
        self._tcp: list[asyncio.Server] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = False
        self.quic_address: tuple[str, int] | None = None
        self.forward_addresses: dict[Forward, tuple[str, int]] = {}

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Load TLS, listen for edges (UDP) and for TCP clients on every forward."""
        cfg = self.config
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
            try:
                self.fingerprint = certificate_fingerprint(cert.read_bytes())
            except OSError as exc:
                raise QuicReverseError(f"cannot read certificate {cert}: {exc.strerror}") from exc
        tls = quic.ServerTLS(certfile=str(cert), keyfile=str(key), alpn=(cfg.alpn,))
        host, port = cfg.listen
        self._quic = await quic.serve(
            host,
            port,
            tls=tls,
            on_connection=self._on_connection,
            stack=cast(quic.Stack, cfg.stack),
        )
        self.quic_address = self._quic.address
        log.info(
            "listening for edges on %s:%d (udp, %s), certificate sha256 %s",
            self.quic_address[0],
            self.quic_address[1],
            cfg.stack,
            self.fingerprint,
        )
        for fwd in cfg.forwards:
            server = await asyncio.start_server(
                self._tcp_handler(fwd),
                fwd.host,
                fwd.port,
                limit=TCP_READ_LIMIT,
            )
            self._tcp.append(server)
            sockname = server.sockets[0].getsockname()
            self.forward_addresses[fwd] = (sockname[0], sockname[1])
            log.info("forward %s:%d -> %s/%s", sockname[0], sockname[1], fwd.edge, fwd.service)
        log.info(
            "relay ready: %d forward(s), %d edge token(s)",
            len(cfg.forwards),
            len(self.tokens.names),
        )

    async def shutdown(self) -> None:
        """Graceful stop: no new TCP clients or edges; running forwards get ``grace``
        seconds to finish; then every session is closed cleanly."""
        if self._stopping:
            return
        self._stopping = True
        for server in self._tcp:
            server.close()
        log.info(
            "shutting down: no new connections, %.1fs grace for open streams", self.config.grace
        )
        forwards = {t for e in self._edges.values() for t in e.forwards}
        if forwards:
            _, pending = await asyncio.wait(forwards, timeout=self.config.grace)
            for t in pending:
                t.cancel()
            if pending:
                log.info("grace period over: aborting %d stream(s)", len(pending))
                await asyncio.gather(*pending, return_exceptions=True)
        edges = list(self._edges.values())
        self._edges.clear()
        await asyncio.gather(
            *(self._close_edge(e, CloseCode.NORMAL, "relay shutting down") for e in edges),
            return_exceptions=True,
        )
        for server in self._tcp:
            with contextlib.suppress(Exception):
                await server.wait_closed()
        if self._quic is not None:
            self._quic.close()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5):
                    await self._quic.wait_closed()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        log.info("relay stopped")

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------ edges

    def _session_config(self) -> Config:
        cfg = self.config
        return Config(
            agent=f"quic-reverse-relay/{__version__}",
            negotiation_timeout=cfg.auth_timeout,
            open_timeout=cfg.open_timeout,
            ping_interval=cfg.ping_interval,
            ping_timeout=cfg.ping_timeout,
        )

    async def _on_connection(self, conn: Connection) -> None:
        """One edge connection: negotiate, authenticate (bounded), then serve until it ends."""
        peer = "{}:{}".format(*conn.remote_address)
        if self._stopping:
            conn.close(0, b"relay shutting down")
            return
        log.info("edge connection from %s", peer)
        handle: SessionHandle | None = None
        try:
            async with asyncio.timeout(self.config.auth_timeout):
                handle = await Session(conn, Role.SERVER, self._session_config()).start()
                name = await self._authenticate(handle, peer)
        except TimeoutError:
            log.warning(
                "edge %s did not authenticate within %.1fs; closing", peer, self.config.auth_timeout
            )
            await self._abandon(handle, conn, "authentication timeout")
            return
        except QuicReverseError as exc:
            log.warning("edge %s: session failed before authentication: %s", peer, exc)
            await self._abandon(handle, conn, "error")
            return
        if name is None:
            await self._abandon(handle, conn, "authentication failed")
            return
        if self._stopping:
            await self._abandon(handle, conn, "relay shutting down")
            return
        edge = EdgeSession(name=name, handle=handle, connection=conn, address=peer)
        old = self._edges.get(name)
        self._edges[name] = edge  # atomic swap: new TCP clients use the new session now
        if old is not None:
            old.retired = True
            log.info(
                "edge %r reconnected from %s: replacing its session from %s",
                name,
                peer,
                old.address,
            )
            self._spawn(
                self._close_edge(old, CloseCode.NORMAL, "replaced by a new session"),
                f"retire {name}",
            )
        log.info("edge %r authenticated from %s (agent %r)", name, peer, handle.remote_agent)
        try:
            await self._serve_edge(edge)
        finally:
            if self._edges.get(name) is edge:
                del self._edges[name]
            if not edge.retired:
                await self._close_edge(edge, CloseCode.NORMAL, "session ended")

    async def _authenticate(self, handle: SessionHandle, peer: str) -> str | None:
        """Wait for the auth open; return the edge name, or ``None`` if it failed."""
        while True:
            event = await handle.process_message()
            if event is None:
                log.warning("edge %s closed the session before authenticating", peer)
                return None
            if isinstance(event, CloseReceived):
                log.warning("edge %s closed the session before authenticating", peer)
                return None
            if not isinstance(event, OpenRequest):
                continue
            if event.service != AUTH_SERVICE:
                log.warning(
                    "edge %s asked for %r before authenticating; rejected", peer, event.service
                )
                await handle.reject_open(
                    event.request_id, RejectCode.UNAUTHORIZED, "authenticate first"
                )
                continue
            name = event.metadata.get("name")
            token = event.metadata.get("token")
            if isinstance(name, str) and self.tokens.verify(name, token):
                stream = await handle.accept_open(event.request_id)
                with contextlib.suppress(QuicReverseError):
                    await stream.aclose()
                return name
            shown = name if isinstance(name, str) and len(name) <= 64 else "<invalid>"
            log.warning(
                "edge %s failed authentication as %r (unknown name or wrong token)", peer, shown
            )
            with contextlib.suppress(QuicReverseError):
                await handle.reject_open(
                    event.request_id, RejectCode.UNAUTHORIZED, "authentication failed"
                )
            return None

    async def _serve_edge(self, edge: EdgeSession) -> None:
        """Process an authenticated edge's control events until the session ends."""
        handle = edge.handle
        while True:
            try:
                event = await handle.process_message()
            except QuicReverseError as exc:
                if not edge.retired:
                    log.warning("edge %r (%s): session lost: %s", edge.name, edge.address, exc)
                return
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

    async def _close_edge(self, edge: EdgeSession, code: CloseCode, reason: str) -> None:
        """Abort the edge's TCP forwards and close its session cleanly (bounded)."""
        for task in list(edge.forwards):
            task.cancel()
        if edge.forwards:
            await asyncio.gather(*edge.forwards, return_exceptions=True)
        with contextlib.suppress(QuicReverseError, TimeoutError):
            async with asyncio.timeout(5):
                await edge.handle.close(code, reason)
        edge.connection.close(0, reason.encode())

    async def _abandon(self, handle: SessionHandle | None, conn: Connection, reason: str) -> None:
        if handle is not None:
            with contextlib.suppress(QuicReverseError, TimeoutError):
                async with asyncio.timeout(2):
                    await handle.close(CloseCode.ERROR, reason)
        conn.close(0, reason.encode())

    # ------------------------------------------------------------------ TCP clients

    def _tcp_handler(
        self, fwd: Forward
    ) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await self._on_tcp(fwd, reader, writer)

        return handler

    async def _on_tcp(
        self, fwd: Forward, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        peername = writer.get_extra_info("peername")
        client = f"{peername[0]}:{peername[1]}" if peername else "?"
        target = f"{fwd.edge}/{fwd.service}"
        edge = None if self._stopping else self._edges.get(fwd.edge)
        if edge is None:
            log.warning(
                "tcp %s -> %s: edge %r is not connected; closing the client",
                client,
                target,
                fwd.edge,
            )
            writer.close()
            return
        task = asyncio.current_task()
        assert task is not None
        edge.forwards.add(task)
        started = time.monotonic()
        try:
            try:
                async with asyncio.timeout(self.config.open_timeout):
                    stream = await edge.handle.open(
                        fwd.service, Metadata.structured({"client": client})
                    )
            except StreamRejected as exc:
                log.warning("tcp %s -> %s: edge rejected the open: %s", client, target, exc)
                writer.close()
                return
            except TimeoutError:
                log.warning(
                    "tcp %s -> %s: no answer from the edge within %.1fs; closing the client",
                    client,
                    target,
                    self.config.open_timeout,
                )
                writer.close()
                return
            except QuicReverseError as exc:
                log.warning(
                    "tcp %s -> %s: open failed: %s; closing the client", client, target, exc
                )
                writer.close()
                return
            lsid = stream.logical_stream_id
            log.info("tcp %s -> %s: stream %d opened", client, target, lsid)
            result = await pipe(reader, writer, stream)
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
            )
        except asyncio.CancelledError:
            log.info(
                "tcp %s -> %s: aborted (edge session replaced or relay stopping)", client, target
            )
            writer.transport.abort()
            raise
        finally:
            edge.forwards.discard(task)

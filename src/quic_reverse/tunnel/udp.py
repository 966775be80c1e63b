"""UDP forwarding over datagram flows (``--forward udp:...`` / ``--expose S=udp:...``).

Relay side, :class:`UdpForward`: one UDP socket per ``--forward udp:HOST:PORT=EDGE/S``.
Each UDP client address gets its own datagram flow to the edge's service ``S``
(``SessionHandle.open_flow``: the edge's allow-list, the relay's authentication and the
reject codes apply as for TCP), opened at the client's first datagram; replies on the
flow go back to that client address. A flow idle for ``udp_idle_timeout`` seconds
(default 60) closes; at most ``max_udp_flows`` client flows exist per forward, and a
datagram of a new client past that is dropped and counted.

Edge side, :class:`UdpExpose`: a flow request for an exposed ``udp:`` service gets a
connected UDP socket to the fixed target (the relay never chooses the address); at most
``max_udp_flows`` flows per session (more are rejected ``LIMIT_EXCEEDED``).

Datagrams too large for the path (``DatagramFlow.max_datagram_size``) are dropped and
counted, never fragmented into a stream. **Fallback**: when the edge's session offers no
datagram flows (a Rust edge, a peer with ``datagram_flows`` off, a QUIC connection
without DATAGRAM frames), the forward refuses at the client's first datagram: the
datagram is dropped and a WARNING names the reason (logged on the 1st, 2nd, 4th...
refusal, so a flood cannot flood the log); nothing is ever sent to such a peer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from ..errors import (
    DatagramFlowClosed,
    DatagramsUnavailable,
    DatagramTooLarge,
    QuicReverseError,
    StreamRejected,
)
from ..events import OpenRequestReceived
from ..flow import DatagramFlow
from ..session import SessionHandle
from ..wire import CloseCode, Features, Metadata, OpenFlags, RejectCode
from .registry import Pool, Replica, Unavailable

__all__ = ["DEFAULT_MAX_UDP_FLOWS", "DEFAULT_UDP_IDLE", "UdpExpose", "UdpForward", "UdpStats"]

log = logging.getLogger("quic_reverse.tunnel.udp")

#: Default idle expiry of a UDP client's flow (seconds).
DEFAULT_UDP_IDLE = 60.0
#: Default bound on UDP flows (per relay forward / per edge session).
DEFAULT_MAX_UDP_FLOWS = 1024
#: Datagrams held per client while its flow is being opened (more are dropped).
_PENDING = 64
#: Receive queue of each flow (datagrams).
_FLOW_QUEUE = 1024


def is_flow_request(event: OpenRequestReceived, features: Features | None) -> bool:
    """Is this peer request a datagram flow request (the extension negotiated)?"""
    return bool(event.flags & OpenFlags.DATAGRAM) and bool(
        features is not None and features & Features.DATAGRAM_FLOWS
    )


@dataclass
class UdpStats:
    """Counters of one forward or expose (datagrams unless said otherwise)."""

    flows_opened: int = 0
    #: client -> service direction: received from UDP, sent on a flow.
    up_received: int = 0
    up_sent: int = 0
    #: service -> client direction: received on a flow, sent to UDP.
    down_received: int = 0
    down_sent: int = 0
    #: dropped because larger than the path's datagram limit (never fragmented).
    too_large: int = 0
    #: dropped: flow refused/failed, flow limit reached, or pending queue full.
    refused: int = 0


class _Socket(asyncio.DatagramProtocol):
    """A UDP socket calling ``on_datagram(data, addr)``."""

    def __init__(self, on_datagram: Callable[[bytes, Any], None]) -> None:
        self.on_datagram = on_datagram
        self.transport: asyncio.DatagramTransport | None = None
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (the selector loop's datagram transport is not a DatagramTransport subclass)
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.on_datagram(data, addr)

    def error_received(self, exc: Exception) -> None:  # e.g. ICMP port unreachable
        log.debug("udp socket error: %s", exc)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)


def _send_flow(flow: DatagramFlow, data: bytes, stats: UdpStats) -> bool:
    try:
        flow.send(data)
    except DatagramTooLarge:
        stats.too_large += 1
        if stats.too_large & (stats.too_large - 1) == 0:
            log.warning(
                "udp: dropped a %d-byte datagram: larger than the path allows (%d); "
                "%d dropped so far",
                len(data),
                flow.max_datagram_size,
                stats.too_large,
            )
        return False
    except QuicReverseError:
        stats.refused += 1
        return False
    return True


class _Client:
    """One UDP client address of a relay forward, and its flow."""

    __slots__ = ("addr", "flow", "pending", "task")

    def __init__(self, addr: Any) -> None:
        self.addr = addr
        self.flow: DatagramFlow | None = None
        self.pending: list[bytes] = []
        self.task: asyncio.Task[None] | None = None


class UdpForward:
    """The relay's UDP listener of one ``--forward udp:HOST:PORT=EDGE/SERVICE``."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        edge: str,
        service: str,
        pool: Callable[[], Pool],
        open_timeout: float,
        idle_timeout: float = DEFAULT_UDP_IDLE,
        max_flows: int = DEFAULT_MAX_UDP_FLOWS,
    ) -> None:
        self.host, self.port = host, port
        self.edge, self.service = edge, service
        self._pool = pool
        self._open_timeout = open_timeout
        self._idle = idle_timeout
        self._max_flows = max_flows
        self._clients: dict[Any, _Client] = {}
        self._socket: _Socket | None = None
        self.stats = UdpStats()
        self.address: tuple[str, int] | None = None
        self._target = f"{edge}/{service}"

    @property
    def clients(self) -> int:
        """UDP client addresses with a flow (or one being opened)."""
        return len(self._clients)

    async def start(self) -> tuple[str, int]:
        """Bind the UDP socket; returns its address. Raises OSError naming the forward."""
        loop = asyncio.get_running_loop()
        try:
            _, proto = await loop.create_datagram_endpoint(
                lambda: _Socket(self._on_datagram), local_addr=(self.host, self.port)
            )
        except OSError as exc:
            raise OSError(
                exc.errno,
                f"--forward udp:{self.host}:{self.port}={self._target}: cannot listen: "
                f"{exc.strerror or exc}",
            ) from None
        self._socket = proto
        assert proto.transport is not None
        sockname = proto.transport.get_extra_info("sockname")
        self.address = (sockname[0], sockname[1])
        log.info("forward udp:%s:%d -> %s", self.address[0], self.address[1], self._target)
        return self.address

    async def close(self) -> None:
        """Stop listening and close every client's flow."""
        if self._socket is not None and self._socket.transport is not None:
            self._socket.transport.close()
        tasks = [c.task for c in self._clients.values() if c.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._clients.clear()

    # ------------------------------------------------------------------ datagrams

    def _on_datagram(self, data: bytes, addr: Any) -> None:
        stats = self.stats
        stats.up_received += 1
        client = self._clients.get(addr)
        if client is None:
            if len(self._clients) >= self._max_flows:
                self._refuse(addr, f"{self._max_flows} UDP flows in use (max_udp_flows)")
                return
            client = _Client(addr)
            self._clients[addr] = client
            client.pending.append(data)
            client.task = asyncio.get_running_loop().create_task(
                self._run(client), name=f"udp {addr[0]}:{addr[1]}"
            )
            return
        flow = client.flow
        if flow is None:
            if len(client.pending) < _PENDING:
                client.pending.append(data)
            else:
                stats.refused += 1
            return
        if _send_flow(flow, data, stats):
            stats.up_sent += 1

    def _refuse(self, addr: Any, why: str) -> None:
        stats = self.stats
        stats.refused += 1
        if stats.refused & (stats.refused - 1) == 0:
            log.warning(
                "udp %s:%d -> %s: %s; datagram dropped (%d dropped so far)",
                addr[0],
                addr[1],
                self._target,
                why,
                stats.refused,
            )

    async def _open(self, client: _Client) -> tuple[Replica, DatagramFlow] | None:
        pool = self._pool()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._open_timeout
        task = asyncio.current_task()
        assert task is not None
        addr = client.addr
        metadata = Metadata.structured({"client": f"{addr[0]}:{addr[1]}", "protocol": "udp"})
        try:
            replica = await pool.acquire(set(), deadline)
        except Unavailable as exc:
            self._refuse(addr, str(exc))
            return None
        replica.forwards.add(task)
        try:
            async with asyncio.timeout_at(deadline):
                flow = await replica.handle.open_flow(
                    self.service, metadata, idle_timeout=self._idle, queue_size=_FLOW_QUEUE
                )
        except DatagramsUnavailable as exc:
            self._refuse(addr, f"edge {self.edge!r} cannot carry UDP: {exc}")
        except StreamRejected as exc:
            self._refuse(addr, f"edge rejected the flow: {exc}")
        except (QuicReverseError, TimeoutError) as exc:
            self._refuse(addr, f"flow open failed: {exc or 'open_timeout'}")
        else:
            return replica, flow
        replica.forwards.discard(task)
        pool.release(replica)
        return None

    async def _run(self, client: _Client) -> None:
        addr = client.addr
        stats = self.stats
        opened: tuple[Replica, DatagramFlow] | None = None
        try:
            opened = await self._open(client)
            if opened is None:
                stats.refused += len(client.pending) - 1  # the first was counted by _refuse
                return
            replica, flow = opened
            client.flow = flow
            stats.flows_opened += 1
            log.info(
                "udp %s:%d -> %s: flow %d opened", addr[0], addr[1], self._target, flow.flow_id
            )
            for data in client.pending:
                if _send_flow(flow, data, stats):
                    stats.up_sent += 1
            client.pending.clear()
            sock = self._socket
            assert sock is not None and sock.transport is not None
            transport = sock.transport
            while True:
                try:
                    data = await flow.recv()
                except DatagramFlowClosed as exc:
                    log.info(
                        "udp %s:%d -> %s: flow %d closed: %s",
                        addr[0],
                        addr[1],
                        self._target,
                        flow.flow_id,
                        exc,
                    )
                    return
                stats.down_received += 1
                if transport.is_closing():
                    return
                transport.sendto(data, addr)
                stats.down_sent += 1
        finally:
            if self._clients.get(addr) is client:
                del self._clients[addr]
            if opened is not None:
                replica, flow = opened
                flow.close(CloseCode.NORMAL, None)
                task = asyncio.current_task()
                if task is not None:
                    replica.forwards.discard(task)
                self._pool().release(replica)


class UdpExpose:
    """The edge's side: answer flow requests for exposed ``udp:`` services."""

    def __init__(
        self, *, idle_timeout: float = DEFAULT_UDP_IDLE, max_flows: int = DEFAULT_MAX_UDP_FLOWS
    ) -> None:
        self._idle = idle_timeout
        self._max_flows = max_flows
        self._active = 0
        self.stats = UdpStats()

    @property
    def active(self) -> int:
        """Flows being served now."""
        return self._active

    async def serve_flow(
        self,
        handle: SessionHandle,
        request: OpenRequestReceived,
        target: tuple[str, int],
        asked: str,
    ) -> None:
        """Serve the relay's flow request ``request`` for a service exposed at ``target``
        (already allow-listed by the caller) until the flow or the session ends."""
        rid, service = request.request_id, request.service
        if self._active >= self._max_flows:
            log.warning(
                "udp service %r%s: %d flows in use (max_udp_flows); rejected",
                service,
                asked,
                self._active,
            )
            with contextlib.suppress(QuicReverseError):
                await handle.reject_open(rid, RejectCode.LIMIT_EXCEEDED, "too many UDP flows")
            return
        loop = asyncio.get_running_loop()
        stats = self.stats
        self._active += 1
        sock: _Socket | None = None
        flow: DatagramFlow | None = None
        try:
            holder: list[DatagramFlow] = []

            def upstream(data: bytes, _addr: Any) -> None:  # service -> relay
                stats.down_received += 1
                if holder and _send_flow(holder[0], data, stats):
                    stats.down_sent += 1

            try:
                _, sock = await loop.create_datagram_endpoint(
                    lambda: _Socket(upstream), remote_addr=target
                )
            except OSError as exc:
                log.warning(
                    "udp service %r%s: cannot reach %s:%d: %s", service, asked, *target, exc
                )
                with contextlib.suppress(QuicReverseError):
                    await handle.reject_open(
                        rid, RejectCode.SERVICE_UNAVAILABLE, "service unavailable"
                    )
                return
            flow = handle.accept_flow(rid, idle_timeout=self._idle, queue_size=_FLOW_QUEUE)
            holder.append(flow)
            stats.flows_opened += 1
            log.info("flow %d%s -> %s (udp %s:%d) opened", flow.flow_id, asked, service, *target)
            assert sock.transport is not None
            transport = sock.transport
            while True:
                try:
                    data = await flow.recv()
                except DatagramFlowClosed as exc:
                    log.info("flow %d -> %s: closed: %s", flow.flow_id, service, exc)
                    return
                stats.up_received += 1
                transport.sendto(data)
                stats.up_sent += 1
        except QuicReverseError as exc:
            log.info("udp service %r%s: %s", service, asked, exc)
        finally:
            self._active -= 1
            if flow is not None:
                flow.close()
            if sock is not None and sock.transport is not None:
                sock.transport.close()

"""The data-stream acceptor: peer-opened streams, their StreamBind headers, pairing.

One task (:meth:`StreamAcceptor.run`) takes every peer-opened bidirectional stream
after negotiation (a client starts it at once, to see a peer that is also a client).
The core hands out a token per stream or refuses it (flood bound). A StreamBind that
is already buffered is read inline; otherwise one short-lived task per stream reads
it, bounded by the core's header deadline. The pair then waits here, by token, until
the core pairs it (``OpenResolved``) or refuses it (``StreamRefused``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any, TypeAlias

from ._core import SessionCore
from .errors import IncompleteReadError, TransportError
from .transport.base import Connection, RecvStream, SendStream
from .wire import STREAM_BIND_SIZE, CloseCode

__all__ = ["Pair", "StreamAcceptor", "reset_pair"]

logger = logging.getLogger("quic_reverse.session")

Pair: TypeAlias = tuple[SendStream, RecvStream]
Spawn: TypeAlias = Callable[[Coroutine[Any, Any, None], str], "asyncio.Task[None]"]


def reset_pair(pair: Pair, code: int = int(CloseCode.RESET)) -> None:
    """Abort both directions of a stream. Never raises."""
    send, recv = pair
    send.reset(code)
    recv.stop(code)


class StreamAcceptor:
    """Peer-opened data streams of one session (see the module docstring)."""

    def __init__(
        self,
        conn: Connection,
        core: SessionCore,
        pump: Callable[[], None],
        spawn: Spawn,
        tag: str,
    ) -> None:
        self._conn = conn
        self._core = core
        self._pump = pump
        self._spawn = spawn
        self._tag = tag
        self._loop = asyncio.get_running_loop()
        self.held: dict[int, Pair] = {}  # token -> stream whose pairing is pending
        self.header_tasks: dict[int, asyncio.Task[None]] = {}
        self._refused = 0

    def take(self, token: int) -> Pair:
        """The stream the core just paired (``OpenResolved``)."""
        return self.held.pop(token)

    def refuse(self, token: int, reason: str) -> None:
        """The core refused stream ``token``: reset it, stop reading its header."""
        refused = self.held.pop(token, None)
        logger.warning("%s: resetting data stream: %s", self._tag, reason)
        if refused is not None:
            reset_pair(refused)
        task = self.header_tasks.pop(token, None)
        if task is not None and task is not asyncio.current_task():
            task.cancel()

    def close(self) -> None:
        """The session ended: reset every held stream, stop every header read."""
        for pair in self.held.values():
            reset_pair(pair)
        self.held.clear()
        for task in list(self.header_tasks.values()):
            task.cancel()
        self.header_tasks.clear()

    async def run(self) -> None:
        """The acceptor task, until the connection closes."""
        core = self._core
        while True:
            pair = await self._conn.accept_bi()
            if pair is None:
                return
            if core.is_negotiating:
                # Only a peer that is also Role.CLIENT opens a stream now (its control
                # stream): a conflict, reported within one round trip.
                reset_pair(pair)
                core.roles_conflict()
                self._pump()
                continue
            header_ready = pair[1].buffered_bytes >= STREAM_BIND_SIZE
            token = core.stream_arrived(self._loop.time(), header_ready=header_ready)
            if token is None:
                self._refused += 1
                if self._refused & (self._refused - 1) == 0:  # 1, 2, 4...: no flood
                    logger.warning(
                        "%s: resetting unexpected data stream %d (nothing awaits it; %d so far)",
                        self._tag,
                        pair[0].stream_id,
                        self._refused,
                    )
                reset_pair(pair)
                continue
            self.held[token] = pair
            if header_ready:
                # The header is already here: take it without a task (cannot block).
                header = pair[1].take_buffered(STREAM_BIND_SIZE)
                if len(header) == STREAM_BIND_SIZE:
                    core.stream_header(token, header, self._loop.time())
                    self._pump()
                else:  # not taken whole: the general path reads the rest or says why not
                    await self._read_header(token, pair[1], header)
                continue
            self.header_tasks[token] = self._spawn(
                self._read_header(token, pair[1]), f"stream-header {token}"
            )
            self._pump()

    async def _read_header(self, token: int, recv: RecvStream, head: bytes = b"") -> None:
        """Read the rest of stream ``token``'s StreamBind (``head`` is what was read)."""
        try:
            header = head + await recv.read_exactly(STREAM_BIND_SIZE - len(head))
        except (TransportError, IncompleteReadError) as exc:
            logger.warning("%s: data stream lost before its StreamBind: %s", self._tag, exc)
            self.header_tasks.pop(token, None)
            self._core.stream_lost(token)
            pair = self.held.pop(token, None)
            if pair is not None:
                reset_pair(pair)
            self._pump()
            return
        self.header_tasks.pop(token, None)
        self._core.stream_header(token, header, self._loop.time())
        self._pump()

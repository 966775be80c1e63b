"""The control channel: the control stream's reader and its only writer.

:class:`ControlChannel` opens (client) or accepts (server) the control stream, feeds
what it reads to the core, and runs the writer task. A transport failure ends the
session through the core; a peer that closes the connection with code 0 (no error)
without a session close first ends it gracefully (``peer_closed_connection``).

Reading: where the transport offers it (``RecvStream.set_data_callback``), control
bytes are fed to the core from the transport's receive path, in the loop turn their
datagram arrives, so an answer (an OpenResponse) leaves with that same turn's transmit;
the reader task takes what that path leaves (FIN, errors, input held back while the
outbox is over its high-water mark) and is the whole reader on other transports.

The writer: an ordered outbox, handed to the transport without awaiting.

Bytes for the control stream come from the sans-IO core (:meth:`SessionCore.move_data_to`)
in whatever task or callback fed it an input. They are appended to
:class:`ControlWriter`'s outbox. While the writer is parked, the first bytes of a loop
turn register one callback that runs right before the transport's next transmit
(``SendStream.call_before_send``) and hands everything queued by then to the transport
at once with the non-blocking, all-or-nothing ``SendStream.try_write``: one transport
write per turn, leaving with the transmit a write made at once would have joined. When
the stream has no room, the writer task writes the outbox in order. A caller that needs
to know its bytes left (``close_stream``, ``reject_open``) awaits
:meth:`ControlWriter.flushed`: a cancelled caller abandons the wait, never the bytes,
so the peer never reads a torn frame.

Why one writer: a transport ``write()`` cancelled while it waits for room may have
queued a prefix of its data (see ``transport/base.py``). Only the writer task awaits a
write, and it is cancelled only when the session is over, so no frame is ever cut short;
the hand-over at the transmit never awaits and takes the outbox whole or not at all.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from ._core import SessionCore
from .config import Role
from .errors import ConnectionClosed, QuicReverseError, TransportError
from .transport.base import Connection, RecvStream, SendStream

__all__ = ["ControlChannel", "ControlWriter"]

logger = logging.getLogger("quic_reverse.session")

_READ_SIZE = 65536
#: Pause reading the control stream while this much is waiting to be written to it.
_OUTBOX_HIGH_WATER = 1 << 20


class ControlWriter:
    """The outbox of one control stream and the state of its writer task.

    ``queued``/``written`` count bytes since the start: a caller's bytes are out once
    ``written`` reaches the ``queued`` value seen right after they were appended.

    How bytes leave the outbox, always whole and in order:

    * **at the transmit** (writer parked): the first bytes of a loop turn register
      one callback with the transport (``SendStream.call_before_send``) that runs right
      before its next transmit, the one that would carry a write made now, and hands
      everything the turn queued to the transport at once with the non-blocking,
      all-or-nothing ``SendStream.try_write``: one transport write per turn for all
      its frames, and no loop turn of latency for a lone open;
    * **synchronously**, on a transport without that callback: ``try_write`` at once;
    * **by the writer task** when the stream has no room (or before it is known): the
      task awaits ``write`` with everything queued.
    """

    __slots__ = (
        "_busy",
        "_flush_pending",
        "_idle",
        "_ready",
        "_send",
        "_waiters",
        "buffer",
        "discarding",
        "queued",
        "written",
    )

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.queued = 0
        self.written = 0
        #: Once the session's shutdown is done nothing is written any more.
        self.discarding = False
        self._ready = asyncio.Event()  # the buffer has bytes for the writer task
        self._idle = asyncio.Event()  # everything queued was written (or dropped)
        self._idle.set()
        #: The writer task owns the outbox (it has bytes to write or is writing).
        self._busy = False
        #: A flush is registered with the transport (see the class docstring).
        self._flush_pending = False
        self._waiters: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()
        #: The stream, while the writer task is running (for the fast paths).
        self._send: SendStream | None = None

    def __len__(self) -> int:
        return len(self.buffer)

    def filled(self, added: int) -> None:
        """``added`` bytes were appended to :attr:`buffer`: hand them over at the
        transport's next transmit, now, or by the writer task (see the class
        docstring). Never awaits: nothing a cancellation could cut.
        """
        buffer = self.buffer
        if self.discarding:
            buffer.clear()
            return
        self.queued += added
        if self._busy or self._flush_pending:
            return  # they go after the bytes already waiting, by the same path
        self._idle.clear()
        send = self._send
        if send is not None:
            self._flush_pending = True
            if send.call_before_send(self._flush):
                return
            self._flush()
            return
        self._start_task()

    def _flush(self) -> None:
        """Hand the whole outbox to the transport, or leave it to the writer task."""
        if not self._flush_pending:
            return  # stopped meanwhile
        self._flush_pending = False
        buffer = self.buffer
        if self._busy or not buffer:
            return
        send = self._send
        if send is not None and send.try_write(bytes(buffer)):
            self.written += len(buffer)
            buffer.clear()
            if self._waiters:
                self._wake(self.written)
            self._idle.set()
            return
        self._start_task()

    def _start_task(self) -> None:
        self._busy = True
        self._idle.clear()
        self._ready.set()

    async def flushed(self) -> None:
        """Return once every byte queued so far was handed to the transport (or the
        writer stopped). Cancelling this wait leaves the bytes queued."""
        mark = self.queued
        if self.written >= mark or self.discarding:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((mark, fut))
        await fut

    async def wait_idle(self) -> None:
        """Return once the outbox is empty and no write is in progress."""
        await self._idle.wait()

    async def run(self, send: SendStream) -> None:
        """The writer task: write the outbox in order until cancelled.

        Raises the transport's error when a write fails (the caller ends the session).
        """
        ready = self._ready
        buffer = self.buffer
        self._send = send
        try:
            while True:
                if not buffer or not self._busy:
                    self._busy = False
                    if not buffer:
                        self._idle.set()
                    ready.clear()
                    await ready.wait()
                    continue
                data = bytes(buffer)
                buffer.clear()
                await send.write(data)
                self.written += len(data)
                self._wake(self.written)
        finally:
            self._send = None
            self.stop()

    def stop(self) -> None:
        """No more writes: drop what is queued and release every waiter."""
        self.discarding = True
        self._busy = False
        self._flush_pending = False
        self.buffer.clear()
        self._wake(None)
        self._idle.set()

    def _wake(self, upto: int | None) -> None:
        waiters = self._waiters
        while waiters and (upto is None or waiters[0][0] <= upto):
            _, fut = waiters.popleft()
            if not fut.done():
                fut.set_result(None)


def graceful_close(exc: TransportError) -> bool:
    """Did the peer close the connection on purpose with application code 0?

    An idle timeout or a stateless reset also comes with code 0, but it is a lost
    connection (``ConnectionClosed.lost``), not a close.
    """
    return isinstance(exc, ConnectionClosed) and exc.error_code == 0 and not exc.lost


class ControlChannel:
    """The control stream of one session: read loop and the only writer."""

    def __init__(
        self,
        conn: Connection,
        role: Role,
        core: SessionCore,
        pump: Callable[[], None],
        spawn: Callable[[Coroutine[Any, Any, None], str], asyncio.Task[None]],
    ) -> None:
        self._conn = conn
        self._role = role
        self._core = core
        self._pump = pump
        self._spawn = spawn
        self._loop = asyncio.get_running_loop()
        self.writer = ControlWriter()
        self._send: SendStream | None = None
        self._recv: RecvStream | None = None

    def take_output(self) -> None:
        """Move the core's control bytes to the outbox (wakes the writer)."""
        writer = self.writer
        buffer = writer.buffer
        before = len(buffer)
        if self._core.move_data_to(buffer):
            writer.filled(len(buffer) - before)

    async def run(self) -> None:
        """The reader task: open or accept the control stream, start the writer, feed
        the core until EOF or failure."""
        try:
            if self._role is Role.CLIENT:
                send, recv = await self._conn.open_bi()
            else:
                pair = await self._conn.accept_bi()
                if pair is None:
                    raise ConnectionClosed("connection closed before the control stream opened")
                send, recv = pair
            self._send = send
            self._spawn(self._write(send), "control-writer")
            self._recv = recv
            recv.set_data_callback(self._on_data)
            await self._read(recv)
        except TransportError as exc:
            self._lost(exc)

    def _on_data(self) -> None:
        """Control bytes arrived (called from the transport's receive path): feed them
        to the core now, in this loop turn, rather than in the reader task's next step.
        What is left (outbox over its high-water mark, FIN, errors) the task reads."""
        core = self._core
        recv = self._recv
        if recv is None:
            return
        try:
            while not core.is_closed and len(self.writer) <= _OUTBOX_HIGH_WATER:
                data = recv.take_buffered(_READ_SIZE)
                if not data:
                    return
                core.receive_data(data, self._loop.time())
                self._pump()
        except Exception as exc:  # a bug: end the session as a failed task would
            logger.error("%s: control stream input failed: %r", self._role.value, exc)
            core.abort(TransportError(repr(exc)))
            self._pump()

    async def _read(self, recv: RecvStream) -> None:
        core = self._core
        writer = self.writer
        while not core.is_closed:
            data = await recv.read(_READ_SIZE)
            if not data:
                core.receive_eof(self._loop.time())
                self._pump()
                return
            core.receive_data(data, self._loop.time())
            self._pump()
            if len(writer) > _OUTBOX_HIGH_WATER:
                await writer.wait_idle()

    async def _write(self, send: SendStream) -> None:
        try:
            await self.writer.run(send)
        except TransportError as exc:
            self._lost(exc)

    def _lost(self, exc: TransportError) -> None:
        if graceful_close(exc):
            self._core.peer_closed_connection(exc)
        else:
            self._core.connection_lost(exc)
        self._pump()

    async def linger(self) -> None:
        """Shutdown: wait until the last control bytes are written, then FIN.

        Unbounded here; the caller bounds it (``close_timeout``)."""
        if self._send is None or not self._conn.is_open:
            return
        await self.writer.wait_idle()
        with contextlib.suppress(QuicReverseError):
            await self._send.finish()

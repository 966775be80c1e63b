"""The control stream's only writer: an ordered outbox drained by one task.

Bytes for the control stream come from the sans-IO core (:meth:`SessionCore.move_data_to`)
in whatever task fed it an input. They are appended to :class:`ControlWriter`'s outbox
and written **only** by the writer task (:meth:`ControlWriter.run`), in order. A caller
that needs to know its bytes left (``close_stream``, ``reject_open``, ``accept_open``)
awaits :meth:`ControlWriter.flushed`: a cancelled caller abandons the wait, never the
bytes, so the peer never reads a torn frame.

Why one writer: a transport ``write()`` cancelled while it waits for room may have
queued a prefix of its data (see ``transport/base.py``). Only the writer task writes,
and it is cancelled only when the session is over, so no frame is ever cut short.
"""

from __future__ import annotations

import asyncio
import collections

from .transport.base import SendStream

__all__ = ["ControlWriter"]


class ControlWriter:
    """The outbox of one control stream and the state of its writer task.

    ``queued``/``written`` count bytes since the start: a caller's bytes are out once
    ``written`` reaches the ``queued`` value seen right after they were appended.
    """

    __slots__ = ("_idle", "_ready", "_waiters", "buffer", "discarding", "queued", "written")

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.queued = 0
        self.written = 0
        #: Once the session's shutdown is done nothing is written any more.
        self.discarding = False
        self._ready = asyncio.Event()  # the buffer has bytes for the writer
        self._idle = asyncio.Event()  # everything queued was written (or dropped)
        self._idle.set()
        self._waiters: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()

    def __len__(self) -> int:
        return len(self.buffer)

    def filled(self, added: int) -> None:
        """``added`` bytes were appended to :attr:`buffer`: wake the writer."""
        if self.discarding:
            self.buffer.clear()
            return
        self.queued += added
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
        try:
            while True:
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
            self.stop()

    def stop(self) -> None:
        """No more writes: drop what is queued and release every waiter."""
        self.discarding = True
        self.buffer.clear()
        self._wake(None)
        self._idle.set()

    def _wake(self, upto: int | None) -> None:
        waiters = self._waiters
        while waiters and (upto is None or waiters[0][0] <= upto):
            _, fut = waiters.popleft()
            if not fut.done():
                fut.set_result(None)

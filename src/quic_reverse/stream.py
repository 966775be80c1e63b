"""A bound logical stream with asyncio-streams semantics.

:class:`Stream` wraps one QUIC bidirectional stream (a transport ``SendStream`` and
``RecvStream`` pair) after its StreamBind header has been exchanged. It reads and writes
like ``asyncio.StreamReader``/``StreamWriter``: ``read(n)``, ``readexactly(n)``,
``readline()``, ``readuntil(separator)``, ``at_eof()``, async iteration over chunks,
``write()``/``writelines()`` + ``drain()`` (or ``send()``), ``write_eof()`` for FIN,
``reset(code)`` to abort both directions, ``close()``/``wait_closed()``,
``get_extra_info(name)`` and ``async with``. The errors are asyncio's too: a short
``readexactly`` raises an :class:`asyncio.IncompleteReadError`, a peer reset a
:class:`ConnectionResetError` (see :mod:`quic_reverse.errors`). To hand a stream to code
that wants a real ``StreamReader``/``StreamWriter`` pair or an :class:`asyncio.Protocol`,
see :mod:`quic_reverse.adapters`.

Closing a stream does **not** send an informational ``StreamClose`` control message:
QUIC's FIN and RESET_STREAM already end the stream at the peer, the Rust crate does not
require it, and one control message per stream would halve the open rate of short
streams. Use :meth:`SessionHandle.close_stream` to send one explicitly.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import Any

from .config import Role
from .errors import (
    ConnectionClosed,
    IncompleteReadError,
    LimitOverrunError,
    QuicReverseError,
    StreamReset,
    UsageError,
)
from .transport.base import Connection, RecvStream, SendStream
from .wire import CloseCode, Metadata

__all__ = ["Stream"]

logger = logging.getLogger("quic_reverse.stream")

_CHUNK = 65536
# Codes as plain ints (an Enum member lookup is slow; streams close on every open).
_RESET = int(CloseCode.RESET)
_NORMAL = int(CloseCode.NORMAL)

#: Default ``limit`` of :meth:`Stream.readline`/:meth:`Stream.readuntil` (asyncio's too).
DEFAULT_LIMIT = 2**16


class Stream:
    """One logical stream of a session (see the module docstring).

    Instances are made by the session (``open()``, ``accept_open()``, ``serve()``).
    """

    def __init__(
        self,
        send: SendStream,
        recv: RecvStream,
        *,
        logical_stream_id: int,
        service: str | None,
        on_release: Callable[[Stream], None] | None = None,
        connection: Connection | None = None,
        metadata: Metadata | None = None,
        role: Role | None = None,
    ) -> None:
        self._send = send
        self._recv = recv
        self._lsid = logical_stream_id
        self._service = service
        self._on_release = on_release
        self._buffer = bytearray()  # written, not yet drained
        self._rbuf = bytearray()  # read from the transport, not yet returned
        # What get_extra_info() reports from the session (peername: asked when needed).
        self._connection = connection
        self._metadata = metadata
        self._role = role

    # Flags that start False/None are class attributes until first set (one store
    # less each per stream: streams are made on every open).
    _write_done = False  # FIN sent or reset
    _read_done = False  # EOF/reset received, or stopped
    _released = False
    _closing = False
    _close_task: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return (
            f"<Stream lsid={self._lsid} service={self._service!r} "
            f"quic_id={self._send.stream_id}{' closing' if self._closing else ''}>"
        )

    # ------------------------------------------------------------------ properties

    @property
    def logical_stream_id(self) -> int:
        """The logical stream id carried by this stream's StreamBind header."""
        return self._lsid

    @property
    def service(self) -> str | None:
        """The service name of the open request this stream answers."""
        return self._service

    @property
    def quic_stream_id(self) -> int:
        """The underlying QUIC stream id (diagnostics)."""
        return self._send.stream_id

    def at_eof(self) -> bool:
        """True once the peer's FIN (or reset) was read and every byte returned."""
        return self._read_done and not self._rbuf

    def is_closing(self) -> bool:
        """True once ``close()``/``reset()`` was called or both directions are done."""
        return self._closing or self._released

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        """Information about the stream, like ``asyncio.StreamWriter.get_extra_info``.

        Names: ``"peername"`` (the peer's ``(host, port)``), ``"service"``,
        ``"metadata"`` (the OpenRequest's :class:`~quic_reverse.wire.Metadata`: what was
        sent, on the side that called ``open()``; what was received, in a
        :meth:`~quic_reverse.SessionHandle.serve` handler; ``None`` after a bare
        ``accept_open()``, whose caller holds the request event), ``"logical_stream_id"``,
        ``"quic_stream_id"``, ``"role"`` (this side's :class:`~quic_reverse.Role`),
        ``"stream"`` (this object). Any other name returns ``default``.
        """
        if name == "service":
            return self._service
        if name == "logical_stream_id":
            return self._lsid
        if name == "quic_stream_id":
            return self._send.stream_id
        if name == "stream":
            return self
        connection = self._connection
        if connection is None:  # not made by a session
            return default
        if name == "peername":
            return connection.remote_address
        if name == "metadata":
            return self._metadata
        if name == "role":
            return self._role
        return default

    # ------------------------------------------------------------------ reading

    async def read(self, n: int = -1) -> bytes:
        """Read up to ``n`` bytes (``n < 0``: until EOF). ``b""`` means EOF.

        Raises:
            StreamReset: the peer reset the stream.
            ConnectionClosed: the connection closed before EOF.
        """
        if n == 0:
            return b""
        rbuf = self._rbuf
        if n > 0:
            if rbuf:  # left by a cancelled read()/readexactly() or one that hit EOF
                data = bytes(rbuf[:n])
                del rbuf[:n]
                return data
            return await self._read_chunk(n)
        # Until EOF: what arrives is kept in the stream, so a cancelled call loses nothing.
        while chunk := await self._read_chunk(_CHUNK):
            rbuf += chunk
        data = bytes(rbuf)
        rbuf.clear()
        return data

    async def _read_chunk(self, n: int) -> bytes:
        if self._read_done:
            return b""
        try:
            data = await self._recv.read(n)
        except (StreamReset, ConnectionClosed):
            self._read_finished()
            raise
        if not data:
            self._read_finished()
        return data

    async def readexactly(self, n: int) -> bytes:
        """Read exactly ``n`` bytes.

        Raises:
            IncompleteReadError: EOF came first (``.partial`` holds what arrived).
            StreamReset, ConnectionClosed: as for :meth:`read`.
        """
        if n < 0:
            raise ValueError("readexactly size can not be less than zero")
        # Bytes read so far live in the stream, not in this call: a cancelled
        # readexactly() loses nothing (the next read returns them).
        buf = self._rbuf
        while len(buf) < n:
            if self._read_done:
                partial = bytes(buf)
                buf.clear()
                raise IncompleteReadError(partial, n)
            chunk = await self._read_chunk(n - len(buf))
            if not chunk:
                partial = bytes(buf)
                buf.clear()
                raise IncompleteReadError(partial, n)
            buf += chunk
        data = bytes(buf[:n])
        del buf[:n]
        return data

    async def readuntil(self, separator: bytes = b"\n", *, limit: int = DEFAULT_LIMIT) -> bytes:
        """Read up to and including ``separator`` (as ``asyncio.StreamReader.readuntil``).

        At most ``limit`` bytes are held while looking for it; a cancelled call loses
        nothing (the bytes stay in the stream for the next read).

        Raises:
            IncompleteReadError: EOF came before the separator (``.partial`` holds the
                rest of the stream, ``.expected`` is ``None``); the bytes are consumed.
            LimitOverrunError: no separator within ``limit`` bytes (``.consumed``); the
                bytes stay in the stream.
            ValueError: an empty separator.
            StreamReset, ConnectionClosed: as for :meth:`read`.
        """
        if not separator:
            raise ValueError("separator should be at least one-byte string")
        seplen = len(separator)
        buf = self._rbuf
        offset = 0
        while True:
            idx = buf.find(separator, offset)
            if idx != -1:
                end = idx + seplen
                if end > limit:
                    raise LimitOverrunError(
                        "separator is found, but chunk is longer than limit", idx
                    )
                data = bytes(buf[:end])
                del buf[:end]
                return data
            offset = max(0, len(buf) + 1 - seplen)
            if offset > limit:
                raise LimitOverrunError(
                    "separator is not found, and chunk exceeds the limit", offset
                )
            chunk = await self._read_chunk(_CHUNK)
            if not chunk:
                partial = bytes(buf)
                buf.clear()
                raise IncompleteReadError(partial, None)
            buf += chunk

    async def readline(self, *, limit: int = DEFAULT_LIMIT) -> bytes:
        """Read one line, ``\\n`` included (as ``asyncio.StreamReader.readline``).

        At EOF the rest of the stream is returned without ``\\n`` (``b""`` at EOF).

        Raises:
            ValueError: no ``\\n`` within ``limit`` bytes (the over-long data is dropped,
                as asyncio does).
            StreamReset, ConnectionClosed: as for :meth:`read`.
        """
        try:
            return await self.readuntil(b"\n", limit=limit)
        except IncompleteReadError as exc:
            return exc.partial
        except LimitOverrunError as exc:
            buf = self._rbuf
            if buf.startswith(b"\n", exc.consumed):
                del buf[: exc.consumed + 1]
            else:
                buf.clear()
            raise ValueError(str(exc)) from None

    def __aiter__(self) -> Stream:
        return self

    async def __anext__(self) -> bytes:
        chunk = await self.read(_CHUNK)
        if not chunk:
            raise StopAsyncIteration
        return chunk

    # ------------------------------------------------------------------ writing

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Buffer ``data``; call :meth:`drain` to send it (with backpressure).

        Raises:
            UsageError: the stream is closed for writing (``write_eof``, ``reset``...).
        """
        if self._write_done or self._closing:
            raise UsageError(f"stream {self._lsid} is closed for writing")
        self._buffer += data

    async def drain(self) -> None:
        """Send buffered data; returns once it is within the stream's send budget.

        Raises:
            StreamStopped: the peer asked us to stop sending.
            ConnectionClosed: the connection is closed.
        """
        if self._buffer:
            data = bytes(self._buffer)
            self._buffer.clear()
            await self._write(data)

    def writelines(self, data: Iterable[bytes | bytearray | memoryview]) -> None:
        """:meth:`write` each buffer of ``data`` (as ``asyncio.StreamWriter.writelines``)."""
        for item in data:
            self.write(item)

    def can_write_eof(self) -> bool:
        """Always True: a QUIC stream can send FIN and keep reading."""
        return True

    async def send(self, data: bytes | bytearray | memoryview) -> None:
        """Write ``data`` and drain (the one-call form). Raises as :meth:`write`."""
        if self._write_done or self._closing:
            raise UsageError(f"stream {self._lsid} is closed for writing")
        if self._buffer:
            await self.drain()
        await self._write(data)

    async def _write(self, data: bytes | bytearray | memoryview) -> None:
        """One transport write. Cancelled half-way, it may have sent a prefix: the peer
        must not take the rest for complete data, so the sending direction is reset."""
        try:
            await self._send.write(data)
        except asyncio.CancelledError:
            self._abort_write()
            raise

    async def write_eof(self) -> None:
        """Send buffered data, then FIN: the peer reads EOF. Reading stays possible."""
        if self._write_done:
            return
        await self.drain()
        await self._send.finish()
        self._write_done = True
        self._maybe_release()

    # ------------------------------------------------------------------ closing

    def _abort_write(self) -> None:
        self._buffer.clear()
        if not self._write_done:
            self._send.reset(_RESET)
            self._write_done = True
            self._maybe_release()

    def reset(self, code: int = CloseCode.RESET) -> None:
        """Abort both directions: RESET_STREAM and STOP_SENDING with ``code``. Never raises."""
        self._buffer.clear()
        self._closing = True
        if not self._write_done:
            self._send.reset(int(code))
            self._write_done = True
        if not self._read_done:
            self._recv.stop(int(code))
            self._read_done = True
        self._maybe_release()

    async def aclose(self) -> None:
        """Gracefully close: send buffered data and FIN, stop reading if EOF not seen.

        Transport errors (peer reset, connection gone) are swallowed: the stream ends
        either way.
        """
        self._closing = True
        try:
            if not self._write_done:
                if self._buffer:
                    await self.drain()
                await self._send.finish()
                self._write_done = True
        except QuicReverseError as exc:
            logger.debug("stream %d: close: %s", self._lsid, exc)
            self._send.reset(_RESET)
            self._write_done = True
        finally:
            if not self._write_done:  # cancelled mid-close
                self._send.reset(_RESET)
                self._write_done = True
            if not self._read_done:
                self._recv.stop(_NORMAL)
                self._read_done = True
            self._maybe_release()

    def close(self) -> None:
        """Start a graceful close in the background; :meth:`wait_closed` waits for it."""
        if self._close_task is None and not self._released:
            self._closing = True
            self._close_task = asyncio.get_running_loop().create_task(self.aclose())

    async def wait_closed(self) -> None:
        """Wait until a :meth:`close` started earlier has finished."""
        if self._close_task is not None:
            await asyncio.shield(self._close_task)

    async def __aenter__(self) -> Stream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is not None:
            self.reset(CloseCode.ERROR)
        else:
            await self.aclose()

    # ------------------------------------------------------------------ internals

    def _read_finished(self) -> None:
        self._read_done = True
        self._maybe_release()

    def _maybe_release(self) -> None:
        if self._released or not (self._read_done and self._write_done):
            return
        self._released = True
        if self._on_release is not None:
            callback, self._on_release = self._on_release, None
            callback(self)

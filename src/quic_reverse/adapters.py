"""Hand a reverse stream to code written for asyncio transports and streams.

A :class:`~quic_reverse.Stream` already reads and writes like an asyncio stream; these
adapters are for code that insists on the real types:

* :func:`stream_pair` returns a genuine :class:`asyncio.StreamReader` /
  :class:`asyncio.StreamWriter` pair over the stream (what ``asyncio.open_connection``
  returns for a socket);
* :func:`serve_protocol` runs an :class:`asyncio.Protocol` made by a protocol factory
  over the stream until the protocol's connection is lost: an existing asyncio server
  (an HTTP or SSH server library, anything you would pass to ``loop.create_server``)
  serves reverse streams unchanged::

      runner = aiohttp.web.AppRunner(app)
      await runner.setup()
      handler = functools.partial(serve_protocol, protocol_factory=runner.server)
      await handle.serve({"http": handler})

* :func:`attach_protocol` is the building block of both (what
  ``loop.connect_accepted_socket`` is for a socket): it returns the
  :class:`StreamTransport` and the protocol, for a client library that wants to drive
  its own protocol over a stream (see ``tests/api/test_adapters.py`` for an aiohttp
  client connector).

The transport follows asyncio's rules: ``connection_made`` first; ``data_received`` per
chunk (``get_buffer``/``buffer_updated`` for a :class:`asyncio.BufferedProtocol`);
``eof_received`` at the peer's FIN (return True to keep writing, as over TCP);
``pause_writing``/``resume_writing`` around the write buffer's high and low water
marks (the stream's own QUIC flow control is behind it); ``pause_reading`` stops
reading from the stream (so QUIC flow control pushes back on the peer);
``close()`` flushes, sends FIN and then ``connection_lost(None)``; ``abort()`` resets
the stream; a peer reset or a lost connection is ``connection_lost(exc)`` with the
:mod:`quic_reverse.errors` exception (a :class:`ConnectionResetError` /
:class:`ConnectionError`). ``get_extra_info`` answers from
:meth:`Stream.get_extra_info <quic_reverse.Stream.get_extra_info>` (``peername``,
``service``, ``metadata``, ``logical_stream_id``, ``quic_stream_id``); ``socket`` and
``sslcontext`` are ``None`` (the stream is not a socket and TLS is QUIC's own).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from .errors import QuicReverseError
from .stream import DEFAULT_LIMIT, Stream
from .wire import CloseCode

__all__ = ["StreamTransport", "attach_protocol", "serve_protocol", "stream_pair"]

logger = logging.getLogger("quic_reverse.adapters")

P = TypeVar("P", bound=asyncio.BaseProtocol)

_CHUNK = 65536
#: Default write-buffer water marks (asyncio's socket transports use the same).
_HIGH_WATER = 64 * 1024


class StreamTransport(asyncio.Transport):
    """An :class:`asyncio.Transport` over one reverse :class:`~quic_reverse.Stream`.

    Made by :func:`attach_protocol`; see the module docstring for its behaviour.
    """

    def __init__(self, stream: Stream, protocol: asyncio.BaseProtocol) -> None:
        super().__init__()
        self._stream = stream
        self._protocol = protocol
        self._loop = asyncio.get_running_loop()
        self._buffer = bytearray()
        self._in_flight = 0  # bytes handed to stream.send() that it has not returned for
        self._high = _HIGH_WATER
        self._low = _HIGH_WATER // 4
        self._protocol_paused = False
        self._eof_asked = False  # write_eof() called
        self._eof_sent = False
        self._closing = False  # close() or abort() called, or the stream failed
        self._lost = False  # connection_lost() scheduled
        self._reading = asyncio.Event()
        self._reading.set()
        self._wake_writer = asyncio.Event()
        self._done: asyncio.Future[None] = self._loop.create_future()
        self._reader: asyncio.Task[None] | None = None
        self._writer: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"<StreamTransport {self._stream!r}{' closing' if self._closing else ''}>"

    def _start(self) -> None:
        self._protocol.connection_made(self)
        if self._lost:  # the protocol closed or aborted us in connection_made
            return
        name = f"quic-reverse stream {self._stream.logical_stream_id}"
        self._reader = self._loop.create_task(self._read_loop(), name=name + " reader")
        self._writer = self._loop.create_task(self._write_loop(), name=name + " writer")

    # ------------------------------------------------------------ BaseTransport

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._stream.get_extra_info(name, default)

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        """Stop reading, send what is buffered and FIN, then ``connection_lost(None)``."""
        if self._closing:
            return
        self._closing = True
        self._cancel(self._reader)
        self._wake_writer.set()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol

    # ------------------------------------------------------------ ReadTransport

    def is_reading(self) -> bool:
        return self._reading.is_set() and not self._closing

    def pause_reading(self) -> None:
        self._reading.clear()

    def resume_reading(self) -> None:
        self._reading.set()

    # ------------------------------------------------------------ WriteTransport

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._eof_asked:
            raise RuntimeError("cannot call write() after write_eof()")
        if not data:
            return
        if self._closing:
            # As asyncio's socket transports: writes after close are dropped.
            logger.debug("%r: write after close ignored", self)
            return
        self._buffer += data
        self._wake_writer.set()
        self._maybe_pause_protocol()

    def writelines(self, list_of_data: Iterable[bytes | bytearray | memoryview]) -> None:
        for data in list_of_data:
            self.write(data)

    def write_eof(self) -> None:
        """Send FIN after the buffered data; reading goes on."""
        if self._eof_asked or self._closing:
            return
        self._eof_asked = True
        self._wake_writer.set()

    def can_write_eof(self) -> bool:
        return True

    def get_write_buffer_size(self) -> int:
        return len(self._buffer) + self._in_flight

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return (self._low, self._high)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if high is None:
            high = _HIGH_WATER if low is None else 4 * low
        if low is None:
            low = high // 4
        if not high >= low >= 0:
            raise ValueError(f"high ({high!r}) must be >= low ({low!r}) must be >= 0")
        self._high, self._low = high, low
        self._maybe_pause_protocol()

    def abort(self) -> None:
        """Reset the stream (both directions) and call ``connection_lost(None)``."""
        self._fail(None)

    # ------------------------------------------------------------ waiting

    async def wait_closed(self) -> None:
        """Wait until ``connection_lost`` has been called (never raises)."""
        await asyncio.shield(self._done)

    # ------------------------------------------------------------ internals

    def _maybe_pause_protocol(self) -> None:
        if not self._protocol_paused and self.get_write_buffer_size() > self._high:
            self._protocol_paused = True
            self._call_protocol("pause_writing")

    def _maybe_resume_protocol(self) -> None:
        if self._protocol_paused and self.get_write_buffer_size() <= self._low:
            self._protocol_paused = False
            self._call_protocol("resume_writing")

    def _call_protocol(self, name: str) -> None:
        try:
            getattr(self._protocol, name)()
        except Exception:
            logger.exception("%r: protocol.%s() failed", self, name)

    def _deliver(self, data: bytes) -> None:
        protocol = self._protocol
        if isinstance(protocol, asyncio.BufferedProtocol):
            view = memoryview(data)
            while view:
                buf = memoryview(protocol.get_buffer(len(view))).cast("B")
                if not buf:
                    raise RuntimeError("get_buffer() returned an empty buffer")
                n = min(len(buf), len(view))
                buf[:n] = view[:n]
                protocol.buffer_updated(n)
                view = view[n:]
        else:
            protocol.data_received(data)  # type: ignore[attr-defined]

    async def _read_loop(self) -> None:
        stream = self._stream
        try:
            while not self._closing:
                if not self._reading.is_set():
                    await self._reading.wait()
                    continue
                data = await stream.read(_CHUNK)
                if self._closing:
                    return
                if not data:
                    keep_open = self._protocol.eof_received()  # type: ignore[attr-defined]
                    if not keep_open:
                        self.close()
                    return
                self._deliver(data)
        except QuicReverseError as exc:
            logger.debug("%r: read: %s", self, exc)
            self._fail(exc)
        except Exception as exc:  # a protocol method failed: as asyncio, abort
            logger.exception("%r: protocol failed while receiving", self)
            self._fail(exc)

    async def _write_loop(self) -> None:
        stream = self._stream
        try:
            while True:
                if self._buffer:
                    data = bytes(self._buffer)
                    self._buffer.clear()
                    self._in_flight = len(data)
                    await stream.send(data)
                    self._in_flight = 0
                    self._maybe_resume_protocol()
                    continue
                if self._closing:
                    await stream.aclose()  # FIN (if not sent) and stop reading
                    self._connection_lost(None)
                    return
                if self._eof_asked and not self._eof_sent:
                    self._eof_sent = True
                    await stream.write_eof()
                    continue
                self._wake_writer.clear()
                await self._wake_writer.wait()
        except QuicReverseError as exc:
            logger.debug("%r: write: %s", self, exc)
            self._fail(exc)

    def _fail(self, exc: Exception | None) -> None:
        """Abort: reset the stream, stop both loops, report ``connection_lost(exc)``."""
        if self._lost:
            return
        self._closing = True
        self._buffer.clear()
        self._in_flight = 0
        self._stream.reset(CloseCode.RESET if exc is None else CloseCode.ERROR)
        self._cancel(self._reader)
        self._cancel(self._writer)
        self._connection_lost(exc)

    def _cancel(self, task: asyncio.Task[None] | None) -> None:
        if task is not None and task is not asyncio.current_task():
            task.cancel()

    def _connection_lost(self, exc: Exception | None) -> None:
        if self._lost:
            return
        self._lost = True
        self._closing = True
        self._loop.call_soon(self._call_connection_lost, exc)

    def _call_connection_lost(self, exc: Exception | None) -> None:
        try:
            self._protocol.connection_lost(exc)
        except Exception:
            logger.exception("%r: protocol.connection_lost() failed", self)
        finally:
            if not self._done.done():
                self._done.set_result(None)


def attach_protocol(stream: Stream, protocol_factory: Callable[[], P]) -> tuple[StreamTransport, P]:
    """Run ``protocol_factory()`` over ``stream``: its ``connection_made`` is called
    before this returns, then data flows (see the module docstring).

    Like ``loop.connect_accepted_socket`` for a socket. Must be called from a running
    event loop.
    """
    protocol = protocol_factory()
    transport = StreamTransport(stream, protocol)
    transport._start()
    return transport, protocol


async def serve_protocol(
    stream: Stream, protocol_factory: Callable[[], asyncio.BaseProtocol]
) -> None:
    """Serve ``stream`` with a protocol from ``protocol_factory`` (what you would pass to
    ``loop.create_server``) and return once its connection is lost.

    Fits :meth:`SessionHandle.serve <quic_reverse.SessionHandle.serve>` as a handler
    through ``functools.partial(serve_protocol, protocol_factory=factory)``. Cancelled,
    it aborts the transport (the stream is reset) and re-raises.
    """
    transport, _ = attach_protocol(stream, protocol_factory)
    try:
        await transport.wait_closed()
    except asyncio.CancelledError:
        transport.abort()
        raise


async def stream_pair(
    stream: Stream, *, limit: int = DEFAULT_LIMIT
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A real :class:`asyncio.StreamReader`/:class:`asyncio.StreamWriter` pair over
    ``stream``, as ``asyncio.open_connection`` returns for a socket.

    ``writer.close()`` + ``await writer.wait_closed()`` ends the stream gracefully (FIN
    after the buffered data); ``writer.write_eof()`` half-closes it;
    ``writer.transport.abort()`` resets it. ``limit`` is the reader's buffer limit.
    """
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=limit, loop=loop)
    protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
    transport, _ = attach_protocol(stream, lambda: protocol)
    writer = asyncio.StreamWriter(transport, protocol, reader, loop)
    return reader, writer

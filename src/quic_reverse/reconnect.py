"""A client session that comes back: :func:`reconnecting`.

::

    async with reconnecting("relay.example", 4433, tls=ClientTLS(cafile="ca.pem")) as sessions:
        async for handle in sessions:          # a new, negotiated session each time
            await handle.ping()                # ... use it; when the body ends,
                                               # the session is closed, then redialled
    # or, the common case, serve handlers on every session until sessions.stop():
    async with reconnecting(host, port, tls=tls) as sessions:
        await sessions.serve({"echo": echo})

Each iteration dials, negotiates (``Role.CLIENT``) and yields the
:class:`~quic_reverse.SessionHandle`. When the loop body finishes (the session ended,
or the body returned early), the helper closes that session and waits before dialling
again, with the same capped exponential backoff and full jitter as the tunnel's edge
(:class:`quic_reverse.tunnel.supervisor.Backoff`): the delay is drawn from ``[0,
min(backoff_cap, backoff_initial * 2**failures)]``, and the count of failures starts
over once a session was negotiated. Failures to connect or negotiate are logged
(WARNING) and retried; a :class:`~quic_reverse.errors.CertificateError` or
:class:`~quic_reverse.errors.ConfigError` is raised at once (retrying cannot fix it),
and so is the last error after ``max_attempts`` consecutive failures.

Use it as ``async with`` so that a session in use is closed when the block is left by
an exception; a bare ``async for`` works too, but then close the handle yourself when
the body raises (``async with handle:`` inside the loop does it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping
from types import TracebackType

from .config import Config, Role
from .errors import CertificateError, ConfigError, QuicReverseError, UsageError
from .session import Handler, Session, SessionHandle
from .transport.base import Connection
from .transport.quic import ClientTLS, Stack, TransportOptions, connect
from .tunnel.supervisor import Backoff

__all__ = ["Reconnecting", "reconnecting"]

logger = logging.getLogger("quic_reverse.reconnect")

#: What a dialler returns: a connected transport connection.
Dialer = Callable[[], Awaitable[Connection]]


class Reconnecting:
    """The sessions of :func:`reconnecting`: an async iterator of
    :class:`~quic_reverse.SessionHandle` and an async context manager.

    ``attempts`` counts dials so far, ``sessions`` negotiated sessions, ``last_error``
    the most recent failure (``None`` if none).
    """

    def __init__(
        self,
        dial: Dialer,
        *,
        config: Config | None = None,
        backoff: Backoff | None = None,
        max_attempts: int | None = None,
    ) -> None:
        if max_attempts is not None and (isinstance(max_attempts, bool) or max_attempts < 1):
            raise ConfigError(f"max_attempts must be None or >= 1, got {max_attempts!r}")
        self._dial = dial
        self._config = config if config is not None else Config()
        self._backoff = backoff if backoff is not None else Backoff()
        self._max_attempts = max_attempts
        self._stop = asyncio.Event()
        self._current: SessionHandle | None = None
        self._failures = 0
        self._first = True
        self.attempts = 0
        self.sessions = 0
        self.last_error: BaseException | None = None

    @property
    def current(self) -> SessionHandle | None:
        """The session the loop body holds now, if any."""
        return self._current

    def stop(self) -> None:
        """End the iteration: a wait or dial in progress is abandoned, the current
        session is closed by the next ``__anext__`` (or the ``async with`` exit)."""
        self._stop.set()

    # ------------------------------------------------------------ iteration

    def __aiter__(self) -> Reconnecting:
        return self

    async def __anext__(self) -> SessionHandle:
        await self._close_current()
        while not self._stop.is_set():
            if not self._first:
                delay = self._backoff.next_delay()
                logger.info("reconnecting in %.2fs", delay)
                if await self._sleep(delay):
                    break
            self._first = False
            handle = await self._unless_stopped(self._attempt())
            if handle is not None:
                self._current = handle
                return handle
        raise StopAsyncIteration

    async def _attempt(self) -> SessionHandle | None:
        """One dial + negotiation; ``None`` after a failure worth retrying."""
        self.attempts += 1
        try:
            conn = await self._dial()
        except (CertificateError, ConfigError):
            raise
        except (QuicReverseError, OSError) as exc:
            self._failed(exc, "connect")
            return None
        try:
            handle = await Session(conn, Role.CLIENT, self._config).start()
        except BaseException as exc:
            conn.close(1, b"negotiation failed")
            if not isinstance(exc, QuicReverseError | OSError):
                raise
            self._failed(exc, "negotiate")
            return None
        self._failures = 0
        self._backoff.reset()
        self.sessions += 1
        return handle

    def _failed(self, exc: BaseException, step: str) -> None:
        self.last_error = exc
        self._failures += 1
        logger.warning("%s failed (attempt %d): %s", step, self.attempts, exc)
        if self._max_attempts is not None and self._failures >= self._max_attempts:
            raise exc

    async def _sleep(self, delay: float) -> bool:
        """Sleep ``delay`` or until stopped; True if stopped."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await self._stop.wait()
        return self._stop.is_set()

    async def _unless_stopped(self, coro: Awaitable[SessionHandle | None]) -> SessionHandle | None:
        task = asyncio.ensure_future(coro)
        stopped = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
            if not task.done():
                task.cancel()
            await asyncio.gather(stopped, task, return_exceptions=True)
        if task.cancelled():
            return None
        handle = task.result()
        if handle is not None and self._stop.is_set():
            await handle.close()
            return None
        return handle

    async def _close_current(self) -> None:
        handle, self._current = self._current, None
        if handle is not None:
            await handle.close()

    # ------------------------------------------------------------ context manager

    async def __aenter__(self) -> Reconnecting:
        if self.attempts:
            raise UsageError("reconnecting(): enter it before iterating, once")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
        await self._close_current()

    async def serve(self, handlers: Mapping[str, Handler]) -> None:
        """Serve ``handlers`` on every session, reconnecting after each, until
        :meth:`stop` (the usual body, written once): a session that dies of an error
        is logged (WARNING), not raised.

        Raises:
            CertificateError, ConfigError: as the iteration does.
            QuicReverseError: the last failure once ``max_attempts`` ran out.
        """
        async for handle in self:
            try:
                await handle.serve(handlers)
            except QuicReverseError as exc:
                logger.warning("session ended: %s", exc)

    async def aclose(self) -> None:
        """Stop and close the current session (what the ``async with`` exit does)."""
        await self.__aexit__(None, None, None)


def reconnecting(
    host: str | None = None,
    port: int | None = None,
    *,
    tls: ClientTLS | None = None,
    config: Config | None = None,
    stack: Stack = "qh3",
    options: TransportOptions | None = None,
    backoff_initial: float = 0.5,
    backoff_cap: float = 10.0,
    max_attempts: int | None = None,
    dial: Dialer | None = None,
) -> Reconnecting:
    """Client sessions to ``host:port`` that reconnect (see the module docstring).

    ``tls``, ``stack`` and ``options`` are those of
    :func:`~quic_reverse.transport.quic.connect`; ``config`` is the
    :class:`~quic_reverse.Config` of every session. ``backoff_initial``/``backoff_cap``
    are the edge's ``--backoff-initial``/``--backoff-cap``. ``max_attempts``: raise the
    last error after that many failures in a row (default: retry for ever). ``dial``
    replaces host/port/tls with your own ``async () -> Connection`` (another transport,
    a custom handshake).

    Raises:
        ConfigError: neither ``dial`` nor host, port and tls; invalid backoff.
    """
    if dial is None:
        if host is None or port is None or tls is None:
            raise ConfigError("reconnecting(): give host, port and tls= (or dial=)")
        address, client_tls = (host, port), tls

        async def dial_quic() -> Connection:
            return await connect(*address, tls=client_tls, stack=stack, options=options)

        dial = dial_quic
    try:
        backoff = Backoff(backoff_initial, backoff_cap)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return Reconnecting(dial, config=config, backoff=backoff, max_attempts=max_attempts)

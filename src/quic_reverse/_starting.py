"""The object :func:`~quic_reverse.transport.quic.connect`,
:func:`~quic_reverse.transport.quic.serve` and :meth:`~quic_reverse.Session.start` return:
awaitable (the form that always worked) **and** an async context manager, so both

::

    connection = await connect(...)          # you close it
    async with connect(...) as connection:   # closed on exit

work, like ``websockets.connect`` and ``aioquic.asyncio.connect``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Coroutine, Generator
from types import TracebackType
from typing import Any, Generic, TypeVar

from .errors import UsageError

__all__ = ["AwaitableContext"]

T = TypeVar("T")

#: How the value is cleaned up when the ``async with`` block ends.
Exit = Callable[
    [T, type[BaseException] | None, BaseException | None, TracebackType | None], Awaitable[None]
]


class AwaitableContext(Coroutine[Any, Any, T], Generic[T]):
    """An operation that yields a resource: ``await`` it for the resource, or use it as
    ``async with op as resource`` to have the resource closed when the block ends.

    It is a :class:`~collections.abc.Coroutine` too (it forwards to the one it wraps), so
    ``asyncio.create_task(op)``, ``asyncio.wait_for(op, ...)`` and ``asyncio.gather(op)``
    keep working. Use it once: either await it or enter it.
    """

    __slots__ = ("_coro", "_exit", "_used", "_value")

    def __init__(self, coro: Coroutine[Any, Any, T], exit: Exit[T]) -> None:
        self._coro = coro
        self._exit = exit
        self._value: T | None = None
        self._used = False

    def __repr__(self) -> str:
        return f"<AwaitableContext {self._coro!r}>"

    def _take(self) -> Coroutine[Any, Any, T]:
        if self._used:
            raise UsageError("this operation was already awaited or entered; call again")
        self._used = True
        return self._coro

    # ------------------------------------------------------------ awaitable / coroutine

    def __await__(self) -> Generator[Any, None, T]:
        return self._take().__await__()

    def send(self, value: Any) -> Any:
        self._used = True  # driven as a coroutine (create_task, gather...)
        return self._coro.send(value)

    def throw(self, typ: Any, val: Any = None, tb: Any = None) -> Any:
        if val is None and tb is None:
            return self._coro.throw(typ)
        return self._coro.throw(typ, val, tb)

    def close(self) -> None:
        self._coro.close()

    # ------------------------------------------------------------ async context manager

    async def __aenter__(self) -> T:
        value = await self._take()
        self._value = value
        return value

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        value, self._value = self._value, None
        if value is not None:
            await self._exit(value, exc_type, exc, tb)


async def exit_context(
    value: Any,
    exc_type: type[BaseException] | None,
    exc: BaseException | None,
    tb: TracebackType | None,
) -> None:
    """The :data:`Exit` of a value that is itself an async context manager."""
    await value.__aexit__(exc_type, exc, tb)

"""The relay's registry of authenticated edges: one :class:`Pool` of replicas per name.

An edge *instance* is one edge process (it draws a random instance id at start and
sends it with every authentication, :mod:`.auth`). The registry keeps, per edge name,
the live sessions of every instance with that name:

* a reconnect of the **same instance** (crash the relay has not noticed yet, NAT
  rebinding) replaces that instance's old session, which is then retired;
* a **different instance** with the same name joins the pool as a replica: nothing
  is replaced, so two live processes never flap and never drop each other's clients.

New TCP clients go to the live replica with the fewest active streams (ties: the one
that was given the fewest so far, so sequential clients alternate). Each replica
carries at most ``max_streams`` streams; clients beyond that wait (at most
``max_queued`` of them per name, each until its deadline) for one to finish. The relay
retries an open that failed on one replica on another (:meth:`Pool.acquire` with the
replicas already tried excluded).

This is the shape issue 12 (HA) builds on: per-forward balancing policies plug into
:meth:`Pool.pick`, and bridging a gap with no live replica is a wait in
:meth:`Pool.acquire` (today it fails at once).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

from ..session import SessionHandle
from ..transport.base import Connection

__all__ = ["EdgeRegistry", "Pool", "Replica", "Unavailable"]

log = logging.getLogger("quic_reverse.tunnel.relay")


@dataclass(eq=False)
class Replica:
    """One authenticated edge session: its handle and the TCP forwards using it."""

    name: str
    handle: SessionHandle
    connection: Connection
    address: str
    #: The instance id the edge sent (``None``: an older edge, an instance of its own).
    instance: str | None = None
    forwards: set[asyncio.Task[None]] = field(default_factory=set)
    #: Replaced by a reconnect of its instance, or the relay is stopping.
    retired: bool = False
    #: Streams opened or being opened on this replica now.
    active: int = 0
    #: Streams ever given to this replica (tie-breaker: spreads sequential clients).
    assigned: int = 0

    @property
    def live(self) -> bool:
        return not self.retired and not self.handle.is_closed

    def describe(self) -> str:
        return f"{self.address}" + (f" instance {self.instance}" if self.instance else "")


class Unavailable(Exception):
    """No replica can take a new stream (the message says why)."""


class Pool:
    """The replicas of one edge name, and the TCP clients waiting for a free stream."""

    def __init__(self, name: str, *, max_streams: int, max_queued: int) -> None:
        self.name = name
        self.max_streams = max_streams
        self.max_queued = max_queued
        self.replicas: list[Replica] = []
        self.waiting = 0
        self._changed = asyncio.Event()

    async def wait_changed(self) -> None:
        """Wait until a replica joins, leaves or releases a stream."""
        await self._changed.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def live(self, exclude: set[Replica] | frozenset[Replica] = frozenset()) -> list[Replica]:
        return [r for r in self.replicas if r.live and r not in exclude]

    def pick(self, exclude: set[Replica] | frozenset[Replica] = frozenset()) -> Replica | None:
        """The live replica with a free stream and the fewest active streams."""
        best: Replica | None = None
        for r in self.live(exclude):
            if r.active >= self.max_streams:
                continue
            if best is None or (r.active, r.assigned) < (best.active, best.assigned):
                best = r
        return best

    async def acquire(self, exclude: set[Replica], deadline: float) -> Replica:
        """Reserve a stream on the best replica not in ``exclude``; wait (until the
        loop time ``deadline``) while every candidate is at ``max_streams``.

        Raises:
            Unavailable: no live replica left to try, too many clients waiting, or the
                deadline passed.
        """
        while True:
            replica = self.pick(exclude)
            if replica is not None:
                replica.active += 1
                replica.assigned += 1
                return replica
            if not self.live(exclude):
                raise Unavailable(
                    f"edge {self.name!r} is not connected"
                    if not exclude
                    else f"no other replica of edge {self.name!r} to try"
                )
            if self.waiting >= self.max_queued:
                raise Unavailable(
                    f"edge {self.name!r}: all {self.max_streams} streams of every replica in "
                    f"use and {self.waiting} clients already waiting (max_queued_opens)"
                )
            self.waiting += 1
            changed = self._changed
            try:
                async with asyncio.timeout_at(deadline):
                    await changed.wait()
            except TimeoutError:
                raise Unavailable(
                    f"edge {self.name!r}: no stream became free in time (open_timeout)"
                ) from None
            finally:
                self.waiting -= 1

    def release(self, replica: Replica) -> None:
        """Give back a stream reserved with :meth:`acquire`."""
        replica.active -= 1
        self._notify()

    def add(self, replica: Replica) -> Replica | None:
        """Add an authenticated session; returns the session it replaces (the same
        instance's previous one), which the caller retires."""
        old = None
        if replica.instance is not None:
            old = next((r for r in self.replicas if r.instance == replica.instance), None)
        if old is not None:
            self.replicas[self.replicas.index(old)] = replica
            old.retired = True
        else:
            self.replicas.append(replica)
        self._notify()
        return old

    def remove(self, replica: Replica) -> None:
        if replica in self.replicas:
            self.replicas.remove(replica)
        self._notify()


class EdgeRegistry:
    """Edge name -> :class:`Pool`."""

    def __init__(self, *, max_streams: int, max_queued: int) -> None:
        self.max_streams = max_streams
        self.max_queued = max_queued
        self._pools: dict[str, Pool] = {}

    def pool(self, name: str) -> Pool:
        pool = self._pools.get(name)
        if pool is None:
            pool = self._pools[name] = Pool(
                name, max_streams=self.max_streams, max_queued=self.max_queued
            )
        return pool

    def add(self, replica: Replica) -> Replica | None:
        return self.pool(replica.name).add(replica)

    def remove(self, replica: Replica) -> None:
        pool = self._pools.get(replica.name)
        if pool is not None:
            pool.remove(replica)
            if not pool.replicas and not pool.waiting:
                del self._pools[replica.name]

    def __iter__(self) -> Iterator[Replica]:
        for pool in list(self._pools.values()):
            yield from list(pool.replicas)

    def clear(self) -> list[Replica]:
        """Forget every replica (relay stopping); returns them."""
        replicas = list(self)
        for r in replicas:
            r.retired = True
        for pool in self._pools.values():
            pool.replicas.clear()
            pool._notify()
        return replicas

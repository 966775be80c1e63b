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

High availability (issue 12):

* **Balancing** per forward (:meth:`Pool.pick`): ``least-streams`` (above) or
  ``sticky``: the client IP is hashed with each live replica's identity (rendezvous
  hashing), so one client keeps its replica and only the clients of a replica that
  leaves move.
* **Bridging**: a client arriving while its name has no live replica waits (until its
  deadline) for one to (re)connect, if that name has been seen since the relay
  started, or while the relay is in its *startup grace* (its edges reconnecting after
  a relay restart have not all come back yet); otherwise a name that never connected
  fails at once.
* **Suspects**: a replica that left an open unanswered is *suspect* while the relay
  checks it (:mod:`.relay`); new clients go to the other replicas meanwhile.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable, Iterator
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
    #: An open went unanswered and the relay is checking whether the edge is alive.
    suspect: bool = False
    #: The running liveness check (at most one per replica).
    check: asyncio.Task[bool] | None = None
    #: The edge said it is stopping (``SERVICE_UNAVAILABLE`` "stopping"): no new streams.
    draining: bool = False

    @property
    def live(self) -> bool:
        return not self.retired and not self.draining and not self.handle.is_closed

    def describe(self) -> str:
        return f"{self.address}" + (f" instance {self.instance}" if self.instance else "")

    def weight(self, key: str) -> int:
        """Rendezvous-hash weight of this replica for the client ``key`` (sticky)."""
        ident = self.instance or self.address
        digest = hashlib.blake2b(f"{key}|{ident}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big")


class Unavailable(Exception):
    """No replica can take a new stream (the message says why)."""


class Pool:
    """The replicas of one edge name, and the TCP clients waiting for a free stream."""

    def __init__(
        self,
        name: str,
        *,
        max_streams: int,
        max_queued: int,
        seen: bool = False,
        grace_until: float = 0.0,
    ) -> None:
        self.name = name
        self.max_streams = max_streams
        self.max_queued = max_queued
        self.replicas: list[Replica] = []
        self.waiting = 0
        #: A replica of this name has authenticated since the relay started: clients
        #: arriving while none is live wait for one (bridging) instead of failing.
        self.seen = seen
        #: Loop time until which a name not seen yet is bridged as if it had been (the
        #: relay's startup grace: :attr:`EdgeRegistry.grace_until`).
        self.grace_until = grace_until
        self._changed = asyncio.Event()

    async def wait_changed(self) -> None:
        """Wait until a replica joins, leaves or releases a stream."""
        await self._changed.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def live(self, exclude: set[Replica] | frozenset[Replica] = frozenset()) -> list[Replica]:
        return [r for r in self.replicas if r.live and r not in exclude]

    def pick(
        self,
        exclude: set[Replica] | frozenset[Replica] = frozenset(),
        *,
        balance: str = "least-streams",
        client: str | None = None,
    ) -> Replica | None:
        """The live replica with a free stream that ``balance`` prefers: the fewest
        active streams (``least-streams``), or the highest rendezvous weight for the
        ``client`` key (``sticky``). Suspect replicas are used only when no other
        replica can take the stream."""
        free = [r for r in self.live(exclude) if r.active < self.max_streams]
        healthy = [r for r in free if not r.suspect] or free
        if not healthy:
            return None
        if balance == "sticky" and client is not None:
            return max(healthy, key=lambda r: r.weight(client))
        return min(healthy, key=lambda r: (r.active, r.assigned))

    async def acquire(
        self,
        exclude: set[Replica],
        deadline: float,
        *,
        balance: str = "least-streams",
        client: str | None = None,
    ) -> Replica:
        """Reserve a stream on the best replica not in ``exclude`` (:meth:`pick`); wait
        (until the loop time ``deadline``) while every candidate is at ``max_streams``,
        or while there is none but the name has been seen (a replica may reconnect).

        Raises:
            Unavailable: the name never connected, too many clients waiting, or the
                deadline passed.
        """
        while True:
            replica = self.pick(exclude, balance=balance, client=client)
            if replica is not None:
                replica.active += 1
                replica.assigned += 1
                return replica
            live = self.live(exclude)
            if not live and self.live():
                raise Unavailable(f"no other replica of edge {self.name!r} to try")
            if not live and not self.seen and asyncio.get_running_loop().time() >= self.grace_until:
                raise Unavailable(f"edge {self.name!r} has never connected")
            if self.waiting >= self.max_queued:
                raise Unavailable(
                    f"edge {self.name!r}: all {self.max_streams} streams of every replica in "
                    f"use and {self.waiting} clients already waiting (max_queued_opens)"
                    if live
                    else f"edge {self.name!r}: no live replica and {self.waiting} clients "
                    "already waiting for one (max_queued_opens)"
                )
            self.waiting += 1
            changed = self._changed
            try:
                async with asyncio.timeout_at(deadline):
                    await changed.wait()
            except TimeoutError:
                raise Unavailable(
                    f"edge {self.name!r}: no stream became free in time (open_timeout)"
                    if live
                    else f"edge {self.name!r}: no replica (re)connected in time (open_timeout)"
                    if self.seen
                    else f"edge {self.name!r}: did not connect in time since the relay "
                    "started (open_timeout, startup_grace)"
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
        self.seen = True
        self._notify()
        return old

    def remove(self, replica: Replica) -> None:
        if replica in self.replicas:
            self.replicas.remove(replica)
        self._notify()

    def suspected(self, replica: Replica, suspect: bool) -> None:
        """Mark ``replica`` suspect (new clients avoid it) or clear the mark."""
        replica.suspect = suspect
        self._notify()


class EdgeRegistry:
    """Edge name -> :class:`Pool`."""

    def __init__(self, *, max_streams: int, max_queued: int) -> None:
        self.max_streams = max_streams
        self.max_queued = max_queued
        #: Pools are kept when they empty: clients waiting in one (bridging) must see
        #: the replica that joins next. Names are bounded by the tokens file.
        self._pools: dict[str, Pool] = {}
        #: Loop time until which every name is bridged as if seen (set by the relay at
        #: start: ``startup_grace``). After a relay restart its edges take a keep-alive
        #: interval to notice and reconnect; clients arriving meanwhile wait for them
        #: (each at most its deadline) instead of being closed at once.
        self.grace_until = 0.0
        #: Called with an edge name after a replica of it was added or removed (the
        #: fleet publishes the relay's edges: tunnel/fleet.py).
        self.listeners: list[Callable[[str], None]] = []

    def pool(self, name: str) -> Pool:
        pool = self._pools.get(name)
        if pool is None:
            pool = self._pools[name] = Pool(
                name,
                max_streams=self.max_streams,
                max_queued=self.max_queued,
                grace_until=self.grace_until,
            )
        return pool

    def add(self, replica: Replica) -> Replica | None:
        old = self.pool(replica.name).add(replica)
        self._changed(replica.name)
        return old

    def remove(self, replica: Replica) -> None:
        pool = self._pools.get(replica.name)
        if pool is not None:
            pool.remove(replica)
            self._changed(replica.name)

    def _changed(self, name: str) -> None:
        for listener in self.listeners:
            listener(name)

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

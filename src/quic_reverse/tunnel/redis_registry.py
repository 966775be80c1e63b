"""The fleet's shared registry on Redis: which relay holds which edge.

Keys (``quic-reverse:`` prefix; one Redis database per fleet):

* ``relay:<relay id>`` -> ``{"advertise": "HOST:PORT"}``, with a TTL of ``registry_ttl``
  refreshed every ``registry_heartbeat``: the relay's liveness.
* ``edge:<name>`` (a hash): field ``<relay id>`` -> ``{"advertise": "HOST:PORT",
  "instances": [...]}`` for every relay holding a session of edge ``<name>``; written
  when an edge joins or leaves that relay (not on every heartbeat).

A route (edge -> relay) is valid while its relay's liveness key exists, so a relay
that dies leaves no route behind longer than the TTL, and a heartbeat costs one
command per relay whatever the number of its edges. Readers delete the fields of
relays whose liveness key is gone (garbage of dead relays).

Outages: every command is bounded by ``socket_timeout``. The first failure is logged
once (warning); lookups then answer from the routes already known, each until its
relay's TTL as last read; the heartbeat keeps probing, and on success the relay
re-publishes everything (logged once, info). A heartbeat that finds its liveness key
gone (Redis restarted empty) re-publishes too.

The ``redis`` package (redis-py, the ``fleet`` extra) is imported only here, and this
module only when a relay is started with ``--registry``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError

__all__ = ["RedisRegistry", "Route"]

log = logging.getLogger("quic_reverse.tunnel.fleet")

PREFIX = "quic-reverse:"


@dataclass(frozen=True)
class Route:
    """Edge ``name`` is connected to relay ``relay`` (which peers dial at ``advertise``)."""

    name: str
    relay: str
    advertise: tuple[str, int]
    instances: tuple[str, ...]


def _hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


class RedisRegistry:
    """One relay's view of the shared registry (see the module docstring).

    ``start()``, then :meth:`publish` whenever the local edges of a name change and
    :meth:`lookup` to find the relays holding a name; ``close()`` removes this relay's
    entries (graceful stop).
    """

    def __init__(
        self,
        url: str,
        *,
        relay_id: str,
        advertise: tuple[str, int],
        ttl: float,
        heartbeat: float,
    ) -> None:
        try:
            import redis.asyncio as aioredis
            from redis.asyncio.retry import Retry
            from redis.backoff import NoBackoff
            from redis.exceptions import RedisError
        except ImportError:
            raise ConfigError(
                "--registry needs the redis package: pip install 'quic-reverse[fleet]'"
            ) from None
        self.url = url
        #: What an unreachable or failing Redis raises (an outage, never a crash).
        self._errors: tuple[type[BaseException], ...] = (RedisError, OSError, TimeoutError)
        self.relay_id = relay_id
        self.advertise = f"{advertise[0]}:{advertise[1]}"
        self.ttl = ttl
        self.heartbeat = heartbeat
        timeout = min(heartbeat, 1.0)
        try:
            self._redis: Any = aioredis.from_url(  # type: ignore[no-untyped-call]
                url,
                socket_timeout=timeout,
                socket_connect_timeout=timeout,
                retry=Retry(NoBackoff(), 0),
                decode_responses=True,
            )
        except ValueError as exc:
            raise ConfigError(f"--registry {url!r}: {exc}") from None
        #: name -> instance ids connected here (what this relay publishes).
        self._local: dict[str, tuple[str, ...]] = {}
        self._dirty: set[str] = set()
        self._wake = asyncio.Event()
        #: name -> routes as last read, each with the loop time its relay's TTL ends.
        self._known: dict[str, list[tuple[Route, float]]] = {}
        #: name -> loop time it was last read from Redis.
        self._read_at: dict[str, float] = {}
        self.up = True
        self._closed = False
        self._task: asyncio.Task[None] | None = None
        #: Counters (for logs, metrics and tests).
        self.heartbeats = 0
        self.republished = 0

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """First heartbeat (a failure is logged, not raised: the relay serves its own
        edges meanwhile), then the heartbeat task."""
        await self._beat(force=True)
        self._task = asyncio.create_task(self._run(), name="registry heartbeat")

    async def close(self) -> None:
        """Stop heartbeating and remove this relay's entries (best effort; a second
        call does nothing)."""
        if self._closed:
            return
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self.up:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(self.heartbeat):
                    pipe = self._redis.pipeline(transaction=False)
                    for name in self._local:
                        pipe.hdel(self._edge_key(name), self.relay_id)
                    pipe.delete(self._relay_key(self.relay_id))
                    await pipe.execute()
        with contextlib.suppress(Exception):
            await self._redis.aclose()

    # ------------------------------------------------------------------ publishing

    def publish(self, name: str, instances: tuple[str, ...]) -> None:
        """This relay now holds ``instances`` of edge ``name`` (empty: none); written
        to Redis at once by the heartbeat task (or on Redis' return)."""
        if instances:
            self._local[name] = instances
        else:
            self._local.pop(name, None)
        self._dirty.add(name)
        self._wake.set()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        next_beat = loop.time() + self.heartbeat
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(next_beat):
                    await self._wake.wait()
            self._wake.clear()
            if loop.time() >= next_beat:
                next_beat = loop.time() + self.heartbeat
                await self._beat()
            elif self.up and self._dirty:
                await self._write_dirty()

    async def _beat(self, *, force: bool = False) -> None:
        """Refresh the liveness key; re-publish everything if Redis lost it (or was
        unreachable until now)."""
        was_up = self.up
        try:
            ttl_ms = int(self.ttl * 1000)
            value = json.dumps({"advertise": self.advertise})
            # XX: only refresh an existing key; None means Redis no longer has it.
            kept = await self._redis.set(self._relay_key(self.relay_id), value, px=ttl_ms, xx=True)
            self.heartbeats += 1
            if not kept or not was_up or force:
                await self._redis.set(self._relay_key(self.relay_id), value, px=ttl_ms)
                self._dirty.update(self._local)
                if not force:
                    self.republished += 1
                    log.info(
                        "registry %s: re-publishing this relay and its %d edge name(s)%s",
                        self.url,
                        len(self._local),
                        "" if kept else " (the registry had lost them)",
                    )
            await self._write_dirty()
        except self._errors as exc:
            self._down(exc)
            return
        self.up = True
        if not was_up:
            log.info("registry %s reachable again", self.url)

    async def _write_dirty(self) -> None:
        names, self._dirty = self._dirty, set()
        try:
            pipe = self._redis.pipeline(transaction=False)
            for name in names:
                instances = self._local.get(name)
                if instances:
                    entry = {"advertise": self.advertise, "instances": list(instances)}
                    pipe.hset(self._edge_key(name), self.relay_id, json.dumps(entry))
                else:
                    pipe.hdel(self._edge_key(name), self.relay_id)
            await pipe.execute()
        except BaseException:
            self._dirty.update(names)
            raise
        if names:
            log.debug("registry: published %d edge name(s)", len(names))

    def _down(self, exc: BaseException) -> None:
        if self.up:
            self.up = False
            log.warning(
                "registry %s unreachable (%s): serving local edges and known routes "
                "until they expire; retrying every %.1fs",
                self.url,
                str(exc) or type(exc).__name__,
                self.heartbeat,
            )
        else:
            log.debug("registry still unreachable: %s", exc)
        self._dirty.update(self._local)

    # ------------------------------------------------------------------ lookups

    async def lookup(self, name: str, *, fresh: bool = False) -> list[Route]:
        """The other relays holding edge ``name``: as read at most ``heartbeat`` ago if
        that found any (``fresh``: read now), so a relay reads each name it routes to
        at most once per heartbeat while its routes work. While Redis is unreachable:
        the routes last read, until their relay's TTL as then read."""
        loop = asyncio.get_running_loop()
        read_at = self._read_at.get(name)
        if not fresh and read_at is not None and loop.time() - read_at < self.heartbeat:
            now = loop.time()
            cached = [r for r, until in self._known.get(name, []) if until > now]
            if cached:  # no route is never cached: a waiting client polls for one
                return cached
        if self.up:
            try:
                routes = await self._read(name, loop.time())
            except self._errors as exc:
                self._down(exc)
            else:
                return routes
        now = loop.time()
        known = [(r, until) for r, until in self._known.get(name, []) if until > now]
        if known:
            self._known[name] = known
        else:
            self._known.pop(name, None)
        return [r for r, _ in known]

    async def _read(self, name: str, now: float) -> list[Route]:
        fields: dict[str, str] = await self._redis.hgetall(self._edge_key(name))
        self._read_at[name] = now
        relays = [r for r in fields if r != self.relay_id]
        if not relays:
            self._known.pop(name, None)
            return []
        pipe = self._redis.pipeline(transaction=False)
        for relay in relays:
            pipe.pttl(self._relay_key(relay))
        ttls: list[int] = await pipe.execute()
        found: list[tuple[Route, float]] = []
        dead: list[str] = []
        for relay, pttl in zip(relays, ttls, strict=True):
            if pttl is None or pttl <= 0:
                dead.append(relay)
                continue
            try:
                entry = json.loads(fields[relay])
                route = Route(
                    name=name,
                    relay=relay,
                    advertise=_hostport(entry["advertise"]),
                    instances=tuple(entry.get("instances", ())),
                )
            except (ValueError, KeyError, TypeError):
                log.warning("registry: malformed entry of edge %r from relay %s", name, relay)
                continue
            found.append((route, now + pttl / 1000))
        if dead:
            # Garbage of relays that died: their liveness key is gone.
            await self._redis.hdel(self._edge_key(name), *dead)
        if found:
            self._known[name] = found
        else:
            self._known.pop(name, None)
        return [r for r, _ in found]

    # ------------------------------------------------------------------ keys

    @staticmethod
    def _relay_key(relay_id: str) -> str:
        return f"{PREFIX}relay:{relay_id}"

    @staticmethod
    def _edge_key(name: str) -> str:
        return f"{PREFIX}edge:{name}"

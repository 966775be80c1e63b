"""The tunnel from a program: :class:`Relay` and :class:`Edge`, started and stopped
from Python with the same settings as ``quic-reverse relay`` / ``quic-reverse edge``.

::

    from quic_reverse.tunnel.api import Edge, Relay

    async with Relay(listen="127.0.0.1:4433", self_signed=True, tokens="tokens.toml",
                     forward=["127.0.0.1:2222=office/ssh"]) as relay:
        async with Edge(relay="127.0.0.1:4433", name="office", token_file="office.token",
                        fingerprint=relay.fingerprint, expose=["ssh=127.0.0.1:22"]):
            await relay.wait_for_edge("office")
            ...  # 127.0.0.1:2222 now reaches the edge's 127.0.0.1:22

Settings are keyword arguments named as the TOML keys of ``[relay]`` / ``[edge]`` (the
CLI flag without its dashes: ``--token-file`` is ``token_file``; the repeatable
``--forward``/``--expose`` take a list), with the same values and checks as the CLI
(:data:`~quic_reverse.tunnel.config.RELAY_TABLE`,
:data:`~quic_reverse.tunnel.config.EDGE_TABLE`; ``docs/TUNNEL.md``): strings as on the
command line (``"127.0.0.1:0"``, ``"10"``) or typed values (``10.0``, ``Path(...)``,
``True``). ``config_file=`` reads a TOML file first, keywords override it, as flags
do. A ready-made :class:`~quic_reverse.tunnel.config.RelayConfig` /
:class:`~quic_reverse.tunnel.config.EdgeConfig` may be passed instead. A bad setting is
a :class:`~quic_reverse.errors.ConfigError` naming it, raised by the constructor.

``log_level`` is not applied: a library leaves logging to the application (records go
to the ``quic_reverse`` logger). Nothing here installs signal handlers.

The relay and edge themselves are :class:`quic_reverse.tunnel.relay.Relay` and
:class:`quic_reverse.tunnel.edge.Edge` (the CLI's); this module is a thin facade with
the lifecycle a program wants (``async with``, ``start``/``stop``, ``serve_forever``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from ..errors import ConfigError, UsageError
from .config import (
    EDGE_SETTINGS,
    RELAY_SETTINGS,
    EdgeConfig,
    Forward,
    RelayConfig,
    build_edge_config,
    build_relay_config,
    load_config_file,
)
from .edge import Edge as _EdgeRunner
from .edge import EdgeExit
from .relay import Relay as _RelayRunner
from .reload import checked_edge, checked_relay

__all__ = ["Edge", "EdgeExit", "Relay"]


def _settings(
    section: str,
    known: tuple[str, ...],
    config_file: str | Path | None,
    settings: Mapping[str, Any],
) -> tuple[dict[str, Any], Path | None, dict[str, Any]]:
    unknown = sorted(set(settings).difference(known))
    if unknown:
        raise ConfigError(
            f"{section}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )
    table: dict[str, Any] = {}
    base: Path | None = None
    if config_file is not None:
        table, base = load_config_file(Path(config_file), section)
    flags: dict[str, Any] = {}
    for name, value in settings.items():
        # Flags hold text or typed values; a repeatable setting is a list; a Path is text.
        if isinstance(value, Path):
            value = str(value)
        elif isinstance(value, tuple):
            value = list(value)
        flags[name] = value
    return table, base, flags


class Relay:
    """A relay run from a program (see the module docstring).

    ``async with Relay(...) as relay:`` starts it and stops it gracefully on exit;
    :meth:`start`/:meth:`stop` do the same by hand; :meth:`serve_forever` runs until
    :meth:`stop` or cancellation.
    """

    def __init__(
        self,
        config: RelayConfig | None = None,
        /,
        *,
        config_file: str | Path | None = None,
        **settings: Any,
    ) -> None:
        if config is None:
            table, base, flags = _settings("relay", RELAY_SETTINGS, config_file, settings)
            config = build_relay_config(table, base, flags)
        elif settings or config_file is not None:
            raise ConfigError("Relay: give either a RelayConfig or settings, not both")
        tokens = checked_relay(config)  # the CLI's, --check's and a reload's checks
        self.config = config
        self._runner = _RelayRunner(config, tokens)
        self._state = "new"
        self._stopped = asyncio.Event()

    # ------------------------------------------------------------ what it listens on

    @property
    def address(self) -> tuple[str, int]:
        """The UDP ``(host, port)`` edges dial (the real port when 0 was asked).

        Raises:
            UsageError: not started.
        """
        if self._runner.quic_address is None:
            raise UsageError("Relay.address: the relay is not started")
        return self._runner.quic_address

    @property
    def forward_addresses(self) -> dict[Forward, tuple[str, int]]:
        """Each forward and the TCP ``(host, port)`` it listens on (once started)."""
        return dict(self._runner.forward_addresses)

    def forward_address(self, edge: str, service: str) -> tuple[str, int]:
        """The TCP address of the (first) forward to ``edge``'s ``service``.

        Raises:
            UsageError: no such forward, or not started.
        """
        for fwd, address in self._runner.forward_addresses.items():
            if fwd.edge == edge and fwd.service == service:
                return address
        raise UsageError(f"Relay: no started forward to {edge}/{service}")

    @property
    def fingerprint(self) -> str | None:
        """The SHA-256 fingerprint of the relay's certificate (for the edge's
        ``fingerprint`` setting), once started."""
        return self._runner.fingerprint

    @property
    def runner(self) -> _RelayRunner:
        """The :class:`quic_reverse.tunnel.relay.Relay` doing the work."""
        return self._runner

    def edges(self) -> list[str]:
        """Names of the edges with a live, authenticated session now (sorted, unique)."""
        return sorted({replica.name for replica in self._runner.registry if replica.live})

    async def wait_for_edge(self, name: str) -> None:
        """Return once edge ``name`` has a live, authenticated session (wrap it in
        ``asyncio.timeout`` to bound the wait)."""
        pool = self._runner.registry.pool(name)
        while not pool.live():
            await pool.wait_changed()

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Listen for edges and on every forward.

        Raises:
            ConfigError: unusable certificate/key, a forward to an edge without a token.
            QuicReverseError, OSError: cannot listen (the message names the address).
            UsageError: already started.
        """
        if self._state != "new":
            raise UsageError(f"Relay.start(): the relay is {self._state}")
        self._state = "running"
        try:
            await self._runner.start()
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        """Graceful stop (the ``grace`` setting bounds it); idempotent."""
        if self._state == "stopped":
            return
        self._state = "stopped"
        self._stopped.set()
        await self._runner.shutdown()

    async def serve_forever(self) -> None:
        """Start if needed, then run until :meth:`stop` (from another task) or until
        cancelled; stops the relay either way."""
        if self._state == "new":
            await self.start()
        try:
            await self._stopped.wait()
        finally:
            await self.stop()

    async def __aenter__(self) -> Relay:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()


class Edge:
    """An edge run from a program (see the module docstring): dials the relay,
    authenticates and serves its ``expose`` list, reconnecting with backoff, until
    stopped.

    ``async with Edge(...) as edge:`` starts it and stops it on exit (running streams
    get the ``grace`` setting); :meth:`start`/:meth:`stop` do the same by hand.
    :meth:`wait` returns why it ended by itself (authentication or certificate
    rejected: :class:`~quic_reverse.tunnel.edge.EdgeExit`).
    """

    def __init__(
        self,
        config: EdgeConfig | None = None,
        /,
        *,
        config_file: str | Path | None = None,
        **settings: Any,
    ) -> None:
        if config is None:
            table, base, flags = _settings("edge", EDGE_SETTINGS, config_file, settings)
            config = build_edge_config(table, base, flags)
        elif settings or config_file is not None:
            raise ConfigError("Edge: give either an EdgeConfig or settings, not both")
        checked_edge(config)  # the CLI's, --check's and a reload's checks
        self.config = config
        self._runner = _EdgeRunner(config)
        self._task: asyncio.Task[EdgeExit] | None = None

    @property
    def instance(self) -> str:
        """This edge's instance id (the relay tells replicas apart by it)."""
        return self._runner.instance

    @property
    def runner(self) -> _EdgeRunner:
        """The :class:`quic_reverse.tunnel.edge.Edge` doing the work."""
        return self._runner

    def is_running(self) -> bool:
        """True between :meth:`start` and the end of the run."""
        return self._task is not None and not self._task.done()

    async def start(self) -> None:
        """Start the connect/serve/reconnect loop in a task (returns at once; the relay's
        :meth:`Relay.wait_for_edge` tells when it is connected).

        Raises:
            UsageError: already started.
        """
        if self._task is not None:
            raise UsageError("Edge.start(): already started")
        name = f"quic-reverse edge {self.config.name}"
        self._task = asyncio.get_running_loop().create_task(self._runner.run(), name=name)

    async def wait(self) -> EdgeExit:
        """Wait until the run ends and return why (``STOPPED`` after :meth:`stop`).

        Raises:
            UsageError: not started.
            ConfigError: a setting the transport rejected.
        """
        if self._task is None:
            raise UsageError("Edge.wait(): not started")
        return await asyncio.shield(self._task)

    async def stop(self) -> EdgeExit | None:
        """Stop gracefully and return why the run ended (``None`` if never started)."""
        if self._task is None:
            return None
        self._runner.stop()
        return await self.wait()

    async def __aenter__(self) -> Edge:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

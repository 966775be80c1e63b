"""``quic-reverse`` command line: ``relay``, ``edge`` and ``token``.

Exit status: 0 after a clean stop (SIGINT/SIGTERM), 1 on a runtime failure
(authentication or certificate rejected by the peer, cannot listen), 2 on a usage or
configuration error found before serving (bad flag or config key, wrong type, missing
or unusable file, certificate and key that do not match). Every error is one line on
stderr naming the option or file at fault, never a traceback. SIGHUP reloads the
configuration (:mod:`quic_reverse.tunnel.reload`); ``--check`` only validates it.
Settings come from flags and/or
a TOML ``--config`` file (flags win); both are driven by the settings tables of
:mod:`quic_reverse.tunnel.config`; see ``docs/TUNNEL.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import __version__
from .errors import ConfigError, QuicReverseError

if TYPE_CHECKING:
    from .tunnel.config import Setting
    from .tunnel.metrics import TunnelMetrics
    from .tunnel.status import StatusServer

__all__ = ["main"]

log = logging.getLogger("quic_reverse.cli")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


def _add_settings(p: argparse.ArgumentParser, table: Sequence[Setting]) -> None:
    """One flag per setting of ``table`` (values stay text: the config builder
    converts and checks them, so flag and file errors read the same)."""
    for s in table:
        help_text = s.help + (f" (default: {s.default})" if s.default is not None else "")
        if s.kind == "bool":
            p.add_argument(s.flag, action="store_true", default=None, help=help_text)
        elif s.kind in ("forwards", "expose", "hostports"):
            p.add_argument(s.flag, action="append", metavar=s.metavar, help=help_text)
        elif s.kind == "choice":
            p.add_argument(s.flag, choices=s.choices, help=help_text)
        else:
            metavar = s.metavar or (
                "S" if s.kind == "seconds" else "N" if s.kind == "count" else None
            )
            p.add_argument(s.flag, metavar=metavar, help=help_text)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for documentation and tests)."""
    from .tunnel.config import EDGE_TABLE, RELAY_TABLE

    parser = argparse.ArgumentParser(
        prog="quic-reverse",
        description=(
            "Reach TCP services behind NAT through a relay, over QUIC reverse streams. "
            "Run `relay` on a public host and `edge` next to the services."
        ),
        epilog="Full guide: docs/TUNNEL.md. Exit status: 0 ok, 1 failure, 2 usage error.",
    )
    parser.add_argument("--version", action="version", version=f"quic-reverse {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    r = sub.add_parser(
        "relay",
        help="public side: accept edges, publish TCP forwards",
        description=(
            "Accept edges over QUIC, authenticate them with per-edge tokens, and for each "
            "--forward listen on TCP; every TCP connection becomes a reverse stream to that "
            "edge's service."
        ),
    )
    r.add_argument(
        "--config", metavar="FILE", type=Path, help="TOML config file (flags override it)"
    )
    _add_settings(r, RELAY_TABLE)
    r.add_argument(
        "--check",
        action="store_true",
        help="check the configuration (and the files it names) and exit: 0 ok, 2 error",
    )

    e = sub.add_parser(
        "edge",
        help="NAT side: dial the relay, expose local TCP services",
        description=(
            "Dial the relay, authenticate as --name with the token in --token-file, and serve "
            "only the --expose'd services (the relay cannot choose any other target). "
            "Reconnects with exponential backoff and full jitter."
        ),
    )
    e.add_argument(
        "--config", metavar="FILE", type=Path, help="TOML config file (flags override it)"
    )
    _add_settings(e, EDGE_TABLE)
    e.add_argument(
        "--check",
        action="store_true",
        help="check the configuration (and the files it names) and exit: 0 ok, 2 error",
    )

    sub.add_parser("token", help="print a new random token for the tokens/token files")

    c = sub.add_parser(
        "cert",
        help="make a CA and a relay certificate signed by it (edges use --ca)",
        description=(
            "Create (or reuse) a private CA in --dir (ca.pem, ca.key) and issue relay.crt and "
            "relay.key for the given names and IPs. Private keys are written mode 600."
        ),
    )
    c.add_argument("--dir", type=Path, default=Path("."), help="output directory (default: .)")
    c.add_argument("--name", action="append", metavar="DNS", help="DNS name (repeatable)")
    c.add_argument("--ip", action="append", metavar="IP", help="IP address (repeatable)")
    c.add_argument("--days", type=int, default=825, help="validity in days (default: 825)")
    return parser


def _setup_logging(level: str, fmt: str = "text") -> None:
    from .tunnel.logfmt import setup_logging

    setup_logging(level, fmt)


def _flags(args: argparse.Namespace, names: Sequence[str]) -> dict[str, Any]:
    return {name: getattr(args, name) for name in names}


def _install_signals(stop: Callable[[], None], reload: Callable[[], None]) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop)
    with contextlib.suppress(NotImplementedError, RuntimeError, AttributeError):
        loop.add_signal_handler(signal.SIGHUP, reload)


class _Reloader:
    """Runs one reload at a time on SIGHUP (a second SIGHUP during a reload queues one
    more), telling systemd RELOADING=1 ... READY=1."""

    def __init__(self, apply: Callable[[], Coroutine[Any, Any, bool]]) -> None:
        self._apply = apply
        self._task: asyncio.Task[None] | None = None
        self._again = False

    def __call__(self) -> None:
        if self._task is not None and not self._task.done():
            self._again = True
            return
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        from .tunnel.notify import notify

        while True:
            self._again = False
            log.info("SIGHUP received: reloading the configuration (still running)")
            notify("RELOADING=1", "STATUS=reloading the configuration")
            try:
                ok = await self._apply()
            except Exception:  # never let a reload bug stop the process
                log.exception("reload failed; the running configuration stays in force")
                ok = False
            notify("READY=1", "STATUS=" + ("reloaded" if ok else "reload refused; running"))
            if not self._again:
                return

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


async def _start_status(address: tuple[str, int], metrics: TunnelMetrics) -> StatusServer:
    """The ``--metrics`` HTTP server (raises ``OSError`` naming ``--metrics``)."""
    from .tunnel.status import StatusServer

    server = StatusServer(metrics, *address)
    await server.start()
    return server


async def _run_relay(args: argparse.Namespace) -> int:
    from .tunnel.config import RELAY_SETTINGS
    from .tunnel.metrics import RelayMetrics
    from .tunnel.notify import notify
    from .tunnel.relay import Relay
    from .tunnel.reload import load_relay, reload_relay

    flags = _flags(args, RELAY_SETTINGS)
    config, tokens = load_relay(args.config, flags)
    if args.check:
        print(
            f"quic-reverse relay: configuration ok ({len(config.forwards)} forward(s), "
            f"{len(tokens.names)} edge token(s))"
        )
        return EXIT_OK
    _setup_logging(config.log_level, config.log_format)
    relay = Relay(config, tokens)
    status: StatusServer | None = None
    metrics: RelayMetrics | None = None
    if config.metrics is not None:
        relay.observer = metrics = RelayMetrics(relay)
    stop = asyncio.Event()
    reloader = _Reloader(lambda: reload_relay(relay, args.config, flags))
    _install_signals(stop.set, reloader)
    try:
        await relay.start()
        if config.metrics is not None and metrics is not None:
            status = await _start_status(config.metrics, metrics)
            metrics.ready = True
    except ConfigError:
        await relay.shutdown()
        raise
    except (OSError, QuicReverseError) as exc:
        log.error("cannot start the relay: %s", exc)
        await relay.shutdown()
        return EXIT_FAILURE
    if config.self_signed and relay.fingerprint:
        print(f"relay certificate sha256 fingerprint: {relay.fingerprint}", flush=True)
    notify("READY=1", "STATUS=serving")
    await stop.wait()
    log.info("signal received")
    notify("STOPPING=1")
    await reloader.close()
    if metrics is not None:
        metrics.ready = False
    await relay.shutdown()
    if status is not None:
        await status.close()
    return EXIT_OK


async def _run_edge(args: argparse.Namespace) -> int:
    from .tunnel.config import EDGE_SETTINGS
    from .tunnel.edge import Edge, EdgeExit
    from .tunnel.metrics import EdgeMetrics
    from .tunnel.notify import notify
    from .tunnel.reload import load_edge, reload_edge

    flags = _flags(args, EDGE_SETTINGS)
    config, _ = load_edge(args.config, flags)
    if args.check:
        print(f"quic-reverse edge: configuration ok ({len(config.expose)} service(s))")
        return EXIT_OK
    _setup_logging(config.log_level, config.log_format)
    edge = Edge(config)
    status: StatusServer | None = None
    if config.metrics is not None:
        edge.observer = metrics = EdgeMetrics(edge)
        try:
            status = await _start_status(config.metrics, metrics)
        except OSError as exc:
            log.error("cannot start the edge: %s", exc)
            return EXIT_FAILURE

    async def apply() -> bool:
        return reload_edge(edge, args.config, flags)

    reloader = _Reloader(apply)

    def stop() -> None:
        notify("STOPPING=1")
        edge.stop()

    _install_signals(stop, reloader)
    # The edge serves (and retries) from here on: systemd may consider it started.
    notify("READY=1", f"STATUS=connecting to {config.relay[0]}:{config.relay[1]}")
    try:
        outcome = await edge.run()
    finally:
        await reloader.close()
        if status is not None:
            await status.close()
    return EXIT_OK if outcome is EdgeExit.STOPPED else EXIT_FAILURE


def _run_cert(args: argparse.Namespace) -> int:
    from .tunnel.certs import issue_relay_certificate

    files = issue_relay_certificate(args.dir, args.name or [], args.ip or [], days=args.days)
    print(
        f"{'created' if files.ca_created else 'reused'} CA {files.ca_cert} (key {files.ca_key}, "
        f"mode 600); relay certificate {files.cert}, key {files.key} (mode 600)\n"
        f"relay: --cert {files.cert} --key {files.key}\n"
        f"edge:  --ca {files.ca_cert} --server-name "
        f"{(args.name or args.ip)[0]}"
    )
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``quic-reverse`` and ``python -m quic_reverse``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    if args.command == "token":
        from .tunnel.auth import generate_token

        print(generate_token())
        return EXIT_OK
    runner = _run_relay if args.command == "relay" else _run_edge
    try:
        if args.command == "cert":
            return _run_cert(args)
        return asyncio.run(runner(args))
    except ConfigError as exc:
        print(f"quic-reverse {args.command}: configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except QuicReverseError as exc:
        print(f"quic-reverse {args.command}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_OK
